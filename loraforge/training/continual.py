"""Training on from an existing adapter (training.init_adapter): its settings, checked against the run's, and its
weights as the starting point.

The adapter's adapter_config.json decides the adapter (r, lora_alpha, target_modules, use_rslora, use_dora,
rank_pattern, alpha_pattern, ...), whether we or PEFT wrote it. A `lora:` field the user set to a value other than
its default and other than the adapter's is a conflict, reported by name before any model work (a field written
with its default value, e.g. `lora: {r: 8}` on an r=4 adapter, cannot be told from one left out: the adapter's
value is used without a word). Only the weights
carry over: the optimizer and the learning-rate schedule start fresh (an adapter directory holds no optimizer
state), as PEFT's `PeftModel.from_pretrained(..., is_trainable=True)` followed by a new optimizer does.

AdaLoRA adapters are refused: the saved file keeps only the pruned triplets and not the rank allocator's
importance averages or where its budget schedule stood, so a continued run could not be the run it continues.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from loraforge.config import ConfigError, LoraConfig, TrainConfig
from loraforge.lora.adapters import AdapterError, load_adapter, read_adapter_config

# Fields that describe the adapter's provenance, not its math: never a conflict.
INFORMATIONAL = {"base_model_name_or_path"}


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):  # target_modules: PEFT saves a set as a list, any order
        return set(a) == set(b)
    return a == b


def init_adapter_config(cfg: TrainConfig) -> LoraConfig | None:
    """training.init_adapter's LoRA config, or None when the run starts a fresh adapter. Raises ConfigError with one
    line per conflict (method, or a lora: field) or AdapterError for a directory that holds no usable adapter."""
    path = cfg.training.init_adapter
    if not path:
        return None
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
    default = LoraConfig()
    for f in dataclasses.fields(LoraConfig):
        ours, theirs = getattr(cfg.lora, f.name), getattr(config, f.name)
        if f.name in INFORMATIONAL or _same(ours, getattr(default, f.name)) or _same(ours, theirs):
            continue
        problems.append(f"lora.{f.name}: {ours!r} here, {theirs!r} in {source}; the adapter's settings are used "
                        f"when training on from it: remove lora.{f.name}, or leave out training.init_adapter to "
                        f"start a fresh adapter")
    if problems:
        raise ConfigError(problems)
    return config


def start_from_adapter(model: nn.Module, cfg: TrainConfig, name: str = "default") -> LoraConfig:
    """Load training.init_adapter onto `model` as adapter `name`, trainable (everything else frozen)."""
    config = init_adapter_config(cfg)
    load_adapter(model, cfg.training.init_adapter, name, is_trainable=True)
    return config
