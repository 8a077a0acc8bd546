"""UsageMiddleware over real HTTP: uvicorn on 127.0.0.1, started and stopped in each test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.metering_helpers import RecordingProvider
from tests.support.uvicorn_server import serve
from tests.support.waiting import eventually
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.middleware import UsageMiddleware
from usage_middleware.provider import Provider

pytestmark = pytest.mark.slow

ACME = {"X-Customer": "org:acme"}
by_header = customer_from_header("X-Customer")


async def _stream(n: int, pause: float) -> AsyncIterator[bytes]:
    for i in range(n):
        yield f"line {i}\n".encode()
        await asyncio.sleep(pause)


@metered("feature:a")
async def hello(request: Request) -> Response:
    return JSONResponse({"hello": "world"})


@metered("feature:b", units=2)
async def stream(request: Request) -> Response:
    n = int(request.query_params.get("n", "5"))
    pause = float(request.query_params.get("pause", "0"))
    return StreamingResponse(_stream(n, pause), media_type="text/plain")


def make_app(provider: Provider) -> Starlette:
    return Starlette(
        routes=[Route("/hello", hello), Route("/stream", stream)],
        middleware=[Middleware(UsageMiddleware, provider=provider, customer=by_header)],
    )


async def test_served_charged_refused_and_lifespan(provider: RecordingProvider) -> None:
    """Over real HTTP: a 200 is charged once, a 402 is refused, the provider opens and closes."""
    provider.set_balance("org:acme", "feature:a", 1)
    async with serve(make_app(provider)) as url, httpx.AsyncClient(base_url=url) as c:
        assert provider.state.value == "open"
        ok = await c.get("/hello", headers=ACME)
        refused = await c.get("/hello", headers=ACME)
        anonymous = await c.get("/hello")
    assert ok.status_code == 200 and ok.json() == {"hello": "world"}
    assert refused.status_code == 402
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["remaining"] == 0
    assert anonymous.status_code == 401
    assert provider.charged_units("org:acme", "feature:a") == 1
    assert provider.state.value == "closed"
    provider.assert_settled()


async def test_full_stream_is_charged_once(provider: RecordingProvider) -> None:
    """A streamed response read to its end is charged once."""
    async with serve(make_app(provider)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.get("/stream?n=20", headers=ACME)
        assert r.text.count("line") == 20
        await eventually(lambda: provider.ops("commit"))
    assert provider.charged_units("org:acme", "feature:b") == 2
    provider.assert_settled()


async def test_client_leaving_mid_stream_is_not_charged(provider: RecordingProvider) -> None:
    """A client that closes the connection mid-stream is not charged; the hold is released."""
    async with serve(make_app(provider)) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /stream?n=1000&pause=0.01 HTTP/1.1\r\nHost: x\r\nX-Customer: org:acme\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"line 1\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        await writer.wait_closed()
        await eventually(lambda: provider.ops("commit", "release"))
    assert [c.op for c in provider.ops("commit", "release")] == ["release"]
    assert provider.charged_units("org:acme", "feature:b") == 0
    provider.assert_settled()


PRICING = {
    "plans": {
        "plan:race@1": {
            "title": "Race",
            "interval": "@monthly",
            "features": {"feature:a": {"tiers": [{"upto": 50}]}},
        }
    }
}


async def test_local_ledger_100_concurrent_requests_for_the_last_10_units(
    tmp_path: Any,
) -> None:
    """On LocalLedger over real HTTP, 100 concurrent requests for the last 10 units: 10 served."""
    local = pytest.importorskip("usage_middleware.ledger.local")
    from usage_middleware import UsageEvent

    ledger = local.LocalLedger(tmp_path / "usage.db", pricing=PRICING)
    app = make_app(ledger)
    async with serve(app) as url:
        await ledger.subscribe("org:acme", "plan:race@1")
        await ledger.report([UsageEvent("org:acme", "feature:a", 40)])
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
            responses = await asyncio.gather(*(c.get("/hello", headers=ACME) for _ in range(100)))
            statuses = [r.status_code for r in responses]
            assert statuses.count(200) == 10, statuses
            assert statuses.count(402) == 90
            assert all(
                r.json()["feature"] == "feature:a" for r in responses if r.status_code == 402
            )
            after = await c.get("/hello", headers=ACME)
            assert after.status_code == 402
    # the server stopped and closed the ledger: read what it recorded from the file
    async with local.LocalLedger(tmp_path / "usage.db") as reopened:
        rows = {row.feature: row for row in await reopened.usage("org:acme")}
    assert rows["feature:a"].used == 50 and rows["feature:a"].remaining == 0
