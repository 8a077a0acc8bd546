"""Units settled after the response, at the edge: the per-request UnitsMeter (usage_of,
Usage), the response readers (units_from), charge_partial, websockets, and the options'
checks at decoration."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse as FastStreamingResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from tests.support.metering_helpers import RecordingProvider
from usage_middleware import (
    ConfigurationError,
    Metered,
    Usage,
    UsageMiddleware,
    metered,
    usage_from_json,
    usage_from_sse,
    usage_of,
)
from usage_middleware.customers import customer_from_header
from usage_middleware.units import MAX_BODY

ACME = {"X-Customer": "org:acme"}
by_header = customer_from_header("X-Customer")


def starlette(provider: RecordingProvider, *routes: Any) -> Starlette:
    return Starlette(
        routes=list(routes),
        middleware=[Middleware(UsageMiddleware, provider=provider, customer=by_header)],
    )


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def commits(provider: RecordingProvider) -> list[int]:
    return [call.units for call in provider.ops("commit")]


@metered("feature:a", units=10)
async def reports_seven(request: Request) -> Response:
    usage_of(request).set(7)
    return JSONResponse({"ok": True})


@metered("feature:a", units=10)
def reports_seven_sync(request: Request) -> Response:
    usage_of(request).add("feature:a", 3)
    usage_of(request).add("feature:a", 4)
    return JSONResponse({"ok": True})


@metered("feature:a", units=10)
async def reports_nothing(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def test_the_reported_units_are_charged_not_the_estimate(
    provider: RecordingProvider,
) -> None:
    """An async and a plain def endpoint reserving 10 and reporting 7 are charged 7; one
    reporting nothing is charged its estimate, 10."""
    app = starlette(
        provider,
        Route("/async", reports_seven),
        Route("/sync", reports_seven_sync),
        Route("/none", reports_nothing),
    )
    async with client(app) as c:
        for path in ("/async", "/sync", "/none"):
            assert (await c.get(path, headers=ACME)).status_code == 200
    assert commits(provider) == [7, 7, 10]
    assert provider.charged_units("org:acme", "feature:a") == 24
    provider.assert_settled()


async def test_a_stream_adding_as_it_goes_is_charged_the_sum(provider: RecordingProvider) -> None:
    """A streaming body that adds one unit per chunk is charged the chunks it sent."""

    @metered("feature:a", units=50)
    async def tokens(request: Request) -> Response:
        usage = usage_of(request)

        async def body() -> AsyncIterator[bytes]:
            for i in range(12):
                usage.add(1)
                yield f"token {i}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    async with client(starlette(provider, Route("/t", tokens))) as c:
        r = await c.get("/t", headers=ACME)
    assert r.text.count("token") == 12
    assert commits(provider) == [12]
    provider.assert_settled()


async def test_bad_reports_raise_in_the_app_and_never_become_a_500(
    provider: RecordingProvider,
) -> None:
    """Negative, non-int, too large, unknown-feature and ambiguous reports raise TypeError or
    ValueError at the call, in the endpoint; the request still settles (its estimate)."""
    seen: list[str] = []

    @metered("feature:a", units=5)
    @metered("feature:b", units=5)
    async def bad(request: Request) -> Response:
        usage = usage_of(request)
        for call in (
            lambda: usage.set("feature:a", -1),
            lambda: usage.set("feature:a", 1.5),
            lambda: usage.add("feature:a", True),
            lambda: usage.add("feature:a", 10**16),
            lambda: usage.set("feature:zzz", 1),
            lambda: usage.set(3),
        ):
            try:
                call()
            except (TypeError, ValueError) as exc:
                seen.append(f"{type(exc).__name__}: {exc}")
        return JSONResponse({"ok": True})

    async with client(starlette(provider, Route("/bad", bad))) as c:
        r = await c.get("/bad", headers=ACME)
    assert r.status_code == 200
    assert [line.split(":")[0] for line in seen] == [
        "ValueError",
        "TypeError",
        "TypeError",
        "ValueError",
        "ValueError",
        "ValueError",
    ]
    assert "does not meter 'feature:zzz'" in seen[4]
    assert "name the feature" in seen[5]
    assert sorted(commits(provider)) == [5, 5]
    provider.assert_settled()


async def test_a_stream_cut_by_an_error_is_charged_only_with_charge_partial(
    provider: RecordingProvider,
) -> None:
    """A stream that raises after reporting 3 units is not charged by default; with
    charge_partial=True it is charged the 3 units reported until then."""

    def make(partial: bool) -> Any:
        @metered("feature:a", units=20, charge_partial=partial)
        async def broken(request: Request) -> Response:
            usage = usage_of(request)

            async def body() -> AsyncIterator[bytes]:
                for _ in range(3):
                    usage.add(1)
                    yield b"token\n"
                raise RuntimeError("the model crashed")

            return StreamingResponse(body(), media_type="text/plain")

        return broken

    app = starlette(provider, Route("/plain", make(False)), Route("/partial", make(True)))
    async with client(app) as c:
        for path in ("/plain", "/partial"):
            try:
                await c.get(path, headers=ACME)
            except httpx.HTTPError:
                pass
    assert [(c.op, c.units) for c in provider.ops("commit", "release")] == [
        ("release", 20),
        ("commit", 3),
    ]
    assert provider.charged_units("org:acme", "feature:a") == 3
    provider.assert_settled()


async def test_units_from_json_reads_the_body_field(provider: RecordingProvider) -> None:
    """units_from=usage_from_json() charges usage.total_tokens of a JSON body (any path with
    path=); a body without it charges the estimate."""

    @metered("feature:a", units=30, units_from=usage_from_json())
    async def openai(request: Request) -> Response:
        return JSONResponse({"id": "x", "usage": {"prompt_tokens": 3, "total_tokens": 42}})

    @metered("feature:a", units=30, units_from=usage_from_json("meta.tokens"))
    async def custom(request: Request) -> Response:
        return JSONResponse({"meta": {"tokens": 9}})

    @metered("feature:a", units=30, units_from=usage_from_json())
    async def missing(request: Request) -> Response:
        return JSONResponse({"usage": None})

    app = starlette(provider, Route("/o", openai), Route("/c", custom), Route("/m", missing))
    async with client(app) as c:
        for path in ("/o", "/c", "/m"):
            assert (await c.get(path, headers=ACME)).status_code == 200
    assert commits(provider) == [42, 9, 30]


OPENAI_STREAM = (
    b'data: {"choices":[{"delta":{"content":"Hel"}}],"usage":null}\n\n'
    b'data: {"choices":[{"delta":{"content":"lo"}}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n'
    b"data: [DONE]\n\n"
)


async def test_units_from_sse_reads_the_last_usage_event_across_chunk_boundaries(
    provider: RecordingProvider,
) -> None:
    """units_from=usage_from_sse() charges the usage of OpenAI's final chunk even when the
    stream is cut into 3-byte pieces; the client gets every byte unchanged."""

    @metered("feature:a", units=50, units_from=usage_from_sse())
    async def chat(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for i in range(0, len(OPENAI_STREAM), 3):
                yield OPENAI_STREAM[i : i + 3]

        return StreamingResponse(body(), media_type="text/event-stream")

    async with client(starlette(provider, Route("/chat", chat))) as c:
        r = await c.get("/chat", headers=ACME)
    assert r.content == OPENAI_STREAM
    assert commits(provider) == [7]


@pytest.mark.parametrize("eol", [b"\r", b"\r\n"], ids=["cr", "crlf"])
async def test_units_from_sse_reads_every_line_ending_of_the_sse_format(
    provider: RecordingProvider, eol: bytes
) -> None:
    """SSE lines may end with CR, CRLF or LF: the final usage is read with each, in pieces."""
    stream = OPENAI_STREAM.replace(b"\n", eol)

    @metered("feature:a", units=50, units_from=usage_from_sse())
    async def chat(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for i in range(0, len(stream), 3):
                yield stream[i : i + 3]

        return StreamingResponse(body(), media_type="text/event-stream")

    async with client(starlette(provider, Route("/chat", chat))) as c:
        r = await c.get("/chat", headers=ACME)
    assert r.content == stream
    assert commits(provider) == [7]


async def test_a_deeply_nested_event_does_not_hide_the_usage_after_it(
    provider: RecordingProvider,
) -> None:
    """An event nested too deep for json (RecursionError) is skipped like bad JSON: the
    usage event in the same chunk is still read."""
    deep = b'data: {"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n\n"

    @metered("feature:a", units=50, units_from=usage_from_sse())
    async def chat(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield deep + OPENAI_STREAM

        return StreamingResponse(body(), media_type="text/event-stream")

    async with client(starlette(provider, Route("/chat", chat))) as c:
        r = await c.get("/chat", headers=ACME)
    assert r.status_code == 200
    assert commits(provider) == [7]
    reader = usage_from_json().reader([(b"content-type", b"application/json")])
    assert reader is not None
    assert reader.feed(b"[" * 100_000, True) is None  # the estimate: logged, not raised


def test_the_sse_reader_keeps_at_most_one_bounded_line() -> None:
    """The SSE reader never keeps more than MAX_BODY bytes: a longer line is skipped and the
    usage event after it is still read."""
    reader = usage_from_sse().reader([(b"content-type", b"text/event-stream; charset=utf-8")])
    assert reader is not None
    big = b"data: " + b"x" * (MAX_BODY // 4)
    for _ in range(6):
        assert reader.feed(big, False) is None
    assert len(reader.line) <= MAX_BODY  # type: ignore[attr-defined]
    assert reader.feed(b"\n\n" + OPENAI_STREAM, True) == 7


def test_clobber_with_actual_units_fails_at_decoration_naming_the_fix() -> None:
    """clobber=True with units_from=, charge_partial= or overage= fails at decoration (and in
    Metered) naming the fix; bad option values fail too."""
    for options in (
        {"units_from": usage_from_json()},
        {"charge_partial": True},
        {"overage": "charge"},
    ):
        with pytest.raises(ConfigurationError, match="fixed units only"):
            metered("feature:a", clobber=True, **options)
        with pytest.raises(ConfigurationError, match="fixed units only"):
            Metered("feature:a", clobber=True, **options)
    with pytest.raises(ConfigurationError, match="'cap'"):
        metered("feature:a", overage="always")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="charge_partial"):
        metered("feature:a", charge_partial=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="usage_from_json"):
        metered("feature:a", units_from="usage.total_tokens")  # type: ignore[arg-type]


async def test_fastapi_usage_parameter_and_the_dependency_form(
    provider: RecordingProvider,
) -> None:
    """FastAPI: a `usage: Usage` parameter reports per feature on a route metered by a
    Metered dependency and @metered together; Depends(usage_of) works the same."""
    app = FastAPI()
    app.add_middleware(UsageMiddleware, provider=provider, customer=by_header)

    @app.get("/both", dependencies=[Depends(Metered("feature:b", units=8))])
    @metered("feature:a", units=9)
    async def both(usage: Usage) -> dict[str, int]:
        usage.set("feature:a", 2)
        usage.add("feature:b", 5)
        return {"ok": 1}

    @app.get("/stream")
    @metered("feature:a", units=30)
    async def stream(usage: Annotated[Any, Depends(usage_of)]) -> FastStreamingResponse:
        async def body() -> AsyncIterator[str]:
            for _ in range(4):
                usage.add(2)
                yield "tok "

        return FastStreamingResponse(body(), media_type="text/plain")

    async with client(app) as c:
        assert (await c.get("/both", headers=ACME)).status_code == 200
        assert (await c.get("/stream", headers=ACME)).text == "tok " * 4
    assert provider.charged_units("org:acme", "feature:a") == 2 + 8
    assert provider.charged_units("org:acme", "feature:b") == 5
    provider.assert_settled()


def test_websocket_per_message_units_are_charged_at_a_normal_close(
    provider: RecordingProvider,
) -> None:
    """A metered websocket adding one unit per message is charged the messages at a normal
    close (1000); closed with 1011 it is not charged, unless charge_partial=True."""

    def make(partial: bool) -> Any:
        @metered("feature:a", units=5, charge_partial=partial)
        async def echo(websocket: WebSocket) -> None:
            await websocket.accept()
            usage = usage_of(websocket)
            async for text in websocket.iter_text():
                usage.add(1)
                await websocket.send_text(text)

        return echo

    app = starlette(
        provider, WebSocketRoute("/ws", make(False)), WebSocketRoute("/wsp", make(True))
    )
    with TestClient(app) as tc:
        for path, code in (("/ws", 1000), ("/ws", 1011), ("/wsp", 1011)):
            with tc.websocket_connect(path, headers=ACME) as ws:
                for i in range(3):
                    ws.send_text(f"m{i}")
                    assert ws.receive_text() == f"m{i}"
                ws.close(code)
    settled = [(c.op, c.units) for c in provider.ops("commit", "release")]
    assert settled == [("commit", 3), ("release", 5), ("commit", 3)]
    provider.assert_settled()


async def test_a_report_after_the_charge_raises(provider: RecordingProvider) -> None:
    """A report made after the request's units were settled (a background task) raises
    RuntimeError instead of being lost silently."""
    errors: list[BaseException] = []

    @metered("feature:a", units=4)
    async def late(request: Request) -> Response:
        usage = usage_of(request)

        def after() -> None:
            try:
                usage.add(1)
            except RuntimeError as exc:
                errors.append(exc)

        from starlette.background import BackgroundTask

        return JSONResponse({"ok": True}, background=BackgroundTask(after))

    async with client(starlette(provider, Route("/late", late))) as c:
        assert (await c.get("/late", headers=ACME)).status_code == 200
    assert len(errors) == 1 and "already settled" in str(errors[0])
    assert commits(provider) == [4]


def test_usage_json_example_body() -> None:
    """OPENAI_STREAM's last usage event is what the JSON path names (a fixture sanity check)."""
    last = [line for line in OPENAI_STREAM.split(b"\n") if b"total_tokens" in line][-1]
    assert json.loads(last[5:])["usage"]["total_tokens"] == 7


@pytest.mark.parametrize("name", ["tier", "spaire", "fake_remote"])
async def test_remote_providers_write_the_actual_units_to_the_outbox_before_the_final_body(
    tmp_path: Any, name: str
) -> None:
    """Over a remote provider (its fake backend), an SSE stream reserving 30 and carrying a
    final usage of 7 has an event of 7 units written to the outbox before its final body
    goes out; a stream whose actual units are not known by then (no usage event, nothing
    reported) has its estimate, 30, written instead. The backend records 7 + 30."""
    import importlib

    module = importlib.import_module(f"tests.support.contract_{name}")
    feature = str(getattr(module, "UNITS_FEATURE", "feature:contract"))
    async with module.make_subject(tmp_path) as subject:
        remote = subject.provider
        customer = "org:stream"
        await subject.give(customer, feature, 100)
        timeline: list[str] = []
        delivery: Any = remote._delivery  # type: ignore[attr-defined]
        for attr in ("prepare", "prepare_alone"):
            original = getattr(delivery, attr)

            async def spy(event: Any, original: Any = original) -> None:
                timeline.append(f"outbox {event.units}")
                await original(event)

            setattr(delivery, attr, spy)

        @metered(feature, units=30, units_from=usage_from_sse())
        async def chat(request: Request) -> Response:
            async def body() -> AsyncIterator[bytes]:
                yield OPENAI_STREAM

            return StreamingResponse(body(), media_type="text/event-stream")

        @metered(feature, units=30, units_from=usage_from_sse())
        async def unknown(request: Request) -> Response:
            async def body() -> AsyncIterator[bytes]:
                yield b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n'

            return StreamingResponse(body(), media_type="text/event-stream")

        inner = Starlette(
            routes=[Route("/chat", chat), Route("/unknown", unknown)],
            middleware=[Middleware(UsageMiddleware, provider=remote, customer=by_header)],
        )

        async def app(scope: Any, receive: Any, send: Any) -> None:
            async def watch(message: Any) -> None:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    timeline.append("final body")
                await send(message)

            await inner(scope, receive, watch)

        async with client(app) as c:
            r = await c.get("/chat", headers={"X-Customer": customer})
            assert r.status_code == 200
            assert timeline == ["outbox 7", "final body"]
            assert (await c.get("/unknown", headers={"X-Customer": customer})).status_code == 200
        assert timeline == ["outbox 7", "final body", "outbox 30", "final body"]
        assert await subject.charged(customer, feature) == 7 + 30
