"""Over the wire: each app of ``bench/wire_apps.py`` under real uvicorn, driven by wrk.

Every app serves the same ``GET /item`` from its own uvicorn process (1 worker, ``--http
h11`` by default, loopback, a free port):

* bare Starlette (the baseline), a pass-through ASGI middleware (the floor), slowapi
  (memory storage), ``UsageMiddleware`` + ``@metered`` on a provider that does nothing
  (the edge's own cost: the floor of every metered app);
* ``UsageMiddleware`` + ``@metered`` on a ``LocalLedger``, on a ``RedisLedger`` (against
  a ``redis-server`` started here on a free loopback port), and on a ``TierProvider`` with
  its durable outbox (against the Tier fake of ``tests/support/tier_fake.py`` served by uvicorn
  in its own process).

wrk (``-t1``, at 16 and then 64 connections) loads one app at a time, in interleaved
rounds (the order rotates each round, so drift on a noisy machine hits every app alike).
Reported per app and connection count: the median requests/s, the median of each round's
ratio to bare's requests/s in the same round (with its range), p50 and p99 latency
(medians over rounds, exact percentiles from wrk's Lua ``done`` hook), the median
per-round ratio of p99 to bare's p99, and the server process's CPU time per request (from
``/proc``; with bare's divided by it: the ratio a server with a core of its own would
approach, less sensitive to other load on a shared machine).

After every wrk run against a metered app it checks the units charged (the ledger's
``usage()``, or the Tier fake's recorded usage once the outbox has delivered) against
wrk's count of 2xx responses: equal, except that wrk abandons the requests still in
flight when its time is up (at most one per connection), which the server may have
served and charged. So ``0 <= charged - 2xx <= connections``, and no non-2xx responses.
It exits non-zero when a check fails.

Run from the repository root (wrk: ``apt-get install wrk``)::

    python3 bench/bench_wire.py            # 3 rounds of 2 s per app and connection count (~3 min)
    python3 bench/bench_wire.py --quick    # 2 rounds of 1 s: a smoke test, under a minute
    python3 bench/bench_wire.py --http both --apps bare,local

Every process it starts (uvicorn servers, redis-server, wrk) runs in its own session and
is stopped on exit, on an error and on Ctrl-C. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from wire_apps import APPS, CUSTOMER  # noqa: E402

LABELS = {
    "bare": "bare Starlette, one JSON route",
    "passthrough": "pass-through ASGI middleware",
    "null": "metered, a provider that does nothing (the edge alone)",
    "local": "metered, LocalLedger",
    "slowapi": "slowapi (memory storage)",
    "redis": "metered, RedisLedger",
    "tier": "metered, TierProvider + durable outbox",
}
START_TIMEOUT = 60.0  # seconds for a server to answer (a busy machine imports slowly)
STOP_TIMEOUT = 10.0  # seconds for a server to shut down (drain) before it is killed
SETTLE_QUIET = 0.3  # seconds the charged count must stay put to count as settled
SETTLE_TIMEOUT = 60.0  # seconds to wait for charges to land (Tier: outbox delivery)

# wrk's Lua hook: one JSON line with the totals and exact latency percentiles (µs).
WRK_SCRIPT = """
wrk.headers["x-customer"] = "@CUSTOMER@"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WIRE {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50": %.0f, "p90": %.0f, "p99": %.0f, '
    .. '"max": %.0f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
""".replace("@CUSTOMER@", CUSTOMER)


# -- processes -------------------------------------------------------------------------


class Processes:
    """Every child process started here, each in its own session; all stopped at the end."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
        self.stop_all([process], timeout)

    def stop_all(
        self, processes: list[subprocess.Popen[bytes]] | None = None, timeout: float = STOP_TIMEOUT
    ) -> None:
        """SIGTERM (graceful: uvicorn runs the lifespan shutdown), then SIGKILL at the deadline."""
        targets = list(self.running if processes is None else processes)
        for process in targets:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in targets:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
            if process in self.running:
                self.running.remove(process)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"x-customer": CUSTOMER})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@dataclass
class Server:
    """One uvicorn process serving one app of wire_apps."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, deadline: float) -> None:
        """Until the server answers any HTTP status (an unmetered path: nothing charged)."""
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{tail(self.log)}")
            try:
                get(self.port, "/_bench/ready", timeout=1.0)
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} server did not answer:\n{tail(self.log)}")
            time.sleep(0.05)

    def json(self, path: str) -> Any:
        status, body = get(self.port, path)
        if status != 200:
            raise RuntimeError(f"{self.name} {path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def count(self, path: str, key: str) -> int:
        return int(self.json(path)[key])


def start_server(
    procs: Processes, name: str, env: dict[str, str], http: str, loop: str, directory: Path
) -> Server:
    port = free_port()
    log = directory / f"{name}-{http}.log"
    args = [
        sys.executable, "-m", "uvicorn", "wire_apps:create", "--factory",
        "--app-dir", str(BENCH), "--host", "127.0.0.1", "--port", str(port),
        "--http", http, "--loop", loop, "--lifespan", "on",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    child_env = {
        **os.environ,
        **env,
        "WIRE_APP": name,
        "WIRE_DIR": str(directory),
        # The worktree's package first, whatever the installed one points at.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with log.open("wb") as out:
        process = procs.start(args, env=child_env, stdout=out, stderr=subprocess.STDOUT)
    return Server(name, port, process, log)


def start_redis(procs: Processes, directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server")
    for _ in range(3):
        port = free_port()
        args = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--logfile", str(directory / "redis.log"),
        ]  # fmt: skip
        process = procs.start(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return process, f"redis://127.0.0.1:{port}/0"
            time.sleep(0.05)
        procs.stop(process)  # e.g. the port was taken meanwhile: try another
    raise RuntimeError(f"redis-server did not start:\n{tail(directory / 'redis.log')}")


# -- wrk -------------------------------------------------------------------------------


@dataclass
class Run:
    """One wrk run's totals (latencies in µs)."""

    requests: int
    duration_us: int
    connect: int
    read: int
    write: int
    status: int  # responses with status > 399 (wrk's "Non-2xx or 3xx")
    timeout: int
    p50: float
    p90: float
    p99: float
    max: float
    #: the server process's CPU time (user + system) per request during the run, in µs
    server_cpu_us: float | None = None

    @property
    def rate(self) -> float:
        return self.requests / (self.duration_us / 1e6)

    @property
    def ok(self) -> int:
        """2xx responses: the apps never redirect, so everything else is wrk's ``status``."""
        return self.requests - self.status

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process ``pid`` used so far, from /proc (None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_wrk(procs: Processes, script: Path, port: int, conns: int, seconds: int) -> Run:
    args = [
        "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s",
        "-s", str(script), f"http://127.0.0.1:{port}/item",
    ]  # fmt: skip
    process = procs.start(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = process.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not finish: {' '.join(args)}") from None
    finally:
        procs.stop(process, timeout=1.0)
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("WIRE "):
            return Run(**json.loads(line[len("WIRE ") :]))
    raise RuntimeError(f"wrk failed (exit {process.returncode}):\n{text}")


# -- charges ---------------------------------------------------------------------------


@dataclass
class Meter:
    """How to read one metered app's units charged, and what it read so far."""

    read: Callable[[], int]
    last: int = 0
    checks: list[Check] = field(default_factory=list)


@dataclass
class Check:
    conns: int
    ok: int
    non_2xx: int
    socket_errors: int
    charged: int
    settle: float  # seconds after wrk ended until the count stopped moving
    settled: bool  # False: still moving at SETTLE_TIMEOUT

    @property
    def excess(self) -> int:
        return self.charged - self.ok

    @property
    def passed(self) -> bool:
        return self.settled and self.non_2xx == 0 and 0 <= self.excess <= self.conns


def settle(read: Callable[[], int], at_least: int) -> tuple[int, float, bool]:
    """The count once it reached ``at_least`` and stayed put for SETTLE_QUIET s, the seconds
    until its last change, and whether it settled before SETTLE_TIMEOUT."""
    start = time.monotonic()
    last, since = read(), start
    while True:
        now = time.monotonic()
        if last >= at_least and now - since >= SETTLE_QUIET:
            return last, since - start, True
        if now - start > SETTLE_TIMEOUT:
            return last, now - start, False
        time.sleep(0.05)
        value = read()
        if value != last:
            last, since = value, time.monotonic()


def check_charges(meter: Meter, run: Run, conns: int) -> Check:
    total, waited, settled = settle(meter.read, meter.last + run.ok)
    check = Check(conns, run.ok, run.status, run.socket_errors, total - meter.last, waited, settled)
    meter.last = total
    meter.checks.append(check)
    return check


# -- the benchmark ---------------------------------------------------------------------


@dataclass
class Results:
    runs: dict[tuple[str, int], list[Run]] = field(default_factory=dict)
    #: seconds after each run until the app's charges had all landed (metered apps)
    lags: dict[tuple[str, int], list[float]] = field(default_factory=dict)

    def add(self, name: str, conns: int, run: Run, check: Check | None) -> None:
        self.runs.setdefault((name, conns), []).append(run)
        if check is not None:
            self.lags.setdefault((name, conns), []).append(check.settle)


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+uncommitted changes" if dirty else "")


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    return " ".join(out.split()[:2]) if out else "wrk"


def bench(args: argparse.Namespace, procs: Processes, http: str, tmp: Path) -> tuple[str, bool]:
    """One full measurement with ``--http http``: the report's text, and whether it passed."""
    directory = tmp / http
    directory.mkdir()
    script = directory / "report.lua"
    script.write_text(WRK_SCRIPT)
    apps: list[str] = list(args.apps)
    notes: list[str] = []
    env: dict[str, str] = {}
    fake: Server | None = None

    if "redis" in apps:
        try:
            _, env["WIRE_REDIS_URL"] = start_redis(procs, directory)
            env["WIRE_REDIS_PREFIX"] = f"wire{uuid.uuid4().hex[:8]}:"
        except FileNotFoundError:
            apps.remove("redis")
            notes.append(
                "RedisLedger skipped: redis-server not found (apt-get install redis-server)"
            )
    if "slowapi" in apps:
        try:
            import slowapi  # noqa: F401
        except ImportError:
            apps.remove("slowapi")
            notes.append("slowapi skipped: not installed (pip install slowapi)")
    if "tier" in apps:
        fake = start_server(procs, "tierfake", {}, http, args.loop, directory)
        fake.wait_ready(time.monotonic() + START_TIMEOUT)
        env["WIRE_TIER_URL"] = f"http://127.0.0.1:{fake.port}"

    servers = {name: start_server(procs, name, env, http, args.loop, directory) for name in apps}
    deadline = time.monotonic() + START_TIMEOUT
    for server in servers.values():
        server.wait_ready(deadline)

    meters: dict[str, Meter] = {}
    for name in apps:
        if name in ("local", "redis"):
            meters[name] = Meter(
                functools.partial(servers[name].count, "/_bench/charged", "charged")
            )
        elif name == "tier":
            assert fake is not None
            meters[name] = Meter(functools.partial(fake.count, "/_bench/stats", "used"))
    for meter in meters.values():
        meter.last = meter.read()
    tier_calls_before = fake.json("/_bench/stats")["calls"] if fake else {}

    results = Results()
    failed = False

    def one(name: str, conns: int, seconds: int) -> tuple[Run, Check | None]:
        nonlocal failed
        pid = servers[name].process.pid
        before = cpu_seconds(pid)
        run = run_wrk(procs, script, servers[name].port, conns, seconds)
        after = cpu_seconds(pid)
        if before is not None and after is not None and run.requests:
            run.server_cpu_us = (after - before) / run.requests * 1e6
        check = None
        if name in meters:
            check = check_charges(meters[name], run, conns)
            if not check.passed:
                failed = True
                print(
                    f"  CHARGE CHECK FAILED: {name} at {conns} connections: {check.ok} 2xx, "
                    f"{check.non_2xx} non-2xx, {check.charged} units charged"
                    + ("" if check.settled else f" (still moving after {SETTLE_TIMEOUT:g} s)"),
                    file=sys.stderr,
                )
        elif run.status:
            failed = True
            print(f"  {name}: {run.status} non-2xx responses", file=sys.stderr)
        return run, check

    print(f"[{http}] warm-up: {args.warmup:g} s per app", file=sys.stderr)
    for name in apps:
        one(name, args.conns[0], args.warmup)
    for conns in args.conns:
        for r in range(args.rounds):
            order = apps[r % len(apps) :] + apps[: r % len(apps)]
            for name in order:
                run, check = one(name, conns, args.seconds)
                results.add(name, conns, run, check)
            line = "  ".join(f"{n} {results.runs[(n, conns)][-1].rate:,.0f}/s" for n in apps)
            if "tier" in apps:
                line += f" (+{results.lags[('tier', conns)][-1]:.1f} s delivering)"
            print(f"[{http}] {conns} conns, round {r + 1}: {line}", file=sys.stderr)

    tier_calls = {}
    if fake is not None:
        after = fake.json("/_bench/stats")["calls"]
        tier_calls = {p: n - tier_calls_before.get(p, 0) for p, n in after.items()}
    procs.stop_all()  # graceful: each provider closes (flushes, drains) in its lifespan
    text = report(args, http, apps, results, meters, tier_calls, notes)
    return text, not failed


def _median_ratio(values: list[float], bases: list[float]) -> tuple[float, float, float]:
    ratios = [v / b for v, b in zip(values, bases, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def report(
    args: argparse.Namespace,
    http: str,
    apps: list[str],
    results: Results,
    meters: dict[str, Meter],
    tier_calls: dict[str, int],
    notes: list[str],
) -> str:
    import uvicorn

    loop = args.loop
    if loop == "auto":
        # uvicorn's "auto" takes uvloop when it is installed
        found = importlib.util.find_spec("uvloop") is not None
        loop = "auto (uvloop)" if found else "auto (asyncio; uvloop is not installed)"
    lines = [
        "",
        f"Over the wire: uvicorn {uvicorn.__version__} (1 worker, --http {http}, --loop {loop}) "
        f"on 127.0.0.1, {wrk_version()} -t1;",
        f"{args.rounds} interleaved rounds of {args.seconds:g} s per app at each connection "
        f"count, after {args.warmup:g} s of warm-up; Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs (shared with wrk and the fakes); commit {git_commit()}",
        "",
        "| app | conns | req/s | ratio to bare (range) | p50 ms | p99 ms | p99 / bare "
        "| server CPU µs/req (bare / app) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for conns in args.conns:
        bare = results.runs.get(("bare", conns))
        for name in apps:
            runs = results.runs[(name, conns)]
            rate = statistics.median(r.rate for r in runs)
            p50 = statistics.median(r.p50 for r in runs) / 1000
            p99 = statistics.median(r.p99 for r in runs) / 1000
            ratio = p99_ratio = "n/a"
            if bare:
                m, lo, hi = _median_ratio([r.rate for r in runs], [r.rate for r in bare])
                ratio = f"{m:.2f} ({lo:.2f}-{hi:.2f})"
                m99, _, _ = _median_ratio([r.p99 for r in runs], [r.p99 for r in bare])
                p99_ratio = f"{m99:.2f}"
            cpu = "n/a"
            cpus = [r.server_cpu_us for r in runs if r.server_cpu_us is not None]
            if cpus:
                cpu = f"{statistics.median(cpus):.0f}"
                base = [r.server_cpu_us for r in bare or () if r.server_cpu_us is not None]
                if base:
                    cpu += f" ({statistics.median(base) / statistics.median(cpus):.2f})"
            lines.append(
                f"| {LABELS[name]} | {conns} | {rate:,.0f} | {ratio} | {p50:.2f} | {p99:.2f} "
                f"| {p99_ratio} | {cpu} |"
            )
            if name == "tier" and (name, conns) in results.lags:
                # Delivery that outlasts the run is work the req/s above leaves out.
                lags = results.lags[(name, conns)]
                sustained = [
                    r.ok / (r.duration_us / 1e6 + lag) for r, lag in zip(runs, lags, strict=True)
                ]
                ratio = "n/a"
                if bare:
                    m, lo, hi = _median_ratio(sustained, [r.rate for r in bare])
                    ratio = f"{m:.2f} ({lo:.2f}-{hi:.2f})"
                lag = statistics.median(lags)
                lines.append(
                    f"| ... counting its delivery after the run (median {lag:.1f} s) | {conns} "
                    f"| {statistics.median(sustained):,.0f} | {ratio} | | | | |"
                )
    lines += [
        "",
        "Charges (every wrk run, warm-up included): units charged == 2xx responses, except up",
        "to one request per connection that wrk abandoned in flight when its time was up.",
    ]
    for name, meter in meters.items():
        ok = sum(c.ok for c in meter.checks)
        charged = sum(c.charged for c in meter.checks)
        non_2xx = sum(c.non_2xx for c in meter.checks)
        errors = sum(c.socket_errors for c in meter.checks)
        worst = max(meter.checks, key=lambda c: abs(c.excess), default=None)
        verdict = "ok" if all(c.passed for c in meter.checks) else "FAILED"
        line = (
            f"  {LABELS[name]}: {ok:,} 2xx, {charged:,} units charged "
            f"(largest excess in one run: {worst.excess if worst else 0:+d}), "
            f"{non_2xx} non-2xx, {errors} socket errors: {verdict}"
        )
        if name == "tier":
            slowest = max((c.settle for c in meter.checks), default=0.0)
            calls = ", ".join(
                f"{p} {n:,}" for p, n in sorted(tier_calls.items()) if n and p.startswith("/v1/")
            )
            line += (
                f"\n    all delivered at most {slowest:.1f} s after a run's end; "
                f"calls to the fake during the rounds: {calls}"
            )
        lines.append(line)
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s: under a minute")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    parser.add_argument("--seconds", type=int, help="seconds per wrk run (default 2; quick 1)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per app (default 1)")
    parser.add_argument("--conns", default="16,64", help="connection counts (default 16,64)")
    parser.add_argument(
        "--apps", default=",".join(APPS), help=f"apps to run, bare first (default {','.join(APPS)})"
    )
    parser.add_argument("--http", choices=("h11", "httptools", "both"), default="h11")
    parser.add_argument("--loop", default="auto", help="uvicorn --loop (default auto)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.seconds = args.seconds or (1 if args.quick else 2)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.conns = [int(c) for c in args.conns.split(",")]
    args.apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    unknown = set(args.apps) - set(APPS)
    if unknown:
        parser.error(f"unknown apps {sorted(unknown)}; choose from {', '.join(APPS)}")
    if min(args.rounds, args.seconds, args.warmup, *args.conns) < 1:
        parser.error(
            "--rounds, --seconds, --warmup and --conns must be >= 1 (wrk takes whole seconds)"
        )
    return args


@contextlib.contextmanager
def stopped_on_signals(procs: Processes) -> Iterator[None]:
    """SIGTERM/SIGHUP end the run like Ctrl-C: the finally blocks stop every child."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    atexit.register(procs.stop_all, None, 1.0)  # the last resort
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print(
            "bench_wire.py needs wrk, the HTTP load generator: apt-get install wrk "
            "(Debian/Ubuntu; or build it from https://github.com/wg/wrk)",
            file=sys.stderr,
        )
        return 2
    modes = ["h11", "httptools"] if args.http == "both" else [args.http]
    if "httptools" in modes:
        try:
            import httptools  # noqa: F401
        except ImportError:
            print("--http httptools needs httptools: pip install httptools", file=sys.stderr)
            return 2
    runs = len(args.apps) * (len(args.conns) * args.rounds * args.seconds + args.warmup)
    print(
        f"about {len(modes) * runs:.0f} s of load in all, plus start-up and settling",
        file=sys.stderr,
    )
    procs = Processes()
    passed = True
    try:
        with (
            stopped_on_signals(procs),
            tempfile.TemporaryDirectory(prefix="usage-wire-") as tmp,
        ):
            try:
                for http in modes:
                    text, ok = bench(args, procs, http, Path(tmp))
                    print(text, flush=True)
                    passed = passed and ok
            finally:
                procs.stop_all()
    except KeyboardInterrupt:
        print("interrupted; every process started here is stopped", file=sys.stderr)
        return 130
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
