"""The package's import graph, read from the source (ast): every `import` of a mesp_mlx module, at the top of a file
or inside a function, as an edge from the importing module.

    python tools/import_graph.py            floors (modules grouped by the longest import chain below them), cycles,
                                            and the imports made inside functions
    python tools/import_graph.py --root X   the same for another checkout's package folder

A floor is a module's height in the graph: floor 0 imports no other mesp_mlx module; a module on floor n imports one
on floor n - 1 and none higher. Modules in an import circle share one node (reported under "cycles").
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = "mesp_mlx"


def module_names(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under the package folder `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _targets(module: str, is_package: bool, node, names: dict) -> list[str]:
    """The package modules an import statement loads (`from . import x` names module x, not only the package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in names]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in names]
    if node.module is None and len(submodules) == len(node.names):
        return submodules
    return [t for t in [target, *submodules] if t in names]


def read_graph(root: Path) -> tuple[dict[str, set], list[tuple[str, int, str]]]:
    """(edges {module: modules it imports}, [(module, line, statement)] of imports made inside functions)."""
    names = module_names(root)
    edges, inner = {m: set() for m in names}, []
    for module, path in names.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    inner.append((module, node.lineno, ast.unparse(node)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[module].update(t for t in _targets(module, is_package, node, names) if t != module)
    return edges, sorted(set(inner))


def cycles(edges: dict[str, set]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def package_edges(edges: dict[str, set]) -> dict[str, set]:
    """The same graph between the package's first-level parts (mesp_mlx.run, mesp_mlx.plan, mesp_mlx.cli, ...)."""
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    out: dict[str, set] = {}
    for module, targets in edges.items():
        out.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    return out


def floors(edges: dict[str, set]) -> dict[str, int]:
    """Each module's floor; the modules of one cycle are taken as one node."""
    node_of = {m: m for m in edges}
    for component in cycles(edges):
        for m in component:
            node_of[m] = " <-> ".join(component)
    height: dict[str, int] = {}

    def floor_of(node: str, seen: frozenset) -> int:
        if node not in height:
            members = [m for m in edges if node_of[m] == node]
            below = {node_of[t] for m in members for t in edges[m]} - {node} - seen
            height[node] = 1 + max((floor_of(b, seen | {node}) for b in below), default=-1)
        return height[node]

    return {node: floor_of(node, frozenset()) for node in set(node_of.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / PACKAGE))
    args = parser.parse_args()
    edges, inner = read_graph(Path(args.root))
    by_floor: dict[int, list[str]] = {}
    for node, floor in floors(edges).items():
        by_floor.setdefault(floor, []).append(node)
    print(f"{len(edges)} modules, {len(by_floor)} floors")
    for floor in sorted(by_floor):
        print(f"  floor {floor:2d}: {', '.join(sorted(by_floor[floor]))}")
    print(f"cycles between modules: {cycles(edges) or 'none'}")
    print(f"cycles between the package's parts: {cycles(package_edges(edges)) or 'none'}")
    print(f"imports inside functions: {len(inner)}")
    for module, line, statement in inner:
        print(f"  {module}:{line}: {statement}")


if __name__ == "__main__":
    main()
