"""A client that gives up before the response is not charged: real servers, real clients.

Servers drop ``send`` silently once the client is gone, and a plain endpoint never calls
``receive``; the middleware watches for ``http.disconnect`` itself. Each test runs a real
server (uvicorn with h11 and httptools, hypercorn) on loopback with httpx clients whose
read timeout is shorter than the route (they close the connection) next to patient ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.edge.test_uvicorn import ACME, by_header, eventually, serve
from tests.support.metering_helpers import RecordingProvider
from usage_middleware.decorator import metered
from usage_middleware.middleware import UsageMiddleware

pytestmark = pytest.mark.slow

ROUTE_SECONDS = 0.5  # how long the slow routes work
IMPATIENT = 0.1  # the impatient clients' read timeout: they close the connection then
HTTP_IMPLS = ["h11", "httptools"]
DISCONNECTED = "client disconnected; not charged"

seen_disconnect: list[str] = []  # routes that observed the client leaving themselves


@metered("feature:a")
async def slow(request: Request) -> Response:
    await asyncio.sleep(ROUTE_SECONDS)
    return JSONResponse({"done": True})


def slow_sync(request: Request) -> Response:  # a plain def route: Starlette runs it in a thread
    import time

    time.sleep(ROUTE_SECONDS)
    return JSONResponse({"done": True})


@metered("feature:a")
async def slow_json(request: Request) -> Response:
    payload = await request.json()
    await asyncio.sleep(ROUTE_SECONDS)
    return JSONResponse({"echo": payload})


@metered("feature:a")
async def polls(request: Request) -> Response:
    """Polls Request.is_disconnected() while working, as long-running routes do."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ROUTE_SECONDS
    while loop.time() < deadline:
        if await request.is_disconnected():
            seen_disconnect.append("polls")
            break
        await asyncio.sleep(0.02)
    return JSONResponse({"done": True})


@metered("feature:a")
async def late_body(request: Request) -> Response:
    """Reads the (empty) body only after it has worked: the watch must not take it."""
    await asyncio.sleep(0.05)
    body = await request.body()
    return JSONResponse({"body": body.decode()})


async def _lines(n: int) -> AsyncIterator[bytes]:
    try:
        for i in range(n):
            yield f"line {i}\n".encode()
            await asyncio.sleep(0.01)
    except asyncio.CancelledError:
        seen_disconnect.append("stream")
        raise


@metered("feature:b")
async def stream(request: Request) -> Response:
    n = int(request.query_params.get("n", "5"))
    return StreamingResponse(_lines(n), media_type="text/plain")


class Passthrough(BaseHTTPMiddleware):
    """A BaseHTTPMiddleware that does nothing but call the next app."""

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        return await call_next(request)


def make_app(provider: RecordingProvider, base_http: str = "none") -> Starlette:
    """The routes under UsageMiddleware, with a BaseHTTPMiddleware "outside"/"inside" it."""
    middleware = [Middleware(UsageMiddleware, provider=provider, customer=by_header)]
    if base_http == "outside":
        middleware.insert(0, Middleware(Passthrough))
    elif base_http == "inside":
        middleware.append(Middleware(Passthrough))
    return Starlette(
        routes=[
            Route("/slow", slow),
            Route("/slow-sync", metered("feature:a")(slow_sync)),
            Route("/json", slow_json, methods=["POST"]),
            Route("/polls", polls),
            Route("/late-body", late_body),
            Route("/stream", stream),
        ],
        middleware=middleware,
    )


async def impatient_and_patient(
    url: str, path: str, *, impatient: int, patient: int, **request: Any
) -> list[int]:
    """``impatient`` clients that time out and ``patient`` ones, concurrently, each on its
    own connection; returns the patient clients' statuses.

    Only the *read* timeout is short: every client connects and sends its whole request
    (so the server gets it and the middleware holds units for it), then the impatient
    ones give up waiting for the answer. A short connect or write timeout would let a
    stall of the shared event loop (a ~0.1 s gen-2 garbage collection late in the suite)
    make a client give up before its request was sent: no request, no hold to settle.
    """

    async def one(patience: float) -> int | None:
        timeout = httpx.Timeout(10.0, read=patience)
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            method = "POST" if "json" in request else "GET"
            try:
                response = await client.request(method, path, headers=ACME, **request)
            except httpx.ReadTimeout:
                return None
            return response.status_code

    results = await asyncio.gather(
        *(one(IMPATIENT) for _ in range(impatient)), *(one(10.0) for _ in range(patient))
    )
    assert results[:impatient] == [None] * impatient, "the impatient clients did not time out"
    return [r for r in results[impatient:] if r is not None]


async def all_settled(provider: RecordingProvider, n: int) -> None:
    """Wait (bounded) until ``n`` reservations were committed or released."""
    await eventually(lambda: len(provider.ops("commit", "release")) >= n, within=10)


def disconnect_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "usage_middleware" and DISCONNECTED in r.getMessage()
    ]


@pytest.mark.parametrize("http", HTTP_IMPLS)
@pytest.mark.parametrize("path", ["/slow", "/slow-sync"])
async def test_clients_that_time_out_are_not_charged(
    provider: RecordingProvider, caplog: pytest.LogCaptureFixture, http: str, path: str
) -> None:
    """Under uvicorn, N clients that time out before a slow route answers are not charged
    (each logged once at INFO); the M patient ones are charged once each."""
    caplog.set_level(logging.INFO, logger="usage_middleware")
    n, m = 6, 3
    async with serve(make_app(provider), http=http) as url:
        statuses = await impatient_and_patient(url, path, impatient=n, patient=m)
        assert statuses == [200] * m
        await all_settled(provider, n + m)
    assert provider.charged_units("org:acme", "feature:a") == m
    assert len(provider.ops("release")) == n
    assert len(disconnect_logs(caplog)) == n
    provider.assert_settled()


@pytest.mark.parametrize("base_http", ["outside", "inside"])
@pytest.mark.parametrize("http", HTTP_IMPLS)
async def test_with_base_http_middleware(
    provider: RecordingProvider, http: str, base_http: str
) -> None:
    """With a BaseHTTPMiddleware outside or inside UsageMiddleware, only the patient
    clients are charged."""
    n, m = 5, 3
    async with serve(make_app(provider, base_http), http=http) as url:
        statuses = await impatient_and_patient(url, "/slow", impatient=n, patient=m)
        assert statuses == [200] * m
        await all_settled(provider, n + m)
    assert provider.charged_units("org:acme", "feature:a") == m
    assert len(provider.ops("release")) == n
    provider.assert_settled()


@pytest.mark.parametrize("http", HTTP_IMPLS)
async def test_route_reading_json_gets_its_body(provider: RecordingProvider, http: str) -> None:
    """A route that reads request.json() gets the body; those who time out are not charged."""
    n, m = 4, 2
    async with serve(make_app(provider), http=http) as url:
        statuses = await impatient_and_patient(
            url, "/json", impatient=n, patient=m, json={"q": "x" * 1000}
        )
        assert statuses == [200] * m
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            echoed = await c.post("/json", headers=ACME, json={"q": 1})
        assert echoed.json() == {"echo": {"q": 1}}
        await all_settled(provider, n + m + 1)
    assert provider.charged_units("org:acme", "feature:a") == m + 1
    provider.assert_settled()


@pytest.mark.parametrize("http", HTTP_IMPLS)
async def test_route_polling_is_disconnected_still_sees_it(
    provider: RecordingProvider, http: str
) -> None:
    """A route polling Request.is_disconnected() still sees the client leave (the watch
    does not take the message from it), and that client is not charged."""
    seen_disconnect.clear()
    async with serve(make_app(provider), http=http) as url:
        statuses = await impatient_and_patient(url, "/polls", impatient=1, patient=1)
        assert statuses == [200]
        await all_settled(provider, 2)
    assert seen_disconnect == ["polls"]
    assert provider.charged_units("org:acme", "feature:a") == 1
    provider.assert_settled()


@pytest.mark.parametrize("http", HTTP_IMPLS)
async def test_route_reading_the_body_late_gets_it(provider: RecordingProvider, http: str) -> None:
    """A GET route that reads its (empty) body after the watch started gets it at once."""
    async with serve(make_app(provider), http=http) as url:
        async with httpx.AsyncClient(base_url=url, timeout=5) as c:
            r = await c.get("/late-body", headers=ACME)
        assert r.status_code == 200 and r.json() == {"body": ""}
        await all_settled(provider, 1)
    assert provider.charged_units("org:acme", "feature:a") == 1


@pytest.mark.parametrize("http", HTTP_IMPLS)
async def test_streaming_response_still_hears_the_disconnect(
    provider: RecordingProvider, http: str
) -> None:
    """A StreamingResponse still stops when its client leaves mid-stream (not charged),
    and a stream read to its end is charged once."""
    seen_disconnect.clear()
    async with serve(make_app(provider), http=http) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream?n=2000 HTTP/1.1\r\nHost: x\r\nX-Customer: org:acme\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"line 3\n"), 5)
        writer.close()
        await writer.wait_closed()
        await all_settled(provider, 1)
        await eventually(lambda: seen_disconnect == ["stream"])
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            full = await c.get("/stream?n=20", headers=ACME)
        assert full.text.count("line") == 20
        await all_settled(provider, 2)
    assert [c.op for c in provider.ops("commit", "release")] == ["release", "commit"]
    assert provider.charged_units("org:acme", "feature:b") == 1
    provider.assert_settled()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve_hypercorn(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under hypercorn on a free loopback port; yield its base URL."""
    hypercorn_asyncio = pytest.importorskip("hypercorn.asyncio")
    from hypercorn.config import Config

    config = Config()
    port = _free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    stop = asyncio.Event()
    task = asyncio.create_task(hypercorn_asyncio.serve(app, config, shutdown_trigger=stop.wait))
    try:
        for _ in range(500):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            assert not task.done(), "hypercorn did not start"
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_hypercorn_clients_that_time_out_are_not_charged(
    provider: RecordingProvider,
) -> None:
    """Under hypercorn, clients that time out are not charged, patient ones are, and a
    route reading request.json() still gets its body."""
    n, m = 5, 3
    async with serve_hypercorn(make_app(provider)) as url:
        statuses = await impatient_and_patient(url, "/slow", impatient=n, patient=m)
        assert statuses == [200] * m
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            echoed = await c.post("/json", headers=ACME, content=json.dumps({"q": 2}))
        assert echoed.json() == {"echo": {"q": 2}}
        await all_settled(provider, n + m + 1)
    assert provider.charged_units("org:acme", "feature:a") == m + 1
    assert len(provider.ops("release")) == n
    provider.assert_settled()


# -- the same at the message level: what the middleware does with a server's receive/send --


def _message_app(provider: RecordingProvider) -> Starlette:
    return Starlette(
        routes=[Route("/slow", slow), Route("/late-body", late_body)],
        middleware=[Middleware(UsageMiddleware, provider=provider, customer=by_header)],
    )


async def _run(
    app: Any, spec_version: str, receive: Callable[[], Awaitable[Any]], path: str = "/slow"
) -> list[dict[str, Any]]:
    """One GET through ``app`` with ``receive``; the messages sent (a send that raises
    OSError once ``gone`` is set, as an ASGI 2.4 server does)."""
    from tests.support.metering_helpers import http_scope

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(
        app(http_scope(path, headers=list(ACME.items()), spec_version=spec_version), receive, send),
        10,
    )
    return sent


async def test_asgi_2_3_server_disconnect_seen_by_the_watch(
    provider: RecordingProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """With an ASGI 2.3 server that reports the disconnect only through receive (which the
    route never calls), the middleware sees it and releases the hold, logging it once."""
    caplog.set_level(logging.INFO, logger="usage_middleware")
    gone = asyncio.Event()
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    asyncio.get_running_loop().call_later(0.1, gone.set)
    sent = await _run(_message_app(provider), "2.3", receive)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert provider.charged_units("org:acme", "feature:a") == 0
    assert [c.op for c in provider.ops("prepare", "commit", "release")] == ["release"]
    assert len(disconnect_logs(caplog)) == 1


async def test_asgi_2_4_server_send_raising_is_not_charged(
    provider: RecordingProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """With an ASGI 2.4 server, whose send raises OSError once the client is gone, the
    final body's failed send releases the hold and is logged as a disconnect."""
    caplog.set_level(logging.INFO, logger="usage_middleware")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client went away")

    from tests.support.metering_helpers import http_scope

    scope = http_scope("/slow", headers=list(ACME.items()), spec_version="2.4")
    with pytest.raises(OSError):
        await asyncio.wait_for(_message_app(provider)(scope, receive, send), 10)
    assert provider.charged_units("org:acme", "feature:a") == 0
    assert [c.op for c in provider.ops("commit", "release")] == ["release"]
    assert len(disconnect_logs(caplog)) == 1


async def test_watch_hands_a_receive_error_to_the_app(provider: RecordingProvider) -> None:
    """An error raised by the server's receive while the middleware read ahead reaches the
    route's own next receive (here: reading the body), not the void."""
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise RuntimeError("receive exploded")

    from tests.support.metering_helpers import http_scope

    scope = http_scope("/late-body", headers=list(ACME.items()))
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match="receive exploded"):
        await asyncio.wait_for(_message_app(provider)(scope, receive, send), 10)
    assert calls == 1  # read once, by the watch; the route got that error
    assert provider.charged_units("org:acme", "feature:a") == 0
    provider.assert_settled()


# -- a client gone while the request waited *before* its units were held (issue: review F1) --


async def _slow_user() -> str:
    """A slow FastAPI dependency (an authentication call, say)."""
    await asyncio.sleep(ROUTE_SECONDS)
    return "user"


async def _slow_units(request: Request) -> int:
    """A slow async units callable."""
    await asyncio.sleep(ROUTE_SECONDS)
    return 1


def make_fastapi_app(provider: RecordingProvider) -> Any:
    """Endpoints that wait only before the check, then return without awaiting anything."""
    app = FastAPI()

    @app.post("/dep")
    @metered("feature:a")
    async def dep(user: Annotated[str, Depends(_slow_user)]) -> dict[str, str]:
        return {"user": user}

    @app.post("/units")
    @metered("feature:a", units=_slow_units)
    async def units() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(UsageMiddleware, provider=provider, customer=by_header)
    return app


@pytest.mark.parametrize("http", HTTP_IMPLS)
@pytest.mark.parametrize("path", ["/dep", "/units"])
async def test_client_gone_during_a_slow_dependency_is_not_charged(
    provider: RecordingProvider, http: str, path: str
) -> None:
    """Clients that time out during a slow dependency or units callable, before the units
    are held, are not charged when the endpoint then answers without awaiting anything."""
    n, m = 3, 2
    async with serve(make_fastapi_app(provider), http=http) as url:
        statuses = await impatient_and_patient(url, path, impatient=n, patient=m, json={})
        assert statuses == [200] * m
        await all_settled(provider, n + m)
    assert provider.charged_units("org:acme", "feature:a") == m
    assert len(provider.ops("release")) == n
    provider.assert_settled()


# -- a request that does not yield after its hold is judged without a watch task --------


@metered("feature:a")
async def instant(request: Request) -> Response:
    return JSONResponse({"done": True})


async def _read_after(request: Request) -> Response:
    """Reads its (empty) body after a metered check decided, without awaiting before."""
    return JSONResponse({"body": (await request.body()).decode()})


def _instant_app(provider: RecordingProvider) -> Starlette:
    return Starlette(
        routes=[
            Route("/instant", instant),
            Route("/read-after", metered("feature:a")(_read_after)),
        ],
        middleware=[Middleware(UsageMiddleware, provider=provider, customer=by_header)],
    )


async def test_instant_route_is_judged_in_its_own_task_without_a_loop_turn(
    provider: RecordingProvider,
) -> None:
    """A route that answers without awaiting after its hold (ASGI 2.3 server) is charged
    after the server's receive was asked in the request's own task, the call that would
    wait cancelled where it waited (no watch task, nothing left waiting)."""
    client_there = asyncio.Event()  # never set: the client stays
    callers: list[asyncio.Task[Any] | None] = []
    cancelled = 0
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls, cancelled
        calls += 1
        callers.append(asyncio.current_task())
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        try:
            await client_there.wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return {"type": "http.disconnect"}

    from tests.support.metering_helpers import http_scope

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope("/instant", headers=list(ACME.items()), spec_version="2.3")
    await _instant_app(provider)(scope, receive, send)  # in this task: it never waits
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert provider.charged_units("org:acme", "feature:a") == 1
    assert calls == 2 and cancelled == 1
    me = asyncio.current_task()
    assert callers == [me, me]  # no watch task read it
    assert not client_there._waiters  # type: ignore[attr-defined]


async def test_known_disconnect_behind_a_checkpoint_is_not_charged(
    provider: RecordingProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that already knows the client left, but answers receive only after a bare
    yield (an anyio checkpoint), is heard before the charge of a route that answers
    without awaiting after its hold: released, logged once."""
    caplog.set_level(logging.INFO, logger="usage_middleware")
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)  # a checkpoint
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}  # the client is gone, and the server knows

    sent = await _run(_instant_app(provider), "2.3", receive, "/instant")
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert provider.charged_units("org:acme", "feature:a") == 0
    assert [c.op for c in provider.ops("prepare", "commit", "release")] == ["release"]
    assert len(disconnect_logs(caplog)) == 1


async def test_body_read_ahead_by_the_judgement_reaches_the_route(
    provider: RecordingProvider,
) -> None:
    """A route reading its body after the final body was judged (a background read, here
    right after the check) gets the body the middleware asked the server for, in order."""
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"payload", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    sent = await _run(_instant_app(provider), "2.3", receive, "/read-after")
    assert sent[-1]["body"] == b'{"body":"payload"}'
    assert provider.charged_units("org:acme", "feature:a") == 1
