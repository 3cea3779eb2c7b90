"""An adapter's weights file rewritten in place while the server checks it.

A soak of `loraforge serve --adapters-dir` whose adapter file another process rewrote in place (truncate, write:
the same inode) died of SIGBUS within seconds: the cheap check a request runs on an adapter whose files changed
read the safetensors header through safetensors' safe_open, which maps the file and reads the header from the
mapping; a page the other process cut off meanwhile is a SIGBUS, which kills the process, every request with it.
The header is now read with plain reads (`header_shapes`): a file cut short is a BrokenAdapter, never a crash.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import save_adapters
from loraforge.config import LoraConfig
from loraforge.lora.adapters import AdapterError, header_shapes

ROOT = Path(__file__).resolve().parents[2]
CHECKS = 3000  # prechecks while the file is rewritten: without the fix, SIGBUS in 7 of 9 runs of 300-3,000 (soak)

# the checks, in a process of their own (a SIGBUS kills the process): each precheck passes with the file's shapes
# or is a BrokenAdapter; prints the counts
CHECKER = """
import sys, threading
from pathlib import Path
from helpers import tiny_llama
from loraforge.serve.errors import BrokenAdapter
from loraforge.serve.residency import Adapter, Residency
root, n = Path(sys.argv[1]), int(sys.argv[2])
res = Residency(tiny_llama(vocab_size=int(sys.argv[3])), threading.Condition(), base_name="base", max_loaded=1,
                allowed=[], adapters_dir=root)
entry = Adapter("a", root / "a", uid="a", discovered=True)
passed = broken = 0
for _ in range(n):
    try:
        res.precheck(entry)
        passed += 1
    except BrokenAdapter:
        broken += 1
print(passed, broken)
"""
# rewrites the file in place, as an editor or `cp` over it does, until killed
WRITER = """
import sys
data = open(sys.argv[1], "rb").read()
with open(sys.argv[1], "r+b") as f:
    print("writing", flush=True)
    while True:
        f.seek(0)
        f.truncate(0)
        f.write(data)
        f.flush()
"""


@pytest.fixture(scope="module", autouse=True)
def decode_path():
    """No engine here: once, not on both of conftest's decode paths."""


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    root = save_adapters(base, tmp_path_factory.mktemp("adapters"), {"a": LoraConfig(r=4, lora_alpha=8)}, seed=1)
    return root / "a" / "adapter_model.safetensors"


def test_header_shapes_are_safetensors_own_and_a_cut_file_is_refused_where_safetensors_refuses_it(adapter, tmp_path):
    data = adapter.read_bytes()
    with safe_open(adapter, framework="pt") as f:
        want = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    assert header_shapes(adapter) == want
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    for length in (0, 5, 8, header_end // 2, header_end - 1, header_end, header_end + 1, len(data) - 1):
        cut.write_bytes(data[:length])
        try:
            with safe_open(cut, framework="pt"):
                pass
        except Exception:
            with pytest.raises(AdapterError, match="is not a readable safetensors file"):
                header_shapes(cut)
        else:
            pytest.fail(f"safetensors read a file cut at {length} of {len(data)} bytes")
    cut.write_bytes(data[:8] + b"[]" + b" " * (header_end - 10) + data[header_end:])  # JSON, not an object
    with pytest.raises(AdapterError, match="its header is not a JSON object"):
        header_shapes(cut)


def test_an_adapter_rewritten_in_place_while_it_is_checked_never_crashes_the_server(adapter, tokenizer):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(adapter)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        checker = subprocess.run([sys.executable, "-c", CHECKER, str(adapter.parent.parent), str(CHECKS),
                                  str(len(tokenizer))], cwd=ROOT / "tests", capture_output=True, text=True,
                                 env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    finally:
        writer.kill()
        writer.wait()
    assert checker.returncode == 0, (checker.returncode, checker.stderr[-2000:])  # -7: SIGBUS
    passed, broken = map(int, checker.stdout.split())
    assert passed + broken == CHECKS
    assert passed > 0  # a whole file was seen between the writes too
