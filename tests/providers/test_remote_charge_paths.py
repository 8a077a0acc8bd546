"""Every charge path of a remote provider through UsageMiddleware, with a real durable outbox.

The middleware tests pin these paths on a recording double; here the provider writes each
charge to the SQLite outbox before the final body (prepare) and must delete it again when
the response does not complete, so what reaches the provider is exactly the completed 2xx.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tests.support.contract_fake_remote import FakeRemote
from tests.support.metering_helpers import drive, http_scope
from usage_middleware import UsageMiddleware, metered
from usage_middleware.customers import customer_from_header

ORG = "org:acme"
FEATURE = "feature:x"
HEADERS = [("x-customer", ORG)]


def build(provider: FakeRemote) -> Any:
    @metered(FEATURE)
    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    @metered(FEATURE)
    async def fails(request: Request) -> JSONResponse:
        return JSONResponse({"error": "boom"}, status_code=500)

    @metered(FEATURE)
    async def raises(request: Request) -> JSONResponse:
        raise RuntimeError("before the response started")

    @metered(FEATURE)
    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield b"chunk %d\n" % i
                await asyncio.sleep(0)

        return StreamingResponse(chunks())

    @metered(FEATURE)
    async def broken_stream(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first\n"
            raise RuntimeError("after the response started")

        return StreamingResponse(chunks())

    @metered(FEATURE)
    def sync(request: Request) -> JSONResponse:
        return JSONResponse({"sync": True})

    @metered(FEATURE)
    async def slow(request: Request) -> JSONResponse:
        await asyncio.sleep(0.01)
        return JSONResponse({"ok": True})

    routes = [
        Route(f"/{f.__name__}", f) for f in (ok, fails, raises, stream, broken_stream, sync, slow)
    ]
    return UsageMiddleware(
        Starlette(routes=routes), provider=provider, customer=customer_from_header("x-customer")
    )


@pytest.fixture
async def provider(tmp_path: pathlib.Path) -> AsyncIterator[FakeRemote]:
    remote = FakeRemote(outbox=tmp_path / "outbox.db", cache_ttl=60.0)
    remote.balances[ORG, FEATURE] = 100
    await remote.open()
    try:
        yield remote
    finally:
        await remote.aclose()


async def delivered(provider: FakeRemote) -> int:
    """Units the provider received, after the outbox delivered what it will."""
    reporter = provider.reporter
    assert reporter is not None
    for _ in range(200):  # bounded: 2 s
        await reporter.flush()
        stats = reporter.stats()
        if stats.in_memory == 0 and stats.unwritten == 0 and stats.outbox_depth == 0:
            break
        await asyncio.sleep(0.01)
    return provider.charged(ORG, FEATURE)


@pytest.mark.parametrize(
    ("path", "kwargs", "charged"),
    [
        ("/ok", {}, 1),
        ("/sync", {}, 1),
        ("/stream", {}, 1),
        ("/fails", {}, 0),
        ("/raises", {}, 0),
        ("/broken_stream", {}, 0),
        ("/stream", {"disconnect_after_chunks": 1}, 0),
        # prepare wrote the charge, then sending the final body failed: it is cancelled
        ("/ok", {"send_raises_after": 1}, 0),
    ],
)
async def test_only_a_completed_2xx_reaches_the_provider(
    provider: FakeRemote, path: str, kwargs: dict[str, Any], charged: int
) -> None:
    """Success (async, sync, streamed) is delivered once; errors before or after the
    response started, a disconnect mid-stream and a failed final send deliver nothing."""
    app = build(provider)
    await drive(app, http_scope(path, headers=HEADERS), **kwargs)
    assert await delivered(provider) == charged
    reporter = provider.reporter
    assert reporter is not None
    status = await reporter.outbox_status()
    # Nothing left behind either: a prepared-then-failed charge was deleted, not merely
    # held back (a held row would be delivered after a restart).
    assert (status.depth, status.held, status.dead_letters) == (0, 0, 0)


async def test_two_concurrent_requests_for_the_last_unit(provider: FakeRemote) -> None:
    """With one unit left, two concurrent requests: exactly one is served and charged."""
    provider.balances[ORG, FEATURE] = 1
    app = build(provider)
    first, second = await asyncio.gather(
        drive(app, http_scope("/slow", headers=HEADERS)),
        drive(app, http_scope("/slow", headers=HEADERS)),
    )
    assert sorted([first.status, second.status]) == [200, 402]
    assert await delivered(provider) == 1


async def test_provider_down_fails_open_and_the_charge_is_still_delivered(
    provider: FakeRemote,
) -> None:
    """The check fails (provider down): served by the default open policy, and the charge
    waits in the outbox and is delivered when the provider's report works."""
    provider.fail = ConnectionError("provider down")
    provider._cache.clear()
    app = build(provider)
    exchange = await drive(app, http_scope("/ok", headers=HEADERS))
    assert exchange.status == 200
    assert await delivered(provider) == 1
