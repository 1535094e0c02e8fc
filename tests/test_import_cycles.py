"""No import cycles among tokenprune's modules: an `ast` reading of every import, at module level or inside a function
(both run sooner or later); imports under ``if TYPE_CHECKING:`` never run and do not count.

An import of ``pkg.mod`` is an edge to that module; ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg`` (its ``__init__``). Cycles are reported per strongly connected component, with every import
inside it (file and line), so a reader sees which import to move.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tokenprune"
PACKAGE = ROOT.name


def _module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node that runs: all of them except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports_in(child)
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        found.append(sub if sub in known else source)
    return found


def import_graph() -> dict[str, dict[str, list[str]]]:
    """{module: {imported module: ["file:line", ...]}} over tokenprune's own modules."""
    names = _module_names()
    known = set(names)
    graph: dict[str, dict[str, list[str]]] = {name: {} for name in names}
    for name, path in names.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree):
            for target in _targets(name, path.name == "__init__.py", node, known):
                # `import tokenprune.a.b` runs tokenprune.a.b; anything outside the package is not ours to check
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in known and target != name:
                    where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                    lines = graph[name].setdefault(target, [])
                    if where not in lines:
                        lines.append(where)
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as its sorted internal imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    short = lambda m: m.removeprefix(f"{PACKAGE}.")  # noqa: E731
    return sorted(
        sorted(f"{short(a)} -> {short(b)}" for a in component for b in graph[a] if b in component)
        for component in components
    )


def _describe(found: list[list[str]], graph) -> str:
    lines = []
    for edges in found:
        lines.append("cycle among: " + ", ".join(sorted({m for e in edges for m in e.split(" -> ")})))
        for edge in edges:
            a, b = (f"{PACKAGE}.{m}" if m != PACKAGE else m for m in edge.split(" -> "))
            lines.append(f"  {edge}  ({', '.join(graph[a][b])})")
    return "\n".join(lines)


def test_the_checker_finds_a_cycle_and_ignores_type_checking_imports(tmp_path, monkeypatch):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")  # a function-level import counts
    (pkg / "c.py").write_text("import tokenprune.a\nimport torch\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import y\n")
    (pkg / "e.py").write_text("from . import d\n")
    monkeypatch.setattr(f"{__name__}.ROOT", pkg)
    assert cycles(import_graph()) == [["a -> sub.b", "c -> a", "sub.b -> c"]]


_graph = import_graph()
_found = cycles(_graph)


def test_no_import_cycles():
    assert not _found, "import cycles in tokenprune/:\n" + _describe(_found, _graph)
