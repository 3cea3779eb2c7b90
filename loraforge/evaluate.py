"""Evaluation: held-out perplexity and exact-match accuracy of greedy generations."""

from __future__ import annotations

import torch

from . import data as D
from .loss import CausalLMLoss, shares_prefix
from .probes import wilson_interval


@torch.no_grad()
def mean_token_loss(model, examples: list[D.Example], pad_id: int, batch_size: int = 8, packing: bool = True,
                    max_seq_len: int = 2048, bf16: bool = False) -> float:
    """Mean cross-entropy per supervised token over `examples` (perplexity = exp of it)."""
    device = next(model.parameters()).device
    loss_fn = CausalLMLoss(model, share_prefix=shares_prefix("auto", device))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        rows = D.pack(chunk, max(max_seq_len, max(len(e.input_ids) for e in chunk))) if packing else chunk
        batch = {k: v.to(device) for k, v in D.collate(rows, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            s, n = loss_fn(batch)
        total, count = total + s.item(), count + n.item()
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 32, batch_size: int = 32,
             bf16: bool = False) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; decoded, special tokens dropped."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=_stop_ids(tokenizer))
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def accuracy(model, tokenizer, records: list[dict], fmt: str = "auto", max_new_tokens: int = 32,
             batch_size: int = 32, bf16: bool = False) -> dict:
    """Exact match (whitespace-normalised) of greedy generations against the reference outputs."""
    if fmt == "auto":
        fmt = D.detect_format(records[0])
    prompts = [D.prompt_ids(r, tokenizer, fmt) for r in records]
    references = [D.reference_output(r, fmt) for r in records]
    predictions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, bf16)
    correct = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    n = len(records)
    return {"accuracy": correct / n, "correct": correct, "n": n, "ci95": wilson_interval(correct, n),
            "samples": [{"reference": r, "prediction": p} for p, r in list(zip(predictions, references))[:5]]}

