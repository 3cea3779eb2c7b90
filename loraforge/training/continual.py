"""Training on from an existing adapter (training.init_adapter): its settings, checked against the run's, and its
weights as the starting point.

The adapter's adapter_config.json decides the adapter (r, lora_alpha, target_modules, use_rslora, use_dora,
rank_pattern, alpha_pattern, ...), whether we or PEFT wrote it. A `lora:` field the user wrote (in the YAML or as
an override, whatever its value: `lora.r=8` on an r=4 adapter too) other than the adapter's is a conflict, reported
by name before any model work. For a config built in code, where a field set to its default cannot be told from one
left out, only values other than the default are checked. Only the weights
carry over: the optimizer and the learning-rate schedule start fresh (an adapter directory holds no optimizer
state), as PEFT's `PeftModel.from_pretrained(..., is_trainable=True)` followed by a new optimizer does.

A run keeps a copy of the adapter it started from beside its checkpoints (checkpoints/init-adapter): --resume
rebuilds the adapter from that copy, so the folder training.init_adapter names may change or go meanwhile.

AdaLoRA adapters are refused: the saved file keeps only the pruned triplets and not the rank allocator's
importance averages or where its budget schedule stood, so a continued run could not be the run it continues.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

from torch import nn

from loraforge.config import ConfigError, LoraConfig, TrainConfig, lora_written
from loraforge.lora.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_adapter, read_adapter_config
from loraforge.lora.inject import find_targets
from loraforge.models import model_skeleton
from loraforge.utils.files import atomic_dir

INIT_COPY = "init-adapter"  # under a run's checkpoints/: the adapter it started from, as it was then

# Fields that describe the adapter's provenance, not its math: never a conflict.
INFORMATIONAL = {"base_model_name_or_path"}


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):  # target_modules: PEFT saves a set as a list, any order
        return set(a) == set(b)
    return a == b


def same_layers(model_name: str, targets, config: LoraConfig) -> bool:
    """Whether target_modules `targets` (this run's lora.target_modules) selects on the model the layers the adapter's
    `config` does, the adapter's other settings (exclude_modules, layers_to_transform, ...) applying to both: PEFT
    saves all-linear as the list of module names it expanded to, so the spellings differ for the same layers. The
    model's structure only (models.model_skeleton); where it cannot be built, or a side selects nothing, the
    spellings decide (not the same)."""
    try:
        model = model_skeleton(model_name)
        with warnings.catch_warnings():  # find_targets' notes come again when the adapter is loaded onto the model
            warnings.simplefilter("ignore")
            ours = find_targets(model, dataclasses.replace(config, target_modules=targets))
            return sorted(ours) == sorted(find_targets(model, config))
    except Exception:  # noqa: BLE001 (a model that cannot be read is said by the load that follows; a refusal here)
        return False


def init_adapter_source(cfg: TrainConfig, ckpt_root: Path, resume: bool) -> Path | None:
    """Where training.init_adapter is read from: on --resume, the copy the run kept when it started (keep_copy);
    otherwise (or for checkpoints written before copies were kept) the folder the config names. None: no
    init_adapter."""
    if not cfg.training.init_adapter:
        return None
    copy = ckpt_root / INIT_COPY
    return copy if resume and (copy / CONFIG_NAME).is_file() else Path(cfg.training.init_adapter)


def keep_copy(source: Path, ckpt_root: Path) -> None:
    """Copy the adapter a run starts from to checkpoints/init-adapter (a few MB; atomically), unless it is that copy."""
    copy = ckpt_root / INIT_COPY
    if source.resolve() == copy.resolve():
        return
    files = [source / CONFIG_NAME, source / WEIGHTS_NAME]
    with atomic_dir(copy, sum(f.stat().st_size for f in files)) as tmp:
        for f in files:
            shutil.copyfile(f, tmp / f.name)


def init_adapter_config(cfg: TrainConfig, source: Path | None = None) -> LoraConfig | None:
    """training.init_adapter's LoRA config, or None when the run starts a fresh adapter. Raises ConfigError with one
    line per conflict (method, or a lora: field) or AdapterError for a directory that holds no usable adapter.
    `source`: where to read it (init_adapter_source); the folder the config names by default."""
    if not cfg.training.init_adapter:
        return None
    path = source or cfg.training.init_adapter
    if cfg.method == "full":
        raise ConfigError([f"training.init_adapter: method full trains every weight and has no adapter to start "
                           f"from; use method lora (or merge {path} into the base first: loraforge merge)"])
    try:
        config = read_adapter_config(path)
    except AdapterError as e:
        raise ConfigError([f"training.init_adapter: {e}"]) from None
    source = f"{path}/adapter_config.json"
    if not isinstance(config, LoraConfig):
        raise ConfigError([f"training.init_adapter: {path} is an AdaLoRA adapter, which cannot be trained on: its "
                           f"file keeps the pruned ranks but not the rank allocator's importance scores or "
                           f"budget schedule. Merge it into the base (loraforge merge) and train a new adapter "
                           f"on the merged model"])
    problems = []
    if cfg.method == "adalora":
        problems.append(f"method: adalora conflicts with training.init_adapter ({path} is a LoRA adapter); "
                        f"use method lora")
    if cfg.method == "dora" and not config.use_dora:
        problems.append(f"method: dora conflicts with training.init_adapter ({source} has use_dora false); "
                        f"use method lora")
    default, written = LoraConfig(), lora_written(cfg)
    for f in dataclasses.fields(LoraConfig):
        ours, theirs = getattr(cfg.lora, f.name), getattr(config, f.name)
        left_out = f.name not in written if written is not None else _same(ours, getattr(default, f.name))
        if f.name in INFORMATIONAL or left_out or _same(ours, theirs):
            continue
        if f.name == "target_modules" and same_layers(cfg.model.name, ours, config):  # all-linear, and its expansion
            continue
        problems.append(f"lora.{f.name}: {ours!r} here, {theirs!r} in {source}; the adapter's settings are used "
                        f"when training on from it: remove lora.{f.name}, or leave out training.init_adapter to "
                        f"start a fresh adapter")
    if problems:
        raise ConfigError(problems)
    return config


def start_from_adapter(model: nn.Module, cfg: TrainConfig, name: str = "default",
                       source: Path | None = None) -> LoraConfig:
    """Load training.init_adapter (or `source`, its copy) onto `model` as adapter `name`, trainable (everything
    else frozen)."""
    config = init_adapter_config(cfg, source)
    load_adapter(model, source or cfg.training.init_adapter, name, is_trainable=True)
    # the adapter this run writes is trained on this run's base, whatever base the one it starts from names (soak:
    # it kept that one's, so PEFT's AutoPeftModelForCausalLM loaded another base than it was trained on)
    config = dataclasses.replace(config, base_model_name_or_path=cfg.model.name)
    model.lora_configs[name] = config
    return config
