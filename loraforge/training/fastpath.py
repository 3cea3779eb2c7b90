"""Install loraforge.kernels into a transformers model for training: leaner RMSNorm, SwiGLU MLP and attention.

    install(model)               RMSNorm and the SwiGLU MLP of Llama-family models (Llama, Mistral, Qwen2, ... : any
                                 class whose forward is Llama's, line for line) run as kernels.rms_norm and
                                 kernels.swiglu_linear. The module's class is swapped for a subclass that only
                                 overrides forward: weights, names and state dicts are untouched.
    register_attention()         makes "lean" a transformers attention implementation (kernels.attention with
                                 eager attention's masks): model.set_attn_implementation("lean"). Packed rows
                                 (position ids that restart, the mask block-diagonal causal) run sequence by
                                 sequence (kernels.packed_attention); "lean_masked" runs them with the whole (T, T)
                                 mask instead (what bench/train.py's lf-noseg measures), "lean_keep" keeps the
                                 probabilities for the backward instead of recomputing them (lf-keepprobs),
                                 "lean_whole" runs each packed sequence's queries at once instead of in blocks
                                 (kernels.QUERY_BLOCK; lf-wholeseq).

Same math as the modules they replace (tests/training/test_kernels.py); what they save for the backward is smaller:
bench/train.py measures it.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loraforge import kernels as K
from loraforge.lora.layer import LoraLinear

LEAN_ATTENTION = "lean"
LEAN_MASKED_ATTENTION = "lean_masked"
LEAN_KEEP_ATTENTION = "lean_keep"
LEAN_WHOLE_ATTENTION = "lean_whole"
LEAN_MAX_LENGTH = 512  # the longest sequence lean attention runs; longer ones (unless packed shorter) go to SDPA
# Unpacked rows up to this many key positions keep their attention probabilities for the backward; longer ones
# recompute them. Per token the probabilities take heads × positions × 4 bytes a layer, SmolLM2's other kept
# activations ~5,800 × 4: at 256 positions they are 40% of those and growing. Recomputing cost the demo's rows
# (~80 tokens) ~5% of their speed and saved nothing of its peak (2329 against 2322 MiB); on chat rows of ~210
# tokens, unpacked, 7% for 12% (bench/train.py --variants lf-nopack,lf-nopack-keepprobs). Packed rows always
# recompute (kernels.packed_attention).
KEEP_PROBS_MAX_LENGTH = 256


def _source(fn) -> str | None:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return None


@functools.cache
def _llama_sources() -> tuple[str | None, str | None]:
    from transformers.models.llama import modeling_llama as llama

    return _source(llama.LlamaRMSNorm.forward), _source(llama.LlamaMLP.forward)


class _LeanRMSNorm:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        keep = True if self.weight.requires_grad else self._lean_has_zero  # trainable: keep x, the safe choice
        return K.rms_norm(hidden_states, self.weight, self.variance_epsilon, keep_input=keep)


class _LeanMLP:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        down = _frozen_linear(self.down_proj)
        if down is None:  # a down projection the kernel does not run (4-bit, DoRA, dropout, trainable)
            return self.down_proj(self.act_fn(gate) * up)
        return K.swiglu_linear(gate, up, *down)


def _frozen_linear(module: nn.Module):
    """(weight, bias, lora_A, lora_B, scaling) of a frozen nn.Linear, bare or with one plain LoRA adapter; else None."""
    if isinstance(module, LoraLinear):
        name = module._fusable()
        if name is None:
            return None
        base = module.base_layer
        lora = (module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name])
    elif type(module) is nn.Linear:
        base, lora = module, (None, None, 1.0)
    else:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return (base.weight, base.bias, *lora)


_LEAN_CLASSES: dict[type, type] = {}


def _swap(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if cls not in _LEAN_CLASSES:
        _LEAN_CLASSES[cls] = type(f"Lean{cls.__name__}", (mixin, cls), {"__module__": __name__})
    module.__class__ = _LEAN_CLASSES[cls]


def install(model: nn.Module) -> dict[str, int]:
    """Swap in the lean RMSNorm and SwiGLU MLP where a module is Llama's; returns how many of each."""
    norm_src, mlp_src = _llama_sources()
    counts = {"rms_norm": 0, "mlp": 0}
    for module in model.modules():
        cls = type(module)
        if cls in _LEAN_CLASSES.values():
            continue
        src = _source(cls.forward)
        if src is None:
            continue
        if src == norm_src and hasattr(module, "variance_epsilon"):
            module._lean_has_zero = bool((module.weight == 0).any())  # then y / w cannot give back x · rstd
            _swap(module, _LeanRMSNorm)
            counts["rms_norm"] += 1
        elif src == mlp_src and _is_silu(getattr(module, "act_fn", None)):
            _swap(module, _LeanMLP)
            counts["mlp"] += 1
    return counts


def uninstall(model: nn.Module) -> None:
    """Give every swapped module its original class back."""
    for module in model.modules():
        if type(module) in _LEAN_CLASSES.values():
            module.__class__ = type(module).__mro__[2]  # (Lean…, mixin, original, …)


def _is_silu(act) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, (nn.SiLU, SiLUActivation))


def lean_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                           by_sequence: bool = True, keep_probs: bool = False, block: int | None = K.QUERY_BLOCK,
                           **kwargs):
    """A transformers attention function (the signature of eager_attention_forward) running kernels.attention;
    packed rows sequence by sequence (kernels.packed_attention, queries in blocks of `block`) unless by_sequence is
    False. The backward
    recomputes the probabilities, except for unpacked rows up to KEEP_PROBS_MAX_LENGTH or where keep_probs is True.
    Rows longer than LEAN_MAX_LENGTH go to transformers' SDPA, unless packed of sequences no longer than it (whose
    attention is Σ Lᵢ², not T²); by_sequence=False (the whole-row-mask ablation) keeps every row here."""
    if torch.compiler.is_compiling():  # training.compile: run eagerly (_uncompiled), outside the graph
        return _uncompiled(module, query, key, value, attention_mask, scaling, dropout, by_sequence, keep_probs,
                           block, **kwargs)
    if kwargs.get("softcap") is not None:  # SDPA refuses soft-capped scores: the model's own eager attention
        eager = next(f for c in type(module).__mro__  # the modeling file of its transformers class
                     if (f := getattr(sys.modules.get(c.__module__), "eager_attention_forward", None)))
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if (dropout and module.training) or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    length, kv_length = query.shape[2], key.shape[2]
    starts = _packed_starts(attention_mask, kwargs.get("position_ids"), length, kv_length) if by_sequence else None
    if runs_by_sequence(starts):
        out = K.packed_attention(query, key, value, starts, scaling, keep_probs, block)
        return out.transpose(1, 2).contiguous(), None
    if by_sequence and kv_length > LEAN_MAX_LENGTH:  # T² scores at once would cost more than SDPA's tiles
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if attention_mask is None and length > 1 and getattr(module, "is_causal", True):  # True: attend
        attention_mask = torch.ones(length, kv_length, dtype=torch.bool, device=query.device).tril(kv_length - length)
    elif attention_mask is not None:
        attention_mask = attention_mask[..., :kv_length]
    keep = keep_probs or kv_length <= KEEP_PROBS_MAX_LENGTH
    out = K.attention(query, key, value, attention_mask, scaling, keep)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None


def runs_by_sequence(starts: list[list[int]] | None) -> bool:
    """Whether lean attention runs packed rows with these sequence starts (kernels.segment_starts) sequence by
    sequence: packed of sequences up to LEAN_MAX_LENGTH (bench/train.py counts its FLOPs by the same rule)."""
    return starts is not None and K.longest_sequence(starts) <= LEAN_MAX_LENGTH


def joins_rows(attention: str, max_seq_len: int) -> bool:
    """Whether a run's packed rows are joined before collating (data.join_rows: no padding between them): where
    its attention ("lean", "lean_keep" or "lean_whole") runs every packed sequence on its own, as all of them are up
    to LEAN_MAX_LENGTH, so a joined row costs attention no more than its rows did. Others attend over whole rows:
    T² of the joined row."""
    return attention in (LEAN_ATTENTION, LEAN_KEEP_ATTENTION, LEAN_WHOLE_ATTENTION) and max_seq_len <= LEAN_MAX_LENGTH


# Under training.compile lean attention runs eagerly: its loop over a batch's sequence starts (read from the position
# ids) would be a graph break with dynamo's warning and a compile for each batch's starts. Eager calls skip the
# wrapper.
_uncompiled = torch.compiler.disable(lean_attention_forward)

_last_check: tuple = (None, None, None)  # (mask, position ids) as weak references, and their sequence starts


def _packed_starts(mask: torch.Tensor | None, position_ids: torch.Tensor | None, length: int, kv_length: int):
    """The sequence starts of packed rows (kernels.segment_starts) when the mask is exactly their block-diagonal
    causal mask (then attention within each sequence is the same math); else None. Every layer gets the same mask
    and position ids, so the answer is kept for them."""
    global _last_check
    if mask is None or position_ids is None or length != kv_length or length < 2 or position_ids.dim() != 2:
        return None
    mask_ref, pos_ref, starts = _last_check
    if mask_ref is not None and mask_ref() is mask and pos_ref() is position_ids:
        return starts
    starts = K.segment_starts(position_ids)
    if starts is not None:
        allowed = mask[:, 0, :, :kv_length] if mask.dtype == torch.bool else mask[:, 0, :, :kv_length] == 0
        seq = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)  # (B, T)
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        blocks = (seq[:, :, None] == seq[:, None, :]) & causal  # (B, T, T)
        if allowed.shape[-2:] != blocks.shape[-2:] or not torch.equal(allowed.expand_as(blocks), blocks):
            starts = None
    _last_check = (weakref.ref(mask), weakref.ref(position_ids), starts)
    return starts


@functools.cache
def register_attention() -> str:
    """Register the "lean", "lean_masked", "lean_keep" and "lean_whole" attention implementations with transformers
    (once);
    returns "lean"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(LEAN_ATTENTION, lean_attention_forward)
    AttentionMaskInterface.register(LEAN_ATTENTION, eager_mask)
    AttentionInterface.register(LEAN_MASKED_ATTENTION, functools.partial(lean_attention_forward, by_sequence=False))
    AttentionMaskInterface.register(LEAN_MASKED_ATTENTION, eager_mask)
    AttentionInterface.register(LEAN_KEEP_ATTENTION, functools.partial(lean_attention_forward, keep_probs=True))
    AttentionMaskInterface.register(LEAN_KEEP_ATTENTION, eager_mask)
    AttentionInterface.register(LEAN_WHOLE_ATTENTION, functools.partial(lean_attention_forward, block=None))
    AttentionMaskInterface.register(LEAN_WHOLE_ATTENTION, eager_mask)
    return LEAN_ATTENTION
