"""What real disks and data do to a run: bytes that are not UTF-8, a damaged checkpoint, a full disk.

Each case uses real files and, where the CLI decides what the user sees, a real process: one line on stderr,
exit code 2, no traceback. Training is fp32 on the tiny model (conftest.tiny_dir), a few steps.
"""

import json
import os
import random
import signal
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers.modeling_utils
from safetensors import SafetensorError
from safetensors.torch import load_file
from helpers import output_held_elsewhere, stop_in_last_save

import loraforge.training.loop as T
from loraforge.cli import finished_line, main
from loraforge.config import load_train_config
from loraforge.training.data import DataError, read_records
from loraforge.training.loss import CausalLMLoss
from loraforge.training.checkpoint import TrainingError, find_checkpoint, verify_checkpoint
from loraforge.training.loop import StopRequest, Stopped, nonfinite_advice, train
from loraforge.training.report import read_metrics
from loraforge.utils.files import DiskError
from loraforge.ui.runs import status

ROOT = Path(__file__).resolve().parents[2]
BAD_JSONL = b'{"instruction":"a","output":"b"}\n{"instruction":"m\xe4rz","output":"c"}\n'  # the printf


def run_args(tiny_dir, data_file, out) -> list[str]:
    return [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", f"output_dir={out}",
            "lora.r=4", "lora.lora_dropout=0.1", "training.lr=1e-2", "training.max_steps=3", "training.batch_size=4",
            "training.precision=fp32", "model.dtype=fp32", "training.save_every=1", "training.keep_checkpoints=3",
            "training.seed=3"]


def cli(args, tmp_path, limit_kb: int | None = None) -> subprocess.CompletedProcess:
    """`loraforge ARGS` in a fresh process; with limit_kb under `ulimit -f` (the file-size limit of a full quota)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    command = [sys.executable, "-m", "loraforge", args[0], str(cfg), *args[1:]]
    if limit_kb is not None:
        command = ["bash", "-c", f'ulimit -f {limit_kb}; exec "$@"', "bash", *command]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def adapter(out) -> dict:
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def assert_equal_adapters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)  # max |Δ| = 0: a resume recomputes exactly


@pytest.fixture(scope="module")
def whole(tiny_dir, data_file, tmp_path_factory) -> dict:
    """The adapter of the uninterrupted run (3 steps)."""
    out = tmp_path_factory.mktemp("whole")
    train(load_train_config(None, run_args(tiny_dir, data_file, out)), progress=False)
    return adapter(out)


@pytest.fixture(scope="module")
def interrupted_once(tiny_dir, data_file, tmp_path_factory) -> Path:
    """The same run stopped in its last checkpoint save (like a kill): checkpoints of steps 1 and 2, no adapter."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    stop_in_last_save(load_train_config(None, run_args(tiny_dir, data_file, out)))
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    return out


@pytest.fixture
def interrupted(interrupted_once, tmp_path) -> Path:
    """A copy of the interrupted run's output_dir for one test to damage."""
    return Path(shutil.copytree(interrupted_once, tmp_path / "run"))


def one_error_line(stderr: str) -> str:
    """The error the CLI printed (progress bars share stderr), checked to be alone and without a traceback."""
    assert "Traceback" not in stderr and stderr.count("error: ") == 1, stderr
    return stderr[stderr.index("error: "):].splitlines()[0]


# --- data ----------------------------------------------------------------------------------------------------

def test_train_leaves_the_callers_random_state_as_it_was_whether_it_returns_or_raises(tiny_dir, data_file, tmp_path,
                                                                                     monkeypatch):
    """soak (a notebook in one process): train() seeded torch's and Python's generators with training.seed and left
    them so: every draw after it was the seed's, the same after each run, whatever the user had seeded before."""
    def draws():
        return torch.rand(4).tolist(), random.random()

    def seeded():
        torch.manual_seed(1234)
        random.seed(1234)

    seeded()
    expected = draws()  # the user's next draws, without a run in between
    seeded()
    train(load_train_config(None, run_args(tiny_dir, data_file, tmp_path / "returned")), progress=False)
    assert draws() == expected

    def interrupted(run, batches):
        raise KeyboardInterrupt  # Ctrl-C in a notebook's cell, mid-step

    monkeypatch.setattr(T, "optimizer_step", interrupted)
    seeded()
    with pytest.raises(KeyboardInterrupt):
        train(load_train_config(None, run_args(tiny_dir, data_file, tmp_path / "raised")), progress=False)
    assert draws() == expected


def test_an_undecodable_byte_stops_train_with_its_file_line_and_the_fix(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_JSONL)
    proc = cli(["train", *run_args(tiny_dir, bad, tmp_path / "out")], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_error_line(proc.stderr) == (
        f"error: {bad}:2: byte 0xe4 at column 18 (byte offset 50) is not UTF-8; re-encode the file as UTF-8 (e.g. "
        f"for Windows-1252/Latin-1 text: iconv -f cp1252 -t utf-8 {bad} > {tmp_path / 'bad.utf8.jsonl'})")


@pytest.mark.parametrize("name, content, where", [
    ("bad.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": "m\xe4rz", "output": "c"}]\n',
     "2: byte 0xe4 at column 20 (byte offset 57)"),
    ("bad.csv", b"instruction,output\na,b\nm\xe4rz,c\n", "3: byte 0xe4 at column 2 (byte offset 24)"),
    ("text.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "2: byte 0xe9 at column 14 (byte offset 28)"),
])
def test_every_text_reader_names_the_line_of_an_undecodable_byte(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_bytes(content)
    fixed = path.with_suffix(".utf8" + path.suffix)
    with pytest.raises(DataError) as e:
        read_records(str(path))
    assert str(e.value) == (f"{path}:{where} is not UTF-8; re-encode the file as UTF-8 (e.g. for Windows-1252/"
                            f"Latin-1 text: iconv -f cp1252 -t utf-8 {path} > {fixed})")


def test_a_parquet_string_that_is_not_utf8_is_named_by_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    text = pa.array([b"fine", b"m\xe4rz"], type=pa.binary()).view(pa.string())  # no validation: as a foreign writer
    pq.write_table(pa.table({"instruction": pa.array(["a", "b"]), "output": text}), path)
    with pytest.raises(DataError) as e:
        read_records(str(path))
    assert str(e.value) == (f"{path}[row 1]: column 'output' holds byte 0xe4 at position 1, which is not UTF-8; "
                            f"re-encode the column's text as UTF-8 and write the file again")


# --- checkpoints ---------------------------------------------------------------------------------------------

def test_resume_skips_a_truncated_checkpoint_and_ends_with_the_uninterrupted_adapter(
        tiny_dir, data_file, tmp_path, interrupted, whole):
    ckpts = interrupted / "checkpoints"
    damaged = ckpts / "step-0000002" / "trainable.safetensors"
    size = damaged.stat().st_size
    subprocess.run(["truncate", "-s", str(size // 2), str(damaged)], check=True)

    proc = cli(["train", *run_args(tiny_dir, data_file, interrupted), "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"skipping checkpoint step-0000002: trainable.safetensors is {size // 2} bytes but was written as "
            f"{size} (truncated or damaged); removed it\nresuming from {ckpts / 'step-0000001'} (step 1/3)\n"
            ) in proc.stdout
    assert_equal_adapters(adapter(interrupted), whole)
    assert find_checkpoint(ckpts) == (ckpts / "step-0000003", [])
    assert [verify_checkpoint(d) for d in sorted(ckpts.iterdir())] == [None, None, None]  # steps 1, 2 (again), 3
    assert verify_checkpoint(str(sorted(ckpts.iterdir())[0])) is None  # a str path too (it said 'unreadable')


def test_each_kind_of_damage_is_named(interrupted):
    step = interrupted / "checkpoints" / "step-0000002"
    copy = interrupted / "copy"

    def damaged(change) -> str:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(step, copy)
        change(copy)
        return verify_checkpoint(copy)

    def flip_a_byte(d):
        data = bytearray((d / "optimizer.safetensors").read_bytes())
        data[-1] ^= 1
        (d / "optimizer.safetensors").write_bytes(bytes(data))

    assert damaged(lambda d: None) is None
    assert damaged(flip_a_byte) == "optimizer.safetensors does not match its SHA-256 in manifest.json (damaged)"
    assert damaged(lambda d: (d / "trainer_state.json").unlink()) == "trainer_state.json is missing"
    assert damaged(lambda d: (d / "manifest.json").unlink()) == (
        "it has no manifest.json (its save did not finish, or a loraforge without manifests wrote it)")
    assert damaged(lambda d: (d / "manifest.json").write_text("{")) == "its manifest.json is unreadable"


def test_resume_with_no_intact_checkpoint_says_so_and_how_to_start_over(tiny_dir, data_file, interrupted):
    ckpts = interrupted / "checkpoints"
    (ckpts / "step-0000002" / "manifest.json").unlink()  # as if its save had stopped before the last file
    written = (ckpts / "step-0000001" / "trainer_state.json").stat().st_size
    (ckpts / "step-0000001" / "trainer_state.json").write_text("{}")
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, run_args(tiny_dir, data_file, interrupted)), resume=True, progress=False)
    assert str(e.value) == (
        f"--resume: no complete checkpoint under {ckpts} (step-0000002: it has no manifest.json (its save did not "
        f"finish, or a loraforge without manifests wrote it); step-0000001: trainer_state.json is 2 bytes but was "
        f"written as {written} (truncated or damaged)); "
        f"to start over, run without --resume and with --overwrite (or delete {ckpts}), or choose another "
        f"output_dir")
    assert sorted(d.name for d in ckpts.iterdir()) == ["step-0000001", "step-0000002"]  # nothing deleted


def test_resume_where_no_run_saved_a_checkpoint_says_to_start_it(tiny_dir, data_file, tmp_path):
    """A run killed before its first save leaves output_dir with nothing but its lock file: the refusal said to
    start over "with --overwrite (or delete .../checkpoints)", a folder that did not exist and a flag not needed."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("12345")  # what a killed run leaves
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, run_args(tiny_dir, data_file, out)), resume=True, progress=False)
    assert str(e.value) == (f"--resume: {out} holds no checkpoint (a run stopped before its first save, or none ran "
                            f"there); run without --resume to start it")
    assert e.value.everywhere  # every process of a torchrun run finds the same: said once per node
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match=r"run without --resume to start it \(with --overwrite: it holds "
                                            r"notes.txt\)$"):
        train(load_train_config(None, run_args(tiny_dir, data_file, out)), resume=True, progress=False)


# --- a full disk ---------------------------------------------------------------------------------------------

def test_a_checkpoint_save_past_the_file_size_limit_stops_with_one_line(tiny_dir, data_file, tmp_path, interrupted):
    """`ulimit -f` makes the kernel refuse a write past the limit (EFBIG), as a full disk or quota does."""
    ckpts = interrupted / "checkpoints"
    limit_kb = max(f.stat().st_size for f in (ckpts / "step-0000002").iterdir()) // 1024 // 2  # below the largest
    proc = cli(["train", *run_args(tiny_dir, data_file, interrupted), "--resume"], tmp_path, limit_kb=limit_kb)
    assert proc.returncode == 2, proc.stderr[-3000:]
    pattern = (rf"error: cannot write {re.escape(str(ckpts / 'step-0000003'))}: a file would pass the largest file "
               rf"size allowed \(`ulimit -f`, or the file system's limit\) \(about [0-9.]+ kB needed, "
               rf"[0-9.]+ [kMGT]?B free there\); training stopped after step 3, the last complete checkpoint, "
               rf"{re.escape(str(ckpts / 'step-0000002'))}, is intact: make room \(or fix the permission\) and "
               rf"continue with --resume")
    assert re.fullmatch(pattern, one_error_line(proc.stderr)), proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001", "step-0000002"]  # no .tmp-step-0000003
    assert verify_checkpoint(ckpts / "step-0000002") is None
    assert not (interrupted / "adapter").exists()


def test_a_run_the_disk_stops_before_its_first_checkpoint_keeps_its_adapter_where_it_fits(tiny_dir, data_file,
                                                                                          tmp_path):
    """Carried over: a run that a full disk stopped before its first checkpoint kept nothing, though its adapter
    would have fitted (a checkpoint holds the optimizer's state too). Under `ulimit -f`: a checkpoint past the limit
    (its optimizer.safetensors) leaves the adapter of that step, the same bits as an unstopped run's; a metrics.jsonl
    past it (what a filling disk refuses first) stops the run in one line (its close raised the refusal again, a
    traceback), with the adapter of the step reached."""
    args = [a for a in run_args(tiny_dir, data_file, tmp_path / "one") if not a.startswith("training.save_every")]
    one = train(load_train_config(None, [*args, "training.max_steps=1"]), progress=False)
    sizes = {p.name: p.stat().st_size for p in (one.output_dir / "checkpoints" / "step-0000001").iterdir()}
    kept = (one.output_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    assert kept < 12 * 1024 < sizes["optimizer.safetensors"]  # the limit below: the adapter fits, the checkpoint not
    stopped = tmp_path / "stopped"
    proc = cli(["train", *[a.replace(str(tmp_path / "one"), str(stopped)) for a in args], "training.max_steps=1"],
               tmp_path, limit_kb=12)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.fullmatch(rf"error: cannot write {re.escape(str(stopped / 'checkpoints' / 'step-0000001'))}: .* "
                        rf"training stopped after step 1, no checkpoint was completed before this one; the adapter of "
                        rf"step 1 fitted: written to {re.escape(str(stopped / 'adapter'))}",
                        one_error_line(proc.stderr)), proc.stderr
    assert_equal_adapters(adapter(stopped), adapter(one.output_dir))
    assert json.loads((stopped / "adapter" / "adapter_config.json").read_text()) == json.loads(
        (one.output_dir / "adapter" / "adapter_config.json").read_text())

    logged = tmp_path / "logged"  # rows of ~180 bytes: the 7th kB of metrics.jsonl is refused after ~35 steps
    proc = cli(["train", *[a.replace(str(tmp_path / "one"), str(logged)) for a in args], "training.max_steps=60",
                "lora.r=1"], tmp_path, limit_kb=6)  # r=1: an adapter file of ~4 kB
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    step = int(re.search(r"training stopped after step (\d+),", line).group(1))
    assert re.fullmatch(rf"error: cannot write {re.escape(str(logged / 'metrics.jsonl'))}: a file would pass the "
                        rf"largest file size allowed .*; training stopped after step {step}, no checkpoint was "
                        rf"completed; the adapter of step {step} fitted: written to "
                        rf"{re.escape(str(logged / 'adapter'))}", line), line
    assert 5 < step < 60 and read_metrics(logged / "metrics.jsonl")[-1]["step"] == step - 1
    assert adapter(logged).keys() == adapter(stopped).keys()


def test_a_final_adapter_or_plot_the_disk_refuses_leaves_nothing_half_written(tmp_path):
    """save_adapter and plot_loss in a process whose file-size limit is below what they write."""
    script = f"""
import resource, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT / 'tests')!r})
from helpers import tiny_llama
from loraforge.config import LoraConfig
from loraforge.utils.files import DiskError
from loraforge.lora.inject import inject
from loraforge.lora.adapters import save_adapter
from loraforge.training.report import MetricsLog, plot_loss
out = Path({str(tmp_path)!r})
log = MetricsLog(out / "metrics.jsonl")
for step in range(1, 200):
    log.write(step=step, loss=1.0 / step)
log.close()
model = inject(tiny_llama(), LoraConfig(r=64))
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
for write in (lambda: save_adapter(model, out / "adapter"), lambda: plot_loss(out / "metrics.jsonl", out / "loss.png")):
    try:
        write()
    except DiskError as e:
        print(e)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter_line, plot_line = proc.stdout.splitlines()
    reason = r"a file would pass the largest file size allowed \(`ulimit -f`, or the file system's limit\)"
    assert re.fullmatch(rf"cannot write {re.escape(str(tmp_path / 'adapter'))}: {reason} \(about [0-9.]+ kB "
                        rf"needed, [0-9.]+ [kMGT]?B free there\)", adapter_line)
    assert re.fullmatch(rf"cannot write {re.escape(str(tmp_path / 'loss.png'))}: {reason} \([0-9.]+ [kMGT]?B free "
                        rf"there\)", plot_line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_full_model_the_disk_refuses_is_one_line_and_leaves_the_earlier_model_or_none(tiny_dir, data_file, tmp_path,
                                                                                        monkeypatch):
    """method full wrote model/ with a plain save_pretrained: a full disk was safetensors' traceback and left
    model/ with config.json alone (taken for a finished run), or the new config.json beside the earlier weights."""
    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # cut short where the disk filled
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    args = [a for a in run_args(tiny_dir, data_file, tmp_path / "run") if not a.startswith("lora.")]
    args += ["method=full", "training.lr=1e-4", "training.max_steps=2"]
    done = tmp_path / "done"
    train(load_train_config(None, args + [f"output_dir={done}"]), progress=False)
    before = {p.name: p.read_bytes() for p in (done / "model").iterdir()}
    assert "model.safetensors" in before
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    for out, resume in [(tmp_path / "run", False), (done, True)]:  # a new run; a finished one written again
        with pytest.raises(DiskError) as e:
            train(load_train_config(None, args + [f"output_dir={out}"]), progress=False, resume=resume)
        assert re.fullmatch(rf"cannot write {re.escape(str(out / 'model'))}: no space left on the device \(about "
                            rf"[0-9.]+ MB needed, [0-9.]+ [kMGT]?B free there\)", str(e.value))
        assert not list(out.glob(".tmp-*"))
    assert not (tmp_path / "run" / "model").exists() and status(tmp_path / "run") != "finished"
    assert {p.name: p.read_bytes() for p in (done / "model").iterdir()} == before  # the earlier set, whole


def test_appending_to_metrics_drops_a_line_cut_off_by_a_crash(tmp_path):
    from loraforge.training.report import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    log = MetricsLog(path, append=True)
    log.write(step=2, loss=1.5)
    log.close()
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_metrics_are_strict_json_with_nonfinite_values_as_null(tmp_path):
    """fp16's skipped step logs grad_norm inf: the file stays JSON that strict readers take (no `Infinity`)."""
    from loraforge.training.report import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write(step=1, loss=2.0, grad_norm=float("inf"), lr=float("nan"), tokens=7)
    log.close()
    assert path.read_text() == '{"step": 1, "loss": 2.0, "grad_norm": null, "lr": null, "tokens": 7}\n'
    assert read_metrics(path) == [{"step": 1, "loss": 2.0, "grad_norm": None, "lr": None, "tokens": 7}]



def test_study_reports_are_strict_json_through_nested_rows(tmp_path):
    """forgetting.json and continual.json: a perplexity past exp(709) is inf; written as null, not `Infinity`."""
    from loraforge.training.report import strict_json

    report = {"rows": [{"ppl": float("inf"), "kl": float("nan"), "acc": 0.5, "out": tmp_path}], "pair": (1.0, -1e999)}
    text = strict_json(report, indent=1, default=str)
    assert json.loads(text, parse_constant=lambda word: pytest.fail(f"{word} is not JSON")) == {
        "rows": [{"ppl": None, "kl": None, "acc": 0.5, "out": str(tmp_path)}], "pair": [1.0, None]}

# --- a non-finite loss ---------------------------------------------------------------------------------------

def test_nonfinite_advice_depends_on_what_the_run_used():
    assert nonfinite_advice(1e-2, "fp32", 1.0, step=5) == (
        "Lower training.lr (it is 0.01; try 0.001); check the records of this step for unusual text (very long, "
        "repeated or garbled)")
    assert nonfinite_advice(2e-4, "bf16", None, step=5) == (
        "Lower training.lr (it is 0.0002; try 2e-05); set training.max_grad_norm: 1.0 to clip the gradients; try "
        "training.precision: fp32 (bf16 keeps 8 bits of mantissa); check the records of this step for unusual text "
        "(very long, repeated or garbled)")
    assert nonfinite_advice(1e-2, "fp16", 1.0, step=1) == (
        "The loss was not finite before any update, so the learning rate is not the cause: check the base model "
        "(does it give finite logits in model.dtype?) and the first batch's records; fp16 overflows past 65504: use "
        "training.precision: bf16 where the hardware has it, or fp32")


def test_a_nonfinite_loss_in_fp32_does_not_advise_fp32(tiny_dir, data_file, tmp_path, monkeypatch):
    original = CausalLMLoss.forward

    def poisoned(self, batch):
        total, n = original(self, batch)
        return total * float("inf"), n

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    cfg = load_train_config(None, run_args(tiny_dir, data_file, tmp_path / "run"))
    with pytest.raises(TrainingError) as e:
        train(cfg, progress=False)
    assert str(e.value) == ("loss is inf at step 1; stopping. The last good checkpoint is none (no checkpoint was "
                            "written yet). " + nonfinite_advice(1e-2, "fp32", 1.0, step=1))
    assert e.value.everywhere  # the all-reduced loss: every process stops on it alike
    assert "fp32" not in nonfinite_advice(1e-2, "fp32", 1.0, step=1)


def test_a_nonfinite_held_out_loss_is_warned_once_and_counted_by_the_last_line(tiny_dir, data_file, tmp_path,
                                                                                monkeypatch):
    """Soak: a NaN held-out loss was said on the progress bar alone ("eval loss nan") and written as null in
    metrics.jsonl; no warning, and the last line said nothing of it. The evaluations of steps 2 and 4 (of 4) are
    made NaN in their loss (the training forwards, with gradients, are untouched): one warning, at the first, with
    a non-finite training loss's advice, and the last line counts them; the reference is metrics.jsonl's rows."""
    original, evaluated = CausalLMLoss.forward, []

    def poisoned(self, batch):  # mean_token_loss runs without gradients; an evaluation is one forward here
        total, n = original(self, batch)
        if torch.is_grad_enabled():
            return total, n
        evaluated.append(1)
        return (total * float("nan"), n) if len(evaluated) in (2, 4) else (total, n)

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    out = tmp_path / "run"
    args = [*run_args(tiny_dir, data_file, out), "training.max_steps=4", "training.eval_every=1",
            f"data.eval={data_file}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(load_train_config(None, args), progress=False)
    rows = read_metrics(out / "metrics.jsonl")
    evals = [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]
    bad = [step for step, loss in evals if loss is None]
    assert len(evaluated) == len(evals) == 4 and bad == [2, 4]  # the poisoned ones, null in the file
    loss = next(row["loss"] for row in rows if row["step"] == bad[0] and "loss" in row)
    ours = [str(w.message) for w in caught if "held-out loss" in str(w.message)]
    assert len(ours) == 1, ours  # once a run, not once an evaluation (before: none)
    assert ours == [f"held-out loss is nan at step {bad[0]} (the training loss, {loss:.4g}, was finite); training "
                    f"goes on, metrics.jsonl records it as null and training.keep_best passes over it (warned once: "
                    f"the run's last line counts the evaluations that were not finite). "
                    + nonfinite_advice(1e-2, "fp32", 1.0, bad[0] + 1, "the held-out records")]
    assert ours[0].endswith("Lower training.lr (it is 0.01; try 0.001); check the held-out records for unusual text "
                            "(very long, repeated or garbled)")
    said = f"; {len(bad)} of {len(evals)} held-out losses were not finite (null in metrics.jsonl), the first at step 2"
    assert result.nonfinite_evals == {"count": len(bad), "of": len(evals), "step": bad[0]}
    assert said in finished_line(result)
    assert result.best["step"] == min((loss, step) for step, loss in evals if loss is not None)[1]  # finite ones
    again = train(load_train_config(None, args), resume=True, progress=False)  # a finished run: its logged rows
    assert again.already_finished and again.nonfinite_evals == result.nonfinite_evals
    assert said in finished_line(again)


@pytest.fixture
def not_ignored(signum):
    """The test's signal at its default disposition: a suite run under nohup starts with SIGHUP ignored, which the
    loop keeps ignored (as it should) and child processes inherit; restored afterwards."""
    ignored = signal.getsignal(signum) is signal.SIG_IGN
    if ignored:
        signal.signal(signum, signal.SIG_DFL)
    yield
    if ignored:
        signal.signal(signum, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP])
def test_ctrl_c_stops_after_its_step_with_a_checkpoint_and_resume_ends_alike(tiny_dir, data_file, tmp_path, whole,
                                                                            signum, not_ignored, capfd):
    """SIGINT (Ctrl-C, the dashboard's stop), SIGTERM (kill, pre-emption), SIGUSR1 (Slurm's --signal) or SIGHUP (the
    terminal or SSH session closed) during step 2: the step completes, step-2 is saved, then the run stops; --resume
    ends with the uninterrupted run's adapter."""
    out = tmp_path / "run"
    args = run_args(tiny_dir, data_file, out) + ["training.save_every=0"]  # no checkpoint but the stop's
    real = T.optimizer_step

    def step_then_ctrl_c(run, batches):
        result = real(run, batches)
        if run.step == 1:  # in the middle of the second step, as far as the loop can tell
            os.kill(os.getpid(), signum)
        return result

    before = signal.getsignal(signum)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(T, "optimizer_step", step_then_ctrl_c)
        with pytest.raises(Stopped) as e:  # a KeyboardInterrupt that names the signal
            train(load_train_config(None, args), progress=False)
    assert e.value.signum == signum and e.value.exit_code == 128 + signum
    again = "Ctrl-C" if signum == signal.SIGINT else "the signal"  # said at once (soak: nothing for 28 s)
    assert (f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint; {again} again stops at "
            f"once\n") in capfd.readouterr().err
    assert signal.getsignal(signum) is before  # the handler is the caller's again
    ckpts = out / "checkpoints"
    assert [d.name for d in sorted(ckpts.iterdir())] == ["step-0000002"]
    assert verify_checkpoint(ckpts / "step-0000002") is None
    assert not (out / "adapter").exists()
    train(load_train_config(None, args), resume=True, progress=False)
    assert_equal_adapters(adapter(out), whole)


class Killed(BaseException):
    """A kill at a chosen point: nothing in the run catches it."""


def test_a_kill_between_a_save_and_its_pruning_leaves_an_extra_checkpoint_that_resume_prunes(tiny_dir, data_file,
                                                                                               tmp_path, whole):
    """training.keep_checkpoints 1, killed after step 2's checkpoint was renamed into place but before step 1's was
    pruned: two checkpoints stayed until the next save. Now --resume prunes to keep_checkpoints before the first step
    (keeping the one it continues from), and the run ends with the uninterrupted run's adapter."""
    out = tmp_path / "run"
    args = run_args(tiny_dir, data_file, out) + ["training.keep_checkpoints=1"]
    real = shutil.rmtree

    def killed_in_pruning(path, *a, **k):
        if Path(path).name == "step-0000001":
            raise Killed
        return real(path, *a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(shutil, "rmtree", killed_in_pruning)
        with pytest.raises(Killed):
            train(load_train_config(None, args), progress=False)
    ckpts = out / "checkpoints"
    assert sorted(d.name for d in ckpts.iterdir()) == ["step-0000001", "step-0000002"]  # one more than kept
    step = T.optimizer_step
    seen = []

    def first_step_sees(run, batches):
        seen.append(sorted(d.name for d in ckpts.iterdir()))
        return step(run, batches)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(T, "optimizer_step", first_step_sees)
        train(load_train_config(None, args), resume=True, progress=False)
    assert seen == [["step-0000002"]]  # pruned at resume, the checkpoint it resumed from kept
    assert sorted(d.name for d in ckpts.iterdir()) == ["step-0000003"]
    assert_equal_adapters(adapter(out), whole)


def sigterm_in_step(last: int):
    """T.optimizer_step that sends this process SIGTERM in the middle of step `last` (after its update)."""
    real = T.optimizer_step

    def step_then_sigterm(run, batches):
        result = real(run, batches)
        if run.step == last - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    return step_then_sigterm


def test_a_signal_during_the_last_step_stops_after_the_adapter_is_written(tiny_dir, data_file, tmp_path, whole):
    """SIGTERM during the last step (3 of 3): the run finishes (its checkpoint, the adapter of the uninterrupted
    run) and then stops, so a caller such as `demo` ends with 143 instead of going on (the bug: the signal was
    dropped, train returned as if none had come). `train` says the run had finished, not to --resume."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(T, "optimizer_step", sigterm_in_step(3))  # the last step of 3
        with pytest.raises(Stopped) as e:
            train(load_train_config(None, run_args(tiny_dir, data_file, out)), progress=False)
    assert e.value.signum == signal.SIGTERM and not e.value.resumable and e.value.result.steps == 3
    assert str(e.value) == (f"stopped by SIGTERM at the end of the run (step 3 of 3); it had finished: adapter "
                            f"written to {out / 'adapter'}")
    assert verify_checkpoint(out / "checkpoints" / "step-0000003") is None
    assert_equal_adapters(adapter(out), whole)


def test_the_cli_run_a_signal_reached_in_its_last_step_ends_as_finished(tiny_dir, data_file, tmp_path, whole, capfd):
    """`loraforge train` whose SIGTERM came during the last step (3 of 3) used to exit 143 although its adapter,
    metrics and last checkpoint were complete (the dashboard listed it as stopped). The run had finished: the CLI
    exits 0 with its finished line, after one line saying when the signal came and that nothing is left to resume."""
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    capfd.readouterr()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(T, "optimizer_step", sigterm_in_step(3))  # the last step of 3
        m.setenv("TQDM_DISABLE", "1")
        assert main(["train", str(cfg), *run_args(tiny_dir, data_file, out)]) == 0
    said = capfd.readouterr()
    assert said.err.splitlines()[-1] == ("SIGTERM came during the last step (step 3); the run finished whole first, so "
                                         "it ends as finished, with nothing to resume")
    assert said.out.splitlines()[-1].startswith(f"adapter written to {out / 'adapter'} after 3 steps: final loss ")
    assert verify_checkpoint(out / "checkpoints" / "step-0000003") is None
    assert_equal_adapters(adapter(out), whole)
    assert status(out, {"pid": 1, "exit_code": 0}) == "finished"


def test_a_stopped_torchrun_process_ignores_later_copies_of_the_signal_until_it_has_ended():
    """Under torchrun a signal comes twice (the terminal's Ctrl-C, then torchrun's forwarded copy): the second is
    ignored during the step, and also after the loop has stopped (the caller's handler would let a late copy kill
    the process before it prints its stop line); one process gets the caller's handlers back, as before."""
    before = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}  # all of them are ignored after the stop below
    try:
        with pytest.raises(Stopped), StopRequest(world=2) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the forwarded copy, mid-step: no interruption
            assert (stop.requested, stop.signum) == (True, signal.SIGTERM)
            raise Stopped(signal.SIGTERM, "stopped")
        assert {s: signal.getsignal(s) for s in StopRequest.SIGNALS} == dict.fromkeys(StopRequest.SIGNALS,
                                                                                      signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)  # a late copy: this process lives on to print its line and exit
        for s, handler in before.items():
            signal.signal(s, handler)
        with pytest.raises(Stopped), StopRequest(world=1):
            raise Stopped(signal.SIGTERM, "stopped")
        assert {s: signal.getsignal(s) for s in StopRequest.SIGNALS} == before
    finally:  # restored for the tests after this one: their child processes would inherit SIG_IGN
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_run_started_ignoring_sighup_as_nohup_does_trains_on_when_it_comes(tiny_dir, data_file, tmp_path, whole):
    """`nohup loraforge train` starts with SIGHUP ignored: the loop keeps it ignored, so closing the terminal changes
    nothing, and the run ends with the uninterrupted run's adapter; the caller's disposition is left as it was."""
    out = tmp_path / "run"
    real = T.optimizer_step

    def step_then_hangup(run, batches):
        result = real(run, batches)
        if run.step == 1:
            os.kill(os.getpid(), signal.SIGHUP)
        return result

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(T, "optimizer_step", step_then_hangup)
            train(load_train_config(None, run_args(tiny_dir, data_file, out)), progress=False)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert_equal_adapters(adapter(out), whole)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR1, 138),
                                          (signal.SIGHUP, 129)])
def test_a_signalled_cli_run_exits_128_plus_the_signal_with_its_checkpoint(tiny_dir, data_file, tmp_path, signum,
                                                                            code, not_ignored):
    """A real `loraforge train` process, signalled once it has logged a step: it ends that step, saves a checkpoint
    of it, says which signal stopped it and that --resume continues, and exits 128 + the signal's number as a
    shell reports a process the signal ended (Linux numbers); the dashboard counts that exit as stopped."""
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    args = run_args(tiny_dir, data_file, out) + ["training.max_steps=100000", "training.save_every=0",
                                                 "training.log_every=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    with open(tmp_path / "out.txt", "w") as o, open(tmp_path / "err.txt", "w") as e:  # files: a full pipe blocks
        proc = subprocess.Popen([sys.executable, "-m", "loraforge", "train", str(cfg), *args], cwd=ROOT, env=env,
                                stdout=o, stderr=e)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().endswith("\n")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signum)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    stderr = (tmp_path / "err.txt").read_text()
    assert proc.returncode == code, stderr[-3000:]
    ckpts = out / "checkpoints"
    (step,) = [d.name for d in ckpts.iterdir()]  # no checkpoint but the stop's (save_every 0)
    n = int(step.removeprefix("step-"))
    assert n >= 1 and verify_checkpoint(ckpts / step) is None and not (out / "adapter").exists()
    assert stderr.splitlines()[-1] == (f"stopped by {signal.Signals(signum).name} after step {n} of 100000: "
                                       f"checkpoint {ckpts / step} saved; continue with --resume")
    assert status(out, {"pid": proc.pid, "exit_code": proc.returncode}) == "stopped"


@pytest.mark.parametrize("save_every", [1, 0])
def test_a_second_ctrl_c_in_a_step_stops_at_once_naming_the_checkpoint_left_or_none(tiny_dir, data_file, tmp_path,
                                                                                       save_every, capfd):
    """Ctrl-C twice in step 2: the second interrupts the step. Its line said "the last complete checkpoint is kept;
    continue with --resume" also where none had been written (save_every 0), and --resume then refused. Now it
    names the checkpoint --resume continues from, or says there is none and how to start again; exit 130."""
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    real = T.optimizer_step

    def ctrl_c_twice(run, batches):
        if run.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish this step, then stop with a checkpoint
            os.kill(os.getpid(), signal.SIGINT)  # the second, before the step's work: at once
        return real(run, batches)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(T, "optimizer_step", ctrl_c_twice)
        m.setenv("TQDM_DISABLE", "1")
        code = main(["train", str(cfg), *run_args(tiny_dir, data_file, out), f"training.save_every={save_every}"])
    assert code == 130
    last = capfd.readouterr().err.splitlines()[-1]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    head = "interrupted by SIGINT after SIGINT, in the middle of a step: stopping without a checkpoint"
    if save_every:
        assert ckpts == [out / "checkpoints" / "step-0000001"]
        assert last == f"{head} of it; the last complete checkpoint, {ckpts[0]}, is kept; continue with --resume"
    else:
        assert ckpts == []
        assert last == (f"{head} (none was written yet, so there is nothing to resume: start the run again with "
                        f"--overwrite (overwrite=True))")  # a notebook's train() takes overwrite=True


def test_ctrl_c_twice_at_a_real_train_process_ends_it_with_130_and_no_traceback(tiny_dir, data_file, tmp_path):
    """A real `loraforge train` (slow steps: 40 micro-batches of one row) given Ctrl-C twice in a step, once it has
    logged a step: one line saying the step was interrupted, exit 130, no traceback."""
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    args = run_args(tiny_dir, data_file, out) + ["training.max_steps=1000", "training.save_every=0",
                                                 "training.log_every=1", "training.batch_size=1",
                                                 "training.gradient_accumulation=40"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    with open(tmp_path / "err.txt", "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "loraforge", "train", str(cfg), *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=e,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a shell does
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().endswith("\n")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        # the second once the first is handled (its line says so): sent 0.05 s later, both could reach a process not
        # scheduled in between as one pending signal, a single Ctrl-C (the step ends, a checkpoint is saved)
        while "SIGINT: stopping after this step" not in (tmp_path / "err.txt").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    stderr = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1].startswith("interrupted by SIGINT after SIGINT, in the middle of a step: stopping "
                                              "without a checkpoint"), stderr[-3000:]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_after_the_command_has_ended_exits_128_plus_it_at_once_without_a_traceback(tmp_path, signum):
    """The process's own command line (main() without argv): a Ctrl-C after the command's last line, while the
    interpreter tears down, raised KeyboardInterrupt outside main, a traceback (or, later, death by SIGINT); a
    SIGTERM there (the dashboard's "Stop now" on a run writing its last line) or SIGHUP killed it: exit -15, -1. Now
    each exits 128 + its number at once, as a shell reports it (130, 143, 129); the command's output is flushed
    first."""
    script = ("import os, signal, sys, time\nfrom loraforge.cli import main\nsys.argv = ['loraforge', 'eval']\n"
              f"code = main()\nos.kill(os.getpid(), {int(signum)})\ntime.sleep(30)\nprint('slept')\nsys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in {signal.SIGINT, signum}])
    # each signal at its default action, as in a terminal: under nohup (a test run in the background) SIGHUP came
    # ignored, and loraforge keeps nohup's choice, so the sleep ran on (exit 2)
    assert (proc.returncode, proc.stderr) == (128 + signum, "error: invalid config:\n  eval: give a DATA file, or "
                                                            "--probe mc text kl (or both)\n")
    assert "slept" not in proc.stdout  # stopped in the sleep, not after it (no timing: a busy machine imports slowly)


# --- one run per output_dir; output folders that cannot be written ----------------------------------------------

def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_first(tiny_dir, data_file, tmp_path):
    """A process holding output_dir (as a live run does) makes a second `train --resume` there exit 2 with one line
    naming its pid, before it reads a checkpoint; once it is gone, a run there goes ahead and leaves no lock."""
    out = tmp_path / "run"
    with output_held_elsewhere(out) as holder:
        proc = cli(["train", *run_args(tiny_dir, data_file, out), "--resume"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_error_line(proc.stderr) == (f"error: another loraforge process (pid {holder.pid}) is training into "
                                           f"output_dir {out}; wait for it to end, or choose another output_dir")
    assert proc.stdout == ""  # refused before anything was loaded
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the holder's, killed: nothing else written
    train(load_train_config(None, run_args(tiny_dir, data_file, out)), progress=False)  # a stale lock is no lock
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "loss.png", "metrics.jsonl"]


def test_a_busy_output_dir_stops_every_torchrun_rank_at_once(tiny_dir, data_file, tmp_path):
    """Under torchrun only rank 0 takes output_dir's lock; held by another process, rank 0's refusal reaches the
    other rank at once: both exit 2, the line said once (by the node), long before training.collective_timeout, and
    without loading the model (each rank is a plain process with torchrun's environment, as test_distributed's)."""
    out = tmp_path / "run"
    hold = f"import time\nfrom loraforge.utils.outputs import hold_output\nwith hold_output({str(out)!r}):\n" \
           f"    print('held', flush=True)\n    time.sleep(900)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    procs, logs = [], []
    try:
        assert holder.stdout.readline() == "held\n"
        start = time.monotonic()
        for rank in range(2):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29551", "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
            logs.append((tmp_path / f"rank{rank}.out", tmp_path / f"rank{rank}.err"))
            with open(logs[-1][0], "w") as o, open(logs[-1][1], "w") as e:  # files: a full pipe would block a rank
                procs.append(subprocess.Popen([sys.executable, "-m", "loraforge", "train", str(cfg),
                                               *run_args(tiny_dir, data_file, out),
                                               "training.collective_timeout=3600"], cwd=ROOT, env=env, stdout=o,
                                              stderr=e))
        codes = [p.wait(timeout=1200) for p in procs]
        seconds = time.monotonic() - start
    finally:
        for p in [*procs, holder]:
            p.kill()
            p.wait()
    errors = [err.read_text() for _, err in logs]
    assert codes == [2, 2], errors
    expected = (f"error: another loraforge process (pid {holder.pid}) is training into output_dir {out}; wait for it "
                f"to end, or choose another output_dir")
    assert one_error_line(errors[0]) == expected and errors[1] == ""  # one node: said once, by its local rank 0
    # refused before anything was loaded; started without torchrun's agent, each says what it waits for
    assert [o.read_text() for o, _ in logs] == [f"rank {r}: waiting for the other 1 process(es) at 127.0.0.1:29551 "
                                                f"(up to training.collective_timeout, 3600 s)\n" for r in range(2)]
    # the start-up of two processes (75 s on a busy 2-core CPU), not the timeout: the timeout is an hour so that a
    # bound of 16x that start-up (300 s failed under load for no fault) is still a third of it
    assert seconds < 1200, seconds


def test_the_cli_leaves_the_process_group_it_joined_before_exiting(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    """Under torchrun the command joins a gloo group; it destroys it before returning its exit code, refused or
    not. A group left to interpreter shutdown tears gloo's threads down late, and a rank could die of SIGABRT
    ("terminate called without an active exception", exit -6) after printing its refusal: CI saw it once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code = main(["train", str(cfg), *run_args(tiny_dir, data_file, data_file)])  # output_dir is the data: refused
    assert (code, dist.is_initialized()) == (2, False)
    assert "output_dir" in capsys.readouterr().err


def test_an_output_dir_below_a_file_is_refused_with_one_line_before_loading(tiny_dir, data_file, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    proc = cli(["train", *run_args(tiny_dir, data_file, out)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.fullmatch(rf"error: output_dir: cannot write {re.escape(str(out))}: a part of the path is a file, not "
                        rf"a folder; fix that, or choose another output_dir",
                        one_error_line(proc.stderr)), proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_dir_the_file_system_will_not_create_is_one_line(tiny_dir, data_file, tmp_path):
    """/proc takes no new folders (mkdir answers ENOENT though /proc exists): the line was Python's own
    "[Errno 2] No such file or directory: '/proc/...'", not naming output_dir."""
    out = Path("/proc/loraforge-run")
    proc = cli(["train", *run_args(tiny_dir, data_file, out)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_error_line(proc.stderr) == (f"error: output_dir: cannot write {out}: No such file or "
                                           f"directory (the file system's answer); choose another output_dir")


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv to drop root's CAP_DAC_OVERRIDE")
@pytest.mark.parametrize("where", ["run", "parent/run"])
def test_a_read_only_output_dir_is_refused_with_one_line_before_loading(tiny_dir, data_file, tmp_path, where):
    """output_dir read-only, or to be made in a read-only folder (root without CAP_DAC_OVERRIDE obeys modes)."""
    out = tmp_path / where
    read_only = out if where == "run" else out.parent
    read_only.mkdir(parents=True)
    read_only.chmod(0o555)
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    proc = subprocess.run([*drop, sys.executable, "-m", "loraforge", "train", str(cfg),
                           *run_args(tiny_dir, data_file, out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.fullmatch(rf"error: output_dir: cannot write {re.escape(str(out))}: permission denied; fix that, or "
                        rf"choose another output_dir",
                        one_error_line(proc.stderr)), proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv to drop root's CAP_DAC_OVERRIDE")
@pytest.mark.parametrize("locked", ["metrics.jsonl", "checkpoints"])
def test_resume_of_a_run_copied_read_only_is_refused_before_loading_then_ends_as_the_uninterrupted_run(
        tiny_dir, data_file, tmp_path, interrupted, whole, locked):
    """Soak: checkpoints copied from a read-only share (cp -r keeps the modes: files r--), the folders made writable:
    --resume loaded the model and data, then ended with a PermissionError traceback opening metrics.jsonl (exit 1);
    a read-only checkpoints/ would end it at its first checkpoint. Refused in one line before anything loads; made
    writable as it says, the resume ends with the uninterrupted run's adapter."""
    (interrupted / locked).chmod(0o444 if locked == "metrics.jsonl" else 0o555)
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    proc = subprocess.run([*drop, sys.executable, "-m", "loraforge", "train", str(cfg), "--resume",
                           *run_args(tiny_dir, data_file, interrupted)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-3000:]
    assert one_error_line(proc.stderr) == (
        f"error: output_dir {interrupted}: {locked} is read-only, and --resume (resume=True) writes there (a copy "
        f"from a read-only share keeps its modes); make the run writable (chmod -R u+w {interrupted}), or choose "
        f"another output_dir")
    assert not (interrupted / "adapter").exists()
    subprocess.run(["chmod", "-R", "u+w", str(interrupted)], check=True)
    train(load_train_config(None, run_args(tiny_dir, data_file, interrupted)), resume=True, progress=False)
    assert_equal_adapters(adapter(interrupted), whole)


# --- resume: another config; metrics of the steps done again ----------------------------------------------------

@pytest.mark.parametrize("r", [8, 1])  # r=1: [1, k] would broadcast into [4, k] without a shape check
def test_resume_with_another_lora_r_names_the_setting(tiny_dir, data_file, interrupted, r):
    ckpt = interrupted / "checkpoints" / "step-0000002"
    weights = load_file(ckpt / "trainable.safetensors")
    name = next(iter(weights))
    was = list(weights[name].shape)
    now = [r if n == 4 else n for n in was]
    args = [*run_args(tiny_dir, data_file, interrupted), f"lora.r={r}"]
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, args), resume=True, progress=False)
    assert str(e.value) == (f"checkpoint {ckpt} does not match this model/config ({name} {was} in the checkpoint, "
                            f"{now} here; changed since it was written: lora.r: 4 -> {r}); resume with the config "
                            f"the run was started with")


def test_after_a_resume_metrics_hold_each_step_once(tiny_dir, data_file, interrupted):
    """The interrupted run logged step 3, then died saving its checkpoint; the resume from step 2 logs step 3 again:
    the file keeps the new row only, equal to the old one (a resume recomputes exactly)."""
    from loraforge.training.report import read_metrics

    def rows() -> list[dict]:  # without the timings, which differ from run to run
        return [{k: v for k, v in row.items() if k not in ("elapsed_s", "tokens_per_s")}
                for row in read_metrics(interrupted / "metrics.jsonl")]

    before = rows()
    assert [row["step"] for row in before] == [1, 2, 3]
    train(load_train_config(None, run_args(tiny_dir, data_file, interrupted)), resume=True, progress=False)
    after = rows()
    assert after == before  # steps 1, 2, 3 once each; step 3's loss, lr, grad norm and tokens exactly as logged


def test_appending_after_a_resume_drops_the_rows_past_its_step(tmp_path):
    from loraforge.training.report import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 2, "eval_loss": 1.7}\n'
                    '{"step": 3, "loss": 1.2}\n{"step": 3, "eval_loss": 1.4}\n{"step": 4, "lo')
    log = MetricsLog(path, append=True, until_step=2)
    log.write(step=3, loss=1.25)
    log.close()
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7},
                                  {"step": 3, "loss": 1.25}]


def test_a_resume_cuts_a_long_metrics_file_in_place_reading_its_tail_only(tmp_path, monkeypatch):
    """soak (3,000-step runs killed 30 times; 200,000 rows timed): every resume parsed each row of metrics.jsonl and
    wrote the file again whole (38 MB: 9 s on a busy 2-core machine, and a new inode, so a `tail -f` of it went
    quiet). Now the rows past the checkpoint's step are cut in place, reading from the end: the same rows stay."""
    import loraforge.training.report as report

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10 - s / 1000, **({"eval_loss": 9.0} if s % 100 == 0 else {})}
            for s in range(1, 5001)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5001, "lo')  # killed mid-line
    inode, parsed, loads = path.stat().st_ino, [], json.loads
    monkeypatch.setattr(report.json, "loads", lambda line: parsed.append(line) or loads(line))
    report.MetricsLog(path, append=True, until_step=4990).close()
    assert path.stat().st_ino == inode
    assert len(parsed) == 11  # rows 5000 .. 4991 and the one of step 4990 that stops the reading
    monkeypatch.undo()
    assert report.read_metrics(path) == rows[:4990]


def test_an_infinite_gradient_norm_with_a_finite_loss_stops_naming_the_scale(tiny_dir, data_file, tmp_path):
    """lora_alpha 1e30: the loss is finite (B starts at 0) but the gradients' norm overflows fp32. Without a check
    clipping turned every gradient to 0 and each step updated nothing, and the run still reported success."""
    cfg = load_train_config(None, run_args(tiny_dir, data_file, tmp_path / "run") + ["lora.lora_alpha=1e30"])
    with pytest.raises(TrainingError) as e:
        train(cfg, progress=False)
    assert str(e.value).startswith("the gradient norm is inf at step 1 (the loss, ")
    assert ("was finite); stopping before an update that would do nothing or write NaN. The last good checkpoint is "
            "none (no checkpoint was written yet). The adapter's scale is lora.lora_alpha / lora.r = 1e+30 / 4: lower "
            "lora.lora_alpha if it is unusually large. Else: " + nonfinite_advice(1e-2, "fp32", 1.0, step=2)
            ) in str(e.value)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_nonfinite_loss_after_an_update_names_the_adapters_scale(tiny_dir, data_file, tmp_path, monkeypatch,
                                                                  precision):
    """Carried over: the gradient-norm stop and fp16's named lora.lora_alpha, the NaN-loss stop of an fp32 or bf16
    run did not (an adapter scaled far too high was blamed on training.lr). It names a scale outside the usual
    range (a usual one is not a suspect: test_a_non_finite_stop_names_an_unusually_large_setting_first); step 1 (B
    still 0) names none."""
    original, calls = CausalLMLoss.forward, []

    def poisoned(self, batch):
        total, n = original(self, batch)
        calls.append(self.training)
        return (total * float("nan") if calls.count(True) == 2 and self.training else total), n

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    args = run_args(tiny_dir, data_file, tmp_path / "run") + ["lora.lora_alpha=1e20", f"training.precision={precision}"]
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, args), progress=False)
    last = tmp_path / "run" / "checkpoints" / "step-0000001"
    assert str(e.value) == (
        f"loss is nan at step 2; stopping. The last good checkpoint is {last}. The adapter's scale is "
        f"lora.lora_alpha / lora.r = 1e+20 / 4: lower lora.lora_alpha if it is unusually large. Else: "
        + nonfinite_advice(1e-2, precision, 1.0, step=2))


@pytest.mark.parametrize("override, named", [
    (["training.loraplus_lr_ratio=1e30"], "training.loraplus_lr_ratio is 1e+30 (16 is usual): lower it. Else: "),
    (["method=adalora", "adalora.orth_reg_weight=1e30", "adalora.tinit=0", "adalora.tfinal=0"],
     "adalora.orth_reg_weight is 1e+30 (0.5 is usual): lower it. Else: "),
])
def test_a_non_finite_stop_names_an_unusually_large_setting_first(tiny_dir, data_file, tmp_path, override, named):
    """Soak: 1e30 in either field stopped the run with advice naming training.lr only."""
    cfg = load_train_config(None, run_args(tiny_dir, data_file, tmp_path / "run") + override)
    with pytest.raises(TrainingError) as e:
        train(cfg, progress=False)
    assert ". " + named + "Lower training.lr" in str(e.value), str(e.value)


def test_an_update_that_makes_the_weights_infinite_stops_before_they_are_saved(tiny_dir, data_file, tmp_path):
    """lr 1e308: step 1's loss and gradients are finite, and its AdamW update (about lr per weight) overflows fp32.
    The run had finished and written an adapter of NaN and inf ("final loss 10.8"), which serving then refused."""
    cfg = load_train_config(None, run_args(tiny_dir, data_file, tmp_path / "run") + ["training.lr=1e308",
                                                                                     "training.max_steps=1"])
    with pytest.raises(TrainingError) as e:
        train(cfg, progress=False)
    assert str(e.value).startswith("the update of step 1 made trainable weights inf or NaN (the loss, ")
    assert str(e.value).endswith("The last good checkpoint is none (no checkpoint was written yet). Lower "
                                 "training.lr (it is 1e+308; try 1e+307)")
    assert not (tmp_path / "run" / "adapter").exists() and not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_an_error_during_training_starts_on_its_own_line_after_the_progress_bar(tiny_dir, data_file, tmp_path):
    """The CLI with its progress bar on (stderr, redrawn with \\r) and a TrainingError in step 1 (lora_alpha 1e30,
    as above): the bar is closed, ending its line, before `error: ...` is printed at column 0 of a line of its own."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg),
                           *run_args(tiny_dir, data_file, tmp_path / "run"), "lora.lora_alpha=1e30"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train:   0%" in proc.stderr  # the bar was drawn
    lines = proc.stderr.split("\n")  # not splitlines(): a "\r" of the bar must not pass for a line end
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith("error: the gradient norm is inf at step 1 (the loss, "), lines


def test_an_8bit_optimizer_checkpoints_and_resumes_to_the_uninterrupted_adapter(tiny_dir, data_file, tmp_path):
    """bitsandbytes' AdamW8bit keeps an int `step` and a nested mapping of quantized state: the checkpoint stores
    both (trainer_state.json, and flat safetensors keys) and a resume from step 2 ends equal to 3 steps in one go."""
    pytest.importorskip("bitsandbytes")
    args = ["training.optimizer=adamw_8bit"]
    whole_out, cut = tmp_path / "whole", tmp_path / "cut"
    train(load_train_config(None, run_args(tiny_dir, data_file, whole_out) + args), progress=False)
    stop_in_last_save(load_train_config(None, run_args(tiny_dir, data_file, cut) + args))
    state = (cut / "checkpoints" / "step-0000002" / "trainer_state.json").read_text()
    assert '"optimizer_scalars"' in state and '.step": 2' in state  # bitsandbytes' int step, per parameter
    train(load_train_config(None, run_args(tiny_dir, data_file, cut) + args), resume=True, progress=False)
    assert_equal_adapters(adapter(cut), adapter(whole_out))


def test_a_run_that_fails_before_writing_leaves_no_output_dir(tiny_dir, data_file, tmp_path):
    """The lock makes output_dir first; a run refused before it writes anything (here: no trainable layer) takes
    the folder away again, as before there was a lock. A folder that existed stays."""
    for out in (tmp_path / "new" / "run", tmp_path / "old"):
        existed = out == tmp_path / "old"
        if existed:
            out.mkdir()
        cfg = load_train_config(None, run_args(tiny_dir, data_file, out) + ["lora.target_modules=[nothing_here]"])
        with pytest.raises(Exception, match="matches no linear layer"):
            train(cfg, progress=False)
        assert out.exists() == existed and (not existed or list(out.iterdir()) == [])


@pytest.mark.parametrize("override,change", [
    ("training.lr=1e-5", "training.lr: 0.01 -> 1e-05"),
    ("training.max_steps=6", "total steps: 3 -> 6"),  # "train more": a step at lr 0, then another cosine
    ("training.schedule=constant", "training.schedule: 'cosine' -> 'constant'"),
])
def test_resume_with_another_schedule_names_the_setting(tiny_dir, data_file, interrupted, override, change):
    """A resumed run continues the checkpoint's optimizer and schedule: another lr or step count mixed two schedules
    silently (the lr stayed the checkpoint's; a longer run spent a step at lr 0)."""
    args = [*run_args(tiny_dir, data_file, interrupted), override]
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, args), resume=True, progress=False)
    said = (f"--resume: step-0000002 was written with other training settings ({change}); a resumed run continues "
            f"its optimizer and learning-rate schedule, so put them back as they were; to train on with new ones, ")
    # the run was killed: it has no adapter to start from yet (the advice named a folder that did not exist)
    assert str(e.value) == said + (f"finish this run first (--resume with them as they were), then start a new run "
                                   f"from the adapter it writes (training.init_adapter={interrupted / 'adapter'})")
    (interrupted / "adapter").mkdir()
    (interrupted / "adapter" / "adapter_config.json").write_text("{}")  # as a run that went on to its end
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, args), resume=True, progress=False)
    assert str(e.value) == said + (f"start a new run from the finished adapter (training.init_adapter="
                                   f"{interrupted / 'adapter'})")


def test_resume_with_another_schedule_and_rank_names_both_and_putting_them_back_resumes(tiny_dir, data_file,
                                                                                         interrupted):
    """Soak: `loraforge train examples/demo.yaml --resume` after a run started with training.lr=5e-4 lora.r=8 named
    only training.lr; put back, the next try was refused again, for lora.r. Both are named at once now, and the
    settings the message asks for resume the run to its end."""
    args = run_args(tiny_dir, data_file, interrupted)
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, [*args, "training.lr=1e-3", "lora.r=8"]), resume=True, progress=False)
    assert str(e.value).startswith("--resume: step-0000002 was written with other settings (training.lr: 0.01 -> "
                                   "0.001; lora.r: 4 -> 8); a resumed run continues its optimizer and learning-rate "
                                   "schedule, so put them back as they were;"), str(e.value)
    assert train(load_train_config(None, args), resume=True, progress=False).steps == 3


def test_resume_of_adalora_with_another_step_count_says_to_merge_not_to_train_on(tiny_dir, data_file, tmp_path):
    """The advice was training.init_adapter, which refuses an AdaLoRA adapter. The merge it names is a whole command
    (soak: `loraforge merge --adapter DIR` alone is refused for its missing --base and --out), and it runs."""
    out = tmp_path / "run"
    args = [a for a in run_args(tiny_dir, data_file, out) if not a.startswith("lora.")] + [
        "method=adalora", "adalora.init_r=4", "adalora.target_r=2", "adalora.tinit=0", "adalora.tfinal=1"]
    stop_in_last_save(load_train_config(None, args))
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, [*args, "training.max_steps=6"]), resume=True, progress=False)
    assert str(e.value).endswith(f"to train on with new ones, finish this run first (--resume with them as they "
                                 f"were), then merge its adapter into the base (loraforge merge --base {tiny_dir} "
                                 f"--adapter {out / 'adapter'} --out DIR) and train a new adapter on the merged model "
                                 f"(model.name=DIR)")
    train(load_train_config(None, args), resume=True, progress=False)  # finished as it was
    command = str(e.value).split("(loraforge merge ")[1].split(")")[0].replace("DIR", str(tmp_path / "merged"))
    proc = subprocess.run([sys.executable, "-m", "loraforge", "merge", *command.split()], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "merged" / "config.json").is_file(), proc.stderr[-2000:]


def test_resume_after_data_overflow_changed_names_the_setting(tiny_dir, tmp_path):
    """A checkpoint of long text records truncated (data.overflow's default before `auto`), resumed with them cut
    into windows: the same file read another way. The refusal named only the file ("40 examples then, 104 now"),
    as if it had been edited; it now names the setting too."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{i}-{j}" for j in range(60))}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    args = run_args(tiny_dir, data, out) + ["data.max_seq_len=32"]
    stop_in_last_save(load_train_config(None, args + ["data.overflow=truncate"]))
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, args), resume=True, progress=False)  # overflow: auto, windows
    said = str(e.value)
    assert said.startswith("--resume: the training data changed since step-0000002 was written (docs.jsonl: 8 "
                           "examples then, ")
    assert ("as the settings that read it did (data.overflow: 'truncate' -> 'auto'); its place in the data would "
            "now repeat or skip examples, so put the data and those settings back as they were") in said
    assert train(load_train_config(None, args + ["data.overflow=truncate"]), resume=True, progress=False).steps == 3


def test_resume_onto_data_that_changed_under_the_same_path_is_refused(tiny_dir, data_file, tmp_path):
    """Only the path was compared: a file rewritten with other rows resumed at the checkpoint's place in other
    data, silently (the final loss was another run's)."""
    data = tmp_path / "train.jsonl"
    shutil.copy(data_file, data)
    out = tmp_path / "run"
    stop_in_last_save(load_train_config(None, run_args(tiny_dir, data, out)))
    rows = data.read_text().splitlines(keepends=True)
    for changed, said in [(rows[:-1], "40 examples then, 39 now"), (rows[1:] + rows[:1], "as many examples (40), "
                                                                                          "other tokens")]:
        data.write_text("".join(changed))  # one row fewer; the same rows in another order
        with pytest.raises(TrainingError) as e:
            train(load_train_config(None, run_args(tiny_dir, data, out)), resume=True, progress=False)
        assert str(e.value) == (f"--resume: the training data changed since step-0000002 was written (train.jsonl: "
                                f"{said}); its place in the data "
                                f"would now repeat or skip examples, so put the data back as it was; to train on the "
                                f"new data, start a new run (training.init_adapter starts it from an adapter)")
    data.write_text("".join(rows))
    assert train(load_train_config(None, run_args(tiny_dir, data, out)), resume=True, progress=False).steps == 3


def test_resume_with_another_seed_that_draws_another_held_out_split_names_the_seed(tiny_dir, data_file, tmp_path):
    """Soak: the seed draws the held-out split, so the training data changed with it, and the refusal said only
    that the data changed ("put the data back as it was"), never training.seed."""
    args = run_args(tiny_dir, data_file, tmp_path / "run") + ["data.eval_fraction=0.25"]
    stop_in_last_save(load_train_config(None, args))
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, args + ["training.seed=4"]), resume=True, progress=False)
    assert "), as the settings that read it did (training.seed: 3 -> 4); its place in the data would now repeat or " \
           "skip examples, so put the data and those settings back as they were;" in str(e.value), str(e.value)


@pytest.mark.parametrize("key,value", [
    ("lora.lora_alpha", 4.0),  # the saved scale would not be the one the weights were trained with
    ("training.seed", 5),  # another order of the epoch: examples repeated or skipped
    ("data.max_seq_len", 48),
    ("training.max_grad_norm", 0.1),
])
def test_resume_with_another_setting_that_changes_the_result_is_refused(tiny_dir, data_file, interrupted, key, value):
    """Only the schedule was compared: another lora_alpha, seed, dataset or clipping resumed without a word and
    ended elsewhere than the run would have (a lora_alpha saved over weights trained with another)."""
    saved = json.loads((interrupted / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())["config"]
    section, field = key.split(".")
    assert saved[section][field] != value
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, [*run_args(tiny_dir, data_file, interrupted), f"{key}={value}"]), resume=True,
              progress=False)
    assert str(e.value) == (f"--resume: step-0000002 was written with other settings ({key}: "
                            f"{saved[section][field]!r} -> {value!r}); a resumed run trains on the adapter, optimizer "
                            f"and place in the data it saved, so put them back as they were; to train with new ones, "
                            f"start a new run (training.init_adapter starts it from an adapter)")
    assert not (interrupted / "adapter").exists()


def test_resume_with_settings_that_only_change_speed_or_reporting_ends_with_the_uninterrupted_adapter(
        tiny_dir, data_file, interrupted, tmp_path):
    """How often it evaluates, saves and logs and which kernels run the same math may change on --resume; a moved
    model folder is resumed with a warning naming it."""
    moved = Path(shutil.copytree(tiny_dir, tmp_path / "moved"))
    args = [*run_args(tiny_dir, data_file, interrupted)]
    args = [a.replace(str(tiny_dir), str(moved)) for a in args] + [
        "training.log_every=2", "training.keep_checkpoints=5", "training.fused_lora=false",
        "training.gradient_checkpointing=true"]
    with pytest.warns(UserWarning, match=re.escape(f"--resume: changed since step-0000002 was written: model.name: "
                                                   f"{str(tiny_dir)!r} -> {str(moved)!r}; resuming with the new")):
        train(load_train_config(None, args), resume=True, progress=False)
    straight = tmp_path / "straight"
    train(load_train_config(None, run_args(tiny_dir, data_file, straight)), progress=False)
    ours, theirs = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (interrupted, straight))
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)


def test_resume_with_fewer_target_modules_names_the_weights_not_in_this_model(tiny_dir, data_file, interrupted):
    """The checkpoint holds weights the model has no place for: it said 'missing []'."""
    weights = sorted(load_file(interrupted / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    extra = [n for n in weights if "q_proj" not in n]
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, [*run_args(tiny_dir, data_file, interrupted), "lora.target_modules=[q_proj]"]),
              resume=True, progress=False)
    assert str(e.value).startswith(f"checkpoint {interrupted / 'checkpoints' / 'step-0000002'} does not match this "
                                   f"model/config (not in this model {extra[:3]}; changed since it was written: "
                                   f"lora.target_modules: ")
