"""The import rules of ARCHITECTURE.md, read from the source (ast): core/ imports nothing of facecore
above it but ``facecore.errors``, and facecore's modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "facecore"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module_level_only: bool) -> list[tuple[str, int]]:
    """(absolute facecore module, line) of each import of ``path``; ``from x import y`` counts x.y when y is a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # imports under module-level try/if run at import time too
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef,
                 ast.AsyncFunctionDef, ast.ClassDef)) or n is top]
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "facecore"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "facecore":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").is_file()
                out.append((sub if is_module else target, node.lineno))
    return out


def test_core_imports_only_core_and_errors():
    bad = []
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for target, line in _imports(path, module_level_only=False):
            if not (target.startswith("facecore.core") or target == "facecore.errors"):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not bad, "core/ may import only core/ and facecore.errors:\n" + "\n".join(bad)


def test_no_import_cycle_at_module_level():
    graph = {_module(p): {t for t, _ in _imports(p, module_level_only=True)} for p in PACKAGE.rglob("*.py")}
    graph = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_relative_imports():
    found = dict(_imports(PACKAGE / "core" / "build.py", module_level_only=True))
    assert "facecore.core.plugins" in found and "facecore.errors" in found
