"""Where a loraforge training step goes: torch.profiler over one optimizer step of bench/train.py's work, by kind.

    python bench/profile_train.py --shape chat             # the step as loraforge trains it (loraforge's defaults)
    python bench/profile_train.py --shape text --variant lf-noseg --top 25
    python bench/profile_train.py --shape text --dtype bf16  # the base in bf16 under autocast, as bench/train.py
    python bench/profile_train.py --shape text --floor     # also: the step's matmul floor, timed without the profiler

Prints the self CPU time of the step by kind (matmuls, attention's softmax, norms, elementwise, copies and
allocation, the optimizer, data/collate), then the heaviest operators. One process, after two untimed steps.

--floor times one more step operator by operator with a light dispatch-mode timer (torch.profiler's own overhead
inflates ms-sized operators on small machines) and prints the matmul floor: the time the frozen linears and the
head (forward and input gradient) take at the rates they ran at, and the tokens/s the step would reach if nothing
else (LoRA, attention, norms, elementwise, optimizer, Python) took any time. A trainer that runs the same products
at the same rates cannot beat that bound.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shapes as data_shapes  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from train import VARIANTS, check_counts, lf_batch, matmul_peak  # noqa: E402

from loraforge.training.slab import hold_memory  # noqa: E402

KINDS = [  # (kind, substrings of an operator name), first match wins
    ("matmul", ("mm", "matmul", "linear", "bmm", "baddbmm")),
    ("softmax", ("softmax",)),
    ("norm", ("rsqrt", "pow", "mean")),
    ("optimizer", ("adam", "foreach", "_fused", "clip", "norm")),
    ("copy/alloc", ("copy", "to", "empty", "zeros", "cat", "clone", "contiguous", "fill", "index", "gather",
                    "scatter", "view", "reshape", "transpose", "expand", "slice", "select", "stack", "masked")),
    ("elementwise", ("mul", "add", "sub", "div", "silu", "exp", "neg", "where", "sum", "max", "amax", "log")),
]


def kind(name: str) -> str:
    low = name.lower().removeprefix("aten::")
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="chat", choices=data_shapes.SHAPES)
    p.add_argument("--variant", default="lf", help="a loraforge variant of bench/train.py")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text-rows", type=int, default=4)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--pack-len", type=int, default=256)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the frozen base stored in bf16, matmuls under bf16 autocast, as bench/train.py runs it")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--by-shape", action="store_true", help="also the matmuls by operand shapes, with their GFLOP/s")
    p.add_argument("--floor", action="store_true",
                   help="also time one more step by operator (no profiler) and print its matmul floor")
    args = p.parse_args()
    check_counts(p, args, batch=1, text_rows=1, top=0, threads=0)
    if args.variant not in VARIANTS:
        p.error(f"--variant: unknown variant {args.variant!r}; choose from {', '.join(VARIANTS)}")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from loraforge.studies.demo import demo_config
    from loraforge.training import data as D
    from loraforge.training.loop import build_model
    from loraforge.training.loss import CausalLMLoss, shares_prefix

    torch.set_num_threads(args.threads or torch.get_num_threads())
    trainer, opts = VARIANTS[args.variant]
    if trainer != "lf":
        p.error("profile a loraforge variant (lf, lf-...)")
    seq = args.text_len if args.shape == "text" else args.pack_len
    cfg = demo_config("runs/bench-profile", overrides=[
        f"data.max_seq_len={seq}", f"training.attention={opts.get('attention', 'auto')}",
        f"training.fused_lora={str(opts.get('fused', True)).lower()}",
        f"training.fused_blocks={str(opts.get('blocks', True)).lower()}",
        "lora.r=16", "lora.lora_alpha=32", "lora.lora_dropout=0", "lora.target_modules=all-linear",
        f"model.dtype={args.dtype}", f"training.precision={args.dtype}"])
    device = torch.device("cpu")
    model, tok = build_model(cfg, device)
    model.train()
    if not opts.get("by_sequence", True) and model.config._attn_implementation == "lean":
        from loraforge.training.fastpath import LEAN_MASKED_ATTENTION

        model.set_attn_implementation(LEAN_MASKED_ATTENTION)
    steps = 4 if args.floor else 3  # two untimed (the heap grows to its size), one profiled[, one timed by operator]
    plan = data_shapes.plan(args.shape, tok, steps, args.batch, args.batch, args.text_rows, args.text_len,
                            args.pack_len)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    share = opts.get("share_prefix", shares_prefix(cfg.training.share_prefix, device))  # as bench/train.py
    loss_fn = CausalLMLoss(model, share_prefix=share)
    examples = [e for step in plan for _, ex in step for e in ex]
    prefix_of = lambda chunk: loss_fn.prefix_to_share(D.collate(chunk, tok.pad_token_id))  # noqa: E731
    packing = opts.get("packing", "auto")  # as bench/train.py and train(): the chat rows (34% padding) are packed
    pack = args.shape != "text" and D.should_pack(packing, D.padding_fraction(examples, args.batch, prefix_of))
    print(f"{args.shape}: {'packed into ' + str(seq) + '-token rows' if pack else 'rows as they come'}")

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    held = contextlib.ExitStack()  # training.reuse_memory and activation_buffer as train() resolves them
    reuse, buffer = opts.get("reuse", cfg.training.reuse_memory), opts.get("buffer", cfg.training.activation_buffer)
    slab = hold_memory(held, model, reuse, buffer, device, pack or args.shape == "text")
    saving = slab.saving if slab else contextlib.nullcontext

    def step(micro):
        with torch.profiler.record_function("data"):
            batches = [lf_batch(rows, pack, seq, model, opts, tok.pad_token_id) for rows, _ in micro]
            n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            with torch.profiler.record_function("forward"), autocast, saving():
                loss, _ = loss_fn(b)
            with torch.profiler.record_function("backward"):
                (loss / n).backward()
        with torch.profiler.record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step(plan[0])
    step(plan[1])
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        step(plan[2])
    wall = time.perf_counter() - t0
    tokens = sum(len(e.input_ids) for _, ex in plan[2] for e in ex)
    events = [e for e in prof.key_averages() if not e.key.startswith(("data", "forward", "backward", "optimizer"))]
    total = sum(e.self_cpu_time_total for e in events)
    by = defaultdict(float)
    for e in events:
        by[kind(e.key)] += e.self_cpu_time_total
    print(f"{args.shape} / {args.variant}: {tokens} real tokens, {wall:.2f} s under the profiler "
          f"({tokens / wall:.0f} tok/s)")
    for k, us in sorted(by.items(), key=lambda kv: -kv[1]):
        print(f"  {k:12s} {us / 1e6:7.2f} s  {100 * us / total:5.1f}%")
    for label in ("data", "forward", "backward", "optimizer"):
        ev = next((e for e in prof.key_averages() if e.key == label), None)
        if ev is not None:
            print(f"  [{label}] {ev.cpu_time_total / 1e6:.2f} s inclusive")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.by_shape:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.top))
        print_matmul_shapes(prof, args.top)
    if args.floor:
        timer = OperatorTimer(lora_rank=16)
        t0 = time.perf_counter()
        with timer:
            step(plan[3])
        print_floor(timer, time.perf_counter() - t0, sum(len(e.input_ids) for _, ex in plan[3] for e in ex),
                    matmul_peak(args.dtype, "cpu"))


MATMULS = ("aten.mm.", "aten.addmm.", "aten.addmm_.", "aten.bmm.", "aten.baddbmm.")


class OperatorTimer(TorchDispatchMode):
    """Wall time of every operator, grouped into the frozen linears and head (2-D products with no side of the LoRA
    rank), LoRA's products (a side of the rank), attention's batched products, and everything else."""

    def __init__(self, lora_rank: int):
        super().__init__()
        self.rank, self.seconds, self.flops = lora_rank, defaultdict(float), defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in args if hasattr(a, "shape")]
        group = self.group(str(func), tensors)
        self.seconds[group] += time.perf_counter() - t0
        if group != "other operators":
            a, b = tensors[-2].shape, tensors[-1].shape
            self.flops[group] += 2 * math.prod(a) * b[-1]
        return out

    def group(self, name: str, tensors: list) -> str:
        if not name.startswith(MATMULS):
            return "other operators"
        if "bmm" in name:
            return "attention products"
        a, b = tensors[-2].shape, tensors[-1].shape  # mm: (a, b); addmm: (input, a, b)
        return "LoRA products" if self.rank in (*a, *b) else "frozen linears + head"


def print_floor(timer: OperatorTimer, wall: float, tokens: int, peak: float) -> None:
    floor, flops = timer.seconds["frozen linears + head"], timer.flops["frozen linears + head"]
    print(f"one step timed by operator: {wall:.2f} s wall ({tokens / wall:.0f} tok/s; the timer adds a little)")
    for group, s in sorted(timer.seconds.items(), key=lambda kv: -kv[1]):
        rate = f"  {timer.flops[group] / s / 1e9:5.0f} GFLOP/s" if timer.flops[group] else ""
        print(f"  {group:24s} {s:7.2f} s  {100 * s / wall:5.1f}%{rate}")
    print(f"  {'Python, autograd, rest':24s} {wall - sum(timer.seconds.values()):7.2f} s")
    print(f"matmul floor: {floor:.2f} s a step = {tokens / floor:.0f} tok/s if nothing but the frozen linears and "
          f"the head took time")
    print(f"  at this machine's matmul peak ({peak / 1e9:.0f} GFLOP/s, a 2048² product; the products above ran at "
          f"{100 * flops / floor / peak:.0f}% of it): {tokens * peak / flops:.0f} tok/s")


def print_matmul_shapes(prof, top: int) -> None:
    """The matmuls (mm, addmm, bmm) grouped by operand shapes: calls, time, GFLOP/s, heaviest first."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"):
            continue
        shapes = e.input_shapes  # mm, bmm: (a, b[, out]); addmm, addmm_, baddbmm: (input, a, b, ...)
        a, b = shapes[1:3] if "add" in e.key else shapes[:2]
        flops = 2 * math.prod(a) * b[-1] * e.count
        rows.append((e.self_cpu_time_total, e.key, a, b, e.count, flops))
    print(f"{'op':14s} {'a':>18s} {'b':>18s} {'calls':>6s} {'time':>8s} {'GFLOP/s':>8s}")
    for us, key, a, b, count, flops in sorted(rows, key=lambda r: -r[0])[:top]:
        print(f"{key:14s} {str(a):>18s} {str(b):>18s} {count:6d} {us / 1e6:7.3f}s {flops / us / 1e3:8.0f}")


if __name__ == "__main__":
    main()
