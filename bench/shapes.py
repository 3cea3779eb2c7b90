"""The data shapes bench/train.py trains on: what each optimizer step's micro-batches hold, the same for every trainer.

    demo   the demo's date questions (instruction format): every row starts with the same 38-token chat header,
           which loraforge computes once (training.share_prefix); padded rows, `--batch` examples a step.
    chat   chat rows whose system prompts differ (1 to 5 sentences of the shipped general text, seeded), then the
           demo's question and answer: the rows share only the template's first tokens, so nothing is computed
           once; padded rows (or packed where data.packing=auto packs), `--batch` examples a step.
    text   pretraining-style text: the shipped general text's articles (every token supervised) packed into rows of
           `--pack-len` tokens (first-fit-decreasing, loraforge.training.data.pack; position ids restart per
           article, which never attends to another), `--text-rows` rows a step; every trainer gets these rows
           (PEFT + transformers builds the block-diagonal mask from the position ids, as with HF's
           DataCollatorWithFlattening). Articles repeat in a new seeded order when a run needs more rows.
           `--text-docs N`: the articles joined end to end and cut into documents of N tokens instead (long
           documents: with N = 512 and `--text-len 2048`, four sequences of 512 a row).

A step is a list of micro-batches; a micro-batch is (rows, examples): rows go to the trainer (Example objects, or
packed dicts with position_ids), examples are the real sequences in them (tokens and FLOPs are counted on these).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from loraforge.studies.demo import asset
from loraforge.training import data as D

SHAPES = ("demo", "chat", "text")


def demo_records() -> list[dict]:
    return D.read_records(asset("demo_train.jsonl"))


def sentences() -> list[str]:
    text = " ".join(D._read_text(Path(asset("general_text.txt"))).split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 20]


def chat_records(seed: int = 0) -> list[dict]:
    """The demo's questions as chat rows, each with its own system prompt of 1-5 consecutive general-text sentences."""
    rng, pool = random.Random(seed), sentences()
    records = []
    for i, r in enumerate(demo_records()):
        k = rng.randint(1, 5)
        start = rng.randrange(len(pool) - k)
        system = f"Background for conversation {i + 1}: " + " ".join(pool[start:start + k])  # distinct per row
        user = r["instruction"] + "\n" + r["input"] if r.get("input") else r["instruction"]
        records.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                                     {"role": "assistant", "content": r["output"]}]})
    return records


def articles() -> list[dict]:
    """The general text's articles ({"text": title + body}); a title is a short line without a full stop."""
    lines = D._read_text(Path(asset("general_text.txt"))).splitlines()
    docs, current = [], []
    for line in lines:
        if line.strip() and len(line) < 60 and not line.rstrip().endswith(".") and current:
            docs.append("\n".join(current).strip())
            current = []
        current.append(line)
    docs.append("\n".join(current).strip())
    return [{"text": d} for d in docs if d]


def text_rows(tokenizer, pack_len: int, n_rows: int, seed: int = 0,
              doc_len: int = 0) -> list[tuple[dict, list[D.Example]]]:
    """n_rows packed rows of at most pack_len tokens: (row dict for collate, the articles in it). A shuffled pass
    over the articles packs its leftovers into one more row; one under half of pack_len is dropped, so that every
    row measured is about pack_len long (the shipped text fills one 4,096-token row and 419 tokens of a second).
    doc_len > 0: the articles' tokens joined and cut into documents of doc_len tokens (the last part dropped)."""
    docs, _ = D.build_dataset(articles(), tokenizer, fmt="text", max_seq_len=pack_len)
    if doc_len:
        ids = [t for doc in docs for t in doc.input_ids]
        docs = [D.Example(ids[i:i + doc_len], ids[i:i + doc_len]) for i in range(0, len(ids) - doc_len + 1, doc_len)]
    rng, rows = random.Random(seed), []
    while len(rows) < n_rows:
        order = docs[:]
        rng.shuffle(order)
        packed = D.pack(order, pack_len)
        full = [row for row in packed if 2 * len(row["input_ids"]) >= pack_len]  # first-fit: at most one is not
        for row in full or packed:
            members = []  # the articles of this row, recovered from where its position ids restart
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                members.append(D.Example(row["input_ids"][a:b], row["input_ids"][a:b]))
            rows.append((row, members))
    return rows[:n_rows]


def plan(shape: str, tokenizer, steps: int, batch: int, micro_batch: int, text_rows_per_step: int, pack_len: int,
         max_seq_len: int, doc_len: int = 0) -> list[list[tuple[list, list[D.Example]]]]:
    """Every step's micro-batches for this shape (see the module docstring); the same for every trainer."""
    if shape == "text":
        rows = text_rows(tokenizer, pack_len, steps * text_rows_per_step, doc_len=doc_len)
        out = []
        for s in range(steps):
            chunk = rows[s * text_rows_per_step:(s + 1) * text_rows_per_step]
            out.append([([r for r, _ in chunk], [e for _, ex in chunk for e in ex])])
        return out
    records = demo_records() if shape == "demo" else chat_records()
    examples, _ = D.build_dataset(records, tokenizer, max_seq_len=max_seq_len)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    if steps * batch > len(order):
        raise SystemExit(f"{steps} steps × batch {batch} need more than the {len(order)} {shape} examples")
    out = []
    for s in range(steps):
        idx = order[s * batch:(s + 1) * batch]
        out.append([([examples[i] for i in idx[j:j + micro_batch]],) * 2 for j in range(0, batch, micro_batch)])
    return out
