"""The Reporter: batching, retries, dead letters, prepare/confirm/cancel, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.reporter_fakes import (
    FakeProvider,
    events,
    fail,
    hang,
    reject,
    too_many,
)
from tests.support.waiting import eventually
from usage_middleware import ConfigurationError, UsageEvent
from usage_middleware.delivery import Reporter, ReporterStats
from usage_middleware.outbox import Outbox
from usage_middleware.provider import ProviderState

FAST: dict[str, Any] = {
    "wait_initial": 0.001,
    "wait_max": 0.005,
    "wait_jitter": 0.0,
    "retry_cooldown": 0.02,
    "poll_interval": 0.05,
    "stats_interval": 0.05,
    "max_delay": 0.005,
}

MakeReporter = Callable[..., Any]


@pytest.fixture
def outbox_path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
def make(outbox_path: Path) -> MakeReporter:
    """Open a Reporter on the test's outbox with fast retry settings."""

    @asynccontextmanager
    async def _make(provider: FakeProvider, **kw: Any) -> AsyncIterator[Reporter]:
        reporter = Reporter(provider, path=kw.pop("path", outbox_path), **(FAST | kw))
        await reporter.open()
        try:
            yield reporter
        finally:
            await reporter.aclose()

    return _make


def keys(evs: list[UsageEvent]) -> list[str]:
    return [e.idempotency_key for e in evs]


def rows(path: Path) -> list[tuple[str, int, int | None]]:
    """(key, held, owner) of every undelivered row, read by another connection."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT idempotency_key, held, owner FROM outbox ORDER BY id").fetchall()


async def test_enqueued_events_are_delivered_once_in_batches_of_at_most_max_batch(
    make: MakeReporter,
) -> None:
    """250 events reach a provider capped at 100 per call, each exactly once, in full batches."""
    provider = FakeProvider(max_batch=100)
    evs = events(250)
    async with make(provider, max_delay=1.0) as reporter:
        for e in evs:
            reporter.enqueue(e)
        await provider.wait_delivered(keys(evs))
    assert provider.deliveries == dict.fromkeys(keys(evs), 1)
    assert provider.oversized == []
    assert max(len(c) for c in provider.calls) == 100
    assert len(provider.calls) == 3


async def test_a_provider_taking_one_event_per_call_gets_one(make: MakeReporter) -> None:
    """Tier-style max_batch=1: every report() call carries exactly one event."""
    provider = FakeProvider(max_batch=1)
    evs = events(20)
    async with make(provider) as reporter:
        for e in evs:
            reporter.enqueue(e)
        await provider.wait_delivered(keys(evs))
    assert sorted(c[0] for c in provider.calls) == sorted(keys(evs))
    assert {len(c) for c in provider.calls} == {1}


async def test_a_lone_event_is_sent_after_max_delay_without_a_full_batch(
    make: MakeReporter,
) -> None:
    """Batching by age: one event does not wait for 99 others."""
    provider = FakeProvider(max_batch=100)
    ev = events(1)
    async with make(provider, max_delay=0.02) as reporter:
        reporter.enqueue(ev[0])
        await provider.wait_delivered(keys(ev))
    assert provider.calls == [keys(ev)]


def test_max_batch_above_the_providers_cap_is_refused() -> None:
    """The provider declares its cap; asking the reporter for more is a configuration error."""
    with pytest.raises(ConfigurationError, match="max_batch"):
        Reporter(FakeProvider(max_batch=1), max_batch=2)


async def test_failures_are_retried_with_the_same_events_and_keys(make: MakeReporter) -> None:
    """A batch failing twice (503) is sent a third time with the same keys; retried counts it."""
    provider = FakeProvider(max_batch=10, script=[fail(2)])
    evs = events(5)
    async with make(provider, max_delay=0.05) as reporter:
        for e in evs:
            reporter.enqueue(e)
        await provider.wait_delivered(keys(evs))
        stats = reporter.stats()
    assert [sorted(c) for c in provider.calls] == [sorted(keys(evs))] * 3
    assert provider.deliveries == dict.fromkeys(keys(evs), 1)
    assert (stats.queued, stats.sent, stats.retried, stats.dead_lettered) == (5, 5, 10, 0)


async def test_a_call_that_never_answers_times_out_and_is_retried(make: MakeReporter) -> None:
    """A hanging report() is cut off by call_timeout and counts as a retryable failure."""
    provider = FakeProvider(max_batch=10, script=[hang()])
    evs = events(3)
    async with make(provider, call_timeout=0.05, max_delay=0.05) as reporter:
        for e in evs:
            reporter.enqueue(e)
        await provider.wait_delivered(keys(evs))
        assert reporter.stats().retried == 3
    assert len(provider.calls) == 2
    assert provider.deliveries == dict.fromkeys(keys(evs), 1)


async def test_retry_after_of_a_429_is_honoured(make: MakeReporter) -> None:
    """After a 429 with Retry-After 0.3 s the next call waits at least that long."""
    provider = FakeProvider(max_batch=10, script=[too_many(0.3)])
    evs = events(2)
    async with make(provider, max_delay=0.05) as reporter:
        for e in evs:
            reporter.enqueue(e)
        await provider.wait_delivered(keys(evs))
    assert len(provider.call_times) == 2
    assert provider.call_times[1] - provider.call_times[0] >= 0.29  # backoff alone is <= 5 ms


async def test_one_bad_event_in_a_rejected_batch_is_dead_lettered_and_the_rest_delivered(
    make: MakeReporter, outbox_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 422 for the whole batch is bisected: 7 events delivered, the bad one dead-lettered."""
    evs = events(8)
    bad = evs[5].idempotency_key
    provider = FakeProvider(max_batch=8, bad_keys=[bad])
    caplog.set_level(logging.WARNING, logger="usage_middleware.reporter")
    async with make(provider, max_delay=1.0) as reporter:
        for e in evs:
            reporter.enqueue(e)
        good = [k for k in keys(evs) if k != bad]
        await provider.wait_delivered(good)
        await reporter.flush()
        await reporter.flush()
        assert reporter.stats().dead_lettered == 1
    assert set(provider.deliveries) == set(good)
    assert len(provider.calls) <= 1 + 2 * 3  # one full batch, then halves down to one event
    ob = Outbox(outbox_path)
    (dead,) = ob.dead_letters()
    assert (dead.event.idempotency_key, dead.status, dead.code) == (bad, 422, "validation_error")
    assert dead.message == f"event {bad} is invalid"
    assert ob.status().depth == 0
    ob.close()
    assert any(bad in r.getMessage() and "422" in r.getMessage() for r in caplog.records)


async def test_a_permanent_rejection_of_a_single_event_is_not_retried(make: MakeReporter) -> None:
    """A 422 for a lone event is dead-lettered after one call: retrying cannot help."""
    provider = FakeProvider(max_batch=1, script=[reject()])
    evs = events(1)
    async with make(provider) as reporter:
        reporter.enqueue(evs[0])
        await eventually(lambda: reporter.stats().dead_lettered == 1)
    assert len(provider.calls) == 1 and not provider.delivered


async def test_a_provider_down_for_a_while_loses_nothing_and_sends_nothing_twice(
    make: MakeReporter,
) -> None:
    """Events queued during an outage (503 on every call) are all delivered once it is back."""
    provider = FakeProvider(max_batch=10)
    provider.down = True
    evs = events(60)
    async with make(provider, retry_attempts=2, max_queue=20) as reporter:
        for e in evs[:30]:
            reporter.enqueue(e)
        await eventually(lambda: len(provider.calls) >= 6)
        for e in evs[30:]:
            reporter.enqueue(e)
        await reporter.flush()
        assert reporter.stats().in_memory <= 20
        provider.down = False
        await provider.wait_delivered(keys(evs))
        assert reporter.stats().retried > 0
    assert provider.deliveries == dict.fromkeys(keys(evs), 1)


async def test_prepare_is_durable_on_return_and_held_until_confirm(
    make: MakeReporter, outbox_path: Path
) -> None:
    """A prepared event's row is committed when prepare returns, and not sent before confirm."""
    provider = FakeProvider(max_batch=10)
    held, other = events(2)
    async with make(provider) as reporter:
        await reporter.prepare(held)
        assert rows(outbox_path) == [(held.idempotency_key, 1, 1)]
        reporter.enqueue(other)
        await provider.wait_delivered([other.idempotency_key])
        assert held.idempotency_key not in provider.deliveries
        assert reporter.stats().held == 1
        reporter.confirm(held)
        await provider.wait_delivered([held.idempotency_key])
    assert provider.deliveries == {held.idempotency_key: 1, other.idempotency_key: 1}


async def test_a_cancelled_prepare_is_never_delivered(
    make: MakeReporter, outbox_path: Path
) -> None:
    """cancel() deletes the prepared row before returning; nothing reaches the provider."""
    provider = FakeProvider(max_batch=10)
    (ev,) = events(1)
    async with make(provider) as reporter:
        await reporter.prepare(ev)
        await reporter.cancel(ev)
        assert rows(outbox_path) == []
        assert reporter.stats().queued == 0
    assert provider.calls == []


async def test_cancel_while_prepare_is_still_being_written(
    make: MakeReporter, outbox_path: Path
) -> None:
    """A request cancelled mid-prepare, then released, leaves no row and sends nothing."""
    provider = FakeProvider(max_batch=10)
    evs = events(50)
    async with make(provider) as reporter:
        tasks = [asyncio.create_task(reporter.prepare(e)) for e in evs]
        await asyncio.sleep(0)
        for t in tasks[::2]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(reporter.cancel(e) for e in evs[::2]))
        for e in evs[1::2]:
            reporter.confirm(e)
        await provider.wait_delivered(keys(evs[1::2]))
        await reporter.flush()
        assert rows(outbox_path) == []
    assert set(provider.deliveries) == set(keys(evs[1::2]))


async def test_concurrent_prepares_share_group_commits(make: MakeReporter) -> None:
    """500 concurrent prepares are all durable on return and delivered once after confirm."""
    provider = FakeProvider(max_batch=100)
    evs = events(500)
    async with make(provider) as reporter:

        async def request(e: UsageEvent) -> None:
            await reporter.prepare(e)
            reporter.confirm(e)

        await asyncio.gather(*(request(e) for e in evs))
        await provider.wait_delivered(keys(evs))
    assert provider.deliveries == dict.fromkeys(keys(evs), 1)


async def _loop_idle(reporter: Reporter) -> None:
    """Let the tasks the reporter just started run (their first claim on its thread
    included) until nothing else is ready on the loop; bounded (5 s)."""
    loop: Any = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while loop.time() < deadline:
        await asyncio.sleep(0.001)
        if not (loop._ready or reporter._sqlite.threaded):
            return
    raise AssertionError("the loop never went idle")


async def test_prepare_alone_joins_the_group_commit_of_requests_ready_in_the_same_turn(
    make: MakeReporter, outbox_path: Path
) -> None:
    """20 prepare_alone calls started in one loop turn commit together: every row written,
    in fewer transactions than prepares (one per response before)."""
    provider = FakeProvider(max_batch=10)
    evs = events(20)
    async with make(provider) as reporter:
        await _loop_idle(reporter)
        outbox: Any = reporter._outbox
        applies = 0
        real = outbox.apply

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal applies
            applies += 1
            return real(*args, **kwargs)

        outbox.apply = counting
        await asyncio.gather(*(reporter.prepare_alone(e) for e in evs))
        outbox.apply = real
        assert sorted(r[0] for r in rows(outbox_path)) == sorted(keys(evs))
        assert applies <= 2, applies
        for e in evs:
            await reporter.cancel(e)


async def test_prepare_alone_is_durable_on_return_without_a_loop_turn(
    make: MakeReporter, outbox_path: Path
) -> None:
    """prepare_alone commits the row in the caller's step (nothing else ready on the loop);
    confirm then delivers it once."""
    provider = FakeProvider(max_batch=10)
    (ev,) = events(1)
    async with make(provider) as reporter:
        await _loop_idle(reporter)
        step = reporter.prepare_alone(ev).__await__()
        with pytest.raises(StopIteration):  # finished without suspending
            next(step)
        assert rows(outbox_path) == [(ev.idempotency_key, 1, 1)]
        reporter.confirm(ev)
        await provider.wait_delivered([ev.idempotency_key])
        await reporter.cancel(ev)  # already confirmed: ignored
    assert provider.deliveries == {ev.idempotency_key: 1}
    assert rows(outbox_path) == []


async def test_prepare_alone_commits_inline_while_unrelated_callbacks_are_ready(
    make: MakeReporter, outbox_path: Path
) -> None:
    """A lone prepare commits in the caller's step even with other (non-prepare) callbacks
    ready on the loop: a timer or a sender costs the response no loop turn."""
    provider = FakeProvider(max_batch=10)
    (ev,) = events(1)
    async with make(provider) as reporter:
        await _loop_idle(reporter)
        ran = asyncio.Event()
        asyncio.get_running_loop().call_soon(ran.set)  # something else ready this turn
        step = reporter.prepare_alone(ev).__await__()
        with pytest.raises(StopIteration):  # finished without suspending
            next(step)
        assert rows(outbox_path) == [(ev.idempotency_key, 1, 1)]
        await ran.wait()
        await reporter.cancel(ev)
    assert rows(outbox_path) == []


async def test_prepare_alone_groups_under_load_and_commits_inline_once_it_is_gone(
    make: MakeReporter, outbox_path: Path
) -> None:
    """Prepares seen sharing loop turns keep sharing group commits (a later turn's 20 in at
    most 2 transactions); after a few turns with one prepare each, a lone prepare commits
    inline again, even with other callbacks ready."""
    provider = FakeProvider(max_batch=10)
    first, burst, lone = events(20), events(20), events(8)
    async with make(provider) as reporter:
        await _loop_idle(reporter)
        outbox: Any = reporter._outbox
        applies = 0
        real = outbox.apply

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal applies
            applies += 1
            return real(*args, **kwargs)

        await asyncio.gather(*(reporter.prepare_alone(e) for e in first))
        outbox.apply = counting
        await asyncio.gather(*(reporter.prepare_alone(e) for e in burst))
        outbox.apply = real
        assert applies <= 2, applies
        for e in lone[:-1]:  # one per turn: the load is gone
            await reporter.prepare_alone(e)
            await asyncio.sleep(0)
        await _loop_idle(reporter)  # no claim of the senders' on the thread just now
        asyncio.get_running_loop().call_soon(lambda: None)
        step = reporter.prepare_alone(lone[-1]).__await__()
        with pytest.raises(StopIteration):  # inline again: finished without suspending
            next(step)
        assert len(rows(outbox_path)) == 48
        for e in first + burst + lone:
            await reporter.cancel(e)
    assert rows(outbox_path) == []


async def test_close_drains_confirmed_rows_that_did_not_fit_in_memory(
    make: MakeReporter, outbox_path: Path
) -> None:
    """Confirms beyond max_queue hand rows back to the file; the close drain still sends them."""
    provider = FakeProvider(max_batch=10)
    evs = events(60)
    async with make(provider, max_queue=20, max_delay=10.0, poll_interval=60.0) as reporter:
        await reporter.flush()
        await asyncio.sleep(0.05)  # the senders' first look at the outbox finds it empty
        for e in evs:  # no loop turn in between: the senders cannot keep up
            await reporter.prepare_alone(e)
            reporter.confirm(e)
    assert provider.deliveries == dict.fromkeys(keys(evs), 1)
    assert rows(outbox_path) == []


async def test_confirm_without_prepare_enqueues(make: MakeReporter) -> None:
    """A commit whose prepare never happened still delivers the charge."""
    provider = FakeProvider(max_batch=10)
    (ev,) = events(1)
    async with make(provider) as reporter:
        reporter.confirm(ev)
        await provider.wait_delivered([ev.idempotency_key])


async def test_two_reporters_on_one_outbox_never_send_the_same_event(
    outbox_path: Path, make: MakeReporter
) -> None:
    """Two workers sharing a backlog and enqueuing split the work; no event goes to both."""
    ob = Outbox(outbox_path)
    backlog = events(400)
    ob.apply(0, [(e, False, False) for e in backlog])
    ob.close()
    a, b = FakeProvider(max_batch=7), FakeProvider(max_batch=7)
    fresh = events(200)
    async with make(a, max_queue=30) as ra, make(b, max_queue=30) as rb:
        for i, e in enumerate(fresh):
            (ra if i % 2 else rb).enqueue(e)
        everything = keys(backlog) + keys(fresh)
        await eventually(lambda: set(everything) <= a.delivered.keys() | b.delivered.keys(), 20)
    assert not a.deliveries.keys() & b.deliveries.keys()
    assert set(a.deliveries.values()) | set(b.deliveries.values()) == {1}
    assert a.delivered and b.delivered


async def test_rows_of_a_worker_whose_lease_expired_are_delivered(
    outbox_path: Path, make: MakeReporter
) -> None:
    """A dead worker's claimed and prepared rows are delivered once its lease runs out."""
    ob = Outbox(outbox_path)
    dead = ob.register(0.01)
    evs = events(4)
    ob.apply(dead, [(e, True, i % 2 == 0) for i, e in enumerate(evs)])
    ob.close()
    await asyncio.sleep(0.02)
    provider = FakeProvider(max_batch=10)
    async with make(provider):
        await provider.wait_delivered(keys(evs))
    assert provider.deliveries == dict.fromkeys(keys(evs), 1)


async def test_close_drains_what_is_queued(make: MakeReporter, outbox_path: Path) -> None:
    """aclose() delivers events enqueued just before it (lifespan shutdown drain)."""
    provider = FakeProvider(max_batch=50, latency=0.01)
    evs = events(120)
    async with make(provider, max_delay=10.0) as reporter:
        for e in evs:
            reporter.enqueue(e)
    assert provider.deliveries == dict.fromkeys(keys(evs), 1)
    assert rows(outbox_path) == []
    assert reporter.stats().sent == 120


async def test_what_is_not_delivered_by_the_drain_deadline_stays_for_the_next_process(
    make: MakeReporter, outbox_path: Path
) -> None:
    """With the provider down, aclose() returns at its deadline and the rows wait in the file."""
    down = FakeProvider(max_batch=10)
    down.down = True
    evs = events(25)
    async with make(down, drain_timeout=0.2) as reporter:
        for e in evs:
            reporter.enqueue(e)
        await reporter.flush()
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert sorted(k for k, _, owner in rows(outbox_path) if owner is None) == sorted(keys(evs))
    up = FakeProvider(max_batch=10)
    async with make(up):
        await up.wait_delivered(keys(evs))
    assert up.deliveries == dict.fromkeys(keys(evs), 1)


async def test_lifecycle_no_thread_or_task_before_open_and_close_is_idempotent(
    make: MakeReporter, outbox_path: Path
) -> None:
    """Construction starts nothing; events before open are kept; close is idempotent."""
    threads = threading.active_count()
    tasks = len(asyncio.all_tasks())
    provider = FakeProvider(max_batch=10)
    reporter = Reporter(provider, path=outbox_path, **FAST)
    (early, late) = events(2)
    reporter.enqueue(early)
    assert threading.active_count() == threads and len(asyncio.all_tasks()) == tasks
    assert not await asyncio.to_thread(outbox_path.exists)
    await reporter.open()
    await reporter.open()
    await provider.wait_delivered([early.idempotency_key])
    await reporter.aclose()
    await reporter.aclose()
    assert reporter.state is ProviderState.CLOSED
    reporter.enqueue(late)  # after close: written straight to the file, not lost
    assert [k for k, _, _ in rows(outbox_path)] == [late.idempotency_key]


async def test_charges_prepared_before_close_and_settled_after_it(
    make: MakeReporter, outbox_path: Path
) -> None:
    """Shutdown mid-request: a later cancel still deletes its row; a confirmed one is kept."""
    provider = FakeProvider(max_batch=10)
    cancelled, confirmed = events(2)
    async with make(provider, drain_timeout=0.1) as reporter:
        await reporter.prepare(cancelled)
        await reporter.prepare(confirmed)
    async with asyncio.timeout(5):
        await reporter.cancel(cancelled)
    reporter.confirm(confirmed)
    assert rows(outbox_path) == [(confirmed.idempotency_key, 0, None)]
    up = FakeProvider(max_batch=10)
    async with make(up):
        await up.wait_delivered([confirmed.idempotency_key])
    assert list(up.deliveries) == [confirmed.idempotency_key]


async def test_an_unwritable_outbox_fails_at_open(tmp_path: Path) -> None:
    """A bad outbox path is a start-up error naming the path, not a per-request one."""
    reporter = Reporter(FakeProvider(), path=tmp_path / "missing-dir" / "o.db")
    with pytest.raises(ConfigurationError, match="missing-dir"):
        await reporter.open()


async def test_stats_report_counters_depth_and_oldest_age(make: MakeReporter) -> None:
    """stats() shows queued/sent/dead-lettered and the outbox depth and oldest age."""
    provider = FakeProvider(max_batch=10)
    provider.down = True
    evs = events(5)
    async with make(provider, retry_cooldown=60, drain_timeout=0.1) as reporter:
        for e in evs:
            reporter.enqueue(e)
        await reporter.flush()
        await eventually(lambda: reporter.stats().outbox_depth == 5)
        stats = reporter.stats()
        status = await reporter.outbox_status()
    assert isinstance(stats, ReporterStats)
    assert (stats.queued, stats.sent, stats.outbox_depth) == (5, 0, 5)
    assert stats.oldest_undelivered_age is not None and stats.oldest_undelivered_age >= 0
    assert status.depth == 5 and status.owners[0].alive


@pytest.mark.slow
def test_a_backlog_lives_on_disk_not_in_memory(tmp_path: Path) -> None:
    """200k events queued while the provider is down grow RSS by far less than 100 MB."""
    import subprocess
    import sys

    script = f"""
import asyncio, gc, sys, psutil
sys.path.insert(0, {str(Path(__file__).parents[1] / "support")!r})
from tests.support.reporter_fakes import FakeProvider
from usage_middleware import UsageEvent
from usage_middleware.delivery import Reporter

async def main():
    provider = FakeProvider(max_batch=100)
    provider.down = True
    reporter = Reporter(provider, path={str(tmp_path / "o.db")!r}, retry_cooldown=60)
    await reporter.open()
    for _ in range(3):
        reporter.enqueue(UsageEvent("org:acme", "feature:x", 1))
    await reporter.flush()
    gc.collect()
    before = psutil.Process().memory_info().rss
    for _ in range(200):
        for _ in range(1000):
            reporter.enqueue(UsageEvent("org:acme", "feature:x", 1))
        await reporter.flush()
    gc.collect()
    after = psutil.Process().memory_info().rss
    print(after - before, reporter.stats().in_memory, reporter.stats().queued)
    reporter.drain_timeout = 0.1
    await reporter.aclose()

asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    grown, in_memory, queued = map(int, out.stdout.split())
    assert queued == 200_003
    assert in_memory <= 10_000
    assert grown < 100 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MB"


async def test_senders_racing_for_the_queue_while_claims_find_nothing(
    make: MakeReporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A sender whose claim came back empty while others emptied the queue keeps going."""
    provider = FakeProvider(max_batch=50)
    evs = events(16000)
    caplog.set_level(logging.ERROR, logger="usage_middleware.reporter")
    kw = {"concurrency": 8, "max_delay": 0.001, "poll_interval": 0.001, "stats_interval": 60}
    async with make(provider, **kw) as reporter:
        for i in range(0, len(evs), 2):
            reporter.enqueue(evs[i])
            reporter.enqueue(evs[i + 1])
            await asyncio.sleep(0)
        await provider.wait_delivered(keys(evs), within=60)
    assert provider.deliveries == dict.fromkeys(keys(evs), 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
