"""Import graph of hf_hetermoe and model_patches, read with `ast`, and its cycles.

Every import counts, also those inside functions (they only postpone a cycle, they do not remove it); imports
under `if TYPE_CHECKING:` do not (they never run). Relative imports are resolved; `from pkg import name`
counts as an import of `pkg.name` when that is a module, else of `pkg`. A package's `__init__` is not counted
as imported by its submodules (Python does import it, but a lazy `__init__` imports nothing back).

    python benchmarks/import_graph.py            # cycles (exit status 1 if any), as chains of modules
    python benchmarks/import_graph.py --edges    # also every internal import edge, with file and line
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hf_hetermoe", "model_patches")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes that run (anywhere in the file, also in functions), skipping `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def edges(root: Path = ROOT) -> dict[str, dict[str, list[int]]]:
    """module -> {imported internal module: [line numbers]}."""
    known = modules(root)
    graph: dict[str, dict[str, list[int]]] = {name: {} for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.append(sub if sub in known else base)
            for target in targets:
                while target and target not in known:  # `import a.b.c` of a non-module: the nearest module
                    target = target.rpartition(".")[0]
                lines = graph[name].setdefault(target, []) if target and target != name else None
                if lines is not None and node.lineno not in lines:
                    lines.append(node.lineno)
    return graph


def components(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan): each holds at least one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth is bounded by the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """One closed chain of modules per strongly connected component."""
    return [_chain(graph, set(c)) for c in components(graph)]


def _chain(graph: dict[str, dict[str, list[int]]], component: set[str]) -> list[str]:
    """A shortest closed path inside one strongly connected component (breadth-first from its first module)."""
    start = min(component)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return list(reversed(path)) + [start]
                if w in component and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print every internal import edge")
    args = parser.parse_args(argv)
    graph = edges()
    if args.edges:
        for name in sorted(graph):
            for target, lines in sorted(graph[name].items()):
                print(f"{name} -> {target}  (line {', '.join(map(str, lines))})")
    found = components(graph)
    files = modules()
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} internal import edges, "
          f"{len(found)} group(s) of modules in import cycles")
    for component in found:
        print("cycle: " + " -> ".join(_chain(graph, set(component))))
        print("  edges among " + ", ".join(component) + ":")
        for a in component:
            for b in sorted(set(graph[a]) & set(component)):
                print(f"    {a} -> {b}: {files[a].relative_to(ROOT)} line {', '.join(map(str, graph[a][b]))}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
