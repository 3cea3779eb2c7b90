"""What `pip install loraforge` gives a user: the version, dependency bounds that work, a complete sdist."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
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
    # the tests' (test extra): from 0.132 a body sent without a Content-Type is not read as JSON, which
    # test_serve_api expects refused; 0.110-0.131 read it (serving works: `serve` keeps fastapi>=0.110)
    "fastapi": "0.132",
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


def test_the_sdist_holds_every_tracked_file(tmp_path):
    """Soak: the sdist held 12 of tests/' files (setuptools' default, test*.py at the top) without conftest.py,
    helpers.py or the subfolders, and none of bench/, scripts/, examples/, docs/ that the tests read: its tests
    could not run. MANIFEST.in now grafts them; only CI's own files stay out."""
    pytest.importorskip("setuptools")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    tracked = set(listed.stdout.splitlines())
    src = tmp_path / "src"
    for name in tracked:  # a copy: building writes loraforge.egg-info next to the sources
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    script = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    built = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=src, capture_output=True, text=True,
                           timeout=120, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    with tarfile.open(tmp_path / built.stdout.split()[-1]) as sdist:
        shipped = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        info = sdist.extractfile(next(n for n in sdist.getnames() if n.endswith("/PKG-INFO"))).read().decode()
    assert tracked - shipped == {".ci/run", ".gitignore"}
    # the package page's text (soak: the METADATA had no description, a PyPI page would be blank): the README
    headers, _, description = info.partition("\n\n")
    assert "Description-Content-Type: text/markdown" in headers
    assert description.strip() == (ROOT / "README.md").read_text(encoding="utf-8").strip()
