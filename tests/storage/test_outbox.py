"""The outbox file: claims, leases, dead letters, and the ``outbox`` CLI commands."""

from __future__ import annotations

import argparse
import io
import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from usage_middleware import UsageEvent
from usage_middleware.cli.outbox import add_outbox_commands, main
from usage_middleware.outbox import Outbox, decode_at, encode_at


def _events(n: int) -> list[UsageEvent]:
    return [UsageEvent("org:acme", "feature:x", i + 1) for i in range(n)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


def test_at_round_trips_to_the_microsecond() -> None:
    """An event's time is stored as whole microseconds and reads back identical."""
    at = datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC)
    assert decode_at(encode_at(at)) == at


def test_file_is_wal_and_rows_read_back_exactly(path: Path) -> None:
    """Inserted events come back with the same key, units, time and clobber flag."""
    ob = Outbox(path)
    owner = ob.register(30)
    evs = [*_events(3), UsageEvent("org:b", "feature:y", 0, clobber=True)]
    first = ob.apply(owner, [(e, False, False) for e in evs])
    claimed = ob.claim(owner, 10)
    ob.close()
    assert [c.rowid for c in claimed] == [first, first + 1, first + 2, first + 3]
    assert [c.event for c in claimed] == evs
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_row_is_claimed_by_one_live_owner_only(path: Path) -> None:
    """Two owners claiming the same backlog split it: no row goes to both."""
    a, b = Outbox(path), Outbox(path)
    oa, ob_ = a.register(30), b.register(30)
    a.apply(oa, [(e, False, False) for e in _events(50)])
    got_a = a.claim(oa, 20)
    got_b = b.claim(ob_, 100)
    assert len(got_a) == 20 and len(got_b) == 30
    assert not {c.rowid for c in got_a} & {c.rowid for c in got_b}
    assert a.claim(oa, 100) == []
    a.close()
    b.close()


def test_owned_and_held_rows_are_not_claimable_while_the_owner_lives(path: Path) -> None:
    """Rows a live reporter holds (in memory or prepared) are invisible to other workers."""
    ob = Outbox(path)
    me, other = ob.register(30), ob.register(30)
    ob.apply(me, [(e, True, held) for e, held in zip(_events(2), (False, True), strict=True)])
    assert ob.claim(other, 10) == []
    assert ob.reap() == 0
    ob.close()


def test_rows_of_an_expired_owner_are_reaped_and_held_ones_delivered(path: Path) -> None:
    """A dead worker's claimed and prepared rows become claimable once its lease expired."""
    ob = Outbox(path)
    dead, live = ob.register(0.01), ob.register(30)
    evs = _events(2)
    ob.apply(dead, [(evs[0], True, False), (evs[1], True, True)])
    time.sleep(0.02)
    assert ob.reap() == 2
    assert ob.heartbeat(dead, 30, (0, 0, 0, 0)) is False  # too late: its rows were handed on
    assert [c.event for c in ob.claim(live, 10)] == evs
    ob.close()


def test_retire_frees_rows_at_once(path: Path) -> None:
    """A clean shutdown hands its undelivered rows over without waiting for the lease."""
    ob = Outbox(path)
    me, other = ob.register(30), ob.register(30)
    ob.apply(me, [(e, True, True) for e in _events(3)])
    assert ob.retire(me, (3, 0, 0, 0)) == 3
    assert len(ob.claim(other, 10)) == 3
    ob.close()


def test_deletes_only_touch_the_callers_rows(path: Path) -> None:
    """A stalled worker cannot delete a row another worker now owns."""
    ob = Outbox(path)
    me, other = ob.register(30), ob.register(30)
    first = ob.apply(other, [(_events(1)[0], True, False)])
    ob.apply(me, deletes=[first], frees=[first], releases=[(first, 0.0, "x")])
    assert ob.status().depth == 1
    ob.close()


def test_released_rows_wait_until_not_before(path: Path) -> None:
    """A batch released after failed retries is not claimable before its not_before."""
    ob = Outbox(path)
    me = ob.register(30)
    ob.apply(me, [(e, False, False) for e in _events(2)])
    rows = ob.claim(me, 10)
    ob.apply(me, releases=[(rows[0].rowid, time.time() + 3600, "503"), (rows[1].rowid, 0, "503")])
    again = ob.claim(me, 10)
    assert [c.rowid for c in again] == [rows[1].rowid]
    assert again[0].attempts == 1
    st = ob.status()
    assert (st.depth, st.waiting) == (2, 1)
    ob.close()


def _dead_letter(path: Path, n: int = 2) -> list[UsageEvent]:
    ob = Outbox(path)
    me = ob.register(30)
    evs = _events(n)
    first = ob.apply(me, [(e, True, False) for e in evs])
    ids = list(range(first, first + n))
    ob.apply(
        me,
        dead=[(i, 422, "validation_error", f"event {k} is invalid") for k, i in enumerate(ids)],
    )
    ob.retire(me, (n, 0, 0, n))
    ob.close()
    return evs


def test_dead_letters_keep_the_providers_answer_and_retry_keeps_the_key(path: Path) -> None:
    """A dead letter records status/code/message; retry puts it back with the same key."""
    evs = _dead_letter(path, 2)
    ob = Outbox(path)
    dead = ob.dead_letters()
    assert [(d.event, d.status, d.code) for d in dead] == [
        (e, 422, "validation_error") for e in evs
    ]
    assert dead[0].message == "event 0 is invalid"
    assert ob.retry_dead([dead[0].id]) == 1
    me = ob.register(30)
    back = ob.claim(me, 10)
    assert [b.event for b in back] == [evs[0]]
    assert ob.purge_dead(None) == 1
    assert ob.dead_letters() == []
    ob.close()


def _cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="usage-middleware")
    add_outbox_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out = io.StringIO()
    return args.func(args, out), out.getvalue()


def test_cli_status_shows_depth_counters_and_dead_letters(path: Path) -> None:
    """`outbox status` prints depth, totals and each dead letter with the provider's reason."""
    evs = _dead_letter(path, 2)
    ob = Outbox(path)
    ob.apply(ob.register(30), [(e, False, False) for e in _events(3)])
    ob.close()
    code, out = _cli("outbox", "status", "--outbox", str(path))
    assert code == 0
    assert "undelivered 3" in out
    assert "dead_lettered 2" in out and "dead letters 2" in out
    assert f"key={evs[1].idempotency_key} status=422 code=validation_error" in out
    code, out = _cli("outbox", "status", "--outbox", str(path), "--json")
    doc = json.loads(out)
    assert (doc["depth"], doc["dead_letters"], doc["totals"]["dead_lettered"]) == (3, 2, 2)
    assert doc["dead_letter_list"][0]["message"] == "event 0 is invalid"


def test_cli_retry_and_purge(path: Path) -> None:
    """`outbox retry ID` replays one dead letter; `outbox purge --all` drops the rest."""
    _dead_letter(path, 3)
    ob = Outbox(path)
    first = ob.dead_letters()[0].id
    ob.close()
    assert _cli("outbox", "retry", "--outbox", str(path), str(first)) == (
        0,
        "1 dead letters moved back to the outbox for delivery\n",
    )
    assert _cli("outbox", "purge", "--outbox", str(path), "--all")[0] == 0
    ob = Outbox(path)
    assert (ob.status().depth, ob.status().dead_letters) == (1, 0)
    ob.close()


def test_cli_refuses_ambiguous_or_missing_targets(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """retry/purge need ids or --all; a missing outbox file is the CLI's one-line exit 2."""
    with pytest.raises(SystemExit) as exc:
        _cli("outbox", "purge", "--outbox", str(path))
    assert exc.value.code == 2
    capsys.readouterr()
    for command in ("status", "retry --all", "purge --all"):
        assert main(["outbox", *command.split(), "--outbox", str(path)]) == 2
        assert capsys.readouterr().err == (
            f"usage-middleware: error: no outbox at {path}: pass --outbox PATH "
            "(or set $USAGE_OUTBOX)\n"
        )
    assert not path.exists()


def test_cli_refuses_files_that_are_not_outboxes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory, a text file or a ledger as --outbox: one line naming the path, exit 2."""
    from usage_middleware.cli import main as cli_main

    text = tmp_path / "README.md"
    text.write_text("# not a database\n" * 10)
    ledger = tmp_path / "usage.db"
    pricing = Path(__file__).resolve().parents[2] / "examples" / "pricing.json"
    argv = ["--db", str(ledger), "--pricing", str(pricing), "subscribe", "org:a", "plan:free@1"]
    assert cli_main(argv) == 0
    capsys.readouterr()
    ledger_before = ledger.read_bytes()
    for target, why in (
        (tmp_path, "it is a directory"),
        (text, "not a SQLite database"),
        (ledger, "a usage ledger"),
    ):
        assert cli_main(["outbox", "status", "--outbox", str(target)]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"usage-middleware: error: {target} is not an outbox file ({why}); pass --outbox PATH\n"
        )
    assert ledger.read_bytes() == ledger_before
