"""The example apps (FastAPI and Starlette) serve, meter and refuse as their docs say."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn

from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
APPS = ["fastapi_app", "starlette_app"]
CUSTOMER = "org:acme"


def load_example(name: str) -> Iterator[ModuleType]:
    """Import examples/<name>.py afresh (it reads USAGE_DB and USAGE_PRICING at import)."""
    module_name = f"example_{name}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[module_name]


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run the ASGI lifespan protocol around the block (startup, then shutdown)."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    message = await asyncio.wait_for(outbox.get(), 10)
    assert message["type"] == "lifespan.startup.complete", message
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        message = await asyncio.wait_for(outbox.get(), 10)
        assert message["type"] == "lifespan.shutdown.complete", message
        await asyncio.wait_for(task, 10)


@pytest.fixture(params=APPS)
def example(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    monkeypatch.setenv("USAGE_DB", str(tmp_path / "usage.db"))
    monkeypatch.delenv("USAGE_PRICING", raising=False)
    yield from load_example(request.param)


@pytest.fixture
async def client(example: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the example app, its lifespan running and org:acme on the free plan."""
    async with lifespan(example.app):
        await example.ledger.subscribe(CUSTOMER, "plan:free@1")
        transport = httpx.ASGITransport(app=example.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://example", headers={"x-customer": CUSTOMER}
        ) as client:
            yield client


async def used(example: ModuleType, feature: str, customer: str = CUSTOMER) -> tuple[int, int]:
    """(units used this period, credit balance) of ``feature`` in the example's ledger."""
    for row in await example.ledger.usage(customer):
        if row.feature == feature:
            return row.used, row.credits
    return 0, 0


async def test_per_request_feature_is_served_until_the_limit_then_402(
    example: ModuleType, client: httpx.AsyncClient
) -> None:
    """POST /convert is charged 1 unit per 200; the 6th on the free plan gets a 402 problem."""
    for i in range(5):
        response = await client.post("/convert", json={"text": f"hi {i}"})
        assert response.status_code == 200
        assert response.json() == {"converted": f"HI {i}"}
    assert await used(example, "feature:convert") == (5, 0)

    denied = await client.post("/convert", json={"text": "one too many"})
    assert denied.status_code == 402
    assert denied.headers["content-type"].startswith("application/problem+json")
    body = denied.json()
    assert body["status"] == 402
    assert (body["feature"], body["units"], body["limit"], body["used"], body["remaining"]) == (
        "feature:convert", 1, 5, 5, 0,
    )  # fmt: skip
    assert await used(example, "feature:convert") == (5, 0)


async def test_units_callable_charges_the_pages_asked_for(
    example: ModuleType, client: httpx.AsyncClient
) -> None:
    """POST /summarize?pages=N charges N units; a request beyond the allowance gets 402."""
    response = await client.post("/summarize", params={"pages": 3})
    assert response.status_code == 200
    assert response.json()["pages"] == 3
    assert await used(example, "feature:pages") == (3, 0)

    too_many = await client.post("/summarize", params={"pages": 18})
    assert too_many.status_code == 402
    assert too_many.json()["units"] == 18
    assert too_many.json()["remaining"] == 17
    assert await used(example, "feature:pages") == (3, 0)


async def test_a_failed_request_is_not_charged(
    example: ModuleType, client: httpx.AsyncClient
) -> None:
    """A request the route refuses (pages=0 -> 4xx) is not charged."""
    response = await client.post("/summarize", params={"pages": 0})
    assert response.status_code in (400, 422)
    response = await client.post("/summarize", params={"pages": "many"})
    assert response.status_code in (400, 422)
    assert await used(example, "feature:pages") == (0, 0)


async def test_credit_funded_feature_needs_credits_on_the_free_plan(
    example: ModuleType, client: httpx.AsyncClient
) -> None:
    """POST /generate is outside the free plan: 402 until credits are granted, then spends them."""
    assert (await client.post("/generate")).status_code == 402

    assert await example.ledger.grant(CUSTOMER, "feature:generate", 2) == 2
    assert (await client.post("/generate")).status_code == 200
    assert (await client.post("/generate")).status_code == 200
    assert (await client.post("/generate")).status_code == 402
    assert await used(example, "feature:generate") == (2, 0)


async def test_pro_plan_allows_more(example: ModuleType, client: httpx.AsyncClient) -> None:
    """A pro customer is not limited to the free plan's 5 conversions."""
    await example.ledger.subscribe("org:pro", "plan:pro@1")
    for _ in range(8):
        response = await client.post(
            "/convert", json={"text": "x"}, headers={"x-customer": "org:pro"}
        )
        assert response.status_code == 200
    assert await used(example, "feature:convert", "org:pro") == (8, 0)


async def test_missing_customer_header_is_401_and_health_is_unmetered(
    example: ModuleType, client: httpx.AsyncClient
) -> None:
    """Without x-customer a metered route answers 401 problem+json; /health needs nobody."""
    response = await client.post("/convert", json={"text": "x"}, headers={"x-customer": ""})
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    anonymous = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=example.app), base_url="http://e"
    )
    async with anonymous:
        assert (await anonymous.post("/convert", json={"text": "x"})).status_code == 401
        assert (await anonymous.get("/health")).json() == {"status": "ok"}
    assert await used(example, "feature:convert") == (0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", APPS)
async def test_example_serves_over_real_uvicorn(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under uvicorn on loopback, each example meters and refuses over real HTTP."""
    monkeypatch.setenv("USAGE_DB", str(tmp_path / "usage.db"))
    for example in load_example(name):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(example.app, lifespan="on", log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            for _ in range(200):
                if server.started:
                    break
                await asyncio.sleep(0.05)
            assert server.started
            await example.ledger.subscribe(CUSTOMER, "plan:free@1")
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers={"x-customer": CUSTOMER}, timeout=10
            ) as client:
                statuses = [
                    (await client.post("/convert", json={"text": "x"})).status_code
                    for _ in range(6)
                ]
                assert statuses == [200] * 5 + [402]
                assert await used(example, "feature:convert") == (5, 0)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 15)
            sock.close()


async def test_readme_quick_start_meters_as_described(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's FastAPI quick start runs as printed: it serves, charges and refuses."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    code = readme[readme.index("```python\n", start) + len("```python\n") :]
    code = code[: code.index("```")]
    (tmp_path / "pricing.json").write_text((EXAMPLES / "pricing.json").read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme_quick_start"}
    exec(compile(code, "README.md", "exec"), namespace)
    app, ledger = namespace["app"], namespace["ledger"]
    async with lifespan(app):
        await ledger.subscribe(CUSTOMER, "plan:free@1")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://readme", headers={"x-customer": CUSTOMER}
        ) as client:
            converted = await client.post("/convert", json={"text": "hi"})
            assert converted.status_code == 200
            assert converted.json() == {"converted": "HI"}
            assert (await client.post("/summarize", params={"pages": 4})).status_code == 200
            assert (await client.post("/summarize", params={"pages": 0})).status_code == 422
            assert (await client.post("/summarize", params={"pages": 17})).status_code == 402
        rows = {row.feature: row.used for row in await ledger.usage(CUSTOMER)}
        assert rows["feature:convert"] == 1
        assert rows["feature:pages"] == 4


@pytest.mark.parametrize("pages", ["²", "1_000", "1001", "0", "x"])
async def test_malformed_pages_are_a_4xx_and_charge_nothing(
    example: ModuleType, client: httpx.AsyncClient, pages: str
) -> None:
    """A page count that is not 1-1000 in ASCII digits is a 4xx (never a 500 or a 402) and
    charges nothing, in both example apps."""
    response = await client.post("/summarize", params={"pages": pages})
    assert response.status_code in (400, 422), response.text
    assert await used(example, "feature:pages") == (0, 0)


#: ``/summarize`` query strings: ambiguous numbers int() or FastAPI would read as 50, values
#: out of range, junk, a repeated key, and plain good ones.
PAGE_QUERIES = [
    "pages=5_0",
    "pages=%2B50",
    "pages=+50",
    "pages=50.0",
    "pages=%2050",
    "pages=50%20",
    "pages=%EF%BC%95%EF%BC%90",  # fullwidth digits
    "pages=0",
    "pages=-1",
    "pages=abc",
    "pages=",
    "pages=1&pages=50",
    "pages=50&pages=abc",
    "pages=50",
    "",
]


async def _pages_charged(
    client: httpx.AsyncClient, ledger: Any, customer: str, query: str
) -> tuple[httpx.Response, int]:
    """POST /summarize?<query> as ``customer``: (the response, units of pages charged)."""

    async def pages_used() -> int:
        rows = {row.feature: row.used for row in await ledger.usage(customer)}
        return rows.get("feature:pages", 0)

    before = await pages_used()
    response = await client.post(f"/summarize?{query}", headers={"x-customer": customer})
    return response, await pages_used() - before


@pytest.mark.parametrize("query", PAGE_QUERIES)
async def test_pages_charged_are_the_pages_served(
    example: ModuleType, client: httpx.AsyncClient, query: str
) -> None:
    """Each example charges exactly the pages it served, or refuses (FastAPI 422, Starlette
    400 problem, as examples/README.md says) and charges nothing."""
    await example.ledger.subscribe("org:pro", "plan:pro@1")
    response, charged = await _pages_charged(client, example.ledger, "org:pro", query)
    if response.status_code == 200:
        assert charged == response.json()["pages"], (query, response.text)
    else:
        refusal = 422 if "fastapi_app" in example.__name__ else 400
        assert (response.status_code, charged) == (refusal, 0), (query, response.text)
    if query in ("pages=50", "pages=1&pages=50"):
        assert (response.status_code, charged) == (200, 50)
    if query == "":
        assert (response.status_code, charged) == (200, 1)


def _readme_quick_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The README's Quick start python block, run as a module in ``tmp_path``."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    code = readme[readme.index("```python\n", start) + len("```python\n") :]
    code = code[: code.index("```")]
    (tmp_path / "pricing.json").write_text((EXAMPLES / "pricing.json").read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme_quick_start"}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("query", PAGE_QUERIES)
async def test_readme_quick_start_charges_the_pages_it_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    """The README's Quick start charges exactly the pages it served, or refuses with 4xx and
    charges nothing (`?pages=5_0` was served as 50 pages and charged 1)."""
    namespace = _readme_quick_start(tmp_path, monkeypatch)
    app, ledger = namespace["app"], namespace["ledger"]
    async with lifespan(app):
        await ledger.subscribe("org:pro", "plan:pro@1")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://readme") as client:
            response, charged = await _pages_charged(client, ledger, "org:pro", query)
    if response.status_code == 200:
        assert charged == response.json()["pages"], (query, response.text)
    else:
        assert response.status_code in (400, 422), (query, response.text)
        assert charged == 0, (query, response.text)
    if query in ("pages=50", "pages=1&pages=50"):
        assert (response.status_code, charged) == (200, 50)


def sse_data(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of a server-sent events body (``data: [DONE]`` left out)."""
    import json

    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_chat_streams_tokens_and_charges_the_tokens_used(
    example: ModuleType, client: httpx.AsyncClient
) -> None:
    """POST /chat streams the stand-in model's tokens as OpenAI-style SSE chunks and is
    charged their usage.total_tokens (prompt + completion), not its estimate (prompt +
    max_tokens); a customer whose estimate is beyond what is left gets a 402 and nothing
    is charged."""
    response = await client.post("/chat", json={"prompt": "hello metered world", "max_tokens": 20})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    events = sse_data(response.text)
    tokens = [e["choices"][0]["delta"]["content"] for e in events if e["choices"]]
    assert len(tokens) == 9  # the prompt's 3 words, three times over (below max_tokens)
    assert events[-1]["usage"]["total_tokens"] == 3 + 9
    assert await used(example, "feature:tokens") == (12, 0)

    near = await client.post(
        "/chat", json={"prompt": " ".join(["w"] * 300), "max_tokens": 256}
    )  # 556 > 500 - 12 left
    assert near.status_code == 402
    assert near.json()["units"] == 556 and near.json()["remaining"] == 488
    assert await used(example, "feature:tokens") == (12, 0)


@pytest.mark.slow
async def test_fastapi_chat_hang_up_half_way_is_charged_the_tokens_generated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real uvicorn, a client reading 4 of /chat's tokens and hanging up is charged
    the prompt and the tokens generated until then (charge_partial), not the estimate."""
    monkeypatch.setenv("USAGE_DB", str(tmp_path / "usage.db"))
    for example in load_example("fastapi_app"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(example.app, lifespan="on", log_level="warning"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            for _ in range(200):
                if server.started:
                    break
                await asyncio.sleep(0.05)
            assert server.started
            await example.ledger.subscribe(CUSTOMER, "plan:free@1")
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers={"x-customer": CUSTOMER}, timeout=10
            ) as client:
                body = {"prompt": "one two three four five", "max_tokens": 15}
                async with client.stream("POST", "/chat", json=body) as response:
                    assert response.status_code == 200
                    read = 0
                    async for line in response.aiter_lines():
                        read += '"content"' in line
                        if read == 4:
                            break

            async def charged(example: ModuleType = example) -> int:
                await example.ledger.flush()
                return (await used(example, "feature:tokens"))[0]

            await eventually(charged)
            assert 5 + 4 <= await charged() < 5 + 15
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 15)
            sock.close()
