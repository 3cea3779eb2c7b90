"""Greedy decoding of many prompts at once, for evaluation: the work a held-out accuracy needs, and no more.

    sort prompts by length -> per batch: the prefix every row shares (a chat template's system prompt and user
    header) runs once, as one row, and its keys/values are shared -> the rest of each prompt in one forward
    (padding between prefix and prompt, masked) -> one token per step for the rows still running; a row that
    emits a stop token or reaches max_new_tokens leaves the batch at once.

`transformers`' generate keeps every row of a batch until the last one ends and recomputes the shared prefix
per row; on the demo's date prompts this does a third of its work. The KV-cache helpers (`select_rows`,
`left_pad`) are shared with the serving engine.

Llama-family models in fp32 run the same algorithm on loraforge.inference's static-cache decoder (a lean step
with no per-op modules, no cache concatenation); other models (and `static=False`) on transformers' forward.
On every path a prompt and its continuation stay within the model's context: each prompt's max_new_tokens is cut
to the room its prompt leaves, with one warning (inference.greedy.new_token_limits).
"""

from __future__ import annotations


import torch

from loraforge.inference.greedy import MIN_SHARED_PREFIX, argmax_rows, new_token_limits, shared_prefix_len
from loraforge.inference.greedy import greedy as static_greedy
from loraforge.inference.llama import unsupported
from loraforge.precision import autocast
from loraforge.utils.hf import cache_argument
from loraforge.utils.weakcache import per_object


TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # ChatML, Llama 3, Phi-3, Gemma
TURN_PROBE = "Fine, thanks."  # an assistant turn rendered to find the text its template writes after it


def stop_ids(tokenizer, model=None) -> list[int]:
    """The token ids that end a reply: the tokenizer's eos, the model's generation_config eos_token_id (an int or a
    list: Llama 3's [128001, 128009], Gemma's [1, 107]), the token the chat template ends an assistant turn with,
    and the end-of-turn tokens the tokenizer knows by name. generate, eval and serve stop at the same set (soak:
    generate and eval ran past Gemma's <end_of_turn>, listed only in its generation_config; serve ran past
    <|im_end|> where the generation_config named only <|endoftext|>)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    return sorted(set(_tokenizer_stops(tokenizer)) | set([eos] if isinstance(eos, int) else eos or []))


@per_object
def _tokenizer_stops(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, _turn_end(tokenizer)}
    for token in TURN_ENDS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@per_object
def turn_end_text(tokenizer) -> str | None:
    """The text of the token the chat template ends an assistant turn with (_turn_end: Llama 3's "<|eot_id|>",
    Gemma's "<end_of_turn>"); None without a template or where it writes none."""
    turn_end = _turn_end(tokenizer)
    return None if turn_end is None else tokenizer.decode([turn_end])


def _turn_end(tokenizer) -> int | None:
    """The special or added token the chat template writes right after an assistant turn's text (Gemma's
    <end_of_turn>, Phi-3's <|end|>, Llama 2's </s>); None without a template or where it writes none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # noqa: BLE001 -- a template that refuses this conversation: no end of turn learnt from it
        return None
    if TURN_PROBE not in text:
        return None
    after = text[text.rindex(TURN_PROBE) + len(TURN_PROBE):].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    added = set(getattr(tokenizer, "all_special_ids", ()) or ()) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in added else None


class FiniteLogits:
    """A transformers logits processor (generate's `logits_processor=[...]`) that raises FloatingPointError where
    a row's logits hold no finite value or a NaN: an overflowed forward, whose greedy token (NaN counts above
    everything: token 0, often the end of text) or sampled one means nothing. `fix`: what to change, for the
    message (precision.overflow_fix). Soak: fp16 generate printed an empty answer and exited 0, or sampled into
    torch.multinomial's traceback."""

    def __init__(self, fix: str):
        self.fix, self.steps = fix, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = scores.isnan().any(-1) | ~torch.isfinite(scores).any(-1)  # (B,): a row whose choice means nothing
        if bool(bad.any()):
            raise FloatingPointError(f"the model's logits are not finite after {self.steps} tokens: {self.fix}")
        self.steps += 1
        return scores


class Until:
    """A transformers stopping criterion (generate's `stopping_criteria=[...]`) that ends every row once `done()`
    is True: `loraforge generate ... | head -c 10` generated on to --max-new-tokens after its reader had left."""

    def __init__(self, done):
        self.done = done

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.done()), dtype=torch.bool, device=input_ids.device)


def select_rows(cache, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep rows `index` of a left-padded cache (in place) and of its mask, dropping the columns that are padding
    in every row left; returns the new mask."""
    mask = mask.index_select(0, index)
    start = int((mask.sum(0) > 0).nonzero()[0])  # the first column some row still uses
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return mask[:, start:]


def left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros on the left of `dim` up to `width` (KV: (B, H, L, D) along L; mask: (B, L) along L)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


@torch.no_grad()
def greedy(model, prompts: list[list[int]], stop: list[int], max_new_tokens: int = 32, batch_size: int = 32,
           precision: str = "fp32", static: bool = True) -> list[list[int]]:
    """Greedy continuations (token ids, the stop token included where one ended the row) of token-id prompts.

    static: decode Llama-family fp32 models with loraforge.inference's preallocated-cache decoder (the same
    tokens, tested; faster, bench/decode.py); models it does not run, and False, use transformers' forward.
    A prompt's continuation stops where it reaches the model's context (one warning for all the prompts cut so); a
    prompt that fills the context is refused."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if any(not p for p in prompts):
        raise ValueError("an empty prompt cannot be continued: give every prompt at least one token")
    limits = new_token_limits(model, prompts, max_new_tokens)
    weight = next(model.parameters())
    if static and precision == "fp32" and weight.dtype == torch.float32 and unsupported(model) is None:
        return static_greedy(model, prompts, stop, limits, batch_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    outputs: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with autocast(precision, device.type):
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                for i, out in zip(chunk, _greedy_batch(model, [prompts[i] for i in chunk], set(stop),
                                                       [limits[i] for i in chunk], device)):
                    outputs[i] = out
    finally:
        model.train(was_training)
    return outputs


def _greedy_batch(model, prompts: list[list[int]], stop: set[int], limits: list[int],
                  device: torch.device) -> list[list[int]]:
    """One batch's continuations; row i stops after limits[i] new tokens."""
    from transformers import DynamicCache

    n = len(prompts)
    cache = DynamicCache(config=model.config)
    kv = cache_argument(type(model)) or "past_key_values"
    if any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):  # sliding windows: theirs
        results: list[list[int]] = [[] for _ in prompts]
        for limit in sorted(set(limits)):  # the rows of one limit together: no row runs past the context
            rows = [i for i, row_limit in enumerate(limits) if row_limit == limit]
            for i, out in zip(rows, _hf_generate(model, [prompts[i] for i in rows], stop, limit, device)):
                results[i] = out
        return results
    shared = shared_prefix_len(prompts) if n > 1 else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    if shared:  # the common prefix once, as one row; every row then reads its keys/values
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True, logits_to_keep=1,
              **{kv: cache})
        for layer in cache.layers:
            layer.keys = layer.keys.expand(n, -1, -1, -1).contiguous()
            layer.values = layer.values.expand(n, -1, -1, -1).contiguous()
    width = max(len(p) for p in prompts) - shared
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, shared + width, dtype=torch.long)
    mask[:, :shared] = 1
    for row, p in enumerate(prompts):  # (n, width): each row's own tokens at the right, padding between
        own = p[shared:]
        ids[row, width - len(own):] = torch.tensor(own)
        mask[row, shared + width - len(own):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    # the last position by an index tensor: logits_to_keep=1's slice (n, 1, hidden) is not contiguous and sends the
    # head's matmul to bmm over its weight expanded per row (in bf16 a copy of the weight per row)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions[:, shared:], use_cache=True,
                   logits_to_keep=torch.tensor([width - 1], device=device), **{kv: cache}).logits[:, -1]
    pad = (mask[:, shared:] == 0)[:, None, :, None]
    if bool(pad.any()):  # the padding's keys/values are never attended; zeros, never NaN
        for layer in cache.layers:
            layer.keys[:, :, shared:].masked_fill_(pad, 0)
            layer.values[:, :, shared:].masked_fill_(pad, 0)
    outputs: list[list[int]] = [[] for _ in prompts]
    running = list(range(n))  # prompt index of each batch row
    length = mask.sum(1)  # (rows,) positions each row has
    while True:
        tokens = argmax_rows(logits)
        keep = []
        for row, (i, token) in enumerate(zip(running, tokens)):
            outputs[i].append(token)
            if token not in stop and len(outputs[i]) < limits[i]:
                keep.append(row)
        if not keep:
            return outputs
        if len(keep) < len(running):  # finished rows leave the batch
            index = torch.tensor(keep, device=device)
            mask = select_rows(cache, mask, index)
            length = length.index_select(0, index)
            running = [running[row] for row in keep]
            tokens = [tokens[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones(len(running), 1)], 1)
        logits = model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                       position_ids=length[:, None], use_cache=True, **{kv: cache}).logits[:, -1]
        length = length + 1


def _hf_generate(model, prompts: list[list[int]], stop: set[int], max_new_tokens: int,
                 device: torch.device) -> list[list[int]]:
    """transformers' generate, for caches this module does not batch (sliding-window layers)."""
    width = max(len(p) for p in prompts)
    pad = next(iter(stop))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stop))
    results = []
    for row in out[:, width:].tolist():
        ended = next((k for k, t in enumerate(row) if t in stop), None)
        results.append(row if ended is None else row[:ended + 1])
    return results
