"""Per-process memory with 2 processes: FSDP (training.distributed=fsdp) against DDP, in one run, and the estimator.

    python bench/distributed.py                    # built-in SmolLM2-135M, LoRA r=16, fp32, 2 processes, 3 steps
    python bench/distributed.py --nproc 4 --method full --steps 2

For each mode, torchrun starts the processes (gloo on CPU, nccl on CUDA) running loraforge's training recipe
(setup() and fit() of loraforge.training.loop on the demo data). Every process reports:
  base share  the bytes of the model's parameters it holds after set-up (FSDP: its shards, DDP: the whole model)
  runtime     RSS after importing torch and transformers, before any model (CPU)
  steps peak  the peak over the training steps alone (CPU: the peak RSS reset after set-up through
              /proc/self/clear_refs, freed memory returned with malloc_trim; CUDA: max allocated, reset likewise)
  life peak   the process's peak over its whole life: on CPU each process loads the whole base before FSDP
              shards it, so set-up, not training, sets this one under FSDP
and the table prints the ratio FSDP / DDP of each, with loraforge estimate's per-device figure for the same run
(`studies.estimate.per_device`). Timings and RSS on a shared machine vary with the load; the ratios are measured
in the same run. The FSDP and DDP adapters are compared too (the same global batch: they must agree).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from flags import at_least  # noqa: E402


def rss_mb() -> float:
    """Resident memory now (CPU), from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def hwm_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), from /proc."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def reset_peak(torch) -> None:
    """Return freed memory to the system and start counting the peak again (Linux: clear_refs 5; CUDA too)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def overrides(args, mode: str, out: Path) -> list[str]:
    demo = ROOT / "loraforge" / "assets" / "demo_train.jsonl"
    return [f"model.name={args.model}", f"data.train={demo}", "data.eval_fraction=0", f"method={args.method}",
            "lora.r=16", "lora.lora_alpha=32", "lora.lora_dropout=0", "training.lr=1e-3",
            f"training.max_steps={args.steps}", f"training.batch_size={args.batch}", "training.seed=0",
            f"training.precision={args.precision}", f"training.distributed={mode}", f"output_dir={out}"]


def worker(args) -> None:
    """One process of one mode: set-up, the steps, the final save; its figures as JSON under --out."""
    import torch
    import transformers  # noqa: F401  (the runtime figure includes it, as every training process imports it)
    from torch.distributed.tensor import DTensor

    from loraforge.config import load_train_config
    from loraforge.training.loop import finish, fit, setup
    from loraforge.training.report import peak_memory_mb

    runtime = rss_mb()
    out = Path(args.out)
    cfg = load_train_config(None, overrides(args, args.worker, out / args.worker))
    lock = contextlib.ExitStack()  # output_dir's lock for this process's run (released when the worker exits)
    run = setup(cfg, resume=False, overwrite=True, precision=None, held=lock)
    held = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in run.model.parameters())
    reset_peak(torch)
    loss, eval_loss, seconds = fit(run, progress=False)
    steps_peak = peak_memory_mb(run.device) if run.device.type == "cuda" else hwm_mb()
    finish(run, loss, eval_loss, seconds, 0)
    record = {"rank": run.rank, "world": run.world, "base_share_mb": held / 2**20, "runtime_mb": runtime,
              "steps_peak_mb": steps_peak, "peak_mb": peak_memory_mb(run.device), "device": run.device.type,
              "seconds": seconds,
              "loss": loss}
    (out / f"{args.worker}-{run.rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


def launch(args, mode: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={args.port}", __file__, "--worker", mode, "--out", str(out)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("model", "method", "steps", "batch", "precision")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"{mode}-{r}.json").read_text()) for r in range(args.nproc)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--port", type=int, default=29561)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    at_least(p, args, nproc=1, steps=1, batch=1)
    if args.worker:
        return worker(args)

    from safetensors.torch import load_file

    from hardware import describe, header
    from loraforge.studies.estimate import estimate, per_device

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        results = {mode: launch(args, mode, out) for mode in ("ddp", "fsdp")}
        agree = None
        if args.method == "lora":
            a, b = (load_file(out / m / "adapter" / "adapter_model.safetensors") for m in ("ddp", "fsdp"))
            agree = max(float((a[k] - b[k]).abs().max()) for k in a)
    import torch

    print(header(describe("cuda" if torch.cuda.is_available() else "cpu")))
    print(f"{args.model} {args.method}, {args.nproc} processes × batch {args.batch}, {args.steps} steps, "
          f"{args.precision}")
    print(f"{'mode':5} {'rank':>4} {'base share MB':>14} {'runtime MB':>11} {'steps peak MB':>14} "
          f"{'above runtime':>14} {'life peak MB':>13} {'estimate MB':>12}")
    seq = 128  # the demo's rows are short; the estimator's activations for this many tokens per row
    base = estimate(args.model, args.method, batch_size=args.batch, seq_len=seq, r=16, dtype=args.precision)
    for mode, records in results.items():
        est = per_device(base, args.model, args.method, args.nproc, mode, args.precision)["total"] / 2**20
        for r in records:
            print(f"{mode:5} {r['rank']:>4} {r['base_share_mb']:>14.1f} {r['runtime_mb']:>11.0f} "
                  f"{r['steps_peak_mb']:>14.0f} {r['steps_peak_mb'] - r['runtime_mb']:>14.0f} {r['peak_mb']:>13.0f} "
                  f"{est:>12.0f}")

    def mean(mode, key):
        return sum(r[key] for r in results[mode]) / len(results[mode])

    above = {m: mean(m, "steps_peak_mb") - mean(m, "runtime_mb") for m in results}
    print(f"FSDP / DDP per process: base share {mean('fsdp', 'base_share_mb') / mean('ddp', 'base_share_mb'):.3f}, "
          f"steps peak {mean('fsdp', 'steps_peak_mb') / mean('ddp', 'steps_peak_mb'):.3f}, steps peak above the "
          f"runtime {above['fsdp'] / above['ddp']:.3f}, "
          f"life peak {mean('fsdp', 'peak_mb') / mean('ddp', 'peak_mb'):.3f}")
    print(f"seconds for the {args.steps} steps: ddp {mean('ddp', 'seconds'):.1f}, fsdp {mean('fsdp', 'seconds'):.1f}")
    print(f"final loss ddp {results['ddp'][0]['loss']:.6f}, fsdp {results['fsdp'][0]['loss']:.6f}"
          + (f"; adapters differ by at most {agree:.2e}" if agree is not None else ""))


if __name__ == "__main__":
    main()
