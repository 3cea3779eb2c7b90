"""Checkpoints: everything a resumed run needs, written so that a crash never leaves one that resume would read.

A checkpoint `checkpoints/step-N/` holds the trainable weights, the optimizer state (safetensors; with it the RNG
states and AdaLoRA's importance EMAs), and
trainer_state.json (step, scheduler, RNG, data position and the global batch it counts in, config);
`manifest.json`, written last, lists each file's size and SHA-256. The directory is written under a temporary name
and renamed when complete; resume takes the newest checkpoint whose manifest verifies and reports (and removes)
damaged newer ones.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.config import TrainConfig, to_dict
from loraforge.utils.files import DiskError, atomic_dir, sha256_file


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, nothing to train on); the message says what to change.

    everywhere: every process of a torchrun run raises this same error (it comes from all-reduced values or from
    the run's shared files, as --resume's refusals do), so the CLI says it once per node, as a config error."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


class DiskStop(TrainingError):
    """The disk refused a checkpoint or a metrics line, so the run stopped (disk_stop)."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "trainer_state.json")
MANIFEST = "manifest.json"  # written last: each file's size and SHA-256, so resume can tell a damaged checkpoint


def optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict's per-parameter state as flat safetensors keys ("<pid>.<name>", and
    "<pid>.<name>/<inner>" for one nested mapping, as bitsandbytes' 8-bit optimizers keep their quantized state),
    and its non-tensor entries (bitsandbytes' integer `step`) as JSON-ready {key: value}."""
    tensors, scalars = {}, {}
    for pid, entries in state.items():
        for name, v in entries.items():
            inner = v.items() if isinstance(v, dict) else [(None, v)]
            for sub, value in inner:
                key = f"{pid}.{name}" if sub is None else f"{pid}.{name}/{sub}"
                if isinstance(value, torch.Tensor):
                    tensors[key] = value.cpu().contiguous()
                else:
                    scalars[key] = value
    return tensors, scalars


def optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    """The inverse of optimizer_tensors: {pid: {name: value or {inner: value}}} (rng.* and adalora.* keys skipped)."""
    state: dict = {}
    for key, v in [*tensors.items(), *scalars.items()]:
        if key.startswith(("rng.", "adalora.")):
            continue
        pid, name = key.split(".", 1)
        entries = state.setdefault(int(pid), {})
        if "/" in name:
            name, sub = name.split("/", 1)
            entries.setdefault(name, {})[sub] = v
        else:
            entries[name] = v
    return state


EMAS = ("exp_avg_ipt", "exp_avg_unc")  # AdaLoRA's importance EMAs: tensors as large as the adapter, twice


def allocator_tensors(state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint_state with AdaLoRA's EMA tensors taken out of its allocator state, and them as safetensors keys
    `adalora.<ema>.<layer path>.<lora_A|lora_E|lora_B>` (load_checkpoint puts them back)."""
    allocator = state.get("allocator") or {}
    tensors = {f"adalora.{kind}.{key}": v for kind in EMAS for key, v in allocator.get(kind, {}).items()
               if isinstance(v, torch.Tensor)}
    if not tensors:
        return state, {}
    return {**state, "allocator": {k: v for k, v in allocator.items() if k not in EMAS}}, tensors


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and CUDA where there is one): what dropout draws from."""
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available()
                                               else {})}


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, state: dict,
                    rngs: list[dict] | None = None) -> Path:
    """Write checkpoints/step-N atomically: its files, then their manifest, in a temporary directory that is
    renamed into place when complete. `rngs`: every process's rng_state() in rank order (DDP: gathered; default
    this process's alone), kept as `rng.torch` (rank 0) and `rng.torch.<rank>`, so each continues its own draws.

    A write the disk refuses (full, file-size limit, permission, I/O error) raises TrainingError naming the
    directory, about how much it needed, and the last complete checkpoint, which is left intact; the temporary
    directory is removed.
    """
    final = root / f"step-{step:07d}"
    weights = trainable_state(model)
    opt_state = optimizer.state_dict()
    tensors, scalars = optimizer_tensors(opt_state["state"])
    state, emas = allocator_tensors(state)
    tensors.update(emas)
    for rank, rng in enumerate(rngs or [rng_state()]):
        tensors.update({f"rng.{kind}" + (f".{rank}" if rank else ""): value for kind, value in rng.items()})
    meta = {"step": step, "world_size": len(rngs or [None]), "param_groups": opt_state["param_groups"],
            "scheduler": scheduler.state_dict(),
            "python_rng": _python_rng_state(), "config": to_dict(cfg), "optimizer_scalars": scalars, **state}
    text = json.dumps(meta, indent=1)
    need = sum(v.nbytes for v in (*weights.values(), *tensors.values())) + len(text)
    try:
        with atomic_dir(final, need) as tmp:
            save_file(weights, tmp / "trainable.safetensors")
            save_file(tensors, tmp / "optimizer.safetensors")
            (tmp / "trainer_state.json").write_text(text)
            if os.environ.get("LORAFORGE_TEST_CRASH_IN_SAVE") == str(step):  # test hook: die mid-save, like SIGKILL
                os.kill(os.getpid(), 9)
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                     for name in CHECKPOINT_FILES}
            (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
            if final.exists():  # the same step written again (after resume skipped a damaged one): the new one wins
                shutil.rmtree(final)
    except DiskError as e:
        raise disk_stop(root, step, e) from None
    prune_checkpoints(root, cfg.training.keep_checkpoints, keep_best=cfg.training.keep_best)
    return final


def best_checkpoint(root: Path) -> tuple[Path, float] | None:
    """The checkpoint of the lowest held-out loss (trainer_state.json's eval_loss, which a checkpoint of an evaluated
    step records), the earliest of equal ones, and that loss; None where no checkpoint recorded one."""
    best = None
    for path in sorted(root.glob("step-*")):
        try:
            loss = json.loads((path / "trainer_state.json").read_text()).get("eval_loss")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(loss, (int, float)) and math.isfinite(loss) and (best is None or loss < best[1]):
            best = (path, float(loss))
    return best


def prune_checkpoints(root: Path, keep: int, resumed: Path | None = None, keep_best: bool = False) -> None:
    """Delete all but the `keep` newest checkpoints (training.keep_checkpoints), never `resumed` (the one a run
    continues from) nor, with `keep_best` (training.keep_best), the one of the lowest held-out loss. After every
    save, and when a run resumes: a kill between a save's rename and this pruning left one checkpoint more than
    `keep` until the next save."""
    best = best_checkpoint(root) if keep_best else None
    for old in sorted(root.glob("step-*"))[:-keep]:
        if old != resumed and (best is None or old != best[0]):
            shutil.rmtree(old, ignore_errors=True)


def disk_stop(root: Path, step: int, error: DiskError, checkpoint: bool = True) -> DiskStop:
    """What a run says when the disk refused checkpoint step-N (`checkpoint`; else a metrics line after step N):
    the refusal, and the checkpoint to resume from."""
    last = last_checkpoint(root)
    kept = (f"the last complete checkpoint, {last}, is intact: make room (or fix the permission) and continue "
            f"with --resume" if last else f"no checkpoint was completed{' before this one' if checkpoint else ''}")
    return DiskStop(f"{error}; training stopped after step {step}, {kept}")


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    """Put back the states rng_state() gave (CUDA's only where this process has a GPU)."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def world_change(path: Path, then: int, now: int, draws: str) -> str:
    """What a resume onto another number of processes says: what continues exactly, and where dropout `draws`."""
    return (f"{path.name} was written by {then} processes, this run has {now}: weights, optimizer and data position "
            f"continue exactly; random draws (dropout) {draws}")


def _python_rng_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


SHARDED = "dcp"  # manifest.json's "format" of FSDP's sharded checkpoints (training.dcp); none: one process or DDP
WRITTEN_WITH_FSDP = "it was written with training.distributed=fsdp (sharded)"
WRITTEN_WITHOUT_FSDP = "it was written without FSDP (training.distributed: ddp or one process)"


def checkpoint_format(path: Path) -> str | None:
    """How checkpoint `path` was written, from its manifest: SHARDED (FSDP), "plain" (one process or DDP), None
    when the manifest is missing or unreadable (an unfinished save: its files say nothing reliable)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return SHARDED if isinstance(manifest, dict) and manifest.get("format") == SHARDED else "plain"


def verify_checkpoint(path: Path | str) -> str | None:
    """None when the checkpoint's files match its manifest (sizes and SHA-256); otherwise what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its save did not finish, or a loraforge without manifests wrote it)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    if manifest.get("format") == SHARDED:
        return WRITTEN_WITH_FSDP
    for name in CHECKPOINT_FILES:
        entry, file = files.get(name) if isinstance(files, dict) else None, path / name
        if not isinstance(entry, dict):
            return f"its {MANIFEST} does not list {name}"
        if not file.is_file():
            return f"{name} is missing"
        if (size := file.stat().st_size) != entry.get("bytes"):
            return f"{name} is {size} bytes but was written as {entry.get('bytes')} (truncated or damaged)"
        if sha256_file(file) != entry.get("sha256"):
            return f"{name} does not match its SHA-256 in {MANIFEST} (damaged)"
    return None


def find_checkpoint(root: Path, verify=None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones that do not, each with the reason (newest first).

    verify(path) -> reason or None: verify_checkpoint by default; FSDP's sharded ones pass dcp.verify_sharded."""
    skipped = []
    for path in sorted(root.glob("step-*"), reverse=True):
        reason = (verify or verify_checkpoint)(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def last_checkpoint(root: Path) -> Path | None:
    """The newest complete, verified checkpoint (an interrupted save's temporary directory never counts)."""
    return find_checkpoint(root)[0]


RUN_SECTIONS = ("model", "method", "lora", "adalora")  # the settings that decide the trainable tensors


def flat(d, prefix: str = "") -> dict:
    """A to_dict(cfg) (or a section of it) as {dotted key: value}, in the config's field order."""
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}


def flat_sections(config: dict, sections) -> dict:
    """The settings under `sections` of a to_dict(cfg), as {dotted key: value}."""
    return {k: v for s in sections for k, v in flat(config.get(s), f"{s}.").items()}


def config_changes(saved: dict, now: dict, sections=RUN_SECTIONS) -> list[str]:
    """`key: saved -> now` for each setting under `sections` that differs between two to_dict(cfg) (dotted keys)."""
    before, after = flat_sections(saved, sections), flat_sections(now, sections)
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]


SCHEDULE_FIELDS = ("training.lr", "training.schedule", "training.warmup_steps", "training.loraplus_lr_ratio",
                   "training.optimizer", "training.weight_decay")  # what a resumed optimizer and schedule continue


def schedule_changes(state: dict, now: dict, total_steps: int) -> list[str]:
    """`key: saved -> now` for the learning-rate settings and the step count (training.max_steps, or epochs × the
    data's steps per epoch) that a checkpoint's trainer_state.json (`state`) and this run (to_dict(cfg),
    total_steps) disagree on. A resumed run continues the checkpoint's optimizer and schedule, so another lr or
    length would mix two schedules (a finished run resumed with a larger max_steps ran a step at lr 0)."""
    changed = [c for c in config_changes(state["config"], now, sections=("training",))
               if c.split(":")[0] in SCHEDULE_FIELDS] if state.get("config") else []
    if state.get("total_steps") not in (None, total_steps):
        changed.append(f"total steps: {state['total_steps']} -> {total_steps}")
    return changed


# What may differ on --resume without changing what trains: how often the run evaluates, saves and logs, where it
# reports, which kernels run the same math, and the settings checked on their own (the learning-rate schedule and
# step count: schedule_changes; the global batch: global_batch_change). Any other setting must be as the run started.
RESUME_FREE = {"training.eval_every", "training.save_every", "training.keep_checkpoints", "training.keep_best",
               "training.log_every",
               "training.report_to", "training.attention", "training.compile", "training.fused_blocks",
               "training.fused_lora", "training.activation_buffer", "training.reuse_memory", "training.share_prefix",
               "training.gradient_checkpointing", "training.distributed", "training.collective_timeout",
               "training.init_adapter", "data.eval", "lora.base_model_name_or_path", "training.epochs",
               "training.max_steps", "training.batch_size", "training.batch_tokens", "training.gradient_accumulation",
               *SCHEDULE_FIELDS}
# Allowed with a warning: a model folder that moved, and another precision (a run resumed on another machine).
RESUME_WARNED = ("model.name", "model.dtype", "training.precision")
RESUME_SECTIONS = ("model", "method", "lora", "adalora", "data", "training")
OLDER_DEFAULTS = {"data.overflow": ("truncate", "auto")}
"""A setting whose default changed: (what an older loraforge's checkpoint holds for a config that left it out, the
default now). data.overflow was truncate until 2026-12-05; auto reads instruction and chat records the same way and
cuts text records into windows, which the data's fingerprint (checked first) tells apart."""


def resume_changes(saved: dict, now: dict, older_defaults: bool = True) -> tuple[list[str], list[str]]:
    """(refused, warned): `key: saved -> now` for the settings a checkpoint's config (`saved`, to_dict) and this
    run's (`now`) disagree on, past RESUME_FREE. A resumed run continues the checkpoint's adapter, optimizer and place
    in the data: another lora_alpha would save a scale the weights were not trained with, another seed or dataset
    would repeat or skip examples of the epoch. A setting the checkpoint's config lacks (written by an older version)
    is not compared; adalora's settings are (an empty section means PEFT's defaults). older_defaults: an older
    default against today's (OLDER_DEFAULTS) is no change."""
    before, after = flat_sections(saved, RESUME_SECTIONS), flat_sections(now, RESUME_SECTIONS)
    keys = [k for k in after if k in before or k.startswith("adalora.")]
    keys += [k for k in before if k not in after and k.startswith("adalora.")]
    changed = [(k, f"{k}: {before.get(k)!r} -> {after.get(k)!r}") for k in keys
               if k not in RESUME_FREE and before.get(k) != after.get(k)
               and not (older_defaults and OLDER_DEFAULTS.get(k) == (before.get(k), after.get(k)))]
    return ([c for k, c in changed if k not in RESUME_WARNED], [c for k, c in changed if k in RESUME_WARNED])


def global_batch(cfg: TrainConfig, world: int) -> dict:
    """What a step's place in the data depends on, recorded in every checkpoint: the processes and each one's share
    of a step (gradient_accumulation micro-batches of batch_size examples, or of up to batch_tokens tokens)."""
    t = cfg.training
    return {"processes": world, "batch_size": t.batch_size, "gradient_accumulation": t.gradient_accumulation,
            "batch_tokens": t.batch_tokens}


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def _describe(b: dict) -> tuple[tuple, str]:
    """(what must stay equal, how the user reads it) of a global_batch record."""
    p, g = b["processes"], b["gradient_accumulation"]
    if b.get("batch_tokens") is None:
        size = p * b["batch_size"] * g
        return (None, size), (f"{size} examples ({_processes(p)} × training.batch_size {b['batch_size']} × "
                              f"training.gradient_accumulation {g})")
    micro = f"{p * g} micro-batch" + ("es" if p * g != 1 else "")
    return (b["batch_tokens"], p * g), (f"{micro} of training.batch_tokens {b['batch_tokens']} ({_processes(p)} × "
                                        f"training.gradient_accumulation {g})")


def global_batch_change(path: Path, saved: dict | None, now: dict) -> str | None:
    """None when checkpoint `path`'s global batch (`saved`: its global_batch record; older checkpoints have none and
    are not checked) is this run's (`now`), so its data position and learning-rate schedule continue exactly;
    otherwise the error, naming both with their factors and the settings that keep it with this run's processes."""
    if not saved:
        return None
    (tokens, size), before = _describe(saved)
    key, after = _describe(now)
    if key == (tokens, size):
        return None
    world, keep = now["processes"], []
    if now.get("batch_tokens") != tokens:  # examples or micro-batches of up to batch_tokens: the same one first
        keep.append(f"training.batch_tokens={'null' if tokens is None else tokens}")
    elif size % world == 0 and tokens is None:
        share = size // world  # batch_size × gradient_accumulation of each process
        if share % now["gradient_accumulation"] == 0:
            keep.append(f"training.batch_size={share // now['gradient_accumulation']}")
        if share % now["batch_size"] == 0 and share // now["batch_size"] != now["gradient_accumulation"]:
            keep.append(f"training.gradient_accumulation={share // now['batch_size']}")
        if not keep:
            keep.append(f"training.batch_size={share} training.gradient_accumulation=1")
    elif size % world == 0:
        keep.append(f"training.gradient_accumulation={size // world}")
    written = _processes(saved["processes"])
    if not keep:  # the checkpoint's processes divide its global batch, so they differ from this run's
        fix = f"{size} is not a multiple of this run's {_processes(world)}: resume with {written}"
    else:
        fix = (f"keep it with {keep[0]}" + (f" (or {keep[1]})" if len(keep) > 1 else "")
               + (f", or resume with {written}" if saved["processes"] != world else ""))
    return (f"--resume: {path.name} was written with a global batch of {before}, this run's is {after}: the data "
            f"position and learning-rate schedule continue only with the same global batch; {fix}")


def load_checkpoint(path: Path, model, optimizer, scheduler, config: dict | None = None, rank: int = 0,
                    world: int = 1) -> dict:
    """Restore weights, optimizer, scheduler and RNG from checkpoint `path`; its trainer_state.json is returned.
    Process `rank` takes its own RNG state where as many processes wrote it, else rank 0's.

    Weights whose names or shapes differ from the model's are refused with TrainingError, naming the settings
    (`config`: to_dict of the current config) that differ from the ones the checkpoint was written with."""
    meta = json.loads((path / "trainer_state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    shapes = [f"{n} {list(w.shape)} in the checkpoint, {list(params[n].shape)} here" for n, w in weights.items()
              if n in params and w.shape != params[n].shape]  # copy_ would broadcast [1, k] into [r, k]
    if missing or set(weights) - set(params) or shapes:
        changed = config_changes(meta.get("config") or {}, config) if config is not None else []
        extra = sorted(set(weights) - set(params))
        why = f"missing {missing[:3]}" if missing else f"not in this model {extra[:3]}" if extra else shapes[0]
        raise TrainingError(f"checkpoint {path} does not match this model/config ({why}"
                            + (f"; changed since it was written: {', '.join(changed)}" if changed else "")
                            + "); resume with the config the run was started with")
    saved, now = [len(g["params"]) for g in meta["param_groups"]], [len(g["params"]) for g in optimizer.param_groups]
    if saved != now:  # torch's ValueError "... doesn't match the size of optimizer's group" was a traceback
        raise TrainingError(f"checkpoint {path} keeps its optimizer's state in groups of {saved} parameters, this "
                            f"run's optimizer has {now}: an older loraforge grouped them otherwise (DoRA's magnitudes "
                            f"are weight-decayed since 2026-12-03), so its state cannot continue here; start the run "
                            f"over (--overwrite), or finish it with the loraforge that started it")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    tensors = load_file(path / "optimizer.safetensors")
    for key, value in tensors.items():  # AdaLoRA's EMAs (allocator_tensors); older checkpoints hold them as JSON
        if key.startswith("adalora."):
            _, kind, name = key.split(".", 2)
            meta.setdefault("allocator", {}).setdefault(kind, {})[name] = value
    state = optimizer_state(tensors, meta.get("optimizer_scalars", {}))
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    own = f".{rank}" if rank and meta.get("world_size") == world else ""  # older checkpoints kept rank 0's alone
    restore_rng({kind: tensors[f"rng.{kind}{own}"] for kind in ("torch", "cuda") if f"rng.{kind}{own}" in tensors})
    if rank == 0 and meta.get("world_size", world) != world:
        print(world_change(path, meta["world_size"], world, "start from rank 0's"), flush=True)
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return meta
