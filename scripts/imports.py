"""The package's import graph: every `loraforge` import, at the top of a file or inside a function.

    python scripts/imports.py            # Mermaid graph of the subpackages and modules (paste into docs or GitHub)
    python scripts/imports.py --cycles   # the import cycles, if any (exit status 1)
    python scripts/imports.py --layers   # imports that go up docs/DESIGN.md's layer table, or modules not in it

tests/test_architecture.py runs the same checks.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loraforge"
DESIGN = PACKAGE.parent / "docs" / "DESIGN.md"


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


def layers(design: Path = DESIGN) -> dict[str, int]:
    """module (or folder, as `export/`) -> its layer, from the layout table: rows `| N name | `file`, ... | ... |`,
    a row without N in the layer above it; a bare file name after `serve/x.py` is in serve/ too."""
    found, layer = {}, None
    for line in design.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) < 3:
            continue
        number = re.match(r"(\d+) ", cells[0])
        layer = int(number.group(1)) if number else layer
        folder = ""
        for name in re.findall(r"`([^`]+)`", cells[1]) if layer is not None else ():
            if "/" in name:
                folder = name[: name.rindex("/") + 1]
            path = name if "/" in name else folder + name
            module = "loraforge." + path.removesuffix(".py").removesuffix("__init__").strip("/").replace("/", ".")
            found[module.rstrip(".")] = layer
    return found


def upward(edges: dict[str, set[str]], layer_of: dict[str, int]) -> list[str]:
    """Imports from a lower layer to a higher one, and modules (not packages) the table does not place."""
    def layer(module):
        parts = module.split(".")
        return next((layer_of[".".join(parts[:i])] for i in range(len(parts), 0, -1)
                     if ".".join(parts[:i]) in layer_of), None)

    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    out = [f"{m}: not in the layer table" for m in sorted(edges) if m not in packages and layer(m) is None]
    for src in sorted(edges):
        for dst in sorted(edges[src]):
            if None not in (layer(src), layer(dst)) and layer(dst) > layer(src):
                out.append(f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})")
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
    if "--layers" in sys.argv:
        found = upward(g, layers())
        print("\n".join(found))
        sys.exit(1 if found else 0)
    print(mermaid(g))
