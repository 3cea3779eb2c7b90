"""General-ability probes for measuring forgetting: multiple-choice accuracy, perplexity, and next-token KL.

The probe data ships in `loraforge/assets/` (written for this project) and is read with `load_probe`.
Every scorer runs under `torch.no_grad`, batches right-padded sequences with an attention mask, works with any
Hugging Face causal LM (fp32 or bf16), and does its log-softmax in fp32. On a transformers causal LM whose head is
one linear layer, the head runs only on the positions that are scored (the multiple-choice options' tokens, the
text's targets): a full-vocabulary row (49,152 for SmolLM2) per position is most of a short sequence's cost.

A "model" argument is either an `nn.Module` (called as `model(input_ids=..., attention_mask=...).logits`) or a
plain callable `(input_ids, attention_mask) -> logits` of shape (B, T, V). The callable form lets one module serve
as both base and tuned model, e.g. a LoRA model with its adapters switched off inside the callable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib import resources

import torch
import torch.nn.functional as F

from loraforge.config import ConfigError
from loraforge.models import context_length
from loraforge.utils.hf import cache_argument
from loraforge.training.evaluate import perplexity_of, wilson_interval
from loraforge.training.loss import prefix_cache, split_head

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PROBE_FILES = {"mc": "general_mc.jsonl", "text": "general_text.txt", "kl": "general_prompts.jsonl"}


def check_probes(probe: Sequence[str], adapter: str | None) -> None:
    """ConfigError, before any model or data loads, for an unknown probe name, or for kl asked alone without an
    adapter (KL compares the model with and without it: without one there is nothing to measure). kl among others
    without an adapter is no error: those run, and kl's line says it needs one."""
    unknown = set(probe) - set(PROBE_FILES)
    if unknown:
        raise ConfigError([f"--probe: unknown probe(s) {sorted(unknown)}; use mc, text and/or kl"])
    if set(probe) == {"kl"} and not adapter:
        raise ConfigError(["--probe kl: needs --adapter (KL compares the model with and without it; without one "
                           "the model is the base and KL is 0)"])


def load_probe(name: str):
    """The shipped probe data: "mc" -> list of question dicts, "text" -> str, "kl" -> list of prompt strings."""
    if name not in PROBE_FILES:
        raise ValueError(f"unknown probe {name!r}; use one of {sorted(PROBE_FILES)}")
    text = resources.files("loraforge").joinpath("assets", PROBE_FILES[name]).read_text(encoding="utf-8")
    if name == "text":
        return text
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows if name == "mc" else [row["prompt"] for row in rows]


def _logits_fn(model) -> LogitsFn:
    if isinstance(model, torch.nn.Module):
        return lambda input_ids, attention_mask: model(input_ids=input_ids, attention_mask=attention_mask).logits
    if callable(model):
        return model
    raise TypeError(f"expected an nn.Module or a callable (input_ids, attention_mask) -> logits, got {type(model)}")


def prefix_sharing_logits(model) -> LogitsFn:
    """`model` as a logits callable (input_ids, attention_mask) -> (B, T, V) for right-padded batches that computes
    the leading tokens every row shares (a chat template's system prompt: 24 of the 39 tokens of a KL prompt on
    average) once, as one row, and the rest of every row on top of its keys and values. Causal attention makes the
    shared positions' states the same in every row, so the logits are the plain forward's up to float reordering
    (tests/studies/test_probes.py). A model the split does not cover (or a callable) is called as it is."""
    split = _head_split(model)
    if split is None:
        return _logits_fn(model)
    backbone, head = split
    cache_name = cache_argument(type(backbone))

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = input_ids.shape[0]
        same = ((input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)).long().cumprod(0)  # (T,)
        prefix = min(int(same.sum()), int(attention_mask.sum(1).min()) - 1)  # every row keeps a token of its own
        if rows < 2 or prefix < 1:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits
        cache = prefix_cache(backbone)
        shared = backbone(input_ids=input_ids[:1, :prefix], use_cache=True,
                          **{cache_name: cache}).last_hidden_state  # (1, P, H)
        cache.batch_repeat_interleave(rows)
        rest = backbone(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, use_cache=True,
                        **{cache_name: cache}).last_hidden_state  # (B, T - P, H)
        return torch.cat([head(shared).expand(rows, -1, -1), head(rest)], dim=1)  # (B, T, V)

    return logits


def _device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        return next(model.parameters()).device
    return torch.device("cpu")


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (B, T) input_ids and a (B, T) attention_mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    # The pad id never reaches a scored position (masked out and never a target), so any valid id works.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation as lm-eval-harness splits them: encode the whole string and take the
    tokens past the context's encoding, so a merge across the boundary does not change the context tokens.
    Trailing spaces of the context move to the continuation (lm-eval does the same)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation).input_ids
    ctx = tokenizer(stripped).input_ids
    if not ctx or len(whole) <= len(ctx):
        raise ValueError(f"context {context!r} and continuation {continuation!r} must both give tokens")
    return ctx, whole[len(ctx):]


def _head_split(model):
    """(backbone, output head) of a transformers causal LM whose head is one linear layer and whose backbone takes
    a plain key/value cache (loraforge.training.loss's split); None for anything else (a logits callable, a soft-capped
    head), which the scorers then run as full logits."""
    if not isinstance(model, torch.nn.Module):
        return None
    backbone, head = split_head(model)
    if backbone is None or prefix_cache(backbone) is None:
        return None
    return backbone, head


def _target_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log p(targets[i]) from the head's fp32 log-softmax at hidden[i]: (N, H), (N,) -> (N,) fp32, in row chunks
    (a chunk's (n, V) logits are the largest tensor)."""
    out = [hidden.new_zeros(0, dtype=torch.float32)]
    for start in range(0, hidden.shape[0], chunk_size):
        logprobs = F.log_softmax(head(hidden[start:start + chunk_size]).float(), dim=-1)  # (n, V)
        out.append(logprobs.gather(1, targets[start:start + chunk_size, None]).squeeze(1))
    return torch.cat(out)


def continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair."""
    logits_fn, device, pad_id = _logits_fn(model), _device(model), _pad_id(tokenizer)
    encoded = [_encode_pair(tokenizer, c, x) for c, x in pairs]
    scores = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            # The last continuation token is only a target, never an input.
            ids, mask = _pad_right([(ctx + cont)[:-1] for ctx, cont in chunk], pad_id, device)
            logprobs = F.log_softmax(logits_fn(ids, mask).float(), dim=-1)  # (B, T, V)
            for row, (ctx, cont) in enumerate(chunk):
                # Position len(ctx)-1+k predicts continuation token k.
                span = logprobs[row, len(ctx) - 1: len(ctx) - 1 + len(cont)]  # (len(cont), V)
                target = torch.tensor(cont, device=span.device).unsqueeze(1)
                scores.append(span.gather(1, target).sum().item())
    return scores


def _span_logprobs(model, split, ids: torch.Tensor, mask: torch.Tensor, spans) -> list[torch.Tensor]:
    """For each (row, start, end, targets) of a right-padded batch: log p(targets[k]) at position start + k of that
    row, fp32 (end - start,). With `split` (_head_split's (backbone, head)) the head runs on those positions only."""
    if split is not None:
        backbone, head = split
        states = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
        return [_target_logprobs(head, states[row, a:b], torch.tensor(t, device=states.device))
                for row, a, b, t in spans]
    logprobs = F.log_softmax(_logits_fn(model)(ids, mask).float(), dim=-1)  # (B, T, V)
    return [logprobs[row, a:b].gather(1, torch.tensor(t, device=logprobs.device)[:, None]).squeeze(1)
            for row, a, b, t in spans]


def _check_items(items: Sequence[dict]) -> None:
    for i, item in enumerate(items):
        missing = {"question", "choices", "answer"} - set(item)
        if missing:
            raise ValueError(f"item {i} lacks {sorted(missing)}; each item needs question, choices, answer")
        if not 0 <= item["answer"] < len(item["choices"]):
            raise ValueError(f"item {i}: answer {item['answer']} is not an index into its "
                             f"{len(item['choices'])} choices; give a 0-based index")


def mc_option_logprobs(model, tokenizer, items: Sequence[dict], batch_size: int = 16) -> list[float]:
    """Every option's score (sum of its tokens' log-probs after the question; see mc_accuracy), item by item, as
    one flat list; `batch_size` questions per forward.

    A transformers causal LM computes each question once: a batch's questions run as right-padded rows into a
    key/value cache, the last question token's logits score every option's first token, each question's keys and
    values are repeated for its options, and the options' other tokens run on top of them with position ids that
    continue after their own question. Causal attention makes a question's states independent of what follows it,
    so the scores are those of the options as full sequences (continuation_logprobs) up to float reordering
    (tests/studies/test_probes.py), in about a third of the positions (padding included) on the shipped questions.
    Any other model is scored option by option as full sequences.
    """
    _check_items(items)
    split = _head_split(model)
    if split is None:
        pairs = [(_mc_context(item), " " + choice) for item in items for choice in item["choices"]]
        return continuation_logprobs(model, tokenizer, pairs, batch_size)
    backbone, head = split
    cache_name, pad_id = cache_argument(type(backbone)), _pad_id(tokenizer)
    device = head.weight.device
    encoded = [[_encode_pair(tokenizer, _mc_context(item), " " + choice) for choice in item["choices"]]
               for item in items]
    # Batches of questions with similar longest options and lengths: less padding in both passes (a quarter fewer
    # positions on the shipped questions). The scores go back to item order at the end.
    order = sorted(range(len(items)), key=lambda i: (max(len(c) for _, c in encoded[i]), len(encoded[i][0][0])))
    scores: dict[int, list[float]] = {}
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = order[start:start + batch_size]
            questions, options, owner = [], [], []  # per question its tokens; per option its tokens, its question
            for q, i in enumerate(batch):
                questions.append(encoded[i][0][0])  # the context is encoded on its own: the same for every option
                options += [cont for _, cont in encoded[i]]
                owner += [q] * len(encoded[i])
            ids, mask = _pad_right(questions, pad_id, device)  # (Q, L)
            lengths, owner_t = mask.sum(1), torch.tensor(owner, device=device)  # (Q,), (N,)
            cache = prefix_cache(backbone)
            states = backbone(input_ids=ids, attention_mask=mask, use_cache=True,
                              **{cache_name: cache}).last_hidden_state  # (Q, L, H)
            last = states[torch.arange(len(questions), device=device), lengths - 1]  # (Q, H)
            first = F.log_softmax(head(last).float(), dim=-1)  # (Q, V): the first token of each of its options
            option_scores = first[owner_t, torch.tensor([cont[0] for cont in options], device=device)]  # (N,)
            longer = [i for i, cont in enumerate(options) if len(cont) > 1]
            if longer:
                rows = owner_t[longer]  # (M,): each option's question
                cache.reorder_cache(rows)  # keys and values (Q, ...) -> (M, ...), one copy per option
                # An option's last token is only a target, never an input.
                opt_ids, opt_mask = _pad_right([options[i][:-1] for i in longer], pad_id, device)  # (M, W)
                positions = lengths[rows, None] + torch.arange(opt_ids.shape[1], device=device)  # (M, W)
                states = backbone(input_ids=opt_ids, attention_mask=torch.cat([mask[rows], opt_mask], 1),
                                  position_ids=positions, use_cache=True,
                                  **{cache_name: cache}).last_hidden_state  # (M, W, H)
                # Option token k (input) predicts option token k + 1; rows of states[opt_mask] in that order.
                targets = torch.tensor([t for i in longer for t in options[i][1:]], device=device)
                option_of = torch.tensor([i for i in longer for _ in options[i][1:]], device=device)
                option_scores.index_add_(0, option_of, _target_logprobs(head, states[opt_mask.bool()], targets))
            flat = option_scores.tolist()  # question by question, each one's options in order
            for i in batch:
                scores[i], flat = flat[:len(encoded[i])], flat[len(encoded[i]):]
    return [score for i in range(len(items)) for score in scores[i]]


def _mc_context(item: dict) -> str:
    return f"Question: {item['question']}\nAnswer:"


def mc_accuracy(model, tokenizer, items: Sequence[dict], batch_size: int = 16) -> dict:
    """Multiple-choice accuracy by log-likelihood, as lm-eval-harness scores such tasks.

    Context is f"Question: {question}\\nAnswer:", each continuation " " + choice; an option's score is the sum of
    its tokens' log-probs (mc_option_logprobs). `accuracy` picks the highest sum; `acc_norm` divides each sum by the
    number of characters of the choice text (lm-eval's acc_norm). `ci95` / `ci95_norm` are Wilson 95% intervals.
    """
    scores = mc_option_logprobs(model, tokenizer, items, batch_size)
    correct = correct_norm = 0
    offset = 0
    for item in items:
        k = len(item["choices"])
        option_scores = torch.tensor(scores[offset:offset + k])
        lengths = torch.tensor([float(len(choice)) for choice in item["choices"]])
        offset += k
        correct += int(option_scores.argmax().item() == item["answer"])
        correct_norm += int((option_scores / lengths).argmax().item() == item["answer"])
    n = len(items)
    return {"accuracy": correct / n, "n": n, "correct": correct, "ci95": wilson_interval(correct, n),
            "acc_norm": correct_norm / n, "correct_norm": correct_norm, "ci95_norm": wilson_interval(correct_norm, n)}


PPL_WINDOW = 512
"""Tokens per window of the general perplexity probe, where the model's context holds them (probe_window)."""


def probe_window(model) -> int:
    """The perplexity probe's window for `model`: PPL_WINDOW tokens, or the model's context where that is shorter
    (a GPT-2 of 128 positions crashed on 512-token windows; a 256-context RoPE model ran on positions it never saw).
    A logits callable, or a config that names no context, gets PPL_WINDOW."""
    config = getattr(model, "config", None)
    context = context_length(config) if config is not None else None
    return min(PPL_WINDOW, context) if context else PPL_WINDOW


def perplexity(model, tokenizer, text: str, max_len: int | None = None, stride: int | None = None,
               batch_size: int = 4) -> dict:
    """Token-level perplexity: exp(sum of NLL / number of predicted tokens) over windows of `max_len` tokens
    (None: probe_window's, PPL_WINDOW or the model's context where that is shorter).

    Window k holds tokens [k*stride, k*stride + max_len). With `stride=None` (= max_len) windows do not overlap
    and each window's first token is context only. With a smaller stride each window scores only the tokens no
    earlier window scored, so every token but the first is predicted exactly once, with at least
    max_len - stride tokens of context.
    """
    max_len = probe_window(model) if max_len is None else max_len
    stride = max_len if stride is None else stride
    if not 0 < stride <= max_len:
        raise ValueError(f"stride {stride} must be in 1..max_len ({max_len})")
    device, pad_id = _device(model), _pad_id(tokenizer)
    tokens = tokenizer(text).input_ids
    if len(tokens) < 2:
        raise ValueError(f"text gives {len(tokens)} token(s); perplexity needs at least 2")
    windows = []  # (start, end, first scored target index)
    scored_until = 0
    for start in range(0, len(tokens) - 1, stride):
        end = min(start + max_len, len(tokens))
        windows.append((start, end, max(start + 1, scored_until)))
        scored_until = end
        if end == len(tokens):
            break
    split = _head_split(model)
    nll, n_tokens = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            ids, mask = _pad_right([tokens[s:e - 1] for s, e, _ in chunk], pad_id, device)
            # Position j - s - 1 of a window predicts token j.
            spans = [(row, first - s - 1, e - s - 1, tokens[first:e]) for row, (s, e, first) in enumerate(chunk)]
            for logprobs in _span_logprobs(model, split, ids, mask, spans):
                nll -= logprobs.sum().item()
                n_tokens += logprobs.numel()
    return {"ppl": perplexity_of(nll / n_tokens), "nll": nll / n_tokens, "n_tokens": n_tokens}


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool | None = None) -> list[list[int]]:
    """Token ids of each prompt, as a single user turn with the generation prompt when the tokenizer has a chat
    template (or when `chat_template=True`), else the raw text."""
    use_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if not use_template:
        return [tokenizer(p).input_ids for p in prompts]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    # The template already writes any special tokens it wants.
    return [tokenizer(r, add_special_tokens=False).input_ids for r in rendered]


def kl_divergence(base, tuned, tokenizer, prompts: Sequence[str], batch_size: int = 8,
                  chat_template: bool | None = None) -> dict:
    """Mean over every prompt token position of KL(p_base || p_tuned) between next-token distributions (nats).

    `base` and `tuned` are each an nn.Module or a callable (input_ids, attention_mask) -> logits (B, T, V); for a
    LoRA model, pass e.g. a callable that runs the model with its adapters disabled as `base` and the model itself
    as `tuned`. Both are called on the same right-padded batch; padded positions are excluded.
    """
    base_fn, tuned_fn, pad_id = prefix_sharing_logits(base), prefix_sharing_logits(tuned), _pad_id(tokenizer)
    device = _device(tuned) if isinstance(tuned, torch.nn.Module) else _device(base)
    encoded = encode_prompts(tokenizer, prompts, chat_template)
    total, n_positions = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(encoded), batch_size):
            ids, mask = _pad_right(encoded[b:b + batch_size], pad_id, device)
            log_p = F.log_softmax(base_fn(ids, mask).float(), dim=-1)  # (B, T, V)
            log_q = F.log_softmax(tuned_fn(ids, mask).float(), dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
            total += (kl * mask).sum().item()
            n_positions += int(mask.sum().item())
    return {"kl": total / n_positions, "n_positions": n_positions}
