"""SpaireProvider against the in-process Spaire fake (tests/support/spaire_fake.py).

Every request body the provider sends is validated by the fake with the ``spaire-sdk``
package's own pydantic models; the ``fake`` fixture fails a test that sent anything else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from spaire_sdk import models as sdk

from tests.support.spaire_fake import BASE_URL, TOKEN, FakeSpaire
from tests.support.waiting import drain_outbox
from usage_middleware.errors import (
    ConfigurationError,
    PermanentProviderError,
    RetryableProviderError,
)
from usage_middleware.models import UsageEvent
from usage_middleware.outbox import Outbox
from usage_middleware.provider import ProviderState
from usage_middleware.providers.spaire import SERVERS, SpaireProvider, email_for

DOMAIN = "mail.acme-billing.io"
ACME = "org:acme"


@pytest.fixture
def fake() -> Any:
    f = FakeSpaire()
    f.meter_id = f.add_meter("API units")  # type: ignore[attr-defined]
    yield f
    assert f.violations == [], f.violations


@asynccontextmanager
async def spaire(fake: FakeSpaire, **kwargs: Any) -> AsyncIterator[SpaireProvider]:
    options: dict[str, Any] = {
        "meter_id": getattr(fake, "meter_id", None),
        "client": fake.client(kwargs.pop("base_url", BASE_URL)),
        "outbox": None,
        "email_domain": DOMAIN,
        "cache_ttl": 0,
        "deny_ttl": 0,
        "clock": fake.clock,
    }
    options.update(kwargs)
    token = options.pop("access_token", TOKEN)
    provider = SpaireProvider(token, **options)
    async with provider:
        yield provider
    await options["client"].aclose()


def ingested(fake: FakeSpaire) -> list[dict[str, Any]]:
    return [ev for body in fake.ingest_bodies for ev in body["events"]]


def requests_to(fake: FakeSpaire, method: str, path: str) -> list[httpx.Request]:
    return [r for r in fake.requests if r.method == method and r.url.path == path]


async def test_report_sends_the_sdk_shaped_body_with_bearer_auth(fake: FakeSpaire) -> None:
    """report() posts snake_case events: external_customer_id, external_id, metadata.units."""
    event = UsageEvent(ACME, "feature:convert", 3)
    async with spaire(fake) as p:
        await p.report([event])
    post = requests_to(fake, "POST", "/v1/events/ingest")[-1]
    assert post.headers["authorization"] == f"Bearer {TOKEN}"
    assert post.headers["content-type"] == "application/json"
    body = json.loads(post.content)
    sdk.EventsIngest.model_validate(body)
    assert body == {
        "events": [
            {
                "name": "api_usage",
                "external_customer_id": ACME,
                "external_id": event.idempotency_key,
                "metadata": {"units": 3, "feature": "feature:convert"},
            }
        ]
    }
    assert fake.charged(ACME, fake.meter_id) == 3  # type: ignore[attr-defined]


async def test_timestamp_is_sent_only_for_old_events(fake: FakeSpaire) -> None:
    """An `at` older than 5 min is sent as an ISO timestamp; recent or future ones are omitted."""
    now = datetime.now(UTC)
    old = UsageEvent(ACME, "feature:x", 1, at=now - timedelta(hours=2))
    recent = UsageEvent(ACME, "feature:x", 1, at=now - timedelta(seconds=5))
    future = UsageEvent(ACME, "feature:x", 1, at=now + timedelta(minutes=3))
    fake.clock.now = now.timestamp()
    async with spaire(fake) as p:
        await p.report([old, recent, future])
    sent = ingested(fake)
    assert sent[0]["timestamp"] == old.at.isoformat().replace("+00:00", "Z")
    assert "timestamp" not in sent[1]
    assert "timestamp" not in sent[2]
    assert fake.charged(ACME, fake.meter_id) == 3  # type: ignore[attr-defined]


async def test_a_retried_batch_is_deduplicated_by_external_id(fake: FakeSpaire) -> None:
    """Sending the same events twice charges once: duplicates count as delivered."""
    events = [UsageEvent(ACME, "feature:x", 2), UsageEvent(ACME, "feature:x", 5)]
    async with spaire(fake) as p:
        await p.report(events)
        await p.report(events)  # e.g. the first answer was lost
    assert fake.charged(ACME, fake.meter_id) == 7  # type: ignore[attr-defined]
    assert len(fake.events) == 2
    assert [b["events"][0]["external_id"] for b in fake.ingest_bodies] == [
        events[0].idempotency_key
    ] * 2


async def test_repeated_idempotency_key_in_one_batch_is_sent_once(fake: FakeSpaire) -> None:
    """Two events with one key in a batch become one event on the wire (Spaire warns)."""
    event = UsageEvent(ACME, "feature:x", 4)
    async with spaire(fake) as p:
        await p.report([event, event])
    assert len(ingested(fake)) == 1
    assert fake.charged(ACME, fake.meter_id) == 4  # type: ignore[attr-defined]


async def test_one_bad_event_rejects_the_whole_batch_with_the_servers_reason(
    fake: FakeSpaire,
) -> None:
    """A 422 for one event is a PermanentProviderError naming it; nothing is inserted."""
    good = fake.add_customer(None, f"good@{DOMAIN}")
    events = [
        UsageEvent(good, "feature:x", 1),
        UsageEvent("6a1f0d0e-0000-4000-8000-000000000000", "feature:x", 1),
    ]
    async with spaire(fake, customer_id_kind="spaire") as p:
        with pytest.raises(PermanentProviderError) as info:
            await p.report(events)
    assert info.value.status == 422
    assert "events.1.customer_id: Customer not found." in info.value.message
    assert fake.events == []
    assert ingested(fake)[0] == {
        "name": "api_usage",
        "customer_id": good,
        "external_id": events[0].idempotency_key,
        "metadata": {"units": 1, "feature": "feature:x"},
    }


async def test_memory_delivery_isolates_the_bad_event_and_delivers_the_rest(
    fake: FakeSpaire,
) -> None:
    """With outbox=None a 422 batch is bisected (the Reporter's one rule); only the bad
    event is dead-lettered, the rest is delivered."""
    good = fake.add_customer(None, f"good@{DOMAIN}")
    bad = "6a1f0d0e-0000-4000-8000-000000000000"
    fake.fail(503, times=3)  # the checks fail open, so all three requests are charged
    async with spaire(fake, customer_id_kind="spaire") as p:
        held = [await p.reserve(c, "feature:x", 2) for c in (good, bad, good)]
        assert all(r.answer.ok and r.answer.err is not None for r in held)
        for r in held:
            await p.commit(r)
        assert await p.flush(5.0)
    assert [len(b["events"]) for b in fake.ingest_bodies] == [3, 1, 2, 1, 1]
    assert [e.customer_id for e in fake.events] == [good, good]
    assert fake.charged_by_id(good, fake.meter_id) == 4  # type: ignore[attr-defined]


async def test_balance_is_positive_credit_from_the_meter_row_matched_by_id() -> None:
    """remaining = floor(balance) of OUR meter's row in active_meters[], not the first row."""
    fake = FakeSpaire()
    other = fake.add_meter("Other units", event_name="other_usage")
    ours = fake.add_meter("API units")
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.credit(ACME, other, 1000)
    fake.credit(ACME, ours, 7)
    async with spaire(fake, meter_id=ours) as p:
        answer = await p.can(ACME, "feature:x", 7)
        assert answer.ok and answer.remaining == 7
        assert not (await p.can(ACME, "feature:x", 8)).ok
    state = fake.requests[-1]
    assert state.url.path == "/v1/customers/external/org:acme/state"
    meters = sdk.CustomerState.model_validate(fake.handler(state).json()).active_meters
    assert [(m.meter_id, m.balance) for m in meters] == [(other, 1000), (ours, 7)]
    assert fake.violations == []


async def test_unknown_customer_and_missing_meter_row_are_zero_with_a_reason(
    fake: FakeSpaire,
) -> None:
    """404 on state -> 'unknown customer'; no row for the meter -> 'no credits on this meter'."""
    fake.add_customer("org:new", f"new@{DOMAIN}")
    async with spaire(fake) as p:
        unknown = await p.can("org:nobody", "feature:x")
        assert (unknown.ok, unknown.remaining, unknown.reason, unknown.err) == (
            False,
            0,
            "unknown customer",
            None,
        )
        fresh = await p.can("org:new", "feature:x")
        assert (fresh.ok, fresh.remaining, fresh.reason) == (False, 0, "no credits on this meter")


async def test_customer_meters_balance_source(fake: FakeSpaire) -> None:
    """balance_source='customer_meters' reads GET /v1/customer-meters/ filtered by meter."""
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.credit(ACME, fake.meter_id, 12)  # type: ignore[attr-defined]
    async with spaire(fake, balance_source="customer_meters") as p:
        answer = await p.can(ACME, "feature:x", 12)
    assert answer.ok and answer.remaining == 12
    req = requests_to(fake, "GET", "/v1/customer-meters/")[-1]
    assert req.url.params["external_customer_id"] == ACME
    assert req.url.params["meter_id"] == fake.meter_id  # type: ignore[attr-defined]


async def test_no_overspend_while_the_balance_lags(fake: FakeSpaire) -> None:
    """Units delivered but not yet in Spaire's balance are subtracted; nothing double counts."""
    meter = fake.meter_id  # type: ignore[attr-defined]
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.credit(ACME, meter, 10)
    async with spaire(fake) as p:
        served = 0
        for _ in range(15):
            r = await p.reserve(ACME, "feature:x", 1)
            if r.answer.ok:
                await p.commit(r)
                assert await p.flush(5.0)
                served += 1
            else:
                await p.release(r)
            fake.clock.advance(0.5)  # traffic keeps the debounced update waiting
        assert served == 10
        assert fake.balance(ACME, meter) == 10  # Spaire has not caught up
        fake.clock.advance(fake.delay)
        assert fake.balance(ACME, meter) == 0
        denied = await p.can(ACME, "feature:x")
        assert (denied.ok, denied.remaining) == (False, 0)


async def test_reflected_units_are_not_subtracted_twice(fake: FakeSpaire) -> None:
    """Once the meter row's modified_at passes a delivery, only the balance counts."""
    meter = fake.meter_id  # type: ignore[attr-defined]
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.credit(ACME, meter, 100)
    async with spaire(fake) as p:
        r = await p.reserve(ACME, "feature:x", 60)
        await p.commit(r)
        assert await p.flush(5.0)
        assert (await p.can(ACME, "feature:x")).remaining == 40  # local subtraction
        fake.clock.advance(fake.delay + 1)
        assert fake.balance(ACME, meter) == 40
        assert (await p.can(ACME, "feature:x")).remaining == 40  # Spaire's number only


async def test_units_held_for_one_feature_count_for_every_feature(fake: FakeSpaire) -> None:
    """All features draw on one meter: a hold on feature:a is seen by feature:b."""
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.credit(ACME, fake.meter_id, 3)  # type: ignore[attr-defined]
    async with spaire(fake, cache_ttl=30, deny_ttl=1) as p:
        a = await p.reserve(ACME, "feature:a", 2)
        assert a.answer.ok
        b = await p.reserve(ACME, "feature:b", 2)
        assert not b.answer.ok
        await p.commit(a)
        assert await p.flush(5.0)
        assert not (await p.can(ACME, "feature:b", 2)).ok
        assert (await p.can(ACME, "feature:b", 1)).ok


async def test_grant_ingests_negative_units_and_the_balance_goes_up(fake: FakeSpaire) -> None:
    """grant(customer, 10) sends units -10; Spaire's balance becomes +10 (positive = credit)."""
    meter = fake.meter_id  # type: ignore[attr-defined]
    async with spaire(fake) as p:
        key = await p.grant(ACME, 10)
        assert fake.customer_by_external(ACME) is not None  # ensured before the event
        assert ingested(fake) == [
            {"name": "api_usage", "external_customer_id": ACME, "external_id": key,
             "metadata": {"units": -10}}
        ]  # fmt: skip
        assert (await p.can(ACME, "feature:x", 10)).ok  # counted here before Spaire shows it
        assert fake.balance(ACME, meter) is None
        fake.clock.advance(fake.delay)
        assert fake.balance(ACME, meter) == 10
        answer = await p.can(ACME, "feature:x", 10)
        assert answer.ok and answer.remaining == 10
        assert await p.grant(ACME, 10, idempotency_key=key) == key  # same key: granted once
        fake.clock.advance(fake.delay)
        assert fake.balance(ACME, meter) == 10


async def test_grant_refuses_bad_units(fake: FakeSpaire) -> None:
    """grant() needs whole units > 0 (a negative grant would be a charge)."""
    async with spaire(fake) as p:
        with pytest.raises(ValueError):
            await p.grant(ACME, -5)
        with pytest.raises(ValueError):
            await p.grant(ACME, 0)
    assert fake.ingest_bodies == []


async def test_customer_is_created_once_before_its_first_event(fake: FakeSpaire) -> None:
    """Unknown customer: GET 404, POST /v1/customers/ (email, external_id, name), then ingest."""
    async with spaire(fake) as p:
        await p.report([UsageEvent(ACME, "feature:x", 1)])
        await p.report([UsageEvent(ACME, "feature:x", 1)])
    paths = [(r.method, r.url.raw_path.decode()) for r in fake.requests]
    assert paths == [
        ("GET", "/v1/customers/external/org%3Aacme"),
        ("POST", "/v1/customers/"),
        ("POST", "/v1/events/ingest"),
        ("POST", "/v1/events/ingest"),
    ]
    body = json.loads(fake.requests[1].content)
    sdk.CustomerCreate.model_validate(body)
    assert body == {"email": email_for(ACME, DOMAIN), "external_id": ACME, "name": ACME}
    assert email_for(ACME, DOMAIN) == f"org_3aacme@{DOMAIN}"


async def test_existing_customer_is_looked_up_not_created(fake: FakeSpaire) -> None:
    """A customer Spaire knows is found by external id and never re-created."""
    fake.add_customer(ACME, f"someone@{DOMAIN}")
    async with spaire(fake) as p:
        await p.report([UsageEvent(ACME, "feature:x", 1)])
    assert requests_to(fake, "POST", "/v1/customers/") == []


async def test_create_clash_re_reads_the_customer(fake: FakeSpaire) -> None:
    """A 422 external_id clash on create (created meanwhile) re-reads and delivers."""
    fake.add_customer(ACME, f"first@{DOMAIN}")
    fake.fail(
        404,
        path="/v1/customers/external/org%3Aacme",
        body={"error": "ResourceNotFound", "detail": "Not found"},
    )
    async with spaire(fake) as p:
        await p.report([UsageEvent(ACME, "feature:x", 1)])
    assert len(requests_to(fake, "POST", "/v1/customers/")) == 1
    assert len(requests_to(fake, "GET", "/v1/customers/external/org:acme")) == 2
    assert fake.charged(ACME, fake.meter_id) == 1  # type: ignore[attr-defined]


async def test_email_taken_by_another_customer_is_permanent(fake: FakeSpaire) -> None:
    """An email clash with a different customer is a permanent error naming the email field."""
    fake.add_customer("org:other", email_for(ACME, DOMAIN))
    async with spaire(fake) as p:
        with pytest.raises(PermanentProviderError) as info:
            await p.report([UsageEvent(ACME, "feature:x", 1)])
    assert "email: A customer with this email address already exists." in info.value.message
    assert fake.ingest_bodies == []


async def test_customer_email_callable_and_no_auto_create(fake: FakeSpaire) -> None:
    """customer_email= chooses the email; with no email source an unknown customer is refused."""
    async with spaire(fake, email_domain=None, customer_email=lambda c: f"billing+1@{DOMAIN}") as p:
        await p.report([UsageEvent(ACME, "feature:x", 1)])
    assert fake.customer_by_external(ACME)["email"] == f"billing+1@{DOMAIN}"  # type: ignore[index]
    async with spaire(fake, email_domain=None) as p:
        with pytest.raises(PermanentProviderError) as info:
            await p.report([UsageEvent("org:ghost", "feature:x", 1)])
    assert info.value.code == "customer_not_found"


async def test_refused_email_domains(fake: FakeSpaire) -> None:
    """example.com is refused at construction; a callable's refused email is a permanent 422."""
    with pytest.raises(ConfigurationError):
        SpaireProvider(TOKEN, meter_id="m", email_domain="example.com", outbox=None)
    async with spaire(fake, email_domain=None, customer_email=lambda c: "a@example.org") as p:
        with pytest.raises(PermanentProviderError) as info:
            await p.report([UsageEvent(ACME, "feature:x", 1)])
    assert info.value.status == 422 and "does not accept email" in info.value.message


async def test_slash_in_customer_id_is_refused_without_asking_spaire(fake: FakeSpaire) -> None:
    """A '/' id cannot be looked up (Spaire decodes %2F before routing): the check refuses it
    with a reason and delivery rejects it permanently, without a request to Spaire."""
    async with spaire(fake) as p:
        with pytest.raises(PermanentProviderError, match="'/'") as info:
            await p.report([UsageEvent("team/a", "feature:x", 1)])
        answer = await p.can("team/a", "feature:x")
    assert info.value.code == "customer_id_unsupported"
    assert not answer.ok and answer.err is None and "'/'" in (answer.reason or "")
    assert fake.requests == []


async def test_429_is_retryable_with_retry_after(fake: FakeSpaire) -> None:
    """An empty 429 with retry-after: 7 raises RetryableProviderError(retry_after=7)."""
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.rate_limit(7, path="/v1/events/ingest")
    async with spaire(fake) as p:
        with pytest.raises(RetryableProviderError) as info:
            await p.report([UsageEvent(ACME, "feature:x", 1)])
        assert (info.value.status, info.value.retry_after) == (429, 7.0)
        await p.report([UsageEvent(ACME, "feature:x", 1)])  # after the wait it goes through
    assert fake.charged(ACME, fake.meter_id) == 1  # type: ignore[attr-defined]


async def test_429_on_a_check_fails_closed_with_retry_after(fake: FakeSpaire) -> None:
    """A rate-limited balance read under failure_policy='closed' is a 503 with Retry-After."""
    fake.rate_limit(9)
    async with spaire(fake, failure_policy="closed") as p:
        answer = await p.can(ACME, "feature:x")
    assert not answer.ok and answer.retry_after == 9.0
    assert isinstance(answer.err, RetryableProviderError)


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ({"status": 503}, 503),
        ({"status": 502}, 502),
        ({"exc": httpx.ConnectError}, None),
        ({"exc": httpx.ReadTimeout}, None),
    ],
)
async def test_server_and_network_errors_are_retryable(
    fake: FakeSpaire, script: dict[str, Any], status: int | None
) -> None:
    """5xx, connection errors and timeouts raise RetryableProviderError (no httpx leak)."""
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.fail(path="/v1/events/ingest", **script)
    async with spaire(fake) as p:
        with pytest.raises(RetryableProviderError) as info:
            await p.report([UsageEvent(ACME, "feature:x", 1)])
    assert info.value.status == status
    assert fake.events == []


async def test_wrong_token_is_a_clear_permanent_error_without_the_token(
    fake: FakeSpaire, caplog: pytest.LogCaptureFixture
) -> None:
    """401: PermanentProviderError telling to check SPAIRE_ACCESS_TOKEN; token never shown."""
    secret = "spaire_oat_WRONG_secret_value"
    caplog.set_level(logging.DEBUG)
    async with spaire(fake, access_token=secret) as p:
        with pytest.raises(PermanentProviderError) as info:
            await p.report([UsageEvent(ACME, "feature:x", 1)])
        answer = await p.can(ACME, "feature:x")
        assert secret not in repr(p)
    assert info.value.status == 401
    assert "SPAIRE_ACCESS_TOKEN" in info.value.message
    assert answer.ok and isinstance(answer.err, PermanentProviderError)  # fails open
    for text in (str(info.value), repr(info.value), str(answer.err), caplog.text):
        assert secret not in text


async def test_clobber_is_refused_permanently(fake: FakeSpaire) -> None:
    """Spaire cannot set usage: a clobber event is a permanent error, nothing sent."""
    async with spaire(fake) as p:
        with pytest.raises(PermanentProviderError) as info:
            await p.report([UsageEvent(ACME, "feature:x", 5, clobber=True)])
    assert info.value.code == "clobber_unsupported"
    assert fake.requests == []


async def test_meter_name_is_resolved_once_at_open(fake: FakeSpaire) -> None:
    """meter_name= is looked up with GET /v1/meters/?query= in open(), then used by id."""
    fake.add_meter("API units v2")
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.credit(ACME, fake.meter_id, 4)  # type: ignore[attr-defined]
    async with spaire(fake, meter_id=None, meter_name="API units") as p:
        assert p.meter_id == fake.meter_id  # type: ignore[attr-defined]
        assert (await p.can(ACME, "feature:x", 4)).ok
        assert (await p.can(ACME, "feature:x", 4)).ok
    assert len(requests_to(fake, "GET", "/v1/meters/")) == 1
    assert requests_to(fake, "GET", "/v1/meters/")[0].url.params["query"] == "API units"


async def test_unknown_or_ambiguous_meter_name_fails_open(fake: FakeSpaire) -> None:
    """open() raises ConfigurationError (and closes) when no meter, or several, have the name."""
    with pytest.raises(ConfigurationError, match="no Spaire meter named"):
        async with spaire(fake, meter_id=None, meter_name="Nope"):
            pass
    fake.add_meter("API units")
    provider = SpaireProvider(
        TOKEN, meter_name="API units", client=fake.client(), outbox=None, email_domain=DOMAIN
    )
    with pytest.raises(ConfigurationError, match="several Spaire meters"):
        await provider.open()
    assert provider.state is ProviderState.CLOSED  # nothing left running


async def test_same_class_talks_to_polar_by_base_url(fake: FakeSpaire) -> None:
    """base_url='https://api.polar.sh' sends the same requests to Polar's host."""
    async with spaire(fake, base_url="https://api.polar.sh") as p:
        await p.report([UsageEvent(ACME, "feature:x", 1)])
    assert {r.url.host for r in fake.requests} == {"api.polar.sh"}


async def test_own_client_uses_the_servers_base_url() -> None:
    """Without an injected client, open() builds one for the chosen server with a timeout."""
    p = SpaireProvider(TOKEN, server="sandbox", meter_id="m", outbox=None, timeout=1.5)
    async with p:
        assert str(p.http.base_url) == SERVERS["sandbox"]
        assert p.http.timeout.read == 1.5
        assert "authorization" not in p.http.headers
    assert SpaireProvider(TOKEN, meter_id="m", outbox=None).base_url == "https://api.spairehq.com"


def test_from_env() -> None:
    """from_env reads SPAIRE_ACCESS_TOKEN/SERVER/BASE_URL/METER_ID; a missing token is an error."""
    env = {"SPAIRE_ACCESS_TOKEN": TOKEN, "SPAIRE_SERVER": "sandbox", "SPAIRE_METER_ID": "m1"}
    p = SpaireProvider.from_env(env, outbox=None)
    assert (p.base_url, p.meter_id) == (SERVERS["sandbox"], "m1")
    p = SpaireProvider.from_env(
        {**env, "SPAIRE_BASE_URL": "https://api.polar.sh/"}, outbox=None, meter_name="x"
    )
    assert (p.base_url, p.meter_id, p.meter_name) == ("https://api.polar.sh", None, "x")
    with pytest.raises(ConfigurationError, match="SPAIRE_ACCESS_TOKEN"):
        SpaireProvider.from_env({"SPAIRE_METER_ID": "m1"}, outbox=None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"server": "staging", "meter_id": "m"},
        {},
        {"meter_id": "m", "meter_name": "n"},
        {"meter_id": "m", "event_name": "x" * 129},
        {"meter_id": "m", "customer_id_kind": "email"},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    """Unknown server, no meter or both, too-long event name, bad id kind: ConfigurationError."""
    with pytest.raises(ConfigurationError):
        SpaireProvider(TOKEN, outbox=None, **kwargs)


# -- through the durable outbox (usage_middleware.delivery.Reporter) -----------------------


@asynccontextmanager
async def spaire_outbox(
    fake: FakeSpaire, tmp_path: Path, **kwargs: Any
) -> AsyncIterator[SpaireProvider]:
    async with spaire(fake, outbox=tmp_path / "outbox.db", **kwargs) as p:
        yield p


async def test_reporter_dead_letters_only_the_bad_event_with_the_servers_reason(
    fake: FakeSpaire, tmp_path: Path
) -> None:
    """A 422 batch is split by the Reporter: the bad event is dead-lettered, the rest sent."""
    good = fake.add_customer(None, f"good@{DOMAIN}")
    bad = "6a1f0d0e-0000-4000-8000-000000000000"
    events = [UsageEvent(c, "feature:x", 2) for c in (good, good, bad, good)]
    async with spaire_outbox(fake, tmp_path, customer_id_kind="spaire") as p:
        assert p.reporter is not None
        for event in events:
            p.reporter.enqueue(event)
        await drain_outbox(p.reporter)
    assert len(fake.ingest_bodies[0]["events"]) == 4  # sent as one batch, rejected whole
    assert fake.charged_by_id(good, fake.meter_id) == 6  # type: ignore[attr-defined]
    outbox = Outbox(tmp_path / "outbox.db", create=False)
    try:
        (dead,) = outbox.dead_letters()
    finally:
        outbox.close()
    assert dead.event.idempotency_key == events[2].idempotency_key
    assert (dead.status, dead.code) == (422, "validation_error")
    assert dead.message == "Spaire ingest: events.0.customer_id: Customer not found."


async def test_reporter_retry_after_a_lost_answer_charges_once(
    fake: FakeSpaire, tmp_path: Path
) -> None:
    """Spaire stored the batch but the answer was lost: the retry is counted as duplicates."""
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.lose_response(path="/v1/events/ingest")
    async with spaire_outbox(fake, tmp_path) as p:
        assert p.reporter is not None
        for _ in range(3):
            p.reporter.enqueue(UsageEvent(ACME, "feature:x", 1))
        await drain_outbox(p.reporter)
        assert p.reporter.stats().retried == 3
    assert len(fake.ingest_bodies) == 2
    assert fake.ingest_bodies[0] == fake.ingest_bodies[1]
    assert fake.charged(ACME, fake.meter_id) == 3  # type: ignore[attr-defined]
    assert len(fake.events) == 3


async def test_reporter_waits_for_retry_after_on_429(fake: FakeSpaire, tmp_path: Path) -> None:
    """An empty 429 with retry-after: 1 makes the Reporter wait >= 1 s, then deliver once."""
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.rate_limit(1, path="/v1/events/ingest")
    async with spaire_outbox(fake, tmp_path) as p:
        assert p.reporter is not None
        p.reporter.enqueue(UsageEvent(ACME, "feature:x", 5))
        await drain_outbox(p.reporter)
    times = [
        t for r, t in zip(fake.requests, fake.request_times, strict=True) if r.method == "POST"
    ]
    assert len(times) == 2
    assert times[1] - times[0] >= 1.0  # a lower bound: honouring Retry-After, not speed
    assert fake.charged(ACME, fake.meter_id) == 5  # type: ignore[attr-defined]


async def test_metered_requests_through_the_outbox_never_overspend(
    fake: FakeSpaire, tmp_path: Path
) -> None:
    """prepare/commit through the outbox with a lagging balance: exactly the credits are spent."""
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.credit(ACME, fake.meter_id, 5)  # type: ignore[attr-defined]
    async with spaire_outbox(fake, tmp_path, cache_ttl=5, deny_ttl=1) as p:
        served = 0
        for i in range(12):
            r = await p.reserve(ACME, f"feature:{'ab'[i % 2]}", 1)
            if r.answer.ok:
                await p.prepare(r)
                await p.commit(r)
                served += 1
            else:
                await p.release(r)
            if i % 3 == 0:
                await drain_outbox(p.reporter)
            fake.clock.advance(1.0)
        await drain_outbox(p.reporter)
    assert served == 5
    assert fake.charged(ACME, fake.meter_id) == 5  # type: ignore[attr-defined]


async def test_wrong_base_url_keeps_events_and_does_not_deny_as_unknown(fake: FakeSpaire) -> None:
    """A route 404 (wrong base URL path) is retryable and never read as 'unknown customer'."""
    async with spaire(fake, base_url=BASE_URL + "/api", failure_policy="closed") as p:
        with pytest.raises(RetryableProviderError, match="check base_url") as info:
            await p.report([UsageEvent(ACME, "feature:x", 1)])
        answer = await p.can(ACME, "feature:x")
    assert info.value.status == 404
    assert not answer.ok and isinstance(answer.err, RetryableProviderError)
    assert fake.events == [] and fake.customers == {}


async def test_delivered_units_stop_counting_after_max_balance_lag(fake: FakeSpaire) -> None:
    """If the meter row never moves, delivered units count for max_balance_lag seconds only."""
    fake.delay = fake.max_delay = 10**9  # Spaire never recomputes the meter
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.credit(ACME, fake.meter_id, 10)  # type: ignore[attr-defined]
    async with spaire(fake, max_balance_lag=600) as p:
        r = await p.reserve(ACME, "feature:x", 4)
        await p.commit(r)
        assert await p.flush(5.0)
        fake.clock.advance(599)
        assert (await p.can(ACME, "feature:x")).remaining == 6
        fake.clock.advance(2)
        assert (await p.can(ACME, "feature:x")).remaining == 10


async def test_pooled_account_survives_the_idle_sweep_while_cached(fake: FakeSpaire) -> None:
    """The base's memory sweep keeps a customer's pooled account while entries use it."""
    fake.add_customer(ACME, f"acme@{DOMAIN}")
    fake.credit(ACME, fake.meter_id, 3)  # type: ignore[attr-defined]
    async with spaire(fake, cache_ttl=10_000, deny_ttl=1) as p:
        warm = await p.reserve(ACME, "feature:a", 1)
        await p.release(warm)  # idle account, cached entry for feature:a
        fake.clock.advance(1000)
        p._sweep(fake.clock())  # what a busy process does once accounts pile up
        held = await p.reserve(ACME, "feature:b", 2)  # fresh fetch, pooled account
        assert held.answer.ok
        assert not (await p.can(ACME, "feature:a", 2)).ok  # cached entry sees the hold
        await p.release(held)
