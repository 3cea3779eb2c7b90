"""A frozen base weight as inference stores it: fp32, bf16 or int8 (per output row scales), always computed in
the activations' dtype (fp32 here).

    fp32  y = x Wᵀ                              the model's own tensor, no copy (it follows training updates)
    bf16  y = x float(W)ᵀ                       half the bytes; on CPUs without native bf16 the rows are widened
    int8  y = x (float(Q) · scale)ᵀ             ~a quarter of the bytes; per group of 32 inputs of a row (as
                                                llama.cpp's Q8_0): Q = round(W / scale), scale = max|W_group| / 127

A decode step's few rows go to `cpu_kernels` (x86 with AVX2: the stored bytes widened in registers; fp32 too
where MKL's products are slow, `cpu_kernels.FP32`). Otherwise
widening happens a block of rows at a time into one small fp32 buffer that stays in cache, then a matmul: torch's
own bf16 and int8 matrix-vector products run emulated on AVX2-only CPUs (see bench/decode.py).
"""

from __future__ import annotations

import torch

from loraforge.inference import cpu_kernels

STORAGES = ("fp32", "bf16", "int8")
GROUP = 32
"""int8: inputs sharing one scale (llama.cpp's Q8_0 block)."""
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
        else:  # symmetric int8 per group of GROUP inputs (a whole row where in_features is not a multiple)
            self.group = GROUP if self.in_features % GROUP == 0 else self.in_features
            w = weight.detach().float().reshape(self.out_features, -1, self.group)  # (out, in/G, G)
            scale = w.abs().amax(-1).clamp(min=1e-12) / 127  # (out, in/G)
            self.data = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8).reshape(weight.shape)
            self.scale = scale
        self.block = max(1, BLOCK_BYTES // (4 * self.in_features))  # rows widened at a time
        self.kernel = cpu_kernels.fits_weight(self.data)  # the input is checked per call
        self.max_rows = cpu_kernels.linear_rows(self.data.dtype)

    @property
    def nbytes(self) -> int:
        extra = self.scale.numel() * 4 if self.scale is not None else 0
        return self.data.numel() * self.data.element_size() + extra

    def dequantized(self) -> torch.Tensor:
        """The weight as fp32 (out, in): the reference the storage's error is measured against."""
        return self._widen(self.data, self.scale)

    def _widen(self, rows: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored rows (..., in) as fp32, into `out` if given; int8 rows times their group scales (..., in/G)."""
        w = rows.float() if out is None else out.copy_(rows)
        if scale is not None:
            w.view(*w.shape[:-1], -1, self.group).mul_(scale[..., None])
        return w

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` as fp32, (*ids.shape, in): an embedding lookup in the stored precision."""
        return self._widen(self.data[ids], None if self.scale is None else self.scale[ids])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if self.kernel and cpu_kernels.fits_input(x, self.in_features, self.max_rows):  # decode: bytes read once
            return cpu_kernels.linear(x, self.data, self.scale)
        if self.storage == "fp32" or x.device.type != "cpu":
            w = self.data if self.storage == "fp32" else self.dequantized().to(x.dtype)
            return torch.nn.functional.linear(x, w)
        flat_t = x.reshape(-1, self.in_features).T  # (in, M)
        out_t = flat_t.new_empty(self.out_features, flat_t.shape[1])  # (out, M): row blocks are contiguous
        buffer = flat_t.new_empty(self.block, self.in_features)
        for start in range(0, self.out_features, self.block):  # widen a block of rows in cache, then multiply
            rows = self.data[start:start + self.block]
            scale = None if self.scale is None else self.scale[start:start + self.block]
            w = self._widen(rows, scale, out=buffer[:rows.shape[0]])
            torch.mm(w, flat_t, out=out_t[start:start + rows.shape[0]])
        return out_t.T.reshape(*x.shape[:-1], self.out_features)
