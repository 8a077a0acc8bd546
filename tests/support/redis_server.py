"""A real ``redis-server`` for tests: started on a free 127.0.0.1 port in a temporary dir.

* :class:`RedisServer` starts the binary (``--save "" --appendonly no`` unless asked for
  persistence), waits until it answers ``PING`` (bounded), and stops it; it can be stopped
  and started again on the same port and directory (a restart that keeps its data when
  ``appendonly`` is on).
* :func:`redis_binary` finds the binary, or skips the test with a visible reason; when the
  environment variable ``CI`` is set a missing binary FAILS instead (``.ci/run`` installs it).
* :func:`shared_server` is one server per test process (stopped at exit), for the ledger
  contract suite's factory; tests isolate themselves with a unique key prefix.
* The ``redis_server`` fixture gives a fresh server per test.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "free_port", "redis_binary", "redis_server", "shared_server"]

_START_TIMEOUT = 10.0  # seconds to wait for PING after starting
_STOP_TIMEOUT = 10.0  # seconds to wait for the process to exit


def redis_binary() -> str:
    """The path of ``redis-server``; skip (or, under CI, fail) the test when it is absent."""
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if path is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the Redis tests", pytrace=False)
        pytest.skip(reason)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis on 127.0.0.1:``port`` answers ``PING`` with ``+PONG``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 (see the module docstring).

    Args:
        directory: its working directory (AOF files, log).
        appendonly: persist every write to an AOF (for restart tests).
        appendfsync: ``always`` (no acknowledged write lost on a crash) or ``everysec``.
    """

    def __init__(
        self, directory: Path, *, appendonly: bool = False, appendfsync: str = "always"
    ) -> None:
        self.binary = redis_binary()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (on the port used before, if any) and wait until it answers PING."""
        if self.process is not None:
            raise RuntimeError("redis-server already running")
        for attempt in range(3):
            port = self.port or free_port()
            args = [
                self.binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync,
                "--daemonize", "no",
                "--logfile", "redis.log",
            ]  # fmt: skip
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline and process.poll() is None:
                if ping(port):
                    self.process, self.port = process, port
                    return
                time.sleep(0.02)
            process.kill()
            process.wait(_STOP_TIMEOUT)
            time.sleep(0.2 * (attempt + 1))  # e.g. the port is still in TIME_WAIT
        log = self.directory / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port or port}:\n{tail}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill``); a no-op when stopped."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT)

    def restart(self, *, kill: bool = False) -> None:
        """Stop and start again on the same port and directory."""
        self.stop(kill=kill)
        self.start()


_shared: RedisServer | None = None


def shared_server() -> RedisServer:
    """One server for this test process, started on first use, stopped at exit."""
    global _shared
    if _shared is None:
        server = RedisServer(Path(tempfile.mkdtemp(prefix="usage-middleware-redis-")))
        server.start()
        _shared = server
        atexit.register(_stop_shared, server)
    return _shared


def _stop_shared(server: RedisServer) -> None:
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server (no persistence) for one test, stopped afterwards."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
