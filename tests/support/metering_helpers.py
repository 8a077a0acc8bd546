"""Test doubles for the middleware suites: a recording provider and raw ASGI drivers.

* :class:`RecordingProvider` is a :class:`~usage_middleware.Provider` with settable
  balances and real holds that records every reserve/prepare/commit/release, so tests can
  assert exactly what was charged and that every reservation was settled exactly once.
* :func:`http_scope`, :func:`drive` and :func:`run_lifespan` talk to an ASGI app at the
  message level (disconnects, streaming, exceptions after the response started).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from asgiref.typing import HTTPScope
from starlette.types import ASGIApp, Message

from usage_middleware import Answer, Provider, Reservation, UsageEvent
from usage_middleware.errors import RetryableProviderError


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One recorded provider call: ``op`` in reserve/prepare/commit/release/open/aclose."""

    op: str
    customer: str = ""
    feature: str = ""
    units: int = 0
    ok: bool = True


class RecordingProvider(Provider):
    """An in-memory provider that holds units and records every call.

    ``balances[(customer, feature)]`` is the units available (missing = denied, as an
    unknown customer). ``reserve`` holds units (``held``), ``commit`` moves them to
    ``charged``, ``release`` gives them back. Settling a reservation twice is recorded in
    ``errors``.

    Knobs: ``fail_reserve`` (raise from reserve), ``fail_prepare`` (raise from prepare),
    ``fail_commit``/``fail_release`` (raise after recording), ``failed_closed`` (answer
    ``ok=False`` with ``err`` set), ``limits[(customer, feature)]`` (reported ``limit``),
    ``reserve_delay`` (seconds slept inside reserve, to interleave requests).
    """

    name = "recording"

    def __init__(self, balances: dict[tuple[str, str], int] | None = None) -> None:
        super().__init__()
        self.balances: dict[tuple[str, str], int] = dict(balances or {})
        self.limits: dict[tuple[str, str], int] = {}
        self.held: dict[tuple[str, str], int] = {}
        self.charged: dict[tuple[str, str], int] = {}
        self.calls: list[Call] = []
        self.errors: list[str] = []
        self.scopes: list[HTTPScope | None] = []
        self.fail_reserve = False
        self.fail_prepare = False
        self.fail_commit = False
        self.fail_release = False
        self.failed_closed = False
        self.reserve_delay = 0.0

    # helpers for tests
    def set_balance(self, customer: str, feature: str, units: int) -> None:
        self.balances[(customer, feature)] = units

    def ops(self, *names: str) -> list[Call]:
        return [c for c in self.calls if not names or c.op in names]

    def charged_units(self, customer: str, feature: str) -> int:
        return self.charged.get((customer, feature), 0)

    def held_units(self) -> int:
        return sum(self.held.values())

    def assert_settled(self) -> None:
        """Every successful reservation settled exactly once, nothing held."""
        assert not self.errors, self.errors
        assert self.held_units() == 0, self.held
        reserved = sum(1 for c in self.calls if c.op == "reserve" and c.ok)
        settled = sum(1 for c in self.calls if c.op in ("commit", "release"))
        assert reserved == settled, (reserved, settled, self.calls)

    # Provider API
    async def open(self) -> None:
        await super().open()
        self.calls.append(Call("open"))

    async def aclose(self) -> None:
        await super().aclose()
        self.calls.append(Call("aclose"))

    async def can(self, customer: str, feature: str, units: int = 1) -> Answer:
        key = (customer, feature)
        if self.failed_closed:
            err = RetryableProviderError("backend down", retry_after=7)
            return Answer(False, customer, feature, units, err=err, retry_after=7)
        if key not in self.balances:
            return Answer(False, customer, feature, units, reason="unknown customer")
        available = self.balances[key] - self.held.get(key, 0) - self.charged.get(key, 0)
        limit = self.limits.get(key)
        used = self.charged.get(key, 0)
        return Answer(
            available >= units,
            customer,
            feature,
            units,
            limit=limit,
            used=used,
            remaining=max(0, available),
            provider=self,
        )

    async def report(self, events: Sequence[UsageEvent]) -> None:
        for event in events:
            key = (event.customer, event.feature)
            self.charged[key] = self.charged.get(key, 0) + event.units

    async def reserve(
        self, customer: str, feature: str, units: int = 1, *, scope: HTTPScope | None = None
    ) -> Reservation:
        self.scopes.append(scope)
        if self.reserve_delay:
            await asyncio.sleep(self.reserve_delay)
        if self.fail_reserve:
            self.calls.append(Call("reserve", customer, feature, units, ok=False))
            raise RuntimeError("reserve exploded")
        answer = await self.can(customer, feature, units)
        self.calls.append(Call("reserve", customer, feature, units, ok=answer.ok))
        if answer.ok:
            key = (customer, feature)
            self.held[key] = self.held.get(key, 0) + units
        return Reservation(answer=answer, event=UsageEvent(customer, feature, units), token=None)

    async def prepare(
        self, reservation: Reservation, *, units: int | None = None, overage: str = "cap"
    ) -> None:
        self.calls.append(
            Call("prepare", reservation.customer, reservation.feature, reservation.units)
        )
        if self.fail_prepare:
            raise RuntimeError("prepare exploded")

    def _settle(self, op: str, reservation: Reservation, actual: int | None = None) -> None:
        units = reservation.units if actual is None else actual
        self.calls.append(Call(op, reservation.customer, reservation.feature, units))
        if reservation.settled:
            self.errors.append(f"{op} of an already settled reservation {reservation!r}")
            return
        if not reservation.answer.ok:
            self.errors.append(f"{op} of a refused reservation {reservation!r}")
            return
        reservation.settled = True
        key = (reservation.customer, reservation.feature)
        self.held[key] -= reservation.units
        if not self.held[key]:
            del self.held[key]
        if op == "commit" and units:
            self.charged[key] = self.charged.get(key, 0) + units

    async def commit(
        self, reservation: Reservation, *, units: int | None = None, overage: str = "cap"
    ) -> int:
        self._settle("commit", reservation, units)
        if self.fail_commit:
            raise RuntimeError("commit exploded")
        return reservation.units if units is None else units

    async def release(self, reservation: Reservation) -> None:
        self._settle("release", reservation)
        if self.fail_release:
            raise RuntimeError("release exploded")


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    spec_version: str = "2.3",
) -> dict[str, Any]:
    """A minimal HTTP/1.1 ASGI scope for ``path`` (query string after ``?``)."""
    raw_path, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
        "state": {},
    }


@dataclasses.dataclass
class Exchange:
    """What an app sent for one request driven by :func:`drive`."""

    messages: list[Message]
    error: BaseException | None = None

    @property
    def status(self) -> int | None:
        for m in self.messages:
            if m["type"] == "http.response.start":
                return int(m["status"])
        return None

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )

    @property
    def complete(self) -> bool:
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False)
            for m in self.messages
        )


async def drive(
    app: ASGIApp,
    scope: dict[str, Any] | None = None,
    *,
    body: bytes = b"",
    disconnect_after_chunks: int | None = None,
    send_raises_after: int | None = None,
    on_message: Callable[[Message], None] | None = None,
) -> Exchange:
    """Run one request through ``app`` with raw ASGI messages; never raises.

    Args:
        scope: from :func:`http_scope` (default ``GET /``).
        body: the request body (one ``http.request`` message).
        disconnect_after_chunks: after this many ``http.response.body`` chunks were sent,
            ``receive`` answers ``http.disconnect`` (the client went away mid-response).
        send_raises_after: the send after this many messages raises ``OSError`` (an ASGI
            2.4 server telling the app the client is gone).
        on_message: called with every message the app sends.
    """
    scope = scope if scope is not None else http_scope()
    messages: list[Message] = []
    disconnected = asyncio.Event()
    request_sent = False

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if send_raises_after is not None and len(messages) >= send_raises_after:
            raise OSError("client went away")
        messages.append(message)
        if on_message is not None:
            on_message(message)
        chunks = sum(1 for m in messages if m["type"] == "http.response.body")
        if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
            disconnected.set()
            await asyncio.sleep(0)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            disconnected.set()

    try:
        await asyncio.wait_for(app(scope, receive, send), timeout=10)
    except Exception as exc:
        return Exchange(messages, exc)
    return Exchange(messages)


async def run_lifespan(app: ASGIApp, between: Callable[[], Any] | None = None) -> list[Message]:
    """Run startup then shutdown through ``app``; return the messages it sent."""
    sent: list[Message] = []
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"].startswith("lifespan.startup."):
            started.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(started.wait(), timeout=10)
    if between is not None:
        result = between()
        if asyncio.iscoroutine(result):
            await result
    if sent[-1]["type"] != "lifespan.startup.complete":
        task.cancel()  # the app may still think it started; stop it
        await asyncio.gather(task, return_exceptions=True)
        return sent
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, timeout=10)
    return sent
