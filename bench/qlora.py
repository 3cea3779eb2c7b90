"""LoRA vs QLoRA on SmolLM2-135M: base-weight memory, peak memory, step time, final loss; estimator check.

    python bench/qlora.py [--steps 8] [--batch-size 4] [--seq-len 128] [--runs lora-fp32 qlora-fp32 ...]

Each run is its own process, so peak memory is that run's alone: on CPU the peak resident set since the model
was loaded (Linux: /proc/self/clear_refs resets VmHWM) minus the resident set before loading; on CUDA
torch.cuda.max_memory_allocated. The training loop here is deliberately minimal (forward, loss, backward,
AdamW on the trainable parameters) so the numbers are the method's, not the trainer's; the loss is
`loraforge train`'s (training.loss.CausalLMLoss: the head in row chunks, no full-vocabulary logits kept), which
is what the estimator counts. Runs:
  lora-fp32          fp32 base, fp32 adapters (as estimate(dtype="fp32"))
  qlora-fp32         NF4 base, fp32 compute, gradient checkpointing (what `loraforge train --quantize nf4` does)
  qlora-fp32-nockpt  NF4 base, fp32 compute, no checkpointing: lora-fp32's work plus de-quantization
  lora-bf16          bf16 base, fp32 adapters      qlora-bf16  NF4 base, bf16 compute, checkpointing
  full-fp32          every weight trains (memory check only)
The default runs follow the precision rule (loraforge.precision.choose): the fp32 runs everywhere, the bf16 runs
only where auto picks bf16 (CUDA >= 8.0, a CPU with AVX-512 BF16/AMX); on a CPU without native bf16 its matmuls
are emulated and 50-200x slower, so name them with --runs to measure them anyway.

The acceptance of issue 16: a QLoRA step costs about a LoRA step on a base of its compute dtype plus
de-quantization. So each QLoRA run shows its step time as a ratio to the LoRA run of the same dtype, and
de-quantization alone is timed (loraforge.quant.bnb.dequantize, and bitsandbytes' dequantize_4bit, over every 4-bit
layer) and scaled by the passes a step makes over the weights (forward, backward, and the recomputed forward
under checkpointing) to say how much of the QLoRA overhead it is.
The estimator (loraforge.studies.estimate) must be within 20% of the measured peak for full, LoRA and QLoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from flags import at_least
from hardware import auto_precision, describe, header

RUNS = {  # name: (method, base/compute dtype, quantization, gradient checkpointing, estimator dtype)
    "lora-fp32": ("lora", "fp32", None, False, "fp32"),
    "qlora-fp32": ("qlora", "fp32", "nf4", True, "fp32"),
    "qlora-fp32-nockpt": ("qlora", "fp32", "nf4", False, "fp32"),
    "lora-bf16": ("lora", "bf16", None, False, "bf16"),
    "qlora-bf16": ("qlora", "bf16", "nf4", True, "bf16"),  # the estimator knows QLoRA activations are fp32
    "full-fp32": ("full", "fp32", None, False, "fp32"),
}


def default_runs(auto: str) -> list[str]:
    """The runs in the precision `auto` resolves to here, and fp32 (the estimator's reference) everywhere."""
    return [name for name, (_, dtype, *_) in RUNS.items() if dtype in ("fp32", auto)]


def time_dequantize(model, repeats: int = 3) -> dict:
    """Seconds to de-quantize every 4-bit layer once (best of `repeats`): loraforge.quant.bnb.dequantize (the
    reference in plain torch) and bitsandbytes' dequantize_4bit (the kernel its backward runs)."""
    import bitsandbytes.functional as bnbF

    from loraforge.quant.bnb import dequantize
    from loraforge.quant.checks import is_4bit_param

    layers = [m for m in model.modules() if is_4bit_param(getattr(m, "weight", None))]
    out = {"layers": len(layers)}
    for name, fn in (("loraforge", dequantize), ("bnb", lambda m: bnbF.dequantize_4bit(m.weight.data,
                                                                                         m.weight.quant_state))):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for layer in layers:
                fn(layer)
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def _batches(tokenizer, n: int, batch_size: int, seq_len: int):
    """The demo task's examples, rendered and concatenated into full rows of seq_len tokens (no padding)."""
    import torch

    from loraforge.training import data as D

    records = D.read_records("loraforge/assets/demo_train.jsonl")
    ids: list[int] = []
    for record in records:
        ids += D.encode(record, tokenizer, D.detect_format(record)).input_ids
    need = n * batch_size * seq_len
    ids = (ids * (need // len(ids) + 1))[:need]
    rows = torch.tensor(ids).view(n, batch_size, seq_len)
    return list(rows)


def run_one(name: str, steps: int, batch_size: int, seq_len: int, device: str) -> dict:
    import torch

    from loraforge.config import LoraConfig
    from loraforge.lora.inject import inject, lora_layers
    from loraforge.models import load_base
    from loraforge.quant.bnb import prepare_for_kbit_training
    from loraforge.quant.checks import is_4bit_param
    from loraforge.training.loss import CausalLMLoss
    from loraforge.training.optim import optimizer_by_name

    method, dtype, quantize, ckpt, _ = RUNS[name]
    torch.manual_seed(0)
    tokenizer_only = load_base.__globals__["load_tokenizer"]("smollm2-135m")
    batches = _batches(tokenizer_only, steps, batch_size, seq_len)
    rss_before = _status_kb("VmRSS")
    model, _ = load_base("smollm2-135m", dtype=dtype, quantize=quantize, device=device)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        sum(t.numel() * t.element_size() for t in (p.quant_state.absmax, p.quant_state.state2.absmax))
        for p in model.parameters() if is_4bit_param(p))
    if quantize:
        prepare_for_kbit_training(model, gradient_checkpointing=ckpt)
    if method == "full":
        model.requires_grad_(True)
    else:
        inject(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        for _, layer in lora_layers(model):
            layer.fused = True  # as train.build_model does (training.fused_lora); a 4-bit base keeps the plain path
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 trainable weights, as train.py keeps them
    model.train()
    # the loss as `loraforge train` computes it (and as the estimator counts it): the head and cross-entropy in row
    # chunks, no full-vocabulary logits kept; rows share no prefix here
    loss_fn = CausalLMLoss(model, share_prefix=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_by_name("adamw", params, lr=2e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_alloc = torch.cuda.memory_allocated()
    else:
        _reset_peak()
    losses, tokens, t0 = [], 0, None
    for step, batch in enumerate(batches):
        if step == 1:  # the first step pays one-off costs (allocations, lazy init): time from the second
            t0, tokens = time.perf_counter(), 0
        batch = batch.to(device)
        loss_sum, n = loss_fn({"input_ids": batch, "labels": batch})
        loss = loss_sum / n
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += batch.numel()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - start_alloc + base_bytes  # weights were allocated before
    else:
        peak = (_status_kb("VmHWM") - rss_before) * 1024
    result = {"name": name, "base_weight_bytes": base_bytes, "peak_bytes": peak, "tokens_per_s": tokens / elapsed,
              "step_s": elapsed / (len(batches) - 1), "final_loss": losses[-1], "first_loss": losses[0]}
    if quantize:
        with torch.no_grad():
            result["dequantize_s"] = time_dequantize(model)  # after the peak: its tensors are not in it
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS),
                        help="default: the fp32 runs, and the bf16 ones where auto precision is bf16")
    parser.add_argument("--json", help="also write every measurement and the hardware here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this one and print JSON
    args = parser.parse_args()
    at_least(parser, args, steps=2, batch_size=1, seq_len=2)  # the first step is not timed; a token and its next
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.batch_size, args.seq_len, device)))
        return
    from loraforge.studies.estimate import estimate

    auto = auto_precision(device)
    runs = args.runs or default_runs(auto.compute)
    skipped = [name for name in RUNS if name not in runs and RUNS[name][1] not in ("fp32", auto.compute)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big buffers via mmap: freed memory leaves the RSS
    results = []
    for name in runs:
        steps = args.steps if not name.startswith("full") else 3  # full: memory only
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(steps), "--batch-size",
                              str(args.batch_size), "--seq-len", str(args.seq_len)],
                             capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"run {name} failed:\n{out.stderr[-3000:]}")
        r = json.loads(line[7:])
        method, _, _, ckpt, est_dtype = RUNS[name]
        r["estimate_bytes"] = estimate("smollm2-135m", method, args.batch_size, args.seq_len, r=16,
                                       dtype=est_dtype, gradient_checkpointing=ckpt)["total"]
        results.append(r)
        print(f"done {name}: {r['step_s']:.2f} s/step", flush=True)
    by_name = {r["name"]: r for r in results}
    mb = 1 / 2**20
    print(f"\nSmolLM2-135M on {device}, batch {args.batch_size} × {args.seq_len} tokens, {args.steps} steps "
          f"(the first not timed), r=16 all-linear, AdamW\n{header(describe(device))}")
    if skipped:
        print(f"not run by default: {', '.join(skipped)} ({auto.reason}; --runs {' '.join(skipped)} runs them)")
    print(f"{'run':<19}{'base MB':>8}{'peak MB':>8}{'estimate':>9}{'est/peak':>9}{'tok/s':>7}{'s/step':>8}"
          f"{'× LoRA':>8}{'loss 1st':>9}{'loss last':>10}")
    for r in results:
        ratio = r["estimate_bytes"] / r["peak_bytes"]
        method, dtype, *_ = RUNS[r["name"]]
        lora = by_name.get(f"lora-{dtype}")
        r["step_ratio_to_lora"] = r["step_s"] / lora["step_s"] if lora and method == "qlora" else None
        times = f"{r['step_ratio_to_lora']:.2f}x" if r["step_ratio_to_lora"] else "-"
        print(f"{r['name']:<19}{r['base_weight_bytes'] * mb:>8.0f}{r['peak_bytes'] * mb:>8.0f}"
              f"{r['estimate_bytes'] * mb:>9.0f}{ratio:>9.2f}{r['tokens_per_s']:>7.0f}{r['step_s']:>8.2f}{times:>8}"
              f"{r['first_loss']:>9.3f}{r['final_loss']:>10.3f}" + ("" if 0.8 <= ratio <= 1.2 else "  > 20% off"))
    for r in results:
        if "dequantize_s" not in r:
            continue
        method, dtype, _, ckpt, _ = RUNS[r["name"]]
        d, passes = r["dequantize_s"], 3 if ckpt else 2  # forward, backward (dX), and the recomputed forward
        lora = by_name.get(f"lora-{dtype}")
        overhead = r["step_s"] - lora["step_s"] if lora else None
        share = (f"; the step's overhead over lora-{dtype} is {overhead:.2f} s, so de-quantization is about "
                 f"{100 * passes * d['bnb'] / overhead:.0f}% of it" if overhead and overhead > 0 else "")
        print(f"{r['name']}: de-quantizing its {d['layers']} 4-bit layers once takes {d['bnb']:.3f} s "
              f"(bitsandbytes) / {d['loraforge']:.3f} s (loraforge.quant.bnb.dequantize); a step does it {passes}x "
              f"(forward, backward{', recomputed forward' if ckpt else ''}): {passes * d['bnb']:.2f} s{share}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": describe(device), "args": vars(args), "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
