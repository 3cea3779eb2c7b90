"""LoRA vs QLoRA on SmolLM2-135M: base-weight memory, peak memory, tokens/s, final loss; estimator check.

    python bench/qlora.py [--steps 8] [--batch-size 4] [--seq-len 128]

Each run is its own process, so peak memory is that run's alone: on CPU the peak resident set since the model
was loaded (Linux: /proc/self/clear_refs resets VmHWM) minus the resident set before loading; on CUDA
torch.cuda.max_memory_allocated. The training loop here is deliberately minimal (forward, loss, backward,
AdamW on the trainable parameters) so the numbers are the method's, not the trainer's. Runs:
  lora-bf16    bf16 base, fp32 adapters               qlora-bf16  NF4 base, bf16 compute, fp32 adapters
  lora-fp32    fp32 base (as estimate(dtype="fp32"))  full-fp32   every weight trains (memory check only)
The estimator (loraforge.estimate) must be within 20% of the measured peak for full, LoRA and QLoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RUNS = {  # name: (method, base dtype, quantization, gradient checkpointing, estimator dtype)
    "lora-bf16": ("lora", "bf16", None, False, "bf16"),
    "qlora-bf16": ("qlora", "bf16", "nf4", True, "bf16"),  # the estimator knows QLoRA activations are fp32
    "lora-fp32": ("lora", "fp32", None, False, "fp32"),
    "full-fp32": ("full", "fp32", None, False, "fp32"),
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def _batches(tokenizer, n: int, batch_size: int, seq_len: int):
    """The demo task's examples, rendered and concatenated into full rows of seq_len tokens (no padding)."""
    import torch

    from loraforge import data as D

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
    from loraforge.inject import inject, lora_layers
    from loraforge.models import load_base
    from loraforge.quant import make_optimizer, prepare_for_kbit_training

    method, dtype, quantize, ckpt, _ = RUNS[name]
    torch.manual_seed(0)
    tokenizer_only = load_base.__globals__["load_tokenizer"]("smollm2-135m")
    batches = _batches(tokenizer_only, steps, batch_size, seq_len)
    rss_before = _status_kb("VmRSS")
    model, _ = load_base("smollm2-135m", dtype=dtype, quantize=quantize, device=device)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        sum(t.numel() * t.element_size() for t in (p.quant_state.absmax, p.quant_state.state2.absmax))
        for p in model.parameters() if type(p).__name__ == "Params4bit")
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw", params, lr=2e-4)
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
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += batch.numel()
    elapsed = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - start_alloc + base_bytes  # weights were allocated before
    else:
        peak = (_status_kb("VmHWM") - rss_before) * 1024
    return {"name": name, "base_weight_bytes": base_bytes, "peak_bytes": peak, "tokens_per_s": tokens / elapsed,
            "final_loss": losses[-1], "first_loss": losses[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this one and print JSON
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.batch_size, args.seq_len, device)))
        return
    from loraforge.estimate import estimate

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big buffers via mmap: freed memory leaves the RSS
    results = []
    for name in args.runs:
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
        print(f"done {name}", flush=True)
    mb = 1 / 2**20
    print(f"\nSmolLM2-135M on {device}, batch {args.batch_size} × {args.seq_len} tokens, {args.steps} steps, r=16 "
          f"all-linear, AdamW")
    print(f"{'run':<12}{'base MB':>10}{'peak MB':>10}{'estimate':>10}{'est/peak':>10}{'tok/s':>9}"
          f"{'loss 1st':>10}{'loss last':>10}")
    for r in results:
        ratio = r["estimate_bytes"] / r["peak_bytes"]
        print(f"{r['name']:<12}{r['base_weight_bytes'] * mb:>10.0f}{r['peak_bytes'] * mb:>10.0f}"
              f"{r['estimate_bytes'] * mb:>10.0f}{ratio:>10.2f}{r['tokens_per_s']:>9.0f}"
              f"{r['first_loss']:>10.3f}{r['final_loss']:>10.3f}" + ("" if 0.8 <= ratio <= 1.2 else "  > 20% off"))


if __name__ == "__main__":
    main()
