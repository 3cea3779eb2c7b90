"""training.reuse_memory: a CPU run holds glibc's heap for its steps (loraforge.utils.allocator.reuse_freed_memory),
hands it back when it ends, and trains the same adapter bit for bit as a run without it."""

import contextlib

import pytest
from helpers import assert_same_adapter

from loraforge.config import load_train_config
from loraforge.training import loop
from loraforge.training.loop import train
from loraforge.utils import allocator

needs_glibc = pytest.mark.skipif(not allocator.reuses_memory(True, "cpu", True), reason="needs glibc's malloc")


@pytest.fixture
def held(monkeypatch):
    """Records the run's entering and leaving reuse_freed_memory (and still enters the real one)."""
    events, real = [], allocator.reuse_freed_memory

    @contextlib.contextmanager
    def recorded():
        events.append("enter")
        try:
            with real() as took:
                yield took
        finally:
            events.append("exit")

    monkeypatch.setattr(allocator, "reuse_freed_memory", recorded)
    return events


def _config(tiny_dir, data_file, out, *extra):
    return load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0",
                                    f"output_dir={out}", "lora.r=4", "training.lr=1e-2", "training.max_steps=3",
                                    "training.batch_size=4", "training.precision=fp32", "model.dtype=fp32",
                                    "data.packing=true", *extra])


@needs_glibc
def test_a_run_reusing_memory_writes_the_adapter_of_a_run_without(held, tiny_dir, data_file, tmp_path):
    """auto (the default) reuses where the rows are packed (data.packing=true here)."""
    for on in ("auto", "false"):
        held.clear()
        train(_config(tiny_dir, data_file, tmp_path / on, f"training.reuse_memory={on}"), progress=False)
        assert held == (["enter", "exit"] if on == "auto" else [])  # handed back once the run returned
    assert_same_adapter(tmp_path / "auto", tmp_path / "false")


@needs_glibc
def test_auto_leaves_rows_of_varying_width_to_glibc_and_true_reuses_for_them(held, tiny_dir, data_file, tmp_path):
    for setting, entered in (("auto", []), ("true", ["enter", "exit"])):
        held.clear()
        train(_config(tiny_dir, data_file, tmp_path / setting, "data.packing=false",
                      f"training.reuse_memory={setting}"), progress=False)
        assert held == entered, setting


@needs_glibc
def test_a_failing_run_hands_the_heap_back_and_the_activation_buffer_runs_without_it(held, tiny_dir, data_file,
                                                                                      tmp_path, monkeypatch):
    def boom(run, batches):
        raise RuntimeError("a step failed")

    monkeypatch.setattr(loop, "optimizer_step", boom)
    with pytest.raises(RuntimeError, match="a step failed"):
        train(_config(tiny_dir, data_file, tmp_path / "failed"), progress=False)
    assert held == ["enter", "exit"]
    held.clear()
    with pytest.raises(RuntimeError, match="a step failed"):
        train(_config(tiny_dir, data_file, tmp_path / "buffer", "training.activation_buffer=true"), progress=False)
    assert held == []  # its chunks stay outside the heap the buffer trims
