"""Optimizers: the one builder the loop, the benches and the tests use.

`make_optimizer(model, t)` turns the training section of the config into an optimizer over the model's trainable
parameters: weight decay on all but biases and norms (HF Trainer's rule), LoRA+ groups when asked, and AdamW from
torch (fused on CPU and CUDA) or one of bitsandbytes' 8-bit / paged AdamWs. `optimizer_by_name` is the same choice
for a list of parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.lora.layer import LoraLayer
from loraforge.quant.bnb import import_bitsandbytes

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
_warned_paging = False


def decayed(model: nn.Module) -> set[int]:
    """ids of the trainable parameters weight decay applies to: all but biases and norms' weights (HF Trainer's
    rule, which PEFT's LoRA+ optimizer follows): DoRA magnitudes decay, as they do there."""
    norms = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    return {id(p) for name, p in model.named_parameters()
            if p.requires_grad and "bias" not in name.rsplit(".", 1)[-1] and id(p) not in norms}


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A.

    As PEFT's create_loraplus_optimizer: lora_B matrices and 1-D trainable parameters get lr·ratio, with weight
    decay but for biases and norms (`decayed`: DoRA magnitudes decay); every other trainable parameter (lora_A,
    AdaLoRA's lora_E, modules_to_save) gets lr. Pass the result to any torch optimizer: torch.optim.AdamW(groups).
    """
    b_params = {id(p) for m in model.modules() if isinstance(m, LoraLayer)
                for p in m.lora_B.parameters()}  # found by type, not by name
    decays = decayed(model)
    groups = {"lora_A": [], "lora_B": [], "no_decay": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in b_params or p.ndim == 1:
            groups["lora_B" if id(p) in decays else "no_decay"].append(p)
        else:
            groups["lora_A"].append(p)
    return [
        {"name": "lora_A", "params": groups["lora_A"], "lr": lr, "weight_decay": weight_decay},
        {"name": "lora_B", "params": groups["lora_B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "lr": lr * ratio, "weight_decay": 0.0},
    ]


def optimizer_by_name(name: str, params, lr: float, weight_decay: float = 0.0,
                      betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """"adamw" (torch), "adamw_8bit" (bnb, 2 bytes of state per parameter), "paged_adamw", "paged_adamw_8bit".

    Paging (optimizer state in CUDA unified memory, evicted to CPU RAM under pressure) needs CUDA: where it is
    not available we say so once and use the same optimizer unpaged. 8-bit AdamW runs on CPU with bnb 0.50.
    """
    global _warned_paging
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not supported; use one of {list(OPTIMIZERS)}")
    params = list(params)
    if name.startswith("paged_") and not torch.cuda.is_available():
        if not _warned_paging:
            print(f"optimizer {name}: paging needs CUDA; using {name.removeprefix('paged_')} instead", flush=True)
            _warned_paging = True
        name = name.removeprefix("paged_")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    bnb = import_bitsandbytes(f"training.optimizer: {name}")
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay, betas=betas)


def make_optimizer(model: nn.Module, t) -> torch.optim.Optimizer:
    """The optimizer for `model`'s trainable parameters as the training config `t` says."""
    params = [p for p in model.parameters() if p.requires_grad]
    if t.loraplus_lr_ratio:
        groups = loraplus_param_groups(model, t.lr, t.loraplus_lr_ratio, t.weight_decay)
    else:
        decays = decayed(model)
        decay = [p for p in params if id(p) in decays]
        no_decay = [p for p in params if id(p) not in decays]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer != "adamw":
        return optimizer_by_name(t.optimizer, groups, lr=t.lr)
    # the fused kernel (HF Trainer's default since torch 2.8): one pass over each tensor instead of foreach's
    # several (bench/train.py measures the step); other devices: foreach
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused, foreach=not fused)
