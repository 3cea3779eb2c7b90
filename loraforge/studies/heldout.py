"""Held-out task accuracy of a model, cached on disk by what it depends on, so a study never scores the same
weights on the same examples twice.

    key = sha256(base weights + tokenizer) [+ sha256(the active adapter's tensors)] + sha256(examples, settings)
    cache_dir()/heldout/<key>.json  -- hit: read; miss: greedy exact match (training.evaluate.accuracy), then written

`loraforge demo` scores the base and its adapter on the held-out dates; `loraforge continual` from that adapter
needs the same two numbers and reads them here instead of generating again. A key covers the weights bit for bit,
the examples' content, the generation length, the batch size, the compute precision, the device and the torch and
transformers versions: anything else is scored anew.

`within_context`: the records `loraforge eval` scores, and their perplexity examples, at the model's context.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import transformers

from loraforge.lora.adapters import adapter_configs, adapter_state_dict, list_adapters
from loraforge.models import cache_dir, context_length
from loraforge.training import data as D
from loraforge.training.evaluate import accuracy
from loraforge.utils.files import atomic_file

HELDOUT_CACHE_VERSION = 2
"""Part of the key: bump it when the exact-match scoring changes. 2: generation stops at the end-of-turn set of
decoding.stop_ids(tokenizer, model) (a Gemma model ran past <end_of_turn>: 0% on answers it got right), a reference
is compared without its EOS text, a prompt is the ids training read before the answer; 1's scores are not read."""
BATCH_SIZE = 50


def model_hash(model, tokenizer) -> str:
    """sha256 of what a model's probe results depend on: its class, config, every weight (name, dtype, shape and
    bytes; a tied weight once) and the tokenizer. About a second for 135M fp32 weights."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps([type(model).__name__, config], sort_keys=True, default=str).encode())
    seen = set()
    for name, tensor in model.state_dict().items():
        if tensor.numel() and tensor.data_ptr() in seen:  # a tied weight: hashed once, under its first name
            continue
        seen.add(tensor.data_ptr())
        _update(h, name, tensor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h.update(json.dumps([vocab, getattr(tokenizer, "chat_template", None), tokenizer.pad_token_id,
                         tokenizer.eos_token_id], default=str).encode())
    return h.hexdigest()


def _update(h, name: str, tensor: torch.Tensor) -> None:
    h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def with_adapter_hash(base_key: str, model) -> str:
    """`base_key` (model_hash of the model before any adapter was loaded) extended by the active adapter's tensors
    and settings; the base key itself when the model holds no adapter. Hashes megabytes, not the whole model."""
    names = list_adapters(model)
    if not names:
        return base_key
    if len(names) > 1:
        raise ValueError(f"with_adapter_hash: one adapter at a time, the model holds {names}")
    h = hashlib.sha256(base_key.encode())
    for name, tensor in sorted(adapter_state_dict(model, names[0]).items()):
        _update(h, name, tensor)
    h.update(repr(adapter_configs(model)[names[0]]).encode())
    return h.hexdigest()


def answer_token_budget(tokenizer, records: list[dict], fmt: str) -> int:
    """New tokens to generate when scoring: the longest reference answer in tokens, plus 4."""
    return max(len(tokenizer(D.reference_output(r, fmt, tokenizer)).input_ids) for r in records) + 4


def examples_hash(records: list[dict], fmt: str, max_new_tokens: int, precision: str, device: torch.device) -> str:
    """sha256 of the examples' content (not where they were read) and of the settings that change the score."""
    payload = {"version": HELDOUT_CACHE_VERSION, "records": [{k: v for k, v in r.items() if k != "_source"}
                                                              for r in records],
               "fmt": fmt, "max_new_tokens": max_new_tokens, "precision": precision, "batch_size": BATCH_SIZE,
               "device": device.type, "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def heldout_accuracy(model, tokenizer, records: list[dict], fmt: str, max_new_tokens: int, precision: str,
                     model_key: str | None, label: str) -> dict:
    """training.evaluate.accuracy's result for `model` (whose weights hash to `model_key`: model_hash, or
    with_adapter_hash for one with an adapter) on `records`, from the cache when an earlier command scored the
    same weights on the same examples with the same settings; "cached" says which it was and "seconds" what the
    scoring took when it ran. model_key None: scored, not cached."""
    if fmt == "auto":
        fmt = D.detect_format(records[0])
    if model_key is None:
        return {**score(model, tokenizer, records, fmt, max_new_tokens, precision), "cached": None}
    device = next(model.parameters()).device
    key = hashlib.sha256((model_key + examples_hash(records, fmt, max_new_tokens, precision, device)).encode())
    path = cache_dir() / "heldout" / f"{key.hexdigest()[:32]}.json"
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and saved.get("key") == key.hexdigest():
            print(f"  {label}: same weights, examples and settings as an earlier run: score read from {path} "
                  f"({saved['result']['correct']}/{saved['result']['n']}; {saved['result']['seconds']:.0f} s saved)",
                  flush=True)
            return {**saved["result"], "cached": str(path)}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"  {label}: ignoring the unreadable score cache {path} ({e}); scoring again", flush=True)
    result = score(model, tokenizer, records, fmt, max_new_tokens, precision)
    try:
        with atomic_file(path) as tmp:
            Path(tmp).write_text(json.dumps({"key": key.hexdigest(), "label": label, "result": result}, default=str))
    except OSError as e:
        print(f"  {label}: could not cache the score at {path} ({e})", flush=True)
    return {**result, "cached": None}


def score(model, tokenizer, records: list[dict], fmt: str, max_new_tokens: int, precision: str) -> dict:
    """training.evaluate.accuracy with the seconds it took."""
    t0 = time.perf_counter()
    result = accuracy(model, tokenizer, records, fmt, max_new_tokens, batch_size=BATCH_SIZE, precision=precision)
    return {**result, "seconds": time.perf_counter() - t0}


def within_context(records: list[dict], tokenizer, context: int | None) -> tuple[list[dict], list[D.Example],
                                                                                  str | None]:
    """The records a held-out evaluation scores at the model's context (models.context_length; None: no limit),
    their perplexity examples, and a line saying what the context cut (None when it cut nothing).

    A record whose prompt alone fills the context has no answer token to score: it is left out of the perplexity
    and the accuracy alike, so both cover the same records. A longer record is truncated at the context for the
    perplexity (its answer's first tokens count), a longer text record cut into windows of the context (every token
    counts); its generation stops at the context (decoding.greedy)."""
    limit = context or sys.maxsize
    D.build_dataset(records, tokenizer, max_seq_len=sys.maxsize)  # every record readable, one format: its errors
    fmt = D.detect_format(records[0])
    lengths = [None if fmt == "text" else len(D.prompt_ids(r, tokenizer, fmt)) for r in records]
    kept = [r for r, n in zip(records, lengths) if n is None or n < limit]
    if not kept:
        which = "its prompt" if len(records) == 1 else f"the shortest of the {len(records)} prompts"
        raise D.DataError(f"no record fits the model's context of {context} tokens: {which} alone takes "
                          f"{min(lengths)}, leaving no room for an answer; shorten the prompts, or evaluate a model "
                          f"with a longer context")
    examples, stats = D.build_dataset(kept, tokenizer, fmt, max_seq_len=limit)
    left_out = len(records) - len(kept)
    parts = []
    if stats.n_split:  # text records: scored whole, window by window (data.overflow's auto)
        parts.append(f"{_records(stats.n_split)} cut into windows of the context")
    if stats.n_truncated:
        parts.append(f"{_records(stats.n_truncated)} truncated")
    if left_out:
        parts.append(f"{_records(left_out)} left out of the perplexity and the accuracy (the prompt alone fills the "
                     f"context)")
    return kept, examples, f"at the model's context of {context} tokens: {', '.join(parts)}" if parts else None


def fitting(records: list[dict], tokenizer, model, what: str) -> list[dict]:
    """The `records` a held-out score of `model` can take at its context (within_context), a line saying what the
    context left out: a prompt longer than the context was a traceback from the greedy decoder."""
    kept, _, cut = within_context(records, tokenizer, context_length(model.config))
    if cut:
        print(f"{what}: {cut}", flush=True)
    return kept


def _records(n: int) -> str:
    return f"{n} record" if n == 1 else f"{n} records"
