"""OpenTelemetry metrics and spans (usage_middleware.telemetry), read with the SDK's
in-memory reader and span exporter. Each test configures its own providers; the fixture
also asserts that no exported metric point or span carries a customer id."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.metering_helpers import RecordingProvider
from tests.support.reporter_fakes import FakeProvider, events
from tests.support.tier_fake import FAKE_URL, FakeTier
from tests.support.waiting import eventually
from usage_middleware import (
    LocalLedger,
    Provider,
    Reservation,
    UsageMiddleware,
    metered,
    telemetry,
)
from usage_middleware.customers import customer_from_header
from usage_middleware.delivery import Reporter
from usage_middleware.providers.tier import TierProvider

sdk_metrics = pytest.importorskip("opentelemetry.sdk.metrics")
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

ACME = "org:acme"
PRICING: dict[str, Any] = {
    "plans": {"plan:free@1": {"features": {"feature:a": {"tiers": [{"upto": 2}]}}}}
}


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    attributes: dict[str, Any]
    value: float  # a sum's value, a gauge's value, a histogram's count


class OTel:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = sdk_metrics.MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.seen: list[Point] = []

    def points(self) -> list[Point]:
        found: list[Point] = []
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for p in metric.data.data_points:
                        value = getattr(p, "value", None)
                        if value is None:
                            value = p.count
                        found.append(Point(metric.name, dict(p.attributes or {}), value))
        self.seen.extend(found)
        return found

    def value(self, name: str, **attributes: str) -> float:
        """The point of ``name`` whose attributes include ``attributes`` (0 when none)."""
        want = {f"usage_middleware.{k}": v for k, v in attributes.items()}
        matching = [
            p.value
            for p in self.points()
            if p.name == name and want.items() <= p.attributes.items()
        ]
        return sum(matching)

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()


@pytest.fixture
def otel() -> Iterator[OTel]:
    o = OTel()
    telemetry.configure(meter_provider=o.meters, tracer_provider=o.tracers)
    try:
        yield o
        o.points()
        for point in o.seen:  # unbounded cardinality: a customer is never an attribute
            assert not any("customer" in key for key in point.attributes), point
            assert ACME not in point.attributes.values(), point
        for span in o.spans():
            assert ACME not in dict(span.attributes or {}).values(), span
    finally:
        telemetry.configure()
        o.meters.shutdown()
        o.tracers.shutdown()


def make_app(provider: Provider, **options: Any) -> Starlette:
    @metered("feature:a")
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    @metered("feature:a")
    async def boom(request: Request) -> Response:
        return JSONResponse({"ok": False}, status_code=500)

    return Starlette(
        routes=[Route("/ok", ok), Route("/boom", boom)],
        middleware=[
            Middleware(
                UsageMiddleware,
                provider=provider,
                customer=customer_from_header("x-customer"),
                **options,
            )
        ],
    )


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
        headers={"x-customer": ACME},
    )


async def test_local_ledger_checks_and_units_per_feature(otel: OTel, tmp_path: Path) -> None:
    """Allowed and refused checks, units charged and released are counted per feature."""
    async with LocalLedger(tmp_path / "ledger.db", pricing=PRICING) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        async with client(make_app(ledger)) as c:
            statuses = [(await c.get(path)).status_code for path in ("/ok", "/boom", "/ok")]
            statuses.append((await c.get("/ok")).status_code)  # limit 2 reached
    assert statuses == [200, 500, 200, 402]
    assert otel.value("usage_middleware.checks", feature="feature:a", outcome="allowed") == 3
    assert otel.value("usage_middleware.checks", feature="feature:a", outcome="refused") == 1
    assert otel.value("usage_middleware.check.duration", feature="feature:a") == 4
    assert otel.value("usage_middleware.units.charged", feature="feature:a") == 2
    assert otel.value("usage_middleware.units.released", feature="feature:a") == 1
    assert not otel.spans()  # a local ledger makes no remote call


@pytest.mark.parametrize(
    ("policy", "status", "outcome"),
    [("open", 200, "failed_open"), ("closed", 503, "failed_closed")],
)
async def test_raising_provider_counts_failed_checks(
    otel: OTel, provider: RecordingProvider, policy: str, status: int, outcome: str
) -> None:
    """A reserve that raises counts as failed_open or failed_closed, per on_provider_error."""
    provider.fail_reserve = True
    async with client(make_app(provider, on_provider_error=policy)) as c:
        assert (await c.get("/ok")).status_code == status
    assert otel.value("usage_middleware.checks", feature="feature:a", outcome=outcome) == 1
    assert otel.value("usage_middleware.checks", outcome="allowed") == 0
    assert otel.value("usage_middleware.units.charged") == 0


async def test_answer_with_error_counts_failed_closed(
    otel: OTel, provider: RecordingProvider
) -> None:
    """A check the provider answers ok=False with an error is a failed_closed check (503)."""
    provider.failed_closed = True
    async with client(make_app(provider)) as c:
        assert (await c.get("/ok")).status_code == 503
    assert otel.value("usage_middleware.checks", feature="feature:a", outcome="failed_closed") == 1


async def test_remote_provider_spans_and_delivery(otel: OTel) -> None:
    """A Tier check and delivery make a 'fetch tier' and a 'send tier' CLIENT span, a
    delivery attempt and its latency, and the outbox-depth gauge names the provider."""
    fake = FakeTier()
    fake.add_org(ACME, {"feature:a": 10})
    tier = TierProvider(FAKE_URL, client=fake.client(), outbox=None)
    await tier.open()
    try:
        async with client(make_app(tier)) as c:
            assert (await c.get("/ok")).status_code == 200
        assert await tier.flush(5.0)
        await eventually(lambda: fake.reports, within=5.0)
        assert otel.value("usage_middleware.outbox.depth", provider="tier") == 0
        points = [p for p in otel.points() if p.name == "usage_middleware.outbox.depth"]
        assert points and all(p.attributes == {"usage_middleware.provider": "tier"} for p in points)
    finally:
        await tier.aclose()
    spans = {s.name: s for s in otel.spans()}
    assert set(spans) == {"fetch tier", "send tier"}
    fetch, send = spans["fetch tier"], spans["send tier"]
    assert fetch.kind.name == "CLIENT" and send.kind.name == "CLIENT"
    assert fetch.attributes is not None and send.attributes is not None
    assert fetch.attributes["usage_middleware.provider"] == "tier"
    assert fetch.attributes["usage_middleware.feature"] == "feature:a"
    assert fetch.attributes["usage_middleware.outcome"] == "ok"
    assert send.attributes["usage_middleware.outcome"] == "ok"
    assert send.attributes["usage_middleware.events"] == 1
    assert otel.value("usage_middleware.delivery.attempts", provider="tier") == 1
    assert otel.value("usage_middleware.delivery.failures") == 0
    assert otel.value("usage_middleware.delivery.duration", provider="tier") == 1
    assert otel.value("usage_middleware.units.charged", feature="feature:a") == 1


async def test_remote_provider_down_fails_open_and_spans_the_error(otel: OTel) -> None:
    """A Tier that cannot be reached: the check fails open (counted), the fetch span says
    error with its error.type."""
    fake = FakeTier()
    fake.add_org(ACME, {"feature:a": 10})
    fake.down = True
    tier = TierProvider(FAKE_URL, client=fake.client(), outbox=None)
    await tier.open()
    try:
        async with client(make_app(tier)) as c:
            assert (await c.get("/ok")).status_code == 200
    finally:
        await tier.aclose()
    assert otel.value("usage_middleware.checks", feature="feature:a", outcome="failed_open") == 1
    fetch = [s for s in otel.spans() if s.name == "fetch tier"]
    assert fetch and fetch[0].attributes is not None
    assert fetch[0].attributes["usage_middleware.outcome"] == "error"
    assert fetch[0].attributes["error.type"]
    assert fetch[0].status.status_code.name == "ERROR"


async def test_rejected_event_counts_failure_and_dead_letter(otel: OTel) -> None:
    """A delivery Tier rejects for good is a failed attempt (with error.type) and one dead
    letter for the provider."""
    fake = FakeTier()
    fake.add_org(ACME, {"feature:a": 10})
    fake.inject("/v1/report", (400, "invalid_request", "no"))
    tier = TierProvider(FAKE_URL, client=fake.client(), outbox=None)
    await tier.open()
    try:
        async with client(make_app(tier)) as c:
            assert (await c.get("/ok")).status_code == 200
        await eventually(
            lambda: otel.value("usage_middleware.dead_letters", provider="tier") == 1, within=5.0
        )
    finally:
        await tier.aclose()
    assert otel.value("usage_middleware.delivery.attempts", provider="tier") == 1
    failures = [p for p in otel.points() if p.name == "usage_middleware.delivery.failures"]
    assert len(failures) == 1 and failures[0].value == 1
    assert failures[0].attributes["error.type"].endswith("PermanentProviderError")


async def test_disabled_records_nothing(otel: OTel, provider: RecordingProvider) -> None:
    """configure(enabled=False) turns every instrument into a no-op."""
    telemetry.configure(enabled=False)
    assert not telemetry.enabled()
    async with client(make_app(provider)) as c:
        assert (await c.get("/ok")).status_code == 200
    assert otel.points() == []


async def test_outbox_gauges_report_depth_and_dead_letters(otel: OTel, tmp_path: Path) -> None:
    """The outbox gauges give a Reporter's undelivered rows and its waiting dead letters
    (ReporterStats.dead_letters) per provider, and stop once the Reporter is closed."""
    evs = events(3)
    provider = FakeProvider(bad_keys=[evs[0].idempotency_key])
    provider.down = True  # nothing is delivered: the rows stay in the outbox
    reporter = Reporter(
        provider,
        path=tmp_path / "outbox.db",
        stats_interval=0.02,
        poll_interval=0.02,
        max_delay=0.005,
        retry_cooldown=0.02,
        wait_initial=0.001,
        wait_max=0.005,
        wait_jitter=0.0,
    )
    await reporter.open()
    try:
        for e in evs:
            reporter.enqueue(e)
        await reporter.flush()
        await eventually(
            lambda: otel.value("usage_middleware.outbox.depth", provider="fake") == 3, within=5.0
        )
        provider.down = False
        await eventually(lambda: reporter.stats().dead_letters == 1, within=5.0)
        await eventually(
            lambda: (
                otel.value("usage_middleware.outbox.dead_letters", provider="fake") == 1
                and otel.value("usage_middleware.outbox.depth", provider="fake") == 0
            ),
            within=5.0,
        )
        assert otel.value("usage_middleware.dead_letters", provider="fake") == 1
        assert otel.value("usage_middleware.delivery.failures", provider="fake") >= 1
    finally:
        await reporter.aclose()
    assert not [p for p in otel.points() if p.name.startswith("usage_middleware.outbox.")]


def test_check_outcome_never_builds_a_lazy_answer() -> None:
    """Reading a reservation's outcome (Reservation.failed) does not build the lazy Answer
    a ledger serving from memory defers (that would cost every allowed request)."""
    built: list[Reservation] = []

    def make_answer(reservation: Reservation) -> Any:
        built.append(reservation)
        raise AssertionError("the lazy answer was built")

    reservation = Reservation.lazy(ACME, "feature:a", 1, True, make_answer)
    assert reservation.failed is False
    assert built == []
