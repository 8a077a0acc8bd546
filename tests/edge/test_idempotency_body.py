"""``Idempotency-Key`` fingerprints the request body: a charged key is no free pass for
another request (422), while a true retry (same body) is still served uncharged."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.edge.test_idempotency import ACME, client, key
from tests.support.metering_helpers import RecordingProvider
from tests.support.uvicorn_server import serve
from tests.support.waiting import eventually
from usage_middleware import LocalLedger, Metered, UsageMiddleware, _sqlite, metered
from usage_middleware.customers import customer_from_header
from usage_middleware.idempotency import MAX_BODY, KeyClaims, body_fingerprint

PRICING = {"plans": {"plan:free@1": {"features": {"feature:a": {"tiers": [{"upto": 100}]}}}}}
REUSED = "tag:usage-middleware,2025:idempotency-key-reused"


def starlette_app(provider: Any, gate: asyncio.Event | None = None, **options: Any) -> Starlette:
    """``POST /convert`` (@metered, 2 units) echoing the body the endpoint read; ``POST
    /plain`` unmetered (for ``default=``)."""
    runs: list[bytes] = []

    @metered("feature:a", units=2)
    async def convert(request: Request) -> Response:
        body = await request.body()
        runs.append(body)
        if gate is not None:
            await gate.wait()
        return JSONResponse({"body": body.decode(), "runs": len(runs)})

    async def plain(request: Request) -> Response:
        body = await request.body()
        runs.append(body)
        return JSONResponse({"body": body.decode()})

    app = Starlette(
        routes=[
            Route("/convert", convert, methods=["POST"]),
            Route("/plain", plain, methods=["POST"]),
        ],
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


async def test_reused_key_with_another_body_is_422_and_not_run(
    provider: RecordingProvider,
) -> None:
    """The tester's case: key Z charged for {"text":"a"}; other bodies get 422, never run."""
    app = starlette_app(provider)
    async with client(app) as c:
        first = await c.post("/convert", headers=key("Z"), content=b'{"text":"a"}')
        others = [
            await c.post("/convert", headers=key("Z"), content=body)
            for body in (b'{"text":"b"}', b'{"text":"a" }', b"")
        ]
        retry = await c.post("/convert", headers=key("Z"), content=b'{"text":"a"}')
    assert first.status_code == 200
    assert [r.status_code for r in others] == [422, 422, 422]
    assert others[0].headers["content-type"] == "application/problem+json"
    assert others[0].json()["type"] == REUSED
    assert retry.status_code == 200
    assert retry.json() == {"body": '{"text":"a"}', "runs": 2}  # served again, body intact
    assert app.state.runs == [b'{"text":"a"}', b'{"text":"a"}']
    assert provider.charged_units("org:acme", "feature:a") == 2  # once
    provider.assert_settled()


async def test_another_body_while_the_first_is_in_flight_is_422(
    provider: RecordingProvider,
) -> None:
    """In flight: the same body gets 409 (retry later), another body 422 (never valid)."""
    gate = asyncio.Event()
    app = starlette_app(provider, gate)
    async with client(app) as c:
        first = asyncio.create_task(c.post("/convert", headers=key("F"), content=b"one"))
        await eventually(lambda: app.state.runs)
        same = await c.post("/convert", headers=key("F"), content=b"one")
        other = await c.post("/convert", headers=key("F"), content=b"two")
        gate.set()
        assert (await first).status_code == 200
    assert (same.status_code, other.status_code) == (409, 422)
    assert other.json()["type"] == REUSED
    assert app.state.runs == [b"one"]
    assert provider.charged_units("org:acme", "feature:a") == 2
    provider.assert_settled()


async def _chunks(parts: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(parts):
        yield b"x" * size


async def test_body_over_the_limit_with_a_key_is_413(provider: RecordingProvider) -> None:
    """With a key, a body over MAX_BODY (declared or streamed) is 413, not run; without one
    the same body is served and charged as usual."""
    app = starlette_app(provider)
    big = b"x" * (MAX_BODY + 1)
    async with client(app) as c:
        declared = await c.post("/convert", headers=key("B1"), content=big)
        streamed = await c.post("/convert", headers=key("B2"), content=_chunks(17, 65536))
        at_limit = await c.post("/convert", headers=key("B3"), content=big[:MAX_BODY])
        no_key = await c.post("/convert", content=big)
    assert (declared.status_code, streamed.status_code) == (413, 413)
    assert declared.headers["content-type"] == "application/problem+json"
    assert declared.json()["limit"] == MAX_BODY
    assert (at_limit.status_code, no_key.status_code) == (200, 200)
    assert [len(body) for body in app.state.runs] == [MAX_BODY, MAX_BODY + 1]
    assert provider.charged_units("org:acme", "feature:a") == 4
    provider.assert_settled()


async def test_default_metering_fingerprints_the_body_and_hands_it_on(
    provider: RecordingProvider,
) -> None:
    """UsageMiddleware(default=...): the claim reads the body before routing; the endpoint
    still gets it whole; another body on the key is 422, the same body served free."""
    app = starlette_app(provider, default=("feature:a", 1))
    async with client(app) as c:
        first = await c.post("/plain", headers=key("D"), content=_chunks(3, 5))
        other = await c.post("/plain", headers=key("D"), content=b"something else")
        retry = await c.post("/plain", headers=key("D"), content=b"x" * 15)
        no_key = await c.post("/plain", content=b"abc")
    assert first.status_code == 200 and first.json() == {"body": "x" * 15}
    assert other.status_code == 422
    assert retry.status_code == 200 and retry.json() == {"body": "x" * 15}
    assert no_key.json() == {"body": "abc"}
    assert app.state.runs == [b"x" * 15, b"x" * 15, b"abc"]
    assert provider.charged_units("org:acme", "feature:a") == 2  # first and no_key
    provider.assert_settled()


class Item(BaseModel):
    text: str


def fastapi_app(provider: Any) -> FastAPI:
    app = FastAPI()
    runs: list[str] = []

    @app.post("/model", dependencies=[Depends(Metered("feature:a", units=2))])
    async def model(item: Item) -> dict[str, str]:  # FastAPI read the body first
        runs.append(item.text)
        return {"text": item.text}

    @app.post("/raw")
    @metered("feature:a", units=2)
    async def raw(request: Request) -> dict[str, str]:  # the check reads the body
        text = (await request.body()).decode()
        runs.append(text)
        return {"text": text}

    app.add_middleware(
        UsageMiddleware, provider=provider, customer=customer_from_header("X-Customer")
    )
    app.state.runs = runs
    return app


@pytest.mark.parametrize("path", ["/model", "/raw"])
async def test_fastapi_dependency_and_decorator(provider: RecordingProvider, path: str) -> None:
    """FastAPI, a body model with a Metered dependency and a raw-body @metered route:
    another body on a charged key is 422 and not run; the same body is served uncharged."""
    app = fastapi_app(provider)
    async with client(app) as c:
        first = await c.post(path, headers=key("K"), json={"text": "a"})
        other = await c.post(path, headers=key("K"), json={"text": "b"})
        retry = await c.post(path, headers=key("K"), json={"text": "a"})
    assert (first.status_code, other.status_code, retry.status_code) == (200, 422, 200)
    assert other.json()["type"] == REUSED
    assert retry.json() == {"text": '{"text":"a"}' if path == "/raw" else "a"}
    assert len(app.state.runs) == 2
    assert provider.charged_units("org:acme", "feature:a") == 2
    provider.assert_settled()


def test_claims_in_memory_and_sqlite_compare_fingerprints() -> None:
    """KeyClaims and the SQLite table answer "mismatch" for another fingerprint, in flight
    and once charged; the same fingerprint is busy, then charged."""
    a, b = body_fingerprint(b"a"), body_fingerprint(b"b")
    claims = KeyClaims()
    assert claims.claim("c", "POST /x", "k", a) == "new"
    assert claims.claim("c", "POST /x", "k", a) == "busy"
    assert claims.claim("c", "POST /x", "k", b) == "mismatch"
    claims.finish("c", "POST /x", "k", charged=True, fingerprint=a)
    assert claims.claim("c", "POST /x", "k", a) == "charged"
    assert claims.claim("c", "POST /x", "k", b) == "mismatch"
    conn = sqlite3.connect(":memory:", isolation_level=None)
    _sqlite.create_keys_table(conn)
    assert _sqlite.claim_key(conn, "c", "POST /x", "k", 1.0, a) == "new"
    assert _sqlite.claim_key(conn, "c", "POST /x", "k", 1.0, a) == "busy"
    assert _sqlite.claim_key(conn, "c", "POST /x", "k", 1.0, b) == "mismatch"
    _sqlite.finish_key(conn, "c", "POST /x", "k", True, 1.0, a)
    assert _sqlite.claim_key(conn, "c", "POST /x", "k", 2.0, a) == "charged"
    assert _sqlite.claim_key(conn, "c", "POST /x", "k", 2.0, b) == "mismatch"


async def test_ledger_file_from_before_fingerprints_is_migrated(tmp_path: pathlib.Path) -> None:
    """A ledger file whose claims table has no fingerprint gains the column on open; a key
    charged before the upgrade is no free pass (422), a new key works as usual."""
    path = tmp_path / "ledger.db"
    async with LocalLedger(path, pricing=PRICING) as ledger:
        await ledger.subscribe("org:acme", "plan:free@1")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE idempotency_keys")
    db.execute(  # the table as the previous release created it
        "CREATE TABLE idempotency_keys (id INTEGER PRIMARY KEY, customer TEXT NOT NULL,"
        " route TEXT NOT NULL, key TEXT NOT NULL, charged INTEGER NOT NULL,"
        " expires_at REAL NOT NULL, UNIQUE (customer, route, key))"
    )
    db.execute(
        "INSERT INTO idempotency_keys (customer, route, key, charged, expires_at)"
        " VALUES ('org:acme', 'POST /convert', 'old', 1, 1e12)"
    )
    db.close()
    ledger = LocalLedger(path)
    async with ledger, client(starlette_app(ledger)) as c:
        old = await c.post("/convert", headers=key("old"), content=b"anything")
        new = await c.post("/convert", headers=key("new"), content=b"n")
        retry = await c.post("/convert", headers=key("new"), content=b"n")
        await ledger.flush()
        used = {row.feature: row.used for row in await ledger.usage("org:acme")}
    assert (old.status_code, new.status_code, retry.status_code) == (422, 200, 200)
    assert used == {"feature:a": 2}


@pytest.mark.slow
async def test_reused_key_with_another_body_over_uvicorn(tmp_path: pathlib.Path) -> None:
    """Over real HTTP on LocalLedger: another body on a charged key is 422 and not run; a
    chunked retry of the same body is served, charged once."""
    ledger = LocalLedger(tmp_path / "ledger.db", pricing=PRICING)
    async with ledger:
        await ledger.subscribe("org:acme", "plan:free@1")
    app = starlette_app(ledger)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        headers = {**ACME, **key("order-9")}
        first = await c.post("/convert", headers=headers, content=b'{"text":"a"}')
        other = await c.post("/convert", headers=headers, content=b'{"text":"zzz"}')

        async def same() -> AsyncIterator[bytes]:
            yield b'{"text":'
            yield b'"a"}'

        retry = await c.post("/convert", headers=headers, content=same())
    assert (first.status_code, other.status_code, retry.status_code) == (200, 422, 200)
    assert retry.json() == {"body": '{"text":"a"}', "runs": 2}
    assert app.state.runs == [b'{"text":"a"}', b'{"text":"a"}']
    async with ledger:
        rows = {row.feature: row.used for row in await ledger.usage("org:acme")}
    assert rows == {"feature:a": 2}


async def test_default_on_a_metered_route_still_refuses_another_body(
    provider: RecordingProvider,
) -> None:
    """default= claims the key before routing even on a metered route's path: another body
    is 422 there too (not deferred, dropped and metered anew); the same body is free."""
    app = starlette_app(provider, default=("feature:b", 1))
    async with client(app) as c:
        first = await c.post("/convert", headers=key("M"), content=b"a")
        other = await c.post("/convert", headers=key("M"), content=b"b")
        retry = await c.post("/convert", headers=key("M"), content=b"a")
    assert (first.status_code, other.status_code, retry.status_code) == (200, 422, 200)
    assert app.state.runs == [b"a", b"a"]
    assert provider.charged_units("org:acme", "feature:a") == 2
    assert provider.charged_units("org:acme", "feature:b") == 0
    provider.assert_settled()
