"""The LoRA layer: it wraps a frozen base layer and adds a low-rank update per named adapter.

    h = base(x) + (lora_alpha / r) · B(A(dropout(x)))          (Hu et al. 2021, eq. 3)

DoRA (Liu et al. 2024) adds a per-output-row magnitude m and renormalises: W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_row.

The base layer is called as is, so a bitsandbytes 4-bit layer works unchanged. `delta_weight()` is the one
place the merge math lives; merge() / unmerge() are explicit and idempotent, never a side effect of
train(), eval() or forward().
"""

from __future__ import annotations

import copy
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.kernels import fused_lora_linear
from loraforge.quant.bnb import dequantize
from loraforge.quant.checks import is_quantized
from loraforge.utils.interrupts import held_interrupts


class MergeError(ValueError):
    """A merge that would put NaN or inf into the base weight: the adapter's own, or past the weight dtype's range."""


def _check_merged(name: str, delta: torch.Tensor, merged: torch.Tensor) -> None:
    """MergeError naming adapter `name` when `merged` is not finite: ΔW (in fp32) already was, or the sum passed
    the range of its dtype (fp16: ±65504)."""
    if torch.isfinite(merged).all():
        return
    if not torch.isfinite(delta).all():
        raise MergeError(f"adapter {name!r} has NaN/inf weights; refusing to merge it")
    raise MergeError(f"adapter {name!r}: the merged weight passes {str(merged.dtype).removeprefix('torch.')}'s range "
                     f"(|ΔW| up to {delta.abs().max().item():.4g}); merge in fp32 or bf16")


def base_features(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like layer."""
    if isinstance(base, nn.Linear) or hasattr(base, "in_features"):  # nn.Linear, bnb Linear4bit / Linear8bitLt
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D":  # GPT-2: weight is (in, out), forward is x @ W + b
        in_f, out_f = base.weight.shape
        return in_f, out_f, True
    raise TypeError(f"cannot put LoRA on {type(base).__name__}: only linear layers (nn.Linear, Conv1D, bnb 4/8-bit)")


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The base weight in floating point, (out, in) for nn.Linear; bitsandbytes layers are de-quantized."""
    if is_quantized(base):
        return dequantize(base)
    return base.weight


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """The dtype new adapter weights get: the base's where it is fp32 or fp64, else fp32 (a bf16/fp16 base: PEFT's
    autocast_adapter_dtype; a quantized one). fp32 masters keep small updates that bf16 rounds away; the forward
    casts x to the adapter's dtype and its output back to the base's."""
    return base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32


def _parameters(item: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    """An adapter's entry of a ModuleDict (a Linear) or a ParameterDict (a tensor) as its parameters."""
    return [item] if isinstance(item, nn.Parameter) else list(item.parameters())


class LoraLayer(nn.Module):
    """Bookkeeping shared by every adapter layer: names, active set, merged set, per-row adapters.

    Adapter layers are found by this type, never by a substring of a parameter name.
    """

    adapter_modules = ("lora_A", "lora_B")  # the per-adapter ModuleDicts / ParameterDicts a subclass holds

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = base_features(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # a mixed batch: one adapter name (or None) per row
        self.row_forward = None  # the per-row hook, fn(x, base_out) -> out: mixed_rows, or a server's stacks
        # a base weight that was tied to other parameters (inject.untie_shared): (their names, the shared Parameter,
        # tie_word_embeddings before), so adapters.delete_adapter can tie it again; None for an untied base
        self.untied_from: tuple[list[str], nn.Parameter, bool | None] | None = None
        self.train(base_layer.training)  # the mode of the layer it wraps: an eval() model stays in eval (PEFT)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define delta_weight()")

    def _check_merge(self, names) -> list[str]:
        for name in names:
            if name not in self.r:
                raise KeyError(f"adapter {name!r} is not on this layer; loaded: {self.adapter_names}")
        return [n for n in names if n not in self.merged_adapters]

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe: bool = True) -> None:
        """Add ΔW of each named adapter (default: the active ones) into the base weight. Idempotent."""
        for name in self._check_merge(names if names is not None else self.active_adapters):
            weight = self.base_layer.weight
            if is_quantized(self.base_layer):
                raise RuntimeError("merging into a quantized base in place is not supported; "
                                   "use loraforge.lora.merge.merge_and_unload, which de-quantizes first")
            self._merge_one(name, weight, safe)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged ΔW again, newest first. Idempotent."""
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters[-1], self.base_layer.weight)

    # _merge_one and _unmerge_one compute first, then write the weight and update merged_adapters together, with
    # Ctrl-C held (utils.interrupts): a notebook's stop button between the two left the layer half merged for good

    def _merge_one(self, name: str, weight: torch.Tensor, safe: bool) -> None:
        """Plain LoRA merges additively: W += ΔW; `name` joins merged_adapters."""
        delta = self.delta_weight(name)
        merged = (weight.float() + delta.float()).to(weight.dtype)  # one rounding of W + ΔW, not two (bf16, fp16)
        if safe:
            _check_merged(name, delta, merged)
        with held_interrupts():
            weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def _unmerge_one(self, name: str, weight: torch.Tensor) -> None:
        """W -= ΔW of the newest merged adapter, `name`, which leaves merged_adapters."""
        delta = self.delta_weight(name).to(weight.dtype)
        with held_interrupts():
            weight.data -= delta
            self.merged_adapters.pop()

    def refuse_training_merged(self) -> None:
        """A training forward (train() mode, gradients on) while an adapter that trains is merged: its weights are
        not in the graph (no gradients reach them), and unmerge() after an update would subtract another ΔW than
        merge() added, changing the base for good (soak)."""
        trains = [name for name in self.merged_adapters
                  if any(p.requires_grad for attr in self.adapter_modules if name in getattr(self, attr)
                         for p in _parameters(getattr(self, attr)[name]))]
        if trains:
            raise RuntimeError(f"adapters {trains} are merged into the base weights, so training would not reach "
                               f"them (and unmerge() would then subtract another ΔW from the base); call "
                               f"loraforge.lora.merge.unmerge(model) before training, or run the merged model in "
                               f"eval() or under torch.no_grad()")

    def mixed_rows(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The row hook of a training mixed batch (adapters.mixed_batch): row i gets adapter row_adapters[i]'s
        delta (None: the base alone). A server plugs its stacked adapters into the same hook, `row_forward`."""
        if self.disabled:
            return base_out
        if self.merged_adapters:
            raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call unmerge() first")
        if x.dim() == 2:  # OPT's MLP takes its input flattened to (B·T, in): the rows are B runs of T tokens
            n = len(self.row_adapters)
            return self.mixed_rows(x.view(n, -1, x.shape[-1]), base_out.view(n, -1, base_out.shape[-1])).view(
                base_out.shape)
        result = base_out.clone()
        for name in set(self.row_adapters) - {None}:
            if name not in self.r:
                continue  # this layer is not targeted by that adapter
            idx = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
            result[idx] = result[idx] + self._row_delta(name, x[idx], base_out[idx]).to(result.dtype)
        return result

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`, or what is left of it: inactive first, so a delete stopped midway (Ctrl-C) leaves a
        layer that runs without it (the forward found it active with its lora_A gone: KeyError), and the next
        delete finishes it."""
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge() before deleting it")
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        for attr in self.adapter_modules:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)

    def holds(self, name: str) -> bool:
        """Whether any part of adapter `name` is on this layer (an add or a delete stopped midway leaves parts)."""
        return (name in self.r or name in self.active_adapters
                or any(name in getattr(self, attr) for attr in self.adapter_modules))


class LoraLinear(LoraLayer):
    """LoRA on a linear layer (nn.Linear, GPT-2 Conv1D, bitsandbytes 4-bit/8-bit); DoRA per adapter if asked."""

    adapter_modules = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()  # name -> Linear(in, r): A is (r, in)
        self.lora_B = nn.ModuleDict()  # name -> Linear(r, out): B is (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: name -> m, (out,)
        self._dora_norm_at_merge: dict[str, torch.Tensor] = {}  # ‖W + ΔW‖_row of a merged DoRA adapter, (out,)
        self.fused = False  # True: plain LoRA on an nn.Linear runs as one autograd node (loraforge.kernels)
        # PiSSA/OLoRA adapters: their initial (A0 (r, in), B0 (out, r)) in fp32, what the init took out of W0
        # (W_res = W0 − s·B0 A0); delete_adapter adds s·B0 A0 back. Plain tensors: not in any state dict
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True, use_dora: bool = False,
                    path: str = "") -> None:
        """`path`: this layer's module path in the model; it seeds pissa_niter_N's randomized SVD, so the same
        adapter on the same base gets the same init at training and at every load (inject passes it)."""
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first or pick another name")
        weight = self.base_layer.weight
        dtype = adapter_dtype(weight)
        device = weight.device
        # Built on the CPU, then moved: nn.Linear's own init draws from its device's generator, and A's init below
        # draws from the CPU's, so building on a GPU would leave the CPU generator elsewhere (another A per device)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype).to(device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype).to(device)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.reset_parameters(name, init_lora_weights, path)
        if use_dora:  # after the init: PiSSA/OLoRA change W0 first (PEFT's order). m = ‖W0 + s·BA‖_row
            with torch.no_grad():
                norm = self._row_norm(self._base_out_in(), self._scaled_BA(name))
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(dtype))
        self.train(self.training)  # the new modules (a Dropout) take the layer's mode: no dropout in an eval() model
        self.active_adapters.append(name)

    @torch.no_grad()
    def reset_parameters(self, name: str, init_lora_weights: bool | str = True, path: str = "") -> None:
        if init_lora_weights is False:  # nn.Linear's default init for both: a non-zero adapter, for tests
            return
        if isinstance(init_lora_weights, str) and init_lora_weights.startswith(("pissa", "olora")):
            self.init_from_base_weight(name, init_lora_weights, path)  # these replace W0 by a residual
            return
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        init = torch.empty(A.shape, dtype=A.dtype)  # drawn on the CPU: the same A for a seed on any device
        if init_lora_weights == "gaussian":
            nn.init.normal_(init, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(init, a=math.sqrt(5))
        A.copy_(init)
        nn.init.zeros_(B)  # so a fresh adapter leaves the model unchanged

    @torch.no_grad()
    def init_from_base_weight(self, name: str, method: str, path: str = "") -> None:
        """PiSSA ("pissa", "pissa_niter_N") or OLoRA ("olora") init of adapter `name`; W0 becomes W0 − s·B A.

        PiSSA (Meng et al. 2024): A, B start as the top-r singular triplets of W0 and W0 is replaced by the residual,
        so the output is unchanged at step 0 and training moves the principal directions. OLoRA (Büyükakyüz 2024):
        the same with a QR decomposition. Both change W0, so the saved adapter fits the residual base (a load
        re-runs this init; pissa_niter_N's random test matrix is seeded from `path`, so every load builds the same
        residual); loraforge.lora.adapters.save_converted writes the equivalent plain LoRA for the original base.
        The initial factors are kept (initial_factors): delete_adapter puts W0 back.
        """
        base = self.base_layer
        if is_quantized(base) or base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{method} init needs a float base weight, got {type(base.weight).__name__} "
                            f"{base.weight.dtype}; initialise on the unquantized model, then quantize the residual")
        r, s = self.r[name], self.scaling[name]
        dtype = base.weight.dtype
        W = base.weight.float()
        W = W.T if self.fan_in_fan_out else W  # (out, in)
        if method == "olora":
            Q, R = torch.linalg.qr(W)  # W = Q R; Q (out, k) orthonormal columns, R (k, in)
            B, A = Q[:, :r], R[:r]
        else:
            if method == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # W = U diag(S) Vh
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:  # pissa_niter_N: randomized SVD, N subspace iterations
                U, S, V = svd_lowrank(W, q=r, niter=int(method.split("_niter_")[-1]), seed=zlib.crc32(path.encode()))
                Vh = V.T
            root = torch.sqrt(S / s)  # s·B A = U diag(S) Vh
            B, A = U * root, root[:, None] * Vh  # (out, r), (r, in)
        A, B = A.contiguous(), B.contiguous()
        self.lora_A[name].weight.data = A.to(self.lora_A[name].weight.dtype)
        self.lora_B[name].weight.data = B.to(self.lora_B[name].weight.dtype)
        self.initial_factors[name] = (A.clone(), B.clone())  # copies: a load writes the file's A, B into the above
        residual = W - s * (B @ A)
        # a new tensor, never written into W0: adapters.load_adapter keeps the old one to undo a failed load
        base.weight.data = (residual.T if self.fan_in_fan_out else residual).contiguous().to(dtype)

    @torch.no_grad()
    def restore_base(self, name: str) -> None:
        """Put back the part of W0 that PiSSA/OLoRA adapter `name`'s init took out: W ← W + s·B0 A0, in fp32
        (W0 to fp32 rounding; to the weight's own rounding for a half-precision base). No-op for other adapters."""
        if name not in self.initial_factors:
            return
        A0, B0 = self.initial_factors.pop(name)
        base = self.base_layer
        W = base.weight.float()
        W = W.T if self.fan_in_fan_out else W  # (out, in)
        restored = W + self.scaling[name] * (B0.to(W.device) @ A0.to(W.device))
        # a new tensor, as the init assigns one: never written into a tensor something else may hold
        base.weight.data = (restored.T if self.fan_in_fan_out else restored).contiguous().to(base.weight.dtype)

    def original_base_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `name` as factors on the original base W0, (A' (r', in), B' (out, r')) with the same scaling: its
        own A, B for a plain adapter; [A; A0], [B, −B0] (r' = 2r, fp32) for a PiSSA/OLoRA one, since
        W_res + s·B A = W0 + s·B' A' (save_converted's identity). With restore_base(name), a server batching
        adapters per row keeps W0 for the other rows."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if name not in self.initial_factors:
            return A, B
        A0, B0 = (t.to(A.device) for t in self.initial_factors[name])
        return torch.cat([A.float(), A0]), torch.cat([B.float(), -B0], dim=1)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`; a PiSSA/OLoRA adapter gives back the W0 its init replaced by the residual."""
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge() before deleting it")
        self.restore_base(name)  # before super() drops its scaling
        super().delete_adapter(name)

    def _scaled_BA(self, name: str) -> torch.Tensor:
        """scaling · B @ A, (out, in), in fp32 for half-precision CPU adapters."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        compute = torch.float32 if A.dtype in (torch.bfloat16, torch.float16) and A.device.type == "cpu" else A.dtype
        return (B.to(compute) @ A.to(compute)) * self.scaling[name]

    def _base_out_in(self) -> torch.Tensor:
        """The base weight as (out, in), de-quantized if needed."""
        weight = dequantized_weight(self.base_layer)
        return weight.T if self.fan_in_fan_out else weight

    @staticmethod
    def _row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """‖W + ΔW‖ of each output row, (out,); weight and delta are (out, in)."""
        return torch.linalg.norm(weight + delta.to(weight.dtype), dim=1)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW, shaped like the base weight ((in, out) for fan_in_fan_out layers).

        LoRA: scaling · B @ A. DoRA: the whole change m/‖W+ΔW‖ ⊙ (W+ΔW) − W for the current (unmerged) W.
        """
        delta = self._scaled_BA(name)  # (out, in)
        if name in self.lora_magnitude_vector:
            weight = self._base_out_in().to(delta.dtype)
            factor = self._dora_factor(name, self._row_norm(weight, delta))
            delta = factor * (weight + delta) - weight
        return delta.T if self.fan_in_fan_out else delta

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        return (self.lora_magnitude_vector[name] / norm).view(-1, 1)  # (out, 1)

    def _merge_one(self, name: str, weight: torch.Tensor, safe: bool) -> None:
        """DoRA merge is not additive: W ← m/‖W0+ΔW‖ ⊙ (W+ΔW), the norm kept for unmerge (as PEFT). W holds
        the adapters merged before this one; the norm is on W0, without them, as the forward computes it."""
        if name not in self.lora_magnitude_vector:
            return super()._merge_one(name, weight, safe)
        W = weight.T if self.fan_in_fan_out else weight  # (out, in) view
        delta = self._scaled_BA(name).to(W.dtype)
        W0 = W
        for earlier in reversed(self.merged_adapters):  # a copy of W with the merged adapters taken out again
            W0 = self._restored(earlier, W0)
        norm = self._row_norm(W0, delta)
        merged = self._dora_factor(name, norm) * (W + delta)
        if safe:
            _check_merged(name, self._scaled_BA(name).float(), merged)
        merged = (merged.T if self.fan_in_fan_out else merged).to(weight.dtype).contiguous()
        with held_interrupts():
            self._dora_norm_at_merge[name] = norm
            weight.data = merged
            self.merged_adapters.append(name)

    def _restored(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """The (out, in) weight `W` with merged adapter `name` taken out again (a new tensor)."""
        delta = self._scaled_BA(name).to(W.dtype)
        if name not in self.lora_magnitude_vector:
            return W - delta
        return W / self._dora_factor(name, self._dora_norm_at_merge[name]) - delta

    def _unmerge_one(self, name: str, weight: torch.Tensor) -> None:
        if name not in self.lora_magnitude_vector:
            return super()._unmerge_one(name, weight)
        W = weight.T if self.fan_in_fan_out else weight
        restored = self._restored(name, W)
        restored = (restored.T if self.fan_in_fan_out else restored).to(weight.dtype).contiguous()
        with held_interrupts():
            self._dora_norm_at_merge.pop(name)
            weight.data = restored
            self.merged_adapters.pop()

    def _lora(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to base_out: base(x) plus the adapters applied before this one (PEFT's order;
        DoRA rescales all of it, which is what merging the adapters one after another gives)."""
        A = self.lora_A[name]
        x = x.to(A.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        if name in self.lora_magnitude_vector:
            return self._dora(name, x, base_out)
        return self.lora_B[name](A(self.lora_dropout[name](x))) * self.scaling[name]

    def _dora(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """(m/‖W0+sBA‖ − 1)·y + (m/‖W0+sBA‖)·s·B(A(x)), y = base_out − bias: W0x plus the earlier adapters'
        outputs. The norm is detached (DoRA §4.3) and uses BA detached."""
        weight = self._base_out_in()  # (out, in)
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            w0x = base_out if bias is None else base_out - bias  # (..., out)
        else:  # dropout changes x, so W0·dropout(x) must be computed again
            x = dropout(x)
            w0x = F.linear(x, weight.to(x.dtype))
        norm = self._row_norm(weight.to(x.dtype), self._scaled_BA(name).detach()).detach()
        scale = (self.lora_magnitude_vector[name] / norm).view(1, -1)  # broadcast over (..., out)
        lora = self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
        return (scale - 1) * w0x + scale * lora

    def _fusable(self) -> str | None:
        """The adapter the fused kernel can run: one active, unmerged, plain-LoRA adapter without dropout, over a
        frozen base (bias lora_only / all trains the base's bias: the plain path)."""
        if (not self.fused or self.disabled or self.row_adapters is not None or len(self.active_adapters) != 1
                or self.merged_adapters or type(self.base_layer) is not nn.Linear):
            return None
        base = self.base_layer
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        name = self.active_adapters[0]
        plain = name not in self.lora_magnitude_vector and isinstance(self.lora_dropout[name], nn.Identity)
        return name if plain else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged_adapters and self.training and torch.is_grad_enabled():
            self.refuse_training_merged()
        if self.row_forward is not None:  # a batch with one adapter per row (mixed_rows, or a server's stacks)
            return self.row_forward(x, self.base_layer(x, *args, **kwargs))
        if not args and not kwargs and (name := self._fusable()) is not None:  # the same math, one autograd node
            return fused_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight,
                                     self.lora_B[name].weight, self.scaling[name])
        base_out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return base_out
        # summed in the promoted dtype (fp32 adapters on a bf16 base: fp32) and rounded to the base's once (PEFT)
        result = base_out
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = result + self._lora(name, x, result)
        return result.to(base_out.dtype)

    def _row_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self._lora(name, x, base_out)

    def extra_repr(self) -> str:
        dora = f", dora={list(self.lora_magnitude_vector)}" if len(self.lora_magnitude_vector) else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}{dora}"


def svd_lowrank(W: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank(W, q, niter) (Halko et al. 2009, alg. 5.1 with 4.4: the same ops, in the same order),
    its Gaussian test matrix drawn on the CPU from a generator seeded with `seed`: the same (U, S, V) on every
    call and on every device (to the device's rounding), where torch's draws from the global RNG of W's device."""
    m, n = W.shape
    A = W.mH if m < n else W  # tall: (m', n'), m' >= n'
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(A.shape[-1], q, generator=g, dtype=A.dtype).to(A.device)  # (n', q)
    Q = torch.linalg.qr(A @ R).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.mH @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.mH @ A, full_matrices=False)
    V, U = Vh.mH, Q @ U
    return (V, S, U) if m < n else (U, S, V)


class ModulesToSave(nn.Module):
    """A module trained in full and saved with the adapter (PEFT's modules_to_save): a copy per adapter."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # a mixed batch: one adapter name (or None) per row
        self.train(original_module.training)  # the mode of the module it wraps, as LoraLayer

    def __getattr__(self, name: str):
        """An attribute the wrapper lacks is the module's that runs now (PEFT's ModulesToSaveWrapper): the active
        adapter's copy, or the original while disabled or with none active (soak: model.lm_head.weight and
        get_output_embeddings().weight raised AttributeError)."""
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of the wrapper itself
        except AttributeError:
            if "_modules" not in self.__dict__ or name.startswith("__"):  # half-built (copy, pickle): no recursion
                raise
        modules = self.__dict__["_modules"]
        active = self.__dict__.get("active_adapter")
        if self.__dict__.get("disabled") or active is None or active not in modules["modules_to_save"]:
            return getattr(modules["original_module"], name)
        return getattr(modules["modules_to_save"][active], name)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.modules_to_save[name].requires_grad_(True)
        self.active_adapter = name

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None and not self.disabled:
            return self._mixed_rows(*args, **kwargs)
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def _mixed_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Row i of `x` (batch first) through row_adapters[i]'s copy, or the original module where that adapter
        saved none here (None: the base)."""
        if x.shape[0] != len(self.row_adapters):
            raise ValueError(f"a mixed batch of {len(self.row_adapters)} adapter names reached a saved module "
                             f"(modules_to_save) with {x.shape[0]} rows; give one name per row of the batch")
        out = self.original_module(x, *args, **kwargs)
        for name in dict.fromkeys(self.row_adapters):
            if name is not None and name in self.modules_to_save:
                idx = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
                out = out.index_copy(0, idx, self.modules_to_save[name](x[idx], *args, **kwargs).to(out.dtype))
        return out
