"""Hot-path cost of AresProvider against a plain RemoteProvider, in one process.

Both providers answer from a warm entitlement cache (``cache_ttl`` long) and deliver to an
in-process ``httpx.MockTransport`` (``outbox=None``), so what is measured is the per-request
work of the reservation cycle ``reserve -> prepare -> commit``:

* ``remote``: a minimal :class:`RemoteProvider` subclass (fetch and report do nothing);
* ``ares``: :class:`AresProvider` with the bearer token in the ASGI scope (header scan,
  token check lookup, credits translation, one wallet per user), delivery stubbed out
  like the plain provider's, so both measure the request path only;
* ``ares+post``: the same with real delivery, one ``POST /v1/partner/usage`` per event
  through httpx to the in-process fake (the background work per charge).

Each round runs both for ``--seconds`` in alternating order; the report is the median
operations/s per provider and the ratio ares/remote. Run from the repository root::

    python bench/bench_ares.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from ares_fake import ARES_URL, CLIENT_ID, FakeAres, transport

from usage_middleware.models import UsageEvent
from usage_middleware.providers.ares import AresProvider
from usage_middleware.providers.remote import Entitlement, RemoteProvider

BIG = 10**12


class AresNoPost(AresProvider):
    async def send(self, events: Sequence[UsageEvent]) -> None:
        return None


class Plain(RemoteProvider):
    name = "plain"

    async def fetch(self, customer: str, feature: str, *, scope: Any = None) -> Entitlement:
        return Entitlement(None, None, BIG)

    async def send(self, events: Sequence[UsageEvent]) -> None:
        return None


async def cycle(provider: Any, scope: Any, seconds: float) -> float:
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            r = await provider.reserve("u1", "feature:bench", 1, scope=scope)
            await provider.prepare(r)
            await provider.commit(r)
        n += 100
        await provider.flush(5.0)
    return n / seconds


async def main(rounds: int, seconds: float) -> None:
    ares = FakeAres()
    uid = ares.add_user(credits=BIG)
    token = ares.issue_token(uid)
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    client = httpx.AsyncClient(transport=transport(ares))
    options: dict[str, Any] = {
        "client": client,
        "client_id": CLIENT_ID,
        "base_url": ARES_URL,
        "outbox": None,
        "cache_ttl": 3600,
    }
    ares_provider = AresProvider(**options)
    stubbed = AresNoPost(**options)
    plain = Plain(outbox=None, cache_ttl=3600)
    order = [("remote", plain, None), ("ares", stubbed, scope), ("ares+post", ares_provider, scope)]
    for _, provider, sc in order:
        await provider.open()
        await cycle(provider, sc, 0.2)  # warm-up
    results: dict[str, list[float]] = {name: [] for name, _, _ in order}
    for i in range(rounds):
        for name, provider, sc in order if i % 2 == 0 else reversed(order):
            results[name].append(await cycle(provider, sc, seconds))
    for _, provider, _ in order:
        await provider.aclose()
    await client.aclose()
    med = {k: statistics.median(v) for k, v in results.items()}
    for name, value in med.items():
        print(f"{name:>9}: {value:10.0f} reserve+prepare+commit/s ({1e6 / value:.1f} us)")
    print(f"  ratio ares/remote: {med['ares'] / med['remote']:.2f}")
    charged = ares.charged(uid)
    print(f"  ARES charged {charged:.0f} credits over {len(ares.charges)} POSTs (1 per request)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.seconds))
