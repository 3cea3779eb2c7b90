"""The benchmark scripts import, parse their arguments and follow the precision rule (their runs are not tests)."""

import importlib
import importlib.util
import json
import os
import subprocess
import threading
import sys
from pathlib import Path

import pytest
import torch

from loraforge.precision import choose

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", ["train", "qlora", "variants", "serve", "soak", "decode", "adapters_llamacpp",
                                    "detokenize"])
def test_bench_script_prints_its_help(script):
    out = subprocess.run([sys.executable, BENCH / f"{script}.py", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:")


def test_train_bench_defaults_to_auto_and_names_a_bad_precision(tmp_path):
    out = subprocess.run([sys.executable, BENCH / "train.py", "--help"], capture_output=True, text=True, timeout=120)
    assert "--dtypes DTYPES" in out.stdout and "auto (what" in out.stdout
    out = subprocess.run([sys.executable, BENCH / "train.py", "--dtypes", "auto,fp8"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "LORAFORGE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 2 and "--dtypes: unknown precision 'fp8'" in out.stderr
    assert not (tmp_path / "cache").exists()  # named before the model is converted (a 538 MB cache)


@pytest.mark.parametrize("script, args, message", [
    ("serve", ["--repeats", "0"], "--repeats must be at least 1 (one round of every run), got 0"),
    pytest.param("serve", ["--device", "cuda"], "--device cuda: torch sees no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    ("adapters_llamacpp", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
    ("train", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("profile_train", ["--batch", "0"], "--batch must be at least 1, got 0"),
    ("profile_train", ["--variant", "lf-bogus"], "--variant: unknown variant 'lf-bogus'; choose from peft, lf,"),
    ("qlora", ["--steps", "1"], "--steps must be at least 2, got 1"),
    ("qlora", ["--seq-len", "1"], "--seq-len must be at least 2, got 1"),
    ("decode", ["--tokens", "0"], "--tokens must be at least 1, got 0"),
    ("distributed", ["--nproc", "0"], "--nproc must be at least 1, got 0"),
    ("variants", ["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    ("serve", ["--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    ("serve", ["--adapters", "1,0"], "--adapters: every K must be a whole number of at least 1, got '0'"),
    ("soak", ["--clients", "0"], "--clients must be at least 1, got 0"),
    ("train", ["--text-len", "1"], "--text-len must be at least 8, got 1"),
    ("train", ["--micro-batch", "0"], "--micro-batch must be at least 1, got 0"),
    ("train", ["--model", "/nonexistent/model"], "--model: model '/nonexistent/model' not found: give a"),
    ("adapters_llamacpp", ["--clients", "-3"], "--clients must be at least 1, got -3"),
    ("detokenize", ["--tokens", "100,0"], "--tokens: every length must be a whole number of at least 1, got '0'"),
])
def test_bench_counts_below_one_and_a_missing_device_are_refused_by_name(script, args, message):
    out = subprocess.run([sys.executable, BENCH / f"{script}.py", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_refuses_a_machine_without_cuda_at_once(tmp_path):
    """bench/gpu.sh without a CUDA GPU used to run every step to a traceback and print a table of FAILs: now one line
    and exit 2, before it installs or writes anything."""
    out = tmp_path / "gpu-out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    proc = subprocess.run(["bash", BENCH / "gpu.sh", str(tmp_path / "no-wheels"), str(tmp_path / "no-tokenizer")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("bench/gpu.sh: torch (") and "sees no CUDA GPU here" in proc.stderr
    assert not out.exists()


def test_gpu_script_says_the_suite_needs_pytest_xdist_where_it_is_missing(tmp_path):
    """GPU_STEPS=all's suite step ran pytest -n 12 where pytest-xdist was not installed (the GPU image lacks it, and
    bench/gpu_wheels.sh did not gather it): a usage error, "FAIL" and nothing more. The step now says what is missing
    (and gpu_wheels.sh gathers it). PYTHON is a stand-in that answers the script's CUDA check (and every other call)
    with success and runs only the xdist check; only the suite step runs."""
    if importlib.util.find_spec("xdist") is not None:
        pytest.skip("pytest-xdist is installed here: the step would run the suite")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\n[ "$1 $2" = "-c import xdist" ] && exec {sys.executable} "$@"\nexit 0\n')
    python.chmod(0o755)
    out = tmp_path / "gpu-out"
    env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "GPU_STEPS": "suite"}
    subprocess.run(["bash", BENCH / "gpu.sh", str(tmp_path / "no-wheels"), str(tmp_path / "no-tokenizer")],
                   capture_output=True, text=True, timeout=120, env=env)
    assert (out / "suite.log").read_text() == (f"pytest-xdist is not installed for {python}: the suite runs in 12 "
                                               f"processes to fit its limit; install it (bench/gpu_wheels.sh gathers "
                                               f"its wheel)\n")
    assert [line.split()[:2] for line in (out / "summary.txt").read_text().splitlines()[:-1]] == [["suite", "FAIL"]]
    assert "pytest-xdist" in (BENCH / "gpu_wheels.sh").read_text()


def test_qlora_bench_runs_bf16_only_where_the_rule_picks_it(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import qlora

    here = qlora.default_runs("fp32")  # a CPU without native bf16
    assert "lora-fp32" in here and "qlora-fp32" in here and "qlora-fp32-nockpt" in here
    assert not any("bf16" in name for name in here)
    assert {"lora-bf16", "qlora-bf16"} <= set(qlora.default_runs("bf16"))
    assert all(qlora.RUNS[name][1] == "fp32" for name in qlora.default_runs("fp16"))  # no fp16 runs: fp32 only


def test_hardware_header_names_the_cpu_and_the_auto_choice(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import hardware

    info = hardware.describe("cpu")
    auto = choose("auto", "auto", device="cpu", warn=False)
    assert info["auto_precision"] == auto.compute and info["precision_line"] == auto.line()
    assert info["cores"] >= 1 and info["cpu_capability"]
    cpu, choice = hardware.header(info).splitlines()
    assert cpu.startswith("CPU ") and f"({info['cpu_capability']}, {info['cores']} cores" in cpu
    assert choice == f"auto: {auto.line()}"


def test_profile_floor_timer_groups_products_and_counts_their_flops(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_train

    x, w, a, b = torch.randn(32, 24), torch.randn(40, 24), torch.randn(4, 24), torch.randn(40, 4)
    q, k = torch.randn(3, 8, 5), torch.randn(3, 5, 8)
    timer = profile_train.OperatorTimer(lora_rank=4)
    with timer:
        y = x @ w.T  # a frozen linear: 2·32·24·40
        y.addmm_(x @ a.T, b.T)  # LoRA: 2·32·24·4 + 2·32·4·40
        torch.bmm(q, k)  # attention: 2·3·8·5·8
        y.relu()
    assert timer.flops["frozen linears + head"] == 2 * 32 * 24 * 40
    assert timer.flops["LoRA products"] == 2 * 32 * 24 * 4 + 2 * 32 * 4 * 40
    assert timer.flops["attention products"] == 2 * 3 * 8 * 5 * 8
    assert set(timer.seconds) == {"frozen linears + head", "LoRA products", "attention products", "other operators"}


def test_train_bench_ceiling_counts_the_models_frozen_linears_and_head(monkeypatch):
    """bench/train.py's ceiling FLOPs: forward + input gradient (4 per weight and token) of every decoder linear for
    every token and of the head for the supervised ones, counted here from the model's own nn.Linear weights."""
    from types import SimpleNamespace

    from helpers import tiny_llama

    monkeypatch.syspath_prepend(str(BENCH))
    import train

    model = tiny_llama(num_key_value_heads=1, intermediate_size=48)
    linears = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and name != "lm_head")
    rows = [SimpleNamespace(input_ids=[0] * 7, labels=[-100] * 4 + [1] * 3),  # 3 supervised of the 6 shifted
            SimpleNamespace(input_ids=[0] * 5, labels=[-100] + [1] * 4)]
    expected = 4 * (12 * linears + 7 * model.lm_head.weight.numel())
    assert train.frozen_flops(rows, model.config) == expected
    assert train.frozen_flops(rows, model.config) < train.useful_flops(rows, model.config, lora_params=0)


def test_packed_rows_count_the_attention_that_runs_sequence_by_sequence(monkeypatch):
    """"Matmul use" of loraforge's packed rows: lean attention runs each packed sequence on its own, so its executed
    FLOPs are the sequences' own (equal to the useful count, on rows without padding), not the whole rows' (which
    read 136% of the peak on 2,048-token rows); a model on another attention runs the whole rows."""
    monkeypatch.syspath_prepend(str(BENCH))
    import train

    from helpers import tiny_llama

    from loraforge.training import data as D
    from loraforge.training.fastpath import LEAN_KEEP_ATTENTION, LEAN_MASKED_ATTENTION, register_attention

    examples = [D.Example([1] * n, [1] * n) for n in (5, 3, 4, 6)]
    batch = D.collate(D.pack(examples, 9), pad_id=0)
    assert tuple(batch["input_ids"].shape) == (2, 9)  # 6 + 3 and 5 + 4: no padding
    model = tiny_llama()
    assert train.by_sequence(batch, model) is None  # transformers' attention: whole rows
    model.set_attn_implementation(register_attention())
    sequences = train.by_sequence(batch, model)
    assert sorted(sequences) == [3, 4, 5, 6]
    model.set_attn_implementation(LEAN_KEEP_ATTENTION)  # lf-keepprobs: one by one too
    assert train.by_sequence(batch, model) == sequences
    model.set_attn_implementation(LEAN_MASKED_ATTENTION)  # lf-noseg: whole rows with their mask
    assert train.by_sequence(batch, model) is None
    head = sum(n - 1 for n in (5, 3, 4, 6))
    useful = train.useful_flops(examples, model.config, lora_params=10)
    assert train.executed_flops(2, 9, 0, head, model.config, 10, sequences) == pytest.approx(useful, rel=1e-12)
    assert train.executed_flops(2, 9, 0, head, model.config, 10) > useful * 1.001


def test_train_bench_names_the_worker_that_failed(tiny_dir, tmp_path):
    """A worker that fails (here: a model folder whose weights are gone) ends the bench with one message naming the
    trainer, precision and data and the end of the worker's output, not a traceback of the bench's own."""
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    args = ["--model", str(broken), "--shapes", "demo", "--variants", "peft,lf", "--dtypes", "fp32", "--rounds", "1",
            "--steps", "1", "--warmup", "0", "--batch", "2"]
    proc = subprocess.run([sys.executable, BENCH / "train.py", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "bench/train.py: the peft worker (fp32, demo data) failed (exit 1); the end of its output:" in proc.stderr
    assert "Traceback" not in proc.stderr.split("the end of its output:")[0]


def test_train_bench_runs_peft_and_loraforge_end_to_end_with_equal_losses(tiny_dir, tmp_path):
    """One short round of bench/train.py on the tiny model, PEFT as the baseline and loraforge, on the shared-prefix
    and packed-text shapes: both workers run (each its own process, with the memory settings train() would use) and
    every step's fp32 loss agrees with PEFT's."""
    out = tmp_path / "train-tiny.json"
    args = ["--model", str(tiny_dir), "--shapes", "demo,text", "--variants", "peft,lf", "--dtypes", "fp32",
            "--rounds", "1", "--steps", "2", "--warmup", "1", "--batch", "4", "--text-rows", "2", "--text-len", "64",
            "--pack-len", "64", "--json", str(out)]
    proc = subprocess.run([sys.executable, BENCH / "train.py", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(out.read_text())["raw"]
    for shape in ("demo", "text"):
        (peft,), (ours,) = raw[f"{shape}/peft/fp32"], raw[f"{shape}/lf/fp32"]  # one round each
        assert len(peft["losses"]) == len(ours["losses"]) == 3  # the warm-up step and the two timed
        assert ours["losses"] == pytest.approx(peft["losses"], rel=1e-4), shape
        for run in (peft, ours):  # the resident set after loading (VmRSS), at most loading's peak (ru_maxrss)
            assert 0 < run["rss_after_load_mb"] <= run["rss_peak_loading_mb"] <= run["peak_mb"]
        for run in (peft, ours):  # the same ceiling for both: their step's frozen work over the same tokens
            assert run["frozen_flops_per_s"] / run["tokens_per_s"] == pytest.approx(
                peft["frozen_flops_per_s"] / peft["tokens_per_s"], rel=1e-9)
    assert "ceiling demo fp32: " in proc.stdout and "ceiling text fp32: " in proc.stdout

    # bench/gpu.sh's one table (bench/gpu_summary.py) gives every row of that JSON, with its numbers
    (tmp_path / "summary.txt").write_text("train-tiny     PASS    12s  rc=0\n")
    (tmp_path / "serve.log").write_text("warm-up\n| run (median of 1 rounds) | tok/s |\n|---|---|\n| base | 55.9 |\n")
    proc = subprocess.run([sys.executable, BENCH / "gpu_summary.py", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "train-tiny     PASS    12s  rc=0" and lines[-1] == "| base | 55.9 |" and "warm-up" not in lines
    table = json.loads(out.read_text())["table"]
    rows = [line for line in lines if line.startswith("| train-tiny |")]
    assert len(rows) == len(table) == 4
    for line, r in zip(rows, table):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:4] == [r["shape"], r["dtype"], r["variant"]]
        assert float(cells[4]) == pytest.approx(r["tokens_per_s"], abs=0.5)
        assert float(cells[5]) == pytest.approx(r["speedup"], abs=0.005)
        assert float(cells[7]) == pytest.approx(r["memory_ratio"], abs=0.005)
        assert float(cells[9]) == pytest.approx(r["final_loss"], abs=5e-5)


def test_a_train_bench_cut_short_keeps_the_rows_it_measured(monkeypatch, tmp_path):
    """bench/gpu.sh stops each step at its time limit (train-135m: 200 s for six workers of ~31 s on the H200's
    host): --json was written only at the end, so a step cut there lost every row it had measured. It is now
    written after each worker (renamed into place), with the blocks whose every trainer ran, and the summary marks
    it cut short."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_summary
    import train

    def result(tps):
        return {"tokens_per_s": tps, "peak_mb": 100.0, "train_peak_mb": None, "flops_per_s": 1e9,
                "frozen_flops_per_s": 5e8, "executed_flops_per_s": 2e9, "losses": [2.0, 1.5], "final_loss": 1.5,
                "seconds": 1.0, "sys_seconds": 0.0}

    measured = iter([result(100.0), result(250.0)])

    def worker(variant, dtype, shape, args):
        try:
            return next(measured)
        except StopIteration:  # the third worker: the time limit's SIGTERM
            raise SystemExit(143) from None

    monkeypatch.setattr(train, "run_worker", worker)
    monkeypatch.setattr(train, "matmul_peak", lambda dtype, device: 1e10)
    monkeypatch.setattr(train, "resolve_model", lambda name: name)
    monkeypatch.setattr(train, "describe", lambda device: {"device": device})
    monkeypatch.setattr(train, "header", lambda hardware: "header")
    out = tmp_path / "train-135m.json"
    monkeypatch.setattr(sys, "argv", ["train.py", "--shapes", "demo,text", "--variants", "peft,lf", "--dtypes", "fp32",
                                      "--rounds", "1", "--device", "cpu", "--json", str(out)])
    with pytest.raises(SystemExit):
        train.main()
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and sorted(saved["raw"]) == ["demo/lf/fp32", "demo/peft/fp32"]
    assert [(r["shape"], r["variant"], r["tokens_per_s"], r["speedup"]) for r in saved["table"]] == [
        ("demo", "peft", 100.0, 1.0), ("demo", "lf", 250.0, 2.5)]  # text: no trainer ran, no row
    assert gpu_summary.train_rows(tmp_path)[2:] == [
        "| train-135m (cut short) | demo | fp32 | peft | 100 | 1.00 | 100 | 1.00 | 10.0% | 1.5000 |",
        "| train-135m (cut short) | demo | fp32 | lf | 250 | 2.50 | 100 | 1.00 | 10.0% | 1.5000 |"]


def test_free_part_variants_each_remove_their_part_and_nothing_else(tiny_dir, tmp_path):
    """bench/train.py's lf-free-* variants (bench/free_parts.py, timing only) run loraforge's step on packed text
    with one part made free: with LoRA free the first step's loss is loraforge's own (B = 0 at the start, so the
    adapters add nothing yet: the frozen path is untouched) and later ones differ (nothing trains); every other
    part changes the first step's loss already (its math is gone)."""
    out = tmp_path / "free.json"
    variants = ["lf"] + [f"lf-free-{part}" for part in ("attention", "softmax", "lora", "mlp-act", "norm")]
    args = ["--model", str(tiny_dir), "--shapes", "text", "--variants", ",".join(variants), "--dtypes", "fp32",
            "--rounds", "1", "--steps", "2", "--warmup", "1", "--text-rows", "2", "--text-len", "64", "--json",
            str(out)]
    proc = subprocess.run([sys.executable, BENCH / "train.py", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(out.read_text())["raw"]
    (ours,) = raw["text/lf/fp32"]
    for variant in variants[1:]:
        (free,) = raw[f"text/{variant}/fp32"]
        assert len(free["losses"]) == len(ours["losses"]) == 3
        if variant == "lf-free-lora":
            assert free["losses"][0] == pytest.approx(ours["losses"][0], rel=1e-6)
            assert free["losses"][2] != pytest.approx(ours["losses"][2], rel=1e-4)
        else:
            assert free["losses"][0] != pytest.approx(ours["losses"][0], rel=1e-4), variant


def test_free_parts_restore_the_kernels_they_replaced(monkeypatch):
    """apply() replaces names in loraforge.kernels and returns the originals; restore() puts every one back, and an
    unknown part is refused by name before anything is replaced."""
    monkeypatch.syspath_prepend(str(BENCH))
    import free_parts

    from loraforge import kernels as K

    names = [name for patch in free_parts.PATCHES.values() for name in patch]
    before = {name: getattr(K, name) for name in names}
    originals = free_parts.apply(free_parts.PARTS)
    assert all(getattr(K, name) is not before[name] for name in names)
    free_parts.restore(originals)
    assert all(getattr(K, name) is before[name] for name in names)
    with pytest.raises(ValueError, match="unknown part.s. mlp; choose from attention, softmax"):
        free_parts.apply(("attention", "mlp"))
    assert all(getattr(K, name) is before[name] for name in names)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_train_bench_reads_the_loaded_resident_set_and_its_peak_at_one_moment(monkeypatch):
    """The worker records the resident set after loading and its peak so far. Read one after the other, the set
    could grow a page in between and stand above the peak read before it (CI: 510.2617 > 510.2578 MiB); one read of
    /proc/self/status gives both as the kernel computed them together. Checked while a thread keeps touching new
    pages, the moment the two reads would disagree."""
    monkeypatch.syspath_prepend(str(BENCH))
    train = importlib.import_module("train")
    stop, grown = threading.Event(), []

    def grow():
        while not stop.is_set():
            grown.append(bytearray(16 * 4096))  # touched at once (zeroed): new resident pages
            if len(grown) > 2000:
                grown.clear()

    thread = threading.Thread(target=grow)
    thread.start()
    try:
        reads = [train.rss_peak_and_now_mb() for _ in range(3000)]
    finally:
        stop.set()
        thread.join()
    assert all(now is not None and 0 < now <= peak for peak, now in reads)
