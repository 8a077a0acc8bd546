"""A ledger file that cannot be opened fails start-up with an error naming the file and the fix."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from usage_middleware import LocalLedger, UsageMiddleware
from usage_middleware.customers import customer_from_header
from usage_middleware.errors import ConfigurationError


def _bad_paths(tmp_path: Path) -> list[tuple[Path, str]]:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello, this is not a SQLite file at all\n" * 4)
    return [
        (tmp_path / "missing" / "dir" / "usage.db", "does not exist; create it"),
        (tmp_path, "it is a directory"),
        (junk, "not a SQLite file"),
    ]


def test_open_names_the_file_and_the_fix(tmp_path: Path) -> None:
    """Opening a missing dir, a directory or a non-SQLite file: ConfigurationError naming it."""

    async def open_it(path: Path) -> None:
        async with LocalLedger(path):
            pass

    for path, fix in _bad_paths(tmp_path):
        with pytest.raises(ConfigurationError) as info:
            asyncio.run(open_it(path))
        message = str(info.value)
        assert str(path) in message and fix in message, message


def test_startup_failure_names_the_file(tmp_path: Path) -> None:
    """UsageMiddleware's lifespan answers startup.failed with a message naming the ledger file."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})

    for path, fix in _bad_paths(tmp_path):
        middleware = UsageMiddleware(
            app, provider=LocalLedger(path), customer=customer_from_header("x-customer")
        )
        sent: list[dict[str, Any]] = []
        out = sent.append

        async def receive() -> dict[str, Any]:
            return {"type": "lifespan.startup"}

        async def send(message: dict[str, Any], out: Any = out) -> None:
            out(message)

        # After startup.failed the middleware raises, so servers and TestClient stop.
        with pytest.raises(ConfigurationError, match="ledger file"):
            asyncio.run(middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
        assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
        assert str(path) in sent[0]["message"] and fix in sent[0]["message"], sent


def test_a_device_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A path that exists but is not a regular file (a FIFO, like /dev/null) is refused
    naming it, and no -journal/-wal file is created next to it."""
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    async def open_it() -> None:
        async with LocalLedger(fifo):
            pass

    with pytest.raises(ConfigurationError) as info:
        asyncio.run(asyncio.wait_for(open_it(), 10))
    assert str(fifo) in str(info.value) and "not a regular file" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
