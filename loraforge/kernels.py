"""A fused LoRA linear: one autograd node for base(x) + s·(x Aᵀ) Bᵀ that saves only what its backward needs.

    forward   xa = x Aᵀ                      (N, r)   kept for dB
              y  = x Wᵀ + b + s · xa Bᵀ      (N, out)
    backward  gb = g B                       (N, r)
              dx = g W + s · gb A            (N, in)
              dA = s · gbᵀ x                 (r, in)
              dB = s · gᵀ xa                 (out, r)

Saved: x, xa (r columns), and references to W, A, B; the plain path also keeps the scaled copy's autograd
bookkeeping and does two extra (N, out) elementwise passes (× s, +) forward and back. Frozen W, b get no
gradient. Under autocast the matmuls run in the autocast dtype and dA, dB are returned in the parameters' dtype
(fp32 master weights). tests/test_kernels.py checks loss and gradients against the plain path.
"""

from __future__ import annotations

import torch


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            xc, w, a, b = (t.to(compute) for t in (x, weight, lora_A, lora_B))
            x2 = xc.reshape(-1, xc.shape[-1])  # (N, in)
            xa = x2 @ a.T  # (N, r)
            y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(compute))  # (N, out)
            y.addmm_(xa, b.T, alpha=scaling)
        ctx.save_for_backward(x2, xa, w, a, b)
        ctx.x_shape = x.shape
        ctx.scaling, ctx.x_dtype = scaling, x.dtype
        ctx.param_dtypes = (lora_A.dtype, lora_B.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, xa2, w, a, b = ctx.saved_tensors  # (N, in), (N, r)
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1]).to(w.dtype)  # (N, out)
        gb = g2 @ b  # (N, r)
        dx = torch.addmm(g2 @ w, gb, a, alpha=s) if ctx.needs_input_grad[0] else None  # (N, in)
        dA = (gb.T @ x2).mul_(s).to(ctx.param_dtypes[0]) if ctx.needs_input_grad[3] else None  # (r, in)
        dB = (g2.T @ xa2).mul_(s).to(ctx.param_dtypes[1]) if ctx.needs_input_grad[4] else None  # (out, r)
        if dx is not None:
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        return dx, None, None, dA, dB, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """x Wᵀ + b + scaling · (x Aᵀ) Bᵀ for a frozen (W, b); A is (r, in), B is (out, r). Gradients for x, A, B."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("fused_lora_linear trains only the adapter: freeze the base weight and bias first")
    return _LoraLinear.apply(x, weight, bias, lora_A, lora_B, scaling)
