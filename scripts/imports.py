"""The package's import graph: every `loraforge` import, at the top of a file or inside a function.

    python scripts/imports.py            # Mermaid graph of the subpackages and modules (paste into docs or GitHub)
    python scripts/imports.py --cycles   # the import cycles, if any (exit status 1)

tests/test_architecture.py runs the same checks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loraforge"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported loraforge module, line, at top level?) for each internal import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    type_only = {id(n) for block in tree.body if _is_type_checking(block) for n in ast.walk(block)}
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:  # `if TYPE_CHECKING:` imports exist for annotations, never at run time
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if not base.startswith("loraforge"):
                continue
            for alias in node.names:  # `from loraforge.training import data` names a module
                sub = f"{base}.{alias.name}"
                target = sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else base
                found.append((target, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("loraforge"):
                    found.append((alias.name, node.lineno, id(node) in top))
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        edges.setdefault(src, set())
        for target, _, _ in imports(path):
            if target != src:
                edges[src].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def mermaid(edges: dict[str, set[str]]) -> str:
    """A left-to-right Mermaid flowchart, one box per module, grouped by subpackage; __init__ re-exports left out."""
    def node(m):
        return m.replace(".", "_")

    lines = ["flowchart LR"]
    groups: dict[str, list[str]] = {}
    for m in edges:
        parts = m.split(".")
        groups.setdefault(parts[1] if len(parts) > 2 else "", []).append(m)
    for group, members in sorted(groups.items()):
        if group:
            lines.append(f"  subgraph {group}")
        for m in sorted(members):
            lines.append(f"    {node(m)}[{m.removeprefix('loraforge.')}]")
        if group:
            lines.append("  end")
    for src in sorted(edges):
        if src == "loraforge" or src.endswith("__main__"):
            continue
        for dst in sorted(edges[src]):
            if dst in edges and dst != "loraforge":
                lines.append(f"  {node(src)} --> {node(dst)}")
    return "\n".join(lines)


if __name__ == "__main__":
    g = graph()
    if "--cycles" in sys.argv:
        found = cycles(g)
        for c in found:
            print("cycle:", " <-> ".join(c))
        sys.exit(1 if found else 0)
    print(mermaid(g))
