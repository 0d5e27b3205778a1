"""The import rules of docs/design.md ("Layers"), enforced: every `autosplit` import, at module
level or inside a function, goes down the layer table or sideways inside one package; no cycle;
the plan and the planner import no model or execution code; the cache and loader no adapter,
trainer or CLI; nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "autosplit"

#: module (or package prefix) -> layer; a module may import only from lower layers, or from its
#: own package at the same layer (docs/design.md draws the same table)
LAYERS = {
    "autosplit.errors": 0,
    "autosplit.config": 1,
    "autosplit.graph": 1,
    "autosplit.data": 1,
    "autosplit.plan": 2,
    "autosplit.storage": 3,
    "autosplit.adapters": 3,
    "autosplit.tasks": 4,
    "autosplit.planning": 4,
    "autosplit.training": 5,
    "autosplit.workflow": 6,
    "autosplit.cli": 7,
    "autosplit.__main__": 8,
    #: the package facade: `__version__`, and `run` / `load_config` imported on attribute access
    "autosplit": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    """The LAYERS entry a module belongs to: its longest listed prefix."""
    candidates = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    assert candidates, f"{module} is in no layer of tests/test_layers.py; add it there and to docs/design.md"
    return max(candidates, key=len)


def imports_of(path: Path) -> set[str]:
    """Every autosplit module `path` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("autosplit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autosplit"):
            for alias in node.names:  # `from autosplit.adapters import tiny` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").is_file() else node.module)
    return found


GRAPH = {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in GRAPH:
        group(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    mine = group(module)
    for target in GRAPH[module] - {module}:
        theirs = group(target)
        if theirs == "autosplit":  # the package itself: its version
            continue
        same_package = theirs == mine
        assert LAYERS[theirs] < LAYERS[mine] or same_package, (
            f"{module} (layer {LAYERS[mine]}, {mine}) imports {target} (layer {LAYERS[theirs]}, {theirs})"
        )


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target == module or target not in GRAPH or target == "autosplit":
                continue  # importing the facade for __version__ runs none of its lazy imports
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target) :] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


def _reaches(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for target in GRAPH.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("module", [m for m in GRAPH if m == "autosplit.plan" or m.startswith("autosplit.planning")])
def test_the_plan_imports_no_model_or_execution_code(module):
    banned = (
        "autosplit.adapters",
        "autosplit.training",
        "autosplit.workflow",
        "autosplit.tasks",
        "autosplit.storage",
        "autosplit.cli",
    )
    assert not [m for m in _reaches(module) if m.startswith(banned)]


def test_importing_the_plan_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, autosplit.plan; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_the_plan_is_data():
    tree = ast.parse((ROOT / "plan.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {
        "__future__",
        "json",
        "dataclasses",
        "pathlib",
        "typing",
        "autosplit.errors",
        "autosplit.graph",
    }, imported


@pytest.mark.parametrize("module", [m for m in GRAPH if m.startswith("autosplit.storage")])
def test_cache_and_loader_import_no_adapter_trainer_or_cli(module):
    banned = ("autosplit.adapters", "autosplit.training", "autosplit.workflow", "autosplit.cli", "autosplit.tasks")
    assert not [m for m in _reaches(module) if m.startswith(banned)]


def test_nothing_imports_the_cli():
    assert [m for m, targets in GRAPH.items() if "autosplit.cli" in targets] == ["autosplit.__main__"]


def test_the_rules_see_imports_inside_functions():
    # the lazy import in cli.run_command is found: a rule that missed it could not fail
    assert "autosplit.workflow.run" in GRAPH["autosplit.cli"]
