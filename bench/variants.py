"""LoRA, rsLoRA, DoRA and AdaLoRA on the demo task (dates to ISO 8601), side by side.

    python bench/variants.py                                   # the demo's own steps (GPU: minutes; CPU: hours)
    python bench/variants.py --max-steps 20 --eval-limit 50    # a quicker, noisier comparison

Budget: every method adapts the same layers (the demo's all-linear) at r = the demo's lora.r. AdaLoRA follows its
paper's convention: it ends at the same rank budget (target_r = r on average per layer), starting from
init_r = 1.5·r, so it trains more parameters early and saves about as many. The table shows both counts.
Columns: trainable parameters during training, adapter file size, final training loss, held-out loss,
exact-match accuracy on the demo test set (with its 95% Wilson interval), and training wall time.
Precision follows the rule (loraforge.precision): the config's training.precision and model.dtype, auto by
default (fp32 on a CPU without native bf16), for the training and the evaluation alike; each run's first line
says which.

Every method gets the config's learning rate. AdaLoRA starts with lora_E = 0 and A, B ~ N(0, 0.02) (PEFT's init),
so its update starts far smaller than LoRA's: at the demo's lr 1e-3 and 30 steps it ends at 17% accuracy, at
`--methods adalora --override training.lr=0.01` at 97% (measured on 2 CPU cores; see the issue 5 note).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flags import at_least  # noqa: E402
from loraforge.lora.adapters import load_adapter  # noqa: E402
from loraforge.config import load_train_config  # noqa: E402
from loraforge.training.evaluate import accuracy  # noqa: E402
from loraforge.models import load_base  # noqa: E402
from loraforge.training.loop import run_precision, train  # noqa: E402


def method_overrides(name: str, r: int, steps: int) -> list[str]:
    if name == "lora":
        return ["method=lora"]
    if name == "rslora":
        return ["method=lora", "lora.use_rslora=true"]
    if name == "dora":
        return ["method=dora"]
    if name == "adalora":  # warm-up 10% of the steps, prune over the middle, the last 20% at the final ranks
        return ["method=adalora", f"adalora.init_r={max(r + 1, round(1.5 * r))}", f"adalora.target_r={r}",
                f"adalora.tinit={max(1, steps // 10)}", f"adalora.tfinal={max(1, steps // 5)}",
                f"adalora.total_step={steps}", "adalora.deltaT=1"]
    raise ValueError(f"unknown method {name!r}; choose from lora, rslora, dora, adalora")


def run(name: str, args) -> dict:
    base = load_train_config(args.config)
    steps = args.max_steps or base.training.max_steps
    overrides = method_overrides(name, base.lora.r, steps) + [f"output_dir={args.out}/{name}",
                                                              f"training.max_steps={steps}"]
    overrides += list(args.override)
    cfg = load_train_config(args.config, overrides)
    result = train(cfg, progress=False)
    adapter = Path(result.output_dir) / "adapter"
    size_kb = sum(f.stat().st_size for f in adapter.iterdir()) / 1024
    saved = json.loads((adapter / "adapter_config.json").read_text())

    precision = run_precision(cfg, torch.device("cpu"), warn=False)  # the evaluation runs on the CPU
    model, tokenizer = load_base(cfg.model.name, dtype=precision.storage)
    load_adapter(model, adapter)
    records = [json.loads(line) for line in open(cfg.data.eval) if line.strip()][:args.eval_limit]
    acc = accuracy(model, tokenizer, records, precision=precision.compute)
    row = {"method": name, "trainable": result.trainable_params, "adapter_kb": size_kb,
           "final_loss": result.final_loss, "eval_loss": result.eval_loss, "accuracy": acc["accuracy"],
           "ci95": acc["ci95"], "n_eval": acc["n"], "seconds": result.seconds}
    if name == "adalora":
        ranks = [sum(v) for v in (saved.get("rank_pattern") or {}).values()]
        row["ranks"] = f"{min(ranks)}..{max(ranks)}" if ranks else "-"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "demo.yaml"))
    parser.add_argument("--methods", default="lora,rslora,dora,adalora")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the config's training.max_steps")
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test examples")
    parser.add_argument("--out", default="runs/bench-variants")
    parser.add_argument("--override", action="append", default=[], help="section.field=value, e.g. lora.r=8")
    args = parser.parse_args()
    at_least(parser, args, max_steps=1, eval_limit=1)

    rows = []
    start = time.perf_counter()
    for name in args.methods.split(","):
        rows.append(run(name.strip(), args))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'method':<9}{'trainable':>11}{'adapter KB':>12}{'final loss':>12}{'eval loss':>11}"
          f"{'accuracy (95% CI)':>24}{'time s':>9}  ranks")
    for r in rows:
        eval_loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        acc = f"{r['accuracy']:.3f} ({r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})"
        print(f"{r['method']:<9}{r['trainable']:>11,}{r['adapter_kb']:>12.0f}{r['final_loss']:>12.4f}{eval_loss:>11}"
              f"{acc:>24}{r['seconds']:>9.1f}  {r.get('ranks', '')}")
    lora = next((r for r in rows if r["method"] == "lora"), None)
    if lora:
        print("time vs LoRA: " + ", ".join(f"{r['method']} {r['seconds'] / lora['seconds']:.2f}x" for r in rows))
    print(f"total {time.perf_counter() - start:.0f} s on {'GPU' if torch.cuda.is_available() else 'CPU'}")


if __name__ == "__main__":
    main()
