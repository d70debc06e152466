"""The package layering rule, checked on the source: components never import the flows (``recipes``) or the CLI,
and flows never import the CLI. Lazy imports inside functions count too. Before, ``defenses/crow.py`` imported
``recipes/stage.py``, so ``defenses`` and ``recipes`` imported each other."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "crowguard"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "crowguard" or n.startswith("crowguard.")}


def _module(path: Path) -> str:
    return ".".join(("crowguard", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def test_no_module_imports_a_layer_above_it():
    modules = {_module(p): _imports(p) for p in SRC.rglob("*.py")}
    assert "crowguard.defenses.crow" in modules and "crowguard.stage" in modules
    upward = []
    for module, imports in sorted(modules.items()):
        if module == "crowguard.cli" or module.startswith("crowguard.cli_"):  # the CLI and its own parts
            continue
        in_recipes = module.startswith("crowguard.recipes")
        for name in sorted(imports):
            if (
                name == "crowguard.cli"
                or name.startswith(("crowguard.cli.", "crowguard.cli_"))
                or (not in_recipes and name.startswith("crowguard.recipes"))
            ):
                upward.append(f"{module} imports {name}")
    assert not upward, "\n".join(upward)


def _import_time(path: Path) -> set[str]:
    """The crowguard modules ``path`` imports when it is itself imported: module-level imports, not those inside
    functions or under ``if TYPE_CHECKING``."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names.update(alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names.add(sub.module)
                names.update(f"{sub.module}.{alias.name}" for alias in sub.names)
    return {n for n in names if n.startswith("crowguard.")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle():
    """No chain of import-time imports leads back to where it started (a cycle works only by the accident of which
    module is imported first). The checker finds a planted one."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph = {m: {n for n in _import_time(p) if n in modules and n != m} for m, p in modules.items()}
    assert "crowguard.schemas" in graph["crowguard.recipes.study"]  # the graph sees real imports
    assert not _cycles(graph), "\n".join(" -> ".join(c) for c in _cycles(graph))
    planted = {**graph, "crowguard.types": graph["crowguard.types"] | {"crowguard.recipes.study"}}
    assert any("crowguard.types" in c for c in _cycles(planted))
