"""An in-process fake of Tier's sidecar (``tier serve``), per /work/shared/reference/tier.md.

Use it as an ``httpx.MockTransport``::

    fake = FakeTier()
    fake.add_org("org:acme", {"feature:convert": 10})        # limit 10, used 0, metered
    client = httpx.AsyncClient(transport=fake.transport())
    provider = TierProvider(base_url=FAKE_URL, client=client, outbox=None)

What it reproduces from the reference (section numbers of tier.md):

- §0 router on the exact path (a trailing slash is 404 ``not_found``); methods ignored except
  on ``/v1/clock`` (405); GET ``org`` read from the query.
- §0 strict decoding of the POST bodies of report, subscribe, checkout and clock: an unknown
  key (matched case-insensitively, as Go does) is 400 ``invalid_request``
  ``unknown field "<name>"``; bad JSON syntax is 400 ``invalid json syntax``; an empty body
  is ``{}``; a JSON type mismatch (``"n": 1.5``, ``"n": "1"``) and an unparsable or naive
  ``at`` are 500 ``internal_error``; a bad feature name is 400 ``invalid_request`` with the
  ``refs`` parse message (a versioned name in a report included).
- §0 success bodies: data as tab-indented JSON with ``application/json``; handlers that
  write nothing answer the literal ``{}`` as ``text/plain; charset=utf-8``.
- §1 error bodies ``{status, code, message}``, 4-space indented, ``application/json``.
- §2 ``/v1/limits``: unversioned names (or versioned ones with ``versioned_names=True``,
  like older sidecars), ``usage: null`` for an org without a subscription, ``Inf`` =
  9223372036854775807 for a feature with no ``upto``, random order.
- §2 ``/v1/report``: org prefix, ``org_not_found``, 500 for an org without a subscription,
  ``feature_not_found``, ``feature not reportable`` for a licensed feature, 500 for a
  negative ``n``; ``clobber`` sets the count (the SDK's documented meaning), else adds.
- §2 whois (``include=info``), phase (404 without a current phase), subscribe (plans and
  versioned features expanded through the pushed model, TERR1020 for unknown ones, cancel
  as ``phases: [{}]``), checkout, pull, push (``feature already exists``), whoami,
  payment_methods, clock.
- §0 no authentication: the ``Authorization`` header is only recorded.

Fault injection for tests: :meth:`FakeTier.inject` queues outcomes per path (an error
triple, an ``httpx.Response``, or an exception raised before or *after* the request was
applied, the latter being the lost-response case where a retry double-counts, §5), and
``down = True`` makes every request fail to connect.
"""

from __future__ import annotations

import json
import random
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

INF = 9223372036854775807
FAKE_URL = "http://tier.test"

_NAME_RE = re.compile(r"[a-zA-Z0-9:]+")
_VERSION_RE = re.compile(r"[a-zA-Z0-9]+")
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


class _Abort(Exception):
    """An error the handler turns into an error response."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _internal() -> _Abort:
    return _Abort(500, "internal_error", "Internal Server Error")


def _invalid(message: str) -> _Abort:
    return _Abort(400, "invalid_request", message)


# -- naming rules (§3) -------------------------------------------------------------------


def parse_name(s: str) -> str:
    """refs.ParseName: ``feature:[a-zA-Z0-9:]+`` or a 400 with refs' message."""
    if not s.startswith("feature:"):
        raise _invalid("feature name must start with 'feature:'")
    if not _NAME_RE.fullmatch(s[len("feature:") :]):
        raise _invalid("feature name must match [a-zA-Z0-9:]+")
    return s


def _parse_plan(s: str) -> str:
    if not s.startswith("plan:"):
        raise _invalid("plan name must start with 'plan:'")
    name, at, version = s[len("plan:") :].partition("@")
    if not at:
        raise _invalid("plan must have version")
    if not _NAME_RE.fullmatch(name):
        raise _invalid("plan name must match [a-zA-Z0-9:]+")
    if not _VERSION_RE.fullmatch(version):
        raise _invalid("plan version must match [a-zA-Z0-9]+")
    return s


def unversioned(feature_plan: str) -> str:
    """``feature:x@plan:y@0`` -> ``feature:x`` (split at the first ``@``)."""
    return feature_plan.partition("@")[0]


# -- strict decoding (§0, trweb.DecodeStrict) ---------------------------------------------

_Kind = str  # "str" | "int" | "bool" | "time" | "name" | "strlist" | "strmap" | "any" | struct


_TAX = {"automatic": "bool", "collect_id": "bool"}
_PHASE = {
    "trial": "bool",
    "effective": "time",
    "features": "strlist",
    "coupon": "str",
    "coupon_data": "any",
}
_ORG_INFO = {
    "email": "str",
    "name": "str",
    "description": "str",
    "phone": "str",
    "created": "time",
    "metadata": "strmap",
    "payment_method": "str",
    "invoice_settings": {"default_payment_method": "str"},
}
REPORT_REQUEST = {"org": "str", "feature": "name", "n": "int", "at": "time", "clobber": "bool"}
SCHEDULE_REQUEST = {
    "org": "str",
    "payment_method_id": "str",
    "info": _ORG_INFO,
    "phases": [_PHASE],
    "tax": _TAX,
}
CHECKOUT_REQUEST = {
    "org": "str",
    "trial_days": "int",
    "features": "strlist",
    "success_url": "str",
    "cancel_url": "str",
    "require_billing_address": "bool",
    "tax": _TAX,
}
CLOCK_REQUEST = {"id": "str", "name": "str", "present": "time"}
_PRICING_TIER = {"upto": "num", "price": "num", "base": "num"}
_PRICING_FEATURE = {
    "title": "str",
    "base": "num",
    "mode": "str",
    "aggregate": "str",
    "tiers": [_PRICING_TIER],
    "divide": {"by": "num", "rounding": "str"},
}
_PRICING_PLAN = {
    "title": "str",
    "currency": "str",
    "interval": "str",
    "features": ("map", _PRICING_FEATURE),
}
PRICING = {"plans": ("map", _PRICING_PLAN)}

_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", re.IGNORECASE
)


def parse_time(s: str) -> datetime:
    """Go's time.Time.UnmarshalJSON: RFC 3339 with ``Z`` or an offset, else ValueError."""
    if not _RFC3339.fullmatch(s):
        raise ValueError(f"parsing time {s!r} as RFC 3339")
    head, frac = s[:19], ""
    rest = s[19:]
    if rest.startswith("."):
        m = re.match(r"\.(\d+)", rest)
        assert m is not None
        frac, rest = m.group(1), rest[m.end() :]
    zone = "+00:00" if rest.upper() == "Z" else rest
    micro = (frac + "000000")[:6]
    return datetime.fromisoformat(f"{head}.{micro}{zone}").astimezone(UTC)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


class _Decoder:
    """Go's encoding/json with DisallowUnknownFields, for the shapes above.

    Type mismatches and unknown fields are saved (the first one wins) and decoding goes on;
    errors from custom unmarshalers (``refs.Name``, ``time.Time``) abort at once.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.saved: _Abort | None = None

    def save(self, err: _Abort) -> None:
        if self.saved is None:
            self.saved = err

    def value(self, kind: Any, v: Any) -> Any:
        if isinstance(kind, dict):
            return self.struct(kind, v)
        if isinstance(kind, list):
            if v is None:
                return None
            if not isinstance(v, list):
                self.save(_internal())
                return None
            return [self.value(kind[0], item) for item in v]
        if isinstance(kind, tuple):  # ("map", inner)
            if v is None:
                return None
            if not isinstance(v, dict):
                self.save(_internal())
                return None
            return {k: self.value(kind[1], item) for k, item in v.items()}
        if v is None:
            return None  # JSON null leaves the Go zero value
        if kind == "any":
            return v
        if kind == "str" or kind == "name":
            if not isinstance(v, str):
                if kind == "name":
                    raise _internal()  # refs.Name.UnmarshalJSON fails on a non-string
                self.save(_internal())
                return None
            return parse_name(v) if kind == "name" else v
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                self.save(_internal())  # json.UnmarshalTypeError: not mapped -> 500
                return None
            if not -(2**63) <= v < 2**63:
                self.save(_internal())
                return None
            return v
        if kind == "num":
            if isinstance(v, bool) or not isinstance(v, int | float):
                self.save(_internal())
                return None
            return v
        if kind == "bool":
            if not isinstance(v, bool):
                self.save(_internal())
                return None
            return v
        if kind == "time":
            if not isinstance(v, str):
                raise _internal()
            try:
                return parse_time(v)
            except ValueError:
                raise _internal() from None  # not mapped (§0 Timestamps)
        if kind == "strlist":
            if not isinstance(v, list):
                self.save(_internal())
                return None
            out = []
            for item in v:
                if not isinstance(item, str):
                    self.save(_internal())
                else:
                    out.append(item)
            return out
        if kind == "strmap":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                self.save(_internal())
                return None
            return v
        raise AssertionError(kind)

    def struct(self, shape: dict[str, Any], v: Any) -> dict[str, Any] | None:
        if v is None:
            return None
        if not isinstance(v, dict):
            self.save(_internal())
            return None
        out: dict[str, Any] = {}
        for key, item in v.items():
            match = next((k for k in shape if k.lower() == key.lower()), None)
            if match is None:
                if self.strict:
                    self.save(_invalid(f'unknown field "{key}"'))
                continue
            out[match] = self.value(shape[match], item)
        return out


def decode_strict(body: bytes, shape: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """trweb.DecodeStrict: the decoded body, or raises ``_Abort`` with Tier's triple."""
    if not body.strip():
        return {}  # io.EOF is accepted and treated as {}
    text = body.decode("utf-8", errors="replace").lstrip()
    try:
        # Go's Decoder reads one value and ignores what follows it; it knows no NaN.
        raw, _ = json.JSONDecoder(parse_constant=_no_constant).raw_decode(text)
    except ValueError:
        raise _invalid("invalid json syntax") from None
    dec = _Decoder(strict)
    out = dec.struct(shape, raw)
    if dec.saved is not None:
        raise dec.saved
    return out or {}


# -- state --------------------------------------------------------------------------------


@dataclass
class Line:
    """One subscription item of an org: a versioned feature with its limit and usage."""

    feature: str  # versioned, e.g. "feature:convert@plan:free@1"
    limit: int = INF
    used: int = 0
    metered: bool = True


@dataclass
class Org:
    org: str
    stripe_id: str
    info: dict[str, Any] = field(default_factory=dict)
    lines: list[Line] | None = None  # None: no subscription (usage: null)
    phases: list[dict[str, Any]] = field(default_factory=list)
    #: start of the current billing period: Stripe refuses usage timestamped before it
    period_start: datetime = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Injected:
    outcome: Any
    after: bool


class FakeTier:
    """The fake sidecar. State is public so tests can arrange and inspect it.

    Attributes:
        orgs: org id -> :class:`Org`.
        pricing: the pushed pricing model (``{"plans": {...}}``), served by ``/v1/pull``.
        requests: every request received, in order.
        reports: the successfully applied report bodies (decoded), in order.
        down: when true every request raises ``httpx.ConnectError``.
    """

    def __init__(self, *, versioned_names: bool = False, seed: int = 0) -> None:
        self.versioned_names = versioned_names
        self.orgs: dict[str, Org] = {}
        self.pricing: dict[str, Any] = {"plans": {}}
        self.requests: list[Recorded] = []
        self.reports: list[dict[str, Any]] = []
        self.down = False
        self._injected: dict[str, deque[_Injected]] = {}
        self._random = random.Random(seed)
        self._customers = 0
        self._checkouts = 0

    # -- arranging ------------------------------------------------------------------------

    def add_org(
        self,
        org: str,
        features: dict[str, int] | None = None,
        *,
        plan: str = "plan:test@1",
        licensed: tuple[str, ...] = (),
    ) -> Org:
        """Create ``org``; with ``features`` (name -> limit, ``INF`` for none), subscribe it.

        ``features=None`` leaves the org without a subscription (``usage: null``).
        ``licensed`` names features that are not metered (``feature not reportable``).
        """
        o = self._customer(org)
        if features is not None:
            o.lines = [
                Line(f"{f}@{plan}", limit, metered=f not in licensed)
                for f, limit in features.items()
            ]
        return o

    def set_line(
        self, org: str, feature: str, *, limit: int, used: int = 0, plan: str = "plan:test@1"
    ) -> Line:
        """Set (or add) one subscription line of ``org``, creating the org if needed."""
        o = self._customer(org)
        if o.lines is None:
            o.lines = []
        for line in o.lines:
            if unversioned(line.feature) == feature:
                line.limit, line.used = limit, used
                return line
        line = Line(f"{feature}@{plan}", limit, used)
        o.lines.append(line)
        return line

    def used(self, org: str, feature: str) -> int:
        """The recorded usage of ``feature`` for ``org`` (0 when there is none)."""
        o = self.orgs.get(org)
        for line in (o.lines or []) if o else []:
            if unversioned(line.feature) == feature:
                return line.used
        return 0

    def inject(self, path: str, *outcomes: Any, after: bool = False) -> None:
        """Queue outcomes for the next requests to ``path``, one per request.

        An outcome is an error triple ``(status, code, message)``, an ``httpx.Response``,
        or an exception instance to raise. With ``after=True`` the request is applied first
        and the exception raised afterwards (the response was lost: §5's retry window).
        """
        q = self._injected.setdefault(path, deque())
        for outcome in outcomes:
            q.append(_Injected(outcome, after))

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport(), base_url=FAKE_URL, **kwargs)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    # -- serving --------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        rec = Recorded(
            request.method,
            path,
            {k: request.url.params.get_list(k) for k in request.url.params},
            request.headers,
            request.content,
        )
        self.requests.append(rec)
        injected = self._injected.get(path)
        if injected:
            item = injected.popleft()
            if not item.after:
                return self._outcome(item.outcome, request)
            self._serve(rec)
            return self._outcome(item.outcome, request)
        return self._serve(rec)

    def _outcome(self, outcome: Any, request: httpx.Request) -> httpx.Response:
        if isinstance(outcome, BaseException):
            if isinstance(outcome, httpx.RequestError):
                outcome.request = request
            raise outcome
        if isinstance(outcome, httpx.Response):
            return outcome
        status, code, message = outcome
        return error_response(status, code, message)

    def _serve(self, rec: Recorded) -> httpx.Response:
        try:
            result = self._route(rec)
        except _Abort as e:
            return error_response(e.status, e.code, e.message)
        if result is None:
            # api.go ServeHTTP: nothing written -> the literal {} with no Content-Type,
            # which Go sniffs as text/plain.
            return httpx.Response(200, content=b"{}", headers={"content-type": _TEXT})
        return httpx.Response(
            200,
            content=json.dumps(result, indent="\t").encode() + b"\n",
            headers={"content-type": _JSON},
        )

    def _route(self, rec: Recorded) -> dict[str, Any] | None:
        handlers = {
            "/v1/whoami": self._whoami,
            "/v1/whois": self._whois,
            "/v1/limits": self._limits,
            "/v1/report": self._report,
            "/v1/subscribe": self._subscribe,
            "/v1/checkout": self._checkout,
            "/v1/phase": self._phase,
            "/v1/pull": self._pull,
            "/v1/push": self._push,
            "/v1/payment_methods": self._payment_methods,
            "/v1/clock": self._clock,
        }
        handler = handlers.get(rec.path)
        if handler is None:
            raise _Abort(404, "not_found", "Not Found")
        return handler(rec)

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _org_param(rec: Recorded) -> str:
        values = rec.query.get("org") or [""]
        return values[0]

    @staticmethod
    def _check_org(org: str) -> None:
        if not org.startswith("org:"):
            raise _invalid('org must be prefixed with "org:"')

    def _lookup(self, org: str) -> Org:
        self._check_org(org)
        o = self.orgs.get(org)
        if o is None:
            raise _Abort(400, "org_not_found", "org not found")
        return o

    def _customer(self, org: str) -> Org:
        o = self.orgs.get(org)
        if o is None:
            self._customers += 1
            o = self.orgs[org] = Org(org, f"cus_fake{self._customers:06d}")
        return o

    def _expand(self, items: list[str]) -> list[str]:
        """control.Expand: plans -> their versioned features; unknown -> TERR1020."""
        out: list[str] = []
        plans = self.pricing.get("plans") or {}
        for item in items:
            if item.startswith("plan:"):
                _parse_plan(item)
                if item not in plans:
                    raise _Abort(400, "TERR1020", "feature or plan not found")
                out.extend(f"{f}@{item}" for f in (plans[item].get("features") or {}))
            else:
                name, _, plan = item.partition("@")
                parse_name(name)
                if not plan or name not in ((plans.get(plan) or {}).get("features") or {}):
                    raise _Abort(400, "TERR1020", "feature or plan not found")
                out.append(item)
        return out

    def _line_for(self, versioned: str) -> Line:
        name, _, plan = versioned.partition("@")
        spec = self.pricing["plans"][plan]["features"][name] or {}
        tiers = spec.get("tiers") or []
        if not tiers:
            return Line(versioned, INF, metered=False)  # licensed: limit Inf, not reportable
        uptos = [t.get("upto") for t in tiers]
        limit = INF if any(u is None for u in uptos) else int(max(uptos))
        return Line(versioned, limit)

    # -- handlers (§2) --------------------------------------------------------------------

    def _whoami(self, rec: Recorded) -> dict[str, Any]:
        return {
            "id": "acct_fake",
            "email": "fake@example.com",
            "created": "2023-01-01T00:00:00Z",
            "key_source": "env",
            "isolated": False,
            "url": "https://dashboard.stripe.com/acct_fake/test",
        }

    def _whois(self, rec: Recorded) -> dict[str, Any]:
        org = self._org_param(rec)
        o = self._lookup(org)
        out: dict[str, Any] = {}
        if "info" in rec.query.get("include", []):
            out = {
                "email": o.info.get("email", ""),
                "name": o.info.get("name", ""),
                "description": o.info.get("description", ""),
                "phone": o.info.get("phone", ""),
                "created": "2023-01-01T00:00:00Z",
                "metadata": o.info.get("metadata") or {},
                "payment_method": o.info.get("payment_method", ""),
                "invoice_settings": {"default_payment_method": ""},
            }
        out.update({"org": org, "stripe_id": o.stripe_id})
        return out

    def _limits(self, rec: Recorded) -> dict[str, Any]:
        org = self._org_param(rec)
        o = self._lookup(org)
        usage = None
        if o.lines:
            lines = list(o.lines)
            self._random.shuffle(lines)  # a Go map: random order
            usage = [
                {
                    "feature": line.feature if self.versioned_names else unversioned(line.feature),
                    "used": line.used,
                    "limit": line.limit,
                }
                for line in lines
            ]
        return {"org": org, "usage": usage}

    def _report(self, rec: Recorded) -> None:
        req = decode_strict(rec.body, REPORT_REQUEST)
        org = req.get("org") or ""
        feature = req.get("feature") or ""
        n = req.get("n") or 0
        o = self._lookup(org)
        if o.lines is None:
            raise _internal()  # errSubscriptionNotFound is not mapped
        line = next((x for x in o.lines if unversioned(x.feature) == feature), None)
        if line is None:
            raise _Abort(400, "feature_not_found", "feature not found")
        if not line.metered:
            raise _invalid("feature not reportable")
        if n < 0:
            raise _internal()  # Stripe rejects it
        at = req.get("at")
        if at is not None and at < o.period_start:
            raise _internal()  # Stripe: timestamp outside the current period
        line.used = n if req.get("clobber") else line.used + n
        self.reports.append(req)
        return None

    def _subscribe(self, rec: Recorded) -> None:
        req = decode_strict(rec.body, SCHEDULE_REQUEST)
        org = req.get("org") or ""
        info = req.get("info")
        if info is not None:
            self._check_org(org)
            email = info.get("email") or ""
            if email and "@" not in email:
                raise _Abort(400, "invalid_email", "invalid email")
            if any(k.startswith("tier.") for k in info.get("metadata") or {}):
                raise _Abort(
                    400,
                    "invalid_metadata",
                    "metadata keys must not use reserved prefix ('tier.')",
                )
            self._customer(org).info = info
        phases = req.get("phases") or []
        if not phases:
            return None
        self._check_org(org)
        expanded = [self._expand((p or {}).get("features") or []) for p in phases]
        o = self._customer(org)
        o.phases = [{**(p or {}), "features": fs} for p, fs in zip(phases, expanded, strict=True)]
        now = datetime.now(UTC)
        current = None
        for p in o.phases:
            if p.get("effective") is None or p["effective"] <= now:
                current = p
        if current is None or not current["features"]:
            o.lines = None  # cancelled (or not started)
            return None
        old = {unversioned(x.feature): x.used for x in o.lines or []}
        o.lines = [self._line_for(f) for f in current["features"]]
        for line in o.lines:
            line.used = old.get(unversioned(line.feature), 0)
        return None

    def _checkout(self, rec: Recorded) -> dict[str, Any]:
        req = decode_strict(rec.body, CHECKOUT_REQUEST)
        self._expand(req.get("features") or [])
        self._check_org(req.get("org") or "")
        self._checkouts += 1
        return {"url": f"https://checkout.stripe.com/c/pay/cs_test_fake{self._checkouts}"}

    def _phase(self, rec: Recorded) -> dict[str, Any]:
        o = self._lookup(self._org_param(rec))
        if not o.lines:
            raise _Abort(404, "not_found", "Not Found")
        features = [x.feature for x in o.lines]
        plans = sorted({x.partition("@")[2] for x in features})
        start = o.period_start.isoformat().replace("+00:00", "Z")
        out: dict[str, Any] = {
            "effective": start,
            "features": features,
            "plans": plans,
            "current": {"effective": start, "end": "2100-01-01T00:00:00Z"},
        }
        if any((p or {}).get("trial") for p in o.phases[:1]):
            out["trial"] = True
        return out

    def _pull(self, rec: Recorded) -> dict[str, Any]:
        return self.pricing

    def _push(self, rec: Recorded) -> dict[str, Any]:
        try:
            model = decode_strict(rec.body, PRICING)
        except _Abort:
            raise _internal() from None  # FromPricingHuJSON errors are not mapped
        results = []
        plans = self.pricing.setdefault("plans", {})
        for plan, spec in (model.get("plans") or {}).items():
            for feature in (spec or {}).get("features") or {}:
                fp = f"{feature}@{plan}"
                if plan in plans and feature in (plans[plan].get("features") or {}):
                    results.append(
                        {"feature": fp, "status": "failed", "reason": "feature already exists"}
                    )
                else:
                    results.append({"feature": fp, "status": "ok", "reason": "created"})
            if plan not in plans:
                plans[plan] = json.loads(json.dumps(spec))
            else:
                plans[plan].setdefault("features", {})
                for feature, fspec in ((spec or {}).get("features") or {}).items():
                    plans[plan]["features"].setdefault(feature, fspec)
        return {"results": results} if results else {}

    def _payment_methods(self, rec: Recorded) -> dict[str, Any]:
        org = self._org_param(rec)
        self._lookup(org)
        return {"org": org, "methods": None}

    def _clock(self, rec: Recorded) -> dict[str, Any]:
        if rec.method not in ("GET", "POST"):
            raise _Abort(405, "method_not_allowed", "Method Not Allowed")
        if rec.method == "POST":
            req = decode_strict(rec.body, CLOCK_REQUEST)
            present = req.get("present") or datetime.now(UTC)
            return {
                "id": req.get("id") or "clock_fake",
                "link": "https://dashboard.stripe.com/test/test-clocks/clock_fake",
                "present": present.isoformat().replace("+00:00", "Z"),
                "status": "ready",
            }
        return {
            "id": (rec.query.get("id") or ["clock_fake"])[0],
            "link": "https://dashboard.stripe.com/test/test-clocks/clock_fake",
            "present": "2023-01-01T00:00:00Z",
            "status": "ready",
        }


def error_response(status: int, code: str, message: str) -> httpx.Response:
    """trweb.WriteError: ``{status, code, message}`` indented with 4 spaces, JSON type."""
    body = json.dumps({"status": status, "code": code, "message": message}, indent=4)
    return httpx.Response(status, content=body.encode() + b"\n", headers={"content-type": _JSON})
