"""`usage-middleware demo`: the newcomer's first command runs end to end over real HTTP."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import usage_middleware
import usage_middleware.cli.demo as demo
from usage_middleware.cli import main


@pytest.mark.slow
def test_demo_serves_refuses_grants_and_prints_the_ledger(tmp_path: Path) -> None:
    """The demo exits 0 after 200s, a 402 problem body, a credit-funded 200 and the table."""
    # The package alone, copied away from the clone (as a wheel installs it): no examples/.
    site = tmp_path.parent / f"{tmp_path.name}-site"
    shutil.copytree(
        Path(usage_middleware.__file__).resolve().parent,
        site / "usage_middleware",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("USAGE_")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run(
        [sys.executable, "-m", "usage_middleware", "demo"],
        cwd=tmp_path,  # any directory: the app and its pricing ship in the package
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Traceback" not in out + result.stderr
    assert f"App:     {site}" in out, "the demo serves the packaged app"

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
    # 6. /chat billed by tokens: charged usage.total_tokens, a hang-up its tokens, a 402
    assert re.search(r"POST /chat\s+-> 200 OK\s+15 tokens streamed, usage.total_tokens 20", out)
    assert "Charged 20 tokens, not the estimate of 25." in out
    assert re.search(r"POST /chat\s+-> 402 Payment Required", out)
    tokens = next(line for line in table.splitlines() if line.strip().startswith("feature:tokens"))
    tokens_used = int([c.strip() for c in tokens.split("  ") if c.strip()][3])
    assert 20 + 5 + 3 <= tokens_used < 20 + 65

    ledger = re.search(r"Ledger:\s+(\S+usage\.db)", out)
    assert ledger is not None
    assert not Path(ledger.group(1)).exists(), "the demo's temporary ledger is removed"
    assert list(tmp_path.iterdir()) == [], "the demo leaves nothing in the working directory"


def test_packaged_example_is_the_one_in_examples() -> None:
    """The demo's packaged app and pricing are byte-for-byte examples/ (one source, no drift)."""
    root = Path(__file__).resolve().parents[2]
    packaged = Path(usage_middleware.__file__).resolve().parent / "example"
    for name in ("fastapi_app.py", "pricing.json"):
        assert (packaged / name).read_bytes() == (root / "examples" / name).read_bytes(), name
    with demo.example_pricing() as pricing:
        assert pricing.read_bytes() == (root / "examples" / "pricing.json").read_bytes()


def test_demo_without_the_fastapi_extra_fails_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without FastAPI/uvicorn, `demo` exits 2 with one line naming the extra to install."""
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util, "find_spec", lambda name: None if name == "uvicorn" else real(name)
    )
    assert main(["demo"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "usage-middleware: error: the demo needs uvicorn: pip install 'usage-middleware[fastapi]'\n"
    )


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`usage-middleware --version` prints the distribution's version and exits 0."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"usage-middleware {version('usage-middleware')}\n"
