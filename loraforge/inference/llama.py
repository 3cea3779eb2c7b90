"""The decode step of a Llama-family model over a static KV cache, written as one plain function of tensors.

    x = embed(ids)                                                         (B, T, d)
    per layer:  h = rms(x);  q, k, v = h Wqᵀ, h Wkᵀ, h Wvᵀ (+ LoRA);  rope(q, k) at each row's positions
                k, v -> cache[layer, row, :, start_row + t]                (written in place, no concatenation)
                x += softmax(q Kᵀ/√D + mask) V Woᵀ (+ LoRA)                 one scaled_dot_product_attention; grouped
                                                                           heads read their shared K, V
                h = rms(x);  x += (silu(h Wgᵀ) ⊙ h Wuᵀ) Wdᵀ (+ LoRA)
    logits = rms(x[row, keep_row]) Wheadᵀ (+ LoRA: a server's hook)         (B, V): one position per row

transformers' forward does the same math through a module per op, a growing (concatenated) cache and a 4-D mask
built per call; here the cache is allocated once (`max_batch` rows × `max_len` slots per layer), each row's
tokens sit at their positions from slot 0 (no left padding), and the adapters of the batch's rows are gathered
once per batch composition (`set_rows`), not per step. The base weights are stored as `StoredWeight`s
(fp32: the model's own tensors; bf16 / int8: copies).

LoRA on a projection, per row b with adapter a(b):  y_b = W0 x_b + B_a (A_a x_b) · s_a; DoRA multiplies
(W0 x + s B A x) by m_a / ‖W0 + s B_a A_a‖_row (constant at inference). Several active adapters add up: their A
and B are concatenated along r.
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.inference import cpu_kernels
from loraforge.inference.weights import StoredWeight
from loraforge.lora.layer import LoraLayer, LoraLinear, ModulesToSave
from loraforge.models import context_length
from loraforge.quant.checks import is_quantized

SUPPORTED = ("llama",)
ATTEND_BLOCK = 32
"""A decode step off the kernels on a CPU (bf16 activations) attends over the cache's first L slots rounded up to a
multiple of this (the slots past each row's position masked): oneDNN, which runs these bf16 matmuls, builds and keeps a
kernel per shape (about 0.7 ms and 0.7-1.5 MB each, up to 1,024 of them), and L grew by one each step, so a server
built one every step and grew by hundreds of MB; rounded, one in 32 steps."""
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def unsupported(model: nn.Module) -> str | None:
    """Why `Decoder` cannot run `model` (None: it can). Callers fall back to transformers' forward."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} (the static decoder runs {', '.join(SUPPORTED)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if isinstance(getattr(model, "lm_head", None), LoraLayer):  # the decoder reads the head's weight as stored
        return "an adapter on lm_head"
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            return "modules_to_save"
        if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
            return f"{type(module).__name__} layers"
        if is_quantized(module):
            return "a bitsandbytes-quantized base"
        if isinstance(module, LoraLinear) and module.row_adapters is None and not module.disabled:
            active = [n for n in module.active_adapters if n not in module.merged_adapters]
            if len(active) > 1 and any(n in module.lora_magnitude_vector for n in active):
                return "several active adapters, one of them DoRA (set one, or give each row its adapter)"
    return None


def cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero KV cache. On a CPU: fresh pages of an anonymous mapping, zero as the OS hands them out, so there is no
    zeroing pass, and only the pages rows write to become resident (a cache sized for 256 slots a row whose rows
    use 72 costs what 72 do; SmolLM2, 32 rows: 59 against 138 ms to allocate and write 80 slots, 2-core AMD EPYC)."""
    n = math.prod(shape)
    if device.type != "cpu" or n == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, n * dtype.itemsize), dtype=dtype, count=n).view(shape)


class Projection:
    """One linear of the model: its stored base weight and bias, and the LoRA weights of the current rows."""

    def __init__(self, module: nn.Module, storage: str):
        self.lora = module if isinstance(module, LoraLinear) else None
        base = self.lora.base_layer if self.lora is not None else module
        self.weight = StoredWeight(base.weight, storage)
        self.bias = base.bias.detach() if base.bias is not None else None
        self.A = self.B = self.factor = None  # the rows' LoRA: (R, in) / (out, R) shared, or (B, R, in) / (B, out, R)
        self.hook = None  # a server's per-row adapters: the layer's row_forward(x, base_out) (Decoder.attach_hooks)

    def default_names(self) -> tuple[str, ...]:
        """The adapters this layer applies as the model is set: active, unmerged, not disabled."""
        layer = self.lora
        if layer is None or layer.disabled:
            return ()
        return tuple(n for n in layer.active_adapters if n not in layer.merged_adapters)

    def adapter(self, names: tuple[str, ...]):
        """(A (r, in), B·s (out, r), DoRA factor (out,) or None) of `names` summed, or None where none applies."""
        layer = self.lora
        names = tuple(n for n in names if layer is not None and n in layer.r)
        if not names:
            return None
        if len(names) > 1 and any(n in layer.lora_magnitude_vector for n in names):
            raise NotImplementedError(f"adapters {list(names)} active together, one of them DoRA: DoRA does not add "
                                      f"up; set one adapter, or give each row its own")
        As, Bs, factor = [], [], None
        for n in names:
            A, B, s = layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach(), layer.scaling[n]
            As.append(A)
            Bs.append(B * s)
            if n in layer.lora_magnitude_vector:  # the norm LoraLinear uses: ‖W0 + (B A) s‖ per output row
                W0 = self.weight.data if self.weight.storage == "fp32" else self.weight.dequantized()
                norm = torch.linalg.norm(W0 + ((B @ A) * s).to(W0.dtype), dim=1)
                factor = layer.lora_magnitude_vector[n].detach() / norm
        return torch.cat(As, 0), torch.cat(Bs, 1), factor

    def set_rows(self, rows: list[tuple[str, ...]] | None) -> None:
        """rows: the adapter names of each batch row; None: every row as the model is set."""
        if rows is None or len(set(rows)) == 1:
            got = self.adapter(self.default_names() if rows is None else rows[0])
            self.A, self.B, self.factor = got if got is not None else (None, None, None)
            return
        kinds = sorted(set(rows))
        got = {k: self.adapter(k) for k in kinds}
        present = [g for g in got.values() if g is not None]
        if not present:
            self.A = self.B = self.factor = None
            return
        r = max(g[0].shape[0] for g in present)
        ref = present[0][0]
        A = ref.new_zeros(len(kinds), r, self.weight.in_features)  # slot per kind, rank zero-padded
        B = ref.new_zeros(len(kinds), self.weight.out_features, r)
        factor = ref.new_ones(len(kinds), self.weight.out_features)
        for i, k in enumerate(kinds):
            if got[k] is not None:
                a, b, f = got[k]
                A[i, :a.shape[0]], B[i, :, :a.shape[0]] = a, b
                if f is not None:
                    factor[i] = f
        index = torch.tensor([kinds.index(k) for k in rows], device=A.device)
        self.A, self.B = A[index], B[index]  # (B, r, in), (B, out, r): gathered once for this composition
        dora = any(g[2] is not None for g in present)
        self.factor = factor[index][:, None, :] if dora else None  # (B, 1, out)

    @property
    def plain(self) -> bool:
        """Only the base product: no LoRA on the current rows, no DoRA factor, no bias, no hook."""
        return self.A is None and self.factor is None and self.bias is None and self.hook is None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) -> (B, T, out)."""
        return self.finish(x, self.weight.linear(x))

    def finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The rest of the projection on its base product y = x W0ᵀ: the rows' LoRA, DoRA's factor, the bias."""
        if self.A is not None:  # fp32 adapters on a bf16 base (LoraLinear's dtypes): x in A's dtype, y back in its own
            dtype, xa = y.dtype, x.to(self.A.dtype)
            if self.A.dim() == 2:
                y = y + (xa @ self.A.T) @ self.B.T
            else:
                y = y + torch.bmm(torch.bmm(xa, self.A.transpose(1, 2)), self.B.transpose(1, 2))
            if self.factor is not None:
                y = y * self.factor
            y = y.to(dtype)
        y = y if self.bias is None else y + self.bias
        return y if self.hook is None else self.hook(x, y)


class Decoder:
    """A Llama-family model's forward over a static KV cache of `max_batch` rows × `max_len` positions.

    `forward(ids, start)` runs tokens ids[b] at positions start[b]... of row b (prefill: T tokens; decode: one)
    and returns each row's logits at one position. `set_rows` picks each row's adapters; `keep_rows` moves the
    rows still running to the front. The model is read, never changed; with storage "fp32" the decoder uses the
    model's own weights, so a decoder built before a training step sees the new base weights but not new adapter
    weights (call `set_rows` again).
    """

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, storage: str = "fp32",
                 adapters: list[str | None] | None = None, hooks: bool = False):
        why = unsupported(model)
        if why is not None and (adapters is None or "DoRA" not in why):
            raise NotImplementedError(f"the static decoder does not run {why}")
        cfg = model.config
        self.context = context_length(cfg)
        self._check_len(max_len)
        inner = model.model
        self.storage = storage
        self.eps = cfg.rms_norm_eps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.rotary = inner.rotary_emb
        self.embed = StoredWeight(inner.embed_tokens.weight, storage)
        head = model.lm_head
        tied = head.weight is inner.embed_tokens.weight
        self.head = self.embed if tied else StoredWeight(head.weight, storage)
        self.head_bias = head.bias.detach() if head.bias is not None else None
        self.final_norm = inner.norm.weight.detach()
        self.layers = []
        self.blocks = inner.layers
        self.model = model  # its lm_head, re-read by attach_hooks (a server's adapter layer wraps it)
        self.head_hook = None  # the lm_head's row_forward (hooks): each row's adapter on the logits
        self.hooks = hooks  # per-row adapters from the layers' row_forward hooks (a server's stacks), not by name
        for block in inner.layers:
            projections = {p.split(".")[1]: Projection(block.get_submodule(p), storage) for p in PROJECTIONS}
            norms = (block.input_layernorm.weight.detach(), block.post_attention_layernorm.weight.detach())
            self.layers.append((norms, projections))
        # decode steps of plain layers (no adapter, hook or bias on the rows) as one kernel call each
        self.whole = [cpu_kernels.LayerWeights([p[n.split(".")[1]].weight.data for n in PROJECTIONS],
                                               [p[n.split(".")[1]].weight.scale for n in PROJECTIONS])
                      for _, p in self.layers]
        weight = inner.embed_tokens.weight
        self.dtype = weight.dtype if weight.dtype.is_floating_point and storage == "fp32" else torch.float32
        self.device = weight.device
        self.max_batch, self.max_len = max_batch, max_len
        shape = (len(self.layers), max_batch, self.kv_heads, max_len, self.head_dim)
        # zeros, never garbage: slots past a row's length are masked, and 0 · NaN would still be NaN
        self.keys = cache_zeros(shape, self.dtype, self.device)
        self.values = cache_zeros(shape, self.dtype, self.device)
        self.slots = torch.arange(max_len, device=self.device)
        # decode steps on a CPU in fp32: RMSNorm and rope + cache write + attention as C kernels (fewer, cheaper ops)
        self.kernels = (self.device.type == "cpu" and self.dtype == torch.float32 and cfg.hidden_size % 8 == 0
                        and self.head_dim % 8 == 0 and self.head_dim <= 256 and cpu_kernels.available())
        self.fuse = True  # decode steps: q, k, v in one call, gate and up in one (False: one call each, for A/B)
        self.layer_kernel = True  # decode steps of plain layers in one call (False: a call per part, for A/B)
        self.rows: list[tuple[str, ...]] | None = None
        if not hooks:
            self.set_rows(adapters)
        self.attach_hooks()

    def _check_len(self, max_len: int) -> None:
        if self.context is not None and max_len > self.context:
            raise ValueError(f"a cache of max_len={max_len} positions is past the model's context of {self.context} "
                             f"tokens; cut the prompt and new tokens to fit it")

    def packs(self, T: int) -> bool:
        """Whether `forward` packs the real tokens of a T-token prefill given `lengths` (a server sets each token's
        adapter slot then): T > 1, and no rows with their own LoRA weights by name (`set_rows` with several
        adapters: those are per row, not per token), and no hook on the head (it sees rows); hooks see tokens."""
        return T > 1 and self.head_hook is None and not any(
            q.A is not None and q.A.dim() == 3 or q.factor is not None and q.factor.dim() == 3
            for _, ps in self.layers for q in ps.values())

    @property
    def nbytes(self) -> int:
        """Bytes of stored weights one decode step reads (the embedding rows aside when the head is tied)."""
        total = self.head.nbytes
        for _, projections in self.layers:
            total += sum(p.weight.nbytes for p in projections.values())
        return total

    def set_rows(self, adapters: list[str | None] | None) -> None:
        """Each batch row's adapter (None or "base": none); None: every row as the model is set (active adapters,
        or a `mixed_batch` block's names)."""
        rows = None
        if adapters is not None:
            rows = [() if a in (None, "base") else (a,) for a in adapters]
        else:
            mixed = next((p.lora.row_adapters for _, ps in self.layers for p in ps.values()
                          if p.lora is not None and p.lora.row_adapters is not None), None)
            if mixed is not None:
                rows = [() if a is None else (a,) for a in mixed]
        self.rows = rows
        for _, projections in self.layers:
            for p in projections.values():
                p.set_rows(rows)

    def attach_hooks(self) -> None:
        """With `hooks`: each projection applies its layer's `row_forward` as the model is now (a server injects and
        removes adapter layers as adapters come and go; the base weights stay the same tensors)."""
        if not self.hooks:
            return
        for block, (_, projections) in zip(self.blocks, self.layers):
            for path in PROJECTIONS:
                projections[path.split(".")[1]].hook = getattr(block.get_submodule(path), "row_forward", None)
        self.head_hook = getattr(self.model.lm_head, "row_forward", None)

    def resize(self, max_batch: int, max_len: int, rows: int | None = None, used: int | None = None) -> None:
        """The cache reallocated to `max_batch` rows × `max_len` slots, what fits of the old one kept (a server
        grows it as rows and lengths need, and gives it back when its batch empties): of it, the first `rows` rows'
        first `used` slots where given (the rest is zeros: what a server's rows hold there is never read)."""
        if (max_batch, max_len) == (self.max_batch, self.max_len):
            return
        self._check_len(max_len)
        b, n = min(max_batch, self.max_batch), min(max_len, self.max_len)
        b, n = b if rows is None else min(b, rows), n if used is None else min(n, used)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = cache_zeros((old.shape[0], max_batch, old.shape[2], max_len, old.shape[4]), old.dtype, old.device)
            if b and n:
                new[:, :b, :, :n] = old[:, :b, :, :n]
            setattr(self, name, new)
        self.max_batch, self.max_len = max_batch, max_len
        self.slots = torch.arange(max_len, device=self.device)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Cache row `src`'s first `length` slots into row `dst` (a server moving a running row into a gap)."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]

    def keep_rows(self, index: list[int]) -> None:
        """Rows `index` (in this order) become rows 0..len(index)-1: their cache and their adapters."""
        idx = torch.tensor(index, device=self.device)
        n = len(index)
        self.keys[:, :n] = self.keys.index_select(1, idx)
        self.values[:, :n] = self.values.index_select(1, idx)
        if self.rows is not None:
            self.set_rows([r[0] if r else None for r in (self.rows[i] for i in index)])

    def copy_prefix(self, length: int, rows: int) -> None:
        """Row 0's first `length` cache slots copied into rows 1..rows-1 (a prompt prefix they share)."""
        self.keys[:, 1:rows, :, :length] = self.keys[:, :1, :, :length]
        self.values[:, 1:rows, :, :length] = self.values[:, :1, :, :length]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm in one op (fp32 activations: the same arithmetic)."""
        if self.kernels and weight.dtype == torch.float32:
            return cpu_kernels.rms_norm(x, weight, self.eps)
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _qkv(self, p: dict[str, Projection], h: torch.Tensor) -> list[torch.Tensor]:
        """q, k and v of a decode step: the three base products in one kernel call where they fit, then each
        projection's LoRA and bias."""
        ps = [p["q_proj"], p["k_proj"], p["v_proj"]]
        weights = [q.weight.data for q in ps]
        if self.fuse and cpu_kernels.fits_many(weights, h):
            ys = cpu_kernels.linear3(h, weights, [q.weight.scale for q in ps])
            return [q.finish(h, y) for q, y in zip(ps, ys)]
        return [q(h) for q in ps]

    def _mlp_in(self, p: dict[str, Projection], h: torch.Tensor) -> torch.Tensor:
        """silu(gate(h)) · up(h): one kernel call (both products and the silu) where neither has an adapter."""
        gate, up = p["gate_proj"], p["up_proj"]
        if self.fuse and gate.plain and up.plain and cpu_kernels.fits_many([gate.weight.data, up.weight.data], h):
            return cpu_kernels.gate_up(h, gate.weight.data, gate.weight.scale, up.weight.data, up.weight.scale)
        return self._silu_mul(gate(h), up(h))

    def _silu_mul(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """silu(g) · u: one C pass with the CPU kernels (fp32 activations), else torch's two ops."""
        return cpu_kernels.silu_mul(g, u) if self.kernels else F.silu(g) * u

    def _attend_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q Kᵀ/√D + mask) V for one query a row, q (B, 1, H, D), keys/values (B, Hkv, L, D): the heads of
        a group against their shared K, V in one matmul each -> (B, 1, H·D). On a CPU at batch 32, SmolLM2's shapes
        (L = 64): bf16 124 µs against 286 µs for scaled_dot_product_attention's flash kernel, fp32 104 against 138."""
        B, _, H, D = q.shape
        scores = torch.matmul(q.view(B, keys.shape[1], -1, D), keys.transpose(2, 3)) * self.scaling  # (B, Hkv, G, L)
        if mask is not None:  # (B, 1, 1, L)
            scores = scores + mask
        return torch.matmul(scores.softmax(-1), values).view(B, 1, H * D)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x·cos + rotate_half(x)·sin with rotate_half(x) = (−x₂, x₁); `sin` comes with the sign of its first half
        flipped, so rotate_half is a swap of the halves (one op)."""
        B, T, heads, D = x.shape  # cos, sin (B, T, 1, D)
        swapped = x.view(B, T, heads, 2, D // 2).flip(3).view(B, T, heads, D)
        return torch.addcmul(x * cos, swapped, sin)

    @torch.inference_mode()  # half the per-op cost of no_grad on a CPU (no version counters, no autograd keys)
    def forward(self, ids: torch.Tensor, start: torch.Tensor, keep: torch.Tensor | None = None,
                row0: int = 0, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T): tokens of cache rows row0..row0+B-1 at positions start[b] + t, written into the cache there;
        logits (B, vocab) at column keep[b] (default T-1; with `lengths`, lengths[b]-1). Right padding in a prefill
        is fine: its slots are overwritten by the row's next tokens and no earlier position attends to them. The
        adapters are those `set_rows` gave for these B rows (a server prefilling new requests behind running ones
        sets the new rows' adapters, prefills at row0 = running rows, then sets all rows' adapters for the decode
        steps).

        `lengths` (B,): row b's own tokens are ids[b, :lengths[b]], the rest right padding. The products, norms
        and MLPs then run on the Σ lengths real tokens only, packed (N, 1, ·) in row order; only attention sees
        the padded block, with zeros in the padded slots (`packs` says when: not with per-row LoRA by name). A
        layer's hook sees the packed tokens as its rows: a server sets each token's adapter slot."""
        B, T = ids.shape
        if lengths is not None:
            lengths = lengths.to(self.device)
            keep = lengths - 1 if keep is None else keep
        packed = lengths is not None and self.packs(T)
        if packed:
            valid = self.slots[:T][None, :] < lengths[:, None]  # (B, T)
            keep = torch.cumsum(lengths, 0) - lengths + keep  # each row's kept token in the packed order
        if row0 + B > self.max_batch:
            raise ValueError(f"rows {row0}..{row0 + B - 1} exceed the cache's max_batch={self.max_batch}")
        pos = start[:, None] + self.slots[:T]  # (B, T)
        L = int(pos.max()) + 1
        if L > self.max_len:
            raise ValueError(f"position {L - 1} exceeds the cache's max_len={self.max_len}")
        fused = self.kernels and T == 1  # a decode step: each row's own position, no mask needed
        width = L  # the cache slots attention reads (ATTEND_BLOCK)
        if T == 1 and not fused and self.device.type == "cpu":
            width = min(-(-L // ATTEND_BLOCK) * ATTEND_BLOCK, self.max_len)
        if packed:  # (N, 1, d): the real tokens, at their positions
            x = self.embed.rows(ids[valid][:, None]).to(self.dtype)
            cos, sin = self.rotary(x, pos[valid][:, None])
        else:
            x = self.embed.rows(ids).to(self.dtype)  # (B, T, d)
            cos, sin = self.rotary(x, pos)
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, D)
        uniform = bool((start == start[0]).all())
        mask = None  # one token per row, every row at the same position: every slot up to it is visible
        if not fused and (T > 1 or not uniform or width > L):
            visible = self.slots[:width] <= pos[:, :, None]  # (B, T, width): causal, each row from its slot 0
            mask = torch.zeros(B, 1, T, width, dtype=self.dtype, device=self.device).masked_fill_(
                ~visible[:, None], float("-inf"))
        if fused:  # the kernel's inputs, once per step: (B, D) and (B,) int64, contiguous
            cos1, sin1, pos1 = cos.reshape(B, -1).contiguous(), sin.reshape(B, -1).contiguous(), \
                start.to(torch.int64).contiguous()
        s0 = int(start[0])
        rows = torch.arange(row0, row0 + B, device=self.device)[:, None]
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        for layer, ((norm1, norm2), p) in enumerate(self.layers):
            if fused and self.layer_kernel and self.whole[layer].ok and B <= self.whole[layer].max_rows \
                    and all(q.plain for q in p.values()):  # the whole layer in one call, in place on x
                cpu_kernels.layer(x, self.whole[layer], (norm1, norm2), self.eps, cos1, sin1, pos1, self.keys[layer],
                                  self.values[layer], row0, H, self.scaling)
                continue
            h = self._rms(x, norm1)
            if fused:  # q, k, v in one kernel call; rope, cache write and attention in one; gate, up and silu in one
                o = cpu_kernels.attend(*self._qkv(p, h), cos1, sin1, pos1, self.keys[layer], self.values[layer], row0,
                                       H, self.scaling)
                x = x + p["o_proj"](o)
                h = self._rms(x, norm2)
                x = x + p["down_proj"](self._mlp_in(p, h))
                continue
            n, t = h.shape[:2]  # (B, T), or (N, 1) packed
            q = self._rope(p["q_proj"](h).view(n, t, H, D), cos, sin)
            k = self._rope(p["k_proj"](h).view(n, t, Hkv, D), cos, sin)
            v = p["v_proj"](h).view(n, t, Hkv, D)
            if packed:  # into the padded block for attention: zeros at padded slots
                q, k, v = (y.new_zeros(B, T, *y.shape[2:]).index_put_((valid,), y[:, 0]) for y in (q, k, v))
            keys, values = self.keys[layer], self.values[layer]  # (max_batch, Hkv, max_len, D)
            if uniform:
                keys[row0:row0 + B, :, s0:s0 + T] = k.transpose(1, 2)
                values[row0:row0 + B, :, s0:s0 + T] = v.transpose(1, 2)
            else:
                keys[rows, :, pos] = k  # (B, T) index pairs -> (B, T, Hkv, D)
                values[rows, :, pos] = v
            if T == 1:  # a decode step off the kernels (bf16 activations, GPUs): two grouped matmuls
                o = self._attend_one(q, keys[row0:row0 + B, :, :width], values[row0:row0 + B, :, :width], mask)
            else:  # softmax(q Kᵀ/√D + mask) V in one op; grouped heads read their shared K, V (enable_gqa)
                o = F.scaled_dot_product_attention(q.transpose(1, 2), keys[row0:row0 + B, :, :L],
                                                   values[row0:row0 + B, :, :L], attn_mask=mask, scale=self.scaling,
                                                   enable_gqa=H != Hkv).transpose(1, 2).reshape(B, T, H * D)
                if packed:
                    o = o[valid][:, None]  # (N, 1, H·D)
            x = x + p["o_proj"](o)
            h = self._rms(x, norm2)
            x = x + p["down_proj"](self._silu_mul(p["gate_proj"](h), p["up_proj"](h)))
        if packed:
            x = self._rms(x[keep, 0], self.final_norm)  # (B, d)
        else:
            last = torch.full((B,), T - 1, device=self.device) if keep is None else keep
            x = self._rms(x[rows[:, 0] - row0, last], self.final_norm)  # (B, d)
        logits = self.head.linear(x)
        logits = logits if self.head_bias is None else logits + self.head_bias
        # the head's adapters, one position a row: its hook reads the rows' slots (never packed: `packs`)
        return logits if self.head_hook is None else self.head_hook(x[:, None], logits[:, None])[:, 0]
