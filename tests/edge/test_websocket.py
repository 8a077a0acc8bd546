"""Metered websockets over real uvicorn (wsproto): denial, 1008 fallback, when one is charged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.support.metering_helpers import RecordingProvider
from tests.support.uvicorn_server import serve
from tests.support.waiting import eventually
from tests.support.ws_client import Closed, connect
from usage_middleware import Metered, UsageMiddleware, metered
from usage_middleware.customers import customer_from_header

pytestmark = pytest.mark.slow

ACME = {"X-Customer": "org:acme"}
by_header = customer_from_header("X-Customer")


async def _chat(websocket: WebSocket, ran: list[str]) -> None:
    ran.append("chat")
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            if text == "boom":
                raise RuntimeError("the endpoint failed")
            if text.startswith("close:"):
                await websocket.close(int(text.removeprefix("close:")))
                return
            if text == "return":
                return  # the server closes with 1000
            await websocket.send_text(text.upper())
    except WebSocketDisconnect:
        pass


def starlette_app(provider: RecordingProvider, ran: list[str]) -> Starlette:
    @metered("feature:a", units=2)
    async def chat(websocket: WebSocket) -> None:
        await _chat(websocket, ran)

    return Starlette(
        routes=[WebSocketRoute("/chat", chat)],
        middleware=[Middleware(UsageMiddleware, provider=provider, customer=by_header)],
    )


def fastapi_app(provider: RecordingProvider, ran: list[str]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(UsageMiddleware, provider=provider, customer=by_header)
    router = APIRouter(dependencies=[Depends(Metered("feature:a", units=2))])

    @router.websocket("/chat")
    async def chat(websocket: WebSocket) -> None:
        await _chat(websocket, ran)

    app.include_router(router)
    return app


def without_denial_extension(app: Any) -> Any:
    """The app as a server without ``websocket.http.response`` would serve it."""

    async def shim(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            extensions = dict(scope.get("extensions") or {})
            extensions.pop("websocket.http.response", None)
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return shim


APPS = [starlette_app, fastapi_app]


@pytest.mark.parametrize("make", APPS, ids=["starlette", "fastapi-dependency"])
async def test_normal_close_is_charged_once(provider: RecordingProvider, make: Any) -> None:
    """A connection the client closes with 1000 is charged its units once."""
    ran: list[str] = []
    async with serve(make(provider, ran), ws="wsproto") as url, connect(url) as ws:
        assert await ws.handshake("/chat", ACME) is None
        await ws.send_text("hi")
        assert await ws.receive() == "HI"
        assert provider.held_units() == 2  # held while the connection lives
        await ws.close(1000)
        await eventually(lambda: provider.ops("commit"))
    assert provider.charged_units("org:acme", "feature:a") == 2
    assert ran == ["chat"]
    provider.assert_settled()


@pytest.mark.parametrize("make", APPS, ids=["starlette", "fastapi-dependency"])
async def test_refused_handshake_gets_the_402_problem(
    provider: RecordingProvider, make: Any
) -> None:
    """Refused, the handshake is denied with the 402 problem response; the endpoint never runs."""
    provider.set_balance("org:acme", "feature:a", 1)  # 2 needed
    ran: list[str] = []
    async with serve(make(provider, ran), ws="wsproto") as url, connect(url) as ws:
        rejected = await ws.handshake("/chat", ACME)
    assert rejected is not None and rejected.status == 402
    assert rejected.headers["content-type"] == "application/problem+json"
    body = json.loads(rejected.body)
    assert body["feature"] == "feature:a" and body["units"] == 2 and body["remaining"] == 1
    assert ran == []
    assert provider.charged == {}
    provider.assert_settled()


async def test_no_customer_is_denied_with_401(provider: RecordingProvider) -> None:
    """A websocket without a customer is denied with the 401 problem and its challenge."""
    ran: list[str] = []
    async with serve(starlette_app(provider, ran), ws="wsproto") as url, connect(url) as ws:
        rejected = await ws.handshake("/chat", {})
    assert rejected is not None and rejected.status == 401
    assert rejected.headers["www-authenticate"] == "Bearer"
    assert ran == []


@pytest.mark.parametrize("make", APPS, ids=["starlette", "fastapi-dependency"])
async def test_without_the_denial_extension_it_closes_with_1008(
    provider: RecordingProvider, make: Any
) -> None:
    """Where the server cannot deny a handshake, it is accepted and closed with 1008 + reason."""
    provider.set_balance("org:acme", "feature:a", 0)
    ran: list[str] = []
    app = without_denial_extension(make(provider, ran))
    async with serve(app, ws="wsproto") as url, connect(url) as ws:
        assert await ws.handshake("/chat", ACME) is None
        closed = await ws.receive()
    assert isinstance(closed, Closed)
    assert closed.code == 1008
    assert closed.reason.startswith("402 Payment Required: feature:a")
    assert len(closed.reason.encode()) <= 123
    assert ran == []
    assert provider.charged == {}
    provider.assert_settled()


@pytest.mark.parametrize(
    ("how", "charged"),
    [
        ("client-1001", 2),
        ("server-1000", 2),
        ("server-returns", 2),
        ("client-drops", 0),
        ("client-1011", 0),
        ("client-1005", 0),
        ("server-1011", 0),
        ("server-4000", 0),
        ("endpoint-raises", 0),
    ],
)
async def test_charged_only_when_the_connection_ends_normally(
    provider: RecordingProvider, how: str, charged: int
) -> None:
    """Normal codes (1000/1001) or a plain return charge; drops, errors, others do not."""
    ran: list[str] = []
    async with serve(starlette_app(provider, ran), ws="wsproto") as url, connect(url) as ws:
        assert await ws.handshake("/chat", ACME) is None
        await ws.send_text("hi")
        assert await ws.receive() == "HI"
        if how == "client-1001":
            await ws.close(1001)
        elif how == "client-1011":
            await ws.close(1011)
        elif how == "client-1005":
            await ws.close_without_code()
        elif how == "client-drops":
            ws.abort()
        elif how == "server-returns":
            await ws.send_text("return")
            assert isinstance(await ws.receive(), Closed)
        elif how == "endpoint-raises":
            await ws.send_text("boom")
            closed = await ws.receive()  # 1011, or uvicorn drops the connection (1006)
            assert isinstance(closed, Closed) and closed.code in (1006, 1011)
        else:
            code = int(how.removeprefix("server-"))
            await ws.send_text(f"close:{code}")
            closed = await ws.receive()
            assert isinstance(closed, Closed) and closed.code == code
        await eventually(lambda: provider.ops("commit", "release"))
    assert provider.charged_units("org:acme", "feature:a") == charged
    provider.assert_settled()


async def test_unmetered_websocket_app_passes_through(provider: RecordingProvider) -> None:
    """An app without a metered websocket route serves websockets untouched (no customer)."""

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("plain")
        await websocket.close()

    app = Starlette(
        routes=[WebSocketRoute("/echo", echo)],
        middleware=[Middleware(UsageMiddleware, provider=provider, customer=by_header)],
    )
    async with serve(app, ws="wsproto") as url, connect(url) as ws:
        assert await ws.handshake("/echo", {}) is None
        assert await ws.receive() == "plain"
    assert provider.ops("reserve") == []
