"""The CLI and files it may not write: read commands open read-only; errors name the path.

Root ignores file modes, so the read-only cases run the CLI in a forked child that first
drops to the ``nobody`` user (everything it needs is imported before the fork); run as
any other user, they run in-process and the modes apply as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import usage_middleware.cli.outbox
import usage_middleware.ledger.local
import usage_middleware.ledger.store
import usage_middleware.pricing  # noqa: F401  (imported before the fork: see above)
from usage_middleware.cli import main
from usage_middleware.ledger.local import LocalLedger
from usage_middleware.models import UsageEvent
from usage_middleware.outbox import Outbox

ROOT = Path(__file__).resolve().parents[2]
PRICING = ROOT / "examples" / "pricing.json"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("USAGE_DB", "USAGE_PRICING", "USAGE_OUTBOX"):
        monkeypatch.delenv(name, raising=False)


def _as_other_user(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` as a user that file modes apply to: (exit status, stdout, stderr)."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        return code, out.getvalue(), err.getvalue()

    code, out, err = _run_as_other_user(run)
    return code, out, err


def _run_as_other_user(fn: Callable[[], Any]) -> Any:
    """``fn()`` (its result JSON-able) as ``nobody`` in a forked child when we are root."""
    if os.geteuid() != 0:
        return fn()
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            payload = json.dumps(fn()).encode()
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(payload)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A fresh directory every user can reach (pytest's tmp_path is root's only)."""
    folder = Path(tempfile.mkdtemp(prefix="um-cli-"))
    folder.chmod(0o755)
    yield folder
    for path in (folder, *folder.rglob("*")):
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(folder)


def _ledger(folder: Path) -> Path:
    """A ledger file with org:acme on the free plan, 2 convert units charged, closed."""
    db = folder / "usage.db"
    assert (
        main(["--db", str(db), "--pricing", str(PRICING), "subscribe", "org:acme", "plan:free@1"])
        == 0
    )

    async def charge() -> None:
        async with LocalLedger(db) as ledger:
            reservation = await ledger.reserve("org:acme", "feature:convert", 2)
            await ledger.commit(reservation)

    asyncio.run(charge())
    assert not Path(f"{db}-wal").exists()  # the last connection cleaned up
    return db


def _one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert (code, out) == (2, ""), (code, out, err)
    assert err.startswith("usage-middleware: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_show_and_plans_read_a_ledger_file_this_user_cannot_write(
    shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chmod 444 ledger: `show` (also with the same --pricing) and `plans` work; no write."""
    db = _ledger(shared_dir)
    capsys.readouterr()
    db.chmod(0o444)
    shared_dir.chmod(0o777)  # SQLite may create the -shm index a WAL reader needs
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    for argv in (["show", "org:acme"], ["--pricing", str(PRICING), "show", "org:acme"]):
        code, out, err = _as_other_user(["--db", str(db), *argv])
        assert (code, err) == (0, ""), err
        assert out.startswith(f"org:acme (ledger {db})\n")
        assert "feature:convert" in out and " 2 " in out
    code, out, err = _as_other_user(["--db", str(db), "plans"])
    assert (code, err) == (0, "") and "plan:free@1" in out
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before


def test_show_in_a_read_only_directory_says_why_and_what_to_do(shared_dir: Path) -> None:
    """A WAL ledger in a read-only directory: one line naming the file, the -shm and the fix."""
    db = _ledger(shared_dir)
    shared_dir.chmod(0o555)
    for argv in (["show", "org:acme"], ["plans"]):
        result = _as_other_user(["--db", str(db), *argv])
        _one_line_error(*result, f"cannot read the usage ledger file {db}", f"{db}-shm")
        assert "not a usage ledger" not in result[2]
    assert sorted(p.name for p in shared_dir.iterdir()) == ["usage.db"]


def test_show_in_a_read_only_directory_works_while_the_app_has_the_ledger_open(
    shared_dir: Path,
) -> None:
    """With the app's connection open (its -shm exists), `show` reads a read-only directory."""
    db = _ledger(shared_dir)
    app = sqlite3.connect(db, isolation_level=None)  # as the running app: WAL files exist
    try:
        app.execute("SELECT COUNT(*) FROM meta").fetchone()
        assert Path(f"{db}-shm").exists()
        shared_dir.chmod(0o555)
        code, out, err = _as_other_user(["--db", str(db), "show", "org:acme"])
        assert (code, err) == (0, ""), err
        assert "feature:convert" in out
    finally:
        shared_dir.chmod(0o755)
        app.close()


def test_write_commands_on_a_read_only_ledger_name_the_path(shared_dir: Path) -> None:
    """`grant`/`subscribe` on a chmod 444 ledger: one line naming the file and the fix."""
    db = _ledger(shared_dir)
    db.chmod(0o444)
    shared_dir.chmod(0o777)
    before = db.read_bytes()
    for argv in (
        ["grant", "org:acme", "feature:convert", "1"],
        ["subscribe", "org:b", "plan:free@1"],
    ):
        result = _as_other_user(["--db", str(db), *argv])
        _one_line_error(*result, f"cannot write to the usage ledger file {db}", "read-only")
    assert db.read_bytes() == before


def test_outbox_status_reads_an_outbox_this_user_cannot_write(shared_dir: Path) -> None:
    """`outbox status` reads a chmod 444 outbox; retry, or a read-only dir: why, naming it."""
    path = shared_dir / "usage-outbox.db"
    outbox = Outbox(path)
    outbox.apply(
        outbox.register(30), [(UsageEvent("org:acme", "feature:convert", 3), False, False)]
    )
    outbox.close()
    path.chmod(0o444)
    shared_dir.chmod(0o777)
    before = path.read_bytes()
    code, out, err = _as_other_user(["outbox", "status", "--outbox", str(path)])
    assert (code, err) == (0, ""), err
    assert "undelivered 1" in out
    result = _as_other_user(["outbox", "retry", "--all", "--outbox", str(path)])
    _one_line_error(*result, f"cannot write to the outbox file {path}")
    assert path.read_bytes() == before
    for extra in shared_dir.glob("usage-outbox.db-*"):  # the -shm the read made
        extra.unlink()
    shared_dir.chmod(0o555)
    result = _as_other_user(["outbox", "status", "--outbox", str(path)])
    _one_line_error(*result, f"cannot read the outbox file {path}", f"{path}-shm")


@pytest.mark.parametrize(
    "argv",
    [["show", "org:acme"], ["plans"], ["grant", "org:acme", "feature:convert", "1"]],
)
def test_db_that_is_empty_or_a_device_names_the_problem(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--db ""` says the option is empty; `--db /dev/null` says it is not a regular file."""
    assert main(["--db", "", *argv]) == 2
    _one_line_error(2, *capsys.readouterr(), "--db is empty: pass --db PATH")
    assert main(["--db", os.devnull, *argv]) == 2
    _one_line_error(
        2, *capsys.readouterr(), f"{os.devnull} is not a usage ledger", "not a regular file"
    )


def test_outbox_that_is_empty_or_a_device_names_the_problem(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--outbox ""` and `--outbox /dev/null`: one line naming the option or the path."""
    assert main(["outbox", "status", "--outbox", ""]) == 2
    _one_line_error(2, *capsys.readouterr(), "--outbox is empty")
    assert main(["outbox", "status", "--outbox", os.devnull]) == 2
    _one_line_error(2, *capsys.readouterr(), f"{os.devnull} is not an outbox file")


def test_show_into_a_closed_pipe_exits_quietly(shared_dir: Path) -> None:
    """`show ... | head -1`: no 'Broken pipe' message; exit 141 like coreutils under SIGPIPE."""
    db = _ledger(shared_dir)
    conn = sqlite3.connect(db)
    with conn:  # enough rows to fill the pipe (64 KiB) several times
        conn.executemany(
            "INSERT INTO credits (customer, feature, credited, consumed) VALUES (?, ?, 1, 0)",
            [("org:acme", f"feature:f{i:05}") for i in range(4000)],
        )
    conn.close()
    env = {k: v for k, v in os.environ.items() if k not in ("USAGE_DB", "USAGE_PRICING")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    child = subprocess.Popen(
        [sys.executable, "-m", "usage_middleware", "--db", str(db), "show", "org:acme"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.readline() == f"org:acme (ledger {db})\n".encode()
    child.stdout.close()  # what `head -1` does after its line
    try:
        code = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert (code, child.stderr.read()) == (141, b"")
    child.stderr.close()


def test_app_start_up_on_a_ledger_it_cannot_write_names_the_file_and_the_fix(
    shared_dir: Path,
) -> None:
    """LocalLedger.open on a ledger in a read-only directory: ConfigurationError naming both."""
    db = _ledger(shared_dir)
    shared_dir.chmod(0o555)

    def open_it() -> list[str]:
        async def go() -> None:
            async with LocalLedger(db):
                pass

        try:
            asyncio.run(go())
        except Exception as exc:  # the child reports what it got
            return [type(exc).__name__, str(exc)]
        return ["opened", ""]

    kind, message = _run_as_other_user(open_it)
    assert kind == "ConfigurationError", message
    assert str(db) in message and "write access" in message and str(shared_dir) in message
