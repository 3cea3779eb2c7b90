"""What `pip install loraforge` gives a user: the version, dependency bounds that work, a complete sdist."""

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import loraforge
from loraforge.cli import main

ROOT = Path(__file__).resolve().parents[1]

# The lowest version of each dependency that works, measured (soak, packaging: a fresh venv with the declared lower
# bounds installed, the targeted test files run). A declared bound below it lets pip keep or install one that fails.
WORKS_FROM = {
    # 0.10-0.17.1 write no chat template into an exported GGUF (they read tokenizer_config.json, transformers 5 saves
    # chat_template.jinja: llama.cpp and Ollama then chat with a wrong template), and 0.10.0 imports sentencepiece
    # without requiring it (the built-in model's conversion and `export --to gguf`: a traceback)
    "gguf": "0.18",
    "safetensors": "0.8",  # transformers 5.24 requires it: a lower bound here only reads as if older ones worked
    "peft": "0.21",  # the tests compare with PEFT 0.21's files and merges; 0.17.x does not import with transformers 5
    "openai": "1.55.3",  # older ones pass `proxies` to httpx.Client, which httpx 0.28 removed: every request fails
}


def declared_bounds() -> dict[str, Version]:
    """Each requirement's lower bound (>=) in pyproject.toml, the extras' included."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    bounds = {}
    for line in lines:
        req = Requirement(line)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        bounds[req.name] = max(lower + [bounds.get(req.name, Version("0"))])
    return bounds


def test_every_lower_bound_is_one_that_works():
    """Soak: with the declared lower bounds installed, gguf 0.10.0 ended `export --to gguf` and the built-in model's
    conversion in a sentencepiece traceback, peft 0.17 did not import, openai 1.30 failed every request."""
    bounds = declared_bounds()
    too_low = {name: f">={bounds[name]}, works from {least}" for name, least in WORKS_FROM.items()
               if bounds.get(name, Version("0")) < Version(least)}
    assert too_low == {}


def test_version_is_printed_and_is_the_installed_one(capsys):
    """Soak: `loraforge --version` was "error: the following arguments are required: command" and the package had
    no __version__; pyproject.toml now reads the version from loraforge.__version__."""
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert (e.value.code, capsys.readouterr().out) == (0, f"loraforge {loraforge.__version__}\n")
    assert re.fullmatch(r"\d+\.\d+\.\d+", loraforge.__version__)
    assert importlib.metadata.version("loraforge") == loraforge.__version__

