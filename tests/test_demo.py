"""`usage-middleware demo`: the newcomer's first command runs end to end over real HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import usage_middleware.demo as demo
from usage_middleware.cli import main


@pytest.mark.slow
def test_demo_serves_refuses_grants_and_prints_the_ledger(tmp_path: Path) -> None:
    """The demo exits 0 after 200s, a 402 problem body, a credit-funded 200 and the table."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("USAGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "usage_middleware", "demo"],
        cwd=tmp_path,  # the demo finds examples/ next to the package, not in the cwd
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Traceback" not in out + result.stderr

    statuses = [int(s) for s in re.findall(r"POST /convert\s+-> (\d{3})", out)]
    assert statuses == [200] * 5 + [402, 200], out
    assert '"status": 402' in out
    assert '"feature": "feature:convert"' in out
    assert "application/problem+json" in out
    assert re.search(r"POST /summarize\?pages=3\s+-> 200", out)
    assert re.search(r"POST /summarize\?pages=0\s+-> 422", out)

    table = out[out.index("FEATURE") :]
    convert = next(
        line for line in table.splitlines() if line.strip().startswith("feature:convert")
    )
    cells = [c.strip() for c in convert.split("  ") if c.strip()]
    # 5 free conversions + 1 funded by the 3 granted credits; pages: 3 charged, 0 for the 422.
    assert cells[:6] == ["feature:convert", "plan:free@1", "5", "6", "2", "2"]
    pages = next(line for line in table.splitlines() if line.strip().startswith("feature:pages"))
    assert [c.strip() for c in pages.split("  ") if c.strip()][2:4] == ["20", "3"]
    assert "Stopped the server cleanly" in out

    ledger = re.search(r"Ledger:\s+(\S+usage\.db)", out)
    assert ledger is not None
    assert not Path(ledger.group(1)).exists(), "the demo's temporary ledger is removed"
    assert list(tmp_path.iterdir()) == [], "the demo leaves nothing in the working directory"


def test_demo_outside_a_clone_fails_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without examples/ next to the package or in the cwd, `demo` exits 2 naming the fix."""
    monkeypatch.setattr(demo, "__file__", str(tmp_path / "site-packages" / "pkg" / "demo.py"))
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(
        "usage-middleware: error: the demo serves examples/fastapi_app.py"
    )
    assert "clone" in captured.err


def test_find_examples_uses_the_clone_the_package_runs_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The examples are found next to the package even when the cwd is elsewhere."""
    monkeypatch.chdir(tmp_path)
    folder = demo.find_examples()
    assert (folder / "fastapi_app.py").is_file()
    assert folder == Path(demo.__file__).resolve().parent.parent / "examples"
