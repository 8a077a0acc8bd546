"""A scripted fake remote provider for the reporter's tests and bench.

``FakeProvider.report`` behaves like a deduplicating remote API (Spaire's ``external_id``
semantics: a repeated idempotency key is accepted and not charged again) and follows a
failure script, one step per call::

    provider = FakeProvider(max_batch=10, script=[fail(2), "ok", hang(), too_many(0.2)])

Steps: ``"ok"``; ``fail(n)`` (n calls answered 503, retryable); ``hang()`` (the call never
answers: the reporter's ``call_timeout`` must end it); ``too_many(seconds)`` (429 with
``retry_after``); ``reject()`` (422 for the whole batch). Besides the script:
``bad_keys`` are rejected permanently, and the whole batch with them (as Spaire does);
``down = True`` answers every call 503 until set back to False; ``latency`` delays each
call. Everything delivered is recorded: ``delivered`` (key -> event, first delivery),
``deliveries`` (key -> how many times it arrived), ``calls`` (keys per call, in order,
failed calls included) and ``call_times`` (monotonic seconds per call).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from asgiref.typing import HTTPScope

from usage_middleware import (
    Answer,
    PermanentProviderError,
    Provider,
    Reservation,
    RetryableProviderError,
    UsageEvent,
)
from usage_middleware.delivery import Reporter


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted answer: ``kind`` in ok, fail, hang, 429, reject."""

    kind: str
    retry_after: float | None = None


def fail(n: int = 1) -> list[Step]:
    """``n`` calls answered 503 (retryable)."""
    return [Step("fail")] * n


def hang() -> Step:
    """A call that never answers."""
    return Step("hang")


def too_many(retry_after: float) -> Step:
    """A 429 with ``Retry-After: retry_after`` seconds."""
    return Step("429", retry_after)


def reject() -> Step:
    """A 422 for the whole batch."""
    return Step("reject")


class FakeProvider(Provider):
    """A deduplicating remote provider with a failure script (see the module docstring)."""

    name = "fake"

    def __init__(
        self,
        *,
        max_batch: int = 100,
        script: Iterable[Step | str | list[Step]] = (),
        bad_keys: Iterable[str] = (),
        latency: float = 0.0,
    ) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.script: collections.deque[Step] = collections.deque()
        for step in script:
            if isinstance(step, list):
                self.script.extend(step)
            else:
                self.script.append(Step(step) if isinstance(step, str) else step)
        self.bad_keys = set(bad_keys)
        self.latency = latency
        self.down = False
        self.delivered: dict[str, UsageEvent] = {}
        self.deliveries: collections.Counter[str] = collections.Counter()
        self.calls: list[list[str]] = []
        self.call_times: list[float] = []
        self.oversized: list[int] = []  # sizes of calls above max_batch (must stay empty)
        self.arrived = asyncio.Event()  # set after every successful call

    async def can(self, customer: str, feature: str, units: int = 1) -> Answer:
        return Answer(ok=True, customer=customer, feature=feature, units=units, provider=self)

    async def report(self, events: Sequence[UsageEvent]) -> None:
        keys = [e.idempotency_key for e in events]
        self.calls.append(keys)
        self.call_times.append(time.monotonic())
        if len(events) > self.max_batch:
            self.oversized.append(len(events))
        if self.latency:
            await asyncio.sleep(self.latency)
        step = self.script.popleft() if self.script else Step("ok")
        if self.down or step.kind == "fail":
            raise RetryableProviderError("service unavailable", status=503)
        if step.kind == "hang":
            await asyncio.sleep(3600)
        if step.kind == "429":
            raise RetryableProviderError(
                "too many requests", status=429, retry_after=step.retry_after
            )
        bad = [k for k in keys if k in self.bad_keys]
        if step.kind == "reject" or bad:
            raise PermanentProviderError(
                f"event {bad[0] if bad else keys[0]} is invalid",
                status=422,
                code="validation_error",
            )
        for e in events:
            self.deliveries[e.idempotency_key] += 1
            self.delivered.setdefault(e.idempotency_key, e)
        self.arrived.set()

    async def wait_delivered(self, keys: Iterable[str], within: float = 10.0) -> None:
        """Wait until every key in ``keys`` was delivered (at most ``within`` seconds)."""
        wanted = set(keys)
        async with asyncio.timeout(within):
            while not wanted <= self.delivered.keys():
                self.arrived.clear()
                await self.arrived.wait()


class OutboxedProvider(Provider):
    """Allows every request; charges go through a :class:`Reporter` into ``sink``.

    The reservation cycle as a remote provider runs it: ``prepare`` makes the charge
    durable in the outbox, ``commit`` confirms it, ``release`` cancels it. With
    ``key_header`` the event's idempotency key is that request header (so a test knows
    which key each request charged). ``reporter_kw`` go to the Reporter.
    """

    name = "outboxed"

    def __init__(self, sink: Provider, *, key_header: bytes | None = None, **reporter_kw: Any):
        super().__init__()
        self.reporter = Reporter(sink, **reporter_kw)
        self.key_header = key_header

    async def open(self) -> None:
        await self.reporter.open()
        await super().open()

    async def aclose(self) -> None:
        await self.reporter.aclose()
        await super().aclose()

    async def can(self, customer: str, feature: str, units: int = 1) -> Answer:
        return Answer(ok=True, customer=customer, feature=feature, units=units, provider=self)

    async def reserve(
        self, customer: str, feature: str, units: int = 1, *, scope: HTTPScope | None = None
    ) -> Reservation:
        answer = Answer(ok=True, customer=customer, feature=feature, units=units, provider=self)
        if self.key_header is not None and scope is not None:
            key = dict(scope["headers"])[self.key_header].decode()
            return Reservation(answer, UsageEvent(customer, feature, units, idempotency_key=key))
        return Reservation(answer, UsageEvent(customer, feature, units))

    async def prepare(
        self, reservation: Reservation, *, units: int | None = None, overage: str = "cap"
    ) -> None:
        await self.reporter.prepare(reservation.event)

    async def commit(
        self, reservation: Reservation, *, units: int | None = None, overage: str = "cap"
    ) -> int:
        assert units is None or units == reservation.units, "fixed units only"
        reservation.settled = True
        self.reporter.confirm(reservation.event)
        return reservation.units

    async def release(self, reservation: Reservation) -> None:
        reservation.settled = True
        await self.reporter.cancel(reservation.event)


def events(n: int, *, customer: str = "org:acme", feature: str = "feature:x") -> list[UsageEvent]:
    """``n`` fresh events of one unit each."""
    return [UsageEvent(customer, feature, 1) for _ in range(n)]
