"""Token-billed streams over real uvicorn with real httpx clients, on LocalLedger: settled
to the tokens streamed, a hang-up half-way, and 100 concurrent streams against a budget."""

from __future__ import annotations

import asyncio
import pathlib
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.support.uvicorn_server import serve
from tests.support.waiting import eventually
from usage_middleware import LocalLedger, UsageMiddleware, metered, usage_of
from usage_middleware.customers import customer_from_header

pytestmark = pytest.mark.slow

FEATURE = "feature:tokens"
ESTIMATE = 40
by_header = customer_from_header("x-customer")


def tokens_route(*, overage: str = "cap", charge_partial: bool = False, pause: float) -> Any:
    """A stand-in chat route: reserves ESTIMATE, streams ?n= tokens, adding one per token."""

    @metered(FEATURE, units=ESTIMATE, overage=overage, charge_partial=charge_partial)  # type: ignore[arg-type]
    async def chat(request: Request) -> Response:
        n = int(request.query_params["n"])
        usage = usage_of(request)

        async def events() -> AsyncIterator[bytes]:
            for i in range(n):
                await asyncio.sleep(pause)
                usage.add(1)
                yield f"data: token {i}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return chat


def make_app(ledger: LocalLedger, pause: float) -> Starlette:
    return Starlette(
        routes=[
            Route("/cap", tokens_route(pause=pause), methods=["GET"]),
            Route("/charge", tokens_route(overage="charge", pause=pause), methods=["GET"]),
            Route("/partial", tokens_route(charge_partial=True, pause=pause), methods=["GET"]),
        ],
        middleware=[Middleware(UsageMiddleware, provider=ledger, customer=by_header)],
    )


async def used(path: pathlib.Path, customer: str) -> int:
    async with LocalLedger(path) as reader:
        rows = await reader.usage(customer)
    return next((row.used for row in rows if row.feature == FEATURE), 0)


async def test_streams_are_charged_the_tokens_streamed_and_a_hang_up_only_with_charge_partial(
    tmp_path: pathlib.Path,
) -> None:
    """A full stream of 25 tokens (estimate 40) is charged 25; a client hanging up after 5
    tokens is not charged by default, and with charge_partial is charged the tokens the
    server generated until then (at least the 5 read, fewer than 60)."""
    path = tmp_path / "usage.db"
    ledger = LocalLedger(path, flush_interval=0)
    async with serve(make_app(ledger, pause=0.02)) as url:
        for customer in ("org:full", "org:cut", "org:partial"):
            await ledger.grant(customer, FEATURE, 1000)
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            full = await c.get("/cap?n=25", headers={"x-customer": "org:full"})
            assert full.status_code == 200 and full.text.count("token") == 25
            for route, customer in (("/cap", "org:cut"), ("/partial", "org:partial")):
                async with c.stream("GET", f"{route}?n=60", headers={"x-customer": customer}) as r:
                    assert r.status_code == 200
                    read = 0
                    async for line in r.aiter_lines():
                        read += line.startswith("data: token")
                        if read == 5:
                            break  # hang up half-way

        async def settled() -> bool:
            await ledger.flush()
            rows = await ledger.usage("org:partial")
            return any(row.used for row in rows)

        await eventually(settled)
    assert await used(path, "org:full") == 25
    assert await used(path, "org:cut") == 0
    assert 5 <= await used(path, "org:partial") < 60


@pytest.mark.parametrize("overage", ["cap", "charge"])
async def test_100_concurrent_streams_never_charge_beyond_the_budget_and_the_policy(
    tmp_path: pathlib.Path, overage: str
) -> None:
    """100 concurrent streams (estimate 40, actual 5-70 tokens) against 2000 tokens: each
    is refused with 402 before streaming or completes; "charge" charges exactly the sum of
    the completed streams' tokens, at most the budget plus their excess over the estimate;
    "cap" never charges more than the budget nor a stream more than it streamed."""
    path = tmp_path / "usage.db"
    ledger = LocalLedger(path, lease_size=10)
    budget = 2000
    rng = random.Random(15)
    sizes = [rng.randint(5, 70) for _ in range(100)]
    async with serve(make_app(ledger, pause=0.002)) as url:
        await ledger.grant("org:budget", FEATURE, budget)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:

            async def one(n: int) -> tuple[int, int]:
                r = await c.get(f"/{overage}?n={n}", headers={"x-customer": "org:budget"})
                return r.status_code, r.text.count("data: token")

            results = await asyncio.gather(*(one(n) for n in sizes))
    charged = await used(path, "org:budget")
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 402}, statuses
    completed = [(n, got) for n, (status, got) in zip(sizes, results, strict=True) if status == 200]
    assert all(got == n for n, got in completed)
    assert statuses.count(200) >= budget // 70  # served while the budget lasted
    assert statuses.count(402) > 0  # 100 x 40 > 2000: the rest refused before the model ran
    actual = sum(n for n, _ in completed)
    excess = sum(max(0, n - ESTIMATE) for n, _ in completed)
    if overage == "charge":
        assert charged == actual
        assert charged <= budget + excess
    else:
        assert charged <= budget
        assert charged <= actual
        assert charged >= sum(min(n, ESTIMATE) for n, _ in completed)
