"""The package's shape: no import cycle, internal imports at the top of each file, the public API importable.

scripts/imports.py draws the same graph (Mermaid) for docs/DESIGN.md.
"""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
imports = runpy.run_path(str(ROOT / "scripts" / "imports.py"))

# Files allowed to import package modules inside functions: the CLI (each subcommand imports what it needs, so
# `loraforge --help` starts fast) and the package root (PEP 562 lazy names).
LAZY_ALLOWED = {"loraforge.cli", "loraforge"}


def test_no_import_cycle():
    assert imports["cycles"](imports["graph"]()) == []


def test_the_cycle_check_finds_a_cycle():
    assert imports["cycles"]({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_go_down_the_layers_of_the_design():
    """docs/DESIGN.md's layout table places every module in a layer; a module imports only its own layer and
    those below (lora/merge.py loading a base imported models.py from the layer above it: models moved down)."""
    assert imports["upward"](imports["graph"](), imports["layers"]()) == []


def test_design_shows_the_current_import_graph():
    """docs/DESIGN.md's Mermaid graph is what scripts/imports.py prints now (six edges had gone missing)."""
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    assert f"```mermaid\n{imports['mermaid'](imports['graph']())}\n```" in design, (
        "docs/DESIGN.md's import graph is stale: paste the output of python scripts/imports.py into it")


def test_the_layer_check_finds_an_upward_import_and_a_module_left_out():
    edges = {"loraforge.lora.merge": {"loraforge.models"}, "loraforge.models": set(), "loraforge.new": set()}
    assert imports["upward"](edges, {"loraforge.lora": 2, "loraforge.models": 3}) == [
        "loraforge.new: not in the layer table", "loraforge.lora.merge (layer 2) imports loraforge.models (layer 3)"]


def test_package_imports_at_top_of_each_file():
    package = imports["PACKAGE"]
    hidden = []
    for path in sorted(package.rglob("*.py")):
        name = imports["module_name"](path)
        if name in LAZY_ALLOWED:
            continue
        hidden += [f"{path.relative_to(ROOT)}:{line} imports {target}"
                   for target, line, top in imports["imports"](path) if not top]
    assert hidden == []


def test_every_module_imports():
    """Every module imports in a fresh interpreter, leaves first (so none relies on another having run first)."""
    names = [n for n in sorted(imports["graph"](), reverse=True) if not n.endswith("__main__")]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-800:]


def test_public_api():
    import loraforge

    assert len(loraforge.__all__) >= 20
    for name in loraforge.__all__:
        assert getattr(loraforge, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        loraforge.nope  # noqa: B018


def test_import_loraforge_is_light():
    """`import loraforge` (what the CLI entry point does first) loads neither torch nor transformers."""
    code = "import sys, loraforge; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]
