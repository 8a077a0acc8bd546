"""Imports point one way: core <- storage/delivery <- ledgers, providers <- edge <- face."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "usage_middleware"

CORE, STORAGE, SERVICES, EDGE, FACE = range(5)
LAYER_NAMES = ("core", "storage/delivery", "ledgers/providers", "edge", "face")

#: Layer of each module, by dotted name below the package ("" is the package's __init__, the
#: public surface); the longest matching prefix wins, so a new module inside ledger/,
#: providers/, delivery/ or cli/ takes its package's layer, and any other new module fails
#: test_every_module_has_a_layer until it is added here. See docs/architecture.md.
LAYERS: dict[str, int] = {
    # 0 core: the vocabulary and the provider contract; imports nothing of the package above.
    "errors": CORE,
    "models": CORE,
    "pricing": CORE,
    "provider": CORE,
    "_utils": CORE,
    "telemetry": CORE,
    "idempotency": CORE,
    # 1 storage and delivery: SQLite helper, the outbox, the Reporter that drains it.
    "_sqlite": STORAGE,
    "outbox": STORAGE,
    "reporter": STORAGE,
    "delivery": STORAGE,
    # 2 ledgers and remote providers.
    "ledger": SERVICES,
    "ledger.engine": SERVICES,
    "providers": SERVICES,
    # 3 edge: a request's check, charge and problem response.
    "meter": EDGE,
    "middleware": EDGE,
    "decorator": EDGE,
    "dependency": EDGE,
    "routes": EDGE,
    "problems": EDGE,
    "customers": EDGE,
    "units": EDGE,
    "usage": EDGE,
    # 4 face: what users run and import.
    "cli": FACE,
    "testing": FACE,
    "example": FACE,
    "__main__": FACE,
    "": FACE,
}

#: Imports within a layer that the design rules out: (importer prefix, imported prefix, why).
APART: list[tuple[str, str, str]] = [
    ("decorator", "middleware", "the decorator talks to the per-request meter"),
    ("dependency", "middleware", "the dependency talks to the per-request meter"),
    ("ledger.redis", "ledger.local", "shared ledger constants live in ledger/base.py"),
    ("ledger", "providers", "a ledger must not load the remote providers (and httpx)"),
]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int:
    best: str | None = None
    for prefix in LAYERS:
        matches = module == prefix or (prefix and module.startswith(prefix + "."))
        if matches and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is None:
        raise AssertionError(
            f"{_label(module)} has no layer: add it to LAYERS in {Path(__file__).name}"
        )
    return LAYERS[best]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``name`` imports, at any depth (lazy and TYPE_CHECKING ones too)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    base_pkg = here if is_package else here[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "usage_middleware" or alias.name.startswith("usage_middleware."):
                    targets.append(alias.name.removeprefix("usage_middleware").lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base_pkg[: len(base_pkg) - (node.level - 1)]
                mod = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "usage_middleware":
                mod = node.module.removeprefix("usage_middleware").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}" if mod else alias.name
                targets.append(sub if sub in known else mod)
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target != name:
                out.add(target)
    return out


def _label(module: str) -> str:
    return f"usage_middleware{'.' + module if module else ''}"


def graph() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports (at any depth of its code)."""
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def test_every_module_has_a_layer() -> None:
    """Every module of the package is in LAYERS: a new one fails here until it is placed."""
    missing = []
    for name in modules():
        try:
            layer_of(name)
        except AssertionError as exc:
            missing.append(str(exc))
    assert not missing, "\n".join(missing)


def test_an_unknown_module_fails_loudly() -> None:
    """A module LAYERS does not cover raises, naming the module and the fix."""
    with pytest.raises(AssertionError, match=r"usage_middleware\.brand_new has no layer: add it"):
        layer_of("brand_new")


def test_no_module_imports_a_higher_layer() -> None:
    """No import (lazy or TYPE_CHECKING ones included) points up a layer."""
    upward = []
    for name, targets in sorted(graph().items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(name):
                upward.append(
                    f"{_label(name)} ({LAYER_NAMES[layer_of(name)]}) imports "
                    f"{_label(target)} ({LAYER_NAMES[layer_of(target)]})"
                )
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # the package is small: recursion depth stays low
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)

    found = []
    for component in components:
        start = min(component)
        # Breadth-first inside the component: the shortest way from start back to start.
        paths = {start: [start]}
        queue = [start]
        cycle: list[str] | None = None
        while queue and cycle is None:
            node = queue.pop(0)
            for nxt in sorted(edges[node] & component):
                if nxt == start:
                    cycle = [*paths[node], start]
                    break
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    queue.append(nxt)
        assert cycle is not None
        found.append(cycle)
    return found


def test_no_import_the_design_rules_out() -> None:
    """The same-layer imports in APART do not exist."""
    found = [
        f"{_label(name)} imports {_label(target)}: {why}"
        for name, targets in sorted(graph().items())
        for target in sorted(targets)
        for importer, imported, why in APART
        if _under(name, importer) and _under(target, imported)
    ]
    assert not found, "\n".join(found)


def test_cycles_finds_a_cycle() -> None:
    """The cycle search reports a -> b -> c -> a and nothing for a chain."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle() -> None:
    """No two modules of the package import each other, directly or through others."""
    found = [" -> ".join(_label(m) for m in cycle) for cycle in cycles(graph())]
    assert not found, "import cycles:\n" + "\n".join(found)
