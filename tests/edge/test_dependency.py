"""The FastAPI dependency form: ``Depends(Metered(...))`` on a route, a router or the app."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from tests.support.metering_helpers import RecordingProvider, run_lifespan
from tests.support.uvicorn_server import serve
from usage_middleware import ConfigurationError, Metered, UsageMiddleware, metered
from usage_middleware.customers import customer_from_header

ACME = {"X-Customer": "org:acme"}


def build(provider: RecordingProvider, **options: Any) -> FastAPI:
    app = FastAPI(**options)
    app.add_middleware(
        UsageMiddleware, provider=provider, customer=customer_from_header("X-Customer")
    )
    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
        headers=ACME,
    )


def reserves(provider: RecordingProvider) -> list[tuple[str, int]]:
    return [(c.feature, c.units) for c in provider.ops("reserve")]


async def test_router_dependency_meters_every_route_under_it(provider: RecordingProvider) -> None:
    """Every route of a router with Depends(Metered) is checked and charged once per 2xx."""
    provider.set_balance("org:acme", "feature:a", 2)
    app = build(provider)
    router = APIRouter(dependencies=[Depends(Metered("feature:a"))])
    ran: list[str] = []

    @router.get("/one")
    async def one() -> dict[str, int]:
        ran.append("one")
        return {"n": 1}

    @router.post("/two")
    def two() -> dict[str, int]:
        ran.append("two")
        return {"n": 2}

    app.include_router(router, prefix="/r")

    @app.get("/free")
    async def free() -> dict[str, bool]:
        return {"free": True}

    async with client(app) as c:
        assert (await c.get("/r/one")).status_code == 200
        assert (await c.post("/r/two")).status_code == 200
        refused = await c.get("/r/one")
        assert (await c.get("/free", headers={"X-Customer": ""})).status_code == 200
    assert refused.status_code == 402
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["feature"] == "feature:a"
    assert ran == ["one", "two"]  # the refused request never reached the endpoint
    assert provider.charged_units("org:acme", "feature:a") == 2
    provider.assert_settled()


async def test_app_dependency_and_no_customer(provider: RecordingProvider) -> None:
    """FastAPI(dependencies=[Depends(Metered)]) meters every route; no customer is a 401."""
    app = build(provider, dependencies=[Depends(Metered("feature:b", units=3))])

    @app.get("/x")
    async def x() -> dict[str, str]:
        return {"x": "y"}

    async with client(app) as c:
        ok = await c.get("/x")
        anonymous = await c.get("/x", headers={"X-Customer": ""})
    assert ok.status_code == 200 and ok.json() == {"x": "y"}
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert provider.charged_units("org:acme", "feature:b") == 3
    provider.assert_settled()


async def test_check_runs_before_dependencies_declared_after_it(
    provider: RecordingProvider,
) -> None:
    """A refused check stops the request before the expensive dependency declared after it."""
    provider.set_balance("org:acme", "feature:a", 0)
    expensive: list[int] = []

    async def lookup() -> int:
        expensive.append(1)
        return 1

    app = build(provider)

    @app.get("/search", dependencies=[Depends(Metered("feature:a")), Depends(lookup)])
    async def search() -> dict[str, int]:
        return {"hits": 1}

    async with client(app) as c:
        refused = await c.get("/search")
    assert refused.status_code == 402
    assert expensive == []
    assert provider.charged == {}
    provider.assert_settled()


async def test_router_dependency_and_decorator_decide_all_features_at_once(
    provider: RecordingProvider,
) -> None:
    """A @metered route under a Metered router reserves every feature in one decision."""
    expensive: list[int] = []

    async def lookup() -> int:
        expensive.append(1)
        return 1

    app = build(provider)
    router = APIRouter(dependencies=[Depends(Metered("feature:a"))])

    @router.post("/gen", dependencies=[Depends(lookup)])
    @metered("feature:b", units=5)
    async def gen() -> dict[str, str]:
        return {"ok": "yes"}

    app.include_router(router)
    async with client(app) as c:
        ok = await c.post("/gen")
        assert ok.status_code == 200
        assert reserves(provider) == [("feature:a", 1), ("feature:b", 5)]
        assert expensive == [1]
        provider.set_balance("org:acme", "feature:b", 5)  # used up: 5 charged already
        refused = await c.post("/gen")
    assert refused.status_code == 402
    assert refused.json()["feature"] == "feature:b"
    assert expensive == [1]  # the route-level dependency did not run for the refusal
    assert provider.charged_units("org:acme", "feature:a") == 1
    assert provider.charged_units("org:acme", "feature:b") == 5
    assert [(c.op, c.feature) for c in provider.ops("release")] == [("release", "feature:a")]
    provider.assert_settled()


async def test_metered_validates_like_the_decorator() -> None:
    """Metered refuses what @metered refuses, at construction, naming the fix."""
    with pytest.raises(ConfigurationError, match="feature:"):
        Metered("convert")
    with pytest.raises(ConfigurationError, match="units must be an int"):
        Metered("feature:a", units=0)
    with pytest.raises(ConfigurationError, match="one positional argument"):
        Metered("feature:a", units=lambda: 1)  # type: ignore[arg-type]
    assert repr(Metered("feature:a", units=2)) == "Metered('feature:a', units=2)"


def test_bare_metered_in_dependencies_fails_at_declaration() -> None:
    """dependencies=[Metered(...)] without Depends fails when the route is declared, naming it."""
    app = FastAPI()
    with pytest.raises(AttributeError, match=r"must be wrapped in Depends"):

        @app.get("/x", dependencies=[Metered("feature:a")])  # type: ignore[list-item]
        async def x() -> dict[str, int]:
            return {}


async def test_units_callable_and_bad_units(provider: RecordingProvider) -> None:
    """A units callable sizes the request; ValueError is a 400 and nothing is charged."""
    app = build(provider)
    units = Metered("feature:a", units=lambda request: int(request.query_params["n"]))

    @app.get("/n", dependencies=[Depends(units)])
    async def n() -> dict[str, str]:
        return {}

    async with client(app) as c:
        assert (await c.get("/n?n=4")).status_code == 200
        bad = await c.get("/n?n=x")
    assert bad.status_code == 400
    assert provider.charged_units("org:acme", "feature:a") == 4
    provider.assert_settled()


async def test_clobber_dependency_on_a_provider_without_clobber_fails_startup(
    provider: RecordingProvider,
) -> None:
    """The start-up route walk sees Metered(..., clobber=True) and refuses it by name."""
    app = build(provider)
    router = APIRouter(dependencies=[Depends(Metered("feature:a", units=3, clobber=True))])

    @router.get("/seats")
    async def seats() -> dict[str, int]:
        return {}

    app.include_router(router, prefix="/v1")
    sent = await run_lifespan(app)
    assert sent[-1]["type"] == "lifespan.startup.failed"
    assert "clobber=True" in sent[-1]["message"] and "/v1/seats" in sent[-1]["message"]


async def test_openapi_documents_routes_metered_by_dependency(
    provider: RecordingProvider,
) -> None:
    """Routes under a Metered router or app document 402 and list every metered feature."""
    app = build(provider, dependencies=[Depends(Metered("feature:b"))])
    router = APIRouter(dependencies=[Depends(Metered("feature:a"))])

    @router.get("/in")
    @metered("feature:c")
    async def inside() -> dict[str, int]:
        return {}

    app.include_router(router, prefix="/r")

    @app.get("/top")
    async def top() -> dict[str, int]:
        return {}

    schema = app.openapi()
    inner = schema["paths"]["/r/in"]["get"]
    assert "402" in inner["responses"]
    assert inner["x-usage-features"] == ["feature:b", "feature:a", "feature:c"]
    assert schema["paths"]["/top"]["get"]["x-usage-features"] == ["feature:b"]


async def test_without_middleware_it_fails_loudly() -> None:
    """A Metered route on an app without UsageMiddleware raises (500), never serves free."""
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(Metered("feature:a"))])
    async def x() -> dict[str, int]:
        return {}

    async with client(app) as c:
        response = await c.get("/x")
    assert response.status_code == 500


async def test_refusal_is_a_402_when_the_middleware_wraps_the_whole_app(
    provider: RecordingProvider,
) -> None:
    """UsageMiddleware(app) outside FastAPI's error middleware still answers the 402, not 500."""
    provider.set_balance("org:acme", "feature:a", 0)
    inner = FastAPI(dependencies=[Depends(Metered("feature:a"))])

    @inner.get("/x")
    async def x() -> dict[str, int]:
        return {}

    app = UsageMiddleware(inner, provider=provider, customer=customer_from_header("X-Customer"))
    async with client(app) as c:
        refused = await c.get("/x")
    assert refused.status_code == 402
    assert refused.json()["feature"] == "feature:a"
    provider.assert_settled()


@pytest.mark.slow
async def test_router_dependency_over_uvicorn(provider: RecordingProvider) -> None:
    """Over real HTTP: served and charged once, refused with the 402 problem, not charged."""
    provider.set_balance("org:acme", "feature:a", 1)
    app = build(provider)
    router = APIRouter(dependencies=[Depends(Metered("feature:a"))])

    @router.get("/x")
    async def x() -> dict[str, int]:
        return {"x": 1}

    app.include_router(router)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, headers=ACME) as c:
        ok = await c.get("/x")
        refused = await c.get("/x")
    assert ok.status_code == 200 and ok.json() == {"x": 1}
    assert refused.status_code == 402
    assert refused.headers["content-type"] == "application/problem+json"
    assert provider.charged_units("org:acme", "feature:a") == 1
    provider.assert_settled()


def test_router_dependency_with_testclient(provider: RecordingProvider) -> None:
    """Through Starlette's TestClient (lifespan on): served, charged once, then 402."""
    from fastapi.testclient import TestClient

    provider.set_balance("org:acme", "feature:a", 2)
    app = build(provider)
    router = APIRouter(dependencies=[Depends(Metered("feature:a", units=2))])

    @router.get("/x")
    def x() -> dict[str, int]:
        return {"x": 1}

    app.include_router(router)
    with TestClient(app, headers=ACME) as c:
        assert c.get("/x").status_code == 200
        refused = c.get("/x")
    assert refused.status_code == 402 and refused.json()["units"] == 2
    assert provider.charged_units("org:acme", "feature:a") == 2
    provider.assert_settled()
