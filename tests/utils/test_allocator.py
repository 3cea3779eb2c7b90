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
    monkeypatch.setattr(allocator.platform, "machine", lambda: "x86_64")
    # soak: the line pointed to docs/PERFORMANCE.md, which `pip install loraforge` does not install
    assert allocator.line("cpu", packed=True) == (
        f"memory allocator: the C library's malloc; jemalloc lowers the peak: install it ({allocator.INSTALL_HINT}), "
        f"then run with LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF={allocator.JEMALLOC_CONF} "
        f"(Debian/Ubuntu; elsewhere the path of the installed libjemalloc)")
    assert "docs/" not in allocator.line("cpu", packed=False) and "MALLOC_CONF" not in allocator.line("cpu", False)
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


_HEAP = """
import ctypes, torch
from loraforge.utils import allocator

class Info(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+)
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
MB = 1 << 20

def where():  # a live 64 MiB block (over glibc's 32 MiB threshold): mapped on its own, or from the heap
    before = libc.mallinfo2()
    block = torch.ones(1 << 24)
    during = libc.mallinfo2()
    del block
    after = libc.mallinfo2()
    # half the block: the heap's top may already hold free space the block takes first (the arena then grows by
    # ~63 MiB; which, depends on what the imports left there)
    mapped = during.hblkhd - before.hblkhd >= 32 * MB
    kept = after.arena - before.arena >= 32 * MB or after.fordblks - before.fordblks >= 32 * MB
    return "mapped" if mapped else "heap, kept" if kept else "heap, handed back"

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

outside = where()
with allocator.reuse_freed_memory() as took:
    inside = where()
    held = resident()
handed_back = resident() < held - 32 * MB  # malloc_trim on the way out
print(took, outside, "|", inside, "|", where(), "|", handed_back)
"""


@pytest.mark.skipif(allocator._glibc() is None or allocator.loaded() != "libc", reason="needs glibc's malloc")
def test_reuse_freed_memory_keeps_a_large_block_in_the_heap_for_the_next_then_hands_it_back():
    """Outside, glibc maps a 64 MiB block on its own and unmaps it when freed (the next one is faulted in afresh).
    Inside, it comes from the heap and stays there when freed; on the way out the heap is trimmed and blocks are
    mapped again. Measured with glibc's mallinfo2 in a child process (the thresholds are process-wide)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _HEAP], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("|") == ["True mapped ", " heap, kept ", " mapped ", " True\n"]


def test_reuse_is_for_cpu_training_on_glibc_outside_fsdp_and_the_activation_buffer(monkeypatch):
    """auto: when the rows are packed (every step's blocks the same sizes)."""
    monkeypatch.setattr(allocator, "loaded", lambda: "libc")
    monkeypatch.setattr(allocator, "_glibc", lambda: object())
    assert allocator.reuses_memory("auto", "cpu", packed=True) and not allocator.reuses_memory("auto", "cpu", False)
    assert allocator.reuses_memory(True, "cpu", packed=False) and not allocator.reuses_memory(False, "cpu", True)
    assert not allocator.reuses_memory(True, "cuda", True)
    assert not allocator.reuses_memory(True, "cpu", True, sharded=True)
    assert not allocator.reuses_memory(True, "cpu", True, buffered=True)
    monkeypatch.setattr(allocator, "loaded", lambda: "jemalloc")
    assert not allocator.reuses_memory(True, "cpu", True)
    monkeypatch.setattr(allocator, "loaded", lambda: "libc")
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert not allocator.reuses_memory(True, "cpu", True)


def test_without_glibc_reuse_freed_memory_does_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    with allocator.reuse_freed_memory() as took:
        assert took is False
