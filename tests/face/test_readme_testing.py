"""The "Testing your app" example of docs/testing.md, run as written (the page quotes it)."""

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from usage_middleware import LocalLedger, UsageMiddleware, customer_from_header, metered

PRICING = {"plans": {"plan:free@1": {"features": {"feature:convert": {"tiers": [{"upto": 2}]}}}}}


def make_app(ledger: LocalLedger) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        UsageMiddleware, provider=ledger, customer=customer_from_header("x-customer")
    )

    @app.post("/convert")
    @metered("feature:convert")
    async def convert(fail: bool = False) -> dict[str, str]:
        if fail:
            raise ValueError("conversion failed")
        return {"converted": "yes"}

    return app


@pytest.mark.usage_ledger(pricing=PRICING, customers={"org:acme": "plan:free@1"})
def test_free_plan_allows_two_conversions_a_month(usage_ledger):
    """Two conversions are served and charged, the third is a 402; a new month resets it."""
    app = make_app(usage_ledger.ledger)
    with TestClient(app, headers={"x-customer": "org:acme"}) as client:
        assert client.post("/convert").status_code == 200
        assert client.post("/convert").status_code == 200
        assert client.post("/convert").status_code == 402
        usage_ledger.assert_charged("org:acme", "feature:convert", 2)

        usage_ledger.next_period()  # the ledger's clock moves to the 1st of next month
        assert client.post("/convert").status_code == 200
    usage_ledger.assert_charged("org:acme", "feature:convert", 3)


@pytest.mark.asyncio  # needs pytest-asyncio (or use anyio's @pytest.mark.anyio)
async def test_failed_request_is_not_charged(make_usage_ledger):
    """A request that raises is not charged (an async test over httpx's ASGITransport)."""
    kit = make_usage_ledger(PRICING, customers={"org:acme": "plan:free@1"})
    transport = httpx.ASGITransport(app=make_app(kit.ledger), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/convert?fail=true", headers={"x-customer": "org:acme"})
    assert response.status_code == 500
    await kit.assert_not_charged_async("org:acme")
