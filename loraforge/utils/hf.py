"""Small compatibility helpers for transformers and torch.nn, used across the package.

Each one hides a difference between library versions or a module-tree operation that several files need.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from torch import nn


def cache_argument(model_class: type) -> str | None:
    """The model's name for its key/value cache argument: "cache" (newer transformers) or "past_key_values"."""
    params = inspect.signature(model_class.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing on every decoder layer, non-reentrant: reentrant checkpointing drops the
    gradients of inputs that need none. transformers ≥ 5.x names it activation_checkpointing_enable; the old name
    warns there."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` in `model` (replacing what is there)."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def named_model_type(name_or_path: str) -> str | None:
    """The model_type in the config.json of a local model folder, or of a hub model's cached copy (nothing is
    downloaded); None where there is none or it cannot be read."""
    try:
        folder = Path(name_or_path).expanduser()
        found = folder / "config.json" if folder.is_dir() else try_to_load_from_cache(name_or_path, "config.json")
        if not isinstance(found, (str, Path)):  # None, or the cache's note that the file does not exist
            return None
        value = json.loads(Path(found).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError, RuntimeError):  # not a hub id: HFValidationError, a ValueError;
        # ~nosuchuser: RuntimeError; a name too long for the file system: OSError
        return None
    return value if isinstance(value, str) else None
