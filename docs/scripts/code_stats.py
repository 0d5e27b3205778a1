"""Numbers for a layout review: modules, import cycles (lazy imports counted), the longest
functions, lines of cli.py. `python docs/scripts/code_stats.py [PACKAGE_DIR]` (default: autosplit/)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found |= {n for n in names if n in modules}
    return found - {module_name(root, path)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(root: Path) -> None:
    files = sorted(p for p in root.rglob("*.py"))
    modules = {module_name(root, p) for p in files}
    graph = {module_name(root, p): imports(root, p, modules) - {root.name} for p in files}
    functions = []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{module_name(root, p)}.{node.name}"))
    functions.sort(reverse=True)
    print(f"modules: {len(files)}")
    print(f"import cycles: {len(cycles(graph))} {cycles(graph)}")
    print("longest functions: " + ", ".join(f"{name} {n}" for n, name in functions[:5]))
    print(f"cli.py lines: {len((root / 'cli.py').read_text().splitlines())}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "autosplit"))
