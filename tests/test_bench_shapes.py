"""bench/shapes.py: the data shapes bench/train.py ships (their runs are not tests): what each shape holds."""

import subprocess
import sys
from pathlib import Path

import pytest

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
