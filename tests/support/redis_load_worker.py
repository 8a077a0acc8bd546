"""A load process for ``tests/ledgers/test_ledger_redis.py``: one metered app, N requests.

Run as ``python tests/support/redis_load_worker.py URL PREFIX SPOOL N``. It builds a Starlette app
(``UsageMiddleware`` + ``@metered("feature:load")`` over a :class:`RedisLedger` on ``URL``
under ``PREFIX``), opens the ledger, prints ``ready``, waits for ``go`` on stdin, sends
``N`` concurrent requests as customer ``org:load`` through an in-process ASGI transport,
closes the ledger and prints one JSON line: ``{"status": count, ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.ledger.redis import RedisLedger
from usage_middleware.middleware import UsageMiddleware

FEATURE = "feature:load"
CUSTOMER = "org:load"


async def main(url: str, prefix: str, spool: str, n: int) -> None:
    # A generous timeout: this counts what is served and charged, and a call that waits
    # more than the default 1 s for a pooled connection (a loaded CI machine) would trip
    # the breaker and answer 503s instead.
    ledger = RedisLedger(url, prefix=prefix, spool=spool, timeout=10.0)

    @metered(FEATURE)
    async def work(request: Request) -> JSONResponse:
        await asyncio.sleep(0)  # let the other requests interleave
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/work", work)],
        middleware=[
            Middleware(UsageMiddleware, provider=ledger, customer=customer_from_header("x-c"))
        ],
    )
    await ledger.open()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected 'go'")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://load") as client:
        responses = await asyncio.gather(
            *(client.get("/work", headers={"x-c": CUSTOMER}) for _ in range(n))
        )
    await ledger.aclose()
    print(json.dumps(Counter(str(r.status_code) for r in responses)), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
