"""bench/shapes.py: the data shapes bench/train.py ships (their runs are not tests): what each shape holds."""

import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.training import data as D

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def shapes(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import shapes

    return shapes


def test_chat_rows_have_distinct_system_prompts_of_varied_length(shapes):
    records = shapes.chat_records()
    systems = [r["messages"][0]["content"] for r in records]
    assert len(records) == len(shapes.demo_records())
    assert len(set(systems)) > 0.9 * len(systems)  # 800 rows from a few hundred sentences: nearly all differ
    lengths = sorted(len(s) for s in systems)
    assert lengths[-1] > 3 * lengths[0]
    assert shapes.chat_records() == records  # seeded


def test_text_articles_are_the_general_text_split_at_titles(shapes):
    docs = shapes.articles()
    assert len(docs) == 20
    assert docs[0]["text"].startswith("The Water Cycle\n")
    assert all(d["text"].split("\n", 1)[0] not in d["text"].split("\n", 1)[1] for d in docs[:3])


def test_text_rows_are_packed_articles(shapes):
    class Tok:  # one id per word: enough for packing
        eos_token_id = 0

        def __call__(self, text):
            return {"input_ids": [1 + len(w) for w in text.split()]}

    rows = shapes.text_rows(Tok(), 300, 12)
    assert len(rows) == 12
    for row, members in rows:
        assert 150 <= len(row["input_ids"]) <= 300  # a pass's leftover row under half the length is dropped
        assert sum(len(e.input_ids) for e in members) == len(row["input_ids"])
        assert row["position_ids"].count(0) == len(members)


def test_train_bench_names_a_bad_shape():
    out = subprocess.run([sys.executable, BENCH / "train.py", "--shapes", "demo,poems"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--shapes: unknown shape 'poems'" in out.stderr


def test_text_docs_cut_the_joined_articles_into_long_documents(shapes):
    """--text-docs N: the articles' tokens end to end, cut into documents of exactly N tokens, packed N-token
    sequences to a row (position ids restart every N); the tokens are the articles' own, in order."""

    class Tok:
        eos_token_id = 0

        def __call__(self, text):
            return {"input_ids": [1 + len(w) for w in text.split()]}

    docs, _ = D.build_dataset(shapes.articles(), Tok(), fmt="text", max_seq_len=400)
    ids = [t for doc in docs for t in doc.input_ids]
    windows = {tuple(ids[i:i + 100]) for i in range(0, len(ids) - 99, 100)}
    rows = shapes.text_rows(Tok(), 400, 10, doc_len=100)
    assert len(rows) == 10 and len(windows) == 37
    for row, members in rows:
        assert [len(e.input_ids) for e in members] == [100] * 4
        assert row["position_ids"] == list(range(100)) * 4
    got = {tuple(e.input_ids) for _, members in rows for e in members}
    assert got <= windows and len(got) >= len(windows) - 3  # a pass's leftover row of under 2 documents is dropped

def test_train_bench_refuses_documents_longer_than_a_row():
    out = subprocess.run([sys.executable, BENCH / "train.py", "--text-docs", "600", "--text-len", "512"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--text-docs 600 is longer than a row (--text-len 512)" in out.stderr
