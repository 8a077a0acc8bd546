"""Idempotency-Key claims on every provider: a retry of a charged request is not charged again."""

from __future__ import annotations

import itertools

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.contract_subject import Subject
from usage_middleware import UsageMiddleware, metered
from usage_middleware.customers import customer_from_header

_ids = itertools.count()


async def test_claims_new_busy_charged_and_dropped(subject: Subject) -> None:
    """A key is new, then busy while in flight, charged once finished charged; dropped if not."""
    provider = subject.provider
    customer = f"org:idem{next(_ids)}"
    assert await provider.claim_key(customer, "POST /x", "k1") == "new"
    assert await provider.claim_key(customer, "POST /x", "k1") == "busy"
    assert await provider.claim_key(customer, "POST /y", "k1") == "new"  # another route
    assert await provider.claim_key(customer + "b", "POST /x", "k1") == "new"  # customer
    await provider.finish_key(customer, "POST /x", "k1", charged=True)
    assert await provider.claim_key(customer, "POST /x", "k1") == "charged"
    await provider.finish_key(customer, "POST /y", "k1", charged=False)
    assert await provider.claim_key(customer, "POST /y", "k1") == "new"


async def test_retry_with_the_same_key_is_charged_once(subject: Subject, feature: str) -> None:
    """Through the middleware: a retried key runs the endpoint again and charges nothing more."""
    customer = f"org:idem{next(_ids)}"
    await subject.give(customer, feature, 10)
    runs: list[int] = []

    @metered(feature, units=3)
    async def work(request: Request) -> Response:
        runs.append(1)
        return JSONResponse({"run": len(runs)})

    app = Starlette(
        routes=[Route("/work", work, methods=["POST"])],
        middleware=[
            Middleware(
                UsageMiddleware,
                provider=subject.provider,
                customer=customer_from_header("X-Customer"),
            )
        ],
    )
    scope = subject.scope_for(customer)
    headers = {k.decode(): v.decode() for k, v in (scope or {}).get("headers", [])}
    headers["X-Customer"] = customer
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = await client.post("/work", headers={**headers, "Idempotency-Key": '"a-1"'})
        retry = await client.post("/work", headers={**headers, "Idempotency-Key": "a-1"})
        other = await client.post("/work", headers={**headers, "Idempotency-Key": "a-2"})
    assert [first.status_code, retry.status_code, other.status_code] == [200, 200, 200]
    assert retry.json() == {"run": 2}  # the endpoint ran again
    assert await subject.charged(customer, feature) == 6  # a-1 once, a-2 once


async def test_claims_compare_the_request_fingerprint(subject: Subject) -> None:
    """Another fingerprint on a key in flight or charged is "mismatch"; the same one is
    busy, then charged (what the provider stores with the claim)."""
    provider = subject.provider
    customer = f"org:idem{next(_ids)}"
    a, b = "a" * 64, "b" * 64
    assert await provider.claim_key(customer, "POST /x", "k1", fingerprint=a) == "new"
    assert await provider.claim_key(customer, "POST /x", "k1", fingerprint=a) == "busy"
    assert await provider.claim_key(customer, "POST /x", "k1", fingerprint=b) == "mismatch"
    await provider.finish_key(customer, "POST /x", "k1", charged=True, fingerprint=a)
    assert await provider.claim_key(customer, "POST /x", "k1", fingerprint=a) == "charged"
    assert await provider.claim_key(customer, "POST /x", "k1", fingerprint=b) == "mismatch"
    assert await provider.claim_key(customer, "POST /x", "k1") == "mismatch"  # no body known


async def test_key_reused_with_another_body_is_422(subject: Subject, feature: str) -> None:
    """Through the middleware: a charged key with another body gets 422 and does not run;
    the same body is served again; one charge."""
    customer = f"org:idem{next(_ids)}"
    await subject.give(customer, feature, 10)
    runs: list[bytes] = []

    @metered(feature, units=3)
    async def work(request: Request) -> Response:
        runs.append(await request.body())
        return JSONResponse({"run": len(runs)})

    app = Starlette(
        routes=[Route("/work", work, methods=["POST"])],
        middleware=[
            Middleware(
                UsageMiddleware,
                provider=subject.provider,
                customer=customer_from_header("X-Customer"),
            )
        ],
    )
    scope = subject.scope_for(customer)
    headers = {k.decode(): v.decode() for k, v in (scope or {}).get("headers", [])}
    headers["X-Customer"] = customer
    headers["Idempotency-Key"] = "b-1"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = await client.post("/work", headers=headers, content=b'{"text":"a"}')
        other = await client.post("/work", headers=headers, content=b'{"text":"b"}')
        retry = await client.post("/work", headers=headers, content=b'{"text":"a"}')
    assert [first.status_code, other.status_code, retry.status_code] == [200, 422, 200]
    assert other.headers["content-type"] == "application/problem+json"
    assert runs == [b'{"text":"a"}', b'{"text":"a"}']
    assert await subject.charged(customer, feature) == 3
