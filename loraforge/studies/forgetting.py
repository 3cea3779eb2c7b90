"""`loraforge forgetting`: does LoRA forget less than full fine-tuning? Measured on your model and task.

    base model  --probe-->  row "base"
    for each arm (LoRA at each rank, full fine-tuning) and each seed:
        train the same task (same data, same number of steps; a learning rate suited to the method)
        --probe-->  one row: task accuracy (learned) | MC accuracy, perplexity, KL vs base (kept)

Every model is probed the same way: weights as training left them (frozen base in the storage dtype that
model.dtype resolves to, trained weights in fp32 — full fine-tuning keeps fp32 master weights even with a bf16
base), matmuls under bf16 autocast when training.precision resolves to bf16 (loraforge.precision), i.e. the
numerics the model was trained with.
The base's results are cached on disk, keyed by hashes of its weights and of the probe set (probe_base): a second
invocation on an unchanged base skips its probes. The base's logits for KL are computed once per invocation.
Writes forgetting.json (every number, with n, and the seconds of each phase), forgetting.png (learned vs forgotten)
and the runs' outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.argtypes import FlagOverride, NonEmpty, PositiveFloat, PositiveInt, SeedCount
from loraforge.config import MAX_RANK, ConfigError, TrainConfig, load_train_config, to_dict
from loraforge.lora.adapters import disable_adapters, load_adapter
from loraforge.models import cache_dir, conversion_paths, load_base
from loraforge.precision import Precision, autocast
from loraforge.quant.bnb import check_bitsandbytes
from loraforge.studies.demo import asset, demo_config
from loraforge.studies.heldout import answer_token_budget, model_hash
from loraforge.studies.probes import (PPL_WINDOW, check_probes, kl_divergence, load_probe, mc_accuracy, perplexity,
                                      prefix_sharing_logits, probe_window)
from loraforge.studies.rerun import (check_results, going_on, kept_report, study_settings, train_arm,
                                     write_report)
from loraforge.training import data as D
from loraforge.training.evaluate import accuracy
from loraforge.training.loop import run_precision
from loraforge.training.mixing import label, read_sources
from loraforge.training.report import progress_bar
from loraforge.training.trackers import check_tracker
from loraforge.utils.files import atomic_file, expand_user
from loraforge.utils.outputs import check_output, hold_output, own_files, write_own
from loraforge.utils.table import text_table

DEFAULT_RANKS = (8, 64)
RESULTS = ("forgetting.json", "forgetting.png")  # the study's own files in --out (besides its task split and runs)
LORA_LR = 1e-3  # the demo's LoRA rate; Biderman et al. (2024) find LoRA wants ~10x the full-FT rate or more
FULL_LR = 5e-5  # the upper end of usual full fine-tuning rates: a 135M model, a few dozen steps


@dataclass(frozen=True)
class Arm:
    """One way of fine-tuning: `method` "lora" (rank `r`, lora_alpha = 2r) or "full", at learning rate `lr`."""

    name: str
    method: str
    lr: float
    r: int | None = None


def arms(ranks=DEFAULT_RANKS, lora_lr: float = LORA_LR, full_lr: float = FULL_LR) -> list[Arm]:
    return [Arm(f"lora r={r}", "lora", lora_lr, r) for r in ranks] + [Arm("full FT", "full", full_lr)]


def arm_config(cfg: TrainConfig, arm: Arm, seed: int, out: Path) -> TrainConfig:
    """`cfg` with the arm's method, rank and learning rate, this seed, and its own output directory.

    Training gets no held-out set: the probes score the task on it afterwards, and train's own held-out loss at
    the last step (a forward pass over it, unused here) would only add time. The training data stays the same.
    training.save_every stays the config's: a study killed mid-arm goes on from that arm's newest checkpoint."""
    lora = dataclasses.replace(cfg.lora, r=arm.r, lora_alpha=2 * arm.r) if arm.r else cfg.lora
    training = dataclasses.replace(cfg.training, lr=arm.lr, seed=seed, eval_every=0)
    data = dataclasses.replace(cfg.data, eval=None, eval_fraction=0.0)  # cfg.data.train is already the whole split
    slug = arm.name.replace(" ", "").replace("=", "")
    return dataclasses.replace(cfg, method=arm.method, lora=lora, training=training, data=data,
                               output_dir=str(out / f"{slug}-seed{seed}"))


def run_length(training) -> str:
    """How long each arm trains, as the config says it (training.max_steps, or training.epochs: the steps that
    make are known only once train() has read the data)."""
    if training.max_steps:
        return f"{training.max_steps} steps"
    return f"{training.epochs:g} epoch{'' if training.epochs == 1 else 's'}"


def trained_steps(rows: list[dict]) -> int | list[int] | None:
    """The steps the trained rows ran (their TrainResult's, also under training.epochs): one number when all
    ran the same, else each distinct one; None before any arm trained."""
    steps = sorted({r["steps"] for r in rows if r.get("steps") is not None})
    return steps[0] if len(steps) == 1 else steps or None


def check_ranks(ranks) -> None:
    """Each rank once and each one a rank a run takes (1 to MAX_RANK, as lora.r): two arms of one rank would write
    the same folder, and a rank out of range would be refused by the first arm's config, each only after the base
    had been probed (and the first arm trained)."""
    problems = [problem for r in dict.fromkeys(ranks) if (problem := _rank_problem(r))]
    twice = sorted({r for r in ranks if list(ranks).count(r) > 1})
    if twice:
        problems.append(f"--ranks: {', '.join(map(str, twice))} given more than once (each rank is one arm, in a "
                        f"folder of its own); give each rank once")
    if problems:
        raise ConfigError(problems)


def _rank_problem(r) -> str | None:
    if isinstance(r, int) and not isinstance(r, bool) and r > MAX_RANK:
        return f"--ranks: {r} is more than the largest rank a run takes ({MAX_RANK}); typical ranks are 4-64"
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        return f"--ranks: {r!r} is not a rank: give whole numbers from 1 to {MAX_RANK} (typical ranks are 4-64)"
    return None


def check_unquantized(cfg: TrainConfig) -> None:
    """Full fine-tuning, one of the arms, trains every weight of an unquantized base: a quantized one was refused
    by bitsandbytes' traceback at that arm, after the base's probes and the LoRA arms had run."""
    if cfg.model.quantization:
        raise ConfigError([f"model.quantization: {cfg.model.quantization}: forgetting compares LoRA with full "
                           f"fine-tuning, which trains every weight of an unquantized base; remove "
                           f"model.quantization (the LoRA arms train as method lora)"])


def warn_replaced_method(cfg: TrainConfig, ranks) -> None:
    """One warning where the config asks for a method the arms do not run (qlora, dora, adalora): every arm sets its
    own (LoRA arms: lora on the unquantized base; full FT: full), which replaced the config's without a word. QLoRA is
    not run as a LoRA arm: the full FT arm cannot train a quantized base, and a quantized base's rounding would count
    as forgetting in the LoRA arms alone (their KL is against the unquantized base)."""
    if cfg.method in ("lora", "full"):
        return
    why = (" on the unquantized base (not nf4: full fine-tuning cannot train a quantized base, and its rounding "
           "would count as the LoRA arms' forgetting)" if cfg.method == "qlora" else " on the same base")
    warnings.warn(f"method: {cfg.method}: forgetting runs its own arms, not {cfg.method}: the LoRA arms "
                  f"({', '.join(f'r={r}' for r in ranks)}) train as method lora{why}, the full FT arm as method "
                  f"full; set method: lora to run as asked without this warning", stacklevel=3)


def start_over(out: Path, names: tuple[str, ...]) -> None:
    """Remove an earlier study's results (`names` in `out`) before this one runs into `out` (--overwrite): killed
    before its first write, it left the earlier JSON describing runs it had begun to replace. Call it after
    check_results(out, command, names, overwrite), which refuses files of those names that are not the study's own
    (a user's) unless `overwrite`, as the CLI's check_output does (from Python, run_forgetting deleted a user's
    forgetting.json in `out`): both studies check right after going_on, so the record is not read again here."""
    for name in names:
        (out / name).unlink(missing_ok=True)


def precision_phrase(line: str) -> str:
    """'bf16', 'fp16 + loss scaling, base stored in fp32': a precision line ('precision bf16: reason') without its
    reason, as TrainResult.precision and Precision.line() give it."""
    return line.removeprefix("precision ").split(": ", 1)[0]


def other_precisions(probes: Precision, trained: list[str]) -> list[str]:
    """The precisions train() ran the arms in (TrainResult.precision lines) other than the probes' on the CPU: a
    GPU's bf16, where the report said the CPU's fp32 alone."""
    return [p for p in dict.fromkeys(map(precision_phrase, trained)) if p != precision_phrase(probes.line())]


def precision_text(report: dict) -> str:
    """The report header's precision: the probes' compute, and the arms' where they trained in another."""
    trained = report.get("train_precision") or []  # absent from a report written before it was kept
    return f"{report['precision']} compute" + (
        f" (the probes, on the CPU; the arms trained in {', '.join(trained)})" if trained else "")


def check_from_base(cfg: TrainConfig) -> None:
    """Every arm trains from the base model: training.init_adapter would make the LoRA arms train on from that
    adapter (at its rank, not the arm's; another rank fails minutes later) while full fine-tuning ignores it."""
    if cfg.training.init_adapter:
        raise ConfigError([f"training.init_adapter: forgetting trains every arm from the base model, not on from "
                           f"an adapter ({cfg.training.init_adapter}); remove training.init_adapter (to measure "
                           f"training on from an adapter, use `loraforge continual --adapter`)"])


# --- probing one model ---------------------------------------------------------------------------------------

PROBES = {"task": "task accuracy", "mc": "multiple choice", "ppl": "perplexity", "kl": "KL vs base"}


def probe_all(model, tokenizer, base, task_records: list[dict], fmt: str, bf16: bool, probes: dict,
              max_new_tokens: int, name: str = "", progress: bool = False) -> dict:
    """Task accuracy (greedy exact match) and the three general probes for `model`; KL is against `base`, a model
    or a logits callable (None: the model is the base, KL = 0 by definition). "seconds" holds each probe's time;
    a progress bar names the model (`name`) and the probe running."""
    model.eval()
    device = next(model.parameters()).device
    run = {
        "task": lambda: accuracy(model, tokenizer, task_records, fmt, max_new_tokens, batch_size=50,
                                 precision="bf16" if bf16 else "fp32"),
        "mc": lambda: mc_accuracy(model, tokenizer, probes["mc"]),
        "ppl": lambda: perplexity(model, tokenizer, probes["text"]),  # windows of probe_window(model)
        "kl": lambda: ({"kl": 0.0, "n_positions": 0} if base is None
                       else kl_divergence(base, model, tokenizer, probes["kl"])),
    }
    results, seconds = {}, {}
    bar = progress_bar(len(run), enabled=progress, desc=name, unit="probe")
    for key, probe in run.items():
        bar.set_description(f"{name}: {PROBES[key]}")
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and key != "task"):  # task: its own
            results[key] = probe()
        seconds[key] = time.perf_counter() - t0
        bar.update(1)
    bar.close()
    results["task"].pop("samples", None)
    return {**results, "seconds": seconds}


def task_split(cfg: TrainConfig, out: Path, command: str, overwrite: bool, folders=(),
               settings: dict | None = None) -> TrainConfig:
    """A config whose held-out set is a fixed file, so every seed trains and is scored on the same split.

    Without data.eval, max(eval_fraction, 0.1) of each training source of 20 or more records is held out as
    train holds it out (loraforge.training.mixing.read_sources, seed 0) and written to task_test.jsonl; the rest of
    each source goes to its own file (task_train.jsonl; a list: task_train0.jsonl, ...), keeping its weight,
    epochs and format. They are written as `command`'s own (outputs.write_own): a rerun after a kill takes them
    for its own while unchanged; a user's file of those names needs `overwrite`. `folders` (the arms' runs) and
    `settings` (rerun.study_settings) are recorded with them, also where data.eval leaves no split to write."""
    if cfg.data.eval:
        if folders or settings is not None:
            write_own(out, command, {}, overwrite=overwrite, folders=folders, settings=settings)
        return cfg
    sources = cfg.data.sources("train")
    train, held = read_sources(dataclasses.replace(cfg.data, eval_fraction=max(cfg.data.eval_fraction, 0.1)),
                               seed=0)
    if not held:
        fix = ("the task accuracy needs held-out examples: give 20 or more records, or set data.eval to a file of "
               "them")
        if len(sources) == 1:
            raise D.DataError(f"{sources[0].path} has {len(train[0])} records and data.eval is unset; {fix}")
        counts = ", ".join(f"{label('train', i, s, len(sources))}: {len(rows)}"
                           for i, (s, rows) in enumerate(zip(sources, train)))
        raise D.DataError(f"data.train: no source has 20 records to hold some out ({counts}) and data.eval is "
                          f"unset; {fix}")
    task_format(held, "data.train")
    names = ["task_train.jsonl"] if len(sources) == 1 else [f"task_train{i}.jsonl" for i in range(len(sources))]
    files = {name: "".join(json.dumps(r) + "\n" for r in rows) for name, rows in zip(names, train)}
    files["task_test.jsonl"] = "".join(json.dumps(r) + "\n" for _, _, rows in held for r in rows)
    write_own(out, command, files, overwrite=overwrite, folders=folders, settings=settings)
    written = tuple(dataclasses.replace(s, path=str(out / name)) for s, name in zip(sources, names))
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, train=written[0].path if isinstance(cfg.data.train, str) else written,
        eval=str(out / "task_test.jsonl")))


def task_format(parts: list[tuple[str, str, list[dict]]], field: str) -> str:
    """The one record format of held-out parts (name, format, records) as read_sources gives them; "auto" is
    detected from a part's first record. The task accuracy scores every example in one format."""
    formats = {name: fmt if fmt != "auto" else D.detect_format(records[0]) for name, fmt, records in parts}
    if len(set(formats.values())) > 1:
        shown = ", ".join(f"{name}: {fmt}" for name, fmt in formats.items())
        raise ConfigError([f"{field}: the task's held-out examples come in several formats ({shown}); the task "
                           f"accuracy scores one format: give sources of one format"])
    return next(iter(formats.values()))


def held_out_task(cfg: TrainConfig, limit: int | None = None) -> tuple[list[dict], str]:
    """The held-out task examples (every source of data.eval, in order; the first `limit`) and their format."""
    _, parts = read_sources(cfg.data, seed=0)
    return [r for _, _, rows in parts for r in rows][:limit], task_format(parts, "data.eval")


# --- the base's probe results, cached on disk -----------------------------------------------------------------

PROBE_CACHE_VERSION = 2
"""Part of the cache key: bump it when a probe's scoring changes, so results of the older scorer are recomputed. 2:
the task probe's exact match changed as heldout.HELDOUT_CACHE_VERSION 2 says."""


def probe_set_hash(probes: dict, task_records: list[dict], fmt: str, max_new_tokens: int, bf16: bool,
                   device: torch.device, ppl_window: int = PPL_WINDOW) -> str:
    """sha256 of the probe data (task examples, MC questions, text, KL prompts) and of the settings that change
    their numbers: format, generation length, autocast, device, the perplexity's window (probe_window: it depends
    on the config's context, which model_hash does not read), torch and transformers versions."""
    import transformers

    task = [{k: v for k, v in r.items() if k != "_source"} for r in task_records]  # content, not where it was read
    payload = {"version": PROBE_CACHE_VERSION, "task": task, "fmt": fmt, "max_new_tokens": max_new_tokens,
               "mc": probes["mc"], "text": probes["text"], "kl": probes["kl"], "bf16": bf16, "ppl_window": ppl_window,
               "device": device.type, "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def probe_cache_path(model_key: str, probe_key: str) -> Path:
    return cache_dir() / "probes" / f"{model_key[:16]}-{probe_key[:16]}.json"


def read_probe_cache(path: Path, model_key: str, probe_key: str) -> dict | None:
    """The cached probe results at `path` if they were written for these keys (JSON, nothing else), else None."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"[base] ignoring the unreadable probe cache {path} ({e}); probing again", flush=True)
        return None
    if not (isinstance(saved, dict) and saved.get("model_hash") == model_key and saved.get("probe_hash") == probe_key
            and isinstance(saved.get("scores"), dict) and set(PROBES) <= set(saved["scores"])):
        return None
    return saved


def write_probe_cache(path: Path, model_key: str, probe_key: str, model_name: str, scores: dict) -> None:
    """Write atomically (a temporary file in the same directory, then os.replace): a crash leaves the old file or
    none, never half of one. A cache that cannot be written is reported and skipped."""
    record = {"model_hash": model_key, "probe_hash": probe_key, "model": model_name, "scores": scores}
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=str))
    except OSError as e:
        print(f"[base] could not cache the probe results at {path} ({e}); the next run probes the base again",
              flush=True)


def probe_base(base, tokenizer, name: str, task_records: list[dict], fmt: str, bf16: bool, probes: dict,
               max_new_tokens: int, progress: bool = False) -> tuple[dict, str | None]:
    """probe_all's scores for the base model (KL = 0) and the cache file they were read from (None: probed now).

    They depend only on the base's weights, the probes and their settings, so they are cached on disk under
    loraforge.models.cache_dir(), keyed by model_hash and probe_set_hash: an unchanged base is probed once."""
    keys = (model_hash(base, tokenizer),
            probe_set_hash(probes, task_records, fmt, max_new_tokens, bf16, next(base.parameters()).device,
                           probe_window(base)))
    path = probe_cache_path(*keys)
    cached = read_probe_cache(path, *keys)
    if cached:
        print(f"[base] {name}: same weights, probes and settings as an earlier run: probe results read from "
              f"{path}; the base's probes are skipped ({sum(cached['scores']['seconds'].values()):.0f} s saved)",
              flush=True)
        return cached["scores"], str(path)
    print(f"[base] probing {name} ...", flush=True)
    scores = probe_all(base, tokenizer, None, task_records, fmt, bf16, probes, max_new_tokens, "base", progress)
    write_probe_cache(path, *keys, name, scores)
    return scores, None


class CachedLogits:
    """`model` as a logits callable (input_ids, attention_mask) -> (B, T, V) that computes each batch once: every
    arm's KL compares with the base on the same prompt batches, so the base runs them once per command. Adapters
    loaded onto `model` later (loraforge continual scores each on that same model) are off while it runs."""

    def __init__(self, model):
        self.model, self.logits_fn, self.logits = model, prefix_sharing_logits(model), {}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        key = (input_ids.cpu().numpy().tobytes(), attention_mask.cpu().numpy().tobytes(), tuple(input_ids.shape))
        if key not in self.logits:
            with disable_adapters(self.model):  # the base alone, whichever adapter it carries by then
                self.logits[key] = self.logits_fn(input_ids, attention_mask)
        return self.logits[key]


# --- the experiment ------------------------------------------------------------------------------------------

def run_forgetting(cfg: TrainConfig, out: str | Path = "runs/forgetting", ranks=DEFAULT_RANKS,
                   lora_lr: float = LORA_LR, full_lr: float = FULL_LR, seeds: int = 1,
                   limit: int | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Train every arm × seed on `cfg`'s task, probe base and each result; print the table, write JSON + plot.

    Seeds run in the outer loop and forgetting.json is rewritten after every run ("complete": false until the
    end), so an interrupted run already holds a whole comparison for its first seeds; run again with the same
    settings into the same `out` (without `overwrite`), it goes on (loraforge.studies.rerun): the rows recorded are
    kept, an arm stopped mid-training resumes from its newest checkpoint, and a study that finished is read back.
    `limit` keeps only the first N task examples, MC questions, KL prompts and lines of the general text (quick
    checks, not a report).
    """
    started = time.perf_counter()
    check_from_base(cfg)
    check_unquantized(cfg)
    check_ranks(ranks)
    warn_replaced_method(cfg, ranks)
    check_tracker(cfg.training.report_to)  # else found by the first arm's train(), after the base's probes
    check_bitsandbytes(None, cfg.training.optimizer)  # an 8-bit optimizer (the base is never quantized here)
    with hold_output(out, "--out"):  # one study at a time in --out (each arm holds its own folder as it trains)
        return _study(cfg, expand_user(out), ranks, lora_lr, full_lr, seeds, limit, progress, overwrite, started)


def _study(cfg: TrainConfig, out: Path, ranks, lora_lr: float, full_lr: float, seeds: int, limit: int | None,
           progress: bool, overwrite: bool, started: float) -> dict:
    settings = study_settings(cfg, cfg.data.paths(), ranks=list(ranks), lora_lr=lora_lr, full_lr=full_lr,
                              seeds=seeds, limit=limit)
    resume = going_on(out, "forgetting", settings, overwrite)  # the same study stopped before: it goes on
    check_results(out, "forgetting", RESULTS, overwrite)  # before a rerun reads them back or replaces them
    earlier = kept_report(out, "forgetting", "forgetting.json") if resume else None
    if earlier is not None and earlier.get("complete"):
        return finished(out, earlier)
    if not resume:
        start_over(out, RESULTS)
    folders = [Path(arm_config(cfg, arm, seed, out).output_dir).name
               for seed in range(seeds) for arm in arms(ranks, lora_lr, full_lr)]
    cfg = task_split(cfg, out, "forgetting", overwrite, folders, settings)
    kept = {(row.get("name"), row.get("seed")): row for row in (earlier or {}).get("rows", [])}
    precision = run_precision(cfg, torch.device("cpu"))  # the base and the probes run on the CPU
    print(precision.line(), flush=True)
    bf16 = precision.compute == "bf16"
    task_records, fmt = held_out_task(cfg, limit)
    text = load_probe("text")
    probes = {"mc": load_probe("mc")[:limit], "kl": load_probe("kl")[:limit],
              "text": "\n".join(text.splitlines()[:limit]) if limit else text}

    base, tokenizer = load_base(cfg.model.name, dtype=precision.storage)
    base.eval()
    max_new = answer_token_budget(tokenizer, task_records, fmt)
    t0 = time.perf_counter()
    if ("base", None) in kept:
        rows = [kept["base", None]]
        print(f"[base] probed by the run before: {_row_line(rows[-1]).strip()}", flush=True)
    else:
        scores, cached = probe_base(base, tokenizer, cfg.model.name, task_records, fmt, bf16, probes, max_new,
                                    progress)
        rows = [{"name": "base", "method": "base", "seed": None, "lr": None, "r": None, "trainable_params": 0,
                 "train_seconds": 0.0, **scores, "probe_seconds": time.perf_counter() - t0, "probes_cached": cached}]
        print(_row_line(rows[-1]), flush=True)
        write_report(out, "forgetting", "forgetting.json", {"complete": False, "rows": rows})
    base_logits = CachedLogits(base)  # KL: the base's logits on the prompts, computed by the first arm

    for seed in range(seeds):
        for arm in arms(ranks, lora_lr, full_lr):
            if (arm.name, seed) in kept:  # trained and probed by the run before (its result recorded)
                rows.append(kept[arm.name, seed])
                print(f"[{arm.name} seed {seed}] trained and probed by the run before:", flush=True)
                print(_row_line(rows[-1]), flush=True)
                continue
            run_cfg = arm_config(cfg, arm, seed, out)
            print(f"[{arm.name} seed {seed}] training {run_length(run_cfg.training)} at lr {arm.lr:g} ...",
                  flush=True)
            result = train_arm(run_cfg, progress, overwrite, "forgetting", resume)
            t0 = time.perf_counter()
            if arm.method == "full":
                # The fp32 master weights as trained (a bf16 copy would round away most of a 2e-5-rate update).
                model, _ = load_base(str(Path(run_cfg.output_dir) / "model"), dtype="fp32")
            else:
                model, _ = load_base(cfg.model.name, dtype=precision.storage)
                load_adapter(model, Path(run_cfg.output_dir) / "adapter")
            load_seconds = time.perf_counter() - t0
            scores = probe_all(model, tokenizer, base_logits, task_records, fmt, bf16, probes, max_new,
                               f"{arm.name} seed {seed}", progress)
            rows.append({"name": arm.name, "method": arm.method, "seed": seed, "lr": arm.lr, "r": arm.r,
                         "trainable_params": result.trainable_params, "train_seconds": result.seconds,
                         "steps": result.steps, "trained_in": result.precision,
                         "final_loss": result.final_loss, "output_dir": str(run_cfg.output_dir), **scores,
                         "load_seconds": load_seconds, "probe_seconds": time.perf_counter() - t0})
            print(_row_line(rows[-1]), flush=True)
            write_report(out, "forgetting", "forgetting.json", {"complete": False, "rows": rows})
            del model

    order = {arm.name: i for i, arm in enumerate(arms(ranks, lora_lr, full_lr))}
    rows = rows[:1] + sorted(rows[1:], key=lambda r: (order[r["name"]], r["seed"]))  # by arm, then seed
    data = to_dict(cfg.data)
    report = {"complete": True, "model": cfg.model.name, "task_train": data["train"], "task_eval": data["eval"],
              "steps": trained_steps(rows), "batch_size": cfg.training.batch_size, "seeds": seeds,
              "precision": precision.compute,
              "train_precision": other_precisions(precision, [r["trained_in"] for r in rows if "trained_in" in r]),
              "n_kl_prompts": len(probes["kl"]), "rows": rows,
              "summary": summarize(rows), "seconds": time.perf_counter() - started, "time_split": time_split(rows)}
    write_report(out, "forgetting", "forgetting.json", report)
    write_own(out, "forgetting", {"forgetting.png": plot(rows)}, overwrite=False)  # --overwrite: start_over's
    print(format_report(report), flush=True)
    split = ", ".join(f"{PROBES.get(k, k)} {v:.0f} s" for k, v in report["time_split"].items())
    print(f"wrote {out / 'forgetting.json'} and {out / 'forgetting.png'}; total {report['seconds']:.0f} s "
          f"({split})", flush=True)
    return report


def finished(out: Path, report: dict) -> dict:
    """A rerun of a study that finished: its report as it was (and its plot, where a kill came before it)."""
    if "forgetting.png" not in own_files(out, "forgetting"):
        write_own(out, "forgetting", {"forgetting.png": plot(report["rows"])}, overwrite=False)
    print(format_report(report), flush=True)
    print(f"{out} holds this study, finished: its report above is read from {out / 'forgetting.json'} (pass "
          f"--overwrite to run it again)", flush=True)
    return report


def time_split(rows: list[dict]) -> dict:
    """Seconds over all runs: training, loading the trained models, and each probe (a cached base's: none)."""
    split = {"training": sum(r["train_seconds"] for r in rows), "loading": sum(r.get("load_seconds", 0) for r in rows)}
    for key in PROBES:
        split[key] = sum(r["seconds"][key] for r in rows if not r.get("probes_cached"))
    return split


def summarize(rows: list[dict]) -> list[dict]:
    """Per arm: mean and [min, max] over seeds of each number; forgetting as differences from the base row."""
    base = rows[0]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    summary = []
    for name, group in groups.items():
        def stat(get):
            values = [get(r) for r in group]
            return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}
        summary.append({
            "name": name, "lr": group[0]["lr"], "n_seeds": len(group) if group[0]["seed"] is not None else 0,
            "task_accuracy": stat(lambda r: r["task"]["accuracy"]),
            "mc_accuracy": stat(lambda r: r["mc"]["accuracy"]),
            "mc_acc_norm": stat(lambda r: r["mc"]["acc_norm"]),
            "mc_drop": stat(lambda r: base["mc"]["accuracy"] - r["mc"]["accuracy"]),
            "ppl": stat(lambda r: r["ppl"]["ppl"]),
            "kl": stat(lambda r: r["kl"]["kl"]),
        })
    return summary


# --- reporting -----------------------------------------------------------------------------------------------

def _ci(d: dict, key: str = "ci95") -> str:
    lo, hi = d[key]
    return f"[{100 * lo:.0f}-{100 * hi:.0f}]"


def _row_line(row: dict) -> str:
    t, mc, ppl, kl = row["task"], row["mc"], row["ppl"], row["kl"]
    each = ", ".join(f"{key} {row['seconds'][key]:.0f}" for key in PROBES)
    probes = (f"probes cached (took {each} s)" if row.get("probes_cached")
              else f"probes {row['probe_seconds']:.0f} s: {each}")
    return (f"  {row['name']:<11} seed {'-' if row['seed'] is None else row['seed']}: "
            f"task {t['correct']}/{t['n']}  MC {mc['correct']}/{mc['n']} (norm {mc['correct_norm']})  "
            f"ppl {ppl['ppl']:.3f}  KL {kl['kl']:.4g}  (train {row['train_seconds']:.0f} s, {probes})")


def _count(n: int) -> str:
    """A parameter count in the table: 1.23M, or the number itself under 10,000 (896 read 0.00M)."""
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"


def steps_text(steps: int | list[int] | None) -> str:
    """trained_steps as a report's header says it: 24, or 23/24 where the arms ran different numbers."""
    return "/".join(map(str, steps)) if isinstance(steps, list) else str(steps)


def format_report(report: dict) -> str:
    """One row per run, then one per arm (mean and min-max over seeds); the header states every n."""
    rows, base = report["rows"], report["rows"][0]
    n_task, n_mc = base["task"]["n"], base["mc"]["n"]
    n_tok, n_kl = base["ppl"]["n_tokens"], next((r["kl"]["n_positions"] for r in rows[1:]), 0)
    header = ["run", "lr", "trainable", "train s", "task acc % [95% CI]",
              "MC acc % [95% CI]", "MC acc_norm % [95% CI]", "ppl", "KL vs base"]
    lines = []
    for r in rows:
        t, mc = r["task"], r["mc"]
        lines.append([r["name"] + ("" if r["seed"] is None else f" s{r['seed']}"),
                      "-" if r["lr"] is None else f"{r['lr']:g}",
                      _count(r["trainable_params"]), f"{r['train_seconds']:.0f}",
                      f"{100 * t['accuracy']:.0f} {_ci(t)}",
                      f"{100 * mc['accuracy']:.1f} {_ci(mc)}", f"{100 * mc['acc_norm']:.1f} {_ci(mc, 'ci95_norm')}",
                      f"{r['ppl']['ppl']:.3f}", f"{r['kl']['kl']:.4g}"])
    out = [f"forgetting on {report['model']}: {steps_text(report['steps'])} steps × batch "
           f"{report['batch_size']}, {report['seeds']} seed(s) per arm, {precision_text(report)}",
           f"learned: task = greedy exact match on {n_task} held-out task examples.  kept: MC = {n_mc} 4-option "
           f"questions scored by log-likelihood; ppl over {n_tok} tokens of general text; KL(base||tuned) mean "
           f"over {n_kl} next-token positions of {report['n_kl_prompts']} general prompts (nats)",
           *text_table(header, lines)]
    out += ["", "per arm: mean [min, max] over seeds; MC drop = base MC accuracy - run's (points; + = forgot)"]
    head2 = ["arm", "task acc %", "MC acc %", "MC drop pts", "acc_norm %", "ppl", "KL vs base"]
    rows2 = []
    for s in report["summary"]:
        def f(key, scale=100, spec=".1f"):
            d = s[key]
            if s["n_seeds"] <= 1:
                return f"{scale * d['mean']:{spec}}"
            return f"{scale * d['mean']:{spec}} [{scale * d['min']:{spec}}, {scale * d['max']:{spec}}]"
        rows2.append([s["name"], f("task_accuracy", spec=".0f"), f("mc_accuracy"), f("mc_drop"), f("mc_acc_norm"),
                      f("ppl", 1, ".3f"), f("kl", 1, ".4g")])  # soak: KL 1.4e-05 read 0.0000 here as .4f
    out += text_table(head2, rows2)
    return "\n".join(out)


def plot(rows: list[dict]) -> bytes:
    """Learned (task accuracy) against forgotten (MC accuracy drop; KL vs base), one point per run: a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_mc = rows[0]["mc"]["accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    names = list(dict.fromkeys(r["name"] for r in rows))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (measure, get) in zip(axes, (("MC accuracy drop vs base (points)",
                                        lambda r: 100 * (base_mc - r["mc"]["accuracy"])),
                                       ("KL(base || tuned), nats per token", lambda r: r["kl"]["kl"]))):
        for name in names:
            pts = [(get(r), 100 * r["task"]["accuracy"]) for r in rows if r["name"] == name]
            ax.scatter(*zip(*pts), label=name, color=colors[name], s=40)
        ax.set_xlabel(f"forgotten: {measure}")
        ax.set_ylabel("learned: task accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].axvline(0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle("learned vs forgotten (one point per run)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return png.getvalue()


# --- CLI -----------------------------------------------------------------------------------------------------

def cli_forgetting(config: str | None = None, out: NonEmpty = "runs/forgetting", ranks: list[PositiveInt] = (),
                   seeds: SeedCount = 1, max_steps: PositiveInt | None = None, lora_lr: PositiveFloat = LORA_LR,
                   full_lr: PositiveFloat = FULL_LR, overrides: list[str] = (), overwrite: bool = False) -> None:
    """`loraforge forgetting`: cli.forgetting's docstring is its help (it is defined there, where the CLI's
    help is built without importing torch)."""
    steps = [FlagOverride("training.max_steps", max_steps, "--max-steps")] if max_steps else []  # the flag wins
    overrides = [*overrides, *steps]
    # The demo task: trained on demo_train.jsonl, the task scored on the 100 dates of demo_test.jsonl (whatever
    # held-out set the demo's own config uses); output_dir is set per run.
    cfg = (load_train_config(config, overrides) if config
           else demo_config(out, DEMO_STEPS, overrides, data={"eval": asset("demo_test.jsonl")}))
    ranks = [int(r) for r in ranks] or DEFAULT_RANKS  # run_forgetting checks them, the config and its tracker
    check_output(out, overwrite=overwrite, command="forgetting",  # its task split, when a kill left it unchanged
                 inputs=[config, cfg.model.name, *conversion_paths(cfg.model.name), *cfg.data.paths()])
    run_forgetting(cfg, out, ranks, lora_lr, full_lr, seeds, overwrite=overwrite)


DEMO_STEPS = 30


def cli_probe(probe: list[str] = ("mc", "text", "kl"), model: str = "smollm2-135m", adapter: str | None = None,
              dtype: str = "fp32", precision: str = "fp32", quantize: str | None = None) -> None:
    """Score a model on the shipped general-ability probes: MC accuracy, perplexity, KL vs the base.

    Args:
        probe: which probes: mc (200 4-option questions), text (perplexity), kl (needs --adapter: KL vs base)
        model: base model
        adapter: adapter directory; KL compares the model with and without it
        dtype: fp32, bf16 or fp16 storage of the base
        precision: the compute precision matmuls autocast to (fp32, bf16, fp16; loraforge.precision)
        quantize: nf4, fp4 or int8: the base stored with bitsandbytes (a QLoRA adapter's), else full precision
    """
    check_probes(probe, adapter)  # before the model loads
    base, tokenizer = load_base(model, dtype=dtype, quantize=quantize)
    if adapter:
        load_adapter(base, adapter)
    base.eval()
    with autocast(precision, "cpu"):
        if "mc" in probe:
            r = mc_accuracy(base, tokenizer, load_probe("mc"))
            print(f"MC accuracy: {r['accuracy']:.1%} ({r['correct']}/{r['n']}, 95% CI {_ci(r)}%); "
                  f"acc_norm {r['acc_norm']:.1%} (95% CI {_ci(r, 'ci95_norm')}%)")
        if "text" in probe:
            r = perplexity(base, tokenizer, load_probe("text"))
            print(f"perplexity on general text: {r['ppl']:.3f} ({r['n_tokens']} tokens)")
        if "kl" in probe:
            if not adapter:
                print("KL vs base: needs --adapter (without one the model is the base: KL = 0)")
            else:
                def base_fn(ids, mask):
                    with disable_adapters(base):
                        return base(input_ids=ids, attention_mask=mask).logits
                r = kl_divergence(base_fn, base, tokenizer, load_probe("kl"))
                print(f"KL(base || adapter): {r['kl']:.4g} nats per token over {r['n_positions']} positions")
