"""The layer rule of docs/architecture.md, checked over the source (also run by `make lint`).

Packages sit in layers: store/ and pki/ at the bottom (pure or filesystem-only), protocol/ over
them (sans-I/O), daemon/ over both, and the commands (publish/, gc/, offload/ and the top-level
modules) at the top.  An import that points upward, or a cycle between packages, makes a layer
depend on what it should not know; this test parses every module under guixsvc/ (imports inside
functions and under TYPE_CHECKING included) and fails on either.  Known exceptions are listed
with their issue so the list can only shrink: an exception no longer needed fails too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "guixsvc"

#: What the lower layers may import (besides themselves and the `guixsvc` package's __init__).
#: Packages not named here (the commands) may import anything, as long as there is no cycle.
ALLOWED: dict[str, set[str]] = {
    "pki": set(),
    "store": {"pki"},
    "protocol": {"store", "pki"},
    # cliargs is the shared command-line library (SRFI-37 parsing, error texts, exit codes).
    "cliargs": {"store", "pki", "protocol"},
    # quantities: sizes and durations of the Scheme commands (gc, publish).
    "quantities": {"cliargs"},
    # avahi is the D-Bus client of avahi-daemon (publish advertises, the daemon discovers).
    "avahi": set(),
    "daemon": {"store", "pki", "protocol", "cliargs", "avahi"},
}

#: Package edges that break the rule today, each with the issue that will remove it.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
    # The scheduler runs the build hook in-process (guixsvc.offload.hook), and offload/ uses the
    # daemon's settings and build modules: a daemon <-> offload cycle (issue 13).
    ("daemon", "offload"): "issue 13",
}


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(ROOT.parent).with_suffix("").parts
    is_pkg = rel[-1] == "__init__"
    return ".".join(rel[:-1] if is_pkg else rel), is_pkg


def _package(module: str) -> str:
    """`guixsvc.store.nar` → `store`; `guixsvc.archive` → `archive`; `guixsvc` → `guixsvc`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> list[str]:
    module, is_pkg = _module_name(path)
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from guixsvc import store` names a subpackage, not the root package.
            if target == "guixsvc":
                found += [f"guixsvc.{alias.name}" for alias in node.names]
            else:
                found.append(target)
    return [name for name in found if name == "guixsvc" or name.startswith("guixsvc.")]


def package_graph() -> dict[str, dict[str, list[str]]]:
    """Package → imported package → the modules making that import (as `a -> b` strings)."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(ROOT.rglob("*.py")):
        module, _ = _module_name(path)
        src = _package(module)
        for target in _imports(path):
            dst = _package(target)
            known = (ROOT / dst).is_dir() or (ROOT / f"{dst}.py").exists()
            if dst not in (src, "guixsvc") and known:
                graph[src][dst].append(f"{module} -> {target}")
    return graph


def _violations() -> dict[tuple[str, str], list[str]]:
    graph = package_graph()
    bad: dict[tuple[str, str], list[str]] = {}
    for src, targets in graph.items():
        if src in ALLOWED:
            for dst, where in targets.items():
                if dst not in ALLOWED[src]:
                    bad[(src, dst)] = where

    # Cycles: an edge a -> b where b reaches a again.
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += list(graph.get(node, {}))
        return False

    for src, targets in graph.items():
        for dst, where in targets.items():
            if reaches(dst, src):
                bad.setdefault((src, dst), where)
    return bad


def test_layer_rule() -> None:
    bad = {edge: where for edge, where in _violations().items() if edge not in KNOWN_EXCEPTIONS}
    # A cycle's back edge from a command package is reported under the lower package's exception.
    bad = {edge: where for edge, where in bad.items() if (edge[1], edge[0]) not in KNOWN_EXCEPTIONS}
    assert not bad, "imports against the layer rule of docs/architecture.md:\n" + "\n".join(
        f"{a} -> {b}: {', '.join(where)}" for (a, b), where in sorted(bad.items())
    )


def test_known_exceptions_still_needed() -> None:
    graph = package_graph()
    stale = [edge for edge in KNOWN_EXCEPTIONS if edge[1] not in graph.get(edge[0], {})]
    assert not stale, f"no longer needed, remove from KNOWN_EXCEPTIONS: {stale}"


def test_imports_are_seen() -> None:
    """The parser sees function-level and relative imports (a guard against a blind test)."""
    graph = package_graph()
    assert "store" in graph["protocol"]
    assert "protocol" in graph["daemon"]
