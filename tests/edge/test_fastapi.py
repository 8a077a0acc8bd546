"""@metered on FastAPI path operations: signatures FastAPI reads, routers, OpenAPI, auth."""

import threading
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request

from tests.support.metering_helpers import RecordingProvider, run_lifespan
from usage_middleware import ConfigurationError
from usage_middleware.customers import customer_from_header, customer_from_user
from usage_middleware.decorator import metered
from usage_middleware.middleware import UsageMiddleware

ACME = {"X-Customer": "org:acme"}


class Item(BaseModel):
    name: str
    price: float


class ItemOut(BaseModel):
    name: str


def common(limit: int = Query(10)) -> dict[str, int]:
    return {"limit": limit}


def build(provider: RecordingProvider, **options: Any) -> FastAPI:
    options.setdefault("customer", customer_from_header("X-Customer"))
    app = FastAPI()
    app.add_middleware(UsageMiddleware, provider=provider, **options)
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
        headers=ACME,
    )


async def test_no_request_parameter_needed(provider: RecordingProvider) -> None:
    """A path operation without a request parameter is metered and gets its query params."""
    app = build(provider)

    @app.get("/hello")
    @metered("feature:a")
    async def hello(name: str = "world") -> dict[str, str]:
        return {"hello": name}

    async with client(app) as c:
        r = await c.get("/hello", params={"name": "ada"})
    assert r.status_code == 200 and r.json() == {"hello": "ada"}
    assert provider.charged_units("org:acme", "feature:a") == 1
    provider.assert_settled()


async def test_depends_and_annotated(provider: RecordingProvider) -> None:
    """Depends, Annotated[..., Depends()], Header and a body model keep working."""
    app = build(provider)

    @app.post("/items/{item_id}")
    @metered("feature:a", units=2)
    async def create(
        item_id: int,
        item: Item,
        params: Annotated[dict[str, int], Depends(common)],
        other: dict[str, int] = Depends(common),  # noqa: B008 - the classic style
        x_trace: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        return {"id": item_id, "item": item.name, "limit": params["limit"], "trace": x_trace}

    async with client(app) as c:
        r = await c.post(
            "/items/5?limit=3", json={"name": "pen", "price": 1.5}, headers={"X-Trace": "t1"}
        )
        bad = await c.post("/items/5", json={"name": "pen"})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": 5, "item": "pen", "limit": 3, "trace": "t1"}
    assert bad.status_code == 422  # validation happens before the wrapper: nothing reserved
    assert provider.charged_units("org:acme", "feature:a") == 2
    assert len(provider.ops("reserve")) == 1
    provider.assert_settled()


async def test_response_model_and_return_annotation(provider: RecordingProvider) -> None:
    """response_model= and the return annotation filter the output as without @metered."""
    app = build(provider)

    @app.get("/m", response_model=ItemOut)
    @metered("feature:a")
    async def model() -> dict[str, Any]:
        return {"name": "pen", "price": 2}

    @app.get("/r")
    @metered("feature:a")
    async def annotated() -> ItemOut:
        return Item(name="cup", price=3)  # type: ignore[return-value]

    async with client(app) as c:
        assert (await c.get("/m")).json() == {"name": "pen"}
        assert (await c.get("/r")).json() == {"name": "cup"}
    assert provider.charged_units("org:acme", "feature:a") == 2


async def test_returning_a_response_object(provider: RecordingProvider) -> None:
    """A path operation returning a Response passes it through and is charged."""
    app = build(provider)

    @app.get("/text", response_class=PlainTextResponse)
    @metered("feature:a")
    async def text() -> PlainTextResponse:
        return PlainTextResponse("plain", status_code=201)

    async with client(app) as c:
        r = await c.get("/text")
    assert r.status_code == 201 and r.text == "plain"
    assert provider.charged_units("org:acme", "feature:a") == 1


async def test_own_request_parameter_is_used(provider: RecordingProvider) -> None:
    """An endpoint that takes its own Request gets it; no hidden parameter is added."""
    app = build(provider)

    @app.get("/own")
    @metered("feature:a")
    async def own(request: Request, q: int = 1) -> dict[str, Any]:
        return {"path": request.url.path, "q": q}

    async with client(app) as c:
        assert (await c.get("/own?q=2")).json() == {"path": "/own", "q": 2}
    assert provider.charged_units("org:acme", "feature:a") == 1


async def test_sync_path_operation_runs_in_threadpool(provider: RecordingProvider) -> None:
    """A plain def path operation runs in a worker thread, not on the event loop."""
    app = build(provider)
    threads: list[int] = []

    @app.get("/sync")
    @metered("feature:a")
    def sync(n: int = 1) -> dict[str, int]:
        threads.append(threading.get_ident())
        return {"n": n}

    async with client(app) as c:
        assert (await c.get("/sync?n=3")).json() == {"n": 3}
    assert threads and threads[0] != threading.get_ident()
    assert provider.charged_units("org:acme", "feature:a") == 1


async def test_http_exception_in_path_operation_is_released(provider: RecordingProvider) -> None:
    """FastAPI's HTTPException (404) from a metered path operation is not charged."""
    app = build(provider)

    @app.get("/missing")
    @metered("feature:a")
    async def missing() -> None:
        raise HTTPException(404, "no such thing")

    async with client(app) as c:
        assert (await c.get("/missing")).status_code == 404
    assert provider.charged == {}
    provider.assert_settled()


async def test_included_router(provider: RecordingProvider) -> None:
    """Metered routes of an included APIRouter (with a prefix) are metered once."""
    app = build(provider)
    router = APIRouter(prefix="/v1")

    @router.get("/thing")
    @metered("feature:b", units=4)
    async def thing() -> dict[str, bool]:
        return {"ok": True}

    app.include_router(router)
    async with client(app) as c:
        assert (await c.get("/v1/thing")).status_code == 200
    assert provider.charged_units("org:acme", "feature:b") == 4
    provider.assert_settled()


async def test_mounted_fastapi_sub_app(provider: RecordingProvider) -> None:
    """A metered route in a mounted FastAPI sub-app is metered by the outer middleware."""
    app = build(provider)
    sub = FastAPI()

    @sub.get("/x")
    @metered("feature:a")
    async def x() -> dict[str, bool]:
        return {"sub": True}

    app.mount("/sub", sub)
    async with client(app) as c:
        assert (await c.get("/sub/x")).json() == {"sub": True}
    assert provider.charged_units("org:acme", "feature:a") == 1


async def test_402_from_path_operation(provider: RecordingProvider) -> None:
    """A refused FastAPI request gets the 402 problem response, and the endpoint does not run."""
    provider.set_balance("org:acme", "feature:a", 0)
    app = build(provider)
    ran: list[bool] = []

    @app.get("/paid", response_model=ItemOut)
    @metered("feature:a")
    async def paid() -> dict[str, str]:
        ran.append(True)
        return {"name": "x"}

    async with client(app) as c:
        r = await c.get("/paid")
    assert r.status_code == 402 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["feature"] == "feature:a" and ran == []


async def test_openapi_lists_402_and_features(provider: RecordingProvider) -> None:
    """/openapi.json lists a 402 problem+json response and x-usage-features on metered routes."""
    app = build(provider)

    @app.get("/a")
    @metered("feature:a")
    @metered("feature:b", units=2)
    async def a() -> dict[str, int]:
        return {}

    @app.get("/free")
    async def free() -> dict[str, int]:
        return {}

    @app.get("/own402", responses={402: {"description": "mine"}})
    @metered("feature:a")
    async def own402() -> dict[str, int]:
        return {}

    async with client(app) as c:
        spec = (await c.get("/openapi.json")).json()
    op = spec["paths"]["/a"]["get"]
    assert op["x-usage-features"] == ["feature:a", "feature:b"]
    assert "application/problem+json" in op["responses"]["402"]["content"]
    assert "feature:a" in op["responses"]["402"]["description"]
    assert "402" not in spec["paths"]["/free"]["get"]["responses"]
    assert spec["paths"]["/own402"]["get"]["responses"]["402"]["description"] == "mine"
    # the hidden request parameter never shows up as a parameter
    assert "parameters" not in op


async def test_metered_above_route_decorator_is_detected(provider: RecordingProvider) -> None:
    """@metered above @app.get is refused: startup fails and requests get 500, never unmetered."""
    app = build(provider)

    @metered("feature:a")
    @app.get("/wrong")
    async def wrong() -> dict[str, str]:
        return {"charged": "never"}

    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "wrong" in sent[0]["message"] and "below @app.get" in sent[0]["message"]

    async with client(app) as c:
        r = await c.get("/wrong")
    assert r.status_code == 500 and "never" not in r.text
    assert provider.ops("reserve") == []


async def test_customer_from_user_with_authentication_middleware(
    provider: RecordingProvider,
) -> None:
    """customer_from_user reads request.user set by AuthenticationMiddleware (any order)."""

    class TokenBackend(AuthenticationBackend):
        async def authenticate(
            self, conn: HTTPConnection
        ) -> tuple[AuthCredentials, SimpleUser] | None:
            token = conn.headers.get("authorization")
            if token != "Bearer good":
                return None
            return AuthCredentials(["authenticated"]), SimpleUser("org:acme")

    app = FastAPI()
    app.add_middleware(UsageMiddleware, provider=provider, customer=customer_from_user())
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())

    @app.get("/me")
    @metered("feature:a")
    async def me() -> dict[str, bool]:
        return {"ok": True}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        good = await c.get("/me", headers={"Authorization": "Bearer good"})
        anon = await c.get("/me")
    assert good.status_code == 200
    assert anon.status_code == 401 and anon.json()["status"] == 401
    assert provider.charged_units("org:acme", "feature:a") == 1


async def test_customer_from_user_without_auth_middleware_names_the_fix(
    provider: RecordingProvider,
) -> None:
    """customer_from_user without AuthenticationMiddleware is a ConfigurationError, not a 401."""
    app = FastAPI()
    app.add_middleware(UsageMiddleware, provider=provider, customer=customer_from_user())

    @app.get("/me")
    @metered("feature:a")
    async def me() -> dict[str, bool]:
        return {"ok": True}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        with pytest.raises(ConfigurationError, match="AuthenticationMiddleware"):
            await c.get("/me")


async def test_units_callable_reads_the_body(provider: RecordingProvider) -> None:
    """An async units callable can read the JSON body FastAPI also parses."""
    app = build(provider)

    async def per_item(request: Request) -> int:
        return len((await request.json())["items"])

    class Batch(BaseModel):
        items: list[str]

    @app.post("/batch")
    @metered("feature:b", units=per_item)
    async def batch(body: Batch) -> dict[str, int]:
        return {"n": len(body.items)}

    async with client(app) as c:
        r = await c.post("/batch", json={"items": ["a", "b", "c"]})
    assert r.json() == {"n": 3}
    assert provider.charged_units("org:acme", "feature:b") == 3
