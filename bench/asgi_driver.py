"""The in-process ASGI driver the benchmarks share: requests without sockets.

``Driver(app).one()`` calls ``app(scope, receive, send)`` for one ``GET /item`` with an
``x-customer`` header and yields to the event loop once afterwards, as a server's loop
does between requests, so background work (group commits, lease refills, delivery) runs
inside the measurement rather than after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


def http_scope(customer: str, path: str = "/item", spec_version: str = "2.4") -> Scope:
    """A fresh HTTP scope for ``GET path`` as ``customer`` (the ``x-customer`` header).

    ``spec_version``: the ASGI spec the "server" claims; under "2.3" (uvicorn's) the
    middleware watches ``receive`` for a disconnect, under "2.4" the final ``send`` tells.
    """
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"bench"),
            (b"accept", b"application/json"),
            (b"x-customer", customer.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


class Driver:
    """Calls an ASGI app directly; counts statuses; optionally records latencies (s)."""

    def __init__(self, app: Any, customer: str = "org:bench", spec_version: str = "2.4") -> None:
        self.app = app
        self.customer = customer
        self.spec_version = spec_version
        self.statuses: dict[int, int] = {}
        self.latencies: list[float] = []

    @property
    def ok(self) -> int:
        """Requests answered 200."""
        return self.statuses.get(200, 0)

    @property
    def other(self) -> dict[int, int]:
        """Requests answered with any other status, by status."""
        return {status: n for status, n in self.statuses.items() if status != 200}

    async def one(self, customer: str | None = None, timed: bool = False) -> int:
        """One request; returns its status."""
        status = 0
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # never: the route does not read twice
            raise AssertionError

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        start = time.perf_counter() if timed else 0.0
        scope = http_scope(customer or self.customer, spec_version=self.spec_version)
        await self.app(scope, receive, send)
        await asyncio.sleep(0)  # one event-loop iteration per request, as under a server
        if timed:
            self.latencies.append(time.perf_counter() - start)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        return status

    async def run_for(
        self, seconds: float, concurrency: int = 1, batch: int = 100
    ) -> tuple[float, float]:
        """Requests per wall-clock second and per CPU second (this process) over ``seconds``."""
        done = 0
        start = time.perf_counter()
        cpu = time.process_time()
        deadline = start + seconds
        while True:
            if concurrency == 1:
                for _ in range(batch):
                    await self.one()
            else:
                await asyncio.gather(*(self._worker(batch) for _ in range(concurrency)))
            done += batch * concurrency
            now = time.perf_counter()
            if now >= deadline:
                return done / (now - start), done / max(1e-9, time.process_time() - cpu)

    async def _worker(self, n: int) -> None:
        for _ in range(n):
            await self.one()
