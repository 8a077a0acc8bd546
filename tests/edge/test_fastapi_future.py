"""@metered under ``from __future__ import annotations``: FastAPI still reads every annotation."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Query
from pydantic import BaseModel
from starlette.requests import Request

from tests.support.metering_helpers import RecordingProvider
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.middleware import UsageMiddleware


class Order(BaseModel):
    sku: str
    qty: int


class OrderOut(BaseModel):
    sku: str


def paging(limit: int = Query(5)) -> int:
    return limit


Limit = Annotated[int, Depends(paging)]


def build(provider: RecordingProvider) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        UsageMiddleware, provider=provider, customer=customer_from_header("X-Customer")
    )

    @app.post("/orders/{shop}")
    @metered("feature:a", units=2)
    async def order(shop: str, body: Order, limit: Limit) -> OrderOut:
        return {"sku": f"{shop}:{body.sku}:{body.qty}:{limit}", "secret": 1}  # type: ignore[return-value]

    @app.get("/own")
    @metered("feature:b")
    def own(request: Request, q: int = 0) -> dict[str, Any]:
        return {"path": request.url.path, "q": q}

    return app


async def test_string_annotations_resolve(provider: RecordingProvider) -> None:
    """Body model, path param, Annotated Depends alias and return-annotation model all work."""
    app = build(provider)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test",
        headers={"X-Customer": "org:acme"},
    ) as c:
        r = await c.post("/orders/east?limit=9", json={"sku": "pen", "qty": 2})
        own = await c.get("/own?q=4")
    assert r.status_code == 200, r.text
    assert r.json() == {"sku": "east:pen:2:9"}
    assert own.json() == {"path": "/own", "q": 4}
    assert provider.charged_units("org:acme", "feature:a") == 2
    assert provider.charged_units("org:acme", "feature:b") == 1
    provider.assert_settled()


async def test_openapi_under_future_annotations(provider: RecordingProvider) -> None:
    """The OpenAPI schema shows the body model, the query params, and the 402."""
    app = build(provider)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        spec = (await c.get("/openapi.json")).json()
    op = spec["paths"]["/orders/{shop}"]["post"]
    assert {p["name"] for p in op["parameters"]} == {"shop", "limit"}
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Order")
    assert "402" in op["responses"] and op["x-usage-features"] == ["feature:a"]
    own = spec["paths"]["/own"]["get"]
    assert [p["name"] for p in own["parameters"]] == ["q"]
