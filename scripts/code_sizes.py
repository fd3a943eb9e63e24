"""Lines per module and the longest classes and functions of the product packages.

Usage: ``python scripts/code_sizes.py [--top N] [PATH ...]`` (default: engine, loader_adapter,
bench). Counts source lines from a definition's first line to its last, docstrings included.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def definitions(path: Path) -> list[tuple[int, str, str]]:
    """(lines, kind, qualified name) of every class and function in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str, str]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                kind = "class" if isinstance(child, ast.ClassDef) else "def"
                name = f"{prefix}{child.name}"
                out.append((child.end_lineno - child.lineno + 1, kind, f"{path}:{name}"))
                walk(child, name + ".")

    walk(tree, "")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", default=["engine", "loader_adapter", "bench"])
    p.add_argument("--top", type=int, default=12, help="how many of each to list (default 12)")
    a = p.parse_args()
    files = sorted(f for d in a.paths for f in Path(d).rglob("*.py"))
    sizes = sorted(((len(f.read_text().splitlines()), str(f)) for f in files), reverse=True)
    print(f"{sum(n for n, _ in sizes)} lines in {len(sizes)} modules; the longest:")
    for n, f in sizes[: a.top]:
        print(f"  {n:5d}  {f}")
    defs = [d for f in files for d in definitions(f)]
    for kind in ("class", "def"):
        print(f"longest {'classes' if kind == 'class' else 'functions'}:")
        for n, _, name in sorted((d for d in defs if d[1] == kind), reverse=True)[: a.top]:
            print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
