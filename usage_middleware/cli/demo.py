"""``usage-middleware demo``: watch a real app serve, meter and refuse requests.

The demo serves the example app shipped in the package (``usage_middleware/example/``, the
same files as the repository's ``examples/fastapi_app.py`` and ``examples/pricing.json``), so
it runs from any directory of any install; it needs the ``fastapi`` extra (FastAPI and
uvicorn). It:

1. starts the example app under uvicorn in a subprocess, on a free 127.0.0.1 port, with a
   fresh ledger file in a temporary directory (``USAGE_DB`` / ``USAGE_PRICING``);
2. subscribes ``org:demo`` to ``plan:free@1`` through its own :class:`LocalLedger` on the
   same file (two processes, one ledger);
3. sends ``POST /convert`` over real HTTP (httpx) until the free plan runs out and prints
   each status, then the 402 problem body;
4. grants credits and shows that the next request is served (funded by credits);
5. shows a request charged several units and a failed one that is not charged;
6. bills a chat route by tokens: a stream of a stand-in model's tokens (server-sent
   events) charged the tokens it used rather than its estimate, a client hanging up
   half-way (charged the tokens generated until then), and a request whose estimate is
   beyond what is left, refused with 402 before the model runs;
7. stops the server (uvicorn's graceful shutdown closes the ledger) and prints the
   ledger's table for ``org:demo``.

:func:`run_demo` returns 0 when all of that happened as described, 1 otherwise (with the
server's log). A missing extra raises
:class:`~usage_middleware.errors.ConfigurationError` (the CLI prints it on one line).
Everything is bounded: each HTTP call times out, the request loop stops after 50 calls,
and the server is killed if it does not stop within 15 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import httpx

from ..errors import ConfigurationError

__all__ = ["APP", "CUSTOMER", "example_pricing", "run_demo"]

#: The demo's customer id.
CUSTOMER = "org:demo"
_PLAN = "plan:free@1"
_FEATURE = "feature:convert"
_TOKENS = "feature:tokens"
_CREDITS = 3
_MAX_CALLS = 50
_FD_ENV = "USAGE_DEMO_LISTEN_FD"
#: The app the demo serves (``uvicorn`` import string).
APP = "usage_middleware.example.fastapi_app:app"


@contextlib.contextmanager
def example_pricing() -> Iterator[Path]:
    """The path of the packaged example ``pricing.json``, valid inside the ``with``.

    A real file for a normal install; a temporary copy when the package is zipped.
    """
    resource = importlib.resources.files("usage_middleware.example") / "pricing.json"
    with importlib.resources.as_file(resource) as path:
        yield path


def _require_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigurationError(
            f"the demo needs {' and '.join(missing)}: pip install 'usage-middleware[fastapi]'"
        )


class _Out:
    """Prints the demo's narration, flushed line by line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)


def _status_line(method: str, path: str, response: httpx.Response) -> str:
    reason = response.reason_phrase or ""
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        text = "(problem details below)" if response.status_code == 402 else ""
    else:
        text = response.text if len(response.text) <= 60 else response.text[:57] + "..."
    return f"   {method} {path:<22} -> {response.status_code} {reason:<20} {text}"


async def _admin_subscribe(db: Path, pricing: Path) -> tuple[int, str]:
    """Subscribe the demo customer; return the plan's limit and period for the feature."""
    from ..ledger.local import LocalLedger
    from ..pricing import load_pricing

    plan = load_pricing(pricing).plans[_PLAN]
    async with LocalLedger(db, pricing=pricing) as ledger:
        await ledger.subscribe(CUSTOMER, _PLAN)
    period = {"@daily": "a day", "@weekly": "a week", "@monthly": "a month"}
    return plan.features[_FEATURE].limit, period.get(plan.interval, "a year")


async def _admin_grant(db: Path) -> int:
    from ..ledger.local import LocalLedger

    async with LocalLedger(db) as ledger:
        return await ledger.grant(CUSTOMER, _FEATURE, _CREDITS)


async def _admin_table(db: Path) -> str:
    from ..ledger.local import LocalLedger
    from ._common import render_usage

    async with LocalLedger(db) as ledger:
        return render_usage(await ledger.usage(CUSTOMER))


class _Server:
    """The example app under uvicorn in a child process, listening on a socket we bound."""

    def __init__(self, workdir: Path, db: Path, pricing: Path) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        env = dict(os.environ)
        env.update(
            {
                "USAGE_DB": str(db),
                "USAGE_PRICING": str(pricing),
                _FD_ENV: str(self.sock.fileno()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "usage_middleware.cli.demo", "--serve"],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=[self.sock.fileno()],
            )
        self.sock.close()  # the child holds the listening socket now

    def wait_ready(self, client: httpx.Client, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if client.get("/health", timeout=2.0).status_code == 200:
                    return True
            except httpx.TransportError:
                time.sleep(0.1)
        return False

    def stop(self, timeout: float = 15.0) -> bool:
        """Ask uvicorn to shut down gracefully; kill it after ``timeout`` seconds."""
        if self.proc.poll() is not None:
            return self.proc.returncode == 0
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return False
        return True

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def run_demo(*, out: TextIO | None = None) -> int:
    """Run the demo (see the module docstring); return 0 on success, 1 otherwise.

    Raises:
        ConfigurationError: FastAPI or uvicorn is not installed.
    """
    _require_extra()
    say = _Out(out or sys.stdout)
    with (
        example_pricing() as pricing,
        tempfile.TemporaryDirectory(prefix="usage-demo-") as tmp,
    ):
        workdir = Path(tmp)
        db = workdir / "usage.db"
        return _run(say, pricing, workdir, db)


def _run(say: _Out, pricing: Path, workdir: Path, db: Path) -> int:
    app_file = Path(pricing).with_name("fastapi_app.py")
    say("usage-middleware demo")
    say("=====================")
    say(f"App:     {app_file} (FastAPI + UsageMiddleware + @metered)")
    say(f"Pricing: {pricing}")
    say(f"Ledger:  {db} (a fresh SQLite file, deleted at the end)")
    say()
    limit, per = asyncio.run(_admin_subscribe(db, pricing))
    server = _Server(workdir, db, pricing)
    ok = False
    stopped = False
    try:
        with httpx.Client(
            base_url=server.url, headers={"x-customer": CUSTOMER}, timeout=10.0
        ) as client:
            say(f"1. Started uvicorn at {server.url} (a subprocess).")
            if not server.wait_ready(client):
                say("   The server did not come up. Its log:")
                say(server.log_tail())
                return 1
            say(f"   Subscribed {CUSTOMER} to {_PLAN}: {limit} x {_FEATURE} {per}")
            say(f"   ('usage-middleware subscribe {CUSTOMER} {_PLAN}').")
            say()
            ok = _exercise(say, client, db)
            say()
            ok = _chat(say, client, db) and ok
        stopped = server.stop()
        say()
        say(f"7. Stopped the server{' cleanly' if stopped else ' (had to kill it)'}.")
        say()
        say(f"   The ledger for {CUSTOMER}, as 'usage-middleware show {CUSTOMER}' prints it:")
        say()
        say("\n".join("   " + line for line in asyncio.run(_admin_table(db)).splitlines()))
        say()
    finally:
        if server.proc.poll() is None:
            server.stop()
    if not (ok and stopped):
        say("The demo did not go as expected. The server's log:")
        say(server.log_tail())
        return 1
    say(f"Done: {limit} requests served on the free plan, the next refused with 402,")
    say("and one more served once credits were granted. Only successful responses were charged;")
    say("chat streams were charged the tokens they used.")
    return 0


def _exercise(say: _Out, client: httpx.Client, db: Path) -> bool:
    """Steps 2-5; True when every answer was the expected one."""
    say(f"2. POST /convert as {CUSTOMER} until the free plan runs out:")
    served = 0
    denied: httpx.Response | None = None
    for i in range(1, _MAX_CALLS + 1):
        response = client.post("/convert", json={"text": f"hello {i}"})
        say(_status_line("POST", "/convert", response))
        if response.status_code == 200:
            served += 1
            continue
        if response.status_code == 402:
            denied = response
        break
    if denied is None or served == 0:
        say("   Expected some 200s and then a 402.")
        return False
    say()
    say(f"   The 402 body ({denied.headers.get('content-type')}):")
    body = json.dumps(denied.json(), indent=2, ensure_ascii=False)
    say("\n".join("   " + line for line in body.splitlines()))
    for name in ("ratelimit-policy", "ratelimit"):
        if name in denied.headers:
            say(f"   {name}: {denied.headers[name]}")
    say()

    balance = asyncio.run(_admin_grant(db))
    say(f"3. Granted {CUSTOMER} {_CREDITS} credits of {_FEATURE} (balance {balance}), as")
    say(f"   'usage-middleware grant {CUSTOMER} {_FEATURE} {_CREDITS}' would, from this process.")
    say("   The server sees a change made by another process within about a second:")
    started = time.monotonic()
    again = _until_served(client)
    waited = time.monotonic() - started
    say(_status_line("POST", "/convert", again) + f"  (after {waited:.1f} s)")
    say()

    say("4. Units from the request: POST /summarize?pages=3 is charged 3 units of feature:pages:")
    pages = client.post("/summarize", params={"pages": 3})
    say(_status_line("POST", "/summarize?pages=3", pages))
    say()

    say("5. A request that fails is not charged: pages=0 is refused by the route (422):")
    failed = client.post("/summarize", params={"pages": 0})
    say(_status_line("POST", "/summarize?pages=0", failed))
    return again.status_code == 200 and pages.status_code == 200 and failed.status_code == 422


async def _admin_tokens(db: Path) -> int:
    """The demo customer's tokens used this period, as the ledger file has them."""
    from ..ledger.local import LocalLedger

    async with LocalLedger(db) as ledger:
        rows = await ledger.usage(CUSTOMER)
    return next((row.used for row in rows if row.feature == _TOKENS), 0)


def _tokens_after(db: Path, before: int, timeout: float = 5.0) -> int:
    """Tokens used once the server's group commit wrote a change from ``before`` (or the
    same after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        used = asyncio.run(_admin_tokens(db))
        if used != before or time.monotonic() >= deadline:
            return used
        time.sleep(0.05)


def _chat(say: _Out, client: httpx.Client, db: Path) -> bool:
    """Step 6: /chat billed by tokens; True when every answer was the expected one."""
    say(f"6. Billed by tokens: POST /chat streams a stand-in model's tokens ({_TOKENS}).")
    prompt, max_tokens = "tell me about metered billing", 20
    estimate = len(prompt.split()) + max_tokens
    say(
        f"   Reserved before the model runs: {len(prompt.split())} prompt tokens + max_tokens "
        f"{max_tokens} = {estimate};"
    )
    say("   charged when the stream ends: the tokens it used.")
    before = asyncio.run(_admin_tokens(db))
    with client.stream("POST", "/chat", json={"prompt": prompt, "max_tokens": max_tokens}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    usage: dict[str, int] = next(
        (json.loads(e)["usage"] for e in events if e.startswith("{") and '"usage"' in e), {}
    )
    streamed = sum(1 for e in events if '"content"' in e)
    used = _tokens_after(db, before)
    charged = used - before
    say(
        f"   POST /chat {'':<16} -> {r.status_code} {r.reason_phrase:<20} {streamed} tokens "
        f"streamed, usage.total_tokens {usage.get('total_tokens')}"
    )
    say(f"   Charged {charged} tokens, not the estimate of {estimate}.")
    say()
    say("   A client that hangs up after 3 tokens of a longer answer (charge_partial=True:")
    say("   the tokens generated until then are charged, the rest of the estimate released):")
    before = used
    read = 0
    with client.stream(
        "POST", "/chat", json={"prompt": "write a long answer please", "max_tokens": 60}
    ) as cut:
        for line in cut.iter_lines():
            read += '"content"' in line
            if read == 3:
                break
    used = _tokens_after(db, before)
    partial = used - before
    say(f"   POST /chat {'':<16} -> {cut.status_code} {cut.reason_phrase:<20} read {read} tokens")
    say(f"   Charged {partial} tokens: 5 prompt tokens and the tokens generated, of 65 reserved.")
    say()
    long_prompt = " ".join(["word"] * 400)
    say("   A prompt of 400 tokens with max_tokens 256 reserves 656, more than is left:")
    refused = client.post("/chat", json={"prompt": long_prompt, "max_tokens": 256})
    detail = refused.json().get("detail", "") if refused.status_code == 402 else refused.text
    say(f"   POST /chat {'':<16} -> {refused.status_code} {refused.reason_phrase:<20} {detail}")
    say("   The model never ran.")
    return (
        r.status_code == 200
        and usage.get("total_tokens") == charged
        and cut.status_code == 200
        and 5 + read <= partial < 65
        and refused.status_code == 402
    )


def _until_served(client: httpx.Client, timeout: float = 10.0) -> httpx.Response:
    """POST /convert until it is served (credits reached the server) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.post("/convert", json={"text": "paid with a credit"})
        if response.status_code != 402 or time.monotonic() >= deadline:
            return response
        time.sleep(0.2)


def _serve(argv: Sequence[str]) -> int:
    """The child process: serve :data:`APP` on the inherited socket."""
    import uvicorn

    del argv
    sock = socket.socket(fileno=int(os.environ[_FD_ENV]))
    config = uvicorn.Config(
        APP,
        lifespan="on",
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on
        pass
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(_serve(sys.argv[2:]))
    sys.exit(run_demo())
