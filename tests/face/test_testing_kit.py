"""The pytest kit (usage_middleware.testing + the pytest_usage_middleware plugin): fixtures,
clock, and assertions that see charges still pending, whichever loop the ledger lives on."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from usage_middleware import LocalLedger, UsageMiddleware, customer_from_header, metered
from usage_middleware.testing import LedgerClock, LedgerKit

ROOT = Path(__file__).resolve().parents[2]
CUSTOMER = "org:acme"
FEATURE = "feature:convert"
PRICING: dict[str, Any] = {
    "plans": {
        "plan:free@1": {"features": {FEATURE: {"tiers": [{"upto": 2}]}}},
        "plan:daily@1": {"interval": "@daily", "features": {FEATURE: {"tiers": [{"upto": 5}]}}},
    }
}
HEADERS = {"x-customer": CUSTOMER}
# A flush interval no test waits for: a charge stays in memory until someone flushes it.
SLOW_FLUSH = 60.0
KIT = pytest.mark.usage_ledger(
    pricing=PRICING, customers={CUSTOMER: "plan:free@1"}, flush_interval=SLOW_FLUSH
)


def make_app(ledger: LocalLedger) -> Starlette:
    @metered(FEATURE)
    async def convert(request: Request) -> PlainTextResponse:
        return PlainTextResponse("converted")

    app = Starlette(routes=[Route("/convert", convert, methods=["POST"])])
    app.add_middleware(
        UsageMiddleware, provider=ledger, customer=customer_from_header("x-customer")
    )
    return app


def asgi_client(kit: LedgerKit) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=make_app(kit.ledger))
    return httpx.AsyncClient(transport=transport, base_url="http://test", headers=HEADERS)


# -- the four ways a test drives an app ---------------------------------------------------------


@KIT
def test_sync_testclient_assertions_flush_the_app_loop(usage_ledger: LedgerKit) -> None:
    """Sync test + TestClient: charges pending on the lifespan loop are flushed and counted."""
    with TestClient(make_app(usage_ledger.ledger), headers=HEADERS) as client:
        assert client.post("/convert").status_code == 200
        assert usage_ledger._read(CUSTOMER) == {}, "still in memory: nothing flushed it yet"
        usage_ledger.assert_charged(CUSTOMER, FEATURE, 1)
        assert client.post("/convert").status_code == 200
        assert usage_ledger.charged(CUSTOMER) == 2
        assert client.post("/convert").status_code == 402
    usage_ledger.assert_charged(CUSTOMER, FEATURE, 2)  # closed: read from the file


@KIT
async def test_pytest_asyncio_asgitransport_assertions_flush_the_test_loop(
    usage_ledger: LedgerKit,
) -> None:
    """pytest-asyncio + ASGITransport: the ledger is on the test's loop; *_async flush it."""
    async with asgi_client(usage_ledger) as client:
        assert (await client.post("/convert")).status_code == 200
        assert usage_ledger._read(CUSTOMER) == {}
        await usage_ledger.assert_charged_async(CUSTOMER, FEATURE, 1)
        usage_ledger.assert_charged(CUSTOMER, FEATURE, 1)  # nothing pending now: sync is fine
        assert await usage_ledger.charges_async(CUSTOMER) == {FEATURE: 1}


@KIT
async def test_pytest_asyncio_testclient_assertions_reach_the_portal_loop(
    usage_ledger: LedgerKit,
) -> None:
    """An async test driving TestClient: the ledger is on TestClient's thread; both forms work."""
    with TestClient(make_app(usage_ledger.ledger), headers=HEADERS) as client:
        assert client.post("/convert").status_code == 200
        await usage_ledger.assert_charged_async(CUSTOMER, FEATURE, 1)
        assert client.post("/convert").status_code == 200
        usage_ledger.assert_charged(CUSTOMER, FEATURE, 2)
    await usage_ledger.assert_charged_async(CUSTOMER, FEATURE, 2)


ANYIO_PROJECT_TEST = """
import httpx, pytest
from starlette.testclient import TestClient
from test_testing_kit import CUSTOMER, FEATURE, HEADERS, KIT, make_app

@pytest.fixture
def anyio_backend():
    return "asyncio"

@KIT
@pytest.mark.anyio
async def test_asgitransport(usage_ledger):
    transport = httpx.ASGITransport(app=make_app(usage_ledger.ledger))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=HEADERS) as c:
        assert (await c.post("/convert")).status_code == 200
        assert usage_ledger._read(CUSTOMER) == {}
        await usage_ledger.assert_charged_async(CUSTOMER, FEATURE, 1)

@KIT
@pytest.mark.anyio
async def test_testclient(usage_ledger):
    with TestClient(make_app(usage_ledger.ledger), headers=HEADERS) as client:
        assert client.post("/convert").status_code == 200
        await usage_ledger.assert_charged_async(CUSTOMER, FEATURE, 1)
        usage_ledger.assert_charged(CUSTOMER, FEATURE, 1)
"""


@pytest.mark.slow
def test_anyio_alone_runs_the_kit_over_asgitransport_and_testclient(tmp_path: Path) -> None:
    """Under anyio's pytest plugin alone (no pytest-asyncio), both transports' charges show.

    (Here pytest-asyncio's auto mode would run anyio-marked tests itself, so a project
    with anyio only is run in a subprocess.)"""
    (tmp_path / "test_anyio_project.py").write_text(ANYIO_PROJECT_TEST)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "face")]),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:asyncio",
            "-p",
            "no:cacheprovider",
            "-p",
            "pytest_usage_middleware",
            "-q",
            "-rA",
            "test_anyio_project.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout


# -- misuse says what to do instead -------------------------------------------------------------


@KIT
async def test_sync_assertion_on_the_ledgers_own_loop_refuses_while_charges_pend(
    usage_ledger: LedgerKit,
) -> None:
    """A sync assertion cannot wait on its own loop: it raises naming the async form."""
    async with asgi_client(usage_ledger) as client:
        assert (await client.post("/convert")).status_code == 200
        with pytest.raises(RuntimeError, match=r"assert_charged_async"):
            usage_ledger.assert_charged(CUSTOMER, FEATURE, 1)
        await usage_ledger.flush_async()
        usage_ledger.assert_charged(CUSTOMER, FEATURE, 1)


@KIT
def test_testclient_without_lifespan_is_an_error_naming_the_fix(usage_ledger: LedgerKit) -> None:
    """TestClient without `with` ends the ledger's loop after a request: the kit says so."""
    client = TestClient(make_app(usage_ledger.ledger), headers=HEADERS)
    assert client.post("/convert").status_code == 200
    with pytest.raises(RuntimeError, match=r"with TestClient\(app\) as client"):
        usage_ledger.assert_charged(CUSTOMER, FEATURE, 1)


@KIT
def test_a_failed_assertion_says_what_was_charged(usage_ledger: LedgerKit) -> None:
    """assert_charged/assert_not_charged fail with the units found, per feature."""
    with TestClient(make_app(usage_ledger.ledger), headers=HEADERS) as client:
        assert client.post("/convert").status_code == 200
        with pytest.raises(AssertionError) as failed:
            usage_ledger.assert_charged(CUSTOMER, FEATURE, 2)
        assert str(failed.value) == (
            "org:acme was charged 1 units of feature:convert, expected 2 "
            "(charges by feature: {'feature:convert': 1})"
        )
        with pytest.raises(AssertionError, match="charged 1 units of any feature, expected 0"):
            usage_ledger.assert_not_charged(CUSTOMER)


# -- set-up: customers, credits, the clock ------------------------------------------------------


def test_customers_and_credits_are_set_up_in_one_call(make_usage_ledger: Any) -> None:
    """make_usage_ledger subscribes customers and grants credits; credits fund past the plan."""
    kit = make_usage_ledger(
        PRICING,
        customers={CUSTOMER: "plan:free@1"},
        credits={CUSTOMER: {FEATURE: 1}},
        flush_interval=SLOW_FLUSH,
    )
    with TestClient(make_app(kit.ledger), headers=HEADERS) as client:
        statuses = [client.post("/convert").status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 402]
        kit.assert_charged(CUSTOMER, FEATURE, 3)
        assert kit.grant(CUSTOMER, FEATURE, 2) == 2  # while open, on the app's loop
        assert client.post("/convert").status_code == 200
    kit.assert_charged(CUSTOMER, FEATURE, 4)


@KIT
def test_next_period_starts_a_fresh_allowance(usage_ledger: LedgerKit) -> None:
    """Moving the ledger clock to the next month serves a customer refused this month."""
    with TestClient(make_app(usage_ledger.ledger), headers=HEADERS) as client:
        assert [client.post("/convert").status_code for _ in range(3)] == [200, 200, 402]
        start = usage_ledger.next_period()
        assert (start.day, start.hour, start.minute) == (1, 0, 0)
        assert client.post("/convert").status_code == 200
        assert client.post("/convert").status_code == 200
        assert client.post("/convert").status_code == 402
    usage_ledger.assert_charged(CUSTOMER, FEATURE, 4)  # over both periods


def test_ledger_clock_moves_as_asked() -> None:
    """advance() adds seconds or timedeltas, next_period() goes to the next UTC boundary."""
    clock = LedgerClock(datetime(2026, 12, 31, 22, 30, tzinfo=UTC))
    assert clock.advance(90) == datetime(2026, 12, 31, 22, 31, 30, tzinfo=UTC)
    assert clock.advance(minutes=1, seconds=30) == datetime(2026, 12, 31, 22, 33, tzinfo=UTC)
    assert clock.next_period("@daily") == datetime(2027, 1, 1, tzinfo=UTC)
    assert clock.next_period("@weekly") == datetime(2027, 1, 4, tzinfo=UTC)  # a Monday
    assert clock.next_period() == datetime(2027, 2, 1, tzinfo=UTC)
    assert clock.set(datetime(2026, 1, 1, tzinfo=UTC)) == clock()
    with pytest.raises(ValueError, match="forward only"):
        clock.advance(timedelta(seconds=-1))
    with pytest.raises(ValueError, match="aware datetime"):
        clock.set(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="interval must be one of"):
        clock.next_period("@hourly")


def test_kit_next_period_follows_the_longest_plan_interval(
    make_usage_ledger: Any, ledger_clock: LedgerClock
) -> None:
    """kit.next_period() moves the shared clock by the plans' longest interval (monthly here)."""
    ledger_clock.set(datetime(2026, 3, 10, 12, tzinfo=UTC))
    kit = make_usage_ledger(PRICING)
    assert kit.clock is ledger_clock
    assert kit.next_period() == datetime(2026, 4, 1, tzinfo=UTC)
    assert kit.charges("org:nobody") == {}  # never opened, no customers: nothing charged


# -- the plugin ---------------------------------------------------------------------------------


def test_plugin_is_registered_by_entry_point_and_loads_nothing_heavy(
    pytestconfig: pytest.Config,
) -> None:
    """pytest11 names the plugin module; importing it imports neither the package nor httpx."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {
        "pytest_usage_middleware": "pytest_usage_middleware"
    }
    assert pytestconfig.pluginmanager.get_plugin("pytest_usage_middleware") is not None
    code = (
        "import sys, pytest_usage_middleware; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('usage_middleware', 'httpx', 'starlette', 'anyio')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


def test_readme_testing_example_is_the_test_file_that_runs() -> None:
    """The docs' "Testing your app" code block is tests/face/test_readme_testing.py, verbatim."""
    page = (ROOT / "docs" / "testing.md").read_text()
    section = page[page.index("# Testing your app") :]
    block = section[section.index("```python\n") + len("```python\n") :]
    block = block[: block.index("```\n")]
    source = (ROOT / "tests" / "face" / "test_readme_testing.py").read_text()
    assert block == source.split("\n", 2)[2].lstrip("\n")


def test_readme_testing_example_runs_as_copied_outside_the_repo(tmp_path: Path) -> None:
    """The docs' test file, copied to a directory without this repo's configuration
    (pytest-asyncio in strict mode, its default), runs both tests and passes."""
    copy = tmp_path / "test_readme_testing.py"
    copy.write_text((ROOT / "tests" / "face" / "test_readme_testing.py").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=strict",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            "--rootdir",
            str(tmp_path),
            str(copy),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout + result.stderr
