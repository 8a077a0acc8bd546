"""Spaire (and Polar) as a billing provider: credits on a Sum meter, usage as events.

Wire contract: ``/work/shared/reference/spaire_polar.md`` (Spaire's server is a fork of
Polar's, and ``spaire-sdk`` is ``polar-sdk`` renamed; the same class works against Polar by
passing ``base_url="https://api.polar.sh"``). Model (reference §2.4, seed 001):

* One Sum meter over ``metadata.units`` for events named ``event_name`` (``"api_usage"``).
* Usage is an event with ``metadata.units`` = units used; credits are granted by ingesting
  *negative* units (:meth:`SpaireProvider.grant`).
* ``balance = credited_units - consumed_units``; **positive = credits available**.
* Balances are recomputed by Spaire 15 s to 180 min after events arrive (§2.2), so this
  provider subtracts the units it delivered that the balance read does not yet reflect:
  an event delivered (server ``Date`` of the ingest answer) before the meter row's
  ``modified_at`` is in the balance; later ones are subtracted locally.

Endpoints used (all under the base URL, bearer token, JSON, snake_case):

=========================================  =====================================  ======
call                                       used for                               §
=========================================  =====================================  ======
``POST /v1/events/ingest``                 :meth:`report`, :meth:`grant`          1.5
``GET /v1/customers/external/{id}``        ensure the customer exists             2.9
``POST /v1/customers/``                    create it (201; 422 clash -> re-read)  2.9
``GET /v1/customers/external/{id}/state``  balance (``active_meters[]``)          2.6
``GET /v1/customer-meters/``               balance (``balance_source=...``)       2.6
``GET /v1/meters/?query=``                 resolve ``meter_name`` at open()       1.4
=========================================  =====================================  ======

Errors (raised by :meth:`fetch`, :meth:`report`, :meth:`grant`, :meth:`ensure_customer`):
``RetryableProviderError`` for network errors, timeouts, 429 (``retry_after`` from the
``Retry-After`` header), 5xx, and a 404 that is not Spaire's ``ResourceNotFound`` (no such
route: a wrong base URL, so the events stay queued); ``PermanentProviderError`` for
401/403 (token refused), ``ResourceNotFound`` and 422 (message = the server's ``detail``,
e.g. ``events.3.customer_id: Customer not found.``), and for a ``clobber`` event (Spaire
cannot *set* usage). The access token is sent only in the ``Authorization`` header; it is
never logged and never part of an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote

import cachetools
import httpx
from asgiref.typing import HTTPScope

from ..errors import (
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
)
from ..models import UsageEvent, check_customer, check_units
from ..provider import clobber_unsupported
from ._http import loads, send, status_error, status_kind
from .remote import Entitlement, RemoteProvider

__all__ = ["SERVERS", "SpaireProvider"]

logger = logging.getLogger("usage_middleware.providers.spaire")

#: Base URLs of ``spaire-sdk`` 0.28.4's named servers (reference §1.2).
SERVERS: Mapping[str, str] = {
    "production": "https://api.spairehq.com",
    "sandbox": "https://sandbox-api.spairehq.com",
}

#: Email domains Spaire refuses on customer creation (reference §7).
_REFUSED_DOMAINS = frozenset({"example.com", "example.net", "example.org"})

#: How old (seconds) a ``UsageEvent.at`` must be to be sent as ``timestamp``; younger
#: events omit it and Spaire stamps them on receipt. Spaire rejects a whole batch for one
#: future timestamp (§2.8), so a client clock running ahead by less than this is harmless.
TIMESTAMP_MARGIN = 300.0

#: Spaire's longest balance lag: 180 min debounce (§2.2), plus queue time.
MAX_BALANCE_LAG = 3 * 3600.0 + 15 * 60.0

#: Seconds added to an ingest's server time before a meter update is trusted to include it.
_REFLECT_MARGIN = 2.0
_SWEEP_CUSTOMERS = 10_000
#: The feature name under which all of a customer's features share local accounting.
_ALL_FEATURES = "feature:*"

#: Why a customer id with ``/`` is refused (checks answer it; events are dead-lettered).
_SLASH_REASON = (
    "customer ids containing '/' cannot be used with Spaire: its server decodes %2F before "
    "routing, so the customer cannot be looked up; map such ids to ids without '/'"
)

_LOCAL_ALLOWED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

CustomerIdKind = Literal["external", "spaire"]
BalanceSource = Literal["state", "customer_meters"]


def email_for(customer: str, domain: str) -> str:
    """The default customer email: ``customer`` escaped into a local part ``@domain``.

    UTF-8 bytes outside ``[A-Za-z0-9]`` become ``_xx`` (hex), so distinct customer ids give
    distinct emails (``org:acme`` -> ``org_3aacme@domain``); a local part that would
    exceed 64 characters is replaced by ``c_`` plus a SHA-256 prefix.
    """
    raw = customer.encode()
    local = "".join(chr(b) if b in _LOCAL_ALLOWED else f"_{b:02x}" for b in raw)
    if len(local) > 64:
        local = "c_" + hashlib.sha256(raw).hexdigest()[:40]
    return f"{local}@{domain}"


class SpaireProvider(RemoteProvider):
    """Entitlement checks and usage delivery against Spaire's (or Polar's) API.

    Args:
        access_token: an Organization Access Token (``spaire_oat_...``); scopes
            ``events:write``, ``customers:read``, ``customers:write``, ``meters:read``
            (and ``customer_meters:read`` with ``balance_source="customer_meters"``).
        server: ``"production"`` (default) or ``"sandbox"`` (reference §1.2).
        base_url: overrides ``server`` (e.g. ``"https://api.polar.sh"`` for Polar).
        meter_id: the Sum meter whose balance is the customer's credit, or
        meter_name: its name, resolved once in :meth:`open` via ``GET /v1/meters/?query=``.
        event_name: ``name`` of ingested events; the meter's filter must match it.
        customer_id_kind: ``"external"`` (default): customer ids are your own ids, sent as
            ``external_customer_id`` (the customer is created in Spaire before its first
            event); ``"spaire"``: customer ids are Spaire customer UUIDs (``customer_id``).
        customer_email: ``customer -> email`` for customers created by this provider.
        email_domain: with no ``customer_email``, emails are ``email_for(customer, domain)``.
            With neither, customers are never created: an event for a customer unknown to
            Spaire is refused permanently (dead-lettered, replayable once it exists).
        customer_name: ``customer -> display name`` for created customers (default: the id).
        balance_source: ``"state"`` (customer state, default) or ``"customer_meters"``.
        max_balance_lag: seconds after which delivered units are assumed reflected in the
            balance even if the meter row never showed a later ``modified_at``.
        **remote_kwargs: passed to :class:`RemoteProvider` (client, outbox, cache TTLs,
            failure policy, timeout, breaker settings).

    Raises:
        ConfigurationError: no token, no meter, an unknown server, a refused email domain.
    """

    name = "spaire"
    max_batch = 100
    #: Spaire's balance lags 15 s to 3 h: :meth:`fetch` subtracts the delivered units the
    #: meter row's ``modified_at`` shows it does not include yet, so the base counts only
    #: charges still queued and those delivered after a fetch returned.
    balance_lag = 0.0
    fetch_subtracts_delivered = True

    def __init__(
        self,
        access_token: str,
        *,
        server: str | None = None,
        base_url: str | None = None,
        meter_id: str | None = None,
        meter_name: str | None = None,
        event_name: str = "api_usage",
        customer_id_kind: CustomerIdKind = "external",
        customer_email: Callable[[str], str] | None = None,
        email_domain: str | None = None,
        customer_name: Callable[[str], str | None] | None = None,
        balance_source: BalanceSource = "state",
        max_balance_lag: float = MAX_BALANCE_LAG,
        **remote_kwargs: Any,
    ) -> None:
        if not access_token or not isinstance(access_token, str):
            raise ConfigurationError(
                "SpaireProvider needs an access token (SPAIRE_ACCESS_TOKEN, an Organization "
                "Access Token)"
            )
        if base_url is None:
            server = server or "production"
            if server not in SERVERS:
                raise ConfigurationError(
                    f"unknown Spaire server {server!r}: use 'production' or 'sandbox', "
                    "or pass base_url"
                )
            base_url = SERVERS[server]
        if (meter_id is None) == (meter_name is None):
            raise ConfigurationError(
                "SpaireProvider needs exactly one of meter_id= or meter_name= "
                "(SPAIRE_METER_ID): the Sum meter over metadata.units"
            )
        if not event_name or len(event_name) > 128:
            raise ConfigurationError("event_name must be 1-128 characters (Spaire's limit)")
        if customer_id_kind not in ("external", "spaire"):
            raise ConfigurationError("customer_id_kind must be 'external' or 'spaire'")
        if balance_source not in ("state", "customer_meters"):
            raise ConfigurationError("balance_source must be 'state' or 'customer_meters'")
        if email_domain is not None:
            domain = email_domain.strip().lstrip("@").lower()
            if "." not in domain or domain in _REFUSED_DOMAINS:
                raise ConfigurationError(
                    f"email_domain {email_domain!r} is refused by Spaire (it must accept "
                    "mail; example.com/.net/.org are refused)"
                )
            email_domain = domain
        super().__init__(**remote_kwargs)
        self.base_url = base_url.rstrip("/")
        self.meter_id = meter_id
        self.meter_name = meter_name
        self.event_name = event_name
        self.customer_id_kind: CustomerIdKind = customer_id_kind
        self.balance_source: BalanceSource = balance_source
        self.max_balance_lag = max_balance_lag
        self._customer_email = customer_email
        self._email_domain = email_domain
        self._customer_name = customer_name
        self._headers = {"authorization": f"Bearer {access_token}"}
        #: customer id -> Spaire customer UUID, for customers known to exist.
        #: Re-checked after an hour, so a customer deleted in Spaire is noticed.
        self._known: cachetools.TTLCache[str, str] = cachetools.TTLCache(
            maxsize=100_000, ttl=3600.0
        )
        self._ensuring: dict[str, asyncio.Lock] = {}
        #: external_id of events sent in an ingest whose answer never came (Spaire may
        #: have stored them): a later "duplicate" answer for such a charge still counts.
        self._attempted: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            maxsize=100_000, ttl=3600.0
        )
        #: customer -> deque of [bucket end (server epoch s), units, local monotonic s]:
        #: units delivered that the balance may not reflect yet (grants are negative).
        self._unreflected: dict[str, deque[list[float]]] = {}

    def __repr__(self) -> str:
        meter = self.meter_id or f"name={self.meter_name!r}"
        return f"<SpaireProvider {self.base_url} meter={meter} state={self.state.value}>"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SpaireProvider:
        """Build from ``SPAIRE_ACCESS_TOKEN`` (required), ``SPAIRE_SERVER``,
        ``SPAIRE_BASE_URL``, ``SPAIRE_METER_ID`` / ``SPAIRE_METER_NAME``,
        ``SPAIRE_EVENT_NAME`` and ``SPAIRE_EMAIL_DOMAIN``; ``overrides`` win.

        Raises:
            ConfigurationError: ``SPAIRE_ACCESS_TOKEN`` is unset or empty, or no meter.
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for var, key in (
            ("SPAIRE_SERVER", "server"),
            ("SPAIRE_BASE_URL", "base_url"),
            ("SPAIRE_METER_ID", "meter_id"),
            ("SPAIRE_METER_NAME", "meter_name"),
            ("SPAIRE_EVENT_NAME", "event_name"),
            ("SPAIRE_EMAIL_DOMAIN", "email_domain"),
        ):
            if env.get(var):
                kwargs[key] = env[var]
        if "meter_id" in overrides or "meter_name" in overrides:
            kwargs.pop("meter_id", None)
            kwargs.pop("meter_name", None)
        kwargs.update(overrides)
        token = kwargs.pop("access_token", None) or env.get("SPAIRE_ACCESS_TOKEN")
        if not token:
            raise ConfigurationError(
                "SPAIRE_ACCESS_TOKEN is not set: create an Organization Access Token in "
                "Spaire's dashboard"
            )
        return cls(token, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------

    def make_client(self) -> httpx.AsyncClient:
        """The shared client: base URL, timeouts, pool limits; no redirects followed."""
        return httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
            headers={"user-agent": "usage-middleware (spaire)"},
        )

    async def open(self) -> None:
        """Open the client and resolve ``meter_name`` to a meter id (once).

        Raises:
            ConfigurationError: no meter, or several meters, have that exact name.
            ProviderError: Spaire could not be asked.

        On either error the provider is closed again (pass ``meter_id`` to start without
        asking Spaire).
        """
        await super().open()
        if self.meter_id is None:
            try:
                self.meter_id = await self._resolve_meter(self.meter_name or "")
            except BaseException:
                await self.aclose()
                raise

    async def _resolve_meter(self, name: str) -> str:
        found: list[dict[str, Any]] = []
        for page in range(1, 21):
            r = await self._call(
                "GET",
                "/v1/meters/",
                params={"query": name, "page": page, "limit": 100},
                what="list meters",
            )
            data = _json_object(r, "list meters")
            items = data.get("items") or []
            found += [
                m
                for m in items
                if isinstance(m, dict) and m.get("name") == name and not m.get("archived_at")
            ]
            if len(items) < 100:
                break
        if not found:
            raise ConfigurationError(
                f"no Spaire meter named {name!r}: create a Sum meter over metadata.units "
                f"filtered on name = {self.event_name!r}, or pass meter_id="
            )
        if len(found) > 1:
            ids = ", ".join(str(m.get("id")) for m in found)
            raise ConfigurationError(
                f"several Spaire meters are named {name!r} ({ids}): pass meter_id="
            )
        meter = found[0]
        self._check_meter_shape(meter)
        return str(meter["id"])

    def _check_meter_shape(self, meter: Mapping[str, Any]) -> None:
        agg = meter.get("aggregation") or {}
        clauses = (meter.get("filter") or {}).get("clauses") or []
        names = {
            c.get("value")
            for c in clauses
            if isinstance(c, dict) and c.get("property") == "name" and c.get("operator") == "eq"
        }
        if agg.get("func") != "sum" or agg.get("property") not in ("units", "metadata.units"):
            logger.warning(
                "Spaire meter %s does not sum metadata.units (aggregation %s); balances "
                "will not follow the units this provider reports",
                meter.get("id"),
                agg,
            )
        if names and self.event_name not in names:
            logger.warning(
                "Spaire meter %s filters on name in %s but events are sent as %r",
                meter.get("id"),
                sorted(map(str, names)),
                self.event_name,
            )

    # -- entitlement -------------------------------------------------------------------

    async def fetch(
        self, customer: str, feature: str, *, scope: HTTPScope | None = None
    ) -> Entitlement:
        """The customer's credit on the meter, less units delivered but not yet reflected.

        ``GET /v1/customers/external/{id}/state`` (or ``/v1/customers/{id}/state``; or
        ``GET /v1/customer-meters/`` with ``balance_source="customer_meters"``), the
        ``active_meters[]`` row whose ``meter_id`` is ours (§2.6). Every feature draws on the
        same meter. Returns ``Entitlement(limit=None, used=None, remaining=...)`` where
        ``remaining = max(0, floor(balance - unreflected units))``; an unknown customer or a
        missing meter row is 0 remaining with a reason. A customer id containing ``/`` is
        refused (0 remaining, a reason saying why) without asking Spaire: its server decodes
        ``%2F`` before routing, so no customer endpoint can name such an id (§1.9).

        Raises:
            RetryableProviderError / PermanentProviderError: see the module docstring.
        """
        if "/" in customer:
            # Refused here, not failed: a failed check may fail open and serve for free.
            return Entitlement(None, None, 0, reason=_SLASH_REASON)
        row: Mapping[str, Any] | None
        empty = "no credits on this meter"
        if self.balance_source == "customer_meters":
            params = {"meter_id": self._meter(), "limit": 1, self._id_param(): customer}
            r = await self._call("GET", "/v1/customer-meters/", params=params, what="read balance")
            items = _json_object(r, "read balance").get("items") or []
            row = next(
                (i for i in items if isinstance(i, dict) and i.get("meter_id") == self._meter()),
                None,
            )
        else:
            r = await self._call(
                "GET", self._customer_path(customer, "/state"), what="read balance", not_found=True
            )
            if r.status_code == 404:
                row, empty = None, "unknown customer"
            else:
                meters = _json_object(r, "read balance").get("active_meters") or []
                row = next(
                    (
                        m
                        for m in meters
                        if isinstance(m, dict) and m.get("meter_id") == self._meter()
                    ),
                    None,
                )
        balance, as_of = 0.0, None
        if row is not None:
            raw = row.get("balance")
            # A JSON number only (no bool, no string), finite and within float range:
            # anything else is a failed check, never a refusal the customer did not earn.
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise RetryableProviderError(
                    f"Spaire read balance: answer has no numeric balance ({type(raw).__name__})",
                    code="invalid_response",
                )
            try:
                balance = float(raw)
            except OverflowError as exc:
                raise RetryableProviderError(
                    "Spaire read balance: balance out of range", code="invalid_response"
                ) from exc
            if not math.isfinite(balance):
                raise RetryableProviderError(
                    "Spaire read balance: balance is not finite", code="invalid_response"
                )
            as_of = _parse_iso(row.get("modified_at"))
        # Grants (negative) and charges this process delivered after the row was computed.
        available = balance - self._pending_units(customer, as_of)
        remaining = max(0, math.floor(available)) if math.isfinite(available) else 0
        if remaining > 0:
            return Entitlement(None, None, remaining)
        return Entitlement(None, None, 0, reason="no credits left" if row is not None else empty)

    def _pending_units(self, customer: str, as_of: float | None) -> float:
        """Units delivered after the balance's ``modified_at``; forgets the reflected ones."""
        q = self._unreflected.get(customer)
        if not q:
            return 0.0
        expired = self._clock() - self.max_balance_lag
        kept = deque(e for e in q if (as_of is None or e[0] > as_of) and e[2] > expired)
        if kept:
            self._unreflected[customer] = kept
        else:
            del self._unreflected[customer]
        return sum(e[1] for e in kept)

    def _remember_unreflected(self, units: Mapping[str, float], server_time: float) -> None:
        """Count ``units`` per customer, accepted by Spaire at ``server_time`` (epoch s),
        until a balance read shows a ``modified_at`` after them."""
        # Spaire's Date header has 1 s resolution; the events were stored before it + 1 s.
        # The margin covers the meter update's own duration (its modified_at is written
        # after it summed); Spaire's 15 s debounce means a later update always comes.
        end = math.floor(server_time) + 1.0 + _REFLECT_MARGIN
        now = self._clock()
        for customer, n in units.items():
            q = self._unreflected.setdefault(customer, deque())
            if q and q[-1][0] == end:
                q[-1][1] += n
                q[-1][2] = now
            else:
                q.append([end, n, now])
        if len(self._unreflected) > _SWEEP_CUSTOMERS:
            expired = now - self.max_balance_lag
            for customer in [c for c, q in self._unreflected.items() if q[-1][2] <= expired]:
                del self._unreflected[customer]

    # -- one balance for all features -------------------------------------------------
    # Every feature draws on the same Spaire meter, so the base class's local accounting
    # (units in flight and charged but unseen) is pooled per customer: a request for
    # feature:a must see the units feature:b holds: account_key maps every feature to one
    # key.

    def account_key(self, customer: str, feature: str) -> tuple[str, str]:
        """Every feature of a customer draws on the one meter balance: one account."""
        return (customer, _ALL_FEATURES)

    def _forget_cached(self, customer: str) -> None:
        """Drop cached entitlements of ``customer`` (after a grant changed its balance)."""
        for key in [k for k in list(self._cache.keys()) if k[0] == customer]:
            self._cache.pop(key, None)

    # -- delivery ----------------------------------------------------------------------

    async def send(self, events: Sequence[UsageEvent]) -> set[str] | None:
        """Deliver up to :attr:`max_batch` events in one ``POST /v1/events/ingest`` (§1.5).

        Each event becomes ``{name, external_customer_id | customer_id, external_id =
        idempotency_key, metadata: {units, feature}}`` plus ``timestamp`` when ``at`` is
        more than :data:`TIMESTAMP_MARGIN` seconds old. ``duplicates`` in the answer count
        as delivered (§2.7) but not as new usage: see :meth:`_ingest` for how local
        accounting follows ``inserted``/``duplicates``. Customers are ensured first
        (``customer_id_kind="external"``).

        Returns:
            the idempotency keys of the events Spaire counted as new usage.

        Raises:
            PermanentProviderError: a ``clobber`` event; a customer id with ``/``; a 422 for
                the batch (the reporter splits the batch to find the bad event); 401/403; a
                customer that cannot be created.
            RetryableProviderError: network, timeout, 429 (``retry_after``), 5xx.
        """
        if not events:
            return None
        for ev in events:
            if ev.clobber:
                raise clobber_unsupported("Spaire")
        await self._ensure_all(ev.customer for ev in events)
        return await self._ingest(
            (
                self._event_body(ev.customer, ev.feature, ev.units, ev.idempotency_key, ev.at),
                ev.customer,
                ev.units,
            )
            for ev in events
        )

    async def grant(self, customer: str, units: int, *, idempotency_key: str | None = None) -> str:
        """Grant ``units`` (> 0) credits by ingesting ``-units`` (seed 001, §2.4).

        The event's ``external_id`` is ``idempotency_key`` (default ``grant-<uuid>``), so
        calling again with the same key grants once. Returns that key. The credits show in
        Spaire's balance after its update lag; this process counts them at once.

        Raises:
            ValueError: bad customer id or units.
            ProviderError: as :meth:`send`.
        """
        check_customer(customer)
        check_units(units)
        key = idempotency_key or f"grant-{os.urandom(16).hex()}"
        await self._ensure_all([customer])
        body = self._event_body(customer, None, -units, key, None)
        await self._ingest([(body, customer, -units)])
        self._forget_cached(customer)
        return key

    def _event_body(
        self,
        customer: str,
        feature: str | None,
        units: int,
        key: str,
        at: datetime | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.event_name}
        if self.customer_id_kind == "spaire":
            body["customer_id"] = customer
        else:
            body["external_customer_id"] = customer
        body["external_id"] = key
        metadata: dict[str, Any] = {"units": units}
        if feature is not None and len(feature) <= 500:
            metadata["feature"] = feature
        body["metadata"] = metadata
        if at is not None and at < datetime.now(UTC) - timedelta(seconds=TIMESTAMP_MARGIN):
            body["timestamp"] = at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return body

    async def _ingest(self, items: Iterable[tuple[dict[str, Any], str, int]]) -> set[str]:
        """POST the event bodies (a repeated ``external_id`` sent once); return the
        ``external_id`` of the events counted as new usage, and remember their units as not
        yet in the balance.

        Spaire answers only counts, ``{inserted, duplicates}`` (§2.7: a duplicate was
        stored by an earlier delivery and is not metered again). Local accounting follows
        what Spaire says it inserted:

        * ``duplicates == 0``: every event is new; ``inserted == 0``: none is (a batch of
          one, the common case, is always exact).
        * a mixed answer does not say which were duplicates: the duplicates are assumed to
          be the events with the *fewest* units (grants, being negative, first). So the
          units kept as "not yet in the balance" are never fewer than Spaire inserted, and
          credits never more: the customer cannot overspend by a guess.
        * a charge (units > 0) that this process sent before without getting an answer
          (the answer was lost), answered now as a duplicate, still counts as new: the lost
          attempt stored it moments ago and the balance may not show it yet. A duplicate
          grant never adds credit.
        """
        seen: set[str] = set()
        unique: list[dict[str, Any]] = []
        meta: list[tuple[str, str, int]] = []
        for body, customer, units in items:
            key = body["external_id"]
            if key in seen:
                continue
            seen.add(key)
            unique.append(body)
            meta.append((key, customer, units))
        attempted = self._attempted
        try:
            r = await self._call(
                "POST", "/v1/events/ingest", json={"events": unique}, what="ingest"
            )
        except BaseException:
            for key, _customer, _units in meta:  # Spaire may have stored them
                attempted[key] = True
            raise
        sent_at = time.time()
        data = _json_object(r, "ingest")
        inserted, duplicates = data.get("inserted"), data.get("duplicates", 0)
        if (
            isinstance(inserted, bool)
            or isinstance(duplicates, bool)
            or not isinstance(inserted, int)
            or not isinstance(duplicates, int)
            or inserted < 0
            or duplicates < 0
        ):
            raise RetryableProviderError(
                "Spaire ingest: answer has no inserted/duplicates counts", status=r.status_code
            )
        if inserted + duplicates != len(unique):
            logger.warning(
                "Spaire ingest: sent %d events, answer counts %d inserted + %d duplicates",
                len(unique),
                inserted,
                duplicates,
            )
        logger.debug("Spaire ingest: %d inserted, %d duplicates", inserted, duplicates)
        dup = min(duplicates, len(meta))
        # Stable: among equal units, the later events are taken as the duplicates.
        by_units = sorted(range(len(meta)), key=lambda i: (meta[i][2], -i))
        deemed_dup = set(by_units[:dup])
        counted: set[str] = set()
        by_customer: dict[str, float] = {}
        for i, (key, customer, units) in enumerate(meta):
            lost_before = attempted.pop(key, None) is not None
            if i in deemed_dup and not (units > 0 and lost_before):
                continue
            counted.add(key)
            by_customer[customer] = by_customer.get(customer, 0.0) + units
        self._remember_unreflected(by_customer, _server_time(r) or sent_at)
        return counted

    # -- customers ---------------------------------------------------------------------

    async def _ensure_all(self, customers: Iterable[str]) -> None:
        customers = set(customers)
        for customer in customers:
            _check_routable(customer)
        if self.customer_id_kind != "external":
            return
        todo = {c for c in customers if c not in self._known}
        if not todo:
            return
        results = await asyncio.gather(
            *(self.ensure_customer(c) for c in todo), return_exceptions=True
        )
        errors = [e for e in results if isinstance(e, BaseException)]
        for e in errors:
            if not isinstance(e, ProviderError):
                raise e
        retryable = [e for e in errors if isinstance(e, RetryableProviderError)]
        if retryable:
            raise retryable[0]
        if errors:
            raise errors[0]

    async def ensure_customer(self, customer: str) -> str:
        """Make sure ``customer`` (an external id) exists in Spaire; return its Spaire id.

        ``GET /v1/customers/external/{id}``; on 404 ``POST /v1/customers/`` with
        ``{email, external_id, name}``; on a 422 clash, read it again (§2.9). Known
        customers are cached, and concurrent calls for one customer make one lookup.

        Raises:
            PermanentProviderError: the customer is unknown and creating it is off or was
                refused (code ``customer_not_found`` / the server's 422 detail); an id
                containing ``/`` (code ``customer_id_unsupported``: no route can name it).
            RetryableProviderError: Spaire could not be reached.
        """
        _check_routable(customer)
        known = self._known.get(customer)
        if known is not None:
            return known
        lock = self._ensuring.setdefault(customer, asyncio.Lock())
        try:
            async with lock:
                known = self._known.get(customer)
                if known is None:
                    known = self._known[customer] = await self._ensure(customer)
                return known
        finally:
            # A caller arriving after this may make its own lookup; a duplicate create is
            # a 422 clash that re-reads, so this only costs a request.
            if not lock.locked() and self._ensuring.get(customer) is lock:
                del self._ensuring[customer]

    async def _ensure(self, customer: str) -> str:
        found = await self._get_customer(customer)
        if found is not None:
            return found
        email = self._email(customer)
        if email is None:
            raise PermanentProviderError(
                f"customer {customer!r} does not exist in Spaire and this provider does not "
                "create customers (pass customer_email= or email_domain=)",
                status=404,
                code="customer_not_found",
            )
        body: dict[str, Any] = {"email": email, "external_id": customer}
        name = self._customer_name(customer) if self._customer_name else customer
        if name:
            body["name"] = name
        try:
            r = await self._call("POST", "/v1/customers/", json=body, what="create customer")
        except PermanentProviderError as exc:
            if exc.status != 422:
                raise
            found = await self._get_customer(customer)  # created meanwhile (clash)
            if found is not None:
                return found
            raise
        logger.info("Spaire: created customer for external id %r", customer)
        return str(_json_object(r, "create customer").get("id"))

    async def _get_customer(self, customer: str) -> str | None:
        r = await self._call(
            "GET", self._customer_path(customer, ""), what="read customer", not_found=True
        )
        if r.status_code == 404:
            return None
        return str(_json_object(r, "read customer").get("id"))

    def _email(self, customer: str) -> str | None:
        if self._customer_email is not None:
            return self._customer_email(customer)
        if self._email_domain is not None:
            return email_for(customer, self._email_domain)
        return None

    # -- HTTP --------------------------------------------------------------------------

    def _meter(self) -> str:
        if self.meter_id is None:
            raise ConfigurationError("SpaireProvider is not open: meter_name is not resolved yet")
        return self.meter_id

    def _id_param(self) -> str:
        return "customer_id" if self.customer_id_kind == "spaire" else "external_customer_id"

    def _customer_path(self, customer: str, tail: str) -> str:
        # quote '/' too: the SDK does not, and Spaire would route it as a path separator.
        ident = quote(customer, safe="")
        if self.customer_id_kind == "spaire":
            return f"/v1/customers/{ident}{tail}"
        return f"/v1/customers/external/{ident}{tail}"

    async def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        not_found: bool = False,
    ) -> httpx.Response:
        """One request; returns 2xx (and Spaire's ``ResourceNotFound`` 404 when
        ``not_found``); raises ProviderError for anything else."""
        # Every event carries its external_id (Spaire skips a repeat, §2.7): resending
        # after a lost answer is safe, so no failure here is ambiguous.
        r = await send(
            self.http,
            method,
            path,
            what=f"Spaire {what}",
            max_body=self.max_body,
            headers=self._headers,
            params=params,
            json_body=json,
        )
        if 200 <= r.status_code < 300:
            return r
        if not_found and r.status_code == 404 and _error_body(r)[0] == "ResourceNotFound":
            return r
        raise _error(r, what, self.base_url, self.max_retry_after)


def _check_routable(customer: str) -> None:
    """Refuse a customer id no Spaire customer route can name (it contains ``/``)."""
    if "/" in customer:
        raise PermanentProviderError(
            f"customer {customer!r}: {_SLASH_REASON}", code="customer_id_unsupported"
        )


def _error(r: httpx.Response, what: str, base_url: str, cap: float) -> ProviderError:
    """Spaire's error body (§1.6) as a typed error, by the shared classification; only
    Spaire's own ``ResourceNotFound`` 404 is permanent (any other 404 is no such route: a
    wrong base_url, not the events' fault)."""
    status = r.status_code
    code, detail = _error_body(r)
    kind = status_kind(status)
    retry = False if status == 404 and code == "ResourceNotFound" else None
    if status == 429:
        message = f"Spaire {what}: rate limited"
    elif kind == "retryable":
        message = f"Spaire {what}: server error: {detail or r.reason_phrase}"
    elif kind == "not_found" and retry is None:
        message = f"Spaire {what}: {r.request.url.path} not found; check base_url/SPAIRE_BASE_URL"
    elif kind == "auth":
        message = (
            f"Spaire {what}: the access token was refused ({detail or r.reason_phrase}); "
            "check SPAIRE_ACCESS_TOKEN, its organization and scopes"
        )
        code = code or ("unauthorized" if status == 401 else "forbidden")
    else:
        message = f"Spaire {what}: {detail or r.reason_phrase}"
    return status_error(
        r, f"Spaire {what}", base_url, message=message, code=code, cap=cap, retry=retry
    )


def _error_body(r: httpx.Response) -> tuple[str | None, str]:
    """(``error`` code, readable ``detail``) from a Spaire error body (§1.6)."""
    try:
        body = loads(r.content)
    except ValueError:
        return None, r.text[:300].strip()
    if not isinstance(body, dict):
        return None, str(body)[:300]
    code = body.get("error") if isinstance(body.get("error"), str) else None
    detail = body.get("detail")
    if isinstance(detail, list):
        parts = []
        for item in detail[:10]:
            if not isinstance(item, dict):
                parts.append(str(item))
                continue
            loc = [str(x) for x in item.get("loc") or [] if x != "body"]
            parts.append(f"{'.'.join(loc) or 'body'}: {item.get('msg')}")
        return code or "validation_error", "; ".join(parts)
    return code, str(detail)[:500] if detail is not None else ""


def _server_time(r: httpx.Response) -> float | None:
    """Spaire's clock when it answered (``Date`` header, epoch seconds), if present."""
    value = r.headers.get("date")
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _parse_iso(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _json_object(r: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data = loads(r.content)
    except ValueError as exc:
        raise RetryableProviderError(
            f"Spaire {what}: answer is not JSON (or has NaN/Infinity)",
            status=r.status_code,
            original_error=exc,
        ) from exc
    if not isinstance(data, dict):
        raise RetryableProviderError(
            f"Spaire {what}: answer is not a JSON object", status=r.status_code
        )
    return data
