"""Evaluation: held-out perplexity and exact-match accuracy of greedy generations."""

from __future__ import annotations

import math
import sys

import torch

from loraforge.training import data as D
from loraforge.decoding import greedy, stop_ids
from loraforge.kernels import HeadBuffers
from loraforge.training.loss import CausalLMLoss, shares_prefix
from loraforge.precision import autocast


def perplexity_of(loss: float) -> float:
    """exp(mean token loss); inf past a float's range (a diverged model's loss above ~709), not OverflowError."""
    return math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# The widest activation a held-out forward makes at once, positions × the model's MLP width: 16,384 positions of the
# built-in model (width 1,536), fewer of a wider one. It keeps no graph, so it holds more than a training micro-batch
# in less memory. The demo's 100 held-out examples (6,489 tokens, bf16, the built-in model, a 2-core Zen 5 EPYC)
# took 5.6 s in forwards of 8 examples and 3.1 s of 64 (sharing their prompt prefix; packed: 8.3-9.8 s against
# 7.3-7.5).
EVAL_ACTIVATIONS = 16384 * 1536
EVAL_MAX_BATCH = 64


def mlp_width(model) -> int:
    """The model's widest per-position activation: its MLP's intermediate size (4 × hidden where it has none)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "intermediate_size", None) or 4 * getattr(config, "hidden_size", 384))


def eval_batch_size(examples: list[D.Example], width: int, at_least: int = 8) -> int:
    """Examples per held-out forward: as many as EVAL_ACTIVATIONS hold at the longest example's length and this MLP
    width (at most EVAL_MAX_BATCH), and never fewer than `at_least` (8, or a run's larger training micro-batch: what
    evaluation took before). So the widest tensor a forward makes is ~25M values (100 MB in fp32) whatever the model,
    unless `at_least` examples alone make more, as they did before (a 7B Llama's 11,008-wide MLP: 8 examples of 512
    tokens, as before; 28 of 80 tokens instead of 8)."""
    longest = max((len(e.input_ids) for e in examples), default=1)
    return max(at_least, min(EVAL_MAX_BATCH, EVAL_ACTIVATIONS // max(width, 1) // max(longest, 1)))


@torch.no_grad()  # no graph: a model with trainable weights saved every layer's activations here
def mean_token_loss(model, examples: list[D.Example], pad_id: int, batch_size: int | None = None,
                    packing: bool | str = "auto", max_seq_len: int = 2048, precision: str = "fp32",
                    head_buffers: HeadBuffers | None = None) -> float:
    """Mean cross-entropy per supervised token over `examples` (perplexity = exp of it), `batch_size` examples a
    forward (None: eval_batch_size's). head_buffers: the training loss's (CausalLMLoss.head_buffers), so that
    evaluation between steps allocates no second set. packing: True/False as given (a run's, resolved with its
    model); "auto" packs where the model keeps packed examples apart (data.keeps_packed_apart: OPT's and BLOOM's
    perplexities were of examples attending to each other)."""
    batch_size = batch_size or eval_batch_size(examples, mlp_width(model))
    if packing == "auto":
        packing = D.keeps_packed_apart(model)
    device = next(model.parameters()).device
    loss_fn = CausalLMLoss(model, share_prefix=shares_prefix("auto", device), head_buffers=head_buffers)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:  # the caller's mode back however this ends (a notebook's Ctrl-C left the model in eval mode: no dropout)
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            rows = D.pack(chunk, max(max_seq_len, max(len(e.input_ids) for e in chunk))) if packing else chunk
            batch = {k: v.to(device) for k, v in D.collate(rows, pad_id).items()}
            with autocast(precision, device.type):
                s, n = loss_fn(batch)
            total, count = total + s.item(), count + n.item()
    finally:
        model.train(was_training)
    return total / max(count, 1)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 32, batch_size: int = 32,
             precision: str = "fp32") -> list[str]:
    """Greedy continuations of token-id prompts (loraforge.decoding: shared prefix once, rows leave when they
    end); decoded, special tokens dropped."""
    outputs = greedy(model, prompts, stop_ids(tokenizer, model), max_new_tokens, batch_size, precision)
    return tokenizer.batch_decode(outputs, skip_special_tokens=True)


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def accuracy(model, tokenizer, records: list[dict], fmt: str = "auto", max_new_tokens: int = 32,
             batch_size: int = 32, precision: str = "fp32") -> dict:
    """Exact match (whitespace-normalised) of greedy generations against the reference outputs."""
    if fmt == "auto":
        fmt = D.detect_format(records[0])
    prompts = [D.prompt_ids(r, tokenizer, fmt) for r in records]
    references = [D.reference_output(r, fmt, tokenizer) for r in records]
    predictions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, precision)
    correct = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    n = len(records)
    return {"accuracy": correct / n, "correct": correct, "n": n, "ci95": wilson_interval(correct, n),
            "samples": [{"reference": r, "prediction": p} for p, r in list(zip(predictions, references))[:5]]}

