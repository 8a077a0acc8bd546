"""The README's quick start, every code block run as printed, against a real uvicorn.

The blocks run in order in an empty temporary directory, as a reader would run them:

- the python block is saved as ``app.py`` (the README says so) next to a copy of
  ``examples/pricing.json`` (the README says where it comes from);
- each ``sh`` line runs: ``usage-middleware ARGS`` as ``python -m usage_middleware ARGS``
  (the README calls them the same command; the console script may belong to another
  install, ``-m`` runs this checkout); ``uvicorn app:app`` as ``python -m uvicorn app:app``
  serving a listening socket it inherits (``--fd``), because port 8000 may be taken on a
  shared machine: the curl URLs' ``127.0.0.1:8000`` is that socket's address; ``curl``
  runs as the real curl in the test's ``curl`` case (skipped where curl is not installed,
  as on a fresh Debian CI machine) and, in its ``httpx`` case, as the same request made
  with httpx, read from curl's ``-X``, ``-H`` and ``-d`` (any other curl option fails the
  test, so the translation cannot drift). A ``# comment`` after a curl command is the
  response body it prints;
- the ``text`` block is the output of the command before it, with the usage period's
  dates (``2026-12-01 to 2026-12-31``: the month the test runs in) read as any period.

Any other kind of block, or any other command, fails the test: a quick start that rots
fails CI.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
README_PORT = "http://127.0.0.1:8000"
PERIOD = re.compile(r"\d{4}-\d{2}-\d{2} to \d{4}-\d{2}-\d{2}")

pytestmark = pytest.mark.slow


def quick_start() -> str:
    """The README's "Quick start" section, up to the next section."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def code_blocks(section: str) -> list[tuple[str, str]]:
    """The fenced code blocks of ``section``: (language, text)."""
    return re.findall(r"(?ms)^```(\w*)\n(.*?)^```$", section)


def shell_lines(block: str) -> Iterator[tuple[list[str], str | None]]:
    """Each command of a ``sh`` block: (argv, the text of its trailing ``# comment``)."""
    for line in block.replace("\\\n", " ").splitlines():
        if not line.strip():
            continue
        comment = re.search(r"\s#\s?(.*)$", line)
        command = line[: comment.start()] if comment else line
        argv = shlex.split(command)
        assert argv == shlex.split(line, comments=True), line
        yield argv, comment.group(1).strip() if comment else None


def curl_as_httpx(argv: list[str], base_url: str) -> str:
    """Make the request ``curl ARGV`` makes, with httpx; return the body curl would print."""
    method, headers, data, url = None, [], None, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers.append((name.strip(), value.strip()))
        elif arg == "-d":
            data = next(args)
        elif not arg.startswith("-") and url is None:
            url = arg
        else:
            pytest.fail(f"the quick start's curl uses {arg!r}, which this test cannot translate")
    assert url is not None and url.startswith(README_PORT), argv
    if data is not None and not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("content-type", "application/x-www-form-urlencoded"))  # curl's -d
    response = httpx.request(
        method or ("POST" if data is not None else "GET"),
        base_url + url[len(README_PORT) :],
        headers=headers,
        content=data,
        timeout=10,
    )
    return response.text


def environment() -> dict[str, str]:
    """The environment of the commands: this checkout first, no ledger or pricing set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("USAGE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Server:
    """``uvicorn app:app`` in a subprocess, on a listening loopback socket it inherits."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        assert argv[0] == "uvicorn", argv
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        fd = str(self.sock.fileno())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *argv[1:], "--fd", fd, "--log-level", "warning"],
            cwd=cwd,
            env=env,
            pass_fds=[self.sock.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                httpx.get(self.base_url + "/docs", timeout=1)  # any answer: it serves
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "uvicorn app:app did not start"
                time.sleep(0.05)

    def output(self) -> str:
        """What uvicorn printed (after it exited)."""
        out = self.proc.communicate(timeout=15)[0] if self.proc.stdout else b""
        return out.decode(errors="replace")

    def stop(self) -> None:
        """Shut uvicorn down (SIGTERM, then SIGKILL) and close the socket."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.sock.close()


def periodless(text: str) -> str:
    """``text`` with its usage-period dates and trailing spaces taken out."""
    return "\n".join(PERIOD.sub("<period>", line).rstrip() for line in text.strip().splitlines())


@pytest.mark.parametrize("client", ["httpx", "curl"])
def test_readme_quick_start_runs_as_printed(tmp_path: Path, client: str) -> None:
    """Every block of the README's quick start runs in order against real uvicorn: the
    subscribe works, the curls print the bodies their comments show, and `show` prints the
    table the README shows (1 conversion and 3 pages charged)."""
    if client == "curl" and shutil.which("curl") is None:
        pytest.skip("curl is not installed (the httpx case makes the same requests)")
    section = quick_start()
    assert "save this as `app.py`" in section.lower() and "`examples/pricing.json`" in section
    (tmp_path / "pricing.json").write_text((ROOT / "examples" / "pricing.json").read_text())
    env = environment()
    server: Server | None = None
    last: list[str] = []
    ran: list[str] = []

    def usage_middleware(argv: list[str]) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "usage_middleware", *argv[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result.stdout

    try:
        for language, text in code_blocks(section):
            ran.append(language)
            if language == "python":
                assert not (tmp_path / "app.py").exists(), "one python block: app.py"
                (tmp_path / "app.py").write_text(text)
            elif language == "sh":
                for argv, expected in shell_lines(text):
                    last = argv
                    if argv[0] == "usage-middleware":
                        usage_middleware(argv)
                    elif argv[0] == "uvicorn":
                        assert server is None and argv == ["uvicorn", "app:app"], argv
                        server = Server(argv, tmp_path, env)
                    elif argv[0] == "curl":
                        assert server is not None, "a curl before uvicorn"
                        if client == "curl":
                            url = [a.replace(README_PORT, server.base_url) for a in argv[1:]]
                            body = subprocess.run(
                                ["curl", "-sS", "--max-time", "10", *url],
                                capture_output=True,
                                text=True,
                                timeout=30,
                                check=True,
                            ).stdout
                        else:
                            body = curl_as_httpx(argv, server.base_url)
                        assert expected is not None, f"{argv}: no # comment with its output"
                        assert body == expected, (argv, body)
                    else:
                        pytest.fail(f"the quick start runs {argv[0]!r}, which this test cannot")
            elif language == "text":
                assert last and last[0] == "usage-middleware", "a text block after no command"
                # Charges reach the ledger file within its flush interval (5 ms): what a
                # reader types next sees them; the test asks until then (10 s at most).
                deadline = time.monotonic() + 10
                while (got := periodless(usage_middleware(last))) != periodless(text):
                    assert time.monotonic() < deadline, (got, text)
                    time.sleep(0.05)
            else:
                pytest.fail(f"a {language!r} block in the quick start, which this test cannot run")
        assert ran == ["python", "sh", "sh", "text"]
        assert server is not None
        # The prose: a customer on no plan is refused with a 402.
        nobody = httpx.post(
            server.base_url + "/convert",
            json={"text": "hi"},
            headers={"x-customer": "org:nobody"},
            timeout=10,
        )
        assert nobody.status_code == 402, nobody.text
    finally:
        if server is not None:
            server.stop()
