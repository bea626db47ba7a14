"""The package's floors: imports run one way, from a higher package to a lower one, and never in a cycle.

The import graph is read from the source (ast), lazy imports inside functions included.
`edgequant/__init__.py` (the public facade) and `__main__.py` may import anything;
no module inside the floors may import the facade.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .helpers import ROOT

# Lowest first. A module may import from its own package and from packages before it.
FLOORS = ("core", "numerics", "graph", "export", "wrappers", "surgery", "diagnose", "demo", "cli")
FACADE = ("edgequant", "edgequant.__main__")


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module name -> the edgequant modules it imports (absolute names)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        here = name.split(".") if parts[-1] == "__init__" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                if not base.startswith("edgequant"):
                    continue
                for alias in node.names:  # `from . import x` may name a module
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if _is_module(package, sub) else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("edgequant"))
        graph[name] = deps - {name}
    return graph


def _is_module(package: Path, name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (package / rel).with_suffix(".py").exists() or (package / rel / "__init__.py").exists()


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def violations(package: Path) -> list[str]:
    """Each import that goes up a floor, reaches the facade, or closes a cycle; and modules on no floor."""
    graph = import_graph(package)
    found = []
    for module, deps in sorted(graph.items()):
        if module in FACADE:
            continue
        level = floor(module)
        if level is None:
            found.append(f"{module} is on no floor (expected a package among {', '.join(FLOORS)})")
            continue
        for dep in sorted(deps):
            if dep in FACADE:
                found.append(f"{module} imports the facade {dep}")
            elif (dep_level := floor(dep)) is not None and dep_level > level:
                found.append(f"{module} ({FLOORS[level]}) imports {dep} ({FLOORS[dep_level]}), a higher floor")
    inner = {m: deps - set(FACADE) for m, deps in graph.items() if m not in FACADE}  # the facade is reported above
    found.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(inner))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            group.append(v)
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [[*group, group[0]] for group in groups]


def test_imports_run_down_the_floors_without_cycles() -> None:
    problems = violations(ROOT / "src" / "edgequant")
    assert not problems, "\n".join(problems)


def test_the_check_finds_an_upward_import_a_cycle_and_a_stray_module(tmp_path: Path) -> None:
    package = tmp_path / "edgequant"
    for sub in ("core", "graph", "export"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from .graph import a\n")
    (package / "core" / "errors.py").write_text("")
    (package / "graph" / "a.py").write_text("from ..export.b import thing\nfrom ..core import errors\n")
    (package / "export" / "b.py").write_text("def f():\n    from . import c\n")
    (package / "export" / "c.py").write_text("from .b import f\nimport edgequant\n")
    (package / "flat.py").write_text("")
    assert violations(package) == [
        "edgequant.export.c imports the facade edgequant",
        "edgequant.flat is on no floor (expected a package among core, numerics, graph, export, wrappers, surgery, "
        "diagnose, "
        "demo, cli)",
        "edgequant.graph.a (graph) imports edgequant.export.b (export), a higher floor",
        "import cycle: edgequant.export.b -> edgequant.export.c -> edgequant.export.b",
    ]
