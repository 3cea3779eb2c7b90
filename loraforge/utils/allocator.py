"""Which C memory allocator this process runs on, and how to run it on jemalloc.

On CPU, PyTorch's tensors come from the C library's malloc. glibc's heap fragments under training's pattern (each
layer's kept activations land in the holes its temporaries left, so the next temporaries grow the heap) and keeps
the holes resident: on packed 512-token rows of the built-in model, 4.3 GB peak RSS for ~2.5 GB of live memory.
jemalloc, preloaded, reuses them: 2.6 GB (bench/train.py's lf-jemalloc), and with its page decay off (JEMALLOC_CONF)
no fresh page faults each step (docs/PERFORMANCE.md, "Memory on CPU"). The allocator can only be chosen when a
process starts (LD_PRELOAD), so loraforge names it and says how; it does not re-launch itself. glibc's one knob that
helps the peak, a low mmap threshold, costs a training step its page faults (bench/train.py's lf-mmap1m: 47% kernel
time); FSDP on CPU holds it low (return_large_frees), where the gathered layers' weights are what the heap kept.

The other way round, reuse_freed_memory() (training.reuse_memory) holds the threshold high for a training run, so
that a step's large blocks (the head's logits, the MLP's activations) come from the heap and are reused by the next
step instead of being mapped, faulted in and unmapped every time: on 4 packed 512-token rows of the built-in model
in bf16 a step's minor page faults fell from ~74,000 to ~200 and it ran 1.16x as fast at the same peak
(bench/train.py's lf against lf-noreuse; docs/PERFORMANCE.md, "Memory on CPU"). Rows of varying width (not packed)
gained nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import os
import platform
from pathlib import Path

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # keep freed pages for the next step: no page faults each step
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
                 "/opt/homebrew/lib")
INSTALL_HINT = "apt-get install libjemalloc2 (Debian/Ubuntu), dnf install jemalloc (Fedora), brew install jemalloc"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
REUSE_MMAP_THRESHOLD = 1 << 30  # bytes: blocks up to this come from the heap (the head's logits chunk: ~200 MB)
REUSE_FALLBACK = 32 << 20  # glibc's largest dynamic threshold, where a glibc refuses the higher one
REUSE_TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap top kept, not trimmed: all (mallopt takes an int)
AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD = 32 << 20, 64 << 20  # afterwards: where glibc's dynamic ones settle


def loaded() -> str:
    """"jemalloc", "tcmalloc" or "mimalloc" when one is mapped into this process, else "libc" (also off Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "libc"
    return next((name for name in ("jemalloc", "tcmalloc", "mimalloc") if f"lib{name}" in maps), "libc")


def jemalloc_path() -> str | None:
    """An absolute path of libjemalloc to preload, or None when none is installed where the loader looks."""
    for d in _LIBRARY_DIRS:
        found = sorted(Path(d).glob("libjemalloc.so*")) + sorted(Path(d).glob("libjemalloc*.dylib"))
        if found:
            return str(found[0])
    name = ctypes.util.find_library("jemalloc")
    return name if name and os.path.isabs(name) else None


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of env (default: this process's) that runs a child process on jemalloc with JEMALLOC_CONF (a
    MALLOC_CONF already set is kept). Raises FileNotFoundError naming how to install it where it is missing."""
    path = jemalloc_path()
    if path is None:
        raise FileNotFoundError(f"libjemalloc is not installed: {INSTALL_HINT}")
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = " ".join(filter(None, [path, env.get("LD_PRELOAD")]))
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def line(device_type: str, packed: bool) -> str | None:
    """One line for a CPU training run's start: the allocator, and on glibc how to use jemalloc; None elsewhere.

    packed: the run packs its rows. Then every step's tensors have the same sizes and jemalloc with its page decay
    off (JEMALLOC_CONF) is the fastest and keeps ~0.6x glibc's peak; rows of varying width (not packed) leave freed
    pages of many sizes, which decay-off keeps (the demo: 2.7-3.8 GB against glibc's 2.3), so there the command is
    jemalloc with its default decay (2.0 GB at glibc's speed). bench/train.py and docs/PERFORMANCE.md, Memory on
    CPU.
    """
    if device_type != "cpu":
        return None
    name = loaded()
    if name != "libc":
        return f"memory allocator: {name}"
    path = jemalloc_path()
    conf = f" MALLOC_CONF={JEMALLOC_CONF}" if packed else ""
    # self-contained: a pip-installed loraforge has no docs/ (the line pointed to docs/PERFORMANCE.md)
    how = (f"run with LD_PRELOAD={path}{conf}" if path else
           f"install it ({INSTALL_HINT}), then run with LD_PRELOAD=/usr/lib/{platform.machine()}-linux-gnu/"
           f"libjemalloc.so.2{conf} (Debian/Ubuntu; elsewhere the path of the installed libjemalloc)")
    return f"memory allocator: the C library's malloc; jemalloc lowers the peak: {how}"


def return_large_frees(threshold: int = 128 * 1024) -> bool:
    """glibc: serve every allocation above `threshold` bytes by mmap, so freeing it returns it to the system.

    By default glibc raises this threshold each time a large block is freed (up to 32 MB), after which large blocks
    come from the heap and stay with the process when freed. FSDP on CPU gathers and frees every layer's weights
    each step, and the heap kept them: measured with the built-in model and 2 gloo processes, a step's peak was
    1.44-1.85× DDP's; with the threshold held at 128 kB (glibc's starting value) it is 0.95×. No-op without glibc.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def reuses_memory(setting: bool | str, device_type: str, packed: bool, sharded: bool = False,
                  buffered: bool = False) -> bool:
    """training.reuse_memory resolved (auto: when the rows are packed, so every step's blocks have the same sizes):
    CPU runs on glibc only, and not under FSDP (which holds the threshold low, return_large_frees) or with
    training.activation_buffer=true (whose chunks must stay outside the heap it trims; `buffered`)."""
    wanted = packed if setting == "auto" else setting
    return bool(wanted) and device_type == "cpu" and not sharded and not buffered and loaded() == "libc" and \
        _glibc() is not None


@contextlib.contextmanager
def reuse_freed_memory():
    """glibc: while inside, serve blocks up to REUSE_MMAP_THRESHOLD from the heap and never trim its top, so memory
    a training step frees is reused by the next step instead of being handed back and faulted in again. On the way
    out the thresholds go to where glibc's own dynamic ones settle (a process cannot return to dynamic thresholds)
    and the heap's free pages are handed back (malloc_trim). Yields whether the high threshold took (a glibc that
    refuses it gets REUSE_FALLBACK); a no-op yielding False without glibc."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    took = bool(libc.mallopt(M_MMAP_THRESHOLD, REUSE_MMAP_THRESHOLD))
    if not took:
        libc.mallopt(M_MMAP_THRESHOLD, REUSE_FALLBACK)
    libc.mallopt(M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD)
    try:
        yield took
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def trim_heap() -> bool:
    """glibc: hand the free pages inside the heap back to the system (malloc_trim(0), which since glibc 2.8 also
    releases free holes below the heap's top). The holes a training step's temporaries leave would otherwise stay
    resident (loraforge.training.slab). False without glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


MADV_DONTNEED = 4  # madvise's advice (Linux): drop these pages; a file mapping's come back from the file when read


def drop_file_pages(start: int, nbytes: int) -> int:
    """Linux: take the whole pages of [start, start + nbytes) that lie in a mapping of a file out of the resident set
    (madvise MADV_DONTNEED): read again, they come back from the file. For memory whose contents the caller no
    longer needs, or knows to be the file's (a private mapping's pages written in memory go back to the file's):
    a checkpoint's weights that transformers loaded as views of the mapped safetensors file stay resident once read
    as long as any tensor keeps the file mapped (quantizing a base reads them all). Anonymous memory is never
    touched. The bytes dropped; 0 off Linux or without glibc."""
    libc = _glibc()
    if libc is None or nbytes <= 0:
        return 0
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return 0
    page, end, dropped = mmap.PAGESIZE, start + nbytes, 0
    for line in maps:
        fields = line.split(maxsplit=5)  # range, perms, offset, device, inode, path (which may hold spaces)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].endswith(" (deleted)"):
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        a, b = -(-max(start, low) // page) * page, min(end, high) // page * page  # whole pages only
        if a < b and libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), MADV_DONTNEED) == 0:
            dropped += b - a
    return dropped


@functools.cache
def _glibc():
    """ctypes' handle on glibc, or None where the C library is another."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
