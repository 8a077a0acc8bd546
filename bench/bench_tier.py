"""What TierProvider adds on top of the HTTP calls it makes, and its delivery rate.

Against the in-process fake sidecar (``tests/support/tier_fake.py``, an ``httpx.MockTransport``),
in one run:

* ``fetch``: one ``TierProvider.fetch`` (a cold entitlement check: ``GET /v1/limits``,
  parse, match) against the same request made with the bare ``httpx.AsyncClient`` plus
  ``json.loads`` (the baseline);
* ``report``: one ``TierProvider.report([event])`` against a bare ``client.post`` of the
  same bytes;
* ``outbox``: committed charges delivered per second through the durable outbox (the
  Reporter; queued charges of one customer and feature go out summed in one ``/v1/report``),
  from the first commit until the outbox is empty, with an instant sidecar, and the number
  of ``/v1/report`` calls that took (issue 14's target: <= 100 for 10,000 charges).

Each timing is the median of ``--rounds`` interleaved rounds; read the ratios, not the
absolute figures (2 shared cores). The script checks the fake recorded every unit.

    python bench/bench_tier.py                  # 5 rounds of 2,000 calls, 2,000 charges
    python bench/bench_tier.py --calls 500 --charges 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from tier_fake import FAKE_URL, FakeTier

from usage_middleware import UsageEvent
from usage_middleware.providers.tier import TierProvider, report_body

ORG, FEATURE = "org:bench", "feature:bench"


async def _timed(n: int, call: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - start) / n


async def wire(calls: int, rounds: int) -> dict[str, list[float]]:
    fake = FakeTier()
    fake.add_org(ORG, {FEATURE: 10**12, **{f"feature:f{i}": 100 for i in range(10)}})
    client = fake.client()
    tier = TierProvider(FAKE_URL, client=client, outbox=None)
    await tier.open()
    event = UsageEvent(ORG, FEATURE, 1, at=datetime.now(UTC))
    body = json.dumps(report_body(event), separators=(",", ":")).encode()

    async def raw_limits() -> Any:
        r = await client.get(FAKE_URL + "/v1/limits", params={"org": ORG})
        return json.loads(r.content)

    async def raw_report() -> Any:
        return await client.post(
            FAKE_URL + "/v1/report", content=body, headers={"content-type": "application/json"}
        )

    cases: dict[str, Callable[[], Awaitable[Any]]] = {
        "fetch: bare httpx + json": raw_limits,
        "fetch: TierProvider.fetch": lambda: tier.fetch(ORG, FEATURE),
        "report: bare httpx": raw_report,
        "report: TierProvider.report": lambda: tier.report([event]),
    }
    out: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for call in cases.values():  # warm-up
            await _timed(max(1, calls // 10), call)
        for r in range(rounds):
            names = list(cases)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                out[name].append(await _timed(calls, cases[name]))
    finally:
        await tier.aclose()
        await client.aclose()
    return out


async def outbox_rate(charges: int) -> tuple[float, int, int]:
    fake = FakeTier()
    fake.add_org(ORG, {FEATURE: 10**12})
    with tempfile.TemporaryDirectory() as tmp:
        tier = TierProvider(FAKE_URL, client=fake.client(), outbox=Path(tmp) / "outbox.db")
        await tier.open()
        reporter: Any = tier.reporter
        try:
            start = time.perf_counter()
            for _ in range(charges):
                r = await tier.reserve(ORG, FEATURE, 1)
                await tier.commit(r)
            async with asyncio.timeout(300):
                while True:
                    await reporter.flush()
                    if (await reporter.outbox_status()).depth == 0:
                        break
                    await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - start
        finally:
            await tier.aclose()
    return charges / elapsed, fake.used(ORG, FEATURE), fake.paths().count("/v1/report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--charges", type=int, default=2000)
    args = parser.parse_args()

    times = asyncio.run(wire(args.calls, args.rounds))
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, t in med.items():
        print(f"{name:32s} {t * 1e6:8.1f} µs/call")
    for what in ("fetch", "report"):
        bare = next(t for n, t in med.items() if n.startswith(what) and "bare" in n)
        ours = next(t for n, t in med.items() if n.startswith(what) and "Tier" in n)
        print(f"{what}: TierProvider / bare httpx = {ours / bare:.2f}")

    rate, used, reports = asyncio.run(outbox_rate(args.charges))
    print(f"outbox -> /v1/report: {rate:,.0f} charges/s delivered ({args.charges} charges)")
    print(f"/v1/report calls for {args.charges:,} charges of one customer: {reports:,}")
    if used != args.charges:
        sys.exit(f"fake recorded {used} units for {args.charges} charges")


if __name__ == "__main__":
    main()
