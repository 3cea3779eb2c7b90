"""The training loop: a plain function that reads top to bottom.

    load base -> add adapter (or make every weight trainable) -> read + tokenize data -> for each step:
    gather the step's micro-batches, count their supervised tokens (all processes), forward + summed loss /
    that count, backward, all-reduce (DDP), clip, optimizer step, explicit hooks (AdaLoRA), schedule, log,
    evaluate, checkpoint.

Several processes: `torchrun --nproc_per_node=N -m loraforge train CONFIG`; DDP over gloo (CPU) or nccl
(CUDA); only rank 0 writes. A checkpoint holds adapter, optimizer, scheduler, RNG and data position; it is
written to a temporary directory and renamed, so a crash never leaves a half checkpoint that resume would read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from . import data as D
from .config import TrainConfig, to_dict
from .evaluate import mean_token_loss
from .files import DiskError, atomic_dir
from .loss import CausalLMLoss, shares_prefix
from .precision import Precision, choose
from .outputs import check_run_output


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, nothing to train on); the message says what to change."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    train_tokens: int
    seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    trainable_params: int
    total_params: int
    data_stats: dict
    precision: str = "fp32"
    skipped_steps: int = 0


# --- set-up --------------------------------------------------------------------------------------------------

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun, joins the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def run_precision(cfg: TrainConfig, device: torch.device, warn: bool = True) -> Precision:
    """training.precision and model.dtype resolved on this device (loraforge.precision: auto from the hardware)."""
    return choose(cfg.training.precision, cfg.model.dtype, device=device, warn=warn)


def build_model(cfg: TrainConfig, device: torch.device, total_steps: int | None = None, tokenizer=None,
                precision: Precision | None = None):
    """(model, tokenizer): the base with the method's trainable parts; trainable weights in fp32.

    `total_steps` sets AdaLoRA's rank schedule (budget from init_r to target_r over the run; needed for
    method adalora). A tokenizer already loaded can be passed in. The frozen base is stored in the precision's
    storage dtype (a 4-bit base computes in it too); `precision` defaults to run_precision(cfg, device).
    """
    from .inject import inject, lora_layers
    from .models import enable_checkpointing, load_model, load_tokenizer

    quantization = cfg.quantization
    precision = precision or run_precision(cfg, device)
    model = load_model(cfg.model.name, dtype=precision.storage, quantize=quantization, device=device)
    checkpointing = cfg.training.gradient_checkpointing
    if quantization:
        from .quant import prepare_for_kbit_training

        prepare_for_kbit_training(model, gradient_checkpointing=checkpointing is None or bool(checkpointing))
    elif checkpointing:
        enable_checkpointing(model)
        if cfg.method != "full":
            model.enable_input_require_grads()
    if type(checkpointing) is int and checkpointing > 0:  # N layers, not every one
        checkpoint_only(model, checkpointing)
    attention = training_attention(cfg, device)
    if attention == "lean":
        from .fastpath import register_attention

        register_attention()
    if getattr(model.config, "_attn_implementation", attention) != attention:
        model.set_attn_implementation(attention)
    lora = dataclasses.replace(cfg.lora, base_model_name_or_path=cfg.model.name)
    if cfg.method == "full":
        model.requires_grad_(True)
    elif cfg.method == "adalora":
        if total_steps is None:
            raise ValueError("build_model: method adalora needs total_steps (its rank schedule spans the run)")
        from .adalora import AdaLoraConfig, inject_adalora

        inject_adalora(model, AdaLoraConfig.from_train_config(lora, {**cfg.adalora, "total_step": total_steps}),
                       "default")
    else:
        inject(model, dataclasses.replace(lora, use_dora=lora.use_dora or cfg.method == "dora"), "default")
    if cfg.training.fused_lora:
        for _, layer in lora_layers(model):
            layer.fused = True  # layers the kernel can't run (dropout, DoRA, 4-bit base) keep the plain path
    if cfg.training.fused_blocks:
        from .fastpath import install

        install(model)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights for what trains; the frozen base keeps its dtype
    return model, tokenizer or load_tokenizer(cfg.model.name)


def load_data(cfg: TrainConfig, tokenizer) -> tuple[list[D.Example], list[D.Example], dict]:
    """Tokenized train and held-out examples, and the counts to report. Errors before any training."""
    c = cfg.data
    records = D.read_records(c.train)
    if c.eval:
        eval_records = D.read_records(c.eval)
    elif c.eval_fraction > 0 and len(records) >= 20:
        records, eval_records = D.train_test_split(records, c.eval_fraction, seed=cfg.training.seed)
    else:
        eval_records = []
    train, stats = D.build_dataset(records, tokenizer, c.format, c.max_seq_len, c.train_on_prompt, c.overflow)
    held_out = D.build_dataset(eval_records, tokenizer, c.format, c.max_seq_len, c.train_on_prompt,
                               c.overflow)[0] if eval_records else []
    return train, held_out, dataclasses.asdict(stats)


def micro_batches(examples: list[D.Example], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices), shuffled by (seed, epoch): the same on every rank."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.training.seed + epoch))
    t = cfg.training
    if t.batch_tokens is None:
        return [order[i:i + t.batch_size].tolist() for i in range(0, len(order) - t.batch_size + 1, t.batch_size)]
    batches, current, tokens = [], [], 0
    for i in order.tolist():
        n = len(examples[i].input_ids)
        if current and tokens + n > t.batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    return batches  # the last, partial batch is dropped like a partial batch_size batch


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return factor


def training_attention(cfg: TrainConfig, device: torch.device) -> str:
    """training.attention resolved: "auto" is lean on CPU for rows up to 512 tokens, SDPA otherwise."""
    if cfg.training.attention != "auto":
        return cfg.training.attention
    return "lean" if device.type == "cpu" and cfg.data.max_seq_len <= 512 else "sdpa"


def data_report(stats: dict, n_eval: int, padding: float, net: float, pack: bool, packing) -> str:
    """The data line of a run: examples, and why its batches are packed or not (net: padding_fraction less what
    shared prefixes save; packed rows compute one position per real token and share nothing)."""
    text = (f"data: {stats['n_examples']} train examples ({stats['n_truncated']} truncated, {stats['n_dropped']} "
            f"dropped), {n_eval} held out; padded batches would be {100 * padding:.1f}% padding")
    rule = f"{D.PACK_MIN_PADDING:.0%} padding"
    if net < padding:
        text += (f"; computing the prefix their rows share once, they would compute {1 / (1 - net):.2f} positions "
                 f"per real token")
        rule = f"{1 / (1 - D.PACK_MIN_PADDING):.2f} positions per real token"
    if pack:
        return text + ": packed"
    return text + f": not packed (data.packing={packing}" + (f"; auto packs from {rule})" if packing == "auto" else ")")


def checkpoint_only(model: nn.Module, n: int) -> list[int]:
    """Keep gradient checkpointing on n of the decoder layers, evenly spread; the others keep their activations.

    Returns the indices of the checkpointed layers. Uses transformers' per-layer switch (GradientCheckpointingLayer).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise TrainingError(f"training.gradient_checkpointing: {n} layers needs a model whose decoder layers "
                            f"checkpoint one by one ({type(model).__name__} does not); use true or false")
    chosen = {round(i * len(layers) / n) for i in range(min(n, len(layers)))}
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
    return sorted(chosen)


def make_optimizer(model: nn.Module, t) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if t.loraplus_lr_ratio:
        from .variants import loraplus_param_groups

        groups = loraplus_param_groups(model, t.lr, t.loraplus_lr_ratio, t.weight_decay)
    else:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer != "adamw":
        from .quant import make_optimizer as make_bnb_optimizer

        return make_bnb_optimizer(t.optimizer, groups, lr=t.lr)
    # the fused kernel (HF Trainer's default since torch 2.8): one pass over each tensor, measured 6.5 ms against
    # foreach's 24.5 ms per step for the demo's 4.9M adapter parameters on 2 CPU cores; other devices: foreach
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused, foreach=not fused)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_batch(examples: list[D.Example], idx: list[int], cfg: TrainConfig, pad_id: int, pack: bool) -> dict:
    chosen = [examples[i] for i in idx]
    rows = D.pack(chosen, cfg.data.max_seq_len) if pack else chosen
    return D.collate(rows, pad_id)


# --- checkpoints ---------------------------------------------------------------------------------------------

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "trainer_state.json")
MANIFEST = "manifest.json"  # written last: each file's size and SHA-256, so resume can tell a damaged checkpoint


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, state: dict) -> Path:
    """Write checkpoints/step-N atomically: its files, then their manifest, in a temporary directory that is
    renamed into place when complete.

    A write the disk refuses (full, file-size limit, permission, I/O error) raises TrainingError naming the
    directory, about how much it needed, and the last complete checkpoint, which is left intact; the temporary
    directory is removed.
    """
    final = root / f"step-{step:07d}"
    weights = trainable_state(model)
    opt_state = optimizer.state_dict()
    tensors = {f"{pid}.{k}": v.cpu().contiguous() for pid, s in opt_state["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "param_groups": opt_state["param_groups"], "scheduler": scheduler.state_dict(),
            "python_rng": _python_rng_state(), "config": to_dict(cfg), **state}
    text = json.dumps(meta, indent=1)
    need = sum(v.nbytes for v in (*weights.values(), *tensors.values())) + len(text)
    try:
        with atomic_dir(final, need) as tmp:
            save_file(weights, tmp / "trainable.safetensors")
            save_file(tensors, tmp / "optimizer.safetensors")
            (tmp / "trainer_state.json").write_text(text)
            if os.environ.get("LORAFORGE_TEST_CRASH_IN_SAVE") == str(step):  # test hook: die mid-save, like SIGKILL
                os.kill(os.getpid(), 9)
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                     for name in CHECKPOINT_FILES}
            (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
            if final.exists():  # the same step written again (after resume skipped a damaged one): the new one wins
                shutil.rmtree(final)
    except DiskError as e:
        last = last_checkpoint(root)
        kept = (f"the last complete checkpoint, {last}, is intact: make room (or fix the permission) and continue "
                f"with --resume" if last else "no checkpoint was completed before this one")
        raise TrainingError(f"{e}; training stopped after step {step}, {kept}") from None
    old = sorted(root.glob("step-*"))[:-cfg.training.keep_checkpoints]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return final


def _python_rng_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint's files match its manifest (sizes and SHA-256); otherwise what is wrong."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its save did not finish, or a loraforge without manifests wrote it)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name in CHECKPOINT_FILES:
        entry, file = files.get(name) if isinstance(files, dict) else None, path / name
        if not isinstance(entry, dict):
            return f"its {MANIFEST} does not list {name}"
        if not file.is_file():
            return f"{name} is missing"
        if (size := file.stat().st_size) != entry.get("bytes"):
            return f"{name} is {size} bytes but was written as {entry.get('bytes')} (truncated or damaged)"
        if _sha256(file) != entry.get("sha256"):
            return f"{name} does not match its SHA-256 in {MANIFEST} (damaged)"
    return None


def find_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones that do not, each with the reason (newest first)."""
    skipped = []
    for path in sorted(root.glob("step-*"), reverse=True):
        reason = verify_checkpoint(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def last_checkpoint(root: Path) -> Path | None:
    """The newest complete, verified checkpoint (an interrupted save's temporary directory never counts)."""
    return find_checkpoint(root)[0]


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    meta = json.loads((path / "trainer_state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or set(weights) - set(params):
        raise TrainingError(f"checkpoint {path} does not match this model/config (missing {missing[:3]}); "
                            f"resume with the config the run was started with")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    tensors = load_file(path / "optimizer.safetensors")
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("rng."):
            continue
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return meta


def nonfinite_advice(lr: float, precision: str, max_grad_norm: float | None = None, step: int | None = None) -> str:
    """What to change after a non-finite loss, from what the run used: `precision` is the compute precision it
    resolved to ('fp32', 'bf16' or 'fp16'), `step` the step (from 1) whose loss was not finite."""
    if step == 1:  # no optimizer step has run yet: the learning rate cannot be the cause
        advice = ["The loss was not finite before any update, so the learning rate is not the cause: check the base "
                  "model (does it give finite logits in model.dtype?) and the first batch's records"]
    else:
        advice = [f"Lower training.lr (it is {lr:g}; try {lr / 10:g})"]
        if not max_grad_norm:
            advice.append("set training.max_grad_norm: 1.0 to clip the gradients")
    if precision == "fp16":
        advice.append("fp16 overflows past 65504: use training.precision: bf16 where the hardware has it, or fp32")
    elif precision == "bf16":
        advice.append("try training.precision: fp32 (bf16 keeps 8 bits of mantissa)")
    if step != 1:
        advice.append("check the records of this step for unusual text (very long, repeated or garbled)")
    return "; ".join(advice)


# --- the loop ------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False,
          precision: Precision | None = None) -> TrainResult:
    """Fine-tune as `cfg` says; returns what was measured. Writes adapter, metrics, plot under output_dir.

    An output_dir that is not empty needs `overwrite` (an earlier run there is started over; `resume` continues
    it instead); one that holds the data file or the model is refused (loraforge.outputs). `precision`: the
    caller's run_precision(cfg, device) where it already resolved it (decided, and warned about, once).
    """
    from .adapters import save_adapter
    from .inject import count_parameters, parameter_report
    from .models import load_tokenizer
    from .report import MetricsLog, peak_memory_mb, plot_loss, progress_bar
    from .trackers import TrackedLog, open_tracker

    rank, world, device = setup_distributed()
    is_main = rank == 0
    t = cfg.training
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    stale = check_run_output(out, overwrite=overwrite, resume=resume,  # before any loading
                             inputs=[cfg.model.name, cfg.data.train, cfg.data.eval])
    if is_main:
        for d in stale:  # the earlier run's checkpoints: this run's replace them
            shutil.rmtree(d)

    precision = precision or run_precision(cfg, device)
    if is_main:
        print(precision.line(), flush=True)
    tokenizer = load_tokenizer(cfg.model.name)
    train_examples, eval_examples, data_stats = load_data(cfg, tokenizer)  # data errors come before model work
    pad_id = tokenizer.pad_token_id
    per_epoch = len(micro_batches(train_examples, cfg, 0)) // (t.gradient_accumulation * world)
    if per_epoch == 0:
        raise TrainingError(f"{len(train_examples)} training examples are fewer than one optimizer step needs "
                            f"(batch_size {t.batch_size} × gradient_accumulation {t.gradient_accumulation} × "
                            f"{world} processes); lower training.batch_size")
    total_steps = t.max_steps or max(1, int(per_epoch * t.epochs))
    model, _ = build_model(cfg, device, total_steps, tokenizer, precision)
    trainable, total_params = count_parameters(model)
    if trainable == 0:
        raise TrainingError("no trainable parameters: check lora.target_modules / method")
    allocator = None
    if cfg.method == "adalora":
        from .adalora import RankAllocator

        allocator = RankAllocator(model, total_step=total_steps)

    loss_fn = CausalLMLoss(model, share_prefix=shares_prefix(t.share_prefix, device)).train()
    if t.compile:
        loss_fn = torch.compile(loss_fn, dynamic=True)  # the module's parameters stay the model's
    ddp = nn.parallel.DistributedDataParallel(loss_fn) if world > 1 else loss_fn
    optimizer = make_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.schedule, t.warmup_steps, total_steps))
    # fp16: the loss is scaled up so small gradients do not underflow; a step whose gradients overflow is skipped
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    skipped_steps = 0

    step, tokens_seen = 0, 0
    if not resume and (earlier := sorted(ckpt_root.glob("step-*"))):  # complete or not: this run would mix with them
        raise TrainingError(f"{out} already holds checkpoints of a run ({earlier[-1].name}); continue it with "
                            f"--resume, delete {ckpt_root} to start over, or choose another output_dir")
    if resume:
        found, skipped = find_checkpoint(ckpt_root)
        if found is None:
            why = " (" + "; ".join(f"{p.name}: {reason}" for p, reason in skipped) + ")" if skipped else ""
            raise TrainingError(f"--resume: no complete checkpoint under {ckpt_root}{why}; to start over, run "
                                f"without --resume and with --overwrite (or delete {ckpt_root}), or choose another "
                                f"output_dir")
        meta = load_checkpoint(found, model, optimizer, scheduler)
        if is_main:
            for path, reason in skipped:  # newer than `found` and damaged: this run writes their steps again
                print(f"skipping checkpoint {path.name}: {reason}; removed it", flush=True)
                shutil.rmtree(path, ignore_errors=True)
        step, tokens_seen = meta["step"], meta["tokens_seen"]
        if scaler.is_enabled() and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
            skipped_steps = meta.get("skipped_steps", 0)
        if allocator is not None:
            allocator.load_state(meta.get("allocator", {}))
        if is_main:
            print(f"resuming from {found} (step {step}/{total_steps})", flush=True)
    prefix_of = None if t.compile else lambda chunk: loss_fn.prefix_to_share(D.collate(chunk, pad_id))
    padding = D.padding_fraction(train_examples, t.batch_size)
    net = D.padding_fraction(train_examples, t.batch_size, prefix_of) if prefix_of else padding  # packed: no sharing
    pack = D.should_pack(cfg.data.packing, net)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(parameter_report(model), flush=True)
        print(data_report(data_stats, len(eval_examples), padding, net, pack, cfg.data.packing), flush=True)
        first = make_batch(train_examples, micro_batches(train_examples, cfg, 0)[0], cfg, pad_id, pack)
        if not t.compile and (shared := loss_fn.prefix_to_share(first)):  # compiled, the loss shares none
            print(f"the first batch's {len(first['input_ids'])} rows share their first {shared} tokens (of up to "
                  f"{first['input_ids'].shape[1]}): computed once per batch (training.share_prefix)", flush=True)
    log = TrackedLog(MetricsLog(out / "metrics.jsonl", append=resume),  # + training.report_to's tracker
                     open_tracker(t.report_to, out, to_dict(cfg))) if is_main else None
    bar = progress_bar(total_steps, initial=step, enabled=is_main and progress)

    start, start_tokens = time.perf_counter(), tokens_seen
    loss_value, eval_loss = float("nan"), None
    epoch_batches: dict[int, list[list[int]]] = {}
    while step < total_steps:
        # 1. this step's micro-batches: global position step*G .. +G in the epoch order; rank r takes r, r+world, ...
        group = t.gradient_accumulation * world
        epoch, within = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: micro_batches(train_examples, cfg, epoch)}
        mine = epoch_batches[epoch][within * group:(within + 1) * group][rank::world]
        batches = [to_device(make_batch(train_examples, idx, cfg, pad_id, pack), device) for idx in mine]

        # 2. the supervised-token count of the whole step, over all micro-batches and processes
        n_step = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), device=device)
        if world > 1:
            dist.all_reduce(n_step)

        # 3. forward / backward: each token weighs 1/n_step, so accumulation and processes change nothing
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            context = ddp.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with context:
                with precision.autocast(device.type):
                    loss_sum, _ = ddp(batch)
                    objective = loss_sum
                    if allocator is not None:  # AdaLoRA's orthogonality penalty, once per step in total
                        objective = loss_sum + allocator.orth_penalty(model) * n_step / len(batches)
                scaler.scale(objective * world / n_step).backward()  # DDP averages over processes: × world undoes it
            step_loss += loss_sum.detach()  # the data loss alone is what gets reported
        if world > 1:
            dist.all_reduce(step_loss)
        loss_value = step_loss.item() / n_step.item()
        if not math.isfinite(loss_value):
            last = last_checkpoint(ckpt_root)
            if log is not None:
                log.close()
            raise TrainingError(f"loss is {loss_value} at step {step + 1}; stopping. The last good checkpoint is "
                                f"{last or 'none (no checkpoint was written yet)'}. "
                                + nonfinite_advice(t.lr, precision.compute, t.max_grad_norm, step + 1))

        # 4. clip, step, explicit hooks, schedule
        params = [p for p in model.parameters() if p.requires_grad]
        scaler.unscale_(optimizer)  # (fp16) true gradients before clipping; a no-op otherwise
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skips the update when (fp16) gradients hold inf/nan
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler backs off exactly when it skipped
        if allocator is not None and not skipped:
            allocator.step(model, step + 1)  # AdaLoRA (steps counted from 1, as PEFT): update importance, re-mask to the budget (needs the grads)
        optimizer.zero_grad(set_to_none=True)
        if skipped:
            skipped_steps += 1  # the learning-rate schedule waits for the next real update, as HF Trainer's does
        else:
            scheduler.step()
        step += 1
        step_examples = [i for idx in epoch_batches[epoch][within * group:(within + 1) * group] for i in idx]
        tokens_seen += sum(len(train_examples[i].input_ids) for i in step_examples)  # real tokens, no padding

        # 5. log, evaluate, checkpoint
        elapsed = time.perf_counter() - start
        tps = (tokens_seen - start_tokens) / max(elapsed, 1e-9)
        if is_main:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:.0f}",
                            **({"skipped": skipped_steps} if scaler.is_enabled() else {}))
            if skipped:
                bar.write(f"step {step}: fp16 gradients overflowed, update skipped and loss scale lowered to "
                          f"{scaler.get_scale():g} ({skipped_steps} skipped so far)")
            if step % t.log_every == 0 or step == total_steps or skipped:
                extra = {"loss_scale": scaler.get_scale(), "skipped_steps": skipped_steps} if scaler.is_enabled() else {}
                if allocator is not None:
                    extra["rank_budget"] = allocator.budget(step)[0]  # AdaLoRA's total rank at this step
                log.write(step=step, loss=loss_value, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                          tokens=tokens_seen, tokens_per_s=tps, elapsed_s=elapsed, **extra)
        if eval_examples and ((t.eval_every and step % t.eval_every == 0) or step == total_steps):
            eval_loss = mean_token_loss(model, eval_examples, pad_id, max(t.batch_size, 8), pack,
                                        cfg.data.max_seq_len, precision=precision.compute)
            if is_main:
                log.write(step=step, eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
                bar.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {math.exp(min(eval_loss, 50)):.2f}")
        if is_main and ((t.save_every and step % t.save_every == 0) or step == total_steps):
            state = {"tokens_seen": tokens_seen, "total_steps": total_steps,
                     "allocator": allocator.state() if allocator is not None else {},
                     "scaler": scaler.state_dict(), "skipped_steps": skipped_steps}
            save_checkpoint(ckpt_root, step, model, optimizer, scheduler, cfg, state)
    bar.close()
    if log is not None:
        log.close()
    seconds = time.perf_counter() - start

    if is_main:
        if cfg.method == "full":
            model.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
        else:
            if allocator is not None:
                allocator.finalize(model)
            save_adapter(model, out / "adapter")
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    if world > 1:
        dist.barrier()
    return TrainResult(output_dir=out, steps=step, final_loss=loss_value, eval_loss=eval_loss,
                       train_tokens=tokens_seen, seconds=seconds,
                       tokens_per_second=(tokens_seen - start_tokens) / max(seconds, 1e-9),
                       peak_memory_mb=peak_memory_mb(device), trainable_params=trainable,
                       total_params=total_params, data_stats=data_stats, precision=precision.line(),
                       skipped_steps=skipped_steps)
