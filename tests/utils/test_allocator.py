"""loraforge.utils.allocator: naming the C allocator and running a child process on jemalloc."""

import os
import subprocess
import sys

import pytest

from loraforge.utils import allocator

_REPORT = "from loraforge.utils import allocator; import os; print(allocator.loaded(), os.environ.get('MALLOC_CONF'))"


def _child(env) -> str:
    return subprocess.run([sys.executable, "-c", _REPORT], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_plain_child_runs_on_the_c_library():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    assert _child(env) == "libc None"


@pytest.mark.skipif(allocator.jemalloc_path() is None, reason="libjemalloc is not installed here")
def test_preload_env_runs_a_child_on_jemalloc_with_decay_off_unless_malloc_conf_is_set():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    assert _child(allocator.preload_env(env)) == f"jemalloc {allocator.JEMALLOC_CONF}"
    assert _child(allocator.preload_env({**env, "MALLOC_CONF": "narenas:2"})) == "jemalloc narenas:2"
    assert "LD_PRELOAD" not in env  # the caller's mapping is not changed


def test_without_jemalloc_the_error_and_the_start_line_say_how_to_install_it(monkeypatch):
    monkeypatch.setattr(allocator, "_LIBRARY_DIRS", ())
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(allocator, "loaded", lambda: "libc")
    assert allocator.jemalloc_path() is None
    with pytest.raises(FileNotFoundError, match="apt-get install libjemalloc2"):
        allocator.preload_env({})
    assert "apt-get install libjemalloc2" in allocator.line("cpu", packed=True)
    assert allocator.line("cuda", packed=True) is None


def test_the_start_line_names_a_preloaded_allocator_and_the_command_for_an_installed_one(monkeypatch, tmp_path):
    """Packed rows: jemalloc with decay off; rows of varying width: jemalloc's default decay (no MALLOC_CONF)."""
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    monkeypatch.setattr(allocator, "_LIBRARY_DIRS", (str(tmp_path),))
    monkeypatch.setattr(allocator, "loaded", lambda: "libc")
    library = tmp_path / "libjemalloc.so.2"
    assert allocator.line("cpu", packed=True).endswith(f"LD_PRELOAD={library} MALLOC_CONF={allocator.JEMALLOC_CONF}")
    assert allocator.line("cpu", packed=False).endswith(f"LD_PRELOAD={library}")
    monkeypatch.setattr(allocator, "loaded", lambda: "jemalloc")
    assert allocator.line("cpu", packed=False) == "memory allocator: jemalloc"
