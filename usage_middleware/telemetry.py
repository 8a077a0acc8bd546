"""OpenTelemetry metrics and spans (the optional ``[otel]`` extra: ``opentelemetry-api``).

The instrumented code calls the small functions below; each is a cheap no-op when the
``opentelemetry`` package is missing or :func:`configure` turned telemetry off. With the
package but no SDK configured, the API's own no-op (proxy) providers receive the calls:
attribute dicts are built once per feature/provider, never per request.

Metrics (meter ``usage_middleware``):

============================================  =========  ==================================
name (unit)                                    kind       attributes
============================================  =========  ==================================
``usage_middleware.checks`` ({check})          counter    feature, outcome
``usage_middleware.check.duration`` (s)        histogram  feature, outcome
``usage_middleware.units.charged`` ({unit})    counter    feature
``usage_middleware.units.released`` ({unit})   counter    feature
``usage_middleware.delivery.attempts``         counter    provider
``usage_middleware.delivery.failures``         counter    provider, error.type
``usage_middleware.delivery.duration`` (s)     histogram  provider (error.type on failure)
``usage_middleware.dead_letters`` ({event})    counter    provider
``usage_middleware.outbox.depth`` ({event})    gauge      provider
``usage_middleware.outbox.dead_letters``       gauge      provider
============================================  =========  ==================================

Check outcomes: ``allowed``, ``refused``, ``failed_open``, ``failed_closed``. Spans (tracer
``usage_middleware``, kind CLIENT): ``fetch <provider>`` around each remote entitlement
check and ``send <provider>`` around each delivery call, with the provider, the outcome
(``ok``/``error``) and ``error.type``. Customer ids are never attributes (unbounded
cardinality, and personal data).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Protocol

from .errors import ConfigurationError

try:
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
except ImportError:  # the [otel] extra is not installed: everything below is a no-op
    _metrics = None  # type: ignore[assignment]
    _trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import TracerProvider

__all__ = [
    "ALLOWED",
    "FAILED_CLOSED",
    "FAILED_OPEN",
    "REFUSED",
    "available",
    "configure",
    "enabled",
]

#: Instrumentation scope (meter and tracer name).
SCOPE: Final = "usage_middleware"

# Attribute names (OpenTelemetry conventions: a namespace, then snake_case; error.type).
FEATURE: Final = "usage_middleware.feature"
PROVIDER: Final = "usage_middleware.provider"
OUTCOME: Final = "usage_middleware.outcome"
OPERATION: Final = "usage_middleware.operation"
EVENTS: Final = "usage_middleware.events"
ERROR_TYPE: Final = "error.type"

# Check outcomes.
ALLOWED: Final = "allowed"
REFUSED: Final = "refused"
FAILED_OPEN: Final = "failed_open"
FAILED_CLOSED: Final = "failed_closed"
_OUTCOMES: Final = (ALLOWED, REFUSED, FAILED_OPEN, FAILED_CLOSED)

Attrs = dict[str, str]


class _Stats(Protocol):
    @property
    def outbox_depth(self) -> int: ...

    @property
    def dead_letters(self) -> int: ...


class Outbox(Protocol):
    """What the outbox gauges read: a Reporter (``stats().outbox_depth``, ``.dead_letters``)."""

    def stats(self) -> _Stats: ...


#: The Reporters the outbox gauges report (weakly held) and their provider names, by id().
_outboxes: dict[int, tuple[weakref.ref[Outbox], str]] = {}


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _watched() -> list[tuple[_Stats, str]]:
    """Each watched Reporter's stats and provider name. The SDK calls the gauges' callbacks
    from its export thread: copy the dict in one C call, then dereference."""
    found = []
    for ref, provider in list(_outboxes.values()):
        reporter = ref()
        if reporter is not None:
            found.append((reporter.stats(), provider))
    return found


def _observe_depth(options: CallbackOptions) -> Iterable[Observation]:
    from opentelemetry.metrics import Observation

    return [Observation(s.outbox_depth, {PROVIDER: p}) for s, p in _watched()]


def _observe_dead(options: CallbackOptions) -> Iterable[Observation]:
    from opentelemetry.metrics import Observation

    return [Observation(s.dead_letters, {PROVIDER: p}) for s, p in _watched()]


class _Telemetry:
    """The instruments of one (meter, tracer) pair and the precomputed attributes."""

    def __init__(
        self, meter_provider: MeterProvider | None, tracer_provider: TracerProvider | None
    ) -> None:
        assert _metrics is not None and _trace is not None
        meter = _metrics.get_meter(SCOPE, meter_provider=meter_provider)
        self.tracer = _trace.get_tracer(SCOPE, tracer_provider=tracer_provider)
        self.checks = meter.create_counter(
            "usage_middleware.checks", "{check}", "Checks by feature and outcome."
        )
        self.check_duration = meter.create_histogram(
            "usage_middleware.check.duration", "s", "Time the provider took to reserve."
        )
        self.charged = meter.create_counter(
            "usage_middleware.units.charged", "{unit}", "Units committed (charged)."
        )
        self.released = meter.create_counter(
            "usage_middleware.units.released", "{unit}", "Units held, then given back."
        )
        self.attempts = meter.create_counter(
            "usage_middleware.delivery.attempts", "{attempt}", "Calls to a provider's report."
        )
        self.failures = meter.create_counter(
            "usage_middleware.delivery.failures", "{attempt}", "Report calls that raised."
        )
        self.delivery_duration = meter.create_histogram(
            "usage_middleware.delivery.duration", "s", "Time of one report call."
        )
        self.dead_letters = meter.create_counter(
            "usage_middleware.dead_letters", "{event}", "Events moved to dead letters."
        )
        meter.create_observable_gauge(
            "usage_middleware.outbox.depth",
            [_observe_depth],
            "{event}",
            "Undelivered events in the outbox, as of the Reporter's last refresh.",
        )
        meter.create_observable_gauge(
            "usage_middleware.outbox.dead_letters",
            [_observe_dead],
            "{event}",
            "Dead letters waiting for `outbox retry` or `purge`, as of the last refresh.",
        )
        self._by_feature: dict[str, tuple[Attrs, dict[str, Attrs]]] = {}
        self._by_provider: dict[str, Attrs] = {}

    def feature(self, feature: str) -> tuple[Attrs, dict[str, Attrs]]:
        attrs = self._by_feature.get(feature)
        if attrs is None:
            attrs = self._by_feature[feature] = (
                {FEATURE: feature},
                {o: {FEATURE: feature, OUTCOME: o} for o in _OUTCOMES},
            )
        return attrs

    def provider(self, provider: str) -> Attrs:
        attrs = self._by_provider.get(provider)
        if attrs is None:
            attrs = self._by_provider[provider] = {PROVIDER: provider}
        return attrs


_active: _Telemetry | None = None if _metrics is None else _Telemetry(None, None)


def configure(
    *,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    enabled: bool = True,
) -> None:
    """Record to these providers (``None``: the OpenTelemetry API's global ones, the default).

    ``enabled=False`` turns every instrument into a no-op. Call it at start-up (or per test
    with an SDK ``MeterProvider``/``TracerProvider`` and in-memory readers).

    Raises:
        ConfigurationError: a provider was given but ``opentelemetry-api`` is not installed.
    """
    global _active
    if not enabled:
        _active = None
        return
    if _metrics is None:
        if meter_provider is not None or tracer_provider is not None:
            raise ConfigurationError(
                "telemetry needs OpenTelemetry: install usage-middleware[otel]"
            )
        return
    _active = _Telemetry(meter_provider, tracer_provider)


def available() -> bool:
    """Whether the ``opentelemetry`` package (the ``[otel]`` extra) is installed."""
    return _metrics is not None


def enabled() -> bool:
    """Whether calls reach OpenTelemetry (the package is installed and not turned off)."""
    return _active is not None


# -- what the instrumented code calls ------------------------------------------------------


def checked(feature: str, outcome: str, started: float) -> None:
    """One check of ``feature`` ended with ``outcome``; ``started`` is its perf_counter()."""
    t = _active
    if t is not None:
        attrs = t.feature(feature)[1][outcome]
        t.checks.add(1, attrs)
        t.check_duration.record(time.perf_counter() - started, attrs)


def settled(feature: str, units: int, charged: bool) -> None:
    """``units`` of ``feature`` were committed (``charged``) or released."""
    t = _active
    if t is not None:
        (t.charged if charged else t.released).add(units, t.feature(feature)[0])


def dead_lettered(provider: str, events: int = 1) -> None:
    """``events`` of ``provider`` moved to dead letters."""
    t = _active
    if t is not None:
        t.dead_letters.add(events, t.provider(provider))


def watch_outbox(reporter: Outbox, provider: str) -> None:
    """Report ``reporter.stats()`` in the outbox gauges while it lives (weakly held)."""
    key = id(reporter)
    _outboxes[key] = (weakref.ref(reporter, lambda _: _outboxes.pop(key, None)), provider)


def unwatch_outbox(reporter: Outbox) -> None:
    """Stop reporting ``reporter`` in the outbox gauges."""
    _outboxes.pop(id(reporter), None)


@contextmanager
def delivery_attempt(provider: str) -> Iterator[None]:
    """Count and time one delivery call to ``provider`` (a failure: what it raised)."""
    t = _active
    if t is None:
        yield
        return
    attrs = t.provider(provider)
    started = time.perf_counter()
    t.attempts.add(1, attrs)
    try:
        yield
    except BaseException as exc:
        failed = {PROVIDER: provider, ERROR_TYPE: _error_type(exc)}
        t.failures.add(1, failed)
        t.delivery_duration.record(time.perf_counter() - started, failed)
        raise
    t.delivery_duration.record(time.perf_counter() - started, attrs)


@contextmanager
def provider_call(provider: str, operation: str, **attributes: Any) -> Iterator[None]:
    """A CLIENT span ``"<operation> <provider>"`` around one remote call (fetch, send).

    ``attributes`` (short names, e.g. ``feature="api:calls"``) are added under the
    ``usage_middleware.`` namespace; never pass a customer id.
    """
    t = _active
    if t is None:
        yield
        return
    assert _trace is not None
    attrs: dict[str, Any] = {PROVIDER: provider, OPERATION: operation}
    for key, value in attributes.items():
        attrs[f"{SCOPE}.{key}"] = value
    with t.tracer.start_as_current_span(
        f"{operation} {provider}", kind=_trace.SpanKind.CLIENT, attributes=attrs
    ) as span:
        try:
            yield
        except BaseException as exc:
            span.set_attribute(OUTCOME, "error")
            span.set_attribute(ERROR_TYPE, _error_type(exc))
            raise
        span.set_attribute(OUTCOME, "ok")
