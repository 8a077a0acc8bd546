"""`outbox status` where there is no outbox: explained for the default path, an error otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from usage_middleware.cli import main


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and no $USAGE_OUTBOX."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("USAGE_OUTBOX", raising=False)
    return tmp_path


def test_status_without_the_default_outbox_explains_it(
    empty_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --outbox, no $USAGE_OUTBOX, no usage-outbox.db: exit 0 saying what uses an outbox."""
    assert main(["outbox", "status"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = " ".join(captured.out.split())
    assert out.startswith("No outbox here (usage-outbox.db does not exist).")
    for name in ("TierProvider", "SpaireProvider", "AresProvider", "outbox="):
        assert name in out
    assert "RedisLedger" in out and "--outbox usage-redis-spool.db" in out
    assert "LocalLedger writes charges straight to its own file and has no outbox" in out
    assert list(empty_cwd.iterdir()) == [], "nothing is created"


def test_status_json_without_the_default_outbox(
    empty_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --json the explanation is one object with "exists": false, exit 0."""
    assert main(["outbox", "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] == "usage-outbox.db"
    assert doc["exists"] is False
    assert "LocalLedger" in doc["about"]
    assert list(empty_cwd.iterdir()) == []


def test_a_named_outbox_that_is_missing_is_still_an_error(
    empty_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--outbox PATH or $USAGE_OUTBOX naming a missing file: one line naming it, exit 2."""
    assert main(["outbox", "status", "--outbox", "elsewhere.db"]) == 2
    assert capsys.readouterr().err == (
        "usage-middleware: error: no outbox at elsewhere.db: pass --outbox PATH "
        "(or set $USAGE_OUTBOX)\n"
    )
    monkeypatch.setenv("USAGE_OUTBOX", "from-env.db")
    assert main(["outbox", "status"]) == 2
    assert "no outbox at from-env.db" in capsys.readouterr().err
    assert list(empty_cwd.iterdir()) == []


def test_retry_without_the_default_outbox_is_still_an_error(
    empty_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """retry/purge have nothing to act on without an outbox: exit 2 naming the default path."""
    assert main(["outbox", "retry", "--all"]) == 2
    assert "no outbox at usage-outbox.db" in capsys.readouterr().err


def test_outbox_option_before_the_subcommand_as_the_docs_write_it(
    empty_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`outbox --outbox FILE status` (the docs' form) reads FILE, like `outbox status --outbox`."""
    from usage_middleware.outbox import Outbox

    Outbox(empty_cwd / "spool.db").close()
    assert main(["outbox", "--outbox", "spool.db", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == "spool.db"
    assert main(["outbox", "--outbox", "spool.db", "status", "--outbox", "other.db"]) == 2
    assert "no outbox at other.db" in capsys.readouterr().err
