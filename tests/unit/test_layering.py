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
