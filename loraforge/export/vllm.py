"""`loraforge export --to vllm`: check an adapter against what vLLM serves; convert what can be converted exactly.

vLLM loads PEFT LoRA adapters but applies one scale lora_alpha / r to every module (it ignores rank_pattern and
alpha_pattern, and AdaLoRA is not a format it reads) and rejects DoRA, modules_to_save and trained biases.
The conversion writes a plain LoRA adapter of one rank R (the largest rank; smaller ones zero-padded, which adds
nothing to ΔW) with lora_alpha = R, so vLLM's scale is 1, and each module's own scale folded into lora_B:
    ΔW = s_m · B·A = 1 · [B·s_m, 0] · [A; 0]
This covers rank/alpha patterns, rsLoRA and AdaLoRA (A ∘ E, PEFT's lora_alpha / (init_r + 1e-5)). What a low-rank
file cannot hold is refused with the alternative: `loraforge merge`, served by vLLM as an ordinary model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraforge.lora.adapters import (PREFIX, WEIGHTS_NAME, recorded_model_type, recorded_quantization,
                                     write_adapter_dir)
from loraforge.config import LoraConfig
from loraforge.models import conversion_paths
from loraforge.utils.outputs import check_output, check_replaceable, check_writable, published_room
from loraforge.export.factors import read_factors, unsupported
from loraforge.export.gguf_names import ExportError

# vLLM's --max-lora-rank accepts these values (its default is 16); an adapter's rank must not exceed it.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_vllm(adapter_dir: str | Path) -> tuple[list[str], list[str]]:
    """(refusals, conversions): why vLLM cannot serve the adapter at all, and what the conversion changes."""
    config, factors = read_factors(adapter_dir)
    refusals = unsupported(config)
    conversions = []
    ranks = sorted({f.lora_A.shape[0] for f in factors.values()})
    if ranks[-1] > VLLM_MAX_LORA_RANKS[-1]:
        refusals.append(f"rank {ranks[-1]}: vLLM's --max-lora-rank goes up to {VLLM_MAX_LORA_RANKS[-1]}")
    if not isinstance(config, LoraConfig):
        conversions.append("AdaLoRA -> plain LoRA: E folded into lora_A, ranks padded, scale folded into lora_B")
    else:
        if config.rank_pattern:
            conversions.append(f"rank_pattern (ranks {ranks}): zero-padded to rank {max(ranks)}")
        if config.alpha_pattern:
            conversions.append("alpha_pattern: each module's scale folded into its lora_B")
        if config.use_rslora:
            conversions.append("use_rslora: the scale lora_alpha / sqrt(r) folded into lora_B")
    return refusals, conversions


def max_lora_rank(r: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that serves rank `r` (check_vllm refuses a rank past the last)."""
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= r)


def convert_for_vllm(adapter_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write a plain LoRA adapter equal to `adapter_dir` that vLLM serves as is; returns (out, what changed).
    An adapter that needs no conversion is written unchanged in its math (uniform r, same scale)."""
    refusals, conversions = check_vllm(adapter_dir)
    if refusals:
        raise ExportError(f"vLLM cannot serve {adapter_dir}: {'; '.join(refusals)}. Merge it into the base instead "
                          f"and serve the merged model: loraforge merge --base BASE --adapter {adapter_dir} --out DIR")
    config, factors = read_factors(adapter_dir)
    base = config.base_model_name_or_path  # its cached conversion (a built-in base) is no place for an adapter
    check_output(out_dir, overwrite=overwrite, inputs=[adapter_dir, *(conversion_paths(base) if base else [])],
                 room=published_room(out_dir, WEIGHTS_NAME))  # an adapter's two files, the longest name
    check_replaceable(out_dir)
    check_writable(out_dir)
    R = max(f.lora_A.shape[0] for f in factors.values())
    tensors = {}
    for path, f in factors.items():
        pad = R - f.lora_A.shape[0]
        A = torch.cat([f.lora_A, f.lora_A.new_zeros(pad, f.lora_A.shape[1])])  # (R, in)
        B = torch.cat([f.lora_B * f.scale, f.lora_B.new_zeros(f.lora_B.shape[0], pad)], dim=1)  # (out, R)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = B.contiguous()
    # the original targeting rule picks the same modules; without one (an architecture's default) their names do
    targets = config.target_modules or tuple(sorted({p.rsplit(".", 1)[-1] for p in factors}))
    plain = LoraConfig(r=R, lora_alpha=R, target_modules=targets,
                       exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
                       layers_pattern=config.layers_pattern, fan_in_fan_out=config.fan_in_fan_out,
                       base_model_name_or_path=config.base_model_name_or_path)
    # the base it trained over, as the adapter records it (a QLoRA adapter's nf4, its model_type), so loading the
    # export over another base warns as loading the adapter does
    out = write_adapter_dir(Path(out_dir), tensors, plain.to_peft_dict(), replace=overwrite,  # as merge
                            quantization=recorded_quantization(adapter_dir),
                            model_type=recorded_model_type(adapter_dir))
    return out, conversions + [f"serve with vLLM's --max-lora-rank {max_lora_rank(R)} or more (rank {R})"]
