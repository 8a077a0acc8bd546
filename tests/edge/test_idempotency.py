"""``Idempotency-Key``: a client's retry is served again and not charged again."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.metering_helpers import RecordingProvider
from tests.support.uvicorn_server import serve
from tests.support.waiting import eventually
from usage_middleware import LocalLedger, UsageMiddleware, _sqlite, metered
from usage_middleware.customers import customer_from_header
from usage_middleware.idempotency import IN_FLIGHT_TTL, KEY_TTL, parse_idempotency_key

ACME = {"X-Customer": "org:acme"}
PRICING = {"plans": {"plan:free@1": {"features": {"feature:a": {"tiers": [{"upto": 10}]}}}}}


def make_app(provider: Any, gate: asyncio.Event | None = None, **options: Any) -> Starlette:
    runs: list[str] = []

    @metered("feature:a", units=2)
    async def work(request: Request) -> Response:
        runs.append(request.url.path)
        if gate is not None:
            await gate.wait()
        if request.query_params.get("fail"):
            return JSONResponse({"failed": True}, status_code=500)
        return JSONResponse({"runs": len(runs)})

    app = Starlette(
        routes=[Route("/work", work, methods=["POST"]), Route("/other", work, methods=["POST"])],
        middleware=[
            Middleware(
                UsageMiddleware,
                provider=provider,
                customer=customer_from_header("X-Customer"),
                **options,
            )
        ],
    )
    app.state.runs = runs
    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=ACME
    )


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


async def test_retry_runs_again_and_is_not_charged(provider: RecordingProvider) -> None:
    """The same key on the same route is served again, uncharged; other keys/routes charge."""
    app = make_app(provider)
    async with client(app) as c:
        first = await c.post("/work", headers=key('"k-1"'))
        retry = await c.post("/work", headers=key("k-1"))  # unquoted: the same key
        other_route = await c.post("/other", headers=key("k-1"))
        no_key = await c.post("/work")
        other_customer = await c.post("/work", headers={**key("k-1"), "X-Customer": "org:b"})
    assert [first.status_code, retry.status_code, other_route.status_code] == [200, 200, 200]
    assert retry.json() == {"runs": 2}
    assert no_key.status_code == 200
    assert other_customer.status_code == 402  # org:b has no balance: checked as new
    assert app.state.runs == ["/work", "/work", "/other", "/work"]
    assert provider.charged_units("org:acme", "feature:a") == 6  # first, other route, no key
    provider.assert_settled()


async def test_a_key_reused_with_another_query_is_charged_again(
    provider: RecordingProvider,
) -> None:
    """A charged key replayed with a different query (e.g. ?pages=9999) is metered anew."""
    app = make_app(provider)
    async with client(app) as c:
        first = await c.post("/work?pages=1", headers=key("k-q"))
        other_query = await c.post("/work?pages=9999", headers=key("k-q"))
        retry = await c.post("/work?pages=1", headers=key("k-q"))
    assert [first.status_code, other_query.status_code, retry.status_code] == [200, 200, 200]
    assert provider.charged_units("org:acme", "feature:a") == 4  # first and other query
    provider.assert_settled()


async def test_uncharged_first_attempt_lets_the_retry_be_charged(
    provider: RecordingProvider,
) -> None:
    """A failed (uncharged) request releases its key: the retry is metered and charged."""
    app = make_app(provider)
    async with client(app) as c:
        failed = await c.post("/work?fail=1", headers=key("k-2"))
        retry = await c.post("/work", headers=key("k-2"))
        again = await c.post("/work", headers=key("k-2"))
    assert (failed.status_code, retry.status_code, again.status_code) == (500, 200, 200)
    assert provider.charged_units("org:acme", "feature:a") == 2
    provider.assert_settled()


async def test_refused_first_attempt_does_not_keep_the_key(provider: RecordingProvider) -> None:
    """A 402 keeps no key: after credits arrive, the retry is served and charged."""
    provider.set_balance("org:acme", "feature:a", 1)
    app = make_app(provider)
    async with client(app) as c:
        refused = await c.post("/work", headers=key("k-3"))
        provider.set_balance("org:acme", "feature:a", 2)
        retry = await c.post("/work", headers=key("k-3"))
    assert (refused.status_code, retry.status_code) == (402, 200)
    assert provider.charged_units("org:acme", "feature:a") == 2


async def test_concurrent_duplicate_gets_409(provider: RecordingProvider) -> None:
    """A second request with a key in flight is refused with 409 problem+json, never run."""
    gate = asyncio.Event()
    app = make_app(provider, gate)
    async with client(app) as c:
        first = asyncio.create_task(c.post("/work", headers=key("k-4")))
        await eventually(lambda: app.state.runs)
        duplicate = await c.post("/work", headers=key("k-4"))
        gate.set()
        assert (await first).status_code == 200
        later = await c.post("/work", headers=key("k-4"))
    assert duplicate.status_code == 409
    assert duplicate.headers["content-type"] == "application/problem+json"
    assert duplicate.json()["type"] == "tag:usage-middleware,2025:idempotency-key-in-use"
    assert later.status_code == 200
    assert app.state.runs == ["/work", "/work"]
    assert provider.charged_units("org:acme", "feature:a") == 2
    provider.assert_settled()


@pytest.mark.parametrize(
    "headers",
    [
        [("idempotency-key", "x" * 256)],
        [("idempotency-key", '""')],
        [("idempotency-key", "has space")],
        [("idempotency-key", '"quo"te"')],
        [("idempotency-key", "a"), ("idempotency-key", "b")],
    ],
    ids=["too-long", "empty", "space", "inner-quote", "twice"],
)
async def test_malformed_key_is_a_400(provider: RecordingProvider, headers: Any) -> None:
    """A malformed or repeated Idempotency-Key is a 400 problem; nothing runs or is held."""
    app = make_app(provider)
    async with client(app) as c:
        response = await c.post("/work", headers=httpx.Headers([*headers, *ACME.items()]))
    assert response.status_code == 400
    assert response.json()["type"] == "tag:usage-middleware,2025:invalid-idempotency-key"
    assert app.state.runs == []
    assert provider.ops("reserve") == []


def test_key_parsing() -> None:
    """255 printable characters pass; quoted and bare forms give the same key."""
    assert parse_idempotency_key([(b"idempotency-key", b"x" * 255)]) == "x" * 255
    assert parse_idempotency_key([(b"idempotency-key", b'"a b"')]) == "a b"
    assert parse_idempotency_key([(b"idempotency-key", b"a-b")]) == "a-b"
    assert parse_idempotency_key([(b"other", b"a")]) is None
    with pytest.raises(ValueError, match="printable ASCII"):
        parse_idempotency_key([(b"idempotency-key", "é".encode())])


def test_sqlite_claims_expire_and_are_pruned() -> None:
    """A charged key lasts 24 h, an abandoned in-flight claim IN_FLIGHT_TTL; expired rows go."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statement in _sqlite.KEYS_SCHEMA:
        conn.execute(statement)
    assert _sqlite.claim_key(conn, "org:a", "POST /x", "k", 1000.0) == "new"
    assert _sqlite.claim_key(conn, "org:a", "POST /x", "k", 1000.0 + IN_FLIGHT_TTL - 1) == "busy"
    assert _sqlite.claim_key(conn, "org:a", "POST /x", "k", 1000.0 + IN_FLIGHT_TTL) == "new"
    _sqlite.finish_key(conn, "org:a", "POST /x", "k", True, 2000.0)
    assert _sqlite.claim_key(conn, "org:a", "POST /x", "k", 2000.0 + KEY_TTL - 1) == "charged"
    for i in range(10):
        _sqlite.finish_key(conn, "org:a", "POST /x", f"old{i}", True, 0.0)
    assert _sqlite.claim_key(conn, "org:a", "POST /x", "k", 2000.0 + KEY_TTL) == "new"
    (rows,) = conn.execute("SELECT count(*) FROM idempotency_keys").fetchone()
    assert rows == 1  # the expired ones were pruned


async def test_local_ledger_keeps_keys_in_its_file_for_every_process(
    tmp_path: pathlib.Path,
) -> None:
    """Two LocalLedgers on one file (two workers): a retry on the other is not charged."""
    path = tmp_path / "ledger.db"
    one = LocalLedger(path, pricing=PRICING)
    two = LocalLedger(path)
    async with one, two:
        await one.subscribe("org:acme", "plan:free@1")
        async with client(make_app(one)) as c:
            assert (await c.post("/work", headers=key("k-5"))).status_code == 200
        async with client(make_app(two)) as c:
            assert (await c.post("/work", headers=key("k-5"))).status_code == 200
            assert (await c.post("/work", headers=key("k-6"))).status_code == 200
        await one.flush()
        rows = {row.feature: row.used for row in await two.usage("org:acme")}
    assert rows == {"feature:a": 4}
    db = sqlite3.connect(path)
    stored = db.execute("SELECT customer, route, key, charged FROM idempotency_keys").fetchall()
    assert sorted(stored) == [
        ("org:acme", "POST /work", "k-5", 1),
        ("org:acme", "POST /work", "k-6", 1),
    ]


async def test_local_ledger_keys_expire_on_the_ledger_clock(
    make_usage_ledger: Any, ledger_clock: Any
) -> None:
    """On LocalLedger a key is kept 24 hours of the ledger's clock; then it charges again."""
    kit = make_usage_ledger(PRICING, customers={"org:acme": "plan:free@1"})
    async with client(make_app(kit.ledger)) as c:
        assert (await c.post("/work", headers=key("k-8"))).status_code == 200
        ledger_clock.advance(hours=23)
        assert (await c.post("/work", headers=key("k-8"))).status_code == 200
        await kit.assert_charged_async("org:acme", "feature:a", 2)
        ledger_clock.advance(hours=2)
        assert (await c.post("/work", headers=key("k-8"))).status_code == 200
    await kit.assert_charged_async("org:acme", "feature:a", 4)


@pytest.mark.slow
async def test_retry_after_a_lost_response_over_uvicorn(tmp_path: pathlib.Path) -> None:
    """Over real HTTP on LocalLedger: the retry of a charged request is served, not charged."""
    ledger = LocalLedger(tmp_path / "ledger.db", pricing=PRICING)
    async with ledger:
        await ledger.subscribe("org:acme", "plan:free@1")
    async with serve(make_app(ledger)) as url, httpx.AsyncClient(base_url=url) as c:
        first = await c.post("/work", headers={**ACME, **key("order-7")})
        retry = await c.post("/work", headers={**ACME, **key("order-7")})
        bad = await c.post("/work", headers={**ACME, **key("x" * 300)})
    assert (first.status_code, retry.status_code, bad.status_code) == (200, 200, 400)
    async with ledger:
        rows = {row.feature: row.used for row in await ledger.usage("org:acme")}
    assert rows == {"feature:a": 2}


async def test_key_refusals_stand_under_a_default(provider: RecordingProvider) -> None:
    """With default=, a metered route's malformed key is a 400 and a duplicate a 409."""
    gate = asyncio.Event()
    app = make_app(provider, gate, default=("feature:b", 1))
    async with client(app) as c:
        first = asyncio.create_task(c.post("/work", headers=key("k-9")))
        await eventually(lambda: app.state.runs)
        second = asyncio.create_task(c.post("/work", headers=key("k-9")))
        # refused at once, or (the bug) run: then it waits at the gate too
        await eventually(lambda: second.done() or len(app.state.runs) > 1)
        gate.set()
        duplicate = await second
        assert (await first).status_code == 200
        malformed = httpx.Headers([("idempotency-key", "x" * 256), *ACME.items()])
        bad = await c.post("/work", headers=malformed)
    assert (bad.status_code, duplicate.status_code) == (400, 409)
    assert bad.json()["type"] == "tag:usage-middleware,2025:invalid-idempotency-key"
    assert app.state.runs == ["/work"]
    assert provider.charged_units("org:acme", "feature:a") == 2
    assert provider.charged_units("org:acme", "feature:b") == 0
    provider.assert_settled()
