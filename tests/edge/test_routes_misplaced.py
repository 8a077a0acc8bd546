"""Issue 11 part 2: a misplaced @metered never serves free; every schema documents metering.

Runs on whatever FastAPI/Starlette is installed: CI runs it on the newest releases (FastAPI
keeps included routers lazily) and on the lowest that pyproject allows (it copies them).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from tests.support.metering_helpers import RecordingProvider, run_lifespan
from usage_middleware import problems
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.middleware import UsageMiddleware

ACME = {"X-Customer": "org:acme"}
LIBRARY_STATUSES = ("400", "401", "402", "503")


def fastapi_app(provider: RecordingProvider) -> FastAPI:
    app = FastAPI()
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


def misplaced_in(
    layout: str, ran: list[str], *, middleware: bool = True
) -> tuple[FastAPI, str, RecordingProvider]:
    """An app with ``@metered`` above the route decorator, inside ``layout``; its URL."""
    provider = RecordingProvider({("org:acme", "feature:a"): 100})
    app = fastapi_app(provider) if middleware else FastAPI()
    router = APIRouter(prefix="/r")

    @metered("feature:a")
    @router.get("/paid")
    async def paid() -> dict[str, str]:
        ran.append("paid")
        return {"served": "free"}

    if layout == "router":
        app.include_router(router, prefix="/v1")
        return app, "/v1/r/paid", provider
    if layout == "nested":
        outer = APIRouter(prefix="/outer")
        outer.include_router(router, prefix="/in")
        app.include_router(outer, prefix="/v1")
        return app, "/v1/outer/in/r/paid", provider
    sub = FastAPI()
    sub.include_router(router)
    app.mount("/sub", sub)
    return app, "/sub/r/paid", provider


@pytest.mark.parametrize("layout", ["router", "nested", "mounted"])
async def test_misplaced_decorator_in_routers_fails_startup_naming_the_path(layout: str) -> None:
    """@metered above @router.get in an included/nested/mounted router fails start-up."""
    ran: list[str] = []
    app, path, _ = misplaced_in(layout, ran)
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.failed"
    message = sent[0]["message"]
    assert "paid" in message and path in message and "below" in message


@pytest.mark.parametrize("layout", ["router", "nested", "mounted"])
async def test_misplaced_decorator_without_lifespan_is_refused_before_the_body_runs(
    layout: str,
) -> None:
    """No lifespan: the first request's route check refuses it (500); the body never runs."""
    ran: list[str] = []
    app, path, provider = misplaced_in(layout, ran)
    async with client(app) as c:
        r = await c.get(path)
    assert r.status_code == 500 and "free" not in r.text
    assert ran == [] and provider.charged == {}


@pytest.mark.parametrize("layout", ["router", "nested", "mounted"])
async def test_the_function_itself_refuses_when_served_unwrapped(
    layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever walks the routes, the bare function answers a logged 500 problem, unrun."""
    ran: list[str] = []
    app, path, _ = misplaced_in(layout, ran, middleware=False)
    with caplog.at_level(logging.ERROR, logger="usage_middleware"):
        async with client(app) as c:
            r = await c.get(path)
    assert r.status_code == 500
    assert r.headers["content-type"] == problems.PROBLEM_JSON
    body = r.json()
    assert body["type"] == problems.MISPLACED_DECORATOR and "paid" in body["endpoint"]
    assert "below" in body["detail"]
    assert ran == [] and "free" not in r.text
    assert any("without its @metered wrapper" in rec.getMessage() for rec in caplog.records)


async def test_misplaced_decorator_is_refused_even_where_no_walk_reaches() -> None:
    """An endpoint hidden from the route walk (behind an opaque app) is still refused."""
    ran: list[str] = []

    async def raw(request: Request) -> Response:
        ran.append("raw")
        return PlainTextResponse("unmetered!")

    inner = Starlette(routes=[Route("/raw", raw)])
    metered("feature:a")(raw)  # the wrapper is thrown away: @metered above the route

    async def opaque(scope: Any, receive: Any, send: Any) -> None:  # no .app/.routes
        await inner(scope, receive, send)

    provider = RecordingProvider({("org:acme", "feature:a"): 100})
    app = Starlette(
        routes=[Mount("/", app=opaque)],
        middleware=[
            Middleware(
                UsageMiddleware, provider=provider, customer=customer_from_header("X-Customer")
            )
        ],
    )
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.complete"  # the walk cannot see it...
    async with client(app) as c:
        r = await c.get("/raw")
    assert r.status_code == 500 and r.json()["type"] == problems.MISPLACED_DECORATOR
    assert ran == [] and provider.charged == {}  # ...and it is refused all the same


async def test_misplaced_sync_endpoint_is_refused_too() -> None:
    """A plain-def endpoint registered unwrapped is refused in the threadpool, unrun."""
    ran: list[str] = []
    app = FastAPI()  # no middleware, no walk: the trap alone
    router = APIRouter()

    @metered("feature:a")
    @router.get("/sync")
    def sync(q: int = 1) -> dict[str, int]:
        ran.append("sync")
        return {"q": q}

    app.include_router(router)
    async with client(app) as c:
        r = await c.get("/sync", params={"q": 2})
    assert r.status_code == 500 and r.json()["type"] == problems.MISPLACED_DECORATOR
    assert ran == []


async def test_a_superseded_wrapper_registered_is_refused() -> None:
    """@metered above @app.get over another @metered: the registered wrapper refuses."""
    ran: list[str] = []
    provider = RecordingProvider({("org:acme", "feature:a"): 100, ("org:acme", "feature:b"): 9})
    app = fastapi_app(provider)

    @metered("feature:a")
    @app.get("/two")
    @metered("feature:b")
    async def two() -> dict[str, bool]:
        ran.append("two")
        return {"ok": True}

    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.failed" and "two" in sent[0]["message"]
    bare = FastAPI()  # the same wrapper on an app with no walk: it refuses by itself
    bare.add_api_route("/two", app.routes[-1].endpoint)  # type: ignore[attr-defined]
    async with client(bare) as c:
        r = await c.get("/two")
    assert r.status_code == 500 and r.json()["type"] == problems.MISPLACED_DECORATOR
    assert ran == [] and provider.charged == {}


async def test_correct_order_in_routers_is_metered_and_the_original_keeps_its_signature() -> None:
    """Below the route decorator, routers and mounts are metered; the signature is intact."""
    provider = RecordingProvider({("org:acme", "feature:a"): 100})
    app = fastapi_app(provider)
    router = APIRouter(prefix="/r")

    async def convert(text: str, n: int = 1) -> dict[str, str]:
        return {"converted": text.upper() * n}

    before = inspect.signature(convert)
    router.get("/convert")(metered("feature:a")(convert))
    app.include_router(router, prefix="/v1")
    assert inspect.signature(convert) == before  # the trap keeps what frameworks read
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.complete"
    async with client(app) as c:
        r = await c.get("/v1/r/convert", params={"text": "hi", "n": 2})
    assert r.status_code == 200 and r.json() == {"converted": "HIHI"}
    assert provider.charged == {("org:acme", "feature:a"): 1}


def documented_app(provider: RecordingProvider) -> FastAPI:
    app = fastapi_app(provider)
    router = APIRouter(prefix="/r")
    nested = APIRouter(prefix="/n")

    @router.get("/a/{uid}")
    @metered("feature:a")
    async def in_router(uid: int) -> dict[str, int]:
        return {"uid": uid}

    @nested.post("/b")
    @metered("feature:b")
    async def in_nested() -> dict[str, int]:
        return {}

    @router.get("/own", responses={402: {"description": "mine"}})
    @metered("feature:a")
    async def own() -> dict[str, int]:
        return {}

    @router.get("/free")
    async def free() -> dict[str, int]:
        return {}

    router.include_router(nested, prefix="/x")
    app.include_router(router, prefix="/v1")
    sub = FastAPI()
    sub_router = APIRouter(prefix="/s")

    @sub_router.get("/c")
    @metered("feature:c")
    async def in_sub() -> dict[str, int]:
        return {}

    sub.include_router(sub_router)
    app.mount("/sub", sub)
    return app


def assert_documented(operation: dict[str, Any], features: list[str]) -> None:
    for status in LIBRARY_STATUSES:
        assert "application/problem+json" in operation["responses"][status]["content"], status
    assert operation["x-usage-features"] == features


async def test_openapi_before_any_request_documents_routers_and_nesting() -> None:
    """app.openapi() before any request (offline export) has 400/401/402/503 everywhere."""
    app = documented_app(RecordingProvider())
    schema = app.openapi()  # nothing has run: no lifespan, no request, no middleware built
    paths = schema["paths"]
    assert_documented(paths["/v1/r/a/{uid}"]["get"], ["feature:a"])
    assert_documented(paths["/v1/r/x/n/b"]["post"], ["feature:b"])
    own = paths["/v1/r/own"]["get"]["responses"]
    assert own["402"]["description"] == "mine" and "401" in own
    assert not set(LIBRARY_STATUSES) & set(paths["/v1/r/free"]["get"]["responses"])
    assert "parameters" not in paths["/v1/r/x/n/b"]["post"]  # the hidden request param
    mounted = app.routes[-1].app  # type: ignore[attr-defined]
    assert_documented(mounted.openapi()["paths"]["/s/c"]["get"], ["feature:c"])


async def test_served_openapi_documents_routers_and_mounted_sub_apps() -> None:
    """/openapi.json and a mounted sub-app's /sub/openapi.json document metered operations."""
    app = documented_app(RecordingProvider())
    async with client(app) as c:
        top = (await c.get("/openapi.json")).json()
        sub = (await c.get("/sub/openapi.json")).json()
    assert_documented(top["paths"]["/v1/r/a/{uid}"]["get"], ["feature:a"])
    assert_documented(top["paths"]["/v1/r/x/n/b"]["post"], ["feature:b"])
    assert_documented(sub["paths"]["/s/c"]["get"], ["feature:c"])


async def test_one_function_metered_twice_for_two_routes_serves_both() -> None:
    """The same bare function given to @metered twice (two features, two routes) runs both."""
    provider = RecordingProvider({("org:acme", "feature:a"): 10, ("org:acme", "feature:b"): 10})
    app = fastapi_app(provider)

    async def handler(n: int = 1) -> dict[str, int]:
        return {"n": n}

    app.get("/a")(metered("feature:a")(handler))
    app.get("/b")(metered("feature:b")(handler))
    async with client(app) as c:
        a = await c.get("/a", params={"n": 2})
        b = await c.get("/b", params={"n": 3})
    assert (a.status_code, a.json(), b.status_code, b.json()) == (200, {"n": 2}, 200, {"n": 3})
    assert provider.charged == {("org:acme", "feature:a"): 1, ("org:acme", "feature:b"): 1}


# -- closure-free module-level functions are trapped too (review F2) --

RAN_PLAIN: list[str] = []  # a global, not a closure cell: these functions have no free vars


async def plain_async(request: Request) -> Response:
    RAN_PLAIN.append("async")
    return PlainTextResponse("served free")


def plain_sync(request: Request, n: int = 1, *, k: str = "x") -> Response:
    RAN_PLAIN.append("sync")
    return PlainTextResponse("served free")


@pytest.mark.parametrize("endpoint", [plain_async, plain_sync], ids=["async", "sync"])
async def test_closure_free_module_function_is_refused_where_no_walk_reaches(
    endpoint: Any,
) -> None:
    """A module-level function with no free variables, registered before @metered ran and
    served behind an opaque ASGI callable, answers the 500 problem and never runs."""
    RAN_PLAIN.clear()
    sig = inspect.signature(endpoint)
    inner = Starlette(routes=[Route("/plain", endpoint)])
    metered("feature:a")(endpoint)  # the wrapper is thrown away: @metered above the route
    assert inspect.signature(endpoint) == sig  # what frameworks read is unchanged

    async def opaque(scope: Any, receive: Any, send: Any) -> None:  # no .app/.routes
        await inner(scope, receive, send)

    provider = RecordingProvider({("org:acme", "feature:a"): 100})
    app = Starlette(
        routes=[Mount("/", app=opaque)],
        middleware=[
            Middleware(
                UsageMiddleware, provider=provider, customer=customer_from_header("X-Customer")
            )
        ],
    )
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.complete"  # the walk cannot see it...
    async with client(app) as c:
        r = await c.get("/plain")
    assert r.status_code == 500 and r.json()["type"] == problems.MISPLACED_DECORATOR
    assert "served free" not in r.text
    assert RAN_PLAIN == [] and provider.charged == {}  # ...and it is refused all the same


class _Base:
    def answer(self) -> str:
        return "base"


class _Child(_Base):
    async def answer(self, x: int = 1, *, y: int = 2) -> str:  # type: ignore[override]
        return super().answer()  # a __class__ cell


class _Plain:
    async def answer(self, x: int = 1, /, *args: int, y: int = 2, **kw: int) -> str:
        return "free"  # no free variables


@pytest.mark.parametrize("cls", [_Child, _Plain])
def test_trap_covers_methods_with_class_cells_and_defaults(
    caplog: pytest.LogCaptureFixture, cls: type
) -> None:
    """A method (with a __class__ cell, or closure-free) with defaults, kw-only defaults,
    *args and **kw is trapped with its signature unchanged; nothing logged untrappable."""
    import asyncio

    func = cls.__dict__["answer"]
    sig, code = inspect.signature(func), func.__code__
    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        wrapper = metered("feature:a")(func)
    assert func.__code__ is not code and inspect.signature(func) == sig
    assert not [r for r in caplog.records if "cannot guard" in r.getMessage()]
    response = asyncio.run(func(cls()))
    assert response.status_code == 500
    assert asyncio.run(wrapper.__wrapped__(cls())).status_code == 500


async def test_misplaced_start_up_error_names_each_endpoint_once() -> None:
    """The start-up error names a misplaced endpoint of a mounted sub-app once, though the
    walk reaches the sub-app by more than one attribute."""
    provider = RecordingProvider({("org:acme", "feature:a"): 100})
    app = fastapi_app(provider)
    sub = FastAPI()

    @metered("feature:a")
    @sub.get("/x")
    async def x() -> dict[str, str]:
        return {"served": "free"}

    app.mount("/sub", sub)
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert sent[0]["message"].count("'/sub/x'") == 1, sent[0]["message"]


def test_a_function_that_cannot_be_trapped_is_named_at_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the trap cannot be built, a WARNING names the function (it was DEBUG: silent)."""
    from usage_middleware import decorator

    def broken(code: Any) -> str:
        raise SyntaxError("simulated")

    monkeypatch.setattr(decorator, "_parameters_of", broken)

    async def untrappable(request: Request) -> Response:
        return PlainTextResponse("x")

    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        metered("feature:a")(untrappable)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("untrappable" in r.getMessage() for r in warned), caplog.records
