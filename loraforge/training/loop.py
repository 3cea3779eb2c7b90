"""The training recipe: `train(cfg)` = setup() -> fit() -> finish(), each a plain function read top to bottom.

    setup:  processes, output folder, precision, read + tokenize data, load base, add adapter (or make every
            weight trainable), loss, optimizer, schedule, resume from a checkpoint
    fit:    for each step: 1. gather the step's micro-batches; optimizer_step(): 2. count their supervised tokens
            (all processes), 3. forward + summed loss / that count, backward, all-reduce (DDP), 4. clip, optimizer
            step, explicit hooks (AdaLoRA), schedule; then 5. log, evaluate, checkpoint
    finish: save the adapter (or the full model), plot the loss, report what was measured

Several processes: `torchrun --nproc_per_node=N -m loraforge train CONFIG`; DDP or FSDP2 over gloo (CPU) or
nccl (CUDA) (loraforge.training.distributed); only rank 0 writes, except sharded checkpoints (training.dcp). A
checkpoint holds adapter, optimizer, scheduler, RNG and data position; it is written to a temporary directory
and renamed, so a crash never leaves a half checkpoint that resume would read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from loraforge.config import USUAL_SCALE, ConfigError, TrainConfig, to_dict
from loraforge.lora.adalora import FROM_LORA, AdaLoraConfig, RankAllocator, inject_adalora
from loraforge.lora.adapters import save_adapter
from loraforge.lora.inject import count_parameters, inject, lora_layers, parameter_report
from loraforge.lora.merge import WEIGHT_FILES
from loraforge.models import check_fits_context, conversion_paths, load_config, load_model, load_tokenizer
from loraforge.precision import FP16_MAX, TORCH_DTYPES, Precision, choose
from loraforge.quant.bnb import check_bitsandbytes, prepare_for_kbit_training
from loraforge.training import data as D
from loraforge.training.checkpoint import (SHARDED, WRITTEN_WITH_FSDP, WRITTEN_WITHOUT_FSDP, DiskStop,
                                           TrainingError, best_checkpoint, checkpoint_format, disk_stop,
                                           find_checkpoint, global_batch, global_batch_change, last_checkpoint,
                                           load_checkpoint, prune_checkpoints, resume_changes, rng_state,
                                           save_checkpoint, schedule_changes)
from loraforge.training.continual import init_adapter_config, init_adapter_source, keep_copy, start_from_adapter
from loraforge.training.dcp import find_sharded, load_sharded, save_sharded
from loraforge.training.epochs import EpochPlan, left_out_line, too_many_epochs
from loraforge.training.distributed import (NOT_ONE_FOLDER, check_same_checkpoint, check_same_config, check_same_data,
                                            check_same_precision, check_same_weights, choose_mode,
                                            clip_sharded, collective_error, full_state_dict, full_trainables,
                                            is_collective_failure, no_sync, restarted_from, setup_processes,
                                            unseen_output,
                                            unsharded, wrap)
from loraforge.training.evaluate import eval_batch_size, mean_token_loss, mlp_width, perplexity_of
from loraforge.training.fastpath import install, joins_rows, register_attention
from loraforge.training.loss import CausalLMLoss, shares_prefix
from loraforge.training.mixing import (MIN_TO_SPLIT, Mixture, fingerprint, fingerprint_changes, load_sources,
                                      sources_report)
from loraforge.training.optim import make_optimizer
from loraforge.training.report import (MetricsLog, logged_evals, logged_losses, lowest_logged_eval,
                                       nonfinite_logged_evals, peak_memory_mb, plot_loss, progress_bar,
                                       reset_peak_memory)
from loraforge.training.slab import ActivationSlab, hold_memory, unused_settings
from loraforge.training.trackers import TrackedLog, check_tracker, open_tracker
from loraforge.utils.allocator import line as allocator_line
from loraforge.utils.files import OVERWRITE, DiskError, atomic_dir
from loraforge.utils.hf import enable_checkpointing
from loraforge.utils.outputs import LOCK, RESUME, OutputError, check_not_input, check_run_output, hold_output
from loraforge.utils.rng import kept_random_state


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
    rank: int = 0  # under torchrun every process returns one; only rank 0's wrote the adapter
    saved: str = "adapter"  # the folder of output_dir holding the result: adapter, or model (method: full)
    aside_seconds: float = 0.0  # of `seconds`, those spent evaluating and saving: tokens_per_second leaves them out
    device_type: str = "cpu"  # where it trained: peak_memory_mb is the GPU's max allocated on "cuda", else peak RSS
    already_finished: bool = False  # a --resume of a run that had finished: no step ran; its losses are the logged ones
    result_existed: bool = True  # already_finished: its adapter (model) was there; False: a kill during its write
    best: dict | None = None  # training.keep_best: {"step", "eval_loss", "checkpoint"} of the lowest held-out loss
    best_unsaved: dict | None = None  # keep_best: {"step", "eval_loss"} of a lower held-out loss at a step not saved
    nonfinite_evals: dict | None = None  # {"count", "of", "step"}: held-out losses not finite, of how many, the first's


# --- set-up --------------------------------------------------------------------------------------------------

def section_named(text: str, section: str, from_lora: Collection[str] = ()) -> str:
    """A problem or warning about a field ('target_modules: ...') named as the config has it: lora.target_modules or
    adalora.target_modules (`from_lora`: the fields an adalora: section took from the lora: section)."""
    if text.startswith(f"{section}."):
        return text
    field = re.match(r"(\w+): ", text)
    return f"{'lora' if field and field.group(1) in from_lora else section}.{text}"


def adapter_section(cfg: TrainConfig) -> tuple[str, set[str]]:
    """The config section an adapter's errors and warnings name, and the fields an adalora: section took from the
    lora: section (in_section, section_warnings): build_model's, and the dashboard's target check's."""
    if cfg.method == "adalora":
        return "adalora", set(FROM_LORA) - set(cfg.adalora)
    return "lora", set()


@contextlib.contextmanager
def in_section(section: str, from_lora: Collection[str] = ()):
    """Name the config section in the errors inject raises (section_named)."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError([section_named(p, section, from_lora) for p in e.problems]) from None


@contextlib.contextmanager
def section_warnings(section: str, from_lora: Collection[str] = ()):
    """Name the config section in the field warnings inject gives ("lora_alpha: ...", not "r=64 on ..."), each
    said again once the block ends (soak: a run's extreme-scale warning named lora_alpha, not lora.lora_alpha). It
    takes the warnings of every thread meanwhile: for the one that builds a run's model, not a server's."""
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:  # an error too: what was said before it is said
        for w in caught:
            text = str(w.message)
            named = section_named(text, section, from_lora) if re.match(r"\w+: ", text) else text
            warnings.warn_explicit(named, w.category, w.filename, w.lineno)


def run_precision(cfg: TrainConfig, device: torch.device, warn: bool = True) -> Precision:
    """training.precision and model.dtype resolved on this device (loraforge.precision: auto from the hardware)."""
    return choose(cfg.training.precision, cfg.model.dtype, device=device, warn=warn)


def build_model(cfg: TrainConfig, device: torch.device, total_steps: int | None = None, tokenizer=None,
                precision: Precision | None = None, sharded: bool = False, init_source: Path | None = None):
    """(model, tokenizer): the base with the method's trainable parts; trainable weights in fp32.

    `total_steps` sets AdaLoRA's rank schedule (budget from init_r to target_r over the run; needed for
    method adalora). A tokenizer already loaded can be passed in. The frozen base is stored in the precision's
    storage dtype (a 4-bit base computes in it too); `precision` defaults to run_precision(cfg, device).
    `sharded` (FSDP): the weights load on the CPU (each process moves only its shards to `device`), 4-bit codes
    held as the storage dtype (FSDP shards floating-point parameters only). `init_source`: where
    training.init_adapter is read from (a resumed run's copy of it; the folder it names by default).
    """
    quantization = cfg.quantization
    precision = precision or run_precision(cfg, device)
    model = load_model(cfg.model.name, dtype=precision.storage, quantize=quantization,
                       device=torch.device("cpu") if sharded else device,
                       quant_storage=TORCH_DTYPES[precision.storage] if sharded else torch.uint8)
    checkpointing = cfg.training.gradient_checkpointing
    if quantization:
        prepare_for_kbit_training(model, gradient_checkpointing=checkpointing is None or bool(checkpointing))
    elif checkpointing:
        enable_checkpointing(model)
        if cfg.method != "full":
            model.enable_input_require_grads()
    if type(checkpointing) is int and checkpointing > 0:  # N layers, not every one
        checkpoint_only(model, checkpointing)
    attention = training_attention(cfg, device, model.config)
    if attention == "lean":
        register_attention()
    if getattr(model.config, "_attn_implementation", attention) != attention:
        model.set_attn_implementation(attention)
    lora = dataclasses.replace(cfg.lora, base_model_name_or_path=cfg.model.name)
    if cfg.method == "full":
        model.requires_grad_(True)
    elif cfg.training.init_adapter:  # its own settings; conflicts were refused by init_adapter_config
        start_from_adapter(model, cfg, "default", init_source)
    elif cfg.method == "adalora":
        if total_steps is None:
            raise ValueError("build_model: method adalora needs total_steps (its rank schedule spans the run)")
        if cfg.adalora.get("total_step") not in (None, total_steps):  # it used to be replaced without a word
            raise ConfigError([f"adalora.total_step: {cfg.adalora['total_step']} is not this run's {total_steps} "
                               f"steps; a training run sets it (training.max_steps, or epochs × steps per epoch): "
                               f"remove adalora.total_step, or set training.max_steps={cfg.adalora['total_step']}"])
        section = adapter_section(cfg)
        with in_section(*section), section_warnings(*section):
            inject_adalora(model, AdaLoraConfig.from_train_config(lora, {**cfg.adalora, "total_step": total_steps}),
                           "default")
    else:
        section = adapter_section(cfg)
        with in_section(*section), section_warnings(*section):
            inject(model, dataclasses.replace(lora, use_dora=lora.use_dora or cfg.method == "dora"), "default")
    if cfg.training.fused_lora:
        for _, layer in lora_layers(model):
            layer.fused = True  # layers the kernel can't run (dropout, DoRA, 4-bit base) keep the plain path
    if cfg.training.fused_blocks:
        install(model)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights for what trains; the frozen base keeps its dtype
    return model, tokenizer or load_tokenizer(cfg.model.name)


def load_data(cfg: TrainConfig, tokenizer,
              progress: bool = False) -> tuple[list[D.Example], list[D.Example], dict, Mixture]:
    """Tokenized train and held-out examples of every source, the counts to report, and how an epoch draws from
    the sources (loraforge.training.mixing). Every source's errors together, before any training. `progress`: a
    bar on stderr while a source takes long to tokenize."""
    return load_sources(cfg.data, tokenizer, cfg.training.seed, progress)


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


def training_attention(cfg: TrainConfig, device: torch.device, config=None) -> str:
    """training.attention resolved: "auto" is lean on CPU (which hands rows longer than fastpath.LEAN_MAX_LENGTH
    to SDPA unless they are packed of shorter sequences), SDPA elsewhere; eager for a model (`config`) whose
    attention scores are soft-capped (Gemma 2), which SDPA refuses (soak: every Gemma 2 run was its traceback)."""
    if cfg.training.attention != "auto":
        return cfg.training.attention
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "eager"
    return "lean" if device.type == "cpu" else "sdpa"


def _not_held_out(stats: dict) -> str:
    small = stats.get("not_held_out")
    if not small:
        return ""
    return (f" (data.eval_fraction holds out nothing from {', '.join(small)}: under {MIN_TO_SPLIT} records; give "
            f"data.eval for a held-out loss)")


def data_report(stats: dict, n_eval: int, padding: float, net: float, pack: bool, packing, join: bool = False,
                mixes: str | None = None) -> str:
    """The data line of a run: examples, and why its batches are packed or not (net: padding_fraction less what
    shared prefixes save; packed rows compute one position per real token and share nothing); join: the packed
    rows are joined (data.join_rows); mixes: the model class that would have been packed but does not keep packed
    examples apart (data.keeps_packed_apart)."""
    eos = (f", {stats['n_eos_stripped']} ending in the EOS text (learnt once)"
           if stats.get("n_eos_stripped") else "")
    overflow = stats.get("held_out_overflow")
    held = f" ({overflow['n_truncated']} truncated, {overflow['n_dropped']} dropped)" if overflow else ""
    if also := stats.get("held_out_in_train"):
        held += (f" ({also} of them also training examples, token for token: their loss measures recall, not "
                 f"generalisation)")
    where = ""
    if first := stats.get("dropped"):  # where the first dropped record came from, and why
        more = stats["n_dropped"] - 1
        where = f": {first[0]}" + (f" and {more} more" if more else "")
    n = stats.get("n_split", 0)
    split = f"{n} text{'s' * (n != 1)} longer than max_seq_len cut into windows, " if n else ""
    text = (f"data: {stats['n_examples']} train examples ({split}{stats['n_truncated']} truncated, "
            f"{stats['n_dropped']} dropped{where}{eos}), {n_eval} held out{held}{_not_held_out(stats)}; padded "
            f"batches would be {100 * padding:.1f}% padding")
    rule = f"{D.PACK_MIN_PADDING:.0%} padding"
    if net < padding:
        text += (f"; computing the prefix their rows share once, they would compute {1 / (1 - net):.2f} positions "
                 f"per real token")
        rule = f"{1 / (1 - D.PACK_MIN_PADDING):.2f} positions per real token"
    if pack:
        return text + (f": packed, a batch's rows joined into rows of about {D.JOIN_MAX_TOKENS} tokens (no padding "
                       f"between them)" if join else ": packed")
    if mixes:
        return text + f": not packed ({mixes} does not keep packed examples apart)"
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
    if n > len(layers):
        warnings.warn(f"training.gradient_checkpointing: {n} layers asked of a model with {len(layers)}: all of them "
                      f"recompute, as with true (at most {len(layers)} for some of them)", stacklevel=2)
        n = len(layers)  # the spread below would skip layers: round(i·L/n) repeats for n > L
    chosen = {round(i * len(layers) / n) for i in range(n)}
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
    return sorted(chosen)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_batch(examples: list[D.Example], idx: list[int], cfg: TrainConfig, pad_id: int, pack: bool,
               join: bool = False) -> dict:
    """The collated batch of examples[idx]: packed into rows of data.max_seq_len where pack is True, and those rows
    joined (data.join_rows: rows of about data.JOIN_MAX_TOKENS, no padding between them, padded to a multiple of
    data.JOIN_MULTIPLE positions) where join is True too."""
    chosen = [examples[i] for i in idx]
    rows = D.pack(chosen, cfg.data.max_seq_len) if pack else chosen
    if pack and join:
        return D.collate_joined(rows, pad_id)
    return D.collate(rows, pad_id)


def nonfinite_advice(lr: float, precision: str, max_grad_norm: float | None = None, step: int | None = None,
                     records: str = "the records of this step") -> str:
    """What to change after a non-finite loss, from what the run used: `precision` is the compute precision it
    resolved to ('fp32', 'bf16' or 'fp16'), `step` the step (from 1) whose loss was not finite, `records` the data
    that loss was of (a held-out loss's: the held-out records)."""
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
        advice.append(f"check {records} for unusual text (very long, repeated or garbled)")
    return "; ".join(advice)


def unusual_settings(cfg: TrainConfig) -> str:
    """Fields far past their usual values that can make the loss or the gradients overflow, named first in a
    non-finite stop's advice (soak: 1e30 in either was blamed on training.lr)."""
    ratio = cfg.training.loraplus_lr_ratio
    orth = float(cfg.adalora.get("orth_reg_weight", 0)) if cfg.method == "adalora" else 0  # YAML: "1e30" a str
    said = [f"training.loraplus_lr_ratio is {ratio:g} (16 is usual)"] if ratio and ratio > 1000 else []
    said += [f"adalora.orth_reg_weight is {orth:g} (0.5 is usual)"] if orth > 100 else []
    return f"{'; '.join(said)}: lower {'it' if len(said) == 1 else 'them'}. Else: " if said else ""


def scale_note(cfg: TrainConfig, always: bool = True) -> str:
    """The adapter's scale, named as the config has it, in a non-finite stop's advice (LoRA methods); `always`
    False: only a scale outside config.USUAL_SCALE (soak: the NaN loss of an fp32 run with lora_alpha 1e20 blamed
    training.lr alone)."""
    lora = cfg.lora
    scale = lora.lora_alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
    if cfg.method not in ("lora", "dora", "qlora") or (not always and USUAL_SCALE[0] <= abs(scale) <= USUAL_SCALE[1]):
        return ""
    return (f"The adapter's scale is lora.lora_alpha / lora.r = {lora.lora_alpha:g} / {lora.r}: lower "
            f"lora.lora_alpha if it is unusually large. Else: ")


def nonfinite_eval_warning(run: Run, eval_loss: float, loss_value: float) -> str:
    """The warning of a run's first held-out loss that is not finite (given once a run: the last line counts them),
    worded as a non-finite training loss's stop, whose advice it gives: the evaluation of step `run.step` came after
    that many updates, as the training loss of step run.step + 1 does. Training goes on: its own loss, checked every
    step, stops it when it goes too."""
    t = run.cfg.training
    finite = f" (the training loss, {loss_value:.4g}, was finite)" if math.isfinite(loss_value) else ""
    best = " and training.keep_best passes over it" if t.keep_best else ""
    return (f"held-out loss is {eval_loss} at step {run.step}{finite}; training goes on, metrics.jsonl records it as "
            f"null{best} (warned once: the run's last line counts the evaluations that were not finite). "
            f"{unusual_settings(run.cfg)}{scale_note(run.cfg, always=False)}"
            + nonfinite_advice(t.lr, run.precision.compute, t.max_grad_norm, run.step + 1, "the held-out records"))


# --- the loop ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What set-up builds and the loop and finish use: the model, its optimizer state, the data and the counters."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    precision: Precision
    tokenizer: object
    train_examples: list
    eval_examples: list
    data_stats: dict
    epochs: EpochPlan
    total_steps: int
    model: nn.Module
    trainable: int
    total_params: int
    allocator: object | None
    loss_fn: nn.Module
    ddp: nn.Module
    slab: ActivationSlab | None  # training.activation_buffer: the forward's kept activations go there
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    mixture: Mixture | None = None
    data_fingerprint: list = dataclasses.field(default_factory=list)  # mixing.fingerprint: kept in checkpoints
    pack: bool = False
    join: bool = False  # packed rows joined before collating (data.join_rows; fastpath.joins_rows)
    sharded: bool = False  # FSDP: parameters are shards; checkpoints, evaluation and the final save gather
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    log_precision: bool = True  # the next metrics row says the precision line (a run's first; a resume's in another)
    resumed: bool = False  # --resume, or a torchrun restart that continues the attempt before (restarted_from)
    nonfinite_loss: bool = False  # fp16: the last step's loss was not finite (its update skipped)
    evaluated: tuple[int, float] | None = None  # (step, held-out loss) of the last evaluation, for its checkpoint
    eval_warned: bool = False  # a held-out loss that was not finite was warned about (once a run)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False,
          precision: Precision | None = None) -> TrainResult:
    """Fine-tune as `cfg` says; returns what was measured. Writes adapter, metrics, plot under output_dir.

    An output_dir that is not empty needs `overwrite` (an earlier run there is started over; `resume` continues
    it instead); one that holds the data file or the model is refused (loraforge.utils.outputs). `precision`: the
    caller's run_precision(cfg, device) where it already resolved it (decided, warned about and printed by it).
    The run seeds torch's and Python's generators with training.seed; the caller's states are back when it returns
    or raises (utils.rng). Its peak_memory_mb counts from its start: the process's peak statistics are reset then
    (report.reset_peak_memory), so an earlier notebook cell's peak is not the run's.
    """
    with kept_random_state(), contextlib.ExitStack() as held:  # rank 0 holds output_dir's lock until the run ends
        stage, run = "set-up", None
        try:
            run = setup(cfg, resume, overwrite, precision, held)
            start_tokens, stage = run.tokens_seen, "training"
            with StopRequest(world=run.world) as stop:  # Ctrl-C, kill: stop after the step, checkpoint kept
                loss_value, eval_loss, seconds, aside = fit(run, progress, append_log=run.resumed, stop=stop)
                stage = "finish"
                result = finish(run, loss_value, eval_loss, seconds, start_tokens, aside)
                if stop.agreed(run.device):  # during the last step or the finish: the run is whole, then it stops
                    raise Stopped(stop.signum, f"stopped by {stop.name} at the end of the run (step {run.step} of "
                                               f"{run.total_steps}); it had finished: {result.saved} written to "
                                               f"{run.out / result.saved}", resumable=False, result=result)
            return result
        except Interrupted as e:  # a second signal: say what is left to continue from (StopRequest cannot know)
            raise interrupted_again(e, last_good_checkpoint(run) if run is not None else None, stage) from None
        except RuntimeError as e:  # a peer died or hung: say so, and when, rather than a bare backend error
            if not (dist.is_initialized() and dist.get_world_size() > 1 and is_collective_failure(e)):
                raise
            saved = any((Path(cfg.output_dir) / "checkpoints").glob("step-*"))  # as rank 0's file system has it
            raise collective_error(dist.get_rank(), cfg.training.collective_timeout, e, stage, saved) from e


def setup(cfg: TrainConfig, resume: bool, overwrite: bool, precision: Precision | None,
          held: contextlib.ExitStack) -> Run:
    """Everything before the first step: processes, output folder, precision, data, model, optimizer, resume.

    Rank 0 enters output_dir's lock (outputs.hold_output) into `held`, before output_dir is checked or read; when
    it refuses output_dir, every rank raises its OutputError (or DiskError) at once."""
    rank, world, device = setup_processes(cfg.training.collective_timeout)
    check_same_config(to_dict(cfg), world)  # before anything is read or written: every process the same run
    # the peak a run reports is its own, not an earlier one's in this process (a notebook's first train(), the demo's
    # scoring before it): CUDA's peak statistics, a CPU's VmHWM
    reset_peak_memory(device)
    last = restarted_from(Path(cfg.output_dir) / "checkpoints", world)  # a collective: every process, always
    if last is not None and not (resume or overwrite):
        resume = True  # soak: torchrun --max-restarts ran the same command again, which refused the folder
        if rank == 0:
            print(f"torchrun restarted the processes (restart {os.environ['TORCHELASTIC_RESTART_COUNT']}): "
                  f"continuing from {last.name}, which the attempt before wrote, as --resume does", flush=True)
    check_tracker(cfg.training.report_to, cfg.output_dir)  # a missing tracker package: before anything loads
    check_bitsandbytes(cfg.quantization, cfg.training.optimizer)  # the same for the quant extra
    t = cfg.training
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    out = Path(cfg.output_dir)
    inputs = [cfg.model.name, *conversion_paths(cfg.model.name), *cfg.data.paths(), cfg.training.init_adapter]
    init_source = init_adapter_source(cfg, out / "checkpoints", resume)  # resumed: the copy the run kept
    init_adapter_config(cfg, init_source)  # a conflict with training.init_adapter: before any loading or writing
    refusal, stale = None, []
    if rank == 0:
        try:
            check_not_input(out, inputs, "output_dir")  # before the lock writes into output_dir
            held.enter_context(hold_output(out))  # a second run into output_dir is refused here
            for tmp in [*out.glob(".tmp-*"), *out.glob(".old-*"), *out.glob("checkpoints/.tmp-*"),
                        *out.glob("checkpoints/.old-*")]:
                remove(tmp)  # left by a writer that was killed; under the lock no other one is writing
            stale = check_run_output(out, overwrite=overwrite, resume=resume, inputs=inputs)  # before any loading
        except (OutputError, DiskError) as e:
            refusal = e
    if world > 1:  # every rank learns rank 0's answer now, rather than at its first collective (after a timeout)
        answer = [refusal]
        dist.broadcast_object_list(answer, src=0)  # rank 0's list stays as it was: its own exception
        refusal = answer[0]
    if refusal is not None:
        refusal.everywhere = True  # every process raises rank 0's: the CLI says it once per node
        raise refusal

    if precision is None:  # a caller that resolved it (demo) has printed its line already
        precision = run_precision(cfg, device)
        if rank == 0:
            print(precision.line(), flush=True)
    check_same_precision(precision, world)  # before any loading: auto decides per process, from its own hardware
    tokenizer = load_tokenizer(cfg.model.name)
    # errors before model work; a bar while tokenizing takes long (rank 0's)
    train_examples, eval_examples, data_stats, mixture = load_data(cfg, tokenizer, progress=rank == 0)
    data_fingerprint = fingerprint(train_examples, mixture)
    check_same_data(data_fingerprint, world)  # nodes that read a relative path from different folders
    longest = max((len(ex.input_ids) for ex in (*train_examples, *eval_examples)), default=0)  # per sequence
    check_fits_context(cfg.data.max_seq_len, load_config(cfg.model.name), longest=longest)  # GPT-2 would crash
    epochs = EpochPlan(train_examples, cfg, mixture, t.gradient_accumulation * world)  # too few for a step: refused
    first_epoch, per_epoch = epochs.first, epochs.steps(0)
    n_epoch = len(train_examples) if mixture is None else round(sum(mixture.expected_counts()))
    if refusal := too_many_epochs(cfg, per_epoch, n_epoch):  # before total() packs each epoch to count its steps
        raise ConfigError([refusal])
    total_steps = t.max_steps or epochs.total(t.epochs)
    if t.warmup_steps >= total_steps:  # max_steps' own check is the config's; epochs' total is known only here
        raise ConfigError([f"training.warmup_steps: {t.warmup_steps} is not less than the run's {total_steps} steps "
                           f"(training.epochs {t.epochs} × {per_epoch} steps an epoch), so the learning rate would "
                           f"still be rising when training stops; use at most {total_steps - 1} (typically 3-10% "
                           f"of the steps, e.g. {min(total_steps - 1, max(1, total_steps // 20))})"])
    mode = choose_mode(cfg, world, device, precision)  # unsupported FSDP combinations: refused before the model loads
    if unseen := unseen_output(out, world):  # soak: nodes with their own output_dir learnt it only at --resume
        where = f"rank(s) {', '.join(map(str, unseen))} do not see rank 0's output_dir {out}: {NOT_ONE_FOLDER}"
        if mode == "fsdp":
            raise TrainingError(f"training.distributed: fsdp: {where}; every process writes its shard of each "
                                f"checkpoint into it, so give output_dir as an absolute path on a file system every "
                                f"node sees", everywhere=True)
        if rank == 0:
            print(f"note: {where}: checkpoints, metrics and the adapter are written on rank 0's node alone, and "
                  f"--resume needs the checkpoint on every node; give output_dir as an absolute path on a file "
                  f"system every node sees (or copy {out / 'checkpoints'} to every node before --resume)", flush=True)
    model, _ = build_model(cfg, device, total_steps, tokenizer, precision,
                           sharded=mode == "fsdp", init_source=init_source)
    if mode == "fsdp":  # DDP copies rank 0's weights to every process; FSDP keeps each one's own shard
        check_same_weights(model, cfg.model.name, world)
    trainable, total_params = count_parameters(model)
    if trainable == 0:
        raise TrainingError("no trainable parameters: check lora.target_modules / method")
    allocator = RankAllocator(model, total_step=total_steps) if cfg.method == "adalora" else None

    share = shares_prefix(t.share_prefix, device) and mode != "fsdp"  # FSDP: its second pass' K/V escape the hooks
    loss_fn = CausalLMLoss(model, share_prefix=share).train()
    if t.compile:
        loss_fn.head_buffers = None  # dynamo traces the head's chunks itself: no Python object across calls
        loss_fn = torch.compile(loss_fn, dynamic=True, options=compile_options())  # the parameters stay the model's
    wrapped = wrap(loss_fn, model, mode, precision, device)  # FSDP: parameters become shards, before the optimizer
    optimizer = make_optimizer(model, t)
    run = Run(cfg=cfg, rank=rank, world=world, device=device, out=out, precision=precision, tokenizer=tokenizer,
              train_examples=train_examples, eval_examples=eval_examples, data_stats=data_stats,
              epochs=epochs, total_steps=total_steps, model=model, trainable=trainable,
              total_params=total_params, allocator=allocator, loss_fn=loss_fn,
              ddp=wrapped, sharded=mode == "fsdp", optimizer=optimizer,
              slab=None,  # decided with packing, below
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                          lr_lambda(t.schedule, t.warmup_steps, total_steps)),
              # fp16: the loss is scaled up so small gradients do not underflow; a step that overflows is skipped
              scaler=torch.amp.GradScaler(device.type, enabled=precision.needs_scaler), mixture=mixture,
              data_fingerprint=data_fingerprint)
    # FSDP: probed through the sharded loss module, its root (every process; soak: an FSDP run was not probed and
    # OPT packed its examples)
    probe = functools.partial(D.keeps_packed_apart, model, wrapped if mode == "fsdp" else None)
    if cfg.data.packing is True and not probe():  # before an earlier run is deleted
        raise ConfigError([f"data.packing: true, but {type(model).__name__} does not keep packed examples apart (its "
                           f"attention mask ignores position_ids), so each would attend to the ones before it in "
                           f"its row; use data.packing: false (or auto, which packs only models that keep them "
                           f"apart)"])
    for d in stale:  # the earlier run's results and checkpoints, deleted once data, model and settings have all
        # been accepted (a run refused for its data leaves the earlier run resumable); each renamed aside first, so
        # a kill leaves it whole or not at all (the next run sweeps `.old-*`)
        aside = d.parent / f".old-{d.name}"
        os.replace(d, aside)
        remove(aside)
    if init_source is not None and rank == 0:
        keep_copy(init_source, run.ckpt_root)  # --resume rebuilds the adapter from it, whatever becomes of the source
    if world > 1:
        dist.barrier()  # no rank looks for checkpoints before rank 0 has deleted them
    if not resume and (earlier := sorted(run.ckpt_root.glob("step-*"))):  # complete or not: they would mix
        raise TrainingError(f"{out} already holds checkpoints of a run ({earlier[-1].name}); continue it with "
                            f"{RESUME}, delete {run.ckpt_root} to start over, or choose another output_dir")
    if resume:
        run.resumed = True
        restore(run)

    prefix_of = None if t.compile else lambda chunk: loss_fn.prefix_to_share(D.collate(chunk, run.pad_id))
    drawn = [train_examples[i] for batch in first_epoch for i in batch]  # in the order the steps take them
    padding = D.padding_fraction(drawn, t.batch_size)
    net = D.padding_fraction(drawn, t.batch_size, prefix_of) if prefix_of else padding  # packed: no sharing
    run.pack = D.should_pack(cfg.data.packing, net)
    # auto: packed only where the model keeps packed examples apart (true was checked above); every rank asks
    apart = cfg.data.packing is True or not run.pack or probe()
    run.pack = run.pack and apart
    run.join = run.pack and joins_rows(training_attention(cfg, device, model.config), cfg.data.max_seq_len)
    # glibc's heap handed back when train() returns or raises
    run.slab = hold_memory(held, model, t.reuse_memory, t.activation_buffer, device, run.pack, run.sharded, t.compile)
    if run.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(parameter_report(model), flush=True)
        print(data_report(data_stats, len(eval_examples), padding, net, run.pack, cfg.data.packing, run.join,
                          None if apart else type(model).__name__), flush=True)
        if left_out := left_out_line(cfg, first_epoch, len(mixture.epoch_order(0)), per_epoch, world):
            print(left_out, flush=True)
        if memory_line := allocator_line(device.type, run.pack):  # what to preload depends on packing
            print(memory_line, flush=True)
        for line in unused_settings(t.reuse_memory, t.activation_buffer, device, run.pack, run.sharded, t.compile):
            print(f"note: {line}", flush=True)
        if "sources" in data_stats:
            print(sources_report(mixture, data_stats), flush=True)
        first = make_batch(train_examples, first_epoch[0], cfg, run.pad_id, run.pack, run.join)
        if not t.compile and (shared := loss_fn.prefix_to_share(first)):  # compiled, the loss shares none
            print(f"the first batch's {len(first['input_ids'])} rows share their first {shared} tokens (of up to "
                  f"{first['input_ids'].shape[1]}): computed once per batch (training.share_prefix)", flush=True)
    return run


def remove(path: Path) -> None:
    """Delete a file or a folder; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def restore(run: Run) -> None:
    """--resume: load the newest complete checkpoint (damaged newer ones are reported and removed). Refused, each
    with its fix: checkpoints of the other training.distributed (FSDP's sharded ones or not: never removed), and a
    global batch other than the checkpoint's (its data position and schedule count in it)."""
    found, skipped = (find_sharded if run.sharded else find_checkpoint)(run.ckpt_root)
    check_same_checkpoint(found, run.ckpt_root, run.world)  # before any process refuses on its own view
    other = [p for p, _ in skipped if checkpoint_format(p) not in (None, SHARDED if run.sharded else "plain")]
    if other and run.sharded:  # complete, for the other training.distributed: never "damaged", never removed
        raise TrainingError(f"--resume: {other[0]}: {WRITTEN_WITHOUT_FSDP}; resume it with the training.distributed "
                            f"it was written with (ddp under torchrun, or one process without torchrun)",
                            everywhere=True)
    if other:
        raise TrainingError(f"--resume: {other[0]}: {WRITTEN_WITH_FSDP}; resume it under torchrun with "
                            f"training.distributed=fsdp (any number of processes, e.g. torchrun --nproc_per_node=1 "
                            f"-m loraforge train CONFIG training.distributed=fsdp --resume)", everywhere=True)
    if found is None and not skipped and not any(run.ckpt_root.glob("step-*")):
        others = [p.name for p in run.out.iterdir() if p.name != LOCK] if run.out.is_dir() else []
        raise TrainingError(f"--resume: {run.out} holds no checkpoint (a run stopped before its first save, or none "
                            f"ran there); run without --resume to start it"
                            + (f" (with --overwrite: it holds {', '.join(sorted(others)[:3])})" if others else ""),
                            everywhere=True)
    if found is None:
        why = " (" + "; ".join(f"{p.name}: {reason}" for p, reason in skipped) + ")" if skipped else ""
        raise TrainingError(f"--resume: no complete checkpoint under {run.ckpt_root}{why}; to start over, run "
                            f"without --resume and with --overwrite (or delete {run.ckpt_root}), or choose another "
                            f"output_dir", everywhere=True)
    state = json.loads((found / "trainer_state.json").read_text())
    if why := global_batch_change(found, state.get("global_batch"), global_batch(run.cfg, run.world)):
        raise TrainingError(why, everywhere=True)  # the same on every process, as the checks below
    if changed := schedule_changes(state, to_dict(run.cfg), run.total_steps):
        # every setting to put back, in one message: the others were refused one run later (soak: lr, then lora.r)
        others = resume_changes(state.get("config") or {}, to_dict(run.cfg))[0]
        adapter = run.out / "adapter"
        finished = (adapter / "adapter_config.json").is_file()  # a stopped or killed run has written none yet
        first = "" if finished else "finish this run first (--resume with them as they were), then "
        if run.cfg.method == "adalora":  # an AdaLoRA adapter is not trained on (training.init_adapter refuses it)
            then = (f"{first}merge its adapter into the base (loraforge merge --base {run.cfg.model.name} --adapter "
                    f"{adapter} --out DIR) and train a new adapter on the merged model (model.name=DIR)")
        else:
            then = (f"{first}start a new run from {'the finished adapter' if finished else 'the adapter it writes'} "
                    f"(training.init_adapter={adapter})")
        kind = "settings" if others else "training settings"
        raise TrainingError(f"--resume: {found.name} was written with other {kind} ({'; '.join(changed + others)}); "
                            f"a resumed run continues its optimizer and learning-rate schedule, so put them back "
                            f"as they were; to train on with new ones, {then}", everywhere=True)
    older = f"--resume: {found.name} was written by an older loraforge, which"
    again = "start the run over (--overwrite), or finish it with the loraforge that started it"
    if state.get("data") is None:  # before 2026-12-03: no fingerprint, so a resume would go on silently
        raise TrainingError(f"{older} kept no fingerprint of the tokens it trained on, and this one may tokenize the "
                            f"data otherwise ({D.TOKENS_CHANGE}): its place in the data cannot be checked; {again}",
                            everywhere=True)
    if changed := fingerprint_changes(state["data"], run.data_fingerprint):
        # the same files read another way (data.max_seq_len, data.overflow: its default changed once) are named
        settings = [c for c in resume_changes(state.get("config") or {}, to_dict(run.cfg), older_defaults=False)[0]
                    if c.startswith(("data.", "training.seed"))]  # the seed draws the held-out split (soak: unsaid)
        also = f", as the settings that read it did ({'; '.join(settings)})" if settings else ""
        if state.get("tokens") != D.TOKENS_VERSION:  # the same files, most likely: not only "the data changed"
            raise TrainingError(f"{older} may have tokenized the training data otherwise: the tokens differ from the "
                                f"ones it trained on ({'; '.join(changed)}){also}; if the files "
                                f"{'or those settings ' if settings else ''}changed, put them back as they were; if "
                                f"not, this version reads them otherwise ({D.TOKENS_CHANGE}): {again}",
                                everywhere=True)
        raise TrainingError(f"--resume: the training data changed since {found.name} was written ({'; '.join(changed)}"
                            f"){also}; its place in the data would now repeat or skip examples, so put the data "
                            f"{'and those settings back as they were' if settings else 'back as it was'}; to train "
                            f"on the new data, start a new run (training.init_adapter starts it from an adapter)",
                            everywhere=True)
    meta = (load_sharded(found, run.ddp, run.optimizer, run.scheduler, to_dict(run.cfg)) if run.sharded
            else load_checkpoint(found, run.model, run.optimizer, run.scheduler, to_dict(run.cfg), run.rank, run.world))
    # after the weights' own check, which names a shape that changed (lora.r, target_modules) more precisely
    refused, warned = resume_changes(state.get("config") or {}, to_dict(run.cfg))
    if refused:
        raise TrainingError(f"--resume: {found.name} was written with other settings ({'; '.join(refused)}); a "
                            f"resumed run trains on the adapter, optimizer and place in the data it saved, so put "
                            f"them back as they were; to train with new ones, start a new run (training.init_adapter "
                            f"starts it from an adapter)", everywhere=True)
    if warned and run.is_main:
        warnings.warn(f"--resume: changed since {found.name} was written: {'; '.join(warned)}; resuming with the "
                      f"new setting (the steps from here on follow it)", stacklevel=2)
    if run.is_main:
        for path, reason in skipped:  # newer than `found` and damaged: this run writes their steps again
            print(f"skipping checkpoint {path.name}: {reason}; removed it", flush=True)
            shutil.rmtree(path, ignore_errors=True)
        prune_checkpoints(run.ckpt_root, run.cfg.training.keep_checkpoints, resumed=found,  # a kill left one more
                          keep_best=run.cfg.training.keep_best)
    changed = precision_change(meta.get("precision"), run.precision)
    run.log_precision = changed is not None  # rows of the same precision as before the stop: none says it again
    if run.is_main and changed:
        warnings.warn(f"--resume: {found.name} was trained {changed}", stacklevel=2)
    run.step, run.tokens_seen = meta["step"], meta["tokens_seen"]
    if run.scaler.is_enabled() and meta.get("scaler"):
        run.scaler.load_state_dict(meta["scaler"])
        run.skipped_steps = meta.get("skipped_steps", 0)
    if run.allocator is not None:
        run.allocator.load_state(meta.get("allocator", {}))
    if run.is_main:
        print(f"resuming from {found} (step {run.step}/{run.total_steps})", flush=True)


def precision_change(saved: dict | None, now: Precision) -> str | None:
    """What a resumed run computes or stores in other than its checkpoint did (auto decides on the hardware that
    resumes: a checkpoint of a T4's fp16 resumed on an A100 goes on in bf16, without its loss scaler), or None;
    a checkpoint that did not record it (an older version) is not compared."""
    if not saved or (saved.get("compute"), saved.get("storage")) == (now.compute, now.storage):
        return None
    def described(compute: str, storage: str) -> str:
        return compute + (f" (base stored in {storage})" if storage != compute else "")

    scaled = Precision(saved["compute"], saved["storage"], "").needs_scaler
    dropped = "; its fp16 loss scale is not carried over" if scaled and not now.needs_scaler else ""
    return (f"in {described(saved['compute'], saved['storage'])}, and this run goes on in "
            f"{described(now.compute, now.storage)} ({now.reason}): the steps from here on round differently"
            f"{dropped}; to continue as it was, set training.precision={saved['compute']} "
            f"model.dtype={saved['storage']}")


def fit(run: Run, progress: bool = True, append_log: bool = False,
        stop: StopRequest | None = None) -> tuple[float, float | None, float, float]:
    """The loop, step after step until total_steps: (last training loss, last held-out loss, seconds, seconds of
    them spent evaluating and saving checkpoints). Tokens/s (the progress bar's, metrics.jsonl's tokens_per_s) count
    the training steps' time only: a held-out evaluation or a checkpoint is not training (a 2-step run of the demo
    with batch_size 1 read 14 tokens/s with its final evaluation's 9 s counted, against 148 while it trained).

    With `stop`: once it is requested (SIGINT, SIGTERM, SIGUSR1, SIGHUP), the loop saves a checkpoint at the step it
    reached and raises Stopped (a KeyboardInterrupt naming the signal); `--resume` continues from there. Whatever
    ends the loop, the progress bar is closed first, so what is printed next starts on a line of its own."""
    cfg, t, model, scaler = run.cfg, run.cfg.training, run.model, run.scaler
    # the tracker first: one that cannot start leaves no metrics.jsonl behind (a rerun would need --overwrite)
    tracker = open_tracker(t.report_to, run.out, to_dict(cfg), resume=append_log) if run.is_main else None
    log = TrackedLog(MetricsLog(run.out / "metrics.jsonl", append=append_log,  # after a resume: from run.step on
                                until_step=run.step if append_log else None), tracker) if run.is_main else None
    bar = progress_bar(run.total_steps, initial=run.step, enabled=run.is_main and progress)
    start, start_tokens = time.perf_counter(), run.tokens_seen
    aside = 0.0  # seconds spent evaluating and saving
    loss_value, eval_loss = float("nan"), None
    final_loss = loss_value  # the last finite training loss: nan where no step ran
    group = t.gradient_accumulation * run.world
    saved = run.step if run.step else None  # a resumed run starts at its checkpoint's step
    try:
        while run.step < run.total_steps:
            if stop is not None and stop.agreed(run.device):  # under torchrun: every process at the same step
                checkpoint = run.ckpt_root / f"step-{run.step:07d}"
                if saved != run.step:  # not the file system's word: under torchrun every process decides alike
                    save_step(run)
                raise Stopped(stop.signum, f"stopped by {stop.name} after step {run.step} of {run.total_steps}: "
                                           f"checkpoint {checkpoint} saved")
            # 1. this step's micro-batches: global position step*G .. +G in the epoch order; rank r: r, r+world, ...
            epoch, within = run.epochs.locate(run.step)
            step_batches = run.epochs.batches(epoch)[within * group:(within + 1) * group]
            batches = [to_device(make_batch(run.train_examples, idx, cfg, run.pad_id, run.pack, run.join), run.device)
                       for idx in step_batches[run.rank::run.world]]

            # 2.-4. forward / backward over the step's micro-batches, clip, optimizer step
            lr = run.scheduler.get_last_lr()[0]  # the rate this step's update uses: the schedule moves on after it
            loss_value, grad_norm, skipped = optimizer_step(run, batches)
            final_loss = loss_value if math.isfinite(loss_value) else final_loss  # fp16: a skipped step's may be NaN
            run.step += 1
            run.tokens_seen += sum(len(run.train_examples[i].input_ids)
                                   for idx in step_batches for i in idx)  # real tokens, no padding

            # 5. log, evaluate, checkpoint
            elapsed = time.perf_counter() - start
            tps = (run.tokens_seen - start_tokens) / max(elapsed - aside, 1e-9)
            if run.is_main:
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:.0f}", refresh=False,  # drawn by update
                                **({"skipped": run.skipped_steps} if scaler.is_enabled() else {}))
                bar.update(1)
                if skipped:
                    cause = ("gradients overflowed" if math.isfinite(loss_value)
                             else f"forward overflowed (loss {loss_value})")
                    bar.write(f"step {run.step}: fp16 {cause}, update skipped and loss scale lowered to "
                              f"{scaler.get_scale():g} ({run.skipped_steps} skipped so far)")
                if run.step % t.log_every == 0 or run.step == run.total_steps or skipped:
                    extra = ({"loss_scale": scaler.get_scale(), "skipped_steps": run.skipped_steps}
                             if scaler.is_enabled() else {})
                    if run.log_precision:  # the run's first row, and a resume's in another precision: which, why
                        extra["precision"], run.log_precision = run.precision.line(), False
                    if run.allocator is not None:
                        extra["rank_budget"] = run.allocator.kept_rank()  # AdaLoRA's total rank kept after this step
                    log.write(step=run.step, loss=loss_value, lr=lr, grad_norm=float(grad_norm), tokens=run.tokens_seen,
                              tokens_per_s=tps, elapsed_s=elapsed, **extra)
            began = time.perf_counter()
            if run.eval_examples and ((t.eval_every and run.step % t.eval_every == 0) or run.step == run.total_steps):
                per_forward = eval_batch_size(run.eval_examples, mlp_width(model), max(t.batch_size, 8))
                with unsharded(run.ddp):
                    eval_loss = mean_token_loss(model, run.eval_examples, run.pad_id, per_forward, run.pack,
                                                cfg.data.max_seq_len, precision=run.precision.compute,
                                                head_buffers=getattr(run.loss_fn, "head_buffers", None))
                run.evaluated = (run.step, eval_loss)  # a checkpoint of this step records it (keep_best)
                if run.is_main:
                    ppl = perplexity_of(eval_loss)
                    log.write(step=run.step, eval_loss=eval_loss, eval_ppl=ppl)
                    bar.write(f"step {run.step}: eval loss {eval_loss:.4f}, perplexity {ppl:.2f} "
                              f"({time.perf_counter() - began:.1f} s, not counted in tokens/s)")
                    if not math.isfinite(eval_loss) and not run.eval_warned:  # soak: a NaN said on the bar alone
                        run.eval_warned = True
                        with type(bar).external_write_mode(file=sys.stderr):  # on a line of its own, bar redrawn
                            warnings.warn(nonfinite_eval_warning(run, eval_loss, loss_value), stacklevel=2)
            if (t.save_every and run.step % t.save_every == 0) or run.step == run.total_steps:
                save_step(run)
                saved = run.step
            aside += time.perf_counter() - began
    except (DiskError, DiskStop) as e:  # a metrics line (rank 0's) or a checkpoint the disk refused
        stop_line = e if isinstance(e, DiskStop) else disk_stop(run.ckpt_root, run.step, e, checkpoint=False)
        raise keep_adapter(run, stop_line) from None
    finally:
        bar.close()  # ends the bar's line: an error or the stop's message is printed after it
        if log is not None:
            log.close()
    if run.tokens_seen == start_tokens and run.is_main:  # a --resume of a finished run: what it measured then
        final_loss, eval_loss = logged_losses(run.out / "metrics.jsonl")  # (soak: train() returned nan, None)
    return final_loss, eval_loss, time.perf_counter() - start, aside


def keep_adapter(run: Run, error: DiskStop) -> DiskStop:
    """A run that the disk stopped before any checkpoint was complete kept nothing of its training (soak): rank 0
    writes the adapter of the step reached to output_dir/adapter where it fits (a checkpoint holds the optimizer's
    two moments besides it: about 3x its size), and the message says so, or what the adapter would need. LoRA and
    AdaLoRA of one process or DDP; not FSDP's shards, which only every process together can gather."""
    if (not run.is_main or run.sharded or run.cfg.method == "full" or run.step == 0
            or last_checkpoint(run.ckpt_root) is not None):
        return error
    try:
        saved = write_adapter(run)  # the run ends here
    except DiskError as e:
        return DiskStop(f"{error}; nor did the adapter of step {run.step} fit: {e}", error.everywhere)
    return DiskStop(f"{error}; the adapter of step {run.step} fitted: written to {saved}", error.everywhere)


def write_adapter(run: Run) -> Path:
    """One process's adapter of the step reached, to output_dir/adapter (AdaLoRA's ranks made final first): what
    finish writes, and keep_adapter when the disk stopped the run before any checkpoint."""
    if run.allocator is not None:
        run.allocator.finalize(run.model)
    return save_adapter(run.model, run.out / "adapter")


def save_step(run: Run) -> None:
    """A checkpoint of the step reached: rank 0 writes it, or under FSDP every process writes its shards."""
    if run.sharded:
        save_sharded(run.ckpt_root, run.step, run.ddp, run.optimizer, run.scheduler, run.cfg, checkpoint_state(run))
        return
    rngs = [rng_state()]
    if run.world > 1:  # DDP: each process's dropout draws its own, so each keeps its own state
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_state())
    if run.is_main:
        save_checkpoint(run.ckpt_root, run.step, run.model, run.optimizer, run.scheduler, run.cfg,
                        checkpoint_state(run), rngs)


def compile_options() -> dict:
    """Inductor's options for training.compile. Its on-disk graph cache (/tmp/torchinductor_$USER) is not keyed on
    the vector width ATEN_CPU_CAPABILITY picks: with the variable set (the README's way to try an AVX2-only CPU on
    another), a graph cached at AVX-512's width ran at AVX2's, a loss of NaN at step 1, or failed to build at
    `default` (AVX2 soak). With it set, the graph cache is not used, so each run compiles afresh."""
    return {"fx_graph_cache": False} if os.environ.get("ATEN_CPU_CAPABILITY") else {}


def checkpoint_state(run: Run) -> dict:
    """What a checkpoint keeps beyond weights and optimizer: counters, AdaLoRA's allocator, the loss scaler."""
    return {"tokens_seen": run.tokens_seen, "total_steps": run.total_steps,
            "global_batch": global_batch(run.cfg, run.world),  # resume refuses another (global_batch_change)
            # AdaLoRA's EMAs as tensors, which save_checkpoint writes to safetensors; FSDP's sharded ones as JSON
            "allocator": run.allocator.state(tensors=not run.sharded) if run.allocator is not None else {},
            "scaler": run.scaler.state_dict(), "skipped_steps": run.skipped_steps, "data": run.data_fingerprint,
            "tokens": D.TOKENS_VERSION,  # how records became tokens: resume tells an older loraforge's (data.py)
            "precision": {"compute": run.precision.compute, "storage": run.precision.storage},
            # its step's held-out loss where it was evaluated: the checkpoint of the lowest is kept (keep_best)
            "eval_loss": run.evaluated[1] if run.evaluated is not None and run.evaluated[0] == run.step else None}


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal (StopRequest): `signum` names it, and the CLI exits with `exit_code`, 128 + its
    number, as a shell reports a process that signal ended (SIGINT 130, SIGTERM 143, SIGUSR1 138, SIGHUP 129 on
    Linux). `result`: the TrainResult of a run the signal reached during its last step, which finished whole (its
    adapter and metrics written); a caller with more to do (demo, a study) stops, `loraforge train` has ended."""

    def __init__(self, signum: int, message: str, resumable: bool = True, result: TrainResult | None = None):
        super().__init__(message)
        self.signum, self.resumable = signum, resumable  # resumable: --resume continues it (not a finished run)
        self.result = result

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupted(Stopped):
    """A second signal (`signum`) interrupted the step, or the final save, that the `first` one asked the run to
    finish: it stops at once, without a checkpoint of that step."""

    def __init__(self, signum: int, first: int, message: str | None = None, resumable: bool = True):
        super().__init__(signum, message or f"interrupted by {signal.Signals(signum).name} after "
                                            f"{signal.Signals(first).name}, in the middle of a step; the last "
                                            f"complete checkpoint is kept", resumable)
        self.first = first


def interrupted_again(e: Interrupted, last: Path | None, stage: str) -> Interrupted:
    """The line a run interrupted by a second signal ends with: the checkpoint --resume continues from, or that there
    is none (a run stopped before its first save said "the last complete checkpoint is kept" and to --resume, which
    then refused: no checkpoint)."""
    head = (f"interrupted by {signal.Signals(e.signum).name} after {signal.Signals(e.first).name}, "
            f"{'while writing the result' if stage == 'finish' else 'in the middle of a step'}: stopping without "
            f"a checkpoint")
    if last is None:
        return Interrupted(e.signum, e.first, f"{head} (none was written yet, so there is nothing to resume: start "
                                              f"the run again with {OVERWRITE})", resumable=False)
    return Interrupted(e.signum, e.first, f"{head} of it; the last complete checkpoint, {last}, is kept")


class StopRequest:
    """Inside the block, the first SIGINT (Ctrl-C, the dashboard's stop), SIGTERM (`kill`, `docker stop`, systemd,
    Kubernetes, Slurm's pre-emption), SIGUSR1 (Slurm's `--signal`) or SIGHUP (the terminal or SSH session closed)
    asks the loop to stop after the step it is in, with a checkpoint, rather than interrupting it mid-step; a second
    one interrupts at once. Either way Stopped carries the signal. Installed in the main thread only, and not for a
    signal the process was started ignoring (`nohup` ignores SIGHUP: such a run goes on when its terminal closes).

    Under torchrun (`world` > 1) the processes agree before every step (`agreed`, one small all-reduce): a signal
    that reached any of them stops all of them after the same step, so the checkpoint is whole (FSDP: every shard).
    There a second signal does not interrupt: torchrun's agent forwards the signal it got to every process (Ctrl-C
    reaches them twice) and kills them itself after its grace period (30 s)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)  # SIGHUP: its terminal or SSH closed

    def __init__(self, enabled: bool = True, world: int = 1):
        self.enabled, self.world, self.requested, self.signum, self._previous = enabled, world, False, None, {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum, frame):
        if self.requested and self.world > 1:
            return  # torchrun forwarded it again, or a second one: this step ends, the agent's grace period rules
        if self.requested:
            raise Interrupted(signum, self.signum)
        self.requested, self.signum = True, signum
        key = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        again = "" if self.world > 1 else f"; {key} again stops at once"
        try:  # at once (a soak's Ctrl-C during a long evaluation showed nothing for 28 s); os.write, as a progress
            # bar may be halfway through its own write to stderr (print here could raise "reentrant call")
            os.write(2, f"\n{self.name}: stopping after this step, with a checkpoint{again}\n".encode())
        except OSError:  # SIGHUP: the terminal is gone
            pass

    def agreed(self, device: torch.device) -> bool:
        """Stop before the next step? This process's request, or under torchrun any process's (then this process
        takes its signal): every process calls this at the same point of every step.

        Under torchrun the answer is the all-reduced flag alone, never this process's own `requested`: a signal
        that lands here after this process sent its flag (0) would otherwise stop it alone while the others, who
        agreed to go on, wait for it in the next step's collectives. Its flag stops every process at the next call."""
        if self.world == 1 or not dist.is_initialized():
            return self.requested
        flag = torch.tensor(self.signum or 0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag)
        if agreed and not self.requested:
            self.requested, self.signum = True, agreed
        return agreed != 0

    def __enter__(self) -> StopRequest:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}  # nohup's SIGHUP stays ignored
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        ending = self.world > 1 and exc_type is not None and issubclass(exc_type, Stopped)
        for s, previous in self._previous.items():  # under torchrun a stopped process ends: torchrun's forwarded
            signal.signal(s, signal.SIG_IGN if ending else previous)  # copy must not kill it before its line
        self._previous = {}
        return False


def optimizer_step(run: Run, batches: list[dict]) -> tuple[float, torch.Tensor, bool]:
    """One optimizer step over this process's micro-batches: (mean token loss, gradient norm, skipped by fp16?)."""
    t, model, scaler, device = run.cfg.training, run.model, run.scaler, run.device
    # 2. the supervised-token count of the whole step, over all micro-batches and processes
    n_step = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), device=device)
    if run.world > 1:
        dist.all_reduce(n_step)

    # 3. forward / backward: each token weighs 1/n_step, so accumulation and processes change nothing
    step_loss = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        context = no_sync(run.ddp) if not sync else contextlib.nullcontext()
        with context:
            with run.precision.autocast(device.type), run.slab.saving() if run.slab else contextlib.nullcontext():
                loss_sum, _ = run.ddp(batch)
                objective = loss_sum
                if run.allocator is not None:  # AdaLoRA's orthogonality penalty, once per step in total: each
                    # micro-batch of each process adds 1/(len(batches) × world) of it, and DDP's mean over the
                    # processes (after the × world below) leaves it once, as one process has it
                    objective = loss_sum + run.allocator.orth_penalty(model) * n_step / (len(batches) * run.world)
            scaler.scale(objective * run.world / n_step).backward()  # DDP averages over processes: × world undoes it
        step_loss += loss_sum.detach()  # the data loss alone is what gets reported
    if run.world > 1:
        dist.all_reduce(step_loss)
    loss_value = step_loss.item() / n_step.item()
    # fp16: a loss its forward overflowed is an overflowing step (NaN gradients: the scaler skips it), as in torch's
    # AMP (soak: one such batch stopped the run, and --resume replayed it into the same stop); before any update, or
    # twice in a row, it is the model or the run rather than a batch: stop
    if not math.isfinite(loss_value) and (not scaler.is_enabled() or run.step == 0 or run.nonfinite_loss):
        last = last_good_checkpoint(run)
        again = (f" (and was at step {run.step}, whose update fp16's loss scaler skipped)" if run.nonfinite_loss
                 else "")
        # before any update B is 0: the adapter adds nothing, whatever its scale
        scale = scale_note(run.cfg, always=False) if run.step else ""
        raise TrainingError(f"loss is {loss_value} at step {run.step + 1}{again}; stopping. The last good checkpoint "
                            f"is {last or 'none (no checkpoint was written yet)'}. {unusual_settings(run.cfg)}{scale}"
                            + nonfinite_advice(t.lr, run.precision.compute, t.max_grad_norm, run.step + 1),
                            everywhere=True)
    run.nonfinite_loss = not math.isfinite(loss_value)

    # 4. clip, step, explicit hooks, schedule
    params = [p for p in model.parameters() if p.requires_grad]
    scaler.unscale_(run.optimizer)  # (fp16) true gradients before clipping; a no-op otherwise
    grad_norm = (clip_sharded(params, t.max_grad_norm) if run.sharded
                 else torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm
                 else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    if not scaler.is_enabled() and not math.isfinite(float(grad_norm)):  # fp16's scaler skips such steps itself
        last = last_good_checkpoint(run)
        raise TrainingError(f"the gradient norm is {float(grad_norm)} at step {run.step + 1} (the loss, "
                            f"{loss_value:.4g}, was finite); stopping before an update that would do nothing or "
                            f"write NaN. The last good checkpoint is {last or 'none (no checkpoint was written yet)'}"
                            f". {unusual_settings(run.cfg)}{scale_note(run.cfg)}"
                            + nonfinite_advice(t.lr, run.precision.compute, t.max_grad_norm, 2),
                            everywhere=True)
    scale = scaler.get_scale()
    scaler.step(run.optimizer)  # skips the update when (fp16) gradients hold inf/nan
    scaler.update()
    skipped = scaler.get_scale() < scale  # the scaler backs off exactly when it skipped
    if skipped and scaler.get_scale() < MIN_LOSS_SCALE:
        raise TrainingError(scale_floor_error(run, scale, loss_value), everywhere=True)
    if not skipped and not all_finite(params, run.world):  # the loss and gradients were finite: the update was not
        last = last_good_checkpoint(run)
        raise TrainingError(f"the update of step {run.step + 1} made trainable weights inf or NaN (the loss, "
                            f"{loss_value:.4g}, and the gradient norm, {float(grad_norm):.4g}, were finite); stopping "
                            f"before they are saved. The last good checkpoint is "
                            f"{last or 'none (no checkpoint was written yet)'}. Lower training.lr (it is {t.lr:g}; "
                            f"try {t.lr / 10:g})", everywhere=True)
    if run.allocator is not None and not skipped:
        run.allocator.step(model, run.step + 1)  # AdaLoRA (steps from 1, as PEFT): importance, re-mask to budget
    run.optimizer.zero_grad(set_to_none=True)
    if skipped:
        run.skipped_steps += 1  # the learning-rate schedule waits for the next real update, as HF Trainer's does
    else:
        run.scheduler.step()
    return loss_value, grad_norm, skipped


MIN_LOSS_SCALE = 1.0
"""fp16: a step that overflows at this loss scale overflowed in the true gradients, which no scale can fix; the run
stops there (DeepSpeed's min_loss_scale). torch's GradScaler halves on without end: soak, lora_alpha 1e9 skipped
23 steps in a row, down to a scale of 0.0078, then its first update made the loss NaN (blamed on training.lr)."""


def scale_floor_error(run: Run, scale: float, loss_value: float) -> str:
    """The message of an fp16 step that overflowed at a loss scale of `scale` (≤ MIN_LOSS_SCALE): the gradients
    themselves pass fp16's range."""
    last = last_good_checkpoint(run)
    lora = run.cfg.lora
    # fp16 autocast, or an fp16 base computing in fp32 (Precision.needs_scaler): the setting that holds fp16
    wider = ("training.precision=bf16 where the hardware has it, or fp32" if run.precision.compute == "fp16"
             else "model.dtype=fp32 (or bf16 where the hardware has it)")
    adapter = (f"the adapter's scale, lora.lora_alpha / lora.r = {lora.lora_alpha:g} / {lora.r} (lower "
               f"lora.lora_alpha if it is unusually large), " if run.cfg.method in ("lora", "dora", "qlora") else "")
    return (f"fp16 gradients overflowed at step {run.step + 1} with the loss scaled by {scale:g}: the gradients "
            f"themselves pass fp16's ±{FP16_MAX:g}, which no loss scale can fix ({run.skipped_steps + 1} steps "
            f"skipped so far; the loss was {loss_value:.4g}); stopping. The last good checkpoint is "
            f"{last or 'none (no checkpoint was written yet)'}. {unusual_settings(run.cfg)}Check {adapter}the "
            f"learning rate (training.lr {run.cfg.training.lr:g}) and the data; or use {wider}")


def last_good_checkpoint(run: Run) -> Path | None:
    """The newest complete checkpoint of this run (FSDP: sharded), for the message of a step that went wrong."""
    return find_sharded(run.ckpt_root)[0] if run.sharded else last_checkpoint(run.ckpt_root)


def all_finite(params: list[torch.Tensor], world: int = 1) -> bool:
    """Whether every parameter is finite, agreed by every process (FSDP: each checks its own shards)."""
    local = [t for p in params if (t := p.to_local() if isinstance(p, DTensor) else p).numel()]
    bad = (torch.stack([~torch.isfinite(t).all() for t in local]).any() if local
           else torch.zeros((), dtype=torch.bool, device=params[0].device)).to(torch.int32)
    if world > 1:
        dist.all_reduce(bad)  # a sum: how many processes found one (MAX stays the stop agreement's alone)
    return not bool(bad)


def save_model(model: nn.Module, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """method full's result: weights, config and tokenizer written as one set (files.atomic_dir), as an adapter is:
    a full disk is one DiskError line, a kill leaves the earlier `out` or none, never a mix of the two (soak: a
    plain save_pretrained left config.json alone, or beside the earlier run's weights). `state_dict`: the gathered
    weights of a sharded model."""
    weights = state_dict if state_dict is not None else model.state_dict()
    need = sum(t.numel() * t.element_size() for t in weights.values())
    with atomic_dir(out, need, drop=WEIGHT_FILES) as tmp:  # an earlier layout's shards would load instead
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def finish(run: Run, loss_value: float, eval_loss: float | None, seconds: float, start_tokens: int,
           aside: float = 0.0) -> TrainResult:
    """After the last step: the adapter (or full model), the loss plot, and what was measured."""
    saved = "model" if run.cfg.method == "full" else "adapter"
    existed = (run.out / saved / ("config.json" if saved == "model" else "adapter_config.json")).is_file()
    if run.sharded:  # every process takes part in gathering the shards; rank 0 writes what the one-process run does
        if run.cfg.method == "full":
            state = full_state_dict(run.model)
            if run.is_main:
                save_model(run.model, run.tokenizer, run.out / "model", state)
        else:
            with full_trainables(run.model):
                if run.is_main:
                    save_adapter(run.model, run.out / "adapter")
        if run.is_main:
            plot_loss(run.out / "metrics.jsonl", run.out / "loss.png")
    elif run.is_main:
        if run.cfg.method == "full":
            save_model(run.model, run.tokenizer, run.out / "model")
        else:
            write_adapter(run)
        plot_loss(run.out / "metrics.jsonl", run.out / "loss.png")
    if run.world > 1:
        dist.barrier()
    found = best_checkpoint(run.ckpt_root) if run.cfg.training.keep_best and run.is_main else None
    best = {"step": int(found[0].name.removeprefix("step-")), "eval_loss": found[1], "checkpoint": str(found[0])} \
        if found else None
    evals = logged_evals(run.out / "metrics.jsonl") if run.is_main else []  # a resume's earlier ones too
    lowest = lowest_logged_eval(evals) if run.cfg.training.keep_best else None
    unsaved = ({"step": lowest[0], "eval_loss": lowest[1]} if lowest and (best is None or lowest[1] < best["eval_loss"])
               else None)  # eval_every not a multiple of save_every: the lowest fell on a step without a checkpoint
    return TrainResult(output_dir=run.out, steps=run.step, final_loss=loss_value, eval_loss=eval_loss,
                       train_tokens=run.tokens_seen, seconds=seconds,
                       tokens_per_second=(run.tokens_seen - start_tokens) / max(seconds - aside, 1e-9),
                       aside_seconds=aside,
                       peak_memory_mb=peak_memory_mb(run.device), trainable_params=run.trainable,
                       total_params=run.total_params, data_stats=run.data_stats, precision=run.precision.line(),
                       skipped_steps=run.skipped_steps, rank=run.rank,
                       saved=saved, device_type=run.device.type, already_finished=run.tokens_seen == start_tokens,
                       result_existed=existed, best=best, best_unsaved=unsaved,
                       nonfinite_evals=nonfinite_logged_evals(evals))
