"""Epochs into micro-batches into optimizer steps: with training.batch_tokens each epoch's shuffle fills its own
number of micro-batches, and every step must still take a whole group of them."""

import json
import random

from loraforge.config import load_train_config
from loraforge.models import load_tokenizer
from loraforge.training import data as D
from loraforge.training.epochs import EpochPlan, micro_batches
from loraforge.training.loop import load_data, train
from loraforge.training.report import read_metrics

LENGTHS = [3, 5, 40, 90]  # rows this different fill a 300-token batch differently in every shuffle


def varied(n=40, seed=0) -> list[D.Example]:
    rng = random.Random(seed)
    lengths = [rng.choice(LENGTHS) for _ in range(n)]
    return [D.Example(input_ids=list(range(k)), labels=list(range(k))) for k in lengths]


def tokens_config(**training):
    over = ["data.train=x.jsonl", "training.batch_tokens=300", "training.warmup_steps=0"]
    return load_train_config(None, over + [f"training.{k}={v}" for k, v in training.items()])


def test_with_batch_tokens_each_epoch_makes_its_own_steps_and_every_step_a_whole_group():
    examples, cfg = varied(), tokens_config(gradient_accumulation=2)
    counts = [len(micro_batches(examples, cfg, e)) // 2 for e in range(6)]
    assert len(set(counts)) > 1, counts  # the case at hand: epochs of different lengths
    plan = EpochPlan(examples, cfg, None, group=2)
    assert [plan.steps(e) for e in range(6)] == counts
    assert plan.total(4) == sum(counts[:4]) and plan.total(2.5) == sum(counts[:2]) + int(0.5 * counts[2])
    taken = {}
    for step in range(sum(counts)):  # in order, then again from the middle as a resume would
        epoch, within = plan.locate(step)
        taken.setdefault(epoch, []).extend(plan.batches(epoch)[within * 2:(within + 1) * 2])
    for epoch, batches in taken.items():
        assert batches == micro_batches(examples, cfg, epoch)[:counts[epoch] * 2]
    fresh = EpochPlan(examples, cfg, None, group=2)
    assert [fresh.locate(s) for s in (sum(counts[:3]) + 1, 0, sum(counts[:5]) - 1)] == [(3, 1), (0, 0),
                                                                                         (4, counts[4] - 1)]


def test_with_batch_size_every_epoch_makes_the_same_steps():
    examples, cfg = varied(), load_train_config(None, ["data.train=x.jsonl", "training.batch_size=3"])
    plan = EpochPlan(examples, cfg, None, group=2)
    assert plan.steps(0) == plan.steps(5) == 40 // 3 // 2 == 6
    assert plan.locate(13) == (2, 1) and plan.total(2.5) == 15


def test_training_several_epochs_of_batch_tokens_runs_every_epochs_steps(tiny_dir, tmp_path):
    """Steps were counted from the first epoch alone: a later epoch of fewer micro-batches gave a step none, and the
    run died dividing its loss by zero tokens (ZeroDivisionError)."""
    rng = random.Random(0)
    rows = [{"instruction": "Repeat: " + " ".join(["word"] * rng.choice([1, 2, 30, 60])), "output": "ok"}
            for _ in range(40)]
    (tmp_path / "varied.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={tmp_path / 'varied.jsonl'}",
                                   "data.eval_fraction=0", "data.max_seq_len=128", "data.packing=false",
                                   f"output_dir={tmp_path / 'out'}", "training.batch_tokens=300", "training.epochs=4",
                                   "training.warmup_steps=0", "training.precision=fp32", "training.save_every=0"])
    train(cfg, progress=False)
    steps = [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    examples, _, _, mixture = load_data(cfg, load_tokenizer(str(tiny_dir)))
    counts = [len(micro_batches(examples, cfg, e, mixture)) for e in range(4)]
    assert len(set(counts)) > 1, counts
    assert steps[-1] == sum(counts)
