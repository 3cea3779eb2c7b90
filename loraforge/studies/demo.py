"""`loraforge demo`: a real fine-tune of the built-in model, with an honest before/after measurement.

The task (shipped in loraforge/assets): rewrite a date written in words ("the 5th of March, 2021",
"Mar 5th 2021", ...) as ISO 8601 ("2021-03-05"). SmolLM2-135M-Instruct gets almost none right; a LoRA adapter
trained for a couple of minutes on a laptop CPU gets most of the held-out dates right.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch

from loraforge.config import ConfigError, load_train_config
from loraforge.lora.adapters import load_adapter
from loraforge.models import conversion_paths, load_base
from loraforge.quant.bnb import check_bitsandbytes
from loraforge.studies.heldout import answer_token_budget, heldout_accuracy, model_hash, with_adapter_hash
from loraforge.training import data as D
from loraforge.training.loop import run_precision, train
from loraforge.training.report import peak_memory_name
from loraforge.training.trackers import check_tracker
from loraforge.utils.files import expand_user
from loraforge.utils.outputs import check_run_output


def asset(name: str) -> str:
    return str(resources.files("loraforge") / "assets" / name)


TEST_DATA = asset("demo_test.jsonl")


def demo_config(out: str, max_steps: int | None = None, overrides: list[str] = (), data: dict | None = None):
    """The demo's run config: `overrides` (the command line's) on top; `data`: fields of its data section that a
    study sets in place of the demo's own (a user's data.eval= override still wins)."""
    steps = max_steps or 24
    for item in overrides:  # forgetting/continual pass their --max-steps as an override
        key, _, value = item.partition("=")
        if key.strip() == "training.max_steps" and value.strip().isdigit():
            steps = int(value)
    base = {
        "model": {"name": "smollm2-135m", "dtype": "auto"},
        "method": "lora",
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        # the held-out dates are scored by run_demo's exact-match accuracy, not by a held-out loss in train()
        "data": {"train": asset("demo_train.jsonl"), "eval_fraction": 0, "max_seq_len": 256, **(data or {})},
        # 24 steps: past 90% held-out, short enough for a laptop CPU (the README gives the measured run)
        # --max-steps under 6 (a quick try): the warmup shortened to fit, so it is never the reason a run is refused
        "training": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": max(0, min(5, steps - 1)),
                     "max_steps": max_steps or 24,
                     "batch_size": 16, "precision": "auto", "eval_every": 0, "save_every": 0, "seed": 0},
        "output_dir": out,
    }
    return load_train_config(None, overrides, base=base)


METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "adalora": "AdaLoRA", "full": "full fine-tuning"}


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def check_demo_out(out: str, cfg) -> None:
    """Refuse an output_dir override other than --out: train() would write there while the demo scores, sizes and
    reports --out's adapter (an earlier run's, or none)."""
    if expand_user(cfg.output_dir).resolve() != expand_user(out).resolve():
        raise ConfigError([f"output_dir: demo writes to --out ({out}); use --out {cfg.output_dir} instead of "
                           f"output_dir={cfg.output_dir}"])


def run_demo(out: str = "runs/demo", max_steps: int | None = None, overrides: list[str] = (),
             overwrite: bool = False) -> dict:
    started = time.perf_counter()
    cfg = demo_config(out, max_steps, overrides)
    check_demo_out(out, cfg)
    check_tracker(cfg.training.report_to)  # the base loads and is scored before train() would find it missing
    check_bitsandbytes(cfg.quantization, cfg.training.optimizer)  # the same for --quantize
    check_run_output(cfg.output_dir, overwrite=overwrite, resume=False,  # refused before the base is loaded
                     inputs=[cfg.model.name, *conversion_paths(cfg.model.name), cfg.data.train, TEST_DATA],
                     flag="--out", resume_hint=None)  # demo takes no --resume
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where train() runs
    precision = run_precision(cfg, device)
    print(precision.line(), flush=True)
    test = D.read_records(TEST_DATA)
    quantize = cfg.quantization
    model, tokenizer = load_base(cfg.model.name, dtype=precision.storage, quantize=quantize, device=device)
    clock = {"load": time.perf_counter() - started}
    print(f"[1/3] base model{f' ({quantize})' if quantize else ''} on {len(test)} held-out dates "
          f"(greedy, exact match) ...", flush=True)
    fmt = D.detect_format(test[0])
    max_new = answer_token_budget(tokenizer, test, fmt)  # the answers are short: generating more is wasted
    # the scores are cached by weights, so `loraforge continual` reuses them (not for a quantized base)
    base_key = None if quantize else model_hash(model, tokenizer)
    before = heldout_accuracy(model, tokenizer, test, fmt, max_new, precision.compute, base_key, "base")
    clock["base eval"] = time.perf_counter() - started - sum(clock.values())
    print(f"      base accuracy: {before['accuracy']:.1%}  e.g. {before['samples'][0]}", flush=True)

    method = "QLoRA" if quantize else METHOD_NAMES[cfg.method]
    print(f"[2/3] fine-tuning with {method} ...", flush=True)
    result = train(cfg, overwrite=overwrite, precision=precision)
    clock["train"] = time.perf_counter() - started - sum(clock.values())

    print("[3/3] the saved adapter on the same held-out dates ...", flush=True)
    adapter_dir = Path(cfg.output_dir) / "adapter"
    load_adapter(model, adapter_dir)
    after = heldout_accuracy(model, tokenizer, test, fmt, max_new, precision.compute,
                             base_key and with_adapter_hash(base_key, model), "adapter")
    clock["adapter eval"] = time.perf_counter() - started - sum(clock.values())
    total = time.perf_counter() - started
    aside = f" ({result.aside_seconds:.0f} s of it evaluating and saving)" if result.aside_seconds >= 0.5 else ""
    rows = [
        ("model", ("SmolLM2-135M-Instruct (built-in)" if cfg.model.name == "smollm2-135m" else cfg.model.name)
         + (f", {quantize} base" if quantize else "")),
        ("trainable parameters", f"{result.trainable_params:,} of {result.total_params:,} "
                                 f"({100 * result.trainable_params / result.total_params:.2f}%)"),
        ("adapter size on disk", f"{dir_size(adapter_dir) / 2**20:.1f} MiB ({adapter_dir})"),
        ("training", f"{result.steps} steps, {result.seconds:.0f} s{aside}, {result.tokens_per_second:.0f} tokens/s "
                     f"while training, final loss {result.final_loss:.3f}"),
        (peak_memory_name(result.device_type), f"{result.peak_memory_mb:.0f} MiB"),  # on a GPU: not the RSS
        ("held-out accuracy", f"{before['accuracy']:.1%} -> {after['accuracy']:.1%} "
                              f"({after['correct']}/{after['n']}; "
                              f"95% CI {after['ci95'][0]:.0%}-{after['ci95'][1]:.0%})"),
        ("gain", f"{100 * (after['accuracy'] - before['accuracy']):+.1f} points"),
        ("loss curve", str(Path(cfg.output_dir) / "loss.png")),
        ("total time", f"{total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in clock.items()) + ")"),
        ("precision", precision.line().removeprefix("precision ")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows), flush=True)
    print(f"  e.g. {after['samples'][0]}")
    return {"before": before, "after": after, "train": result, "seconds": total, "clock": clock}
