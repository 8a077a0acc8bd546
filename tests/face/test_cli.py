"""The ``usage-middleware`` command: happy paths and every bad-input path (exit 2, one line)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from usage_middleware.cli import main
from usage_middleware.ledger.local import LocalLedger

ROOT = Path(__file__).resolve().parents[2]
PRICING = ROOT / "examples" / "pricing.json"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USAGE_DB", raising=False)
    monkeypatch.delenv("USAGE_PRICING", raising=False)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "usage.db"


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    assert err.startswith("usage-middleware: error: ")
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def charge(db: Path, customer: str, feature: str, units: int) -> None:
    """Charge units through the ledger's reserve/commit cycle, as the middleware does."""

    async def go() -> None:
        async with LocalLedger(db) as ledger:
            reservation = await ledger.reserve(customer, feature, units)
            assert reservation.answer.ok
            await ledger.commit(reservation)

    asyncio.run(go())


def table_row(out: str, feature: str) -> list[str]:
    """The cells of the table line for ``feature`` (split on runs of 2+ spaces)."""
    for line in out.splitlines():
        if line.startswith(feature + " "):
            return re.split(r"\s{2,}", line.strip())
    raise AssertionError(f"no row for {feature} in:\n{out}")


# -- happy paths -----------------------------------------------------------------------


def test_plans_lists_every_plan_feature_limit_and_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`plans` prints each plan's features with their limits (∞ for unlimited) and interval."""
    code, out, err = run(capsys, "--pricing", PRICING, "plans")
    assert (code, err) == (0, "")
    assert "plan:free@1" in out and "plan:pro@1" in out
    assert "@monthly" in out
    lines = out.splitlines()
    free = next(i for i, line in enumerate(lines) if line.startswith("plan:free@1"))
    pro = next(i for i, line in enumerate(lines) if line.startswith("plan:pro@1"))
    assert lines[free].split()[-2:] == ["feature:convert", "5"]
    assert lines[free + 1].split() == ["feature:pages", "20"]
    pro_rows = {line.split()[-2]: line.split()[-1] for line in lines[pro:]}
    assert pro_rows == {
        "feature:convert": "∞",
        "feature:generate": "100",
        "feature:pages": "10000",
        "feature:tokens": "1000000",
    }


def test_subscribe_then_show_prints_the_plan_limits(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`subscribe` puts the customer on the plan; `show` prints limit, used 0, remaining."""
    code, out, err = run(
        capsys, "--db", db, "--pricing", PRICING, "subscribe", "org:acme", "plan:free@1"
    )
    assert (code, err) == (0, "")
    assert "org:acme is on plan:free@1" in out

    code, out, err = run(capsys, "--db", db, "show", "org:acme")
    assert (code, err) == (0, "")
    header = out.splitlines()[1].split()
    assert header == ["FEATURE", "PLAN", "LIMIT", "USED", "CREDITS", "REMAINING", "PERIOD", "(UTC)"]
    assert table_row(out, "feature:convert")[:6] == [
        "feature:convert", "plan:free@1", "5", "0", "0", "5",
    ]  # fmt: skip
    assert table_row(out, "feature:pages")[:6] == [
        "feature:pages", "plan:free@1", "20", "0", "0", "20",
    ]  # fmt: skip
    assert " to " in table_row(out, "feature:convert")[6]


def test_show_reflects_charges_and_grants(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Units charged through the ledger and credits granted by the CLI show up in `show`."""
    run(capsys, "--db", db, "--pricing", PRICING, "subscribe", "org:acme", "plan:free@1")
    charge(db, "org:acme", "feature:convert", 2)

    code, out, err = run(capsys, "--db", db, "grant", "org:acme", "feature:convert", "10")
    assert (code, err) == (0, "")
    assert "granted 10 units of feature:convert to org:acme; credit balance 10" in out

    code, out, _ = run(capsys, "--db", db, "show", "org:acme")
    assert code == 0
    assert table_row(out, "feature:convert")[:6] == [
        "feature:convert", "plan:free@1", "5", "2", "10", "13",
    ]  # fmt: skip


def test_grant_on_a_feature_outside_the_plan_shows_a_credit_only_row(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Credits for a feature the plan lacks appear as a credit-only row (no plan, limit 0)."""
    run(capsys, "--db", db, "--pricing", PRICING, "subscribe", "org:acme", "plan:free@1")
    code, out, _ = run(capsys, "--db", db, "grant", "org:acme", "feature:generate", "7")
    assert code == 0 and "credit balance 7" in out
    code, out, _ = run(capsys, "--db", db, "show", "org:acme")
    assert code == 0
    row = table_row(out, "feature:generate")
    assert row[0] == "feature:generate"
    assert row[1] == "- (credits only)"
    assert row[2:6] == ["0", "0", "7", "7"]


def test_show_prints_infinity_for_an_unlimited_feature(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A feature without `upto` shows ∞ as its limit and remaining."""
    run(capsys, "--db", db, "--pricing", PRICING, "subscribe", "org:big", "plan:pro@1")
    code, out, _ = run(capsys, "--db", db, "show", "org:big")
    assert code == 0
    assert table_row(out, "feature:convert")[2:6] == ["∞", "0", "0", "∞"]


def test_plans_reads_the_pricing_stored_in_the_ledger(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the first command with --pricing, `plans` works from the ledger file alone."""
    run(capsys, "--db", db, "--pricing", PRICING, "subscribe", "org:acme", "plan:free@1")
    code, out, err = run(capsys, "--db", db, "plans")
    assert (code, err) == (0, "")
    assert "plan:free@1" in out and "plan:pro@1" in out


def test_db_and_pricing_default_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """USAGE_DB and USAGE_PRICING stand in for --db and --pricing."""
    monkeypatch.setenv("USAGE_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("USAGE_PRICING", str(PRICING))
    code, _, err = run(capsys, "subscribe", "org:acme", "plan:pro@1")
    assert (code, err) == (0, "")
    assert (tmp_path / "env.db").exists()
    code, out, _ = run(capsys, "show", "org:acme")
    assert code == 0 and "plan:pro@1" in out


def test_python_dash_m_and_console_script_run_the_cli(db: Path) -> None:
    """`python -m usage_middleware` and the `usage-middleware` script both work end to end."""
    env = {k: v for k, v in os.environ.items() if k not in ("USAGE_DB", "USAGE_PRICING")}
    result = subprocess.run(
        [sys.executable, "-m", "usage_middleware", "--db", str(db), "--pricing", str(PRICING),
         "subscribe", "org:acme", "plan:free@1"],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "org:acme is on plan:free@1" in result.stdout
    script = shutil.which("usage-middleware")
    assert script is not None, "pip install -e '.[dev]' installs the usage-middleware script"
    result = subprocess.run(
        [script, "--db", str(db), "show", "org:acme"],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "feature:convert" in result.stdout


# -- bad input: one line on stderr, exit 2 ---------------------------------------------


@pytest.fixture
def ledger_db(db: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A ledger with org:acme on the free plan."""
    code, _, _ = run(
        capsys, "--db", db, "--pricing", PRICING, "subscribe", "org:acme", "plan:free@1"
    )
    assert code == 0
    return db


def test_unknown_plan_is_an_error(ledger_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Subscribing to a plan missing from the pricing exits 2 naming the plan."""
    result = run(capsys, "--db", ledger_db, "subscribe", "org:acme", "plan:gold@1")
    assert_one_line_error(*result, "plan:gold@1")


def test_unknown_customer_is_an_error(ledger_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`show` for a customer with no subscription and no credits exits 2 naming the customer."""
    result = run(capsys, "--db", ledger_db, "show", "org:ghost")
    assert_one_line_error(*result)
    assert "unknown customer" in result[2] or "org:ghost" in result[2]


@pytest.mark.parametrize(
    "units", ["abc", "1.5", "0", "-3", "", "1e3", " 5", "5 ", "+5", "1_000", "\u0663", "00"]
)
def test_units_must_be_a_positive_whole_number(
    ledger_db: Path, units: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`grant` refuses units that are not a whole number > 0, and grants nothing."""
    result = run(capsys, "--db", ledger_db, "grant", "org:acme", "feature:convert", units)
    assert_one_line_error(*result, "units must be a whole number > 0")
    code, out, _ = run(capsys, "--db", ledger_db, "show", "org:acme")
    assert code == 0 and table_row(out, "feature:convert")[4] == "0"


@pytest.mark.parametrize("units", ["1000000000000001", "99999999999999999999999", "9" * 5000])
def test_units_above_10_15_are_an_error(
    ledger_db: Path, units: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`grant` refuses more than 10**15 units in one line (no traceback), and grants nothing."""
    result = run(capsys, "--db", ledger_db, "grant", "org:acme", "feature:convert", units)
    assert_one_line_error(*result, "units must be at most 1000000000000000")
    code, out, _ = run(capsys, "--db", ledger_db, "show", "org:acme")
    assert code == 0 and table_row(out, "feature:convert")[4] == "0"


def test_grant_takes_10_15_units_and_leading_zeros(
    ledger_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`grant` accepts exactly 10**15 units, and ASCII digits with leading zeros."""
    code, _, _ = run(capsys, "--db", ledger_db, "grant", "org:acme", "feature:convert", "0007")
    assert code == 0
    code, out, _ = run(
        capsys, "--db", ledger_db, "grant", "org:acme", "feature:convert", "1000000000000000"
    )
    assert code == 0 and "credit balance 1000000000000007" in out


@pytest.mark.parametrize("command", [["plans"], ["subscribe", "org:acme", "plan:free@1"]])
def test_missing_pricing_file_is_an_error(
    db: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A --pricing path that does not exist exits 2 naming the file, and creates no ledger."""
    result = run(capsys, "--db", db, "--pricing", db.parent / "nope.json", *command)
    assert_one_line_error(*result, "nope.json")
    assert not db.exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", ""),
        (json.dumps({"plans": {"plan:x@1": {"interval": "@hourly"}}}), "plan:x@1"),
        (json.dumps({"plans": {"plan:x@1": {"features": {"feature_bad": {}}}}}), "feature_bad"),
        (json.dumps({"plans": {"nope": {}}}), "nope"),
    ],
)
def test_invalid_pricing_file_is_an_error(
    db: Path, content: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pricing file that does not validate exits 2 with the validator's reason."""
    bad = db.parent / "bad.json"
    bad.write_text(content)
    assert_one_line_error(*run(capsys, "--pricing", bad, "plans"), needle)
    result = run(capsys, "--db", db, "--pricing", bad, "subscribe", "org:acme", "plan:x@1")
    assert_one_line_error(*result, needle)


@pytest.mark.parametrize("customer", ["org acme", "", "a" * 256, "org:\tx"])
@pytest.mark.parametrize("command", ["subscribe", "grant", "show"])
def test_bad_customer_id_is_an_error(
    ledger_db: Path, customer: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed customer id exits 2 before the ledger is touched."""
    extra = {"subscribe": ["plan:free@1"], "grant": ["feature:convert", "1"], "show": []}
    result = run(capsys, "--db", ledger_db, command, customer, *extra[command])
    assert_one_line_error(*result, "customer id")


@pytest.mark.parametrize("feature", ["feature_x", "feature:bad-name", "convert", "feature:"])
def test_bad_feature_name_is_an_error(
    ledger_db: Path, feature: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`grant` with a name outside feature:[a-zA-Z0-9:]+ exits 2 naming the rule."""
    result = run(capsys, "--db", ledger_db, "grant", "org:acme", feature, "5")
    assert_one_line_error(*result, "feature:[a-zA-Z0-9:]+")


def test_show_without_a_ledger_file_is_an_error(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`show` on a ledger file that does not exist exits 2 and does not create it."""
    assert_one_line_error(*run(capsys, "--db", db, "show", "org:acme"), "no ledger at")
    assert not db.exists()


def test_plans_without_any_pricing_is_an_error(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plans` with neither --pricing nor a ledger file exits 2 naming the fix."""
    assert_one_line_error(*run(capsys, "--db", db, "plans"), "--pricing")


def test_a_file_that_is_not_a_ledger_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --db file that is not a SQLite database exits 2 with one line."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, just some bytes" * 100)
    assert_one_line_error(*run(capsys, "--db", junk, "show", "org:acme"))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "choose a command"),
        (["frobnicate"], "invalid choice"),
        (["grant", "org:acme"], "required"),
        (["show", "org:acme", "extra"], "unrecognized arguments"),
        (["--nope", "plans"], "unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse's own errors follow the same one-line, exit-2 rule."""
    assert_one_line_error(*run(capsys, *argv), needle)


def test_errors_from_a_subprocess_have_no_traceback(ledger_db: Path) -> None:
    """Through `python -m usage_middleware`, bad input gives exit 2 and one stderr line."""
    for argv in (
        ["grant", "org:acme", "feature:convert", "many"],
        ["subscribe", "org:acme", "plan:gold@1"],
        ["show", "org:nobody"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "usage_middleware", "--db", str(ledger_db), *argv],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert result.returncode == 2, (argv, result.stderr)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("usage-middleware: error: ")


def test_outbox_commands_are_wired_in_when_the_module_exists(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `usage_middleware.cli.outbox.add_outbox_commands` hook adds commands the CLI runs."""
    import importlib.machinery
    import types

    module = types.ModuleType("usage_middleware.cli.outbox")
    module.__spec__ = importlib.machinery.ModuleSpec("usage_middleware.cli.outbox", None)

    async def status(args: object) -> int:
        print(f"outbox status for {getattr(args, 'db', None)}")
        return 0

    def fail(args: object) -> int:
        raise ValueError("nothing to retry")

    def add_outbox_commands(subparsers: Any) -> None:
        outbox = subparsers.add_parser("outbox", help="the delivery outbox")
        commands = outbox.add_subparsers(dest="outbox_command", required=True)
        commands.add_parser("status").set_defaults(func=status)
        commands.add_parser("retry").set_defaults(func=fail)

    module.add_outbox_commands = add_outbox_commands  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "usage_middleware.cli.outbox", module)

    code, out, err = run(capsys, "--db", "x.db", "outbox", "status")
    assert (code, out, err) == (0, "outbox status for x.db\n", "")
    assert_one_line_error(*run(capsys, "outbox", "retry"), "nothing to retry")
    assert_one_line_error(*run(capsys, "outbox", "nope"), "invalid choice")


def test_a_pricing_that_drops_a_subscribed_plan_is_refused(
    ledger_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--pricing without a plan customers are on exits 2 naming plan and count; nothing changes."""
    other = ledger_db.parent / "other.json"
    other.write_text(json.dumps({"plans": {"plan:other@1": {"features": {}}}}))
    result = run(capsys, "--db", ledger_db, "--pricing", other, "show", "org:acme")
    assert_one_line_error(*result, "plan:free@1 (1 customer)", "usage-middleware subscribe")
    code, out, _ = run(capsys, "--db", ledger_db, "plans")
    assert code == 0 and "plan:free@1" in out and "plan:other@1" not in out


def test_help_says_the_ledger_keeps_the_last_pricing(capsys: pytest.CaptureFixture[str]) -> None:
    """--help says the stored pricing is the one last given, not the first."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "pricing it was last given" in out and "first given" not in out


def test_subscribe_on_a_fresh_file_without_pricing_names_the_flag(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`subscribe` with no ledger and no pricing says --pricing FILE and creates no file."""
    result = run(capsys, "--db", db, "subscribe", "org:acme", "plan:free@1")
    assert_one_line_error(*result, "--pricing FILE")
    assert "LocalLedger" not in result[2]
    assert not db.exists()


def test_subscribe_on_a_ledger_without_pricing_names_the_flag(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`subscribe` on a ledger file that never got a pricing says --pricing FILE."""
    assert run(capsys, "--db", db, "grant", "org:acme", "feature:convert", "1")[0] == 0
    result = run(capsys, "--db", db, "subscribe", "org:acme", "plan:free@1")
    assert_one_line_error(*result, "has no pricing: pass --pricing FILE")


def test_a_directory_as_pricing_is_an_error(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--pricing naming a directory says so (exit 2), for plans and for ledger commands."""
    folder = db.parent / "pricing.d"
    folder.mkdir()
    assert_one_line_error(*run(capsys, "--pricing", folder, "plans"), "is a directory")
    result = run(capsys, "--db", db, "--pricing", folder, "subscribe", "org:acme", "plan:free@1")
    assert_one_line_error(*result, "is a directory")
    assert not db.exists()


@pytest.mark.parametrize(
    "command", [["plans"], ["show", "org:acme"], ["grant", "org:a", "feature:x", "1"]]
)
def test_a_db_that_is_not_a_ledger_names_the_path(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--db naming a directory, a text file or an outbox: '<path> is not a usage ledger'."""
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    outbox = tmp_path / "usage-outbox.db"
    from usage_middleware.outbox import Outbox

    Outbox(outbox).close()
    before = outbox.read_bytes()
    for target in (tmp_path, text, outbox):
        result = run(capsys, "--db", target, *command)
        assert_one_line_error(*result, f"{target} is not a usage ledger (SQLite) file")
    assert outbox.read_bytes() == before


def test_choose_a_command_lists_outbox(capsys: pytest.CaptureFixture[str]) -> None:
    """With no command the error lists every command, outbox included."""
    result = run(capsys)
    assert_one_line_error(*result, "choose a command: plans, subscribe, grant, show, demo, outbox")


def test_db_and_pricing_may_follow_the_command(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`subscribe ... --db X --pricing P` and `show ... --db X` work like the options before."""
    argv = ["subscribe", "org:acme", "plan:free@1", "--db", db, "--pricing", PRICING]
    assert run(capsys, *argv)[:2] == (0, "org:acme is on plan:free@1\n")
    code, out, _ = run(capsys, "show", "org:acme", "--db", db)
    assert code == 0 and f"(ledger {db})" in out
    code, out, _ = run(capsys, "--db", db, "show", "org:acme")
    assert code == 0 and f"(ledger {db})" in out
    assert run(capsys, "plans", "--pricing", PRICING)[0] == 0


@pytest.mark.parametrize("command", ["show", "grant", "subscribe"])
def test_long_customer_ids_are_clipped_in_errors(
    ledger_db: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A customer id longer than 60 characters shows as its first 60 plus '…' in the error."""
    customer = "org:" + "x" * 200 + ("" if command == "show" else "\t")  # unknown / malformed
    extra = {"subscribe": ["plan:gold@1"], "grant": ["feature:convert", "1"], "show": []}
    result = run(capsys, "--db", ledger_db, command, customer, *extra[command])
    assert_one_line_error(*result, "'" + "org:" + "x" * 56 + "…'")
    assert "x" * 57 not in result[2]


def test_grant_of_a_feature_in_no_plan_prints_a_note(
    ledger_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`grant` of a feature no plan has succeeds with a note on stderr (a likely typo)."""
    code, out, err = run(capsys, "--db", ledger_db, "grant", "org:acme", "feature:convrt", "5")
    assert code == 0 and "credit balance 5" in out
    assert err.startswith("usage-middleware: note: feature:convrt is in no plan")
    code, _, err = run(capsys, "--db", ledger_db, "grant", "org:acme", "feature:convert", "5")
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    "argv",
    [
        ("outbox", "status", "--limit", "99999999999999999999999"),
        ("outbox", "retry", "99999999999999999999999"),
        ("outbox", "purge", "-1"),
    ],
)
def test_outbox_numbers_beyond_sqlite_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: tuple[str, ...]
) -> None:
    """Dead-letter ids and --limit beyond 2**63-1 (or negative) exit 2 with one line."""
    code, _, err = run(capsys, *argv, "--outbox", tmp_path / "outbox.db")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("usage-middleware: error:")
    assert "Traceback" not in err


def test_plans_prints_a_dash_for_a_plan_without_title(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`plans` shows "-" in TITLE for a plan with no title, not the plan id again."""
    pricing = tmp_path / "pricing.json"
    pricing.write_text(
        json.dumps(
            {
                "plans": {
                    "plan:bare@1": {"features": {"feature:x": {"tiers": [{"upto": 3}]}}},
                    "plan:named@1": {"title": "Named", "features": {"feature:y": {}}},
                }
            }
        )
    )
    code, out, err = run(capsys, "--pricing", pricing, "plans")
    assert (code, err) == (0, ""), err
    bare = next(line for line in out.splitlines() if line.startswith("plan:bare@1"))
    named = next(line for line in out.splitlines() if line.startswith("plan:named@1"))
    assert re.split(r"\s{2,}", bare.strip())[1] == "-"
    assert re.split(r"\s{2,}", named.strip())[1] == "Named"
