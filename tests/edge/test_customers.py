"""customer_from_header: which header values name a customer, and which are refused."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.support.metering_helpers import RecordingProvider
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.middleware import UsageMiddleware


def _request(*headers: tuple[bytes, bytes]) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": list(headers)})


resolve = customer_from_header("X-Customer", prefix="org:")


def test_one_header_names_the_customer() -> None:
    """A single header gives prefix + stripped value."""
    assert resolve(_request((b"x-customer", b"  acme "))) == "org:acme"


def test_duplicate_header_names_no_customer() -> None:
    """Two copies of the header (a proxy appending, not replacing) give None, not the first."""
    request = _request((b"x-customer", b"victim"), (b"x-customer", b"attacker"))
    assert resolve(request) is None
    assert resolve(_request((b"x-customer", b"acme"), (b"x-customer", b"acme"))) is None


def test_utf8_header_is_decoded_as_utf8() -> None:
    """A UTF-8 header value decodes to the same string the CLI subscribed (not latin-1 mojibake)."""
    assert resolve(_request((b"x-customer", "äcme".encode()))) == "org:äcme"


def test_invalid_utf8_header_names_no_customer() -> None:
    """Bytes that are not valid UTF-8 give None (the route answers 401)."""
    assert resolve(_request((b"x-customer", b"\xe4cme"))) is None


async def test_duplicate_header_is_a_401_and_nothing_is_charged() -> None:
    """End to end: a request with two customer headers is refused 401 and reserves nothing."""
    provider = RecordingProvider({("org:acme", "feature:a"): 10, ("org:evil", "feature:a"): 10})

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(UsageMiddleware, provider=provider, customer=resolve)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.get("/", headers=[("X-Customer", "acme"), ("X-Customer", "evil")])
        assert r.status_code == 401
        ok = await c.get("/", headers={"X-Customer": "acme"})
        assert ok.status_code == 200
    assert provider.ops("reserve") and all(
        c.customer == "org:acme" for c in provider.ops("reserve")
    )
    assert provider.charged_units("org:acme", "feature:a") == 1
