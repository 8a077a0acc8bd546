"""Problem bodies and logs name a metered route by its full template, mount prefix included."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from tests.support.metering_helpers import RecordingProvider
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.middleware import UsageMiddleware

ACME = {"X-Customer": "org:acme"}


def not_an_int(request: Request) -> object:
    return "five"  # a bug in the app: the middleware answers 500 naming the endpoint


@metered("feature:a", units=not_an_int)
async def item(request: Request) -> Response:
    return JSONResponse({"uid": request.path_params["uid"]})


async def has_route(request: Request) -> Response:
    return JSONResponse("route" in request.scope)


async def records_the_route() -> bool:
    """Whether this Starlette puts the matched route in scope["route"] (newer ones do)."""
    app = Starlette(routes=[Route("/", has_route)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        answer: bool = (await c.get("/")).json()
    return answer


def starlette_app(provider: RecordingProvider) -> Starlette:
    inner = Starlette(routes=[Route("/items/{uid}", item)])
    deeper = Starlette(routes=[Mount("/b", app=inner)])
    return Starlette(
        routes=[Route("/items/{uid}", item), Mount("/a", app=inner), Mount("/c", app=deeper)],
        middleware=[
            Middleware(
                UsageMiddleware, provider=provider, customer=customer_from_header("X-Customer")
            )
        ],
    )


@pytest.mark.parametrize(
    ("url", "template"),
    [
        ("/items/1", "/items/{uid}"),
        ("/a/items/1", "/a/items/{uid}"),
        ("/c/b/items/1", "/c/b/items/{uid}"),
    ],
)
@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_problem_and_log_name_the_mount_prefix(
    provider: RecordingProvider,
    caplog: pytest.LogCaptureFixture,
    url: str,
    template: str,
    root_path: str,
) -> None:
    """A route in a mounted Starlette sub-app is named with its mount prefixes (not the
    server's root_path) in the 500 problem body and in the log (by its template where
    Starlette records the route, else by the request path)."""
    if not await records_the_route():
        template = url
    caplog.set_level(logging.ERROR, logger="usage_middleware")
    transport = httpx.ASGITransport(app=starlette_app(provider), root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.get(root_path + url, headers=ACME)
    assert r.status_code == 500
    expected = f"{item.__module__}.{item.__qualname__} (GET {template})"
    assert r.json()["endpoint"] == expected
    assert expected in r.json()["detail"]
    assert any(expected in rec.getMessage() for rec in caplog.records)
    assert provider.ops("reserve") == []


async def test_fastapi_sub_app_route_is_named_with_its_mount_prefix(
    provider: RecordingProvider,
) -> None:
    """A route in a FastAPI sub-app mounted at /a is named /a/items/{uid}."""
    sub = FastAPI()

    @sub.get("/items/{uid}")
    @metered("feature:a", units=not_an_int)
    async def sub_item(uid: int) -> dict[str, int]:
        return {"uid": uid}

    app = FastAPI()
    app.mount("/a", sub)
    app.add_middleware(
        UsageMiddleware, provider=provider, customer=customer_from_header("X-Customer")
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.get("/a/items/7", headers=ACME)
    assert r.status_code == 500
    template = "/a/items/{uid}" if await records_the_route() else "/a/items/7"
    assert r.json()["endpoint"].endswith(f"sub_item (GET {template})")
