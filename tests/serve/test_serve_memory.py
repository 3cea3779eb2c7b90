"""What a CPU engine does to glibc's heap, in a fresh process of its own.

Past a full prefix cache a server's RSS still grew (SmolLM2 fp32: +127 MB over 50 more varied requests): what
eviction freed stayed in glibc's heap, its mmap threshold raised by an earlier large free. An Engine on the CPU
holds the threshold at 128 KB (utils.allocator.return_large_frees).
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def decode_path():
    """No decoding here: once (the serve conftest runs each test on both decode paths)."""
    yield "static"


# a fresh process (its heap without the holes earlier tests leave): glibc's threshold raised as a large free raises
# it, then an Engine, then 200 blocks the size of SmolLM2's fp32 prefix blocks (2 · 30 layers, 3 kv heads, 16
# tokens, 64 dims) taken and freed: how many were mapped (glibc's mallinfo2 counts them), how many stay mapped
BLOCKS_AFTER_ENGINE = """
import ctypes, sys, torch
from helpers import tiny_llama
from loraforge.models import load_tokenizer
from loraforge.serve import Engine
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                                              "keepcost".split()]
try:
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
except (OSError, AttributeError):
    sys.exit(3)
mallinfo2.restype = MallInfo2
torch.empty(32 << 20, dtype=torch.uint8)  # mapped, then freed at once: glibc raises its threshold to 32 MB
tokenizer = load_tokenizer("smollm2-135m")
engine = Engine(tiny_llama(vocab_size=len(tokenizer)), tokenizer, prefix_cache_mb=1)
before = mallinfo2().hblks
blocks = [torch.empty(2 * 30 * 3 * 16 * 64) for _ in range(200)]
mapped = mallinfo2().hblks - before
del blocks
print(mapped, mallinfo2().hblks - before)
engine.stop()
"""


def test_an_engine_maps_blocks_of_a_prefix_blocks_size_so_that_evicting_them_gives_the_memory_back():
    """Past a full cache, evicting prefix blocks grew the server's RSS (SmolLM2 fp32: +127 MB over 50 more varied
    requests, the tensors held the same, all of it given back by malloc_trim): glibc, its mmap threshold raised by a
    large free, took the blocks from the heap and kept what eviction freed. An engine on the CPU holds the
    threshold at 128 KB: blocks the size of SmolLM2's fp32 ones are mapped (but the few that fit holes the heap
    has), and freeing them unmaps them."""
    out = subprocess.run([sys.executable, "-c", BLOCKS_AFTER_ENGINE], cwd=ROOT / "tests", capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    if out.returncode == 3:
        pytest.skip("glibc 2.33 or later only (mallinfo2)")
    assert out.returncode == 0, out.stderr[-2000:]
    mapped, still = map(int, out.stdout.split())
    assert (mapped >= 150, still) == (True, 0), mapped  # without the fix: 0 of 200 mapped
