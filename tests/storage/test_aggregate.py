"""Aggregation: a sink that takes a sum (Tier's ``n``) gets queued charges of one customer
and feature as one summed report per window; the outbox keeps every member's row until the
aggregate is confirmed."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.crash import kill_after
from tests.support.tier_fake import FAKE_URL, FakeTier
from tests.support.waiting import drain_outbox
from usage_middleware import UsageEvent
from usage_middleware.delivery import Reporter
from usage_middleware.delivery.aggregate import aggregate_id
from usage_middleware.outbox import Outbox
from usage_middleware.providers.tier import TierProvider


async def _open_tier(fake: FakeTier, outbox: Path) -> TierProvider:
    tier = TierProvider(FAKE_URL, client=fake.client(), outbox=outbox)
    await tier.open()
    return tier


def _report_bodies(fake: FakeTier) -> list[dict[str, Any]]:
    return [r.json() for r in fake.requests if r.path == "/v1/report"]


async def test_ten_thousand_charges_of_one_customer_take_at_most_100_tier_calls(
    tmp_path: Path,
) -> None:
    """10,000 queued charges of one org and feature reach Tier in <= 100 reports, n summing
    to 10,000 (one report per charge before aggregation)."""
    fake = FakeTier()
    fake.add_org("org:acme", {"feature:x": 1_000_000})
    tier = await _open_tier(fake, tmp_path / "outbox.db")
    try:
        reporter = tier.reporter
        assert reporter is not None
        for _ in range(10_000):
            reporter.enqueue(UsageEvent("org:acme", "feature:x", 1))
        await drain_outbox(reporter, within=20.0)
    finally:
        await tier.aclose()
    bodies = _report_bodies(fake)
    assert fake.used("org:acme", "feature:x") == 10_000
    assert sum(b["n"] for b in bodies) == 10_000
    print("tier report calls for 10,000 charges:", len(bodies))
    assert len(bodies) <= 100, len(bodies)


async def test_aggregates_never_mix_customers_or_features_and_never_sum_a_clobber(
    tmp_path: Path,
) -> None:
    """Interleaved charges of 3 orgs x 2 features go out summed per (org, feature) only; a
    clobber goes alone with its own n; fewer calls than charges."""
    fake = FakeTier()
    orgs = ["org:a", "org:b", "org:c"]
    for org in orgs:
        fake.add_org(org, {"feature:x": 10_000, "feature:y": 10_000})
    tier = await _open_tier(fake, tmp_path / "outbox.db")
    want: collections.Counter[tuple[str, str]] = collections.Counter()
    try:
        reporter = tier.reporter
        assert reporter is not None
        for i in range(300):
            org, feature = orgs[i % 3], ("feature:x", "feature:y")[i % 2]
            reporter.enqueue(UsageEvent(org, feature, 1 + i % 4))
            want[org, feature] += 1 + i % 4
        reporter.enqueue(UsageEvent("org:a", "feature:y", 7, clobber=True))
        await drain_outbox(reporter, within=20.0)
    finally:
        await tier.aclose()
    bodies = _report_bodies(fake)
    clobbers = [b for b in bodies if b["clobber"]]
    assert [(b["org"], b["feature"], b["n"]) for b in clobbers] == [("org:a", "feature:y", 7)]
    got: collections.Counter[tuple[str, str]] = collections.Counter()
    for b in bodies:
        if not b["clobber"]:
            got[b["org"], b["feature"]] += b["n"]
    assert got == want
    assert len(bodies) < 301


async def test_a_failed_aggregate_is_retried_whole_and_counted_once(tmp_path: Path) -> None:
    """A 503 on a summed report: the same aggregate (same n) is sent again; Tier counts it
    once; the outbox is empty after."""
    fake = FakeTier()
    fake.add_org("org:acme", {"feature:x": 1000})
    fake.inject("/v1/report", (503, "unavailable", "Service Unavailable"))
    tier = await _open_tier(fake, tmp_path / "outbox.db")
    try:
        reporter = tier.reporter
        assert reporter is not None
        for _ in range(50):
            reporter.enqueue(UsageEvent("org:acme", "feature:x", 2))
        await drain_outbox(reporter, within=20.0)
    finally:
        await tier.aclose()
    bodies = _report_bodies(fake)
    assert [b["n"] for b in bodies] == [100, 100]  # the failed call, then the same aggregate
    assert fake.used("org:acme", "feature:x") == 100
    assert len(fake.reports) == 1


def test_aggregate_id_is_deterministic_and_order_free() -> None:
    """An aggregate's idempotency key depends only on its members' keys (a resend of the same
    members logs the same key); one member keeps its own key."""
    assert aggregate_id(["a", "b", "c"]) == aggregate_id(["c", "a", "b"])
    assert aggregate_id(["a", "b"]) != aggregate_id(["a", "c"])
    assert len(aggregate_id(["a", "b"])) == 32
    assert aggregate_id(["k1"]) == "k1"


SINK = '''
import asyncio, sqlite3
from usage_middleware import Provider
from usage_middleware.delivery.aggregate import default_aggregate_key, merge_events

class AggSink(Provider):
    """An aggregating sink that records the member keys of every summed event it is sent,
    after `latency` s (a kill within that window leaves the aggregate unconfirmed)."""

    name = "aggsink"
    max_batch = 1
    aggregates = True
    deduplicates = False

    def __init__(self, path, *, latency=0.0):
        super().__init__()
        self.path, self.latency, self.members = path, latency, {}
        db = sqlite3.connect(path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS charged (key TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT, n INTEGER)")
        db.close()

    def aggregate_key(self, event):
        return default_aggregate_key(event)

    def merge(self, events):
        merged = merge_events(events)
        self.members[merged.idempotency_key] = [e.idempotency_key for e in events]
        return merged

    def _record(self, event):
        db = sqlite3.connect(self.path, timeout=30)
        with db:
            keys = self.members.get(event.idempotency_key, [event.idempotency_key])
            db.executemany("INSERT INTO charged VALUES (?)", [(k,) for k in keys])
            db.execute("INSERT INTO calls VALUES (?, ?)", (event.idempotency_key, event.units))
        db.close()

    async def report(self, events):
        assert len(events) == 1
        if self.latency:
            await asyncio.sleep(self.latency)
        await asyncio.to_thread(self._record, events[0])
'''

CHILD = """
import asyncio, sys
from sink import AggSink
from usage_middleware import UsageEvent
from usage_middleware.delivery import Reporter

async def main():
    reporter = Reporter(AggSink(sys.argv[2], latency=0.3), path=sys.argv[1], lease=1.0,
                        aggregate_window=0.05)
    await reporter.open()
    i = 0
    while True:
        batch = [UsageEvent("org:acme", "feature:x", 1, idempotency_key=f"k{i + j}")
                 for j in range(20)]
        i += 20
        await asyncio.gather(*(reporter.prepare(e) for e in batch))
        for e in batch:
            reporter.confirm(e)
        print(" ".join(e.idempotency_key for e in batch), flush=True)
        await asyncio.sleep(0.01)

asyncio.run(main())
"""


@pytest.mark.slow
def test_kill_9_mid_aggregate_leaves_every_member_row_to_resend(tmp_path: Path) -> None:
    """SIGKILL while summed reports are in flight; a new reporter delivers every durable
    charge (each member of an unconfirmed aggregate kept its row), in fewer calls."""
    (tmp_path / "sink.py").write_text(SINK)
    (tmp_path / "child.py").write_text(CHILD)
    outbox, sink = tmp_path / "outbox.db", tmp_path / "sink.db"
    durable = kill_after(tmp_path, ["child.py", str(outbox), str(sink)], 400)
    assert len(durable) >= 400
    assert len(_charged(sink)) < len(durable)  # the crash left work undelivered
    asyncio.run(_drain_with(outbox, sink, tmp_path))
    charged = _charged(sink)
    assert set(durable) <= set(charged)
    db = sqlite3.connect(sink)
    calls = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    db.close()
    assert calls < len(charged)  # summed, not one call per charge
    ob = Outbox(outbox)
    try:
        assert ob.status().depth == 0
    finally:
        ob.close()


def _charged(sink: Path) -> list[str]:
    db = sqlite3.connect(sink)
    try:
        return [k for (k,) in db.execute("SELECT key FROM charged")]
    finally:
        db.close()


async def _drain_with(outbox: Path, sink: Path, where: Path) -> None:
    sys.path.insert(0, str(where))
    try:
        from sink import AggSink  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(where))
        sys.modules.pop("sink", None)
    reporter = Reporter(AggSink(str(sink)), path=outbox, lease=1.0, poll_interval=0.1)
    await reporter.open()
    try:
        await drain_outbox(reporter, within=30.0)
    finally:
        await reporter.aclose()


async def test_local_accounting_sees_every_member_of_a_delivered_aggregate(
    tmp_path: Path,
) -> None:
    """200 reserve/prepare/commit charges delivered as summed reports: Tier counts 200 and
    its local answer says 200 used, 800 of 1000 left (no member counted twice or lost)."""
    fake = FakeTier()
    fake.add_org("org:acme", {"feature:x": 1000})
    tier = await _open_tier(fake, tmp_path / "outbox.db")
    try:
        reporter = tier.reporter
        assert reporter is not None
        for _ in range(200):
            r = await tier.reserve("org:acme", "feature:x", 1)
            assert r.answer.ok
            await tier.prepare(r)
            await tier.commit(r)
        await drain_outbox(reporter, within=20.0)
        answer = await tier.can("org:acme", "feature:x", 1)
    finally:
        await tier.aclose()
    assert fake.used("org:acme", "feature:x") == 200
    assert len(_report_bodies(fake)) < 200
    assert (answer.used, answer.remaining) == (200, 800)
