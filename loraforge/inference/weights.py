"""A frozen base weight as inference stores it: fp32, bf16 or int8 (per output row scales), always computed in
the activations' dtype (fp32 here).

    fp32  y = x Wᵀ                              the model's own tensor, no copy (it follows training updates)
    bf16  y = x float(W)ᵀ                       half the bytes; on CPUs without native bf16 the rows are widened
    int8  y = (x float(Q)ᵀ) · scale             a quarter of the bytes; Q = round(W / scale), scale = max|W_row| / 127

Widening happens a block of rows at a time into one small fp32 buffer that stays in cache, so memory traffic is
the stored bytes: torch's own bf16 and int8 matrix-vector products run emulated on AVX2-only CPUs (see
bench/decode.py).
"""

from __future__ import annotations

import torch

STORAGES = ("fp32", "bf16", "int8")
BLOCK_BYTES = 1024 * 1024
"""fp32 bytes widened at a time: stays in cache, and few enough blocks that Python's per-op cost stays small."""


class StoredWeight:
    """One (out, in) weight in its storage format; `linear(x)` = x Wᵀ in x's dtype (no bias)."""

    def __init__(self, weight: torch.Tensor, storage: str = "fp32"):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
        self.storage = storage
        self.out_features, self.in_features = weight.shape
        self.scale = None
        if storage == "fp32":
            self.data = weight.detach()
        elif storage == "bf16":
            self.data = weight.detach().to(torch.bfloat16).contiguous()
        else:  # symmetric per-row int8, as llama.cpp's Q8_0 but per row rather than per 32 values
            w = weight.detach().float()
            scale = w.abs().amax(1).clamp(min=1e-12) / 127  # (out,)
            self.data = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale
        self.block = max(1, BLOCK_BYTES // (4 * self.in_features))  # rows widened at a time

    @property
    def nbytes(self) -> int:
        extra = self.scale.numel() * 4 if self.scale is not None else 0
        return self.data.numel() * self.data.element_size() + extra

    def dequantized(self) -> torch.Tensor:
        """The weight as fp32 (out, in): the reference the storage's error is measured against."""
        w = self.data.float()
        return w * self.scale[:, None] if self.scale is not None else w

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` as fp32, (*ids.shape, in): an embedding lookup in the stored precision."""
        w = self.data[ids].float()
        return w * self.scale[ids][..., None] if self.scale is not None else w

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if self.storage == "fp32" or x.device.type != "cpu":
            w = self.data if self.storage == "fp32" else self.dequantized().to(x.dtype)
            return torch.nn.functional.linear(x, w)
        flat_t = x.reshape(-1, self.in_features).T  # (in, M)
        out_t = flat_t.new_empty(self.out_features, flat_t.shape[1])  # (out, M): row blocks are contiguous
        buffer = flat_t.new_empty(self.block, self.in_features)
        for start in range(0, self.out_features, self.block):  # widen a block of rows in cache, then multiply
            rows = self.data[start:start + self.block]
            w = buffer[:rows.shape[0]]
            w.copy_(rows)
            torch.mm(w, flat_t, out=out_t[start:start + rows.shape[0]])
        if self.scale is not None:
            out_t.mul_(self.scale[:, None])
        return out_t.T.reshape(*x.shape[:-1], self.out_features)
