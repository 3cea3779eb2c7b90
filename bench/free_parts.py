"""What a part of loraforge's training step costs inside the step: bench/train.py's lf-free-* variants.

    python bench/train.py --shapes text --variants lf,lf-free-attention,lf-free-lora,lf-free-mlp-act --dtypes bf16

Each variant runs loraforge's step with one part made (almost) free: its work replaced by a copy of its input and
zero gradients of the right shapes, so the rest of the step runs as before. Its math is wrong (the losses are not
the model's; they may be nan) and nothing in it trains: the tokens/s it reaches is only an upper bound of what
making that part faster could give. Timing a part alone misleads on small CPUs (its inputs sit in the cache, its
outputs get fresh pages that the training heap reuses); here the part is removed from the step itself.

    attention   lean attention (kernels.attention, kernels.packed_attention): products, softmax, the packed loop
    softmax     its softmax only: the probabilities are the raw scores (products and the loop remain)
    lora        LoRA's products, forward and backward, in every fused LoRA node (and so the optimizer's work:
                the adapters get no gradients)
    mlp-act     the SwiGLU activation silu(gate) * up in the fused MLP node, forward and backward (h = gate; the
                node keeps gate and up as before)
    norm        the fused RMSNorm nodes (y = x)

The patches replace names in loraforge.kernels in the worker's process only; the library is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraforge import kernels as K

PARTS = ("attention", "softmax", "lora", "mlp-act", "norm")


class _FreeAttention(torch.autograd.Function):
    """q's copy as the output (B, H, T, D); the gradient goes to q, zeros to k and v."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.kv = (k.shape, k.dtype, v.shape, v.dtype)
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        k_shape, k_dtype, v_shape, v_dtype = ctx.kv
        return g, g.new_zeros(k_shape, dtype=k_dtype), g.new_zeros(v_shape, dtype=v_dtype)


def _free_attention(q, k, v, *args, **kwargs):
    return _FreeAttention.apply(q, k, v)


def _raw_segment_scores(qs, ks, bias, start, scaling):
    return torch.bmm(qs, ks.transpose(-1, -2))


def _raw_dense_scores(qg, kc, mask, groups, scaling, compute):
    return torch.matmul(qg, kc.transpose(-1, -2))


def _frozen_forward(x2, w, bias, a, b, scaling):
    return F.linear(x2, w, bias), None


def _frozen_backward(g2, x2, xa, w, a, b, scaling, need_x, need_a, need_b):
    return (g2 @ w if need_x else None), None, None


def _gate_as_product(g, u):
    return g, None


def _product_grads_as_given(dh, g, u, s, need_gate, need_up):
    return (dh if need_gate else None), (dh if need_up else None)


class _FreeRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, keep_x: bool):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None


PATCHES = {
    "attention": {"attention": _free_attention, "packed_attention": _free_attention},
    "softmax": {"_segment_probs": _raw_segment_scores, "_dense_probs": _raw_dense_scores},
    "lora": {"_linear_forward": _frozen_forward, "_linear_backward": _frozen_backward},
    "mlp-act": {"_swiglu": _gate_as_product, "_swiglu_grads": _product_grads_as_given},
    "norm": {"_RMSNorm": _FreeRMSNorm},
}


def apply(parts: tuple[str, ...]) -> dict[str, object]:
    """Make these parts free in this process (loraforge.kernels' names replaced); returns the replaced originals
    by name, for restore()."""
    unknown = [p for p in parts if p not in PATCHES]
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    originals = {}
    for part in parts:
        for name, fn in PATCHES[part].items():
            originals.setdefault(name, getattr(K, name))
            setattr(K, name, fn)
    return originals


def restore(originals: dict[str, object]) -> None:
    for name, fn in originals.items():
        setattr(K, name, fn)
