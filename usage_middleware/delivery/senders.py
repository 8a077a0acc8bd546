"""The Reporter's senders: batches to the sink, retries with backoff, dead letters.

A sender takes a batch (full, or its oldest event ``max_delay`` old), claiming rows from
the outbox when memory has room, and calls the sink's ``report``. A retryable failure is
retried in process (``stamina``), then the batch goes back to the outbox for a cool-down.
A permanent rejection bisects the batch until the bad event is alone and dead-letters it;
an ambiguous failure is resent at most once; an event kept undelivered longer than
``max_retry_age`` is dead-lettered. See docs/architecture.md, "Storage and delivery".
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Hashable
from typing import Final, cast

import stamina

from .. import telemetry
from ..errors import PermanentProviderError, ProviderError, RetryableProviderError
from ..models import UsageEvent
from ._state import AMBIGUOUS, NO_KEY, READY, Entry, Shared, log
from .aggregate import AggregatingSink

#: Ready events an aggregating sink's sender looks through for members of its batch.
_SCAN: Final = 1000

__all__ = ["Senders"]


class Senders(Shared):
    """The sender tasks (:meth:`_sender`) and how a failed batch is handled."""

    async def _sender(self) -> None:
        while True:
            try:
                batch = await self._next_batch()
            except Exception:  # a bug here must not cost a sender for the process's life
                log.exception("outbox sender failed; continuing")
                await asyncio.sleep(self._poll_interval)
                continue
            if batch is None:
                # Closing: the others may be waiting on a state this sender just changed
                # (a claim that found nothing): let them look again, so aclose() does not
                # sit out drain_timeout with nothing left to send.
                self._sender_wake.set()
                return
            self._inflight += len(batch)
            try:
                await self._deliver(batch)
            finally:
                self._inflight -= len(batch)
                if self._closing:
                    self._sender_wake.set()

    async def _next_batch(self) -> list[Entry] | None:
        """Wait for the next batch: full, or its oldest event ``max_delay`` old."""
        ready = self._ready
        while True:
            await self._pause()
            n = len(ready)
            now = time.monotonic()
            if n >= self._full_at or (n and (self._closing or now >= ready[0].t + self._window)):
                if self._aggregates:
                    return self._take_aggregates()
                return [ready.popleft() for _ in range(min(n, self.max_batch))]
            if n < self.max_batch and self._db_dirty and not self._claiming and self._room() > 0:
                await self._claim()
                continue  # the queue changed while we were away: look again
            if n:
                timeout: float | None = ready[0].t + self._window - now
            elif self._closing:
                if not (
                    self._pending
                    or self._writing
                    or self._held
                    or self._inflight
                    or self._db_dirty
                    or self._claiming
                ):
                    return None
                timeout = None
            else:
                timeout = None
            self._sender_wake.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._sender_wake.wait()
            except TimeoutError:
                pass

    def _group_of(self, entry: Entry) -> Hashable:
        """The aggregate an entry may join: its sink's key and whether it is ambiguous (an
        aggregate is resent whole: never mixed), or the entry alone (key ``None``)."""
        key = entry.akey
        if key is NO_KEY:
            sink = cast(AggregatingSink, self.provider)
            key = entry.akey = sink.aggregate_key(entry.event)
        if key is None:
            return entry
        return (key, entry.ambiguous)

    def _take_aggregates(self) -> list[Entry]:
        """Take the next batch for an aggregating sink: the ready events of at most
        ``max_batch`` aggregates (the oldest event's first), ``max_members`` each, looking
        at the oldest ``_SCAN`` ready events; the rest keep their places."""
        ready = self._ready
        groups: dict[Hashable, list[Entry]] = {}
        rest: list[Entry] = []
        for _ in range(min(len(ready), max(_SCAN, self._max_members))):
            e = ready.popleft()
            k = self._group_of(e)
            g = groups.get(k)
            if g is None:
                if len(groups) >= self.max_batch:
                    rest.append(e)
                    continue
                g = groups[k] = []
            if len(g) >= self._max_members:
                rest.append(e)
                continue
            g.append(e)
        ready.extendleft(reversed(rest))
        return [e for g in groups.values() for e in g]

    def _events(self, batch: list[Entry]) -> list[UsageEvent]:
        """What one ``report`` call sends for ``batch``: its events, or for an aggregating
        sink one merged event per aggregate in it (at most ``max_batch``)."""
        if not self._aggregates:
            return [e.event for e in batch]
        groups: dict[Hashable, list[UsageEvent]] = {}
        for e in batch:
            groups.setdefault(self._group_of(e), []).append(e.event)
        merge = cast(AggregatingSink, self.provider).merge
        events = [merge(g) for g in groups.values()]
        if len(events) < len(batch):
            log.debug(
                "%s: %d charges sent as %s",
                self.provider.name,
                len(batch),
                ", ".join(f"{ev.idempotency_key} ({ev.units} units)" for ev in events),
            )
        return events

    async def _claim(self) -> int:
        """Move free, due rows from the outbox into memory; return how many."""
        assert self._outbox is not None
        limit = min(self._room(), self._claim_size)
        gen = self._dirty_gen
        self._claiming = True
        try:
            rows = await self._sqlite.submit(
                self._outbox.claim, self._owner, limit, max_wait=self._max_wait
            )
        except Exception:
            log.exception("cannot claim rows from the outbox %s", self.path)
            self._db_dirty = False  # the housekeeper asks again after poll_interval
            return 0
        finally:
            self._claiming = False
        if len(rows) < limit and gen == self._dirty_gen:
            self._db_dirty = False
        self._retried += sum(1 for r in rows if r.attempts)  # back after failed rounds
        if rows:
            for r in rows:
                entry = Entry(r.event, READY, 0.0, r.rowid, r.created or None)
                entry.ambiguous = bool(r.last_error and r.last_error.startswith(AMBIGUOUS))
                self._ready.append(entry)
            self._sender_wake.set()
        return len(rows)

    async def _pause(self) -> None:
        """Sleep out a pause (a Retry-After, or a cool-down after failed retries)."""
        wait = self._paused_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _pause_all(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def _retry_on(self, exc: Exception) -> bool | float:
        """stamina's hook: retry retryable errors, waiting ``retry_after`` (capped) when
        given; never an ambiguous failure (the outbox backs it off and resends it once)."""
        if self._is_ambiguous(exc):
            return False
        if isinstance(exc, RetryableProviderError):
            after = self._cap(exc.retry_after)
            if after is not None and after > 0:
                self._pause_all(after)  # a 429/503 speaks for the whole provider
                return after if after <= self._retry_timeout else False
            return True
        return isinstance(exc, TimeoutError)

    def _is_ambiguous(self, exc: BaseException) -> bool:
        """Whether the failed call may have been counted by a provider that cannot dedupe."""
        if isinstance(exc, ProviderError):
            return exc.ambiguous
        return isinstance(exc, TimeoutError) and not self._deduplicates

    def _cap(self, after: object) -> float | None:
        """A provider's Retry-After as seconds within ``[0, max_retry_after]``, or None."""
        if isinstance(after, bool) or not isinstance(after, int | float):
            return None
        if math.isnan(after) or after < 0:
            return None
        return min(float(after), self._max_retry_after)

    async def _send(self, events: list[UsageEvent]) -> None:
        """One batch, retried in process (stamina) on retryable errors."""
        async for attempt in stamina.retry_context(on=self._retry_on, **self._retry_kw):
            with attempt:
                if attempt.num > 1:
                    self._retried += len(events)
                await self._pause()
                with telemetry.delivery_attempt(self.provider.name):
                    async with asyncio.timeout(self._call_timeout):
                        await self.provider.report(events)

    async def _deliver(self, batch: list[Entry]) -> None:
        events = self._events(batch)
        try:
            await self._send(events)
        except PermanentProviderError as exc:
            # One bad event rejects a whole batch (or aggregate: its halves are summed
            # anew): find it; the others are delivered.
            if len(batch) > 1:
                mid = len(batch) // 2
                await self._deliver(batch[:mid])
                await self._deliver(batch[mid:])
            else:
                self._dead_letter(batch[0], exc.status, exc.code, exc.message)
            return
        except Exception as exc:  # retries exhausted, or a provider bug: keep, try later
            if self._is_ambiguous(exc):
                again = [e for e in batch if e.ambiguous]
                for e in again:  # sent twice, each time perhaps counted: a human decides
                    self._dead_letter(
                        e,
                        None,
                        "ambiguous",
                        "sent twice, and both times the provider may have counted it"
                        f" without answering ({str(exc)[:300]}); check the provider's usage,"
                        " then replay with `outbox retry` or purge it",
                    )
                batch = [e for e in batch if not e.ambiguous]
                for e in batch:
                    e.ambiguous = True
                if not batch:
                    return
            self._release(batch, exc)
            return
        self._sent += len(batch)
        self._deletes.extend(e.rowid for e in batch if e.rowid is not None)
        self._delete_soon()

    def _dead_letter(
        self, entry: Entry, status: int | None, code: str | None, message: str
    ) -> None:
        ev = entry.event
        self._dead_lettered += 1
        telemetry.dead_lettered(self.provider.name)
        log.warning(
            "%s: event %s (%s, %s, %d units) moved to dead letters: status=%s code=%s %s",
            self.provider.name,
            ev.idempotency_key,
            ev.customer,
            ev.feature,
            ev.units,
            status,
            code,
            message,
        )
        assert entry.rowid is not None
        self._dead.append((entry.rowid, status, code, message))
        self._writer_wake.set()

    def _release(self, batch: list[Entry], exc: Exception) -> None:
        batch = self._past_retry_age(batch, exc)
        if not batch:
            return
        after = self._cap(getattr(exc, "retry_after", None))
        cooldown = max(self._retry_cooldown, after or 0.0)
        cooldown *= 1 + random.random() / 2  # jitter: workers do not return in step
        self._pause_all(cooldown)
        if isinstance(exc, RetryableProviderError | TimeoutError):
            log.warning(
                "%s unavailable (%s); %d events back to the outbox for %.1fs",
                self.provider.name,
                str(exc) or type(exc).__name__,
                len(batch),
                cooldown,
            )
        else:
            log.error(
                "%s.report raised %r; %d events back to the outbox for %.1fs",
                self.provider.name,
                exc,
                len(batch),
                cooldown,
                exc_info=exc,
            )
        if self._aggregates:
            sent = self._events(batch)
            if len(sent) < len(batch):  # so a resend of the same aggregate can be told
                log.warning(
                    "%s: aggregates back to the outbox: %s",
                    self.provider.name,
                    ", ".join(f"{ev.idempotency_key} ({ev.units} units)" for ev in sent),
                )
        not_before = time.time() + cooldown
        error = f"{type(exc).__name__}: {exc}"[:480]
        marked = AMBIGUOUS + error  # sticky: a later failure of another kind keeps it
        self._releases.extend(
            (e.rowid, not_before, marked if e.ambiguous else error)
            for e in batch
            if e.rowid is not None
        )
        self._writer_wake.set()

    def _past_retry_age(self, batch: list[Entry], exc: Exception) -> list[Entry]:
        """Dead-letter the events of a failed batch that are older than ``max_retry_age``
        (a retryable failure may not keep an event forever); return the others."""
        now = time.time()
        keep: list[Entry] = []
        for entry in batch:
            age = now - entry.created
            if age <= self.max_retry_age or entry.rowid is None:
                keep.append(entry)
                continue
            error = f"{type(exc).__name__}: {exc}"
            message = (
                f"undelivered for {age:.0f}s (max_retry_age {self.max_retry_age:.0f}s);"
                f" last error: {error}"
            )[:500]
            self._dead_letter(entry, getattr(exc, "status", None), "retry_age_exceeded", message)
        return keep
