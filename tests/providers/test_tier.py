"""TierProvider against the in-process fake sidecar (tests/support/tier_fake.py, per tier.md)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.tier_fake import FAKE_URL, INF, FakeTier, error_response
from usage_middleware import UNLIMITED, UsageEvent
from usage_middleware.errors import (
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
)
from usage_middleware.outbox import Outbox
from usage_middleware.providers.tier import (
    TIER_CLOUD_URL,
    FeatureLimit,
    TierProvider,
    match_feature,
    parse_limits,
    report_body,
    rfc3339,
)

AT = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)

PRICING: dict[str, Any] = {
    "plans": {
        "plan:free@1": {
            "title": "Free",
            "interval": "@monthly",
            "currency": "usd",
            "features": {
                "feature:convert": {"tiers": [{"upto": 10}]},
                "feature:seats": {},
            },
        },
        "plan:pro@1": {
            "title": "Pro",
            "features": {
                "feature:convert": {"tiers": [{"upto": 1000, "price": 1}]},
                "feature:export": {"tiers": [{"price": 2}]},
            },
        },
    }
}


@pytest.fixture
def fake() -> FakeTier:
    return FakeTier()


async def _open(fake: FakeTier, **kwargs: Any) -> TierProvider:
    kwargs.setdefault("outbox", None)
    provider = TierProvider(FAKE_URL, client=fake.client(), **kwargs)
    await provider.open()
    return provider


@pytest.fixture
async def tier(fake: FakeTier) -> AsyncIterator[TierProvider]:
    provider = await _open(fake)
    try:
        yield provider
    finally:
        await provider.aclose()


def _event(
    customer: str = "org:acme", feature: str = "feature:convert", units: int = 1, **kw: Any
) -> UsageEvent:
    kw.setdefault("at", AT)
    return UsageEvent(customer, feature, units, **kw)


# -- the fake follows the reference ---------------------------------------------------------


async def test_fake_rejects_unknown_field_with_go_message(fake: FakeTier) -> None:
    """An extra key in a report body is 400 invalid_request `unknown field "x"` (§0)."""
    fake.add_org("org:acme", {"feature:convert": 10})
    async with fake.client() as c:
        r = await c.post(
            "/v1/report",
            content=b'{"org":"org:acme","feature":"feature:convert","n":1,"x":1}',
        )
    assert r.status_code == 400
    assert r.json() == {"status": 400, "code": "invalid_request", "message": 'unknown field "x"'}
    assert fake.used("org:acme", "feature:convert") == 0


async def test_fake_decodes_like_go(fake: FakeTier) -> None:
    """Bad syntax is 400, type mismatches and naive `at` are 500, keys match case-insensitively."""
    fake.add_org("org:acme", {"feature:convert": 10})
    async with fake.client() as c:
        bad = await c.post("/v1/report", content=b"{not json")
        frac = await c.post("/v1/report", content=b'{"org":"org:acme","n":1.5}')
        naive = await c.post(
            "/v1/report",
            content=b'{"org":"org:acme","feature":"feature:convert","at":"2024-01-02T03:04:05"}',
        )
        upper = await c.post(
            "/v1/report", content=b'{"ORG":"org:acme","Feature":"feature:convert","N":2}'
        )
        empty = await c.post("/v1/report", content=b"")
    assert (bad.status_code, bad.json()["message"]) == (400, "invalid json syntax")
    assert (frac.status_code, frac.json()["code"]) == (500, "internal_error")
    assert (naive.status_code, naive.json()["code"]) == (500, "internal_error")
    assert upper.status_code == 200
    assert fake.used("org:acme", "feature:convert") == 2
    assert empty.json()["message"] == 'org must be prefixed with "org:"'


async def test_fake_success_body_is_plain_text_braces(fake: FakeTier) -> None:
    """A handler that writes nothing answers the literal {} as text/plain (§0)."""
    fake.add_org("org:acme", {"feature:convert": 10})
    async with fake.client() as c:
        r = await c.post("/v1/report", json={"org": "org:acme", "feature": "feature:convert"})
    assert r.status_code == 200
    assert r.content == b"{}"
    assert r.headers["content-type"] == "text/plain; charset=utf-8"


# -- report(): bytes on the wire -------------------------------------------------------------


async def test_report_sends_exactly_the_five_fields(fake: FakeTier, tier: TierProvider) -> None:
    """One event is one POST /v1/report of exactly {org, feature, n, at, clobber} as JSON."""
    fake.add_org("org:acme", {"feature:convert": 10})
    await tier.report([_event(units=3)])
    (req,) = fake.requests
    assert (req.method, req.path) == ("POST", "/v1/report")
    assert req.body == (
        b'{"org":"org:acme","feature":"feature:convert","n":3,'
        b'"at":"2024-01-02T03:04:05Z","clobber":false}'
    )
    assert req.headers["content-type"] == "application/json"
    assert fake.used("org:acme", "feature:convert") == 3


async def test_report_at_is_utc_rfc3339_with_z(fake: FakeTier, tier: TierProvider) -> None:
    """A non-UTC aware `at` with microseconds goes out as UTC with `Z` and its fraction."""
    fake.add_org("org:acme", {"feature:convert": 10})
    at = datetime(2024, 1, 2, 5, 4, 5, 123456, tzinfo=timezone(timedelta(hours=2)))
    await tier.report([_event(at=at)])
    assert fake.requests[0].json()["at"] == "2024-01-02T03:04:05.123456Z"
    assert fake.reports[0]["at"] == datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


async def test_report_clobber_sets_usage(fake: FakeTier, tier: TierProvider) -> None:
    """clobber=True is sent as JSON true and the sidecar sets instead of adding."""
    fake.add_org("org:acme", {"feature:convert": 10})
    await tier.report([_event(units=4)])
    await tier.report([_event(units=2, clobber=True)])
    assert fake.requests[1].json()["clobber"] is True
    assert fake.used("org:acme", "feature:convert") == 2


def test_report_body_types() -> None:
    """report_body gives an int n, a bool clobber and a string at, and nothing else."""
    body = report_body(_event(units=5, clobber=True))
    assert body == {
        "org": "org:acme",
        "feature": "feature:convert",
        "n": 5,
        "at": "2024-01-02T03:04:05Z",
        "clobber": True,
    }
    assert type(body["n"]) is int


def test_rfc3339_refuses_naive() -> None:
    """A naive datetime never reaches the wire (the sidecar would answer 500)."""
    with pytest.raises(ValueError):
        rfc3339(datetime(2024, 1, 1))


async def test_report_accepts_plain_text_braces(fake: FakeTier, tier: TierProvider) -> None:
    """A 200 `{}` with text/plain is success, not a decoding error."""
    fake.add_org("org:acme", {"feature:convert": 10})
    fake.inject(
        "/v1/report",
        httpx.Response(200, content=b"{}", headers={"content-type": "text/plain; charset=utf-8"}),
    )
    await tier.report([_event()])


async def test_report_one_event_per_call(fake: FakeTier, tier: TierProvider) -> None:
    """More than one event is refused before sending (a partial batch would double-count)."""
    with pytest.raises(ValueError):
        await tier.report([_event(), _event()])
    await tier.report([])
    assert fake.requests == []
    assert tier.max_batch == 1


async def test_report_refuses_non_org_customer_without_sending(
    fake: FakeTier, tier: TierProvider
) -> None:
    """A customer id without `org:` is a permanent error and never sent."""
    with pytest.raises(PermanentProviderError) as info:
        await tier.report([_event(customer="acme")])
    assert "org:" in info.value.message
    assert fake.requests == []


# -- error triples -> typed errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrange", "status", "code", "message", "kind"),
    [
        ("unknown org", 400, "org_not_found", "org not found", PermanentProviderError),
        ("other feature", 400, "feature_not_found", "feature not found", PermanentProviderError),
        ("licensed", 400, "invalid_request", "feature not reportable", PermanentProviderError),
    ],
)
async def test_report_error_triples(
    fake: FakeTier,
    tier: TierProvider,
    arrange: str,
    status: int,
    code: str,
    message: str,
    kind: type[ProviderError],
) -> None:
    """Tier's {status, code, message} become the right error class carrying all three."""
    if arrange == "other feature":
        fake.add_org("org:acme", {"feature:other": 10})
    elif arrange == "licensed":
        fake.add_org("org:acme", {"feature:convert": INF}, licensed=("feature:convert",))
    with pytest.raises(ProviderError) as info:
        await tier.report([_event()])
    err = info.value
    assert type(err) is kind
    assert (err.status, err.code, err.message) == (status, code, message)


@pytest.mark.parametrize(
    ("outcome", "kind", "code"),
    [
        (
            (500, "TERR1050", "Stripe reported a customer was created..."),
            PermanentProviderError,
            "TERR1050",
        ),
        (
            (400, "invalid_request", "invalid json syntax"),
            PermanentProviderError,
            "invalid_request",
        ),
        ((401, "invalid_api_key", "invalid api key"), RetryableProviderError, "invalid_api_key"),
        ((401, "account_invalid", ""), RetryableProviderError, "account_invalid"),
        (
            (502, "internal_error", "Internal Server Error"),
            RetryableProviderError,
            "internal_error",
        ),
    ],
)
async def test_injected_error_classes(
    fake: FakeTier, tier: TierProvider, outcome: tuple[int, str, str], kind: type, code: str
) -> None:
    """TERR1050 and 400s are permanent; 401 (the sidecar's Stripe key) and 5xx retry."""
    fake.inject("/v1/report", outcome)
    with pytest.raises(ProviderError) as info:
        await tier.report([_event()])
    assert type(info.value) is kind
    assert (info.value.status, info.value.code) == (outcome[0], code)
    assert info.value.message  # account_invalid's empty message is replaced by its code


async def test_report_500_without_subscription_is_permanent(
    fake: FakeTier, tier: TierProvider
) -> None:
    """A 500 for an org without a subscription (usage: null) is diagnosed as permanent."""
    fake.add_org("org:acme")
    with pytest.raises(PermanentProviderError) as info:
        await tier.report([_event()])
    err = info.value
    assert (err.status, err.code) == (500, "internal_error")
    assert "no active Tier subscription" in err.message
    assert fake.paths() == ["/v1/report", "/v1/limits"]


async def test_report_500_before_billing_period_is_permanent(
    fake: FakeTier, tier: TierProvider
) -> None:
    """A 500 for usage timestamped before the current billing period is permanent."""
    org = fake.add_org("org:acme", {"feature:convert": 10})
    org.period_start = AT + timedelta(days=1)
    with pytest.raises(PermanentProviderError) as info:
        await tier.report([_event()])
    assert "before the current billing period" in info.value.message
    assert fake.paths() == ["/v1/report", "/v1/limits", "/v1/phase"]


async def test_report_500_stripe_trouble_is_retryable(fake: FakeTier, tier: TierProvider) -> None:
    """A 500 for a subscribed org and a current `at` stays retryable, as does a failed probe."""
    fake.add_org("org:acme", {"feature:convert": 10})
    fake.inject("/v1/report", (500, "internal_error", "Internal Server Error"))
    with pytest.raises(RetryableProviderError) as info:
        await tier.report([_event()])
    assert info.value.message == "Internal Server Error"
    fake.inject("/v1/report", (500, "internal_error", "Internal Server Error"))
    fake.inject("/v1/limits", httpx.ConnectError("refused"))
    with pytest.raises(RetryableProviderError):
        await tier.report([_event()])
    assert fake.used("org:acme", "feature:convert") == 0


async def test_429_retry_after(fake: FakeTier, tier: TierProvider) -> None:
    """429 is retryable and carries Retry-After seconds."""
    resp = error_response(429, "rate_limited", "slow down")
    resp.headers["retry-after"] = "7"
    fake.inject("/v1/report", resp)
    with pytest.raises(RetryableProviderError) as info:
        await tier.report([_event()])
    assert info.value.retry_after == 7.0


async def test_non_json_error_body(fake: FakeTier, tier: TierProvider) -> None:
    """A proxy's HTML 503 is a retryable error with the status and no code."""
    fake.inject(
        "/v1/report",
        httpx.Response(
            503, content=b"<html>Bad gateway</html>", headers={"content-type": "text/html"}
        ),
    )
    with pytest.raises(RetryableProviderError) as info:
        await tier.report([_event()])
    assert (info.value.status, info.value.code) == (503, None)
    assert "503" in info.value.message


async def test_wrong_path_is_retryable_not_found(fake: FakeTier) -> None:
    """A wrong base URL path gets Tier's 404 not_found: retryable (config, not the event)."""
    fake.add_org("org:acme", {"feature:convert": 10})
    tier = TierProvider(FAKE_URL + "/tier", client=fake.client(), outbox=None)
    await tier.open()
    try:
        with pytest.raises(RetryableProviderError) as info:
            await tier.report([_event()])
    finally:
        await tier.aclose()
    assert (info.value.status, info.value.code, info.value.message) == (
        404,
        "not_found",
        "Not Found",
    )
    assert fake.requests[0].path == "/tier/v1/report"


async def test_connect_error_is_retryable_and_not_sent(fake: FakeTier, tier: TierProvider) -> None:
    """A refused connection is retryable with the httpx error as original_error."""
    fake.add_org("org:acme", {"feature:convert": 10})
    fake.down = True
    with pytest.raises(RetryableProviderError) as info:
        await tier.report([_event()])
    assert isinstance(info.value.original_error, httpx.ConnectError)
    assert info.value.status is None
    assert fake.used("org:acme", "feature:convert") == 0


async def test_lost_response_retry_counts_twice(fake: FakeTier, tier: TierProvider) -> None:
    """A read timeout after the sidecar applied the report retries and double-counts (§5)."""
    fake.add_org("org:acme", {"feature:convert": 10})
    fake.inject("/v1/report", httpx.ReadTimeout("timed out"), after=True)
    event = _event(units=2)
    with pytest.raises(RetryableProviderError) as info:
        await tier.report([event])
    assert "twice" in info.value.message
    await tier.report([event])  # the reporter's retry
    assert fake.used("org:acme", "feature:convert") == 4


# -- limits and fetch ---------------------------------------------------------------------------


async def test_limits_usage_null_is_empty(fake: FakeTier, tier: TierProvider) -> None:
    """`usage: null` (org without a subscription) is no lines, not a crash."""
    fake.add_org("org:acme")
    assert await tier.limits("org:acme") == []
    ent = await tier.fetch("org:acme", "feature:convert")
    assert (ent.limit, ent.used, ent.remaining) == (0, 0, 0)
    assert ent.reason == "feature not in plan"


async def test_fetch_in_plan(fake: FakeTier, tier: TierProvider) -> None:
    """A feature in the plan gives limit, used and remaining = limit - used."""
    fake.add_org("org:acme", {"feature:convert": 10, "feature:other": 5})
    fake.set_line("org:acme", "feature:convert", limit=10, used=7)
    ent = await tier.fetch("org:acme", "feature:convert")
    assert (ent.limit, ent.used, ent.remaining, ent.reason) == (10, 7, 3, None)
    req = fake.requests[0]
    assert (req.method, req.path, req.query) == ("GET", "/v1/limits", {"org": ["org:acme"]})


async def test_fetch_over_limit_has_nothing_remaining(fake: FakeTier, tier: TierProvider) -> None:
    """Usage above the limit (overage) gives remaining 0, never negative."""
    fake.set_line("org:acme", "feature:convert", limit=10, used=12)
    ent = await tier.fetch("org:acme", "feature:convert")
    assert (ent.limit, ent.used, ent.remaining) == (10, 12, 0)


async def test_fetch_infinite_limit(fake: FakeTier, tier: TierProvider) -> None:
    """9223372036854775807 stays UNLIMITED, whatever was used."""
    fake.set_line("org:acme", "feature:convert", limit=INF, used=10**6)
    ent = await tier.fetch("org:acme", "feature:convert")
    assert ent.limit == UNLIMITED
    assert ent.remaining == UNLIMITED


async def test_fetch_feature_absent(fake: FakeTier, tier: TierProvider) -> None:
    """A feature the plan lacks is limit 0, used 0, denied as Tier's 0 < 0."""
    fake.add_org("org:acme", {"feature:other": 10})
    ent = await tier.fetch("org:acme", "feature:convert")
    assert (ent.limit, ent.used, ent.remaining, ent.reason) == (0, 0, 0, "feature not in plan")


async def test_fetch_versioned_names_from_older_sidecars() -> None:
    """`feature:x@plan:free@1` lines match feature:x; feature:xy does not."""
    fake = FakeTier(versioned_names=True)
    fake.add_org("org:acme", {"feature:convertx": 99, "feature:convert": 10}, plan="plan:free@1")
    tier = await _open(fake)
    try:
        lines = await tier.limits("org:acme")
        ent = await tier.fetch("org:acme", "feature:convert")
    finally:
        await tier.aclose()
    assert {x.feature for x in lines} == {
        "feature:convert@plan:free@1",
        "feature:convertx@plan:free@1",
    }
    assert (ent.limit, ent.remaining) == (10, 10)


def test_match_feature_first_match() -> None:
    """With two versions of one feature the first line wins, as the JS SDK."""
    lines = [
        FeatureLimit("feature:x@plan:a@1", 1, 5),
        FeatureLimit("feature:x", 0, 9),
        FeatureLimit("feature:x:y", 0, 100),
    ]
    assert match_feature(lines, "feature:x") is lines[0]
    assert match_feature(lines, "feature:x:y") is lines[2]
    assert match_feature(lines, "feature:z") is None


def test_parse_limits_shapes() -> None:
    """usage null -> []; a malformed body or line -> retryable invalid_response."""
    assert parse_limits({"org": "org:a", "usage": None}) == []
    assert parse_limits(
        {"org": "org:a", "usage": [{"feature": "feature:x", "used": 1, "limit": INF}]}
    ) == [FeatureLimit("feature:x", 1, INF)]
    for bad in (
        {"org": "org:a"},
        {"usage": {}},
        {"usage": [{"feature": "feature:x", "limit": "9"}]},
        {"usage": [{"feature": "feature:x", "used": True, "limit": 1}]},
    ):
        with pytest.raises(RetryableProviderError) as info:
            parse_limits(bad)
        assert info.value.code == "invalid_response"


async def test_fetch_non_org_customer_is_denied_without_a_call(
    fake: FakeTier, tier: TierProvider
) -> None:
    """A customer id without `org:` (or a bare `org:`) is denied with a reason, never sent."""
    for customer in ("acme", "org:"):
        ent = await tier.fetch(customer, "feature:convert")
        assert ent.remaining == 0
        assert ent.reason is not None and '"org:"' in ent.reason
    assert fake.requests == []


async def test_fetch_unknown_org_is_denied(fake: FakeTier, tier: TierProvider) -> None:
    """An org Tier does not know is denied (not failed open as in Tier's SDKs)."""
    ent = await tier.fetch("org:nobody", "feature:convert")
    assert (ent.limit, ent.used, ent.remaining) == (0, 0, 0)
    assert ent.reason == "org not found in Tier"
    with pytest.raises(PermanentProviderError) as info:
        await tier.limits("org:nobody")
    assert (info.value.status, info.value.code, info.value.message) == (
        400,
        "org_not_found",
        "org not found",
    )


async def test_limits_non_json_200(fake: FakeTier, tier: TierProvider) -> None:
    """A 200 that is not JSON on a data endpoint is a retryable invalid_response."""
    fake.inject("/v1/limits", httpx.Response(200, content=b"<html>captive portal</html>"))
    with pytest.raises(RetryableProviderError) as info:
        await tier.limits("org:acme")
    assert info.value.code == "invalid_response"


# -- auth and configuration ---------------------------------------------------------------------


async def test_basic_auth_only_with_key(fake: FakeTier) -> None:
    """With a key: `Basic base64(key:)`; without: no Authorization header at all."""
    fake.add_org("org:acme", {"feature:convert": 10})
    keyed = await _open(fake, api_key="sk_test_123")
    plain = await _open(fake)
    try:
        await keyed.limits("org:acme")
        await plain.limits("org:acme")
    finally:
        await keyed.aclose()
        await plain.aclose()
    expected = "Basic " + base64.b64encode(b"sk_test_123:").decode()
    assert fake.requests[0].headers["authorization"] == expected
    assert "authorization" not in fake.requests[1].headers


async def test_clock_header(fake: FakeTier) -> None:
    """clock= sends Tier-Clock on every request."""
    fake.add_org("org:acme", {"feature:convert": 10})
    tier = await _open(fake, clock="clock_123")
    try:
        await tier.limits("org:acme")
    finally:
        await tier.aclose()
    assert fake.requests[0].headers["tier-clock"] == "clock_123"


def test_key_is_not_in_repr() -> None:
    """repr never shows the API key."""
    tier = TierProvider(api_key="sk_secret_1", outbox=None)
    assert "sk_secret_1" not in repr(tier)
    assert tier.base_url == TIER_CLOUD_URL


@pytest.mark.parametrize(
    ("env", "url", "auth"),
    [
        ({"TIER_API_KEY": "k1"}, "https://api.tier.run", True),
        ({"TIER_BASE_URL": "http://127.0.0.1:8080/"}, "http://127.0.0.1:8080", False),
        (
            {"TIER_BASE_URL": "http://sidecar:9000", "TIER_API_KEY": "k1"},
            "http://sidecar:9000",
            True,
        ),
        ({"TIER_BASE_URL": "", "TIER_API_KEY": "k1"}, "https://api.tier.run", True),
    ],
)
def test_from_env(env: dict[str, str], url: str, auth: bool) -> None:
    """A key alone means Tier Cloud; a URL alone a sidecar without auth; empty means unset."""
    tier = TierProvider.from_env(env, outbox=None)
    assert tier.base_url == url
    assert tier._has_key is auth


@pytest.mark.parametrize("env", [{}, {"TIER_BASE_URL": "", "TIER_API_KEY": ""}])
def test_from_env_neither(env: dict[str, str]) -> None:
    """Neither variable is a ConfigurationError naming both and the sidecar address."""
    with pytest.raises(ConfigurationError) as info:
        TierProvider.from_env(env, outbox=None)
    msg = str(info.value)
    assert "TIER_BASE_URL" in msg and "TIER_API_KEY" in msg and "http://127.0.0.1:8080" in msg


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a mapping, from_env reads os.environ."""
    monkeypatch.setenv("TIER_BASE_URL", "http://127.0.0.1:8080")
    monkeypatch.delenv("TIER_API_KEY", raising=False)
    assert TierProvider.from_env(outbox=None).base_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "ftp://x", "http://x/?a=1", "http://"])
def test_bad_base_url(url: str) -> None:
    """A base URL that is not http(s)://host[/path] is refused at construction."""
    with pytest.raises(ConfigurationError):
        TierProvider(url, outbox=None)


def test_constructor_needs_url_or_key() -> None:
    """No base_url and no api_key is a ConfigurationError naming the sidecar address."""
    with pytest.raises(ConfigurationError, match=r"127\.0\.0\.1:8080"):
        TierProvider(outbox=None)


async def test_make_client_has_timeouts() -> None:
    """The client TierProvider makes has a read timeout and a connection pool limit."""
    tier = TierProvider("http://127.0.0.1:8080", report_timeout=7.0, outbox=None)
    client = tier.make_client()
    try:
        assert client.timeout.read == 7.0
        assert client.timeout.connect is not None
    finally:
        await client.aclose()


# -- admin methods ------------------------------------------------------------------------------


async def test_push_pull_roundtrip(fake: FakeTier, tier: TierProvider, tmp_path: Path) -> None:
    """push(path) sends the file's bytes to /v1/push; pull() returns the model; a re-push fails."""
    path = tmp_path / "pricing.json"
    path.write_text(json.dumps(PRICING))
    first = await tier.push(path)
    assert fake.requests[0].body == path.read_bytes()
    assert {r["status"] for r in first["results"]} == {"ok"}
    assert await tier.pull() == PRICING
    again = await tier.push(PRICING)
    assert {(r["status"], r["reason"]) for r in again["results"]} == {
        ("failed", "feature already exists")
    }


async def test_push_bad_model_is_500(fake: FakeTier, tier: TierProvider) -> None:
    """A model the sidecar cannot decode strictly comes back as a retryable 500 (§2)."""
    with pytest.raises(RetryableProviderError) as info:
        await tier.push({"plans": {}, "extra": 1})
    assert (info.value.status, info.value.code) == (500, "internal_error")


async def test_subscribe_limits_cancel(fake: FakeTier, tier: TierProvider) -> None:
    """subscribe(plan) -> limits follow the plan; cancel sends phases [{}] -> usage null."""
    fake.pricing = json.loads(json.dumps(PRICING))
    await tier.subscribe("org:acme", "plan:free@1", info={"email": "a@acme.test", "name": "Acme"})
    assert fake.requests[0].json() == {
        "org": "org:acme",
        "phases": [{"features": ["plan:free@1"]}],
        "info": {"email": "a@acme.test", "name": "Acme"},
    }
    lines = {x.name: x for x in await tier.limits("org:acme")}
    assert lines["feature:convert"].limit == 10
    assert lines["feature:seats"].unlimited
    phase = await tier.phase("org:acme")
    assert phase["plans"] == ["plan:free@1"]
    await tier.cancel("org:acme")
    assert fake.requests[-1].body == b'{"org":"org:acme","phases":[{}]}'
    assert await tier.limits("org:acme") == []
    with pytest.raises(PermanentProviderError) as info:
        await tier.phase("org:acme")
    assert (info.value.status, info.value.code) == (404, "not_found")


async def test_subscribe_trial_days_phases(fake: FakeTier, tier: TierProvider) -> None:
    """trial_days prepends a trial phase and starts the paid phase that many days later."""
    fake.pricing = json.loads(json.dumps(PRICING))
    start = datetime(2024, 1, 1, tzinfo=UTC)
    await tier.subscribe(
        "org:acme",
        "plan:pro@1",
        "feature:convert@plan:free@1",
        effective=start,
        trial_days=14,
        payment_method_id="pm_1",
        tax={"automatic": True},
    )
    assert fake.requests[0].json() == {
        "org": "org:acme",
        "phases": [
            {
                "trial": True,
                "features": ["plan:pro@1", "feature:convert@plan:free@1"],
                "effective": "2024-01-01T00:00:00Z",
            },
            {
                "features": ["plan:pro@1", "feature:convert@plan:free@1"],
                "effective": "2024-01-15T00:00:00Z",
            },
        ],
        "payment_method_id": "pm_1",
        "tax": {"automatic": True},
    }


async def test_subscribe_unknown_plan_terr1020(fake: FakeTier, tier: TierProvider) -> None:
    """An unknown plan is TERR1020 `feature or plan not found`, permanent."""
    with pytest.raises(PermanentProviderError) as info:
        await tier.subscribe("org:acme", "plan:nope@1")
    assert (info.value.status, info.value.code, info.value.message) == (
        400,
        "TERR1020",
        "feature or plan not found",
    )


async def test_subscribe_refuses_bad_arguments_locally(fake: FakeTier, tier: TierProvider) -> None:
    """Unknown info keys, trial_days without features, and bad org ids raise ValueError unsent."""
    with pytest.raises(ValueError):
        await tier.subscribe("org:acme", info={"emial": "x"})
    with pytest.raises(ValueError):
        await tier.subscribe("org:acme", trial_days=3)
    with pytest.raises(ValueError):
        await tier.subscribe("acme", "plan:free@1")
    assert fake.requests == []


async def test_whois(fake: FakeTier, tier: TierProvider) -> None:
    """whois reads /v1/whois?org=, with include=info only when asked."""
    fake.pricing = json.loads(json.dumps(PRICING))
    await tier.subscribe("org:acme", info={"email": "a@acme.test"})
    short = await tier.whois("org:acme")
    full = await tier.whois("org:acme", include_info=True)
    assert set(short) == {"org", "stripe_id"}
    assert full["email"] == "a@acme.test"
    assert fake.requests[1].query == {"org": ["org:acme"]}
    assert fake.requests[2].query == {"org": ["org:acme"], "include": ["info"]}
    with pytest.raises(PermanentProviderError) as info:
        await tier.whois("org:nobody")
    assert info.value.code == "org_not_found"


async def test_checkout(fake: FakeTier, tier: TierProvider) -> None:
    """checkout posts a strict CheckoutRequest and returns the URL."""
    fake.pricing = json.loads(json.dumps(PRICING))
    url = await tier.checkout(
        "org:acme",
        "https://app.test/ok",
        features=["plan:pro@1"],
        cancel_url="https://app.test/cancel",
        trial_days=7,
        require_billing_address=True,
    )
    assert url.startswith("https://checkout.stripe.com/")
    assert fake.requests[0].json() == {
        "org": "org:acme",
        "success_url": "https://app.test/ok",
        "features": ["plan:pro@1"],
        "trial_days": 7,
        "cancel_url": "https://app.test/cancel",
        "require_billing_address": True,
    }
    setup = await tier.checkout("org:acme", "https://app.test/ok")
    assert setup.startswith("https://checkout.stripe.com/")
    assert fake.requests[1].json() == {"org": "org:acme", "success_url": "https://app.test/ok"}


# -- through RemoteProvider: can(), reservations, delivery ---------------------------------------


async def drain(provider: TierProvider, within: float = 5.0) -> None:
    """Wait until every accepted charge left the durable outbox (bounded by ``within``)."""
    reporter: Any = provider.reporter
    if reporter is None:
        assert await provider.flush(within)
        return
    async with asyncio.timeout(within):
        while True:
            await reporter.flush()
            status = await reporter.outbox_status()
            if status.depth == 0:
                return
            await asyncio.sleep(0.01)


async def test_can_allows_used_plus_units_up_to_limit(fake: FakeTier, tier: TierProvider) -> None:
    """ok = used + units <= limit: 3 used of 5 allows 2, denies 3 (402: err None)."""
    fake.set_line("org:acme", "feature:convert", limit=5, used=3)
    yes = await tier.can("org:acme", "feature:convert", 2)
    no = await tier.can("org:acme", "feature:convert", 3)
    assert (yes.ok, yes.err, yes.limit, yes.used, yes.remaining) == (True, None, 5, 3, 2)
    assert (no.ok, no.err) == (False, None)
    assert no.reason
    assert fake.paths() == ["/v1/limits"]  # the second answer came from the cache
    assert no.cached


async def test_can_unknown_org_and_bad_ids_are_402(fake: FakeTier, tier: TierProvider) -> None:
    """An unknown org and a non-org customer id are denials (ok False, err None), not failures."""
    unknown = await tier.can("org:nobody", "feature:convert")
    bad = await tier.can("customer-1", "feature:convert")
    assert (unknown.ok, unknown.err, unknown.reason) == (False, None, "org not found in Tier")
    assert (bad.ok, bad.err) == (False, None)
    assert bad.reason is not None and "org:" in bad.reason
    assert fake.paths() == ["/v1/limits"]


async def test_can_usage_null_and_unlimited(fake: FakeTier, tier: TierProvider) -> None:
    """usage: null denies; an Inf limit allows any units and reports UNLIMITED remaining."""
    fake.add_org("org:none")
    fake.add_org("org:big", {"feature:convert": INF})
    none = await tier.can("org:none", "feature:convert")
    big = await tier.can("org:big", "feature:convert", 10**9)
    assert (none.ok, none.err, none.reason) == (False, None, "feature not in plan")
    assert (big.ok, big.limit, big.remaining) == (True, UNLIMITED, UNLIMITED)


async def test_fails_open_by_default_and_still_charges(fake: FakeTier) -> None:
    """Tier down: the check fails open (ok, err set); the charge is delivered once Tier is back."""
    fake.add_org("org:acme", {"feature:convert": 10})
    tier = await _open(fake)
    try:
        fake.down = True
        reservation = await tier.reserve("org:acme", "feature:convert", 2)
        assert reservation.answer.ok is True
        assert isinstance(reservation.answer.err, RetryableProviderError)
        await tier.prepare(reservation)
        await tier.commit(reservation)
        fake.down = False
        await drain(tier)
    finally:
        await tier.aclose()
    assert fake.used("org:acme", "feature:convert") == 2


async def test_fails_closed_on_request(fake: FakeTier) -> None:
    """failure_policy='closed': Tier down gives ok False with err and retry_after (a 503)."""
    tier = await _open(fake, failure_policy="closed")
    try:
        fake.down = True
        answer = await tier.can("org:acme", "feature:convert")
        reservation = await tier.reserve("org:acme", "feature:convert")
    finally:
        await tier.aclose()
    assert (answer.ok, type(answer.err)) == (False, RetryableProviderError)
    assert answer.retry_after is not None and answer.retry_after >= 1
    assert reservation.answer.ok is False


async def test_reserve_commit_through_the_durable_outbox(fake: FakeTier, tmp_path: Path) -> None:
    """reserve/prepare/commit goes through the Reporter's outbox to /v1/report: the two charges
    of one org and feature summed into one report (aggregation), the released one never."""
    fake.add_org("org:acme", {"feature:convert": 10})
    tier = await _open(fake, outbox=tmp_path / "outbox.db")
    try:
        assert tier.reporter is not None
        done = []
        for units in (1, 2):
            r = await tier.reserve("org:acme", "feature:convert", units)
            assert r.answer.ok
            await tier.prepare(r)
            await tier.commit(r)
            done.append(r)
        released = await tier.reserve("org:acme", "feature:convert", 4)
        await tier.prepare(released)
        await tier.release(released)
        await drain(tier)
    finally:
        await tier.aclose()
    assert fake.used("org:acme", "feature:convert") == 3
    bodies = [r.json() for r in fake.requests if r.path == "/v1/report"]
    assert [b["n"] for b in bodies] == [3]
    assert all(set(b) == {"org", "feature", "n", "at", "clobber"} for b in bodies)


async def test_permanent_report_error_is_dead_lettered(fake: FakeTier, tmp_path: Path) -> None:
    """A charge Tier refuses (feature not reportable) is dead-lettered with Tier's triple."""
    fake.add_org("org:acme", {"feature:seats": INF}, licensed=("feature:seats",))
    tier = await _open(fake, outbox=tmp_path / "outbox.db")
    reporter: Any = tier.reporter
    try:
        r = await tier.reserve("org:acme", "feature:seats", 1)
        assert r.answer.ok
        await tier.prepare(r)
        await tier.commit(r)
        await drain(tier)
        status = await reporter.outbox_status()
    finally:
        await tier.aclose()
    assert status.dead_letters == 1
    outbox = Outbox(tmp_path / "outbox.db", create=False)
    try:
        (dead,) = outbox.dead_letters()
    finally:
        outbox.close()
    assert (dead.status, dead.code, dead.message) == (
        400,
        "invalid_request",
        "feature not reportable",
    )
    assert (dead.event.customer, dead.event.feature, dead.event.units) == (
        "org:acme",
        "feature:seats",
        1,
    )


async def test_answer_report_mirrors_tier_sdk(fake: FakeTier, tier: TierProvider) -> None:
    """answer.report(n, at=, clobber=) sends Tier's report(org, feature, n, {at, clobber})."""
    fake.add_org("org:acme", {"feature:convert": 10})
    answer = await tier.can("org:acme", "feature:convert")
    await answer.report(7, at=AT, clobber=True)
    assert fake.requests[-1].body == (
        b'{"org":"org:acme","feature":"feature:convert","n":7,'
        b'"at":"2024-01-02T03:04:05Z","clobber":true}'
    )
    assert fake.used("org:acme", "feature:convert") == 7


async def test_open_creates_and_aclose_closes_the_client() -> None:
    """Without an injected client, open() makes one in the loop and aclose() closes it."""
    tier = TierProvider("http://127.0.0.1:8080", outbox=None)
    with pytest.raises(ConfigurationError):
        tier.http  # noqa: B018 - not open yet
    await tier.open()
    client = tier.http
    assert client.timeout.connect == tier.timeout
    assert client.headers["user-agent"].startswith("usage-middleware/")
    await tier.aclose()
    assert client.is_closed


def test_reporter_never_cuts_a_report_short(tmp_path: Path) -> None:
    """The outbox Reporter's call timeout is longer than report_timeout (no early cut-off)."""
    tier = TierProvider(FAKE_URL, outbox=tmp_path / "outbox.db", report_timeout=45.0)
    reporter: Any = tier.make_reporter()  # built, not started
    assert reporter._call_timeout == 50.0
    assert reporter.max_batch == 1


# -- end to end: UsageMiddleware + @metered + TierProvider ---------------------------------------


def _app(tier: TierProvider) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from usage_middleware.customers import customer_from_header
    from usage_middleware.decorator import metered
    from usage_middleware.middleware import UsageMiddleware

    @metered("feature:convert", units=2)
    async def convert(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    @metered("feature:convert", units=2)
    async def broken(request: Any) -> JSONResponse:
        return JSONResponse({"error": "boom"}, status_code=500)

    app = Starlette(routes=[Route("/convert", convert), Route("/broken", broken)])
    return UsageMiddleware(app, provider=tier, customer=customer_from_header("x-org"))


async def test_end_to_end_charges_served_requests_only(fake: FakeTier, tmp_path: Path) -> None:
    """Over HTTP: 2xx charged to Tier, 5xx not, over-limit 402, Tier down served (fail open)."""
    fake.add_org("org:acme", {"feature:convert": 100})
    fake.add_org("org:small", {"feature:convert": 1})
    tier = TierProvider(FAKE_URL, client=fake.client(), outbox=tmp_path / "outbox.db")
    transport = httpx.ASGITransport(app=_app(tier))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            acme = {"x-org": "org:acme"}
            assert (await http.get("/convert", headers=acme)).status_code == 200
            assert (await http.get("/broken", headers=acme)).status_code == 500
            assert (await http.get("/convert", headers=acme)).status_code == 200
            denied = await http.get("/convert", headers={"x-org": "org:small"})
            assert denied.status_code == 402
            assert denied.headers["content-type"].startswith("application/problem+json")
            fake.down = True
            served = await http.get("/convert", headers={"x-org": "org:other"})
            assert served.status_code == 200
            fake.down = False
            fake.add_org("org:other", {"feature:convert": 5})
            await drain(tier)
    finally:
        await tier.aclose()
    assert fake.used("org:acme", "feature:convert") == 4
    assert fake.used("org:small", "feature:convert") == 0
    assert fake.used("org:other", "feature:convert") == 2


def _seats_app(provider: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from usage_middleware.customers import customer_from_header
    from usage_middleware.decorator import metered
    from usage_middleware.middleware import UsageMiddleware

    def seats(request: Any) -> int:
        return int(request.query_params["n"])

    @metered("feature:seats", units=seats, clobber=True)
    async def set_seats(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/seats", set_seats, methods=["POST"])])
    return UsageMiddleware(app, provider=provider, customer=customer_from_header("x-org"))


async def test_metered_clobber_sets_usage_in_tier(fake: FakeTier, tmp_path: Path) -> None:
    """@metered(clobber=True): a set within the limit is served and reported as clobber:true
    (the count becomes n, not used + n); a set above the limit is refused with 402."""
    fake.add_org("org:acme", {"feature:seats": 10})
    tier = TierProvider(FAKE_URL, client=fake.client(), outbox=tmp_path / "outbox.db")
    transport = httpx.ASGITransport(app=_seats_app(tier))
    headers = {"x-org": "org:acme"}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            assert (await http.post("/seats?n=7", headers=headers)).status_code == 200
            await drain(tier)
            assert (await http.post("/seats?n=4", headers=headers)).status_code == 200
            await drain(tier)
            refused = await http.post("/seats?n=11", headers=headers)
            assert refused.status_code == 402
    finally:
        await tier.aclose()
    assert fake.used("org:acme", "feature:seats") == 4
    assert [(r["n"], r["clobber"]) for r in fake.reports] == [(7, True), (4, True)]


async def test_clobber_on_a_provider_that_only_adds_fails_at_start_up(tmp_path: Path) -> None:
    """@metered(clobber=True) with LocalLedger: the lifespan start-up fails, naming the fix."""
    from usage_middleware.ledger import LocalLedger

    app = _seats_app(LocalLedger(tmp_path / "usage.db"))
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    messages.put_nowait({"type": "lifespan.startup"})

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, messages.get, send)
    )
    try:
        first = await asyncio.wait_for(sent.get(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.provider.aclose()
    assert first["type"] == "lifespan.startup.failed"
    assert "clobber=True" in first["message"] and "TierProvider" in first["message"]


def test_drain_timeout_reaches_the_outbox_reporter(tmp_path: Path) -> None:
    """RemoteProvider(drain_timeout=...) sets how long the durable outbox drains at close."""
    tier = TierProvider(FAKE_URL, drain_timeout=30, outbox=tmp_path / "outbox.db")
    assert tier.make_reporter().drain_timeout == 30


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, content=b"<html>app</html>", headers={"content-type": "text/html"}),
        httpx.Response(200, content=b""),
        httpx.Response(200, content=b"[]"),
    ],
    ids=["html", "empty", "json-array"],
)
async def test_report_2xx_that_is_not_a_json_object_is_not_delivered(
    fake: FakeTier, tier: TierProvider, caplog: pytest.LogCaptureFixture, answer: httpx.Response
) -> None:
    """A 200 to /v1/report whose body is not a JSON object (§2: Tier answers `{}`) is a
    retryable failure logged naming the base URL, not a delivered report."""
    fake.add_org("org:acme", {"feature:convert": 10})
    fake.inject("/v1/report", answer)
    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        with pytest.raises(RetryableProviderError) as info:
            await tier.report([_event(units=3)])
    assert info.value.code == "invalid_response" and FAKE_URL in str(info.value)
    assert any(FAKE_URL in r.getMessage() for r in caplog.records)
    await tier.report([_event(units=3)])  # Tier's own `{}` is a delivery
    assert fake.used("org:acme", "feature:convert") == 3


async def test_report_oversized_2xx_still_counts_as_delivered(fake: FakeTier) -> None:
    """A 2xx report answer too large to read still counts as delivered (issue 12.4: a
    resend could count twice); only a readable non-object body is refused."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/report":
            fake.handle(request)
            return httpx.Response(200, content=b"<" + b"x" * 4096)
        return fake.handle(request)

    fake.add_org("org:acme", {"feature:convert": 10})
    provider = TierProvider(
        FAKE_URL,
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        outbox=None,
        max_body=1024,
    )
    await provider.open()
    try:
        await provider.report([_event(units=2)])
    finally:
        await provider.aclose()
    assert fake.used("org:acme", "feature:convert") == 2


async def test_always_ask_refusal_after_a_delivery_during_the_check_asks_again(
    fake: FakeTier,
) -> None:
    """cache_ttl=0, limit 5, 4 used: a report delivered while /v1/limits was in flight
    (Tier counted it, the answer is ambiguous) does not make the 5th request a 402; the
    provider asks once more (exactly one extra /v1/limits) and allows it."""
    import asyncio

    fake.add_org("org:acme", {"feature:convert": 5})
    report_gate = asyncio.Event()
    during_limits = False

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal during_limits
        if request.url.path == "/v1/report" and len(fake.reports) == 3:
            await report_gate.wait()  # the 4th report lands during the 5th check
        if request.url.path == "/v1/limits" and during_limits:
            during_limits = False
            report_gate.set()
            account = provider._accounts[("org:acme", "feature:convert")]
            for _ in range(1000):  # until the provider saw the 4th delivery complete
                if account.delivered == 4:
                    break
                await asyncio.sleep(0.001)
            assert account.delivered == 4
        return fake.handle(request)

    class OneReportPerCharge(TierProvider):
        aggregates = False  # so the 4th charge is a report of its own, held at the gate

    provider = OneReportPerCharge(
        FAKE_URL,
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        outbox=None,
        cache_ttl=0,
    )
    await provider.open()
    try:
        for _ in range(4):
            r = await provider.reserve("org:acme", "feature:convert", 1)
            assert r.answer.ok
            await provider.prepare(r)
            await provider.commit(r)
        account = provider._accounts[("org:acme", "feature:convert")]
        for _ in range(1000):  # the first three delivered; the 4th waits at the gate
            if account.delivered == 3 and account.pending == 1:
                break
            await asyncio.sleep(0.001)
        assert (account.delivered, account.pending) == (3, 1)
        during_limits = True
        before = fake.paths().count("/v1/limits")
        fifth = await provider.reserve("org:acme", "feature:convert", 1)
        assert fifth.answer.ok, fifth.answer
        assert fake.paths().count("/v1/limits") - before == 2  # one extra call, no more
        await provider.release(fifth)
    finally:
        await provider.aclose()
    assert fake.used("org:acme", "feature:convert") == 4


async def test_aclose_with_nothing_queued_does_not_sit_out_drain_timeout(
    fake: FakeTier, tmp_path: Path
) -> None:
    """Closing a provider whose outbox is empty returns at once, not after drain_timeout:
    every sender wakes the others as it stops (one used to wait out the whole deadline)."""
    import time

    for outbox in (None, "durable"):
        provider = TierProvider(
            FAKE_URL,
            client=httpx.AsyncClient(transport=httpx.MockTransport(fake.handle)),
            outbox=None if outbox is None else tmp_path / "outbox.db",
            drain_timeout=30.0,
        )
        await provider.open()
        started = time.monotonic()
        await provider.aclose()
        assert time.monotonic() - started < 10.0, outbox
