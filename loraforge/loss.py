"""The training loss: summed token cross-entropy over supervised positions only.

The output head runs only on positions that have a target (label ≠ -100 after the shift): prompt tokens and
padding never become full-vocabulary logits (49,152 × tokens for SmolLM2), which saves the head's compute and
its fp32 logits memory. A frozen plain linear head (LoRA's case) runs fused with the cross-entropy in row chunks
(loraforge.kernels.linear_cross_entropy): no full-vocabulary tensor is kept for the backward pass.
The sum (not the mean) is returned with the token count, so the loop can divide by the
number of supervised tokens in the whole optimizer step (all micro-batches, all processes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import linear_cross_entropy

IGNORE = -100


class CausalLMLoss(nn.Module):
    """forward(batch) -> (sum of token losses, number of supervised tokens). Wrap this module in DDP."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, fused_head: bool = True):
        super().__init__()
        if chunk_size < 1:  # both head paths step through the rows by it
            raise ValueError(f"CausalLMLoss: chunk_size must be ≥ 1, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size  # rows of logits computed at once: bounds the logits memory
        self.fused_head = fused_head  # False: the head under autograd (what bench/train.py's lf-plainhead measures)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets = labels[:, 1:]  # position t predicts token t+1
        keep = targets != IGNORE  # (B, T-1)
        n_tokens = keep.sum()
        backbone, head = _split(self.model)
        if backbone is None:  # a model we cannot split: full logits, then select
            logits = self.model(**inputs, use_cache=False).logits[:, :-1][keep]
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), n_tokens
        hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, H)
        y = targets[keep]  # (N,)
        if self.fused_head and type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
            return linear_cross_entropy(hidden, head.weight, y, self.chunk_size), n_tokens
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.chunk_size):
            logits = head(hidden[start:start + self.chunk_size]).float()  # (n, V)
            total = total + F.cross_entropy(logits, y[start:start + self.chunk_size], reduction="sum")
        return total, n_tokens


def _split(model: nn.Module):
    """(decoder backbone, output head) of a transformers causal LM, or (None, None) when not splittable."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None, None  # the head is more than one linear layer
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        return None, None
    return backbone, head
