"""The training loss: summed token cross-entropy over supervised positions only.

The output head runs only on positions that have a target (label ≠ -100 after the shift): prompt tokens and
padding never become full-vocabulary logits (49,152 × tokens for SmolLM2), which saves the head's compute and
its fp32 logits memory. A frozen plain linear head (LoRA's case) runs fused with the cross-entropy in row chunks
(loraforge.kernels.linear_cross_entropy): no full-vocabulary tensor is kept for the backward pass, and the chunk's
buffer (~200 MB for SmolLM2 in fp32) is held from step to step (kernels.HeadBuffers) instead of being mapped and
faulted in afresh each time; evaluation during training uses the same one.
The sum (not the mean) is returned with the token count, so the loop can divide by the
number of supervised tokens in the whole optimizer step (all micro-batches, all processes).

A shared prefix is computed once. When every row of a padded batch starts with the same tokens and no target lies
in them (a chat template's system prompt and user header: 38 of the 68 tokens of a demo batch), the backbone runs
that prefix as one row, repeats its keys and values for the batch (transformers' DynamicCache), and runs only the
rest of each row on top of them. Causal attention makes the prefix's states the same in every row, and autograd sums
the rows' gradients through the repeat, so loss and gradients are the plain path's (fp32: equal to ~1e-6;
tests/training/test_loss.py) in fewer FLOPs. It is skipped where it would change the math (dropout in training: the rows
would share one mask on the prefix; sliding-window caches; gradient checkpointing in a transformers too old to
keep a cache in a checkpointed layer), for packed rows, and under torch.compile.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.utils.hf import cache_argument
from loraforge.kernels import HeadBuffers, linear_cross_entropy

IGNORE = -100
HEAD_CHUNK = 512
"""Rows of logits the loss computes at once (CausalLMLoss.chunk_size): the fused head holds one chunk's logits from
step to step (512 × SmolLM2's 49,152-token vocabulary: 100 MB in fp32). Against 1,024 rows, packed 512-token text
in bench/train.py (--variants peft,lf,lf-head1024 --dtypes fp32,bf16 --rounds 3, a 2-core Zen 5 EPYC) peaked
lower at the same speed: docs/PERFORMANCE.md, "Memory on CPU"."""
MIN_SHARED_TOKENS = 64
"""(rows − 1) × prefix length below which the prefix is not shared: its own pass costs about as much as that."""


class CausalLMLoss(nn.Module):
    """forward(batch) -> (sum of token losses, number of supervised tokens). Wrap this module in DDP."""

    def __init__(self, model: nn.Module, chunk_size: int = HEAD_CHUNK, fused_head: bool = True,
                 share_prefix: bool = True, head_buffers: HeadBuffers | None = None):
        super().__init__()
        if chunk_size < 1:  # both head paths step through the rows by it
            raise ValueError(f"CausalLMLoss: chunk_size must be ≥ 1, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size  # rows of logits computed at once: bounds the logits memory
        self.fused_head = fused_head  # False: the head under autograd (what bench/train.py's lf-plainhead measures)
        self.share_prefix = share_prefix  # False: every row computes its whole prefix (bench/train.py's lf-noprefix)
        # the fused head's logits chunk, held from step to step (given: shared, as evaluation shares training's);
        # set to None, every call allocates its own (bench/train.py's lf-freshhead; under torch.compile)
        self.head_buffers: HeadBuffers | None = HeadBuffers() if head_buffers is None else head_buffers

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets = labels[:, 1:]  # position t predicts token t+1
        keep = targets != IGNORE  # (B, T-1)
        n_tokens = keep.sum()
        backbone, head = split_head(self.model)
        if backbone is None:  # a model we cannot split: full logits, then select
            logits = self.model(**inputs, use_cache=False).logits[:, :-1][keep]
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), n_tokens
        prefix, cache = self._sharing(batch, backbone)
        if prefix:  # no target lies in the prefix: only the states after it are needed
            states = _shared_forward(backbone, inputs, prefix, cache)
            keep, targets = keep[:, prefix:], targets[:, prefix:]
        else:
            states = backbone(**inputs, use_cache=False).last_hidden_state
        hidden = states[:, :-1][keep]  # (N, H)
        y = targets[keep]  # (N,)
        if self.fused_head and type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
            return linear_cross_entropy(hidden, head.weight, y, self.chunk_size, self.head_buffers), n_tokens
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.chunk_size):
            logits = head(hidden[start:start + self.chunk_size]).float()  # (n, V)
            total = total + F.cross_entropy(logits, y[start:start + self.chunk_size], reduction="sum")
        return total, n_tokens

    def prefix_to_share(self, batch: dict[str, torch.Tensor]) -> int:
        """How many leading tokens of this batch forward() computes once for all rows (0: none)."""
        backbone, _ = split_head(self.model)
        return 0 if backbone is None else self._sharing(batch, backbone)[0]

    def _sharing(self, batch: dict[str, torch.Tensor], backbone: nn.Module):
        """(prefix length, the empty cache its keys and values go into), or (0, None): every row runs in full."""
        if not self.share_prefix or torch.compiler.is_compiling():  # compiled: reading P is a graph break
            return 0, None
        prefix = shared_prefix(batch)
        if (batch["input_ids"].shape[0] - 1) * prefix < MIN_SHARED_TOKENS or not _can_share(self.model, batch):
            return 0, None
        cache = prefix_cache(backbone)
        return (prefix, cache) if cache is not None else (0, None)


def shares_prefix(setting: bool | str, device: torch.device) -> bool:
    """training.share_prefix resolved: "auto" shares on CPU only (see TrainingConfig.share_prefix)."""
    return device.type == "cpu" if setting == "auto" else bool(setting)


def split_head(model: nn.Module):
    """(decoder backbone, output head) of a transformers causal LM, or (None, None) when not splittable."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None, None  # the head is more than one linear layer
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        return None, None
    return backbone, head


def shared_prefix(batch: dict[str, torch.Tensor]) -> int:
    """Length P of the prefix that every row of a padded batch shares (the same real tokens) and whose states feed
    no target (labels[:, 1:P+1] all ignored), at most T − 1; 0 for a packed batch (position_ids) or a single row."""
    ids = batch["input_ids"]
    if ids.shape[0] < 2 or "position_ids" in batch:
        return 0
    ok = (ids == ids[:1]).all(0)[:-1] & (batch["labels"][:, 1:] == IGNORE).all(0)  # (T-1,): position t → label t+1
    if batch.get("attention_mask") is not None:
        ok &= batch["attention_mask"].bool().all(0)[:-1]
    return int(ok.long().cumprod(0).sum())


def _can_share(model: nn.Module, batch: dict) -> bool:
    """False where sharing the prefix would change the math (see the module docstring)."""
    if set(batch) - {"input_ids", "attention_mask", "labels"}:
        return False
    if model.training and torch.is_grad_enabled():
        config = getattr(model, "config", None)
        if any(getattr(config, name, 0) for name in _DROPOUT_CONFIG):
            return False
        modules = list(model.modules())
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in modules):
            return False
        checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in modules)
        if checkpointing and not any(_checkpointed_layer(m) for m in modules):
            return False  # checkpointing that drops the cache (an older transformers), with no way around it
    return True


def _checkpointed_layer(m: nn.Module) -> bool:
    """A transformers layer that checkpoints itself and can be told to keep a cache (_can_checkpoint_with_cache)."""
    return getattr(m, "gradient_checkpointing", False) is True and hasattr(m, "_can_checkpoint_with_cache")


_DROPOUT_CONFIG = ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                   "hidden_dropout_prob", "attention_probs_dropout_prob",
                   # functional dropout and LayerDrop that no nn.Dropout module shows: OPT's (0.1 in its released
                   # configs), XGLM's, GPT-Neo's, MPT's
                   "dropout", "activation_dropout", "layerdrop", "embed_dropout", "resid_dropout", "emb_pdrop")


def prefix_cache(backbone: nn.Module):
    """An empty transformers DynamicCache for the backbone, or None where it cannot take one or its layers are not
    plain (sliding windows would drop keys)."""
    if cache_argument(type(backbone)) is None:
        return None
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=backbone.config)
        plain = all(type(layer) is DynamicLayer for layer in cache.layers)
    except (ImportError, TypeError, AttributeError):  # an older transformers, a backbone without a config
        return None
    return cache if plain else None


def _shared_forward(backbone: nn.Module, inputs: dict, start: int, cache) -> torch.Tensor:
    """The backbone's last hidden states at positions start.. of every row; the first `start` tokens (the same in
    every row) run once, as one row, and every row attends to their keys and values.

    Under gradient checkpointing the prefix (one short row) runs without it, and the rest runs with the prefix's
    keys and values in a read-only cache: a checkpointed layer recomputes its forward in the backward pass, and
    a cache it wrote to would grow a second time. transformers lets a layer keep a read-only cache
    (_can_checkpoint_with_cache)."""
    name, ids = cache_argument(type(backbone)), inputs["input_ids"]
    checkpointed = [m for m in backbone.modules() if _checkpointed_layer(m)]
    # the cache is passed in, so the layers use it either way; a checkpointing model turns use_cache=True off itself,
    # with a warning that would tell the user caching was dropped: ask for what it would do
    use_cache = not (checkpointed and getattr(backbone, "gradient_checkpointing", False))
    try:
        for m in checkpointed:
            m.gradient_checkpointing = False
        backbone(input_ids=ids[:1, :start], use_cache=use_cache, **{name: cache})
        for m in checkpointed:
            m.gradient_checkpointing, m._can_checkpoint_with_cache = True, True
        cache.batch_repeat_interleave(ids.shape[0])  # autograd sums the rows' gradients back into the one prefix
        for layer in cache.layers:
            layer.__class__ = _read_only_layer()
        rest = backbone(input_ids=ids[:, start:], attention_mask=inputs.get("attention_mask"), use_cache=use_cache,
                        **{name: cache})
    finally:
        for m in checkpointed:
            m.gradient_checkpointing = True
            m.__dict__.pop("_can_checkpoint_with_cache", None)  # back to the class's own
    return rest.last_hidden_state


@functools.cache
def _read_only_layer() -> type:
    from transformers.cache_utils import DynamicLayer

    class ReadOnlyLayer(DynamicLayer):
        """A cache layer that returns its keys and values with the new ones appended, and keeps none of them."""

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return ReadOnlyLayer
