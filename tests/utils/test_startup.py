"""A signal during the command line's start (its imports) ends it as one later does: one line, 128 + its number."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY = re.search(r'^loraforge = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]  # the `loraforge` script

SIGNALLED_IN_AN_IMPORT = """
import importlib, importlib.abc, os, runpy, signal, sys, time

SIGNAL, AT, START, ENTRY = signal.Signals[sys.argv[1]], sys.argv[2], sys.argv[3], sys.argv[4]


class SignalAt(importlib.abc.MetaPathFinder):
    # the signal comes as AT starts to import, inside a `try: ... except BaseException: pass` as libraries put round
    # their optional imports (soak: one in numpy's import, under torch's, took the exception, and the command ran on)
    def find_spec(self, name, path, target=None):
        if name == AT:
            sys.meta_path.remove(self)
            try:
                os.kill(os.getpid(), SIGNAL)
                time.sleep(30)
            except BaseException:
                pass
        return None


sys.meta_path.insert(0, SignalAt())
sys.argv = ["loraforge", "merge", "--base", "b", "--adapter", "a", "--out", "out"]
if START == "python -m":
    runpy.run_module("loraforge", run_name="__main__", alter_sys=True)
else:  # what pip's `loraforge` script does: from MODULE import FUNCTION; sys.exit(FUNCTION())
    module, function = ENTRY.split(":")
    sys.exit(getattr(importlib.import_module(module), function)())
"""


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # each signal at its default action, as in a terminal (a test run under nohup passes SIGHUP on ignored)
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
                          preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in
                                              (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)])


@pytest.mark.parametrize("start", ["python -m", "script"])
@pytest.mark.parametrize("at", ["loraforge.cli", "torch"])
@pytest.mark.parametrize("signame,code,line", [("SIGINT", 130, "interrupted"),
                                               ("SIGTERM", 143, "stopped by SIGTERM before the command finished"),
                                               ("SIGHUP", 129, "stopped by SIGHUP before the command finished")])
def test_a_signal_while_the_cli_imports_exits_128_plus_it_with_one_line(signame, code, line, at, start, tmp_path):
    """Soak: SIGINT or SIGTERM in a merge's first second ended it with a KeyboardInterrupt traceback or killed by
    the signal (-2, -15: before the CLI's handlers, while `loraforge.cli` imported), or their exception, raised
    inside torch's import, was taken by a library there and the merge ran on to exit 2 with its own error (or, numpy
    left half made, 1 with a 49-line RecursionError). Now the process exits at once with the line and code the rest
    of the CLI gives, whichever way it was started; nothing is written."""
    proc = run(SIGNALLED_IN_AN_IMPORT, signame, at, start, ENTRY, cwd=tmp_path)
    assert (proc.returncode, proc.stderr, proc.stdout) == (code, line + "\n", "")
    assert list(tmp_path.iterdir()) == []


KILLED_WHILE_WRITING = """
import os, runpy, signal, sys, time
import loraforge.lora.merge as merge
from loraforge.utils.files import atomic_dir

SIGNAL = signal.Signals[sys.argv[1]]


def killed(base, adapters, out, **kwargs):
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(bytes(1000))
        os.kill(os.getpid(), SIGNAL)
        time.sleep(30)


merge.export_merged = killed
sys.argv = ["loraforge", "merge", "--base", "b", "--adapter", "a", "--out", "merged"]
runpy.run_module("loraforge", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("signame,code,line", [("SIGINT", 130, "interrupted"),
                                               ("SIGTERM", 143, "stopped by SIGTERM before the command finished")])
def test_once_the_command_runs_a_signal_still_unwinds_it(signame, code, line, tmp_path):
    """The start's exit-at-once ends with the imports: a signal during the command (a merge writing its folder)
    raises in it, so its clean-up runs (the temporary folder beside --out removed), as before."""
    proc = run(KILLED_WHILE_WRITING, signame, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (code, line + "\n")
    assert list(tmp_path.iterdir()) == []
