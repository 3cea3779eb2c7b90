"""Greedy decoding on the static decoder: the same contract as loraforge.decoding.greedy (which calls this for
the models `Decoder` runs).

    per batch of prompts (sorted by length): the shared prefix once in row 0, copied into the other rows' slots ->
    each row's own tokens in one forward (right-padded) -> one token per running row per step, argmax over the
    whole batch in one op; finished rows leave (the rest move to the front of the cache).

`stream`: one prompt, each token handed on as it comes (`loraforge generate`).

A prompt and its continuation fit the model's context (models.context_length): `greedy` cuts each prompt's
max_new_tokens to the room left (one warning says how many), `stream` refuses a length that does not fit, and
neither allocates a cache slot past the context.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from loraforge.config import ConfigError
from loraforge.inference.llama import Decoder
from loraforge.models import context_length

MIN_SHARED_PREFIX = 8
"""Shorter common prefixes are recomputed per row: a separate forward costs more than it saves."""


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Each row's argmax of logits (B, V): the first of equal maxima, a NaN counted above everything (torch's rule).
    On a CPU through numpy, whose reduction is vectorised: (32, 49,152) fp32 in 0.15 ms against torch's 2.1 ms
    (2-core AMD EPYC); a server pays it every decode step."""
    if logits.device.type == "cpu":
        return logits.detach().float().numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


OVERFLOWED = "the forward overflowed, in the base or the adapter (an adapter's huge lora_alpha or weights?)"
"""Why logits are not finite where nothing narrower is known (in fp16: precision.overflow_fix)."""


def finite_choice(logits: torch.Tensor, token: int, when: str = "", fix: str = OVERFLOWED) -> int:
    """`token`, row (V,)'s argmax, if its logit is finite; else FloatingPointError: a NaN anywhere in the row is
    the argmax (counted above everything), and a NaN or an infinity there means the forward overflowed (an
    adapter's huge lora_alpha or weights, say) and the token means nothing. `when`: where, for the message;
    `fix`: why and what to change."""
    value = float(logits[token])
    if not math.isfinite(value):
        raise FloatingPointError(f"the model's logits are not finite (the greedy choice's is {value}){when}: {fix}")
    return token


def shared_prefix_len(prompts: list[list[int]]) -> int:
    """Leading tokens all prompts share, leaving each at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def new_token_limits(model: nn.Module, prompts: list[list[int]], max_new_tokens: int | list[int]) -> list[int]:
    """Each prompt's budget of new tokens: `max_new_tokens` (one for all, or one per prompt), cut to what the
    model's context leaves after the prompt; one warning says how many were cut. ValueError for a prompt that
    leaves no room at all (it would run on positions the model never saw, or past its position table)."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    context = context_length(model.config)
    if context is None:
        return limits
    for i, p in enumerate(prompts):
        if len(p) >= context:
            raise ValueError(f"prompt {i} takes {len(p)} tokens and the model's context is {context}: no new token "
                             f"fits after it; shorten it")
    cut = [min(limit, context - len(p)) for limit, p in zip(limits, prompts)]
    if short := sum(c < limit for c, limit in zip(cut, limits)):
        warnings.warn(f"max_new_tokens {max(limits)}: {short} of {len(prompts)} prompts reach the model's context of "
                      f"{context} tokens first (the longest prompt takes {max(len(p) for p in prompts)}); their "
                      f"continuations stop at the context", stacklevel=2)
    return cut


def check_fits(model: nn.Module, prompt_len: int, max_new_tokens: int, flag: str = "max_new_tokens") -> None:
    """ConfigError unless a prompt of `prompt_len` tokens and `max_new_tokens` after it fit the model's context;
    `flag`: the setting as the user types it (`loraforge generate`: --max-new-tokens, and the message is headed
    `invalid arguments:`)."""
    context = context_length(model.config)
    if context is None:
        return
    arguments = flag.startswith("--")
    if prompt_len >= context:
        raise ConfigError([f"the prompt takes {prompt_len} tokens and the model's context is {context}: no new "
                           f"token fits after it; shorten the prompt"], arguments=arguments)
    if prompt_len + max_new_tokens > context:
        raise ConfigError([f"{flag} {max_new_tokens}: the model's context is {context} tokens and the prompt takes "
                           f"{prompt_len}; at most {context - prompt_len} new tokens fit"], arguments=arguments)


@torch.no_grad()
def greedy(model: nn.Module, prompts: list[list[int]], stop: list[int], max_new_tokens: int | list[int] = 32,
           batch_size: int = 32, storage: str = "fp32", adapters: list[str | None] | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, the stop token included where one ended the row). `max_new_tokens`: one
    for all, or one per prompt; each cut to the model's context (new_token_limits). `adapters`: one adapter
    name (or None) per prompt; None: every prompt as the model is set."""
    limits = new_token_limits(model, prompts, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows = min(batch_size, len(prompts))
    decoder = Decoder(model, max_batch=rows, max_len=max(len(p) + n for p, n in zip(prompts, limits)),
                      storage=storage, adapters=None if adapters is None else [adapters[i] for i in order[:rows]])
    outputs: list[list[int]] = [[] for _ in prompts]
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        if adapters is not None:
            decoder.set_rows([adapters[i] for i in chunk])
        for i, out in zip(chunk, decode_batch(decoder, [prompts[i] for i in chunk], set(stop),
                                              [limits[i] for i in chunk])):
            outputs[i] = out
    return outputs


@torch.no_grad()
def stream(model: nn.Module, prompt: list[int], stop: list[int], max_new_tokens: int,
           on_token: Callable[[int], None], until: Callable[[], bool] = lambda: False) -> list[int]:
    """One prompt's greedy continuation, `on_token(token)` called as each token comes (a terminal's streamer);
    `until()`, asked after each, True ends it there (generate: its reader left). A prompt and max_new_tokens past
    the model's context are refused (check_fits)."""
    check_fits(model, len(prompt), max_new_tokens)
    decoder = Decoder(model, max_batch=1, max_len=len(prompt) + max_new_tokens)
    logits = decoder.forward(torch.tensor([prompt], device=decoder.device),
                             torch.zeros(1, dtype=torch.long, device=decoder.device))
    out: list[int] = []
    while True:
        token = finite_choice(logits[0], argmax_rows(logits)[0], f" after {len(out)} tokens")  # soak: "" and exit 0
        out.append(token)
        on_token(token)
        if token in stop or len(out) == max_new_tokens or until():
            return out
        logits = decoder.forward(torch.tensor([[token]], device=decoder.device),
                                 torch.tensor([len(prompt) + len(out) - 1], device=decoder.device))


def decode_batch(decoder: Decoder, prompts: list[list[int]], stop: set[int], limits: list[int]) -> list[list[int]]:
    """Greedy continuations of a batch that fits the decoder's cache (rows 0..n-1, adapters already set); row i
    stops after limits[i] new tokens."""
    n, device = len(prompts), decoder.device
    one_adapter = decoder.rows is None or len(set(decoder.rows)) == 1  # else the prefix's keys/values differ
    shared = shared_prefix_len(prompts) if n > 1 and one_adapter else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    if shared:  # the common prefix once, as row 0; the other rows read a copy of its keys/values
        decoder.forward(torch.tensor([prompts[0][:shared]], device=device), torch.zeros(1, dtype=torch.long,
                                                                                         device=device))
        decoder.copy_prefix(shared, n)
    width = max(len(p) for p in prompts) - shared
    ids = torch.zeros(n, width, dtype=torch.long)
    for row, p in enumerate(prompts):  # each row's own tokens from the left, right-padded
        ids[row, :len(p) - shared] = torch.tensor(p[shared:])
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # positions each row has
    logits = decoder.forward(ids.to(device), torch.full((n,), shared, device=device), lengths=lengths - shared)
    outputs: list[list[int]] = [[] for _ in prompts]
    running = list(range(n))  # prompt index of each cache row
    while True:
        tokens = argmax_rows(logits)  # each row's next token, the whole batch in one op
        keep = []
        for row, (i, token) in enumerate(zip(running, tokens)):
            outputs[i].append(token)
            if token not in stop and len(outputs[i]) < limits[i]:
                keep.append(row)
        if not keep:
            return outputs
        if len(keep) < len(running):  # finished rows leave; the rest move to the front of the cache
            decoder.keep_rows(keep)
            lengths = lengths.index_select(0, torch.tensor(keep, device=device))
            tokens = [tokens[row] for row in keep]
            running = [running[row] for row in keep]
        logits = decoder.forward(torch.tensor(tokens, device=device)[:, None], lengths)
        lengths = lengths + 1
