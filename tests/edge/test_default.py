"""``UsageMiddleware(default=...)``: every HTTP request no route-level metering covers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.metering_helpers import RecordingProvider
from tests.support.uvicorn_server import serve
from usage_middleware import ConfigurationError, Metered, UsageMiddleware, metered
from usage_middleware.customers import customer_from_header

ACME = {"X-Customer": "org:acme"}
by_header = customer_from_header("X-Customer")


@pytest.fixture
def provider() -> RecordingProvider:
    """org:acme has 100 units of feature:req, feature:a and feature:b."""
    return RecordingProvider(
        {("org:acme", f): 100 for f in ("feature:req", "feature:a", "feature:b")}
    )


def build(provider: RecordingProvider, ran: list[str], **options: Any) -> FastAPI:
    options.setdefault("default", ("feature:req", 2))
    app = FastAPI()
    app.add_middleware(UsageMiddleware, provider=provider, customer=by_header, **options)

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        ran.append("plain")
        return {"plain": "yes"}

    @app.post("/convert")
    @metered("feature:a", units=3)
    async def convert() -> dict[str, str]:
        ran.append("convert")
        return {"converted": "yes"}

    @app.get("/items/{item}", dependencies=[Depends(Metered("feature:b"))])
    async def item(item: int) -> dict[str, int]:
        ran.append("item")
        return {"item": item}

    @app.get("/items/{item}/fail")
    async def fail(item: int) -> Response:
        ran.append("fail")
        return JSONResponse({}, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, bool]:
        ran.append("health")
        return {"ok": True}

    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
        headers=ACME,
    )


async def test_uncovered_routes_are_charged_the_default(provider: RecordingProvider) -> None:
    """A route without its own metering is checked and charged the default's units."""
    ran: list[str] = []
    async with client(build(provider, ran)) as c:
        assert (await c.get("/plain")).status_code == 200
        assert (await c.get("/plain")).status_code == 200
        assert (await c.get("/items/1/fail")).status_code == 500
    assert provider.charged_units("org:acme", "feature:req") == 4
    assert provider.charged == {("org:acme", "feature:req"): 4}
    provider.assert_settled()


async def test_covered_routes_are_charged_their_own_features_only(
    provider: RecordingProvider,
) -> None:
    """@metered and Metered routes give the default hold back: never charged both."""
    ran: list[str] = []
    async with client(build(provider, ran)) as c:
        assert (await c.post("/convert")).status_code == 200
        assert (await c.get("/items/7")).status_code == 200
    assert provider.charged == {("org:acme", "feature:a"): 3, ("org:acme", "feature:b"): 1}
    assert [c.feature for c in provider.ops("release")] == ["feature:req", "feature:req"]
    provider.assert_settled()


async def test_refused_default_refuses_uncovered_routes_before_they_run(
    provider: RecordingProvider,
) -> None:
    """A customer out of the default gets 402 on an uncovered route; it never runs."""
    provider.set_balance("org:acme", "feature:req", 1)  # 2 per request
    ran: list[str] = []
    async with client(build(provider, ran)) as c:
        refused = await c.get("/plain")
        covered = await c.post("/convert")  # its own feature decides
        dependency = await c.get("/items/3")
    assert refused.status_code == 402 and refused.json()["feature"] == "feature:req"
    assert covered.status_code == 200 and dependency.status_code == 200
    assert ran == ["convert", "item"]
    assert provider.charged == {("org:acme", "feature:a"): 3, ("org:acme", "feature:b"): 1}
    provider.assert_settled()


async def test_excluded_paths_404_and_free_methods(provider: RecordingProvider) -> None:
    """/health needs no customer and is free; a 404 is checked but not charged."""
    ran: list[str] = []
    async with client(build(provider, ran)) as c:
        health = await c.get("/health", headers={"X-Customer": ""})
        docs = await c.get("/docs", headers={"X-Customer": ""})
        missing = await c.get("/nowhere")
        anonymous = await c.get("/nowhere", headers={"X-Customer": ""})
        head = await c.head("/plain", headers={"X-Customer": ""})
    assert health.status_code == 200 and docs.status_code == 200
    assert missing.status_code == 404
    assert anonymous.status_code == 401
    assert head.status_code == 405  # FastAPI: HEAD on a GET route; not metered (free)
    assert provider.charged == {}
    provider.assert_settled()


async def test_custom_exclude_and_plain_feature_name(provider: RecordingProvider) -> None:
    """default='feature:x' is 1 unit; default_exclude replaces the defaults."""
    ran: list[str] = []
    app = build(provider, ran, default="feature:req", default_exclude=["/plain"])
    async with client(app) as c:
        assert (await c.get("/plain", headers={"X-Customer": ""})).status_code == 200
        assert (await c.get("/health")).status_code == 200
    assert provider.charged == {("org:acme", "feature:req"): 1}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"default": "requests"}, "feature:"),
        ({"default": ("feature:req", 0)}, "units must be an int"),
        ({"default": ("feature:req", 1, 2)}, "default=...\\) must be a feature name"),
        ({"default": "feature:req", "default_exclude": "/health"}, "collection of paths"),
        ({"default": "feature:req", "default_exclude": ["health"]}, "starting with '/'"),
        ({"default": "feature:req", "default_exclude": ["/docs/"]}, "not ending with one"),
    ],
)
def test_misconfiguration_fails_at_construction(
    provider: RecordingProvider, options: dict[str, Any], match: str
) -> None:
    """A bad default= or default_exclude= raises ConfigurationError naming the fix."""
    with pytest.raises(ConfigurationError, match=match):
        UsageMiddleware(Starlette(), provider=provider, customer=by_header, **options)


async def test_route_shadowing_a_metered_path_gets_the_refusal(
    provider: RecordingProvider,
) -> None:
    """An unmetered route matched where a metered path pattern also matches: 402, not free."""
    provider.set_balance("org:acme", "feature:req", 0)

    async def special(request: Request) -> Response:
        return JSONResponse({"special": True})

    @metered("feature:a")
    async def item(request: Request) -> Response:
        return JSONResponse({"item": True})

    app = Starlette(
        routes=[Route("/items/special", special), Route("/items/{item}", item)],
        middleware=[
            Middleware(
                UsageMiddleware, provider=provider, customer=by_header, default="feature:req"
            )
        ],
    )
    async with client(app) as c:
        shadowed = await c.get("/items/special")
        metered_item = await c.get("/items/5")
    assert shadowed.status_code == 402 and shadowed.json()["feature"] == "feature:req"
    assert metered_item.status_code == 200
    assert provider.charged == {("org:acme", "feature:a"): 1}
    provider.assert_settled()


async def test_router_metered_routes_are_covered(provider: RecordingProvider) -> None:
    """Routes of an included router with Metered are covered (the walk follows includes)."""
    provider.set_balance("org:acme", "feature:req", 0)
    app = FastAPI()
    app.add_middleware(
        UsageMiddleware, provider=provider, customer=by_header, default="feature:req"
    )
    router = APIRouter(dependencies=[Depends(Metered("feature:b", units=4))])

    @router.get("/{name}")
    async def get(name: str) -> dict[str, str]:
        return {"name": name}

    app.include_router(router, prefix="/v1")
    async with client(app) as c:
        ok = await c.get("/v1/x")
    assert ok.status_code == 200
    assert provider.charged == {("org:acme", "feature:b"): 4}


@pytest.mark.slow
async def test_default_over_uvicorn(provider: RecordingProvider) -> None:
    """Over real HTTP: the default is charged once per 2xx, refused with 402 when used up."""
    provider.set_balance("org:acme", "feature:req", 2)
    ran: list[str] = []
    async with serve(build(provider, ran)) as url, httpx.AsyncClient(base_url=url) as c:
        ok = await c.get("/plain", headers=ACME)
        refused = await c.get("/plain", headers=ACME)
        covered = await c.post("/convert", headers=ACME)
    assert ok.status_code == 200 and refused.status_code == 402
    assert covered.status_code == 200
    assert provider.charged == {("org:acme", "feature:req"): 2, ("org:acme", "feature:a"): 3}
    provider.assert_settled()
