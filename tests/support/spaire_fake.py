"""An in-process fake of Spaire's API (Polar-compatible), for ``httpx.MockTransport``.

It follows ``/work/shared/reference/spaire_polar.md``:

* ``POST /v1/events/ingest`` (§1.5, §2.2, §2.7, §2.8): the whole batch is validated first and
  one invalid event rejects it with 422 ``{"detail": [{"loc": ["body", "events", i, ...],
  "msg": ..., "type": ...}]}`` (future or naive ``timestamp``, unknown ``customer_id``,
  ``name`` over 128 characters, ``organization_id`` with an organization token, metadata
  limits). ``external_customer_id`` is not checked. Events are deduplicated on
  ``(organization, external_id)``; the answer is ``{"inserted": n, "duplicates": m}``. A
  non-number ``metadata.units`` is stored but not summed.
* Balances lag (§2.2): a customer's meters are recomputed ``delay`` seconds after the last
  event for that customer (debounce), or ``max_delay`` after the first pending one; the
  meter row's ``modified_at`` is the time of that update. Customer state is read from
  those rows, so it lags too. A meter-credit benefit grant (:meth:`FakeSpaire.credit`)
  updates the customer's meters at once (§2.5).
* ``balance = credited_units - consumed_units`` (§2.4): positive means credits available.
* Customers (§2.9): ``GET /v1/customers/external/{id}`` and ``/v1/customers/{id}`` (404
  ``{"error": "ResourceNotFound", "detail": "Not found"}``), ``POST /v1/customers/`` (201;
  422 on an email or external_id clash; 422 for ``example.com/.net/.org`` emails),
  ``GET .../state`` with ``active_meters[]`` (§2.6), ``GET /v1/customer-meters/``,
  ``GET /v1/meters/?query=``.
* 401 for a wrong bearer token, before routing (§7); scripted 429 with an empty body and a
  ``retry-after`` header (§1.6); scripted 5xx and network errors.

Every request body is validated with the ``spaire-sdk`` package's own pydantic models
(``EventsIngest``, ``CustomerCreate``), and keys those models do not know are refused.
A body that does not match is answered 422 *and* recorded in :attr:`FakeSpaire.violations`,
which tests assert empty. Time comes from a :class:`FakeClock` so tests advance it instead
of sleeping.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import httpx
import pydantic
from spaire_sdk import models as sdk

__all__ = ["FakeClock", "FakeSpaire"]

ORG_ID = "8f7c1a52-3c1e-4c55-9d5a-0a6f2b0e9a11"
TOKEN = "spaire_oat_fake_token_0123456789"
BASE_URL = "https://sandbox-api.spairehq.com"
_EVENT_KEYS = frozenset(
    {
        "name",
        "external_customer_id",
        "customer_id",
        "timestamp",
        "organization_id",
        "external_id",
        "parent_id",
        "metadata",
    }
)
_CUSTOMER_KEYS = frozenset(
    {
        "email",
        "metadata",
        "external_id",
        "name",
        "billing_address",
        "tax_id",
        "organization_id",
        "owner",
    }
)
_REFUSED_EMAIL_DOMAINS = frozenset({"example.com", "example.net", "example.org"})


@dataclass
class FakeClock:
    """A settable clock in epoch seconds; :meth:`advance` moves it forward."""

    now: float = 1_780_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Event:
    name: str
    customer_id: str | None
    external_customer_id: str | None
    external_id: str | None
    metadata: dict[str, Any]
    timestamp: float
    ingested_at: float
    source: str = "user"


@dataclass
class _MeterRow:
    id: str
    meter_id: str
    customer_id: str
    created_at: float
    modified_at: float | None = None
    consumed_units: float = 0.0
    credited_units: int = 0

    @property
    def balance(self) -> float:
        return self.credited_units - self.consumed_units


@dataclass
class _Pending:
    first: float
    last: float


@dataclass
class FakeSpaire:
    """The fake server. ``handler`` is an ``httpx.MockTransport`` handler.

    Attributes:
        delay: seconds from a customer's last event to its meter update (debounce, 15 s).
        max_delay: the longest a pending update waits under continuous traffic (seconds).
        requests: every request received, in order (after the auth check or not).
        request_times: ``time.monotonic()`` when each of ``requests`` arrived.
        ingest_bodies: the JSON bodies of every ``POST /v1/events/ingest``.
        violations: request bodies that do not match the vendor SDK's models.
    """

    clock: FakeClock = field(default_factory=FakeClock)
    token: str = TOKEN
    delay: float = 15.0
    max_delay: float = 180 * 60.0
    org_id: str = ORG_ID
    requests: list[httpx.Request] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)
    ingest_bodies: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    events: list[_Event] = field(default_factory=list)
    meters: dict[str, dict[str, Any]] = field(default_factory=dict)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: dict[tuple[str, str], _MeterRow] = field(default_factory=dict)
    _external_ids: set[str] = field(default_factory=set)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _script: deque[tuple[str | None, Callable[[httpx.Request], httpx.Response]]] = field(
        default_factory=deque
    )

    # -- set-up helpers ------------------------------------------------------------------

    def add_meter(self, name: str, *, event_name: str = "api_usage", prop: str = "units") -> str:
        """Create a Sum meter over ``metadata.<prop>`` for events named ``event_name``."""
        meter_id = str(uuid.uuid4())
        t = self.clock()
        self.meters[meter_id] = {
            "metadata": {},
            "created_at": _iso(t),
            "modified_at": None,
            "id": meter_id,
            "name": name,
            "filter": {
                "conjunction": "and",
                "clauses": [{"property": "name", "operator": "eq", "value": event_name}],
            },
            "aggregation": {"func": "sum", "property": prop},
            "organization_id": self.org_id,
            "archived_at": None,
        }
        return meter_id

    def add_customer(self, external_id: str | None, email: str | None = None) -> str:
        """Create a customer directly (as the dashboard would); returns its Spaire id."""
        cid = str(uuid.uuid4())
        self.customers[cid] = self._customer_json(
            cid, email or f"{uuid.uuid4().hex[:12]}@mail.acme-billing.io", external_id, None
        )
        return cid

    def customer_by_external(self, external_id: str) -> dict[str, Any] | None:
        for c in self.customers.values():
            if c["external_id"] == external_id and c["deleted_at"] is None:
                return c
        return None

    def rate_limit(self, retry_after: int = 1, *, times: int = 1, path: str | None = None) -> None:
        """Answer the next ``times`` requests (to ``path``, if given) with an empty 429."""
        for _ in range(times):
            self._script.append(
                (
                    path,
                    lambda r, ra=retry_after: httpx.Response(
                        429, headers={"retry-after": str(ra)}, content=b""
                    ),
                )
            )

    def fail(
        self,
        status: int = 503,
        *,
        times: int = 1,
        path: str | None = None,
        body: Any = None,
        exc: type[httpx.TransportError] | None = None,
    ) -> None:
        """Answer the next ``times`` requests (to ``path``) with ``status`` and ``body``
        (default ``{"error": "InternalServerError", ...}``), or raise ``exc`` (network)."""

        def answer(request: httpx.Request) -> httpx.Response:
            if exc is not None:
                raise exc("scripted network failure", request=request)
            payload = (
                body if body is not None else {"error": "InternalServerError", "detail": "boom"}
            )
            return httpx.Response(status, json=payload)

        for _ in range(times):
            self._script.append((path, answer))

    def lose_response(self, *, times: int = 1, path: str | None = None) -> None:
        """Process the next ``times`` requests (to ``path``) but raise ``ReadTimeout`` instead
        of answering: the server acted, the client never heard (a retry must not re-charge)."""

        def answer(request: httpx.Request) -> httpx.Response:
            self._dated(self._route(request, request.url.raw_path.split(b"?")[0].decode()))
            raise httpx.ReadTimeout("scripted lost response", request=request)

        for _ in range(times):
            self._script.append((path, answer))

    def set_available(self, external_id: str, meter_id: str, units: int) -> None:
        """Make the customer's balance on the meter exactly ``units`` now (creating the
        customer if needed), with a meter-credit grant of the difference."""
        if self.customer_by_external(external_id) is None:
            self.add_customer(external_id)
        self.settle()
        current = self.balance(external_id, meter_id) or 0.0
        self.credit(external_id, meter_id, int(units - current))
        assert self.balance(external_id, meter_id) == units

    def credit(self, external_id: str, meter_id: str, units: int) -> None:
        """A meter-credit benefit grant of ``units`` (system ``meter.credited``), applied now."""
        customer = self.customer_by_external(external_id)
        assert customer is not None, f"no customer {external_id!r}"
        t = self.clock()
        self.events.append(
            _Event(
                "meter.credited",
                customer["id"],
                None,
                None,
                {"meter_id": meter_id, "units": units, "rollover": False},
                t,
                t,
                source="system",
            )
        )
        self._update_customer(customer["id"], t)

    def settle(self) -> None:
        """Run every debounced meter update that has come due by now."""
        now = self.clock()
        for cid, p in list(self._pending.items()):
            due = min(p.last + self.delay, p.first + self.max_delay)
            if now >= due:
                del self._pending[cid]
                self._update_customer(cid, due)

    def settle_all(self) -> None:
        """Run every pending meter update now (as if the debounce had fired)."""
        now = self.clock()
        for cid in list(self._pending):
            del self._pending[cid]
            self._update_customer(cid, now)

    def balance(self, external_id: str, meter_id: str) -> float | None:
        """The balance Spaire shows for the customer's meter now (lagging), or None."""
        self.settle()
        customer = self.customer_by_external(external_id)
        if customer is None:
            return None
        row = self.rows.get((customer["id"], meter_id))
        return None if row is None else row.balance

    def true_consumed(self, external_id: str, meter_id: str) -> float:
        """Sum of user ``units`` for the customer on the meter, ignoring the lag."""
        customer = self.customer_by_external(external_id)
        cid = customer["id"] if customer else None
        return self._consumed(cid, external_id, meter_id, math.inf)

    def charged(self, external_id: str, meter_id: str, feature: str | None = None) -> int:
        """Positive user units stored for the customer on the meter (usage, not grants),
        only those with ``metadata.feature == feature`` when ``feature`` is given."""
        customer = self.customer_by_external(external_id)
        cid = customer["id"] if customer else None
        return self._charged(cid, external_id, meter_id, feature)

    def charged_by_id(self, customer_id: str, meter_id: str) -> int:
        """As :meth:`charged`, for a customer named by its Spaire id."""
        return self._charged(customer_id, None, meter_id)

    def _charged(
        self,
        customer_id: str | None,
        external_id: str | None,
        meter_id: str,
        feature: str | None = None,
    ) -> int:
        meter = self.meters[meter_id]
        total = 0.0
        for ev in self._matching(customer_id, external_id, meter):
            if feature is not None and ev.metadata.get("feature") != feature:
                continue
            units = ev.metadata.get(meter["aggregation"]["property"])
            if _is_number(units) and units > 0:
                total += units
        return int(total)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def client(self, base_url: str = BASE_URL) -> httpx.AsyncClient:
        """An ``AsyncClient`` wired to this fake (no auth header: the provider sends it)."""
        return httpx.AsyncClient(transport=self.transport, base_url=base_url)

    # -- the server -----------------------------------------------------------------------

    def handler(self, request: httpx.Request) -> httpx.Response:
        """Route one request (sync ``MockTransport`` handler)."""
        self.requests.append(request)
        self.request_times.append(time.monotonic())
        self.settle()
        path = request.url.raw_path.split(b"?")[0].decode("ascii")
        for i, (p, answer) in enumerate(self._script):
            if p is None or p == path:
                del self._script[i]
                return self._dated(answer(request))
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return self._json(
                401,
                {"error": "Unauthorized", "detail": "Invalid or missing access token"},
            )
        return self._dated(self._route(request, path))

    def _route(self, request: httpx.Request, path: str) -> httpx.Response:
        # The server decodes the path (``%2F`` included) before routing, so an id with a
        # ``/`` matches no route: a plain 404 ``{"detail": "Not Found"}``, not Spaire's
        # ``ResourceNotFound`` (reference §1.9).
        parts = unquote(path).split("/")[1:]
        m = request.method
        if m == "POST" and path == "/v1/events/ingest":
            return self._ingest(request)
        if m == "POST" and path == "/v1/customers/":
            return self._create_customer(request)
        if (
            m == "GET"
            and parts[:3] == ["v1", "customers", "external"]
            and (len(parts) == 4 or (len(parts) == 5 and parts[4] == "state"))
        ):
            customer = self.customer_by_external(parts[3])
            return self._customer_answer(customer, state=len(parts) == 5)
        if (
            m == "GET"
            and parts[:2] == ["v1", "customers"]
            and (len(parts) == 3 or (len(parts) == 4 and parts[3] == "state"))
        ):
            customer = self.customers.get(parts[2])
            if customer is not None and customer["deleted_at"] is not None:
                customer = None
            return self._customer_answer(customer, state=len(parts) == 4)
        if m == "GET" and path == "/v1/customer-meters/":
            return self._customer_meters(request)
        if m == "GET" and path == "/v1/meters/":
            return self._meters(request)
        return self._json(404, {"detail": "Not Found"})

    # -- events ----------------------------------------------------------------------------

    def _ingest(self, request: httpx.Request) -> httpx.Response:
        body = self._body(request)
        if body is None:
            return self._violation("ingest body is not a JSON object")
        try:
            sdk.EventsIngest.model_validate(body)
        except pydantic.ValidationError as exc:
            return self._violation(f"EventsIngest: {exc}")
        self.ingest_bodies.append(body)
        events = body["events"]
        errors: list[dict[str, Any]] = []
        now = self.clock()
        seen_in_batch: set[str] = set()
        for i, ev in enumerate(events):
            loc: list[str | int] = ["body", "events", i]
            extra = set(ev) - _EVENT_KEYS
            if extra:
                return self._violation(f"event {i}: keys the SDK does not know: {sorted(extra)}")
            if ("customer_id" in ev) == ("external_customer_id" in ev):
                self.violations.append(
                    f"event {i}: needs exactly one of customer_id / external_customer_id"
                )
            units = (ev.get("metadata") or {}).get("units")
            if "units" in (ev.get("metadata") or {}) and not _is_number(units):
                self.violations.append(f"event {i}: metadata.units {units!r} is not a number")
            if ev.get("external_id") is None:
                self.violations.append(f"event {i}: no external_id (never deduplicated)")
            elif ev["external_id"] in seen_in_batch:
                self.violations.append(f"event {i}: external_id repeated inside one batch")
            else:
                seen_in_batch.add(ev["external_id"])
            if len(ev["name"]) > 128:
                errors.append(
                    {
                        "loc": [*loc, "name"],
                        "msg": "String should have at most 128 characters",
                        "type": "string_too_long",
                    }
                )
            if ev.get("organization_id") is not None:
                errors.append(
                    {
                        "loc": [*loc, "organization_id"],
                        "msg": "Setting organization_id is disallowed when using an "
                        "organization token.",
                        "type": "organization_token",
                    }
                )
            if ev.get("timestamp") is not None:
                ts = _parse_time(ev["timestamp"])
                if ts is None:
                    errors.append(
                        {
                            "loc": [*loc, "timestamp"],
                            "msg": "Input should have timezone info",
                            "type": "timezone_aware",
                        }
                    )
                elif ts > now:
                    errors.append(
                        {
                            "loc": [*loc, "timestamp"],
                            "msg": "Timestamp must be in the past.",
                            "type": "value_error",
                        }
                    )
            cid = ev.get("customer_id")
            if cid is not None:
                c = self.customers.get(cid)
                if c is None or c["deleted_at"] is not None:
                    errors.append(
                        {
                            "loc": [*loc, "customer_id"],
                            "msg": "Customer not found.",
                            "type": "customer_id",
                        }
                    )
            meta = ev.get("metadata") or {}
            if len(meta) > 50 or any(
                len(k) > 40 or (isinstance(v, str) and len(v) > 500) for k, v in meta.items()
            ):
                errors.append(
                    {
                        "loc": [*loc, "metadata"],
                        "msg": "Metadata limits exceeded",
                        "type": "value_error",
                    }
                )
        if errors:
            return self._json(422, {"detail": errors})
        inserted = duplicates = 0
        touched: set[str] = set()
        for ev in events:
            ext = ev.get("external_id")
            if ext is not None and ext in self._external_ids:
                duplicates += 1
                continue
            if ext is not None:
                self._external_ids.add(ext)
            inserted += 1
            ts = _parse_time(ev["timestamp"]) if ev.get("timestamp") else now
            stored = _Event(
                ev["name"],
                ev.get("customer_id"),
                None if ev.get("customer_id") else ev.get("external_customer_id"),
                ext,
                dict(ev.get("metadata") or {}),
                ts or now,
                now,
            )
            self.events.append(stored)
            if stored.customer_id is not None:
                touched.add(stored.customer_id)
            else:
                c = self.customer_by_external(stored.external_customer_id or "")
                if c is not None:
                    touched.add(c["id"])
        for cid in touched:
            p = self._pending.get(cid)
            if p is None:
                self._pending[cid] = _Pending(now, now)
            else:
                p.last = now
        return self._json(200, {"inserted": inserted, "duplicates": duplicates})

    def _matching(
        self, customer_id: str | None, external_id: str | None, meter: dict[str, Any]
    ) -> list[_Event]:
        event_name = meter["filter"]["clauses"][0]["value"]
        out = []
        for ev in self.events:
            if ev.source != "user" or ev.name != event_name:
                continue
            if (customer_id is not None and ev.customer_id == customer_id) or (
                external_id is not None
                and ev.customer_id is None
                and ev.external_customer_id == external_id
            ):
                out.append(ev)
        return out

    def _consumed(
        self, customer_id: str | None, external_id: str | None, meter_id: str, upto: float
    ) -> float:
        meter = self.meters[meter_id]
        prop = meter["aggregation"]["property"]
        total = 0.0
        for ev in self._matching(customer_id, external_id, meter):
            units = ev.metadata.get(prop)
            if ev.ingested_at <= upto and _is_number(units):
                total += units
        return total

    def _update_customer(self, customer_id: str, at: float) -> None:
        """The debounced ``customer_meter.update_customer`` task, run as of time ``at``."""
        customer = self.customers[customer_id]
        for meter_id in self.meters:
            consumed = self._consumed(customer_id, customer["external_id"], meter_id, at)
            credited = 0
            for ev in self.events:
                if (
                    ev.source == "system"
                    and ev.name == "meter.credited"
                    and ev.customer_id == customer_id
                    and ev.metadata.get("meter_id") == meter_id
                    and ev.ingested_at <= at
                ):
                    credited = max(0, credited + int(ev.metadata["units"]))
            row = self.rows.get((customer_id, meter_id))
            if row is None:
                row = self.rows[(customer_id, meter_id)] = _MeterRow(
                    str(uuid.uuid4()), meter_id, customer_id, at
                )
            if row.modified_at is None or (row.consumed_units, row.credited_units) != (
                consumed,
                credited,
            ):
                row.consumed_units, row.credited_units, row.modified_at = consumed, credited, at

    # -- customers -------------------------------------------------------------------------

    def _customer_json(
        self, cid: str, email: str, external_id: str | None, name: str | None
    ) -> dict[str, Any]:
        return {
            "id": cid,
            "created_at": _iso(self.clock()),
            "modified_at": None,
            "metadata": {},
            "external_id": external_id,
            "email": email,
            "email_verified": False,
            "name": name,
            "billing_address": None,
            "tax_id": None,
            "organization_id": self.org_id,
            "deleted_at": None,
            "avatar_url": "https://www.gravatar.com/avatar/0?d=404",
        }

    def _create_customer(self, request: httpx.Request) -> httpx.Response:
        body = self._body(request)
        if body is None:
            return self._violation("customer body is not a JSON object")
        try:
            sdk.CustomerCreate.model_validate(body)
        except pydantic.ValidationError as exc:
            return self._violation(f"CustomerCreate: {exc}")
        extra = set(body) - _CUSTOMER_KEYS
        if extra:
            return self._violation(f"customer: keys the SDK does not know: {sorted(extra)}")
        email: str = body["email"]
        errors: list[dict[str, Any]] = []
        local, _, domain = email.rpartition("@")
        if not local or "." not in domain or " " in email:
            errors.append(
                {
                    "loc": ["body", "email"],
                    "msg": "value is not a valid email address",
                    "type": "value_error",
                }
            )
        elif domain.lower() in _REFUSED_EMAIL_DOMAINS:
            errors.append(
                {
                    "loc": ["body", "email"],
                    "msg": f"value is not a valid email address: The domain name {domain} "
                    "does not accept email.",
                    "type": "value_error",
                }
            )
        if body.get("organization_id") is not None:
            errors.append(
                {
                    "loc": ["body", "organization_id"],
                    "msg": "Setting organization_id is disallowed when using an "
                    "organization token.",
                    "type": "organization_token",
                }
            )
        live = [c for c in self.customers.values() if c["deleted_at"] is None]
        if any(c["email"].lower() == email.lower() for c in live):
            errors.append(
                {
                    "loc": ["body", "email"],
                    "msg": "A customer with this email address already exists.",
                    "type": "value_error",
                }
            )
        ext = body.get("external_id")
        if ext is not None and any(c["external_id"] == ext for c in live):
            errors.append(
                {
                    "loc": ["body", "external_id"],
                    "msg": "A customer with this external ID already exists.",
                    "type": "value_error",
                }
            )
        if errors:
            return self._json(422, {"detail": errors})
        cid = str(uuid.uuid4())
        customer = self._customer_json(cid, email, ext, body.get("name"))
        self.customers[cid] = customer
        return self._json(201, {**customer, "members": []})

    def _state_meters(self, customer_id: str) -> list[dict[str, Any]]:
        rows = sorted(
            (r for r in self.rows.values() if r.customer_id == customer_id),
            key=lambda r: r.created_at,
        )
        return [self._row_json(r) for r in rows]

    def _customer_answer(self, customer: dict[str, Any] | None, *, state: bool) -> httpx.Response:
        if customer is None:
            return self._json(404, {"error": "ResourceNotFound", "detail": "Not found"})
        if not state:
            return self._json(200, {**customer, "members": []})
        return self._json(
            200,
            {
                **customer,
                "active_subscriptions": [],
                "granted_benefits": [],
                "active_meters": self._state_meters(customer["id"]),
            },
        )

    def _customer_meters(self, request: httpx.Request) -> httpx.Response:
        q = request.url.params
        rows = list(self.rows.values())
        if "customer_id" in q:
            rows = [r for r in rows if r.customer_id in q.get_list("customer_id")]
        if "external_customer_id" in q:
            wanted = set(q.get_list("external_customer_id"))
            rows = [r for r in rows if self.customers[r.customer_id]["external_id"] in wanted]
        if "meter_id" in q:
            rows = [r for r in rows if r.meter_id in q.get_list("meter_id")]
        rows.sort(key=lambda r: -(r.modified_at or r.created_at))
        items = [
            {
                **self._row_json(r),
                "customer_id": r.customer_id,
                "customer": self.customers[r.customer_id],
                "meter": self.meters[r.meter_id],
            }
            for r in rows
        ]
        return self._page(request, items)

    def _row_json(self, r: _MeterRow) -> dict[str, Any]:
        return {
            "id": r.id,
            "created_at": _iso(r.created_at),
            "modified_at": None if r.modified_at is None else _iso(r.modified_at),
            "meter_id": r.meter_id,
            "consumed_units": r.consumed_units,
            "credited_units": r.credited_units,
            "balance": r.balance,
        }

    def _meters(self, request: httpx.Request) -> httpx.Response:
        query = (request.url.params.get("query") or "").lower()
        items = [m for m in self.meters.values() if query in m["name"].lower()]
        return self._page(request, items)

    def _page(self, request: httpx.Request, items: list[dict[str, Any]]) -> httpx.Response:
        q = request.url.params
        page, limit = int(q.get("page", "1")), int(q.get("limit", "10"))
        if limit > 100 or limit < 1 or page < 1:
            return self._json(
                422,
                {"detail": [{"loc": ["query", "limit"], "msg": "bad page", "type": "value_error"}]},
            )
        chunk = items[(page - 1) * limit : page * limit]
        return self._json(
            200,
            {
                "items": chunk,
                "pagination": {
                    "total_count": len(items),
                    "max_page": max(1, math.ceil(len(items) / limit)),
                },
            },
        )

    # -- plumbing --------------------------------------------------------------------------

    def _body(self, request: httpx.Request) -> dict[str, Any] | None:
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            self.violations.append(f"{request.url.path}: content-type is not application/json")
        try:
            body = json.loads(request.content)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _violation(self, message: str) -> httpx.Response:
        self.violations.append(message)
        return self._json(
            422, {"detail": [{"loc": ["body"], "msg": message[:500], "type": "fake_violation"}]}
        )

    def _json(self, status: int, payload: Any) -> httpx.Response:
        return self._dated(httpx.Response(status, json=payload))

    def _dated(self, response: httpx.Response) -> httpx.Response:
        if "date" not in response.headers:
            response.headers["date"] = formatdate(self.clock(), usegmt=True)
        return response


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _parse_time(value: object) -> float | None:
    """Epoch seconds of an ISO-8601 timestamp, or None when it is naive or malformed."""
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.utcoffset() is None:
        return None
    return dt.timestamp()
