"""``TierProvider``: entitlement checks and usage reports against Tier's sidecar API.

The wire contract is /work/shared/reference/tier.md (taken from ``tierrun/tier`` 0.12.0 and
``tierrun/node-sdk`` 5.10.0); section numbers below (§N) refer to it.

Endpoints used: ``GET /v1/limits`` (checks, §2), ``POST /v1/report`` (usage, §2), and for the
admin methods ``GET /v1/whois``, ``GET /v1/phase``, ``POST /v1/subscribe``,
``POST /v1/checkout``, ``GET /v1/pull``, ``POST /v1/push`` (§2).
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from asgiref.typing import HTTPScope

from ..errors import (
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
)
from ..models import UNLIMITED, UsageEvent
from ..provider import FailurePolicy
from ._http import charge_answer_error, loads, send, status_error, status_kind
from .remote import Entitlement, RemoteProvider, ReporterLike

__all__ = ["SIDECAR_URL", "TIER_CLOUD_URL", "FeatureLimit", "TierProvider"]

logger = logging.getLogger("usage_middleware.tier")

#: Tier Cloud, the base URL when only ``TIER_API_KEY`` is set (node-sdk 5.6, §4).
TIER_CLOUD_URL = "https://api.tier.run"
#: The default address of a local ``tier serve`` sidecar (Go client ``defaultBaseURL``, §0).
SIDECAR_URL = "http://127.0.0.1:8080"

_ORG_INFO_FIELDS = frozenset(
    {
        "email",
        "name",
        "description",
        "phone",
        "created",
        "metadata",
        "payment_method",
        "invoice_settings",
    }
)
_TAX_FIELDS = frozenset({"automatic", "collect_id"})


@dataclass(frozen=True, slots=True)
class FeatureLimit:
    """One line of ``GET /v1/limits`` (Tier's ``Usage``, §2), as on the wire.

    Tier's wire type, returned by :meth:`TierProvider.limits`; a check turns the matching
    line into an :class:`~usage_middleware.providers.remote.Entitlement` (what the cache
    keeps), never into an answer directly.

    Attributes:
        feature: the feature name as the sidecar sent it: ``feature:x``, or the versioned
            ``feature:x@plan:free@1`` from sidecars older than tierrun/tier#123.
        used: units used this billing period (for a licensed feature: the seat quantity).
        limit: the plan's limit in units this period; :data:`~usage_middleware.UNLIMITED`
            (9223372036854775807, Tier's ``Inf``) for no limit.
    """

    feature: str
    used: int
    limit: int

    @property
    def name(self) -> str:
        """The unversioned feature name (``feature:x``)."""
        return self.feature.partition("@")[0]

    @property
    def unlimited(self) -> bool:
        return self.limit >= UNLIMITED

    @property
    def remaining(self) -> int:
        """Units still available this period: ``UNLIMITED``, or ``max(0, limit - used)``."""
        return UNLIMITED if self.unlimited else max(0, self.limit - self.used)


def org_problem(org: object) -> str | None:
    """Why ``org`` cannot be a Tier org id, or ``None`` when it can.

    Tier's only rule is the ``org:`` prefix (§3); a bare ``org:`` is refused too, as the JS
    SDK's ``isOrgName`` does, because the sidecar would only answer ``org_not_found``.
    """
    if not isinstance(org, str) or not org.startswith("org:") or org == "org:":
        return f'Tier org ids must start with "org:" and name an org (e.g. "org:acme"), got {org!r}'
    return None


def _check_org(org: object) -> str:
    problem = org_problem(org)
    if problem is not None:
        raise ValueError(problem)
    assert isinstance(org, str)
    return org


def rfc3339(at: datetime) -> str:
    """An aware datetime as RFC 3339 in UTC with ``Z`` (Go's ``time.Time`` JSON form, §0).

    Raises ``ValueError`` for a naive datetime (the sidecar would answer 500, §0).
    """
    if at.utcoffset() is None:
        raise ValueError(f"Tier timestamps must be aware datetimes, got {at!r}")
    at = at.astimezone(UTC)
    spec = "seconds" if at.microsecond == 0 else "microseconds"
    return at.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def report_body(event: UsageEvent) -> dict[str, Any]:
    """The ``ReportRequest`` for one event: exactly ``{org, feature, n, at, clobber}`` (§2).

    ``n`` is the event's whole units (a JSON integer), ``at`` its aware time as RFC 3339
    with ``Z``, ``clobber`` a JSON boolean. Nothing else is sent: the sidecar decodes the
    body strictly and answers 400 ``unknown field`` to any extra key (§0).
    """
    return {
        "org": event.customer,
        "feature": event.feature,
        "n": int(event.units),
        "at": rfc3339(event.at),
        "clobber": bool(event.clobber),
    }


def parse_limits(data: Any) -> list[FeatureLimit]:
    """The ``usage`` lines of a ``/v1/limits`` body; ``usage: null`` is no lines (§2, §6).

    Raises ``RetryableProviderError`` (code ``invalid_response``) for a body of another shape.
    """
    if not isinstance(data, dict) or "usage" not in data:
        raise _bad_response("/v1/limits", "no 'usage' in the body")
    usage = data["usage"]
    if usage is None:
        return []
    if not isinstance(usage, list):
        raise _bad_response("/v1/limits", "'usage' is not a list")
    lines = []
    for item in usage:
        if not isinstance(item, dict):
            raise _bad_response("/v1/limits", "a usage line is not an object")
        feature, used, limit = item.get("feature"), item.get("used", 0), item.get("limit", 0)
        if not isinstance(feature, str) or not _is_count(used) or not _is_count(limit):
            raise _bad_response("/v1/limits", f"malformed usage line for {feature!r}")
        lines.append(FeatureLimit(feature, used, limit))
    return lines


def match_feature(lines: Iterable[FeatureLimit], feature: str) -> FeatureLimit | None:
    """The first line for ``feature``: exactly ``feature:x``, or a versioned ``feature:x@...``.

    As the JS SDK's ``lookupLimit`` (§4), which tolerates ``feature:x@plan:...`` from older
    sidecars; feature names cannot contain ``@``, so ``feature:x@`` only ever prefixes a
    version of ``feature:x``.
    """
    prefix = feature + "@"
    for line in lines:
        if line.feature == feature or line.feature.startswith(prefix):
            return line
    return None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_count(v: object) -> bool:
    """A Tier ``used``/``limit``: a JSON integer from 0 to Go's MaxInt64 (Tier's ``Inf``)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= UNLIMITED


def _bad_response(path: str, why: str, status: int | None = 200) -> RetryableProviderError:
    return RetryableProviderError(
        f"Tier {path} answered with an unexpected body: {why}",
        status=status,
        code="invalid_response",
    )


class TierProvider(RemoteProvider):
    """Billing through Tier (tier.run): ``can()`` from ``/v1/limits``, charges to ``/v1/report``.

    Configure it for a local sidecar (``tier serve``, default address
    ``http://127.0.0.1:8080``) or for Tier Cloud with an API key::

        provider = TierProvider(base_url="http://127.0.0.1:8080")
        provider = TierProvider(api_key=os.environ["TIER_API_KEY"])   # https://api.tier.run
        provider = TierProvider.from_env()      # TIER_BASE_URL and/or TIER_API_KEY

    Checks: one ``GET /v1/limits?org=`` per (cold) check, cached and single-flighted by
    :class:`RemoteProvider`. A request of ``units`` is allowed when
    ``used + units <= limit`` (Tier's SDK ``used < limit`` is the ``units=1`` case); a limit
    of 9223372036854775807 is unlimited. Denied (a 402), as Tier's ``0 < 0``: a feature the
    org's plan lacks, an org without a subscription (``usage: null``), and an org Tier does
    not know (``org_not_found``; Tier's SDKs fail open there, which would serve an unknown
    customer for free). Customer ids must be Tier org ids (``org:<name>``): any other id is
    denied with that reason, without a call.

    Failure policy: open by default, as Tier's SDKs (a failed check serves the request with
    ``Answer.err`` set, and the charge is still queued); ``failure_policy="closed"`` answers
    503 instead.

    Charges: each committed charge goes through the durable outbox; the charges of one org
    and feature queued within a flush window are delivered summed (``aggregates``) as one
    ``POST /v1/report`` of exactly ``{org, feature, n, at, clobber}`` (``max_batch = 1``;
    Tier has no batch endpoint), ``n`` their units, ``at`` the latest of their commit
    times (all within one minute), so a report delivered late still lands at the time of
    use. A clobber is never summed.

    Delivery is at-least-once, and Tier cannot deduplicate (§5): the sidecar sends Stripe a
    fresh random idempotency key on every ``/v1/report`` and accepts no key from us. A
    report whose request reached the sidecar but whose answer was lost (read timeout,
    connection reset after sending, the process killed between Tier's 200 and the outbox
    deleting the row) is sent again and **counted twice** in Stripe. Failures before the
    request left (connection refused, connect or pool timeout) are never counted twice.
    Such a lost answer is raised as an *ambiguous* ``RetryableProviderError``: the outbox
    resends the report at most once more, after a back-off, then dead-letters it with
    code ``ambiguous`` (so at most twice). ``report_timeout`` (default 10 s; reports run
    in the background) keeps timeouts rare.

    Errors (§1) are classified by whether the event is at fault. Permanent (dead-lettered
    with Tier's status/code/message): 400 ``org_not_found``, ``feature_not_found``,
    ``invalid_request`` (``feature not reportable`` included), ``TERR1020`` and the other
    400s, and 500 ``TERR1050``. Retryable (kept in the outbox until they go through): 401
    (the sidecar's Stripe key), 3xx and 404 (a wrong base URL), 408, 425, 429 and 5xx.
    Answers are capped at ``max_body`` bytes and ``Retry-After`` at ``max_retry_after``
    seconds (see :mod:`usage_middleware.providers._http`). Tier's 500
    ``internal_error`` also covers two failures no retry fixes, so on that answer to a
    report the provider asks ``/v1/limits`` and ``/v1/phase`` and makes it permanent when
    the org has no active subscription, or when ``at`` is before the org's current billing
    period (a charge delivered after its period closed: Stripe refuses it).

    Args:
        base_url: the sidecar or Tier Cloud URL (``http://`` or ``https://``); default Tier
            Cloud when ``api_key`` is set.
        api_key: Tier Cloud API key, sent as HTTP Basic auth (key as user name, empty
            password) and only when set; never logged.
        clock: a Stripe test clock id, sent as ``Tier-Clock`` on every request (§0).
        report_timeout: seconds to wait for one ``/v1/report`` answer.
        max_connections: connection pool size of the client :meth:`make_client` creates.
        failure_policy: ``"open"`` (default, as Tier's SDKs) or ``"closed"``.
        **remote_kwargs: the rest of :class:`RemoteProvider`'s options (``client``,
            ``outbox``, ``cache_ttl``, ``deny_ttl``, ``timeout``, ...).

    Raises:
        ConfigurationError: neither ``base_url`` nor ``api_key``, or a malformed URL.
    """

    name = "tier"
    max_batch = 1
    #: Queued charges of one customer and feature go out summed, one report per window.
    aggregates = True
    #: No idempotency key reaches the provider: a resent charge may count twice.
    deduplicates = False
    supports_clobber = True
    #: A delivered report shows in ``/v1/limits`` at once: the sidecar has no cache (§2:
    #: each call reads Stripe's upcoming invoice, and legacy usage records are written
    #: synchronously). So a read that starts after a report returned counts it, and local
    #: accounting subtracts only charges still queued or delivered during the read.
    balance_lag = 0.0

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        clock: str | None = None,
        report_timeout: float = 10.0,
        max_connections: int = 100,
        failure_policy: FailurePolicy = "open",
        **remote_kwargs: Any,
    ) -> None:
        api_key = api_key or None
        if not base_url:
            if api_key is None:
                raise ConfigurationError(
                    "TierProvider needs a base URL or an API key: pass base_url= (a local "
                    f"sidecar from `tier serve` listens on {SIDECAR_URL}) or api_key= for "
                    f"Tier Cloud ({TIER_CLOUD_URL})"
                )
            base_url = TIER_CLOUD_URL
        self._base_url = _check_base_url(base_url)
        if report_timeout <= 0:
            raise ConfigurationError(f"report_timeout must be > 0 seconds, got {report_timeout}")
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be >= 1, got {max_connections}")
        super().__init__(failure_policy=failure_policy, **remote_kwargs)
        #: Seconds one ``/v1/report`` may take (the Reporter's ``call_timeout`` should
        #: not be shorter: a report cut off after it was sent may be counted twice).
        self.report_timeout = float(report_timeout)
        self._max_connections = max_connections
        headers: dict[str, str] = {}
        if api_key is not None:
            token = base64.b64encode(f"{api_key}:".encode()).decode("ascii")
            headers["authorization"] = f"Basic {token}"
        if clock:
            headers["tier-clock"] = clock
        self._headers = headers
        self._has_key = api_key is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> TierProvider:
        """Build a provider from ``TIER_BASE_URL`` and ``TIER_API_KEY`` (§4).

        ``TIER_API_KEY`` alone means Tier Cloud (https://api.tier.run); ``TIER_BASE_URL``
        alone a sidecar without auth. Empty values count as unset. ``kwargs`` go to the
        constructor.

        Raises:
            ConfigurationError: neither variable is set.
        """
        env = os.environ if environ is None else environ
        base_url = env.get("TIER_BASE_URL") or None
        api_key = env.get("TIER_API_KEY") or None
        if base_url is None and api_key is None:
            raise ConfigurationError(
                "set TIER_BASE_URL (a local sidecar from `tier serve`, usually "
                f"{SIDECAR_URL}) or TIER_API_KEY (Tier Cloud, {TIER_CLOUD_URL}) to use "
                "TierProvider.from_env()"
            )
        return cls(base_url, api_key=api_key, **kwargs)

    @property
    def base_url(self) -> str:
        return self._base_url

    def __repr__(self) -> str:
        key = ", api_key=***" if self._has_key else ""
        return f"TierProvider(base_url={self._base_url!r}{key})"

    def make_client(self) -> httpx.AsyncClient:
        """The shared client, created by :meth:`open` inside the running loop.

        Connect and pool timeouts are ``timeout`` (a request that never left cannot be
        counted twice); reads may take ``max(timeout, report_timeout)`` seconds (checks are
        cut off at ``timeout`` by :class:`RemoteProvider` anyway). At most
        ``max_connections`` connections, 20 kept alive.
        """
        return httpx.AsyncClient(
            timeout=httpx.Timeout(max(self.timeout, self.report_timeout), connect=self.timeout),
            limits=httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=min(20, self._max_connections),
            ),
            headers={"user-agent": _user_agent()},
        )

    def make_reporter(self) -> ReporterLike:
        """The durable outbox's Reporter, never cutting a report off before ``report_timeout``.

        A report cut off after it was sent may be counted twice (class doc), so the
        Reporter's per-call timeout is ``report_timeout`` plus 5 s, and at least its 30 s.
        """
        from ..delivery import Reporter

        assert self.outbox is not None
        return Reporter(
            self,
            path=self.outbox,
            call_timeout=max(30.0, self.report_timeout + 5.0),
            drain_timeout=self.drain_timeout,
        )

    # -- the provider hooks ---------------------------------------------------------------

    async def fetch(
        self, customer: str, feature: str, *, scope: HTTPScope | None = None
    ) -> Entitlement:
        """One entitlement check: ``GET /v1/limits?org=<customer>`` (§2, matching as §4).

        Returns the matching line's ``limit``/``used`` and ``remaining = limit - used``
        (``UNLIMITED`` stays unlimited). A feature the org does not have, and
        ``usage: null``, give limit 0, used 0 (denied, reason ``"feature not in plan"``).
        An org Tier does not know (400 ``org_not_found``) is denied too (reason
        ``"org not found in Tier"``), where Tier's SDKs fail open. A customer id that is
        not an org id is denied without a call.

        Raises:
            RetryableProviderError / PermanentProviderError: the call failed (see class doc).
        """
        problem = org_problem(customer)
        if problem is not None:
            return Entitlement(limit=0, used=0, remaining=0, reason=problem)
        try:
            lines = await self._limits(customer)
        except PermanentProviderError as exc:
            if exc.code != "org_not_found":
                raise
            # An org Tier has never seen has no plan: deny (Tier's SDKs fail open here).
            return Entitlement(limit=0, used=0, remaining=0, reason="org not found in Tier")
        line = match_feature(lines, feature)
        if line is None:
            return Entitlement(limit=0, used=0, remaining=0, reason="feature not in plan")
        return Entitlement(limit=line.limit, used=line.used, remaining=line.remaining)

    async def send(self, events: Sequence[UsageEvent]) -> None:
        """Deliver one usage event: ``POST /v1/report`` with :func:`report_body` (§2).

        Success is a 2xx whose body is a JSON object (Tier answers ``{}`` as
        ``text/plain``) or too large to read; a 2xx with any other body (an HTML page: the
        base URL is not the sidecar) is a retryable failure, logged. At most one event per
        call (``max_batch``): a failed second report would make a retry of the first count
        twice. Tier cannot tell a duplicate: every delivered event counts (``None``).

        Raises:
            ValueError: more than one event.
            PermanentProviderError: Tier refused the event (400 ``org_not_found``,
                ``feature_not_found``, ``invalid_request``...; ``TERR1050``), or the customer
                is not an org id (not sent).
            RetryableProviderError: network error, timeout, 401, 408, 429, 5xx, a 2xx that
                is not a JSON object.
        """
        if not events:
            return
        if len(events) > self.max_batch:
            raise ValueError(f"TierProvider.report takes one event per call, got {len(events)}")
        event = events[0]
        problem = org_problem(event.customer)
        if problem is not None:
            raise PermanentProviderError(problem, code="invalid_request")
        body = report_body(event)
        try:
            await self._call("POST", "/v1/report", body=body, request_timeout=self.report_timeout)
        except RetryableProviderError as exc:
            if exc.status == 500 and exc.code == "internal_error":
                raise await self._diagnose_500(event, exc) from exc.original_error
            raise
        logger.debug(
            "tier: reported %d of %s for %s (clobber=%s)",
            event.units,
            event.feature,
            event.customer,
            event.clobber,
        )

    async def _diagnose_500(self, event: UsageEvent, err: RetryableProviderError) -> ProviderError:
        """Tell a permanent 500 on ``/v1/report`` from a passing Stripe failure.

        Tier answers 500 ``internal_error`` both for Stripe trouble (worth retrying) and
        for two failures no retry can fix (§1, §2): the org has no active subscription,
        and a usage time before the org's current billing period. Only on such a 500, ask
        ``/v1/limits`` (``usage: null`` = no subscription) and then ``/v1/phase``
        (``current.effective`` = start of the billing period); any doubt keeps ``err``.
        """
        try:
            if not await self._limits(event.customer):
                return PermanentProviderError(
                    f"{err.message}: {event.customer} has no active Tier subscription "
                    "(/v1/limits answers usage: null), so Tier cannot record usage",
                    status=err.status,
                    code=err.code,
                    original_error=err,
                )
            phase = await self._get_object("/v1/phase", {"org": event.customer})
        except ProviderError:
            return err
        current = phase.get("current")
        start = current.get("effective") if isinstance(current, dict) else None
        try:
            period_start = datetime.fromisoformat(start) if isinstance(start, str) else None
        except ValueError:
            period_start = None
        if period_start is not None and period_start.utcoffset() is not None:
            if event.at < period_start:
                return PermanentProviderError(
                    f"{err.message}: usage at {rfc3339(event.at)} is before the current "
                    f"billing period of {event.customer} (from {start}); Stripe refuses it",
                    status=err.status,
                    code=err.code,
                    original_error=err,
                )
        return err

    # -- admin methods (thin, mirroring Tier's SDK) ----------------------------------------

    async def limits(self, org: str) -> list[FeatureLimit]:
        """Every feature's usage and limit for ``org``: ``GET /v1/limits?org=`` (§2).

        Returns the lines in the sidecar's (random) order; ``usage: null`` gives ``[]``.

        Raises:
            ValueError: ``org`` is not an org id (nothing sent).
            ProviderError: as the class doc; ``org_not_found`` for an unknown org.
        """
        return await self._limits(_check_org(org))

    async def whois(self, org: str, include_info: bool = False) -> dict[str, Any]:
        """The org's Stripe customer: ``GET /v1/whois?org=[&include=info]`` (§2).

        Returns ``{"org", "stripe_id"}``, plus with ``include_info`` the org's info
        (``email``, ``name``, ``description``, ``phone``, ``created``, ``metadata``,
        ``payment_method``, ``invoice_settings``).

        Raises:
            ValueError: bad org id. ProviderError: as the class doc (``org_not_found``).
        """
        params = {"org": _check_org(org)}
        if include_info:
            params["include"] = "info"
        return await self._get_object("/v1/whois", params)

    async def phase(self, org: str) -> dict[str, Any]:
        """The org's current phase: ``GET /v1/phase?org=`` (§2).

        Returns Tier's ``PhaseResponse`` (``effective``, ``end``, ``features``, ``plans``,
        ``fragments``, ``trial``, ``tax``, ``current``...; zero values omitted). Use
        :meth:`limits` or ``can()`` for entitlements, not this (§2).

        Raises:
            ValueError: bad org id.
            PermanentProviderError: 404 ``not_found`` when the org has no current phase,
                400 ``org_not_found``. RetryableProviderError: as the class doc.
        """
        return await self._get_object("/v1/phase", {"org": _check_org(org)})

    async def subscribe(
        self,
        org: str,
        *plans_or_features: str,
        info: Mapping[str, Any] | None = None,
        effective: datetime | None = None,
        trial_days: int | None = None,
        payment_method_id: str | None = None,
        tax: Mapping[str, bool] | None = None,
    ) -> None:
        """Subscribe ``org`` (and/or update its info): ``POST /v1/subscribe`` (§2).

        Sends a ``ScheduleRequest`` with one phase of ``plans_or_features`` (plan refs
        ``plan:pro@1`` or versioned features ``feature:x@plan:pro@1``), effective at
        ``effective`` (aware; default now). ``trial_days`` (> 0) prepends a trial phase and
        starts the paid phase that many days later, as the JS SDK does. With no plans and
        no features only ``info`` is applied (Tier creates or updates the customer).

        Args:
            info: org info with Tier's ``OrgInfo`` keys only (``email``, ``name``,
                ``description``, ``phone``, ``created``, ``metadata``, ``payment_method``,
                ``invoice_settings``).
            payment_method_id: a Stripe payment method id.
            tax: ``{"automatic": bool, "collect_id": bool}``.

        Raises:
            ValueError: bad org id, unknown info/tax keys, bad ``trial_days``, naive times.
            PermanentProviderError: ``TERR1020`` (unknown plan or feature),
                ``invalid_request``, ``invalid_email``, ``invalid_metadata``,
                ``invalid_payment_method``. RetryableProviderError: as the class doc.
        """
        body: dict[str, Any] = {"org": _check_org(org)}
        features = [str(f) for f in plans_or_features]
        phases: list[dict[str, Any]] = []
        if features:
            phase: dict[str, Any] = {"features": features}
            if effective is not None:
                phase["effective"] = rfc3339(effective)
            phases.append(phase)
        if trial_days is not None:
            if isinstance(trial_days, bool) or not isinstance(trial_days, int) or trial_days <= 0:
                raise ValueError(f"trial_days must be an int > 0, got {trial_days!r}")
            if not phases:
                raise ValueError("trial_days needs plans or features to subscribe to")
            start = effective if effective is not None else datetime.now(UTC)
            phases[0]["effective"] = rfc3339(start + timedelta(days=trial_days))
            trial: dict[str, Any] = {"trial": True, "features": features}
            if effective is not None:
                trial["effective"] = rfc3339(effective)
            phases.insert(0, trial)
        if phases:
            body["phases"] = phases
        if info is not None:
            body["info"] = _org_info(info)
        if payment_method_id:
            body["payment_method_id"] = payment_method_id
        if tax is not None:
            body["tax"] = _tax(tax)
        await self._call("POST", "/v1/subscribe", body=body)

    async def cancel(self, org: str) -> None:
        """Cancel ``org``'s subscription: ``POST /v1/subscribe`` with ``phases: [{}]`` (§2).

        Raises:
            ValueError: bad org id. ProviderError: as the class doc.
        """
        await self._call("POST", "/v1/subscribe", body={"org": _check_org(org), "phases": [{}]})

    async def checkout(
        self,
        org: str,
        success_url: str,
        *,
        features: Sequence[str] = (),
        cancel_url: str | None = None,
        trial_days: int | None = None,
        require_billing_address: bool = False,
        tax: Mapping[str, bool] | None = None,
    ) -> str:
        """A Stripe Checkout link for ``org``: ``POST /v1/checkout`` (§2).

        With ``features`` (plans or versioned features) the link subscribes the org, with a
        ``trial_days`` trial; without, it only collects a payment method.

        Returns:
            the checkout URL (``https://checkout.stripe.com/...``).

        Raises:
            ValueError: bad org id, bad ``trial_days``, or ``trial_days`` without features.
            PermanentProviderError: ``TERR1020`` and other 400s.
            RetryableProviderError: as the class doc.
        """
        if isinstance(features, str):
            features = [features]
        body: dict[str, Any] = {"org": _check_org(org), "success_url": success_url}
        if features:
            body["features"] = list(features)
        if trial_days is not None:
            if isinstance(trial_days, bool) or not isinstance(trial_days, int) or trial_days < 0:
                raise ValueError(f"trial_days must be an int >= 0, got {trial_days!r}")
            if not features:
                raise ValueError("trial_days needs features to subscribe to")
            body["trial_days"] = trial_days
        if cancel_url:
            body["cancel_url"] = cancel_url
        if require_billing_address:
            body["require_billing_address"] = True
        if tax is not None:
            body["tax"] = _tax(tax)
        data = await self._call("POST", "/v1/checkout", body=body)
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            raise _bad_response("/v1/checkout", "no 'url' in the body")
        url: str = data["url"]
        return url

    async def pull(self) -> dict[str, Any]:
        """The pricing model Tier has in Stripe, as pricing.json: ``GET /v1/pull`` (§2).

        Raises:
            ProviderError: as the class doc.
        """
        return await self._get_object("/v1/pull", None)

    async def push(
        self, pricing: Mapping[str, Any] | bytes | str | os.PathLike[str]
    ) -> dict[str, Any]:
        """Push a pricing model to Stripe through Tier: ``POST /v1/push`` (§2).

        The same pricing.json the LocalLedger reads. ``pricing`` is the parsed model, its
        bytes (HuJSON allowed), or a path to the file (read without blocking the loop).

        Returns:
            ``{"results": [{"feature", "status": "ok"|"failed", "reason"}]}``; an existing
            feature is ``failed`` with ``feature already exists`` (Tier never changes a
            pushed price). Failed results are logged as warnings, not raised.

        Raises:
            ProviderError: as the class doc; a model the sidecar cannot decode is 500.
        """
        if isinstance(pricing, Mapping):
            content = json.dumps(pricing, separators=(",", ":")).encode()
        elif isinstance(pricing, bytes):
            content = pricing
        else:
            content = await anyio.Path(os.fspath(pricing)).read_bytes()
        # One push creates a Stripe product and price per feature: allow it time.
        data = await self._call(
            "POST", "/v1/push", content=content, request_timeout=max(60.0, self.report_timeout)
        )
        if not isinstance(data, dict):
            raise _bad_response("/v1/push", "not an object")
        for result in data.get("results") or []:
            if isinstance(result, dict) and result.get("status") != "ok":
                logger.warning(
                    "tier push: %s %s: %s",
                    result.get("feature"),
                    result.get("status"),
                    result.get("reason"),
                )
        return data

    # -- HTTP -----------------------------------------------------------------------------

    async def _limits(self, org: str) -> list[FeatureLimit]:
        return parse_limits(await self._call("GET", "/v1/limits", params={"org": org}))

    async def _get_object(self, path: str, params: Mapping[str, str] | None) -> dict[str, Any]:
        data = await self._call("GET", path, params=params)
        if not isinstance(data, dict):
            raise _bad_response(path, "not an object")
        return data

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        request_timeout: float | None = None,
    ) -> Any:
        """One request; the decoded JSON body (``None`` for an empty or non-JSON 2xx).

        Raises the typed errors of the class doc; never an httpx exception.
        """
        headers = dict(self._headers)
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
        if content is not None:
            headers["content-type"] = "application/json"
        report = path == "/v1/report"
        response = await send(
            self.http,
            method,
            self._base_url + path,
            what=f"Tier {path}",
            max_body=self.max_body,
            # Tier cannot deduplicate a report (§5): a lost answer is ambiguous.
            idempotent=method == "GET",
            keep_oversized_success=report or path == "/v1/subscribe",
            headers=headers,
            params=params,
            content=content,
            request_timeout=request_timeout,
        )
        if response.is_success:
            if report:  # §2: the literal `{}`; a page from something else is no delivery
                error = charge_answer_error(response, f"Tier {path}", self._base_url)
                if error is not None:
                    raise error
                return None
            try:
                return loads(response.content) if response.content else None
            except ValueError:
                if path == "/v1/subscribe":
                    return None  # only `{}` is expected; the status is what counts
                raise _bad_response(path, "not JSON") from None
        raise self._error(response, path)

    def _error(self, response: httpx.Response, path: str) -> ProviderError:
        """Tier's ``{status, code, message}`` (§1) as a typed :class:`ProviderError`."""
        status = response.status_code
        code: str | None = None
        try:
            data = loads(response.content)
        except ValueError:
            data = None
        if (
            isinstance(data, dict)
            and isinstance(data.get("code"), str)
            and isinstance(data.get("message"), str)
        ):
            code = data["code"]
            message = data["message"] or f"Tier answered {code}"
        else:
            snippet = response.text[:200].strip() if response.content else ""
            message = f"Tier {path} failed with HTTP {status}"
            if snippet:
                message += f": {snippet}"
        # The shared classification, but: TERR1050 (a 500: the org's Stripe customer
        # vanished) is permanent, a 404 from /v1/phase means "no current phase" (not a
        # wrong base URL), and a 401 is the sidecar's Stripe key, not the event's fault.
        kind = status_kind(status)
        retry: bool | None = None
        if kind == "retryable" and code == "TERR1050":
            retry = False
        elif kind == "not_found" and path == "/v1/phase":
            retry = False
        elif status == 401:
            retry = True
        return status_error(
            response,
            f"Tier {path}",
            self._base_url,
            message=message,
            code=code,
            cap=self.max_retry_after,
            retry=retry,
        )


def _user_agent() -> str:
    try:
        version = importlib.metadata.version("usage-middleware")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return f"usage-middleware/{version} (tier)"


def _check_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(
            f"Tier base URL must be an http:// or https:// URL such as {SIDECAR_URL}, got {url!r}"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"Tier base URL must have no query or fragment, got {url!r}")
    return url.rstrip("/")


def _org_info(info: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(info) - _ORG_INFO_FIELDS
    if unknown:
        raise ValueError(
            f"unknown org info keys {sorted(unknown)}; Tier accepts {sorted(_ORG_INFO_FIELDS)}"
        )
    out = dict(info)
    created = out.get("created")
    if isinstance(created, datetime):
        out["created"] = rfc3339(created)
    return out


def _tax(tax: Mapping[str, bool]) -> dict[str, bool]:
    unknown = set(tax) - _TAX_FIELDS
    if unknown:
        raise ValueError(f"unknown tax keys {sorted(unknown)}; Tier accepts automatic, collect_id")
    return {k: bool(v) for k, v in tax.items()}
