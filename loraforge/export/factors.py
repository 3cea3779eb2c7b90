"""An adapter directory as plain factors per module, ΔW = scale · B·A, read from its files without a base model.

    LoRA     A (r_m, in), B (out, r_m), scale = alpha_m / r_m (or alpha_m / sqrt(r_m) with use_rslora), r_m and
             alpha_m from rank_pattern / alpha_pattern (PEFT's first-match rule)
    AdaLoRA  A' = A ∘ E (E: (r, 1) scales A's rows), scale = lora_alpha / (init_r + 1e-5) as PEFT computes it
             (lora_alpha 0: the layer's kept rank r, the rows of its A, in place of lora_alpha, as PEFT's)

What a plain LoRA file cannot say is listed by `unsupported` (DoRA, modules_to_save, trained biases): the formats
that take factors (llama.cpp's LoRA GGUF, vLLM) refuse those with the reason and the alternative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.lora.adalora import adalora_scaling
from loraforge.lora.adapters import PREFIX, AdapterError, read_adapter_config, read_adapter_weights
from loraforge.config import LoraConfig
from loraforge.lora.inject import pattern_value


@dataclass(frozen=True)
class Factors:
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    scale: float


def unsupported(config) -> list[str]:
    """Why a plain LoRA file cannot hold this adapter (empty: it can)."""
    why = []
    if getattr(config, "use_dora", False):
        why.append("DoRA (use_dora): its per-row magnitude vector is not a low-rank update")
    if getattr(config, "modules_to_save", None):
        why.append(f"modules_to_save {list(config.modules_to_save)}: whole trained modules, not low-rank updates")
    if config.bias != "none":
        why.append(f"bias {config.bias!r}: trained biases are not low-rank updates")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.startswith(("pissa", "olora")):
        why.append(f"init_lora_weights {init!r}: its A and B fit the residual base its init made, not the base "
                   f"(loraforge.lora.adapters.save_converted writes it as plain LoRA for the base)")
    return why


def read_factors(adapter_dir: str | Path):
    """(config, {module path: Factors}) of a LoRA or AdaLoRA adapter directory, in fp32; AdapterError for a
    missing factor."""
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_weights(adapter_dir)
    if orphan := next((k for k in tensors if ".lora_B" in k and k.replace(".lora_B", ".lora_A") not in tensors),
                      None):
        raise AdapterError(f"{adapter_dir}: {orphan} has no {orphan.replace('.lora_B', '.lora_A')} beside it (a "
                           f"truncated or hand-edited file?); save the adapter again")
    out = {}
    for key, A in tensors.items():
        if not key.endswith((".lora_A.weight", ".lora_A")):
            continue
        stem = key.removesuffix(".weight").removesuffix(".lora_A")
        path = stem.removeprefix(PREFIX)
        suffix = ".weight" if key.endswith(".weight") else ""
        partners = [f"{stem}.lora_B{suffix}"] + ([] if isinstance(config, LoraConfig) else [f"{stem}.lora_E"])
        missing = [k for k in partners if k not in tensors]
        if missing:
            raise AdapterError(f"{adapter_dir}: {key} has no {missing[0]} beside it (a truncated or hand-edited "
                               f"file?); save the adapter again")
        B = tensors[partners[0]]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or 0 in (A.shape[1], B.shape[0]):
            raise AdapterError(f"{adapter_dir}: {key} has shape {tuple(A.shape)} and {partners[0]} "
                               f"{tuple(B.shape)}; they must be (r, in) and (out, r) with the same r (a truncated or "
                               f"hand-edited file?)")  # r may be 0: a module AdaLoRA pruned to nothing
        A, B = A.float(), B.float()
        if isinstance(config, LoraConfig):
            r = A.shape[0]
            alpha = float(pattern_value(config.alpha_pattern, path, config.lora_alpha, "alpha_pattern"))
            scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        else:  # AdaLoRA: bare keys, E folded into A's rows
            A = A * tensors[f"{stem}.lora_E"].float()
            scale = adalora_scaling(config.lora_alpha, A.shape[0], config.init_r)  # r: the kept rank, as loaded
        out[path] = Factors(A, B, scale)
    if not out:
        raise AdapterError(f"{adapter_dir}: no lora_A / lora_B factors in {adapter_dir}/adapter_model.safetensors "
                           f"(an empty or truncated file?); save the adapter again")
    return config, out
