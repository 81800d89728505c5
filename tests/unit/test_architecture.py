"""The dependency rules of the README's architecture section, checked on the source (imports inside functions
count too): each package imports only the packages below it, and no two packages import each other, directly
or in a ring."""

from __future__ import annotations

import ast
from pathlib import Path

import imgtune

SOURCE = Path(imgtune.__file__).parent

FOUNDATION = {"core", "config", "storage"}
BELOW_TRAINING = FOUNDATION | {"data", "models"}
# package -> the imgtune packages it may import ("imgtune" is the package root, the public API)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "config": {"core"},
    "storage": {"core", "config"},
    "rules": {"core"},
    "data": FOUNDATION,
    "models": FOUNDATION | {"data"},
    "training": BELOW_TRAINING,
    "debugger": BELOW_TRAINING | {"training", "rules"},
    "profiler": BELOW_TRAINING | {"training", "rules"},
    "report": BELOW_TRAINING | {"training", "rules", "debugger", "profiler"},  # reads what they stored
    "tracking": BELOW_TRAINING | {"training", "debugger", "profiler", "serving"},  # sends on what they stored
    "serving": BELOW_TRAINING,
    "tuning": BELOW_TRAINING | {"training"},
    "runs": BELOW_TRAINING | {"training", "rules", "debugger", "profiler", "report", "serving", "tuning", "tracking"},
    "cli": {"imgtune", "core", "config", "runs"},
    "__main__": {"cli"},
    "__init__": {"core"},
}


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "imgtune":
        return ""
    if len(parts) == 1 or not ((SOURCE / parts[1]).is_dir() or (SOURCE / f"{parts[1]}.py").is_file()):
        return "imgtune"  # the package root, or a name it exports (`from imgtune import train`)
    return parts[1]


def import_graph() -> dict[str, set[str]]:
    """package -> the other imgtune packages its modules import."""
    edges: dict[str, set[str]] = {}
    for file in SOURCE.rglob("*.py"):
        module_parts = file.relative_to(SOURCE.parent).with_suffix("").parts
        me = package_of(".".join(module_parts))
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this file's package
                    base = list(module_parts[:-1])[: len(module_parts) - node.level]
                    names = [".".join(base + ([node.module] if node.module else []))]
                elif node.module == "imgtune":  # `from imgtune import rules`: the subpackage, if it is one
                    names = [f"imgtune.{alias.name}" for alias in node.names]
                else:
                    names = [node.module or ""]
            else:
                continue
            for name in names:
                other = package_of(name)
                if other and other != me:
                    edges.setdefault(me, set()).add(other)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Rings of packages (strongly connected components with more than one package)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            ring = []
            while True:
                member = stack.pop()
                ring.append(member)
                if member == node:
                    break
            if len(ring) > 1:
                found.append(sorted(ring))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def test_every_package_has_a_place_in_the_layers():
    packages = {package_of(f"imgtune.{p.relative_to(SOURCE).with_suffix('').parts[0]}") for p in SOURCE.glob("*")}
    packages -= {"__pycache__", "py.typed"}
    assert packages - set(ALLOWED) == set(), "add the new package to ALLOWED here and to the README's architecture"


def test_packages_import_only_the_layers_below_them():
    wrong = {
        package: sorted(imported - ALLOWED.get(package, set()))
        for package, imported in import_graph().items()
        if imported - ALLOWED.get(package, set())
    }
    assert wrong == {}


def test_no_two_packages_import_each_other():
    assert cycles(import_graph()) == []


def test_the_checks_catch_a_forbidden_import_and_a_ring():
    graph = import_graph()
    graph["training"] = graph.get("training", set()) | {"debugger"}
    assert "debugger" in graph["training"] - ALLOWED["training"]
    assert cycles(graph) == [sorted(cycles(graph)[0])] and "training" in cycles(graph)[0]
