"""The shape of the code: import circles, the longest modules and functions, who imports torch.

    python tools/layout.py            # a report of bench/ and models/
    python tools/layout.py --json     # the same as JSON

Reads the sources with ``ast`` (imports nothing it measures), so it runs anywhere. An import
counts wherever it stands, at the top of a module or inside a function: a function-level import
is still a dependency, and two modules that import each other that way are still a circle.
tests/test_layout.py holds the project to what this reports.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "models")


@dataclass
class Module:
    name: str  # dotted: bench.run.sweep
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)  # project modules it imports
    torch_top: bool = False  # imports torch at module level
    torch_lazy: bool = False  # imports torch inside a function
    functions: list[tuple[str, int]] = field(default_factory=list)  # (qualified name, lines)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def scan(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Module]:
    """Every module of ``packages`` under ``root`` with its project imports and sizes."""
    found: dict[str, Module] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = _module_name(path, root)
            source = path.read_text(encoding="utf-8")
            found[name] = Module(name, path, len(source.splitlines()))
            found[name].tree = ast.parse(source)  # type: ignore[attr-defined]
    names = set(found)
    for name, module in found.items():
        tree = module.tree  # type: ignore[attr-defined]
        is_package = module.path.name == "__init__.py"
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, is_package)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                if target == "torch" or target.startswith("torch."):
                    if id(node) in top_level:
                        module.torch_top = True
                    else:
                        module.torch_lazy = True
                # The longest project module the name denotes: a submodule or its package.
                parts = target.split(".")
                for end in range(len(parts), 0, -1):
                    candidate = ".".join(parts[:end])
                    if candidate in names and candidate != name:
                        module.imports.add(candidate)
                        break
        module.functions = sorted(_functions(tree), key=lambda f: -f[1])
    return found


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out.append((prefix + node.name, node.end_lineno - node.lineno + 1))
            out += _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, f"{prefix}{node.name}.")
    return out


def circles(found: dict[str, Module]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan),
    a package's import of its own submodules left out (that is how packages re-export)."""
    graph = {n: {t for t in m.imports if not t.startswith(n + ".")} for n, m in found.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(max(1000, 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(result)


def report(found: dict[str, Module], top: int = 10) -> dict[str, object]:
    modules = sorted(found.values(), key=lambda m: -m.lines)
    functions = sorted(((f"{m.name}:{f}", n) for m in found.values() for f, n in m.functions),
                       key=lambda item: -item[1])
    return {
        "modules": len(found),
        "circles": circles(found),
        "longest_modules": [(m.name, m.lines) for m in modules[:top]],
        "longest_functions": functions[:top],
        "torch_at_top": sorted(m.name for m in found.values() if m.torch_top),
        "torch_lazy": sorted(m.name for m in found.values() if m.torch_lazy and not m.torch_top),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--top", type=int, default=10, help="how many of the longest to list")
    args = parser.parse_args(argv)
    result = report(scan(), args.top)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['modules']} modules in {', '.join(PACKAGES)}")
    print(f"\nimport circles: {len(result['circles'])}")
    for circle in result["circles"]:
        print("  " + " <-> ".join(circle))
    print("\nlongest modules (lines):")
    for name, lines in result["longest_modules"]:
        print(f"  {lines:5d}  {name}")
    print("\nlongest functions (lines):")
    for name, lines in result["longest_functions"]:
        print(f"  {lines:5d}  {name}")
    print("\nimport torch at module level: " + ", ".join(result["torch_at_top"]))
    print("import torch inside functions only: " + ", ".join(result["torch_lazy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
