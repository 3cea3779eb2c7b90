"""Autograd nodes for training that save only what their backward needs: the LoRA linear, the SwiGLU MLP's
down projection, RMSNorm and attention. Each is the same math as the plain PyTorch path (tests/training/test_kernels.py
compares outputs, losses and gradients); loraforge.training.fastpath installs them into Llama-family models.

LoRA linear, y = x Wᵀ + b + s · (x Aᵀ) Bᵀ for a frozen (W, b):
    forward   xa = x Aᵀ                      (N, r)   kept for dB
              y  = x Wᵀ + b + s · xa Bᵀ      (N, out)
    backward  gb = g B                       (N, r)
              dx = g W + s · gb A            (N, in)
              dA = s · gbᵀ x                 (r, in)
              dB = s · gᵀ xa                 (out, r)
  Saved: x, xa (r columns), and references to W, A, B; the plain path also keeps the scaled copy's autograd
  bookkeeping and does two extra (N, out) elementwise passes (× s, +) forward and back.

SwiGLU down projection, y = lora_linear(silu(g) ⊙ u): saves g and u only; h = silu(g) ⊙ u (the down projection's
  input, as wide as g) is recomputed in the backward instead of kept, and silu(g) is never kept (autograd keeps
  g, silu(g), u and h: four (N, intermediate) tensors, here two).

RMSNorm, y = w ⊙ (x · rstd), rstd = 1/√(mean(x²) + ε) (Llama's: statistics in fp32, the product in x's dtype):
  saves y (which the next linear layer keeps anyway) and rstd (one float per row); x · rstd = y / w in the
  backward. Autograd keeps an fp32 copy of x. Where w has a zero entry, x is kept instead.

Attention, softmax(q kᵀ · scale + mask) v with grouped key/value heads: saves q, k, v and the mask
  and recomputes the probabilities in the backward by the forward's formula (keep_probs=True keeps them, in the
  compute dtype); keys and values are not repeated per query head (eager attention keeps repeated copies and the
  probabilities twice, in fp32 and in the compute dtype). Packed rows (packed_attention) run sequence by sequence:
  scores and probabilities of Σ Lᵢ² positions per row instead of T², and no (T, T) mask; it keeps only q, k and v
  and recomputes each sequence's probabilities in the backward by the forward's formula (the same bits; one more
  q kᵀ and softmax per sequence, small beside the linears), so nothing of Σ Lᵢ² size outlives the forward.

Output head + cross-entropy, Σᵢ [logsumexp(hᵢ Wᵀ) − (hᵢ Wᵀ)[yᵢ]] for a frozen W (V, H): row chunks of logits,
  each in one fp32 buffer worked in place (max, exp, sum, softmax); the input gradient (softmax − onehot) W is
  computed in the forward, chunk by chunk, and kept (N, H), so no (N, V) tensor outlives its chunk. Autograd keeps
  the fp32 log-probabilities of every row (N × V × 4 bytes: 3.2 GB for 16k tokens of a 49k vocabulary) and makes
  four more full-size passes (zeros for the target one-hot, the log-softmax backward, two casts).

Under autocast the matmuls run in the autocast dtype and gradients of trainable parameters come back in the
parameters' dtype (fp32 master weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _linear_forward(x2, w, bias, a, b, scaling):
    """(y, xa) for rows x2 (N, in); a, b None: the frozen linear alone (xa None)."""
    y = F.linear(x2, w, bias)  # (N, out)
    if a is None:
        return y, None
    xa = x2 @ a.T  # (N, r)
    y.addmm_(xa, b.T, alpha=scaling)
    return y, xa


def _linear_backward(g2, x2, xa, w, a, b, scaling, need_x: bool, need_a: bool, need_b: bool):
    """(dx, dA, dB) of _linear_forward for the output gradient g2 (N, out); None where not needed."""
    if a is None:
        return (g2 @ w if need_x else None), None, None
    gb = g2 @ b  # (N, r)
    dx = (g2 @ w).addmm_(gb, a, alpha=scaling) if need_x else None  # (N, in)
    dA = (gb.T @ x2).mul_(scaling) if need_a else None  # (r, in)
    dB = (g2.T @ xa).mul_(scaling) if need_b else None  # (out, r)
    return dx, dA, dB


def _cast(compute, *tensors):
    return tuple(None if t is None else t.to(compute) for t in tensors)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        compute = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, w, bias_c, a, b = _cast(compute, x, weight, bias, lora_A, lora_B)
            x2 = xc.reshape(-1, xc.shape[-1])  # (N, in)
            y, xa = _linear_forward(x2, w, bias_c, a, b, scaling)
        ctx.save_for_backward(x2, xa, w, a, b)
        ctx.x_shape, ctx.scaling, ctx.x_dtype = x.shape, scaling, x.dtype
        ctx.param_dtypes = (lora_A.dtype, lora_B.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, xa, w, a, b = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(w.dtype)  # (N, out)
        need = ctx.needs_input_grad
        dx, dA, dB = _linear_backward(g2, x2, xa, w, a, b, ctx.scaling, need[0], need[3], need[4])
        if dx is not None:
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        return dx, None, None, _opt_to(dA, ctx.param_dtypes[0]), _opt_to(dB, ctx.param_dtypes[1]), None


def _opt_to(t, dtype):
    return None if t is None else t.to(dtype)


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """x Wᵀ + b + scaling · (x Aᵀ) Bᵀ for a frozen (W, b); A is (r, in), B is (out, r). Gradients for x, A, B."""
    _check_frozen(weight, bias)
    return _LoraLinear.apply(x, weight, bias, lora_A, lora_B, scaling)


def _check_frozen(weight, bias):
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the fused kernels train only the adapter: freeze the base weight and bias first")


def _swiglu(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(silu(g) ⊙ u, silu(g)): the SwiGLU activation, in the forward and in the backward's recompute."""
    s = F.silu(g)
    return s * u, s


def _swiglu_grads(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, s: torch.Tensor | None, need_gate: bool,
                  need_up: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d gate, d up) of _swiglu's product for its gradient dh, s its silu(g); None where not needed."""
    du = dh * s if need_up else None
    dg = torch.ops.aten.silu_backward(dh * u, g) if need_gate else None
    return dg, du


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_A, lora_B, scaling: float):
        compute = _compute_dtype(gate)
        with torch.autocast(gate.device.type, enabled=False):
            g, u, w, bias_c, a, b = _cast(compute, gate, up, weight, bias, lora_A, lora_B)
            h = _swiglu(g, u)[0].reshape(-1, g.shape[-1])  # (N, intermediate): used here, recomputed in backward
            y, xa = _linear_forward(h, w, bias_c, a, b, scaling)
        ctx.save_for_backward(g, u, xa, w, a, b)
        ctx.scaling, ctx.dtypes = scaling, (gate.dtype, up.dtype)
        ctx.param_dtypes = (None, None) if lora_A is None else (lora_A.dtype, lora_B.dtype)
        return y.view(*gate.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g, u, xa, w, a, b = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        h, s = _swiglu(g, u)
        h = h.reshape(-1, g.shape[-1])
        need = ctx.needs_input_grad
        dh, dA, dB = _linear_backward(g2, h, xa, w, a, b, ctx.scaling, True, need[4], need[5])
        del h
        dg, du = _swiglu_grads(dh.view(g.shape), g, u, s, need[0], need[1])
        return (_opt_to(dg, ctx.dtypes[0]), _opt_to(du, ctx.dtypes[1]), None, None, _opt_to(dA, ctx.param_dtypes[0]),
                _opt_to(dB, ctx.param_dtypes[1]), None)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                  scaling: float = 1.0) -> torch.Tensor:
    """(silu(gate) ⊙ up) Wᵀ + b [+ scaling · ((silu(gate) ⊙ up) Aᵀ) Bᵀ] for a frozen (W, b): a SwiGLU MLP's down
    projection, with or without a LoRA adapter. Gradients for gate, up, A, B."""
    _check_frozen(weight, bias)
    if (lora_A is None) != (lora_B is None):
        raise ValueError("swiglu_linear: give both lora_A and lora_B, or neither")
    return _SwiGLULinear.apply(gate, up, weight, bias, lora_A, lora_B, scaling)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, keep_x: bool):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        y = weight * (xf * rstd).to(x.dtype)  # exactly LlamaRMSNorm's arithmetic
        del xf
        ctx.save_for_backward(x if keep_x else y, rstd, weight)
        ctx.keep_x, ctx.x_dtype = keep_x, x.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        saved, rstd, weight = ctx.saved_tensors
        w = weight.float()
        xhat = saved.float() * rstd if ctx.keep_x else saved.float() / w  # x · rstd
        gf = g.float()
        gw = gf * w
        dx = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)).mul_(rstd) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (gf * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        return None if dx is None else dx.to(ctx.x_dtype), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, keep_input: bool | None = None) -> torch.Tensor:
    """weight ⊙ (x / √(mean(x²) + eps)), statistics in fp32, as LlamaRMSNorm; keeps less for the backward.

    keep_input: keep x rather than recover x · rstd as y / weight; None decides by whether weight has a zero
    (pass the answer for a frozen weight: the check reads the weight on every call)."""
    if keep_input is None:
        keep_input = bool((weight == 0).any())
    return _RMSNorm.apply(x, weight, eps, keep_input)


def _dense_probs(qg, kc, mask, groups: int, scaling: float, compute: torch.dtype) -> torch.Tensor:
    """Attention probabilities (B, Hkv, G·L, S) in the compute dtype from stacked queries qg (B, Hkv, G·L, D), keys
    kc (B, Hkv, S, D) and an additive mask (B|1, 1, L, S) or None: the forward's and the recomputing backward's one
    formula, so both get the same bits."""
    batch, kv_heads, rows, kv_length = qg.shape[0], qg.shape[1], qg.shape[2], kc.shape[2]
    scores = torch.matmul(qg, kc.transpose(-1, -2)).mul_(scaling)  # (B, Hkv, G·L, S)
    if mask is not None:  # the same for every query head; fp32's min would be -inf in bf16, and bf16's min is past
        # an fp16 mask's range (an fp16 base under bf16 autocast: clamp raised "cannot be converted to c10::Half")
        view = scores.view(batch, kv_heads, groups, rows // groups, kv_length)
        floor = max(torch.finfo(compute).min, torch.finfo(mask.dtype).min)
        view.add_(mask.clamp(min=floor).to(compute)[:, :, None])
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(compute)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scaling: float, keep_probs: bool):
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        compute = _compute_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            qc, kc, vc = _cast(compute, q, k, v)
            qg = qc.reshape(batch, kv_heads, groups * length, dim)  # query heads of one key head, stacked
            probs = _dense_probs(qg, kc, mask, groups, scaling, compute)
            out = torch.matmul(probs, vc)  # (B, Hkv, G·L, D)
        ctx.save_for_backward(qg, kc, vc, probs if keep_probs else mask)
        ctx.keep_probs, ctx.scaling, ctx.groups = keep_probs, scaling, groups
        ctx.shape, ctx.dtypes = q.shape, (q.dtype, k.dtype, v.dtype)
        return out.view(batch, heads, length, dim)

    @staticmethod
    def backward(ctx, g):
        qg, k, v, probs_or_mask = ctx.saved_tensors
        probs = probs_or_mask if ctx.keep_probs else _dense_probs(qg, k, probs_or_mask, ctx.groups, ctx.scaling,
                                                                  v.dtype)
        go = g.reshape(qg.shape).to(v.dtype)  # (B, Hkv, G·L, D)
        dv = probs.transpose(-1, -2) @ go  # sums over the query heads that share a key head
        dp = go @ v.transpose(-1, -2)  # (B, Hkv, G·L, S)
        ds = torch.ops.aten._softmax_backward_data(dp, probs, -1, probs.dtype).mul_(ctx.scaling)  # p ⊙ (dp - Σ p dp)
        del dp, probs
        dq = (ds @ k).view(ctx.shape)
        dk = ds.transpose(-1, -2) @ qg
        return dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), dv.to(ctx.dtypes[2]), None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scaling: float, keep_probs: bool = False) -> torch.Tensor:
    """softmax(q kᵀ · scaling + mask) v. q (B, H, L, D); k, v (B, Hkv, S, D) with H a multiple of Hkv (query head
    h uses key head h // (H / Hkv)); mask additive, broadcastable to (B, 1, L, S), or None. Returns (B, H, L, D).
    The backward recomputes the probabilities from the saved q and k; keep_probs=True keeps them from the forward
    (B·H·L·S values a layer: the same results, more memory)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if mask is not None and mask.dtype == torch.bool:  # True: attend
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
    if mask is not None and mask.dim() < 4:
        mask = mask.view(*(1,) * (4 - mask.dim()), *mask.shape)
    return _Attention.apply(q, k, v, mask, scaling, keep_probs)


def segment_starts(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Per row of packed position ids (B, T), where each sequence starts, plus T at the end: a new sequence begins
    wherever a position is not the previous one + 1 (transformers' find_packed_sequence_indices). None when no row
    restarts (nothing is packed)."""
    first = position_ids[:, :1] - 1
    new = torch.diff(position_ids, prepend=first, dim=-1) != 1  # (B, T)
    new[:, 0] = True
    if int(new.sum()) == position_ids.shape[0]:
        return None
    length = position_ids.shape[1]
    return [row.nonzero().flatten().tolist() + [length] for row in new]


# Packed attention's query positions per block, for sequences longer than two blocks (shorter ones, and all with
# None, attend with their queries at once). bench/train.py --variants lf,lf-wholeseq on packed text, fp32 and bf16 on
# a 2-core Zen 5 EPYC: documents of 512 tokens (--text-docs 512 --text-len 2048) ran 8-9% faster in fp32 and 3-8% in
# bf16 in blocks of 128 (three runs); the shipped articles (~230 tokens) in two blocks did not (0.95-1.04×, two runs).
QUERY_BLOCK = 128


def _segment_probs(qs, ks, bias, start: int, scaling: float) -> torch.Tensor:
    """Causal attention probabilities of one block of a packed sequence's queries, positions start..start+l, in the
    compute dtype: (Hkv, G·l, start+l) from the queries qs (Hkv, G·l, D) and the keys before the block's end ks
    (Hkv, start+l, D); later keys are masked for every query of the block, so they are left out (a block skips
    the work above the diagonal). The forward's and the recomputing backward's one formula, so both get the same
    bits. bias: _causal_bias of the longest sequence. scaling · q kᵀ + bias is one baddbmm, without the two more
    passes over the scores that scaling, then masked_fill took (10% of the node's time in fp32 and bf16, 4 rows of
    455 positions): the same bits where the scale is a power of two (1/√64), one rounding fewer otherwise
    (tests/training/test_packed_attention.py)."""
    n = ks.shape[1]
    length = n - start
    causal = bias[start:n, :n].expand(qs.shape[1] // length, length, n).reshape(-1, n)  # (G·l, n), every key head
    scores = torch.baddbmm(causal, qs, ks.transpose(-1, -2), alpha=scaling)  # (Hkv, G·l, n)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(qs.dtype)


def _blocks(n: int, block: int | None) -> list[tuple[int, int]]:
    """(start, end) of the query blocks of a sequence of n positions: blocks of `block` where n is over two of them,
    else one."""
    if block is None or n <= 2 * block:
        return [(0, n)]
    return [(c, min(c + block, n)) for c in range(0, n, block)]


def _stacked(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """One row's positions of queries or their gradients, (H, l, D), as (Hkv, G·l, D): each key head's G query
    heads stacked."""
    return t.unflatten(0, (kv_heads, -1)).reshape(kv_heads, -1, t.shape[-1])


def _pieces(starts: list[list[int]], block: int | None) -> list[tuple[int, int, int, int, int]]:
    """(row, sequence start, sequence end, block start, block end) of every query block of every sequence in
    segment_starts' lists, block positions counted within the sequence: the order in which the forward runs (and
    keeps) them."""
    return [(i, a, e, c, d) for i, row in enumerate(starts) for a, e in zip(row, row[1:])
            for c, d in _blocks(e - a, block)]


def longest_sequence(starts: list[list[int]]) -> int:
    """The longest sequence's length in segment_starts' lists."""
    return max(e - a for row in starts for a, e in zip(row, row[1:]))


def _causal_bias(starts, dtype: torch.dtype, device) -> torch.Tensor:
    """(L, L) additive causal mask for the longest sequence in starts: −inf above the diagonal, 0 elsewhere."""
    longest = longest_sequence(starts)
    future = torch.ones(longest, longest, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(longest, longest, dtype=dtype, device=device).masked_fill_(future, float("-inf"))


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, starts, scaling: float, keep_probs: bool, block: int | None):
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        compute = _compute_dtype(q)
        bias = _causal_bias(starts, compute, q.device)
        with torch.autocast(q.device.type, enabled=False):
            qc, kc, vc = _cast(compute, q, k, v)
            out = torch.empty(batch, length, heads, dim, dtype=compute, device=q.device)  # the caller's layout
            probs = []
            for i, a, e, c, d in _pieces(starts, block):
                p = _segment_probs(_stacked(qc[i, :, a + c:a + d], kv_heads), kc[i, :, a:a + d], bias, c, scaling)
                out[i, a + c:a + d] = torch.matmul(p, vc[i, :, a:a + d]).view(heads, d - c, dim).transpose(0, 1)
                if keep_probs:
                    probs.append(p)
        ctx.save_for_backward(qc, kc, vc, *probs)
        ctx.starts, ctx.scaling, ctx.block, ctx.dtypes = starts, scaling, block, (q.dtype, k.dtype, v.dtype)
        return out.transpose(1, 2)  # (B, H, T, D), a view of (B, T, H, D)

    @staticmethod
    def backward(ctx, g):
        q, k, v, *probs = ctx.saved_tensors
        heads, dim, kv_heads = q.shape[1], q.shape[3], k.shape[1]
        groups = heads // kv_heads
        bias = None if probs else _causal_bias(ctx.starts, v.dtype, q.device)
        g = g.to(v.dtype)
        # A sequence's last block attends to all its keys and writes dk and dv; its earlier blocks add their parts
        # to the first keys, in fp32 where the compute dtype is narrower, so that they round once at the end, as a
        # sequence's queries at once do. Without blocks, nothing is added: the node's previous bits.
        pieces = _pieces(ctx.starts, ctx.block)
        blocked = any(c > 0 for *_, c, _ in pieces)
        wide = torch.float32 if blocked and v.dtype in (torch.bfloat16, torch.float16) else v.dtype
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k, dtype=wide), torch.empty_like(v, dtype=wide)
        for s in reversed(range(len(pieces))):
            i, a, e, c, d = pieces[s]
            n = d - c
            qs, go = _stacked(q[i, :, a + c:a + d], kv_heads), _stacked(g[i, :, a + c:a + d], kv_heads)
            ks, vs = k[i, :, a:a + d], v[i, :, a:a + d]
            p = probs[s] if probs else _segment_probs(qs, ks, bias, c, ctx.scaling)
            put = torch.Tensor.copy_ if d == e - a else torch.Tensor.add_
            put(dv[i, :, a:a + d], p.transpose(-1, -2) @ go)  # sums over the query heads that share a key head
            dp = go @ vs.transpose(-1, -2)
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype).mul_(ctx.scaling)
            del dp, p
            dq[i, :, a + c:a + d] = (ds @ ks).view(kv_heads, groups, n, dim).flatten(0, 1)
            put(dk[i, :, a:a + d], ds.transpose(-1, -2) @ qs)
        return dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), dv.to(ctx.dtypes[2]), None, None, None, None


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[list[int]],
                     scaling: float, keep_probs: bool = False, block: int | None = QUERY_BLOCK) -> torch.Tensor:
    """Causal attention within each sequence of packed rows, the same as attention() with the block-diagonal causal
    mask, but run sequence by sequence in one autograd node: no (T, T) mask or scores for the whole row, and the
    gradients are written into one tensor each (autograd through slices would add a zero-filled full-size gradient
    per sequence). A sequence longer than two blocks has its queries go in blocks of `block` positions, each against
    the keys up to its own end only (None: all at once, against all the sequence's keys): the scores above the
    diagonal are not computed, and a block's scores stay in the CPU's cache. The backward recomputes each block's
    probabilities from the saved q and k; keep_probs=True keeps them from the forward instead (up to Σ Lᵢ² per row
    and head, less in blocks: the same results, more memory; bench/train.py's lf-keepprobs). q (B, H, T, D); k, v
    (B, Hkv, T, D); starts from segment_starts. Returns (B, H, T, D)."""
    if q.shape[2] != k.shape[2]:
        raise ValueError("packed_attention: queries and keys must cover the same positions (no cache)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"packed_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value "
                         f"heads")
    if block is not None and block < 1:
        raise ValueError(f"packed_attention: block must be a positive number of positions or None, not {block}")
    return _PackedAttention.apply(q, k, v, starts, scaling, keep_probs, block)


class HeadBuffers:
    """The fused head's chunk of logits (rows × vocabulary, ~100 MB for 512 rows of a 49k vocabulary in fp32),
    held from one call of linear_cross_entropy to the next. A fresh block that large was faulted in page by page at
    every step (glibc maps it on its own by default; with training.reuse_memory the heap still had no free run that
    long at the head's turn): one profiled bf16 step of packed rows (bench/profile_train.py --by-shape) had the first
    chunk's product at 310 ms and its two conversions at 296 ms, the second chunk, reusing them, 158 ms and too
    little to list; held, 171 ms and ~20 ms. The buffers live as long as this object (CausalLMLoss holds one for a
    run); they only ever hold one chunk's scratch values, never a result."""

    def __init__(self):
        self._held: dict[tuple, torch.Tensor] = {}

    def take(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised (rows, vocab) buffer of this dtype and device, the held one when it is large enough."""
        key = (dtype, torch.device(device), vocab)
        held = self._held.get(key)
        if held is None or held.shape[0] < rows:
            self._held.pop(key, None)  # the smaller one goes before the larger one is allocated
            held = self._held[key] = torch.empty(rows, vocab, dtype=dtype, device=device)
        return held[:rows]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, need_grad: bool, buffers: HeadBuffers | None):
        compute = _compute_dtype(hidden)
        n, vocab = hidden.shape[0], weight.shape[0]
        buffers = buffers or HeadBuffers()  # none held from call to call: this call's own
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = _cast(compute, hidden, weight)
            grad = torch.empty_like(h) if need_grad else None
            rows = max(1, min(chunk_size, n))  # n = 0 (no supervised token): a zero loss, zero gradients
            logits = buffers.take(rows, vocab, compute, h.device)  # reused by every chunk
            work = logits if compute == torch.float32 else buffers.take(rows, vocab, torch.float32, h.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, n, rows):
                m = min(rows, n - start)
                z, zf, y = logits[:m], work[:m], targets[start:start + m, None]
                torch.mm(h[start:start + m], w.T, out=z)
                if zf is not z:
                    zf.copy_(z)
                target_logit = zf.gather(1, y)
                top = zf.amax(1, keepdim=True)
                zf.sub_(top).exp_()
                sums = zf.sum(1, keepdim=True)
                total += (top + sums.log() - target_logit).sum()  # logsumexp - target logit
                if need_grad:
                    zf.div_(sums)  # softmax
                    zf.scatter_add_(1, y, torch.full_like(target_logit, -1.0))  # − onehot
                    if zf is not z:
                        z.copy_(zf)
                    torch.mm(z, w, out=grad[start:start + m])
        ctx.save_for_backward(grad)  # None without need_grad: then no backward can run
        ctx.dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype)).to(ctx.dtype), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 1024, buffers: HeadBuffers | None = None) -> torch.Tensor:
    """Σ cross_entropy(hidden Wᵀ, targets) (fp32 statistics) for a frozen bias-free head W (V, H); hidden (N, H),
    every target a class index (select supervised rows first). Gradient for hidden only. buffers: the chunk's
    logits buffers held from call to call (HeadBuffers); None: this call allocates its own."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy: the head weight trains; use F.cross_entropy on its logits instead")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be ≥ 1, got {chunk_size}")
    need_grad = torch.is_grad_enabled() and hidden.requires_grad  # evaluation: the loss alone
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, need_grad, buffers)
