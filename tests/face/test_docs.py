"""The documentation site (mkdocs.yml, docs/): it builds strictly and its reference is whole."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import usage_middleware as um
from usage_middleware.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]

#: The constructors docs/configuration.md documents, argument by argument.
DOCUMENTED = [
    um.UsageMiddleware,
    um.metered,
    um.customer_from_header,
    um.customer_from_user,
    um.LocalLedger,
    um.RedisLedger,
    um.RemoteProvider.__init__,
    um.TierProvider,
    um.SpaireProvider,
    um.AresProvider,
]


@pytest.mark.parametrize("target", DOCUMENTED, ids=lambda t: t.__qualname__)
def test_configuration_reference_names_every_argument(target: object) -> None:
    """docs/configuration.md names every argument of each public constructor (a new one
    fails here until it is documented)."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert callable(target)
    for name, parameter in inspect.signature(target).parameters.items():
        if name in ("self", "app") or parameter.kind is parameter.VAR_KEYWORD:
            continue
        documented = re.search(rf"[`(, ]{name}[`=,)]", page)
        assert documented, f"{target.__qualname__}({name}=...) is not in the reference"


def test_configuration_reference_names_every_environment_variable() -> None:
    """Every environment variable the package reads is in docs/configuration.md."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    read: set[str] = set()
    for path in (ROOT / "usage_middleware").rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]+)["']""", text))
        read |= set(re.findall(r"""\(\s*"([A-Z]+_[A-Z0-9_]+)",\s*"[a-z_]+"\s*\)""", text))
    read -= {name for name in read if name.startswith("_")}
    assert {"USAGE_DB", "REDIS_URL", "CLERK_SECRET_KEY", "SPAIRE_METER_ID"} <= read
    missing = sorted(name for name in read if f"`{name}`" not in page)
    assert not missing, f"environment variables missing from docs/configuration.md: {missing}"


def test_every_docs_page_is_in_the_nav() -> None:
    """Each page under docs/ is in mkdocs.yml's nav, and each nav entry exists."""
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^  - [^:]+: (\S+\.md)$", config, re.MULTILINE))
    pages = {path.name for path in (ROOT / "docs").glob("*.md")}
    assert nav == pages


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="the docs extra is not installed (pip install -e '.[docs]'); .ci/run installs it",
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` succeeds: no broken link or anchor, no missing page, and
    every README section the home page includes exists."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    home = (tmp_path / "index.html").read_text()
    assert "--8&lt;--" not in home and "Quick start" in home
    assert "At-least-once where the provider cannot deduplicate" in home


def _commands_and_options(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every (sub)command path and long option of ``parser``, e.g. "outbox status", "--json"."""
    found: set[str] = set()
    for action in parser._actions:
        found |= {s for s in action.option_strings if s.startswith("--") and s != "--help"}
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.add(f"{prefix}{name}")
                found |= _commands_and_options(sub, f"{prefix}{name} ")
    return found


def test_cli_reference_names_every_command_and_option() -> None:
    """docs/cli.md names every command and long option `usage-middleware --help` lists."""
    page = (ROOT / "docs" / "cli.md").read_text()
    names = _commands_and_options(build_parser())
    assert {"outbox status", "--max-retry-age", "subscribe"} <= names
    missing = sorted(
        name for name in names if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", page)
    )
    assert not missing, f"missing from docs/cli.md: {missing}"


def test_readme_links_resolve() -> None:
    """Each relative link of the README names a file of the repository (the docs site's
    own links are checked by `mkdocs build --strict`)."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert "docs/index.md" in links
    for link in links:
        if "://" in link or link.startswith("#"):
            continue
        assert (ROOT / link.split("#")[0]).is_file(), link
