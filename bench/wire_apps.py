"""The apps of the wire benchmark (``bench/bench_wire.py``), one module so uvicorn can import
them by string in a subprocess::

    WIRE_APP=local WIRE_DIR=/tmp/x python -m uvicorn wire_apps:create --factory --app-dir bench

``WIRE_APP`` picks the app; every one serves the same ``GET /item`` (a small JSON body) and
reads the ``x-customer`` header only where it meters:

* ``bare``: a Starlette app, nothing else (the baseline);
* ``passthrough``: the same behind a pure ASGI middleware that forwards everything (the
  floor of any middleware);
* ``null``: ``UsageMiddleware`` + ``@metered`` on a provider that allows everything and
  records nothing (the middleware's and decorator's own cost);
* ``local``: ``UsageMiddleware`` + ``@metered`` on a ``LocalLedger`` in ``WIRE_DIR``;
* ``slowapi``: slowapi's ``@limiter.limit`` (memory storage, a limit never reached);
* ``redis``: ``UsageMiddleware`` + ``@metered`` on a ``RedisLedger`` at ``WIRE_REDIS_URL``;
* ``tier``: ``UsageMiddleware`` + ``@metered`` on a ``TierProvider`` with its durable
  outbox in ``WIRE_DIR``, against the Tier fake at ``WIRE_TIER_URL``;
* ``tierfake``: that fake: ``tests/support/tier_fake.py``'s ``FakeTier`` served over a real socket.

Every limit is far out of reach, so a metered app charges one unit per 2xx response. The
metered apps also answer ``GET /_bench/charged`` (not metered) with the units charged so
far, read through the provider's public API (``Ledger.usage``); the fake answers
``GET /_bench/stats`` with the units reported to it and its call counts. The benchmark
reads them between rounds, never while it measures.

Only the package's public API is used: ``UsageMiddleware``, ``metered``, ``LocalLedger``,
``RedisLedger``, ``TierProvider``, ``customers.customer_from_header``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CUSTOMER = "org:bench"
FEATURE = "feature:bench"
PLAN = "plan:bench@1"
LIMIT = 10**12  # far out of reach: nothing is ever refused
PRICING = {
    "plans": {PLAN: {"interval": "@monthly", "features": {FEATURE: {"tiers": [{"upto": LIMIT}]}}}}
}
APPS = ("bare", "passthrough", "null", "local", "slowapi", "redis", "tier")


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": 1, "name": "widget"})


class PassThrough:
    """A pure ASGI middleware that forwards every call unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def bare() -> Starlette:
    return Starlette(routes=[Route("/item", item)])


def passthrough() -> Starlette:
    return Starlette(routes=[Route("/item", item)], middleware=[Middleware(PassThrough)])


def slowapi() -> Starlette:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address

    limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")

    @limiter.limit("100000000/minute")
    async def limited(request: Request) -> JSONResponse:
        return JSONResponse({"id": 1, "name": "widget"})

    app = Starlette(routes=[Route("/item", limited)])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


def metered_app(provider: Any, *, subscribe: bool) -> Starlette:
    """``GET /item`` metered on ``provider``, plus the unmetered ``GET /_bench/charged``."""
    from usage_middleware import UsageMiddleware, metered
    from usage_middleware.customers import customer_from_header

    @metered(FEATURE)
    async def metered_item(request: Request) -> JSONResponse:
        return JSONResponse({"id": 1, "name": "widget"})

    async def charged(request: Request) -> JSONResponse:
        rows = await provider.usage(CUSTOMER)
        return JSONResponse({"charged": sum(r.used for r in rows if r.feature == FEATURE)})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # UsageMiddleware opened the provider before this runs (lifespan start-up).
        if subscribe:
            await provider.subscribe(CUSTOMER, PLAN)
        yield

    routes = [Route("/item", metered_item)]
    if subscribe:
        routes.append(Route("/_bench/charged", charged))
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(
                UsageMiddleware, provider=provider, customer=customer_from_header("x-customer")
            )
        ],
        lifespan=lifespan,
    )


def null() -> Starlette:
    """``GET /item`` metered on a provider that allows everything and records nothing."""
    from usage_middleware import Answer, Provider, Reservation, UsageEvent

    class NullProvider(Provider):
        name = "null"

        def __init__(self) -> None:
            super().__init__()
            self._answer = Answer(True, CUSTOMER, FEATURE, 1)
            self._event = UsageEvent(CUSTOMER, FEATURE, 1)

        async def reserve(
            self, customer: str, feature: str, units: int = 1, **kwargs: Any
        ) -> Reservation:
            return Reservation(answer=self._answer, event=self._event)

        async def commit(
            self, reservation: Reservation, *, units: int | None = None, overage: str = "cap"
        ) -> int:
            reservation.settled = True
            return reservation.units if units is None else units

        async def release(self, reservation: Reservation) -> None:
            reservation.settled = True

    return metered_app(NullProvider(), subscribe=False)


def local(directory: Path) -> Starlette:
    from usage_middleware import LocalLedger

    return metered_app(LocalLedger(directory / "ledger.db", pricing=PRICING), subscribe=True)


def redis(directory: Path) -> Starlette:
    from usage_middleware import RedisLedger

    ledger = RedisLedger(
        os.environ["WIRE_REDIS_URL"],
        pricing=PRICING,
        prefix=os.environ.get("WIRE_REDIS_PREFIX", "wire:"),
        spool=directory / "redis-spool.db",
    )
    return metered_app(ledger, subscribe=True)


def tier(directory: Path) -> Starlette:
    from usage_middleware import TierProvider

    provider = TierProvider(base_url=os.environ["WIRE_TIER_URL"], outbox=directory / "outbox.db")
    # Tier's numbers are read from the fake (/_bench/stats), not through the provider.
    return metered_app(provider, subscribe=False)


def tierfake() -> ASGIApp:
    """``FakeTier`` (tests/support/tier_fake.py, an ``httpx.MockTransport`` handler) behind ASGI."""
    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.support.tier_fake import FakeTier

    fake = FakeTier()
    fake.add_org(CUSTOMER, {FEATURE: LIMIT})
    calls: dict[str, int] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path == "/_bench/stats":
            response = httpx.Response(
                200, json={"used": fake.used(CUSTOMER, FEATURE), "calls": calls}
            )
        else:
            query = scope["query_string"].decode("latin-1")
            request = httpx.Request(
                scope["method"],
                f"http://tier.test{path}" + (f"?{query}" if query else ""),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                content=body,
            )
            response = fake.handle(request)
            calls[path] = calls.get(path, 0) + 1
            # The fake records every request for tests to inspect; here only counts matter,
            # and a long run must not grow its memory by a record per request.
            fake.requests.clear()
            fake.reports.clear()
        content = response.content
        headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding")
        ]
        headers.append((b"content-length", str(len(content)).encode()))
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": content})

    return app


def create() -> ASGIApp:
    """The app named by ``WIRE_APP`` (see the module docstring)."""
    name = os.environ.get("WIRE_APP", "")
    directory = Path(os.environ.get("WIRE_DIR", "."))
    if name == "bare":
        return bare()
    if name == "passthrough":
        return passthrough()
    if name == "slowapi":
        return slowapi()
    if name == "null":
        return null()
    if name == "local":
        return local(directory)
    if name == "redis":
        return redis(directory)
    if name == "tier":
        return tier(directory)
    if name == "tierfake":
        return tierfake()
    raise SystemExit(f"WIRE_APP must be one of {', '.join((*APPS, 'tierfake'))}; got {name!r}")
