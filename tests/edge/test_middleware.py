"""UsageMiddleware on Starlette: what is charged when, refusals, lifespan, pass-through."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from tests.support.metering_helpers import RecordingProvider, drive, http_scope, run_lifespan
from usage_middleware import UNLIMITED, ConfigurationError
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.meter import SCOPE_KEY, Meter, MeteredFeature
from usage_middleware.middleware import UsageMiddleware
from usage_middleware.models import MAX_UNITS

ACME = [("X-Customer", "org:acme")]
by_header = customer_from_header("X-Customer")


def make_app(
    provider: RecordingProvider,
    routes: list[Any],
    *,
    lifespan: Callable[[Starlette], Any] | None = None,
    **options: Any,
) -> Starlette:
    options.setdefault("customer", by_header)
    return Starlette(
        routes=routes,
        middleware=[Middleware(UsageMiddleware, provider=provider, **options)],
        lifespan=lifespan,
    )


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
        headers=dict(ACME),
    )


@metered("feature:a")
async def ok_endpoint(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def test_2xx_is_charged_once(provider: RecordingProvider) -> None:
    """A 200 on a metered route is reserved, prepared and committed exactly once."""
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert [c.op for c in provider.ops("reserve", "prepare", "commit", "release")] == [
        "reserve",
        "prepare",
        "commit",
    ]
    assert provider.charged_units("org:acme", "feature:a") == 1
    provider.assert_settled()


async def test_unmetered_route_touches_nothing(provider: RecordingProvider) -> None:
    """A route without @metered makes no provider call and needs no customer."""

    async def plain(request: Request) -> Response:
        return PlainTextResponse("hi")

    app = make_app(provider, [Route("/plain", plain)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        r = await c.get("/plain")
    assert r.status_code == 200 and r.text == "hi"
    assert provider.ops("reserve", "commit", "release") == []


@pytest.mark.parametrize("status", [201, 204, 299])
async def test_other_2xx_are_charged(provider: RecordingProvider, status: int) -> None:
    """Every 2xx status is charged by default."""

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return Response(status_code=status)

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        assert (await c.get("/")).status_code == status
    assert provider.charged_units("org:acme", "feature:a") == 1
    provider.assert_settled()


@pytest.mark.parametrize("status", [301, 400, 404, 422, 500, 503])
async def test_non_2xx_response_is_released(provider: RecordingProvider, status: int) -> None:
    """3xx/4xx/5xx responses returned by the endpoint are not charged; the hold is released."""

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return Response(status_code=status, headers={"location": "/x"})

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        r = await c.get("/", follow_redirects=False)
    assert r.status_code == status
    assert provider.charged_units("org:acme", "feature:a") == 0
    assert [c.op for c in provider.ops("commit", "release")] == ["release"]
    assert provider.ops("prepare") == []
    provider.assert_settled()


async def test_http_exception_is_released(provider: RecordingProvider) -> None:
    """An HTTPException raised by the endpoint (turned into 4xx) is not charged."""

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        raise HTTPException(409, "conflict")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        assert (await c.get("/")).status_code == 409
    assert provider.charged_units("org:acme", "feature:a") == 0
    provider.assert_settled()


async def test_exception_before_response_start_is_released(provider: RecordingProvider) -> None:
    """An endpoint that raises before responding gets a 500 and is not charged."""

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        raise RuntimeError("boom")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        assert (await c.get("/")).status_code == 500
    assert provider.charged_units("org:acme", "feature:a") == 0
    assert [c.op for c in provider.ops("commit", "release")] == ["release"]
    provider.assert_settled()


async def _chunks(n: int, fail_at: int | None = None) -> AsyncIterator[bytes]:
    for i in range(n):
        if fail_at is not None and i == fail_at:
            raise RuntimeError("stream broke")
        yield f"chunk{i};".encode()
        await asyncio.sleep(0)


async def test_exception_after_response_start_is_released(provider: RecordingProvider) -> None:
    """A stream that fails after its 200 went out is not charged (raw driver)."""

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return StreamingResponse(_chunks(5, fail_at=2))

    app = make_app(provider, [Route("/", endpoint)])
    ex = await drive(app, http_scope("/", headers=ACME))
    assert ex.status == 200 and not ex.complete
    assert isinstance(ex.error, RuntimeError)
    assert provider.charged_units("org:acme", "feature:a") == 0
    assert provider.ops("prepare") == []
    provider.assert_settled()


async def test_streaming_is_charged_once_at_its_end(provider: RecordingProvider) -> None:
    """A streaming 200 is prepared just before the final body and committed once, after it."""
    seen: list[tuple[str, bool, list[str]]] = []

    @metered("feature:a", units=3)
    async def endpoint(request: Request) -> Response:
        return StreamingResponse(_chunks(4))

    def on_message(message: Message) -> None:
        ops = [c.op for c in provider.ops("prepare", "commit")]
        seen.append((message["type"], bool(message.get("more_body", False)), ops))

    app = make_app(provider, [Route("/", endpoint)])
    ex = await drive(app, http_scope("/", headers=ACME), on_message=on_message)
    assert ex.error is None and ex.complete
    assert ex.body == b"chunk0;chunk1;chunk2;chunk3;"
    # nothing prepared while chunks flow; prepared (not committed) when the final body goes
    assert all(ops == [] for _, more, ops in seen if more)
    assert seen[-1][:2] == ("http.response.body", False) and seen[-1][2] == ["prepare"]
    assert [c.op for c in provider.ops("prepare", "commit", "release")] == ["prepare", "commit"]
    assert provider.charged_units("org:acme", "feature:a") == 3
    provider.assert_settled()


async def test_file_response_with_pathsend_is_charged(
    provider: RecordingProvider, tmp_path: Any
) -> None:
    """A FileResponse sent with the http.response.pathsend extension is charged once."""
    from starlette.responses import FileResponse

    target = tmp_path / "report.txt"
    target.write_text("report")

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return FileResponse(target)

    app = make_app(provider, [Route("/", endpoint)])
    scope = http_scope("/", headers=ACME)
    scope["extensions"] = {"http.response.pathsend": {}}
    ex = await drive(app, scope)
    assert ex.error is None and ex.status == 200
    assert ex.messages[-1] == {"type": "http.response.pathsend", "path": str(target)}
    assert [c.op for c in provider.ops("prepare", "commit", "release")] == ["prepare", "commit"]
    provider.assert_settled()


async def test_disconnect_mid_stream_is_not_charged(provider: RecordingProvider) -> None:
    """The client leaving mid-stream (http.disconnect, ASGI 2.3) releases the reservation."""

    async def slow() -> AsyncIterator[bytes]:
        for i in range(100):
            yield b"x" * 10
            await asyncio.sleep(0.001 * (i > 1))

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return StreamingResponse(slow())

    app = make_app(provider, [Route("/", endpoint)])
    ex = await drive(app, http_scope("/", headers=ACME), disconnect_after_chunks=2)
    assert ex.status == 200 and not ex.complete
    assert provider.charged_units("org:acme", "feature:a") == 0
    assert [c.op for c in provider.ops("commit", "release")] == ["release"]
    provider.assert_settled()


async def test_send_raising_mid_stream_is_not_charged(provider: RecordingProvider) -> None:
    """An ASGI 2.4 server's send raising OSError (client gone) mid-stream is not charged."""

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return StreamingResponse(_chunks(10))

    app = make_app(provider, [Route("/", endpoint)])
    scope = http_scope("/", headers=ACME, spec_version="2.4")
    ex = await drive(app, scope, send_raises_after=3)
    assert ex.error is not None
    assert provider.charged_units("org:acme", "feature:a") == 0
    provider.assert_settled()


async def test_disconnect_before_final_plain_body_is_not_charged(
    provider: RecordingProvider,
) -> None:
    """An app that saw http.disconnect before its final body is not charged."""

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        meter: Meter = scope[SCOPE_KEY]
        refusal = await meter.authorize(request, [MeteredFeature("feature:a", 2)])
        assert refusal is None
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.body", "body": b"b", "more_body": False})

    app = UsageMiddleware(raw_app, provider=provider, customer=by_header)
    ex = await drive(app, http_scope("/", headers=ACME), disconnect_after_chunks=1)
    assert ex.error is None and ex.complete
    assert provider.charged_units("org:acme", "feature:a") == 0
    provider.assert_settled()


async def test_background_task_failure_after_full_response_is_charged(
    provider: RecordingProvider,
) -> None:
    """A response that fully reached the client stays charged if a background task then fails."""

    def explode() -> None:
        raise RuntimeError("background broke")

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("done", background=BackgroundTask(explode))

    app = make_app(provider, [Route("/", endpoint)])
    ex = await drive(app, http_scope("/", headers=ACME))
    assert ex.complete and ex.body == b"done"
    assert isinstance(ex.error, RuntimeError)
    assert provider.charged_units("org:acme", "feature:a") == 1
    provider.assert_settled()


async def test_cancelled_request_is_released(provider: RecordingProvider) -> None:
    """A request cancelled while the endpoint runs is released, not charged."""
    entered = asyncio.Event()

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        entered.set()
        await asyncio.sleep(60)
        return PlainTextResponse("never")

    app = make_app(provider, [Route("/", endpoint)])
    task = asyncio.create_task(drive(app, http_scope("/", headers=ACME)))
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert provider.charged_units("org:acme", "feature:a") == 0
    provider.assert_settled()


async def test_sync_endpoint_runs_in_a_worker_thread(provider: RecordingProvider) -> None:
    """A plain def endpoint runs off the event-loop thread and is charged."""
    threads: list[int] = []

    @metered("feature:a")
    def endpoint(request: Request) -> Response:
        threads.append(threading.get_ident())
        return PlainTextResponse("sync")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        assert (await c.get("/")).text == "sync"
    assert threads and threads[0] != threading.get_ident()
    assert provider.charged_units("org:acme", "feature:a") == 1


async def test_http_endpoint_method_is_metered(provider: RecordingProvider) -> None:
    """@metered works on HTTPEndpoint methods (self, request)."""

    class Thing(HTTPEndpoint):
        @metered("feature:b", units=2)
        async def get(self, request: Request) -> Response:
            return PlainTextResponse("thing")

    app = make_app(provider, [Route("/thing", Thing)])
    async with client(app) as c:
        assert (await c.get("/thing")).text == "thing"
    assert provider.charged_units("org:acme", "feature:b") == 2


async def test_units_callables_sync_and_async(provider: RecordingProvider) -> None:
    """units= callables (sync and async) decide the units reserved and charged."""

    def from_query(request: Request) -> int:
        return int(request.query_params["n"])

    async def from_header(request: Request) -> int:
        return int(request.headers["x-n"])

    @metered("feature:a", units=from_query)
    @metered("feature:b", units=from_header)
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        assert (await c.get("/?n=4", headers={"x-n": "7"})).status_code == 200
    assert provider.charged_units("org:acme", "feature:a") == 4
    assert provider.charged_units("org:acme", "feature:b") == 7


def _query_units(request: Request) -> int:
    return int(request.query_params["n"])


async def _async_query_units(request: Request) -> int:
    return int(request.query_params["n"])


@pytest.mark.parametrize("units_fn", [_query_units, _async_query_units])
@pytest.mark.parametrize("query", ["?n=x", "?n=", "", "?n=0", "?n=-3", f"?n={MAX_UNITS + 1}"])
async def test_units_from_bad_client_input_are_a_400(
    provider: RecordingProvider, units_fn: Any, query: str
) -> None:
    """A units callable raising ValueError/KeyError or giving units outside 1..MAX_UNITS: 400."""

    @metered("feature:a", units=units_fn)
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        r = await c.get("/" + query)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == "tag:usage-middleware,2025:invalid-units"
    assert body["status"] == 400 and body["feature"] == "feature:a"
    assert "units" in body["detail"]
    assert provider.ops("reserve") == []


async def test_out_of_range_units_detail_names_the_range(provider: RecordingProvider) -> None:
    """The 400 for out-of-range units says the allowed range 1..MAX_UNITS."""

    @metered("feature:a", units=lambda request: MAX_UNITS + 1)
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 400 and f"1 to {MAX_UNITS}" in r.json()["detail"]


async def test_bad_units_of_a_later_feature_reserve_nothing(provider: RecordingProvider) -> None:
    """With two features, a bad units value of the second holds nothing for the first."""

    @metered("feature:a", units=2)
    @metered("feature:b", units=_query_units)
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        assert (await c.get("/?n=nope")).status_code == 400
    assert provider.ops("reserve") == []
    provider.assert_settled()


@pytest.mark.parametrize("value", [None, "x", "3", 2.0, True])
async def test_units_callable_returning_a_non_int_is_a_500_problem(
    provider: RecordingProvider, value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A units callable returning a non-int is a bug: logged, 500 problem+json naming it."""

    async def async_value(request: Request) -> Any:
        return value

    @metered("feature:a", units=async_value)
    async def convert_things(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", convert_things)])
    with caplog.at_level(logging.ERROR, logger="usage_middleware"):
        async with client(app) as c:
            r = await c.get("/")
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 500 and body["feature"] == "feature:a"
    assert "convert_things" in body["detail"]
    assert provider.ops("reserve") == []
    assert any("convert_things" in rec.getMessage() for rec in caplog.records)


async def test_units_callable_http_exception_passes_through(provider: RecordingProvider) -> None:
    """A units callable raising HTTPException gets that exception's response, nothing held."""

    def units(request: Request) -> int:
        raise HTTPException(413, "too many items")

    @metered("feature:a", units=units)
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 413 and provider.ops("reserve") == []


async def test_no_customer_is_401(provider: RecordingProvider) -> None:
    """A metered route without a customer answers 401 problem+json and reserves nothing."""
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        r = await c.get("/")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 401 and body["type"].endswith("customer-required")
    assert provider.ops("reserve") == []


async def test_malformed_customer_is_401(provider: RecordingProvider) -> None:
    """A customer id with whitespace inside is refused with 401, never 500."""
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with client(app) as c:
        r = await c.get("/", headers={"X-Customer": "org acme"})
    assert r.status_code == 401 and "malformed" in r.json()["detail"]
    assert provider.ops("reserve") == []


async def test_async_customer_resolver(provider: RecordingProvider) -> None:
    """An async customer resolver is awaited."""

    async def resolve(request: Request) -> str | None:
        await asyncio.sleep(0)
        return "org:acme"

    app = make_app(provider, [Route("/", ok_endpoint)], customer=resolve)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        assert (await c.get("/")).status_code == 200
    assert provider.charged_units("org:acme", "feature:a") == 1


async def test_402_problem_body_and_ratelimit_headers(provider: RecordingProvider) -> None:
    """A refused request gets 402 problem+json with the numbers and RateLimit fields."""
    provider.set_balance("org:acme", "feature:a", 10)
    provider.limits[("org:acme", "feature:a")] = 10
    provider.charged[("org:acme", "feature:a")] = 9

    @metered("feature:a", units=2)
    async def endpoint(request: Request) -> Response:
        raise AssertionError("must not run")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 402
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body == {
        "type": "tag:usage-middleware,2025:quota-exceeded",
        "title": "Payment Required",
        "status": 402,
        "detail": body["detail"],
        "feature": "feature:a",
        "units": 2,
        "limit": 10,
        "used": 9,
        "remaining": 1,
    }
    assert "feature:a" in body["detail"]
    assert r.headers["ratelimit-policy"] == '"feature:a";q=10'
    assert r.headers["ratelimit"] == '"feature:a";r=1'
    assert "retry-after" not in r.headers
    assert provider.ops("commit", "release") == []
    provider.assert_settled()


async def test_402_without_known_limit_has_no_ratelimit_headers(
    provider: RecordingProvider,
) -> None:
    """An unknown customer's 402 has no RateLimit fields and carries the reason."""
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with client(app) as c:
        r = await c.get("/", headers={"X-Customer": "org:nobody"})
    assert r.status_code == 402
    assert r.json()["reason"] == "unknown customer" and r.json()["limit"] is None
    assert "ratelimit" not in r.headers and "ratelimit-policy" not in r.headers


async def test_unlimited_limit_has_no_ratelimit_headers(provider: RecordingProvider) -> None:
    """UNLIMITED is not advertised as a RateLimit policy."""
    provider.limits[("org:acme", "feature:a")] = UNLIMITED

    @metered("feature:a", units=1000)
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("no")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 402 and "ratelimit-policy" not in r.headers


async def test_successful_response_has_no_retry_after(provider: RecordingProvider) -> None:
    """A served request's response headers are untouched (no Retry-After, no RateLimit)."""
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 200
    assert not {"retry-after", "ratelimit", "ratelimit-policy"} & set(r.headers)


async def test_failed_closed_check_is_503_with_retry_after(provider: RecordingProvider) -> None:
    """Answer(ok=False, err=...) gives 503 problem+json with the provider's Retry-After."""
    provider.failed_closed = True
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["feature"] == "feature:a"


async def test_reserve_raising_fails_closed_by_default(provider: RecordingProvider) -> None:
    """A provider raising from reserve gives 503 (policy closed) and the endpoint does not run."""
    provider.fail_reserve = True
    ran: list[bool] = []

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        ran.append(True)
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 503 and "retry-after" in r.headers
    assert ran == []


async def test_reserve_raising_fails_open_when_asked(provider: RecordingProvider) -> None:
    """With failure_policy='open' a raising reserve serves the request uncharged."""
    provider.fail_reserve = True
    app = make_app(provider, [Route("/", ok_endpoint)], failure_policy="open")
    async with client(app) as c:
        assert (await c.get("/")).status_code == 200
    assert provider.charged == {}


async def test_on_provider_error_open_serves_uncharged(provider: RecordingProvider) -> None:
    """on_provider_error='open' (the new name of failure_policy) serves uncharged."""
    provider.fail_reserve = True
    app = make_app(provider, [Route("/", ok_endpoint)], on_provider_error="open")
    async with client(app) as c:
        assert (await c.get("/")).status_code == 200
    assert provider.charged == {}


def test_on_provider_error_and_failure_policy_must_agree(provider: RecordingProvider) -> None:
    """Both names with different values is a ConfigurationError; the same value is fine."""
    app = Starlette()
    with pytest.raises(ConfigurationError, match="on_provider_error"):
        UsageMiddleware(
            app, provider=provider, customer=by_header, on_provider_error="open",
            failure_policy="closed",
        )  # fmt: skip
    with pytest.raises(ConfigurationError, match="on_provider_error"):
        UsageMiddleware(app, provider=provider, customer=by_header, on_provider_error="x")  # type: ignore[arg-type]
    mw = UsageMiddleware(
        app, provider=provider, customer=by_header, on_provider_error="open", failure_policy="open"
    )
    assert mw.on_provider_error == mw.failure_policy == "open"
    assert UsageMiddleware(app, provider=provider, customer=by_header).failure_policy == "closed"


async def test_prepare_raising_closed_aborts_before_final_body(
    provider: RecordingProvider,
) -> None:
    """A raising prepare (policy closed) withholds the final body and releases the hold."""
    provider.fail_prepare = True
    app = make_app(provider, [Route("/", ok_endpoint)])
    ex = await drive(app, http_scope("/", headers=ACME))
    assert ex.status == 200 and not ex.complete
    assert provider.charged_units("org:acme", "feature:a") == 0
    assert [c.op for c in provider.ops("commit", "release")] == ["release"]
    provider.assert_settled()


async def test_prepare_raising_open_serves_uncharged(provider: RecordingProvider) -> None:
    """A raising prepare (policy open) sends the full response and releases the hold."""
    provider.fail_prepare = True
    app = make_app(provider, [Route("/", ok_endpoint)], failure_policy="open")
    ex = await drive(app, http_scope("/", headers=ACME))
    assert ex.complete and json.loads(ex.body) == {"ok": True}
    assert provider.charged_units("org:acme", "feature:a") == 0
    provider.assert_settled()


async def test_commit_error_is_logged_not_raised(
    provider: RecordingProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider error in commit is logged; the client still gets its 200."""
    provider.fail_commit = True
    app = make_app(provider, [Route("/", ok_endpoint)])
    with caplog.at_level(logging.ERROR, logger="usage_middleware"):
        ex = await drive(app, http_scope("/", headers=ACME))
    assert ex.error is None and ex.status == 200 and ex.complete
    assert any("commit" in rec.getMessage() for rec in caplog.records)


async def test_release_error_is_logged_not_raised(
    provider: RecordingProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider error in release is logged; the client's 404 is unchanged."""
    provider.fail_release = True

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("nope", status_code=404)

    app = make_app(provider, [Route("/", endpoint)])
    with caplog.at_level(logging.ERROR, logger="usage_middleware"):
        ex = await drive(app, http_scope("/", headers=ACME))
    assert ex.error is None and ex.status == 404 and ex.body == b"nope"
    assert any("release" in rec.getMessage() for rec in caplog.records)


async def test_two_features_all_or_nothing(provider: RecordingProvider) -> None:
    """Two @metered: when the second is refused, the first hold is released, nothing runs."""
    provider.set_balance("org:acme", "feature:b", 0)
    ran: list[bool] = []

    @metered("feature:a")
    @metered("feature:b")
    async def endpoint(request: Request) -> Response:
        ran.append(True)
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 402 and r.json()["feature"] == "feature:b"
    assert ran == []
    assert [(c.op, c.feature) for c in provider.ops("reserve", "commit", "release")] == [
        ("reserve", "feature:a"),
        ("reserve", "feature:b"),
        ("release", "feature:a"),
    ]
    assert provider.charged == {}
    provider.assert_settled()


async def test_two_features_both_charged(provider: RecordingProvider) -> None:
    """Two @metered on a 200 charge both features once each."""

    @metered("feature:a", units=2)
    @metered("feature:b", units=5)
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", endpoint)])
    async with client(app) as c:
        assert (await c.get("/")).status_code == 200
    assert provider.charged == {("org:acme", "feature:a"): 2, ("org:acme", "feature:b"): 5}
    provider.assert_settled()


async def test_custom_charge_if(provider: RecordingProvider) -> None:
    """charge_if decides which statuses are charged (here: 2xx and 404)."""

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("missing", status_code=404)

    app = make_app(provider, [Route("/", endpoint)], charge_if=lambda s: 200 <= s < 300 or s == 404)
    async with client(app) as c:
        assert (await c.get("/")).status_code == 404
    assert provider.charged_units("org:acme", "feature:a") == 1


async def test_reserve_receives_the_scope(provider: RecordingProvider) -> None:
    """provider.reserve gets the request's ASGI scope (for providers acting for the user)."""
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with client(app) as c:
        await c.get("/")
    scope = provider.scopes[0]
    assert scope is not None and scope["path"] == "/"


async def test_concurrent_requests_cannot_overspend() -> None:
    """30 concurrent requests for the last 10 units: exactly 10 are served and charged."""
    provider = RecordingProvider({("org:acme", "feature:a"): 10})
    provider.reserve_delay = 0.001
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with client(app) as c:
        statuses = await asyncio.gather(*(c.get("/") for _ in range(30)))
    codes = sorted(r.status_code for r in statuses)
    assert codes.count(200) == 10 and codes.count(402) == 20
    assert provider.charged_units("org:acme", "feature:a") == 10
    provider.assert_settled()


async def test_mounted_sub_app_is_metered_once(provider: RecordingProvider) -> None:
    """A metered route inside a mounted sub-app that has its own UsageMiddleware: one charge."""
    inner_provider = RecordingProvider({("org:acme", "feature:a"): 100})
    sub = make_app(inner_provider, [Route("/x", ok_endpoint)])
    app = make_app(provider, [Mount("/sub", app=sub)])
    async with client(app) as c:
        assert (await c.get("/sub/x")).status_code == 200
    assert provider.charged_units("org:acme", "feature:a") == 1
    assert inner_provider.ops("reserve", "commit") == []
    provider.assert_settled()


async def test_mounted_routes_without_own_middleware(provider: RecordingProvider) -> None:
    """A metered route in a Mount(routes=...) is metered by the outer middleware."""
    app = make_app(provider, [Mount("/api", routes=[Route("/x", ok_endpoint)])])
    async with client(app) as c:
        assert (await c.get("/api/x")).status_code == 200
    assert provider.charged_units("org:acme", "feature:a") == 1


async def test_lifespan_messages_pass_through_and_provider_opens_and_closes(
    provider: RecordingProvider,
) -> None:
    """Lifespan messages are forwarded unchanged; the provider is open during the app's lifespan."""
    states: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        states.append(provider.state.value)
        yield
        states.append(provider.state.value)

    app = make_app(provider, [Route("/", ok_endpoint)], lifespan=lifespan)
    sent = await run_lifespan(app, between=lambda: states.append(provider.state.value))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert states == ["open", "open", "open"]
    assert provider.state.value == "closed"
    assert [c.op for c in provider.ops("open", "aclose")] == ["open", "aclose"]


async def test_provider_open_failure_fails_startup() -> None:
    """A provider that cannot open turns startup.complete into startup.failed with the reason."""

    class Broken(RecordingProvider):
        async def open(self) -> None:
            raise OSError("disk on fire")

    app = make_app(Broken(), [Route("/", ok_endpoint)])
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "disk on fire" in sent[0]["message"]


async def test_provider_opens_lazily_without_lifespan(provider: RecordingProvider) -> None:
    """Without a lifespan the provider is opened once, on the first requests."""
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with client(app) as c:
        await asyncio.gather(*(c.get("/") for _ in range(5)))
    assert [c.op for c in provider.ops("open")] == ["open"]
    assert provider.charged_units("org:acme", "feature:a") == 5


async def test_websocket_passes_through(provider: RecordingProvider) -> None:
    """A websocket scope reaches the app untouched: no state in scope, no provider calls."""
    seen: list[bool] = []

    async def ws_endpoint(ws: WebSocket) -> None:
        seen.append(SCOPE_KEY in ws.scope)
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    app = make_app(provider, [WebSocketRoute("/ws", ws_endpoint)])
    inbox: list[Message] = [{"type": "websocket.connect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox:
            return inbox.pop()
        await asyncio.sleep(0.01)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope("/ws")
    scope["type"] = "websocket"
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert seen == [False]
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert provider.calls == []


async def test_nested_scope_key_passes_through(provider: RecordingProvider) -> None:
    """A request that already carries metering state is passed through untouched."""
    calls: list[Scope] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(scope)
        await PlainTextResponse("x")(scope, receive, send)

    mw = UsageMiddleware(inner, provider=provider, customer=by_header)
    outer_state = Meter(mw.config)
    scope = http_scope("/")
    scope[SCOPE_KEY] = outer_state
    ex = await drive(mw, scope)
    assert ex.status == 200 and calls[0][SCOPE_KEY] is outer_state
    assert provider.calls == []


async def test_metered_without_middleware_is_a_clear_error() -> None:
    """A metered endpoint without UsageMiddleware raises ConfigurationError naming the fix."""
    app = Starlette(routes=[Route("/", ok_endpoint)])
    ex = await drive(app, http_scope("/", headers=ACME))
    assert isinstance(ex.error, ConfigurationError)
    assert "app.add_middleware(UsageMiddleware" in str(ex.error)
    assert ex.status == 500


def test_configuration_errors_name_the_fix(provider: RecordingProvider) -> None:
    """Bad UsageMiddleware arguments raise ConfigurationError at construction."""
    app = Starlette()
    with pytest.raises(ConfigurationError, match="customer="):
        UsageMiddleware(app, provider=provider)
    with pytest.raises(ConfigurationError, match="callable"):
        UsageMiddleware(app, provider=provider, customer="org:acme")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="failure_policy"):
        UsageMiddleware(app, provider=provider, customer=by_header, failure_policy="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Provider"):
        UsageMiddleware(app, provider=object(), customer=by_header)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="charge_if"):
        UsageMiddleware(app, provider=provider, customer=by_header, charge_if=200)  # type: ignore[arg-type]


async def test_misplaced_metered_detected_at_startup_and_first_request(
    provider: RecordingProvider,
) -> None:
    """An endpoint marked @metered but registered unwrapped fails startup and every request."""

    async def raw(request: Request) -> Response:
        return PlainTextResponse("unmetered!")

    metered("feature:a")(raw)  # the wrapper is thrown away, as with @metered above @app.get
    app = make_app(provider, [Route("/raw", raw)])
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "raw" in sent[0]["message"] and "below" in sent[0]["message"]

    app2 = make_app(RecordingProvider(), [Route("/raw", raw)])
    async with client(app2) as c:
        r = await c.get("/raw")
    assert r.status_code == 500 and "unmetered" not in r.text


async def test_same_function_name_endpoints_are_independent(provider: RecordingProvider) -> None:
    """Two endpoints named alike, metering different features, charge their own feature."""

    def make(feature: str) -> Any:
        @metered(feature)
        async def endpoint(request: Request) -> Response:
            return PlainTextResponse(feature)

        return endpoint

    app = make_app(provider, [Route("/a", make("feature:a")), Route("/b", make("feature:b"))])
    async with client(app) as c:
        assert (await c.get("/a")).text == "feature:a"
        assert (await c.get("/b")).text == "feature:b"
        assert (await c.get("/b")).text == "feature:b"
    assert provider.charged == {("org:acme", "feature:a"): 1, ("org:acme", "feature:b"): 2}


async def test_default_provider_is_a_local_ledger(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """provider=None builds a LocalLedger."""
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("usage_middleware.ledger.local")
    from usage_middleware.ledger.local import LocalLedger

    mw = UsageMiddleware(Starlette(), customer=by_header)
    assert isinstance(mw.provider, LocalLedger)


async def test_head_and_options_are_free_by_default(provider: RecordingProvider) -> None:
    """HEAD (run by the GET handler) and OPTIONS on a metered route: not checked, not charged."""

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("body")

    app = make_app(provider, [Route("/", endpoint, methods=["GET", "OPTIONS"])])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:  # no customer header at all: still served
        head = await c.head("/")
        options = await c.options("/")
    assert head.status_code == 200 and head.content == b""
    assert options.status_code == 200
    assert provider.ops("reserve", "prepare", "commit", "release") == []


async def test_free_methods_empty_meters_head(provider: RecordingProvider) -> None:
    """free_methods=() meters HEAD like GET: 401 without a customer, charged with one."""
    app = make_app(provider, [Route("/", ok_endpoint)], free_methods=())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        assert (await c.head("/")).status_code == 401
        assert (await c.head("/", headers=dict(ACME))).status_code == 200
    assert provider.charged_units("org:acme", "feature:a") == 1
    provider.assert_settled()


async def test_free_methods_custom_set(provider: RecordingProvider) -> None:
    """A custom free_methods set makes exactly those methods free (here GET), others metered."""

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = make_app(provider, [Route("/", endpoint, methods=["GET", "POST"])], free_methods={"GET"})
    async with client(app) as c:
        assert (await c.get("/")).status_code == 200
        assert (await c.post("/")).status_code == 200
    assert [c.op for c in provider.ops("reserve")] == ["reserve"]
    assert provider.charged_units("org:acme", "feature:a") == 1


@pytest.mark.parametrize("free", ["HEAD", {"head"}, {"HEAD", 3}, {""}, {"GET POST"}, None])
def test_free_methods_is_validated(free: Any) -> None:
    """free_methods must be a set of upper-case method names, else construction fails."""
    with pytest.raises(ConfigurationError, match="free_methods"):
        UsageMiddleware(
            ok_endpoint, provider=RecordingProvider(), customer=by_header, free_methods=free
        )


async def test_401_carries_www_authenticate(provider: RecordingProvider) -> None:
    """A 401 for a missing or malformed customer carries WWW-Authenticate (Bearer by default)."""
    app = make_app(provider, [Route("/", ok_endpoint)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        missing = await c.get("/")
        malformed = await c.get("/", headers={"X-Customer": "org:a\x7fb"})
    for r in (missing, malformed):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


async def test_www_authenticate_is_configurable(provider: RecordingProvider) -> None:
    """www_authenticate= sets the challenge sent on 401s; successful responses get none."""
    challenge = 'Basic realm="api", charset="UTF-8"'
    app = make_app(provider, [Route("/", ok_endpoint)], www_authenticate=challenge)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        r = await c.get("/")
        ok = await c.get("/", headers=dict(ACME))
    assert r.status_code == 401 and r.headers["www-authenticate"] == challenge
    assert ok.status_code == 200 and "www-authenticate" not in ok.headers


@pytest.mark.parametrize("challenge", ["", "Bearer\r\nX-Evil: 1", None, 3])
def test_www_authenticate_is_validated(challenge: Any) -> None:
    """www_authenticate must be a non-empty single-line string."""
    with pytest.raises(ConfigurationError, match="www_authenticate"):
        UsageMiddleware(
            ok_endpoint,
            provider=RecordingProvider(),
            customer=by_header,
            www_authenticate=challenge,
        )
