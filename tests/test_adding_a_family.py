"""docs/adding-a-family.md stays true: a family is one adapter module (its line count as the doc's
table says), one registry line and one tester config, and nothing outside `autosplit/adapters`
imports a family module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from autosplit.adapters.base import _REGISTRY

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "adding-a-family.md"


def documented_modules() -> dict[str, int]:
    rows = re.findall(r"^\| `(autosplit/adapters/\w+\.py)` \| [^|]+ \| (\d+) \|$", DOC.read_text(), flags=re.M)
    return {path: int(lines) for path, lines in rows}


def test_the_table_lists_every_family_module_with_its_line_count():
    table = documented_modules()
    registered = {
        "autosplit/adapters/" + target.split(":")[0].rsplit(".", 1)[1] + ".py" for target in _REGISTRY.values()
    }
    assert set(table) == registered
    for path, lines in table.items():
        assert len((REPO / path).read_text().splitlines()) == lines, f"{path}: update docs/adding-a-family.md"


def test_every_family_has_one_tester_config():
    testers = "\n".join(p.read_text() for p in (REPO / "tests" / "adapters").glob("test_*.py"))
    for name in _REGISTRY:
        assert re.search(rf'Tester\(\s*pipeline="{name}"', testers), f"no tests/adapters tester config for {name}"


def test_no_module_outside_adapters_imports_a_family():
    families = {"autosplit.adapters." + target.split(":")[0].rsplit(".", 1)[1] for target in _REGISTRY.values()}
    for path in (REPO / "autosplit").rglob("*.py"):
        if "adapters" in path.relative_to(REPO / "autosplit").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            assert not names & families, f"{path} imports {names & families}: go through the registry"
