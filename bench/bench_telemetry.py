"""What the OpenTelemetry instrumentation costs a metered request, in one process.

The same metered app (``UsageMiddleware`` + ``@metered`` on a ``LocalLedger``, as in
``bench_app.py``) runs in interleaved rounds under three telemetry settings:

* ``off``: ``telemetry.configure(enabled=False)``, the path taken when the ``opentelemetry``
  package is not installed (every instrumented point returns at once);
* ``noop``: the OpenTelemetry API with no SDK configured (its proxy providers), what an
  application that installs ``[otel]`` but configures nothing pays;
* ``sdk`` (when ``opentelemetry-sdk`` is installed): an SDK ``MeterProvider`` with an
  in-memory reader and a ``TracerProvider``, for scale: what recording really costs.

The report is the median requests/s per setting and the median per-round ratio to
``off``. The issue's target: ``noop / off`` within noise (about 0.97 or better here).

Run from the repository root::

    python bench/bench_telemetry.py                 # 7 rounds of 1 s per setting
    python bench/bench_telemetry.py --rounds 3 --seconds 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from asgi_driver import Driver
from bench_app import CUSTOMER, FEATURE, PRICING, metered_app

from usage_middleware import LocalLedger, telemetry


def settings() -> dict[str, Callable[[], None]]:
    """Each setting's name and how to switch to it."""
    found: dict[str, Callable[[], None]] = {
        "off": lambda: telemetry.configure(enabled=False),
        "noop": telemetry.configure,  # the API's global (proxy, no-op) providers
    }
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return found
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    tracers = TracerProvider()
    found["sdk"] = lambda: telemetry.configure(meter_provider=meters, tracer_provider=tracers)
    return found


async def bench(args: argparse.Namespace) -> int:
    if not telemetry.available():
        print("opentelemetry-api is not installed: nothing to compare", file=sys.stderr)
        return 1
    modes = settings()
    with tempfile.TemporaryDirectory(prefix="usage-bench-") as tmp:
        async with LocalLedger(Path(tmp) / "bench.db", pricing=PRICING) as ledger:
            await ledger.subscribe(CUSTOMER, "plan:bench@1")
            driver = Driver(metered_app(ledger, FEATURE))
            for switch in modes.values():  # warm-up
                switch()
                await driver.run_for(0.3)
            rates: dict[str, list[float]] = {name: [] for name in modes}
            names = list(modes)
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    modes[name]()
                    rates[name].append((await driver.run_for(args.seconds))[0])
                line = "  ".join(f"{n} {rates[n][-1]:6.0f}/s" for n in names)
                print(f"round {r + 1}: {line}", file=sys.stderr)
            telemetry.configure()
            if driver.other:
                print(f"non-200 responses: {driver.other}", file=sys.stderr)
                return 1
    print(
        f"\nMetered app on LocalLedger, in-process driver, {args.rounds} interleaved rounds"
        f" of {args.seconds:g} s per setting, Python {sys.version.split()[0]}\n"
    )
    print(f"| {'telemetry':<44} | requests/s | µs/request | ratio to off |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 14}|")
    labels = {
        "off": "off (as without the opentelemetry package)",
        "noop": "opentelemetry-api, no SDK configured",
        "sdk": "opentelemetry-sdk, in-memory reader",
    }
    for name in names:
        rate = statistics.median(rates[name])
        ratio = statistics.median(v / b for v, b in zip(rates[name], rates["off"], strict=True))
        print(f"| {labels[name]:<44} | {rate:>10,.0f} | {1e6 / rate:>10.1f} | {ratio:>12.3f} |")
    noop = statistics.median(v / b for v, b in zip(rates["noop"], rates["off"], strict=True))
    print(f"\nnoop / off = {noop:.3f} (per-round median; 1.000 = no cost)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per setting per round")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds and --seconds must be positive")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
