"""LoRA variants that are a recipe, not a layer: PiSSA / OLoRA initialisation and the LoRA+ optimizer groups.

PiSSA (Meng et al. 2024): A, B start as the top-r singular triplets of W0 and W0 is replaced by the residual, so the
model's output is unchanged at step 0 and training moves the principal directions. OLoRA (Büyükakyüz 2024): the
same with a QR decomposition. Both change W0, so the saved adapter fits the residual base; `save_converted` writes
the equivalent plain LoRA for the original base (A' = [A; A0], B' = [B, −B0], r and lora_alpha doubled), as
PEFT's `path_initial_model_for_weight_conversion` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from loraforge.lora.layer import LoraLayer, LoraLinear, is_quantized


@torch.no_grad()
def init_from_base_weight(layer: LoraLinear, name: str, method: str) -> None:
    """PiSSA ("pissa", "pissa_niter_N") or OLoRA ("olora") init of adapter `name`; W0 becomes W0 − s·B A."""
    base = layer.base_layer
    if is_quantized(base) or base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{method} init needs a float base weight, got {type(base.weight).__name__} "
                        f"{base.weight.dtype}; initialise on the unquantized model, then quantize the residual")
    r, s = layer.r[name], layer.scaling[name]
    dtype = base.weight.dtype
    W = base.weight.float()
    W = W.T if layer.fan_in_fan_out else W  # (out, in)
    if method == "olora":
        Q, R = torch.linalg.qr(W)  # W = Q R; Q (out, k) orthonormal columns, R (k, in)
        B, A = Q[:, :r], R[:r]
    else:
        if method == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # W = U diag(S) Vh
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:  # pissa_niter_N: randomized SVD, N subspace iterations
            U, S, V = torch.svd_lowrank(W, q=r, niter=int(method.split("_niter_")[-1]))
            Vh = V.T
        root = torch.sqrt(S / s)  # s·B A = U diag(S) Vh
        B, A = U * root, root[:, None] * Vh  # (out, r), (r, in)
    layer.lora_A[name].weight.data = A.contiguous().to(layer.lora_A[name].weight.dtype)
    layer.lora_B[name].weight.data = B.contiguous().to(layer.lora_B[name].weight.dtype)
    residual = W - s * (B @ A)
    base.weight.data = (residual.T if layer.fan_in_fan_out else residual).contiguous().to(dtype)


def save_converted(model: nn.Module, out_dir: str | Path, initial_adapter_dir: str | Path,
                   name: str = "default") -> Path:
    """Save a PiSSA/OLoRA adapter as a plain LoRA for the *original* base W0 (before the residual replaced it).

    `initial_adapter_dir`: the adapter saved with save_adapter() right after injection, before training (A0, B0).
    With W_res = W0 − s·B0 A0: W_res + s·B A = W0 + s·[B, −B0] [A; A0], a rank-2r adapter with the same scale
    (lora_alpha doubled; ×√2 with use_rslora), so PEFT and loraforge load it on the original base with equal logits.
    """
    from loraforge.lora.adapters import adapter_configs, adapter_state_dict, read_adapter_weights, write_adapter_dir

    config = adapter_configs(model)[name]
    if config.use_dora:
        raise ValueError("converting a PiSSA/OLoRA adapter trained with DoRA is not supported (the magnitude "
                         "depends on the residual base); merge it instead")
    initial = read_adapter_weights(initial_adapter_dir)
    tensors = {k: v.detach().cpu() for k, v in adapter_state_dict(model, name).items()}
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        key_b = key.replace(".lora_A.weight", ".lora_B.weight")
        if key not in initial or key_b not in initial:
            raise ValueError(f"{initial_adapter_dir} has no {key}: is it the initial save of this adapter?")
        tensors[key] = torch.cat([tensors[key], initial[key].to(tensors[key].dtype)], dim=0)  # (2r, in)
        tensors[key_b] = torch.cat([tensors[key_b], -initial[key_b].to(tensors[key_b].dtype)], dim=1)  # (out, 2r)
    alpha_factor = 2 ** 0.5 if config.use_rslora else 2.0  # alpha/r or alpha/sqrt(r) unchanged at 2r
    converted = dataclasses.replace(
        config, r=2 * config.r, lora_alpha=config.lora_alpha * alpha_factor, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * alpha_factor for k, v in config.alpha_pattern.items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return write_adapter_dir(Path(out_dir), tensors, converted.to_peft_dict())


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A.

    As PEFT's create_loraplus_optimizer: lora_B matrices get lr·ratio with weight decay; 1-D trainable parameters
    (DoRA magnitudes, biases) get lr·ratio without weight decay; every other trainable parameter (lora_A, AdaLoRA's
    lora_E, modules_to_save) gets lr. Pass the result to any torch optimizer: torch.optim.AdamW(groups).
    """
    b_params = {id(p) for m in model.modules() if isinstance(m, LoraLayer)
                for p in m.lora_B.parameters()}  # found by type, not by name
    groups = {"lora_A": [], "lora_B": [], "no_decay": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in b_params:
            groups["lora_B"].append(p)
        elif p.ndim == 1:
            groups["no_decay"].append(p)
        else:
            groups["lora_A"].append(p)
    return [
        {"name": "lora_A", "params": groups["lora_A"], "lr": lr, "weight_decay": weight_decay},
        {"name": "lora_B", "params": groups["lora_B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "lr": lr * ratio, "weight_decay": 0.0},
    ]
