"""Dependencies run one way: the import graph of fxpipe, passes and cost_models, read from the source, is acyclic.

Every import counts, at module level or inside a function (a lazy import is still a dependency);
imports under ``if TYPE_CHECKING:`` do not, as they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fxpipe": ROOT / "fxpipe", "fxpipe.passes": ROOT / "passes", "fxpipe.cost_models": ROOT / "cost_models"}

def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def _imported(tree: ast.Module, name: str, is_package: bool) -> list[str]:
    """Every module name ``tree`` imports (``from a import b``: ``a.b`` where that is a module, else ``a``)."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name if is_package else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    here = here.rsplit(".", 1)[0]
                base = f"{here}.{base}" if base else here
            found += [f"{base}.{a.name}" for a in node.names] + [base]
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of these packages it imports."""
    mods = _modules()
    graph = {}
    for name, f in mods.items():
        tree = ast.parse(f.read_text(), filename=str(f))
        deps = set()
        for target in _imported(tree, name, f.name == "__init__.py"):
            if target in mods and target != name:
                deps.add(target)
        # ``from fxpipe import api`` names the submodule, not the package: drop the package when a submodule matched
        graph[name] = {d for d in deps if not any(o.startswith(d + ".") for o in deps) or d not in PACKAGES}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_cycle_finder_on_made_up_graphs():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b"], ["c", "d"]]


def test_the_graph_is_read_from_the_source():
    g = import_graph()
    assert {"fxpipe.api", "fxpipe.passes.partition", "fxpipe.cost_models.evaluator", "fxpipe.runtime.stage"} <= set(g)
    assert {"fxpipe.options", "fxpipe.planning", "fxpipe.frontend"} <= g["fxpipe.api"]
    assert "fxpipe.pipeline" in g["fxpipe.api"]                  # a function-level import counts
    assert "fxpipe.ir" in g["fxpipe.report"] and "fxpipe.report" not in g["fxpipe.ir"]
    assert "fxpipe.pipeline" not in g["fxpipe.calibrate"]        # only under TYPE_CHECKING there


def test_no_import_cycle():
    g = import_graph()
    found = cycles(g)
    assert found == [], "import cycles (break one edge of each; move what both sides share down): " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {b}" for a in c for b in sorted(g[a]) if b in c) + ")"
        for c in found)
