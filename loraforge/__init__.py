"""loraforge: fine-tune language models with LoRA, QLoRA and AdaLoRA; save, merge and serve the adapters.

The public API, importable from `loraforge` itself::

    from loraforge import LoraConfig, inject, load_base, save_adapter, load_adapter, merge_and_unload, train

Where each piece lives (docs/DESIGN.md has the whole map):

    loraforge/config.py       the configs (frozen dataclasses validated at load): LoraConfig, TrainConfig
    loraforge/precision.py    which dtype to compute and store in, from what the hardware reports
    loraforge/models.py       base models: hub, local folder, GGUF (converted once and cached)
    loraforge/lora/           the LoRA family: layer, injection, PEFT-format files, merging, AdaLoRA
    loraforge/quant/          bitsandbytes 4-bit / 8-bit bases (QLoRA)
    loraforge/training/       data, loss, optimizers, the training loop, evaluation, reports
    loraforge/serve/          the multi-adapter OpenAI-compatible server
    loraforge/studies/        memory estimate, forgetting study, probes, the demo

Names are resolved on first use, so `import loraforge` stays light (the CLI starts without torch work).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it from here

_API = {
    # configs
    "LoraConfig": "loraforge.config", "TrainConfig": "loraforge.config", "ConfigError": "loraforge.config",
    "load_train_config": "loraforge.config",
    # base models and precision
    "load_base": "loraforge.models", "load_model": "loraforge.models", "load_tokenizer": "loraforge.models",
    "choose_precision": ("loraforge.precision", "choose"),
    # the LoRA family
    "inject": "loraforge.lora.inject", "lora_layers": "loraforge.lora.inject",
    "count_parameters": "loraforge.lora.inject", "parameter_report": "loraforge.lora.inject",
    "LoraLinear": "loraforge.lora.layer",
    "save_adapter": "loraforge.lora.adapters", "load_adapter": "loraforge.lora.adapters",
    "set_adapter": "loraforge.lora.adapters", "list_adapters": "loraforge.lora.adapters",
    "disable_adapters": "loraforge.lora.adapters", "delete_adapter": "loraforge.lora.adapters",
    "mixed_batch": "loraforge.lora.adapters", "save_converted": "loraforge.lora.adapters",
    "AdapterError": "loraforge.lora.adapters",
    "merge": "loraforge.lora.merge", "unmerge": "loraforge.lora.merge", "merge_and_unload": "loraforge.lora.merge",
    "add_weighted_adapter": "loraforge.lora.merge", "export_merged": "loraforge.lora.merge",
    "AdaLoraConfig": "loraforge.lora.adalora", "inject_adalora": "loraforge.lora.adalora",
    "RankAllocator": "loraforge.lora.adalora",
    # QLoRA
    "quantize_model": "loraforge.quant.bnb", "prepare_for_kbit_training": "loraforge.quant.bnb",
    # training and evaluation
    "train": "loraforge.training.loop", "TrainResult": "loraforge.training.loop",
    "TrainingError": "loraforge.training.loop",
    "make_optimizer": "loraforge.training.optim", "loraplus_param_groups": "loraforge.training.optim",
    "generate": "loraforge.training.evaluate", "accuracy": "loraforge.training.evaluate",
    "mean_token_loss": "loraforge.training.evaluate",
    # studies
    "estimate": "loraforge.studies.estimate",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    """PEP 562: import the module that defines `name` the first time it is asked for."""
    if name not in _API:
        raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
    module, attr = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
