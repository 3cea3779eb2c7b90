"""Several data sources: weighted draws within sampling error, per-source epochs, one error listing every bad source."""

import json
import math

import pytest
import torch

from loraforge.config import ConfigError, load_train_config
from loraforge.models import load_tokenizer
from loraforge.training import data as D
from loraforge.training.epochs import micro_batches
from loraforge.training.loop import data_report, load_data, make_batch
from loraforge.training.loss import CausalLMLoss
from loraforge.training.mixing import Mixture, check_share, sources_report
from helpers import tiny_llama


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_weighted_draws_match_the_weights_within_sampling_error():
    """Over many epochs (120,000 draws) each source's share is within 4 binomial standard errors of its weight."""
    mixture = Mixture(names=("a", "b", "c"), sizes=(50, 400, 150), weights=(0.6, 0.3, 0.1), epochs=(1, 1, 1), seed=7)
    order = [i for epoch in range(200) for i in mixture.epoch_order(epoch)]
    n = len(order)
    assert n == 200 * 600
    for share, p in zip(check_share(mixture, order), mixture.weights):
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), (share, p)
    # batches of 8 drawn in one epoch carry the weights too: mean share per batch
    one = mixture.epoch_order(3)
    per_batch = [check_share(mixture, one[i:i + 8])[0] for i in range(0, 600, 8)]
    assert abs(sum(per_batch) / len(per_batch) - 0.6) < 4 * math.sqrt(0.6 * 0.4 / 600)


def test_weighted_source_is_used_once_before_repeats_and_draws_are_seeded():
    mixture = Mixture(names=("a", "b"), sizes=(10, 90), weights=(0.5, 0.5), epochs=(1, 1), seed=0)
    order = mixture.epoch_order(0)
    small = [i for i in order if i < 10]  # ~50 draws from 10 examples: each pass of 10 is a permutation
    for start in range(0, len(small) - 9, 10):
        assert sorted(small[start:start + 10]) == list(range(10))
    big = [i for i in order if i >= 10]  # ~50 of 90: no repeats
    assert len(set(big)) == len(big)
    assert order == mixture.epoch_order(0) and order != mixture.epoch_order(1)


def test_a_weighted_sources_order_goes_on_across_epochs():
    """A source drawn less than its size an epoch restarted a fresh order every epoch: over 5 epochs 84 draws from
    100 examples repeated some before others were ever drawn. Now every window of 100 of its draws, across epoch
    boundaries, is each example once; epoch 0 is drawn as before."""
    mixture = Mixture(names=("a", "b"), sizes=(100, 100), weights=(0.1, 0.9), epochs=(1, 1), seed=0)
    small = [i for epoch in range(30) for i in mixture.epoch_order(epoch) if i < 100]
    assert len(small) > 500
    for start in range(0, len(small) - 99, 100):
        assert sorted(small[start:start + 100]) == list(range(100))
    first = torch.randperm(100, generator=mixture._generator(0, 0, 0)).tolist()
    assert [i for i in mixture.epoch_order(0) if i < 100] == first[:len([i for i in mixture.epoch_order(0)
                                                                         if i < 100])]


def test_epochs_per_source_and_the_single_source_order_is_unchanged():
    one = Mixture(names=("a",), sizes=(37,), weights=None, epochs=(1,), seed=5)
    expected = torch.randperm(37, generator=torch.Generator().manual_seed(5 + 2)).tolist()
    assert one.epoch_order(2) == expected  # the order a single file always had (seed + epoch)
    two = Mixture(names=("a", "b"), sizes=(10, 20), weights=None, epochs=(2, 0.5), seed=0)
    order = two.epoch_order(0)
    assert len(order) == 30
    assert sorted(i for i in order if i < 10) == sorted(list(range(10)) * 2)
    b = [i for i in order if i >= 10]
    assert len(b) == 10 and len(set(b)) == 10


@pytest.mark.parametrize("sizes, epochs", [((7, 7), (0.5, 0.5)), ((5,), (1.5,)), ((5, 3), (1.5, 2.5))])
def test_the_counts_reported_per_source_are_the_examples_an_epoch_draws(sizes, epochs):
    """The report said e × n (3.5 for half of 7 examples, printed 4) while the epoch drew a whole number (4 or 3)."""
    mixture = Mixture(names=tuple("ab"[:len(sizes)]), sizes=sizes, weights=None, epochs=epochs, seed=0)
    for epoch in range(3):
        drawn = [0] * len(sizes)
        for index in mixture.epoch_order(epoch):
            drawn[mixture.source_of(index)] += 1
        assert mixture.expected_counts() == drawn


def test_the_largest_seed_wraps_at_the_epoch_boundary_instead_of_overflowing():
    """training.seed may be 2**64 - 1; seed + epoch used to overflow torch.Generator.manual_seed at epoch 1."""
    top = 2**64 - 1
    expected = torch.randperm(37, generator=torch.Generator().manual_seed(0)).tolist()  # (top + 1) % 2**64
    assert Mixture(names=("a",), sizes=(37,), weights=None, epochs=(1,), seed=top).epoch_order(1) == expected
    weighted = Mixture(names=("a", "b"), sizes=(10, 20), weights=(0.5, 0.5), epochs=(1, 1), seed=top)
    order = weighted.epoch_order(1)
    assert len(order) == 30 and set(order) <= set(range(30))
    cfg = load_train_config(None, ["data.train=x.jsonl", f"training.seed={top}", "training.batch_size=1"])
    examples = [D.Example([1, 2], [1, 2])] * 37
    assert [b[0] for b in micro_batches(examples, cfg, 1)] == expected


@pytest.fixture
def two_sources(tmp_path):
    a = write(tmp_path / "add.jsonl", [{"instruction": f"Add {x} and {y}.", "output": str(x + y)}
                                        for x in range(6) for y in range(5)])
    b = write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Say {w}"},
                                                      {"role": "assistant", "content": w * 3}]}
                                         for w in ("yes", "no", "maybe", "ok", "fine", "sure", "right", "good")])
    return a, b


def test_sources_with_their_own_formats_and_the_data_line(tiny_dir, two_sources, tmp_path, capsys):
    a, b = two_sources
    cfg = load_train_config(None, [f"model.name={tiny_dir}", "data.eval_fraction=0", f"output_dir={tmp_path / 'o'}"],
                            base={"data": {"train": [{"path": str(a), "weight": 3},
                                                     {"path": str(b), "format": "chat", "weight": 1}]}})
    tok = load_tokenizer(str(tiny_dir))
    train, held, stats, mixture = load_data(cfg, tok)
    assert len(train) == 38 and held == [] and mixture.weights == (0.75, 0.25)
    assert [s["n_records"] for s in stats["sources"]] == [30, 8] and stats["n_records"] == 38
    line = sources_report(mixture, stats)
    assert "data.train[0] add.jsonl: 30 records (0 truncated, 0 dropped), weight 0.75: 28 examples" in line
    assert "data.train[1] chat.jsonl: 8 records (0 truncated, 0 dropped), weight 0.25: 10 examples" in line
    tiny = load_train_config(None, [f"model.name={tiny_dir}", "data.eval_fraction=0", f"output_dir={tmp_path}"],
                             base={"data": {"train": [{"path": str(a), "weight": 1e-9},
                                                      {"path": str(b), "weight": 1}]}})
    _, _, tiny_stats, tiny_mixture = load_data(tiny, tok)  # soak: "weight 0.00: 0 examples", nothing more
    assert "add.jsonl: 30 records (0 truncated, 0 dropped), weight 1e-09: 0 examples (not one per epoch: raise its " \
           "weight, or remove the source), 0% of the tokens" in sources_report(tiny_mixture, tiny_stats)
    # a mixed, packed micro-batch still equals the per-example losses (rows from both sources stay isolated)
    model = tiny_llama(vocab_size=len(tok), tie_word_embeddings=True)
    idx = micro_batches(train, cfg, 0, mixture)[0]
    assert {mixture.source_of(i) for i in micro_batches(train, cfg, 0, mixture)[0] +
            micro_batches(train, cfg, 0, mixture)[1]} == {0, 1}
    packed = make_batch(train, idx, cfg, tok.pad_token_id, pack=True)
    loss = CausalLMLoss(model, share_prefix=False)
    with torch.no_grad():
        total, n = loss(packed)
        parts = [loss(D.collate([train[i]], tok.pad_token_id)) for i in idx]
    torch.testing.assert_close(total, sum(p[0] for p in parts), rtol=1e-5, atol=1e-5)
    assert n == sum(p[1] for p in parts)


def test_a_txt_source_is_trained_whole_in_windows_and_said(tiny_dir, two_sources, tmp_path):
    """A plain-text file is one text record; data.overflow's default (auto) cuts a text longer than max_seq_len
    into windows (every token a target once), and the data lines say how many texts were cut."""
    long = " ".join(f"fact {i} is true." for i in range(120))
    text = tmp_path / "book.txt"
    text.write_text(f"A short title\n\n{long}\n\n\nAnother short paragraph.\n")
    tok = load_tokenizer(str(tiny_dir))
    n = len(D.encode(D.read_records(str(text))[0], tok, "text").input_ids)
    assert n > 200
    args = [f"model.name={tiny_dir}", "data.eval_fraction=0", "data.max_seq_len=64", f"output_dir={tmp_path / 'o'}"]
    cfg = load_train_config(None, args, base={"data": {"train": str(text)}})
    train, held, stats, mixture = load_data(cfg, tok)
    assert (stats["n_records"], stats["n_split"], stats["n_truncated"]) == (1, 1, 0)
    assert len(train) == -(-(n - 1) // 63)  # 63 new targets a window of 64
    assert stats["n_supervised_tokens"] == sum(len(e.input_ids) - 1 for e in train) == n - 1
    line = data_report(stats, 0, 0.0, 0.0, True, "auto")
    assert "(1 text longer than max_seq_len cut into windows, 0 truncated, 0 dropped)" in line
    mixed = load_train_config(None, args, base={"data": {"train": [{"path": str(text), "weight": 1},
                                                                   {"path": str(two_sources[0]), "weight": 1}]}})
    train, held, stats, mixture = load_data(mixed, tok)  # the instruction records are not cut
    line = sources_report(mixture, stats)
    assert "book.txt: 1 record (1 cut into windows, 0 truncated, 0 dropped)" in line
    assert "add.jsonl: 30 records (0 truncated, 0 dropped)" in line
    with pytest.raises(ConfigError) as e:  # a format whose records cannot be cut, named as the user wrote it
        load_train_config(None, args + ["data.overflow=split"],
                          base={"data": {"train": [str(text), {"path": "c.jsonl", "format": "chat"}]}})
    assert e.value.problems == ["data.overflow: split cuts text records into windows; train[1].format is chat, whose "
                                "prompt must come before its answer: use overflow: truncate or drop, or format: text"]


def test_a_single_txt_holds_out_a_share_of_its_windows(tiny_dir, tmp_path):
    """One .txt is one record, too few to hold any out by record: data.eval_fraction holds out a seeded share of
    its windows instead (at least MIN_TO_SPLIT of them), and the counts cover the windows it trains on."""
    text = tmp_path / "book.txt"
    text.write_text(" ".join(f"fact {i} is true." for i in range(400)))
    tok = load_tokenizer(str(tiny_dir))
    every = D.build_dataset(D.read_records(str(text)), tok, "text", 64)[0]
    assert len(every) >= 40
    args = [f"model.name={tiny_dir}", "data.max_seq_len=64", "data.eval_fraction=0.1", f"output_dir={tmp_path / 'o'}"]
    cfg = load_train_config(None, args, base={"data": {"train": str(text)}})
    train, held, stats, mixture = load_data(cfg, tok)
    assert len(held) == round(0.1 * len(every)) and len(train) + len(held) == len(every)
    assert sorted(map(str, train + held)) == sorted(map(str, every))  # each window on one side only
    assert (stats["n_examples"], stats["n_tokens"]) == (len(train), sum(len(e.input_ids) for e in train))
    assert stats["n_supervised_tokens"] == sum(len(e.input_ids) - 1 for e in train)
    assert "not_held_out" not in stats and "holds out nothing" not in data_report(stats, len(held), 0, 0, 1, "auto")
    assert load_data(cfg, tok)[:2] == (train, held)  # seeded: a resumed run trains on the same windows
    with pytest.raises(D.DataError) as e:  # a share that leaves nothing to train on, in windows
        load_data(load_train_config(None, args[:2] + ["data.eval_fraction=0.999", args[3]],
                                    base={"data": {"train": str(text)}}), tok)
    assert str(e.value).startswith(f"data.eval_fraction=0.999 holds out {len(every)} of the {len(every)} windows, "
                                   f"leaving 0 to train on; use a fraction from ")
    assert str(e.value).endswith("(at least 1 window on each side)")
    few = load_train_config(None, args[:1] + ["data.max_seq_len=4096"] + args[2:],
                            base={"data": {"train": str(text)}})  # it fits whole: nothing cut or held out, said
    train, held, stats, mixture = load_data(few, tok)
    assert held == [] and stats["not_held_out"] == [mixture.names[0]]


def test_bad_sources_are_reported_together_by_name(tiny_dir, two_sources, tmp_path):
    a, _ = two_sources
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"output_dir={tmp_path / 'o'}"],
                            base={"data": {"train": [str(a), str(empty), str(bad_json), str(tmp_path / "nope.csv")]}})
    with pytest.raises(D.DataError) as e:
        load_data(cfg, load_tokenizer(str(tiny_dir)))
    lines = str(e.value).splitlines()
    assert lines[0] == "3 data sources cannot be read:"
    assert lines[1].startswith(f"  data.train[1] ({empty}): ") and "no records" in lines[1]
    assert lines[2].startswith(f"  data.train[2] ({bad_json}): ") and ":2: invalid JSON" in lines[2]
    assert lines[3].startswith(f"  data.train[3] ({tmp_path / 'nope.csv'}): ")
    assert len(lines) == 4


def test_source_config_problems_are_one_line_each():
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [], base={"data": {
            "train": [{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl", "weight": 1, "epochs": 2},
                      {"path": "c.jsonl", "weight": 0}, {"pth": "d.jsonl", "weight": 1}],
            "eval": [{"path": "e.jsonl", "epochs": 2}]}})
    assert e.value.problems == [
        "data.train[1].weight: give weight (1) or epochs (2), not both",
        "data.train[2].weight: must be positive, got 0 (leave the source out to skip it)",
        "data.train[3].pth: unknown field (did you mean 'path'?)",
        "data.train[3].path: missing (a dataset file or hub name)",
        "data.eval[0].epochs: held-out sources are used in full; remove it",
    ]
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [], base={"data": {"train": [{"path": "a.jsonl", "weight": 1}, "b.jsonl"]}})
    assert e.value.problems == ["data.train[1].weight: missing; give a weight to every source or to none "
                                "(sources [0] have one)"]


def test_a_source_fraction_that_draws_no_example_names_its_epochs(tiny_dir, two_sources, tmp_path):
    """epochs: 0.001 of 30 examples rounds to none: the error names data.train[0].epochs, not the batch size."""
    a, b = two_sources
    cfg = load_train_config(None, [f"model.name={tiny_dir}", "data.eval_fraction=0", f"output_dir={tmp_path / 'o'}"],
                            base={"data": {"train": [{"path": str(a), "epochs": 0.001}, {"path": str(b)}]}})
    with pytest.raises(D.DataError) as e:
        load_data(cfg, load_tokenizer(str(tiny_dir)))
    assert str(e.value) == ("data.train[0].epochs: 0.001 of its 30 examples is none; use at least 0.033 (one "
                            "example per epoch), or leave the source out")


def test_the_largest_weights_and_epochs_are_shares_or_a_named_error(tiny_dir, two_sources, tmp_path):
    """Two weights of 1e308 pass the config (finite, positive) but their plain sum is inf: every share was 0 and
    torch.multinomial raised. epochs 1e12 tried to build a list of 3e13 indices (MemoryError)."""
    a, b = two_sources
    base = [f"model.name={tiny_dir}", "data.eval_fraction=0", f"output_dir={tmp_path / 'o'}"]
    cfg = load_train_config(None, base, base={"data": {"train": [{"path": str(a), "weight": 1e308},
                                                                 {"path": str(b), "weight": 1e308}]}})
    _, _, _, mixture = load_data(cfg, load_tokenizer(str(tiny_dir)))
    assert mixture.weights == (0.5, 0.5) and len(mixture.epoch_order(0)) == 38
    cfg = load_train_config(None, base, base={"data": {"train": [{"path": str(a), "epochs": 1e12}, str(b)]}})
    with pytest.raises(D.DataError) as e:
        load_data(cfg, load_tokenizer(str(tiny_dir)))
    assert str(e.value) == ("data.train[0].epochs: 1e+12 passes over its 30 examples is 3e+13 examples an epoch, "
                            "more than 100,000,000; use at most 3,333,333 (training.epochs repeats the whole mix)")


def test_one_bad_source_is_reported_once_not_with_its_held_out_part(tiny_dir, tmp_path):
    """A source read in the wrong format fails in its train part and its held-out part alike: one problem."""
    rows = [{"instruction": f"Add {x} and 1.", "output": str(x + 1)} for x in range(40)]
    path = write(tmp_path / "train40.jsonl", rows)
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"output_dir={tmp_path / 'o'}"],
                            base={"data": {"train": [{"path": str(path), "format": "chat"}]}})
    with pytest.raises(D.DataError) as e:
        load_data(cfg, load_tokenizer(str(tiny_dir)))
    assert str(e.value) == (f"record 0: {path}:1: field 'messages' is missing or empty (expected a list of "
                            f"{{role, content}})")


def test_a_train_and_an_eval_file_that_both_fail_are_both_named(tiny_dir, tmp_path):
    """Soak: with data.eval failing too, the list named the held-out file and not the training one."""
    rows = [{"instruction": f"Add {x} and 1.", "output": str(x + 1)} for x in range(8)]
    train, held = write(tmp_path / "t.jsonl", rows), write(tmp_path / "e.jsonl", rows)
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"output_dir={tmp_path / 'o'}", "data.max_seq_len=8"],
                            base={"data": {"train": str(train), "eval": str(held)}})
    with pytest.raises(D.DataError) as e:
        load_data(cfg, load_tokenizer(str(tiny_dir)))
    lines = str(e.value).splitlines()
    assert lines[0] == "2 data sources cannot be used:" and len(lines) == 3
    assert lines[1].startswith("  t.jsonl: all 8 records were dropped: ")
    assert lines[2].startswith("  e.jsonl (held out): all 8 records were dropped: ")


def test_an_eval_fraction_that_holds_out_everything_names_data_eval_fraction(tiny_dir, tmp_path):
    rows = [{"instruction": f"Add {x} and 1.", "output": str(x + 1)} for x in range(40)]
    path = write(tmp_path / "train40.jsonl", rows)
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={path}", "data.eval_fraction=0.99",
                                   f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(D.DataError) as e:
        load_data(cfg, load_tokenizer(str(tiny_dir)))
    assert str(e.value) == ("train40.jsonl: data.eval_fraction=0.99 holds out 40 of the 40 records, leaving 0 to train "
                            "on; use a fraction from 0.025 to 0.975 (at least 1 record on each side)")


def test_the_sources_line_counts_answers_that_ended_in_the_eos_text(tiny_dir, two_sources, tmp_path):
    a, _ = two_sources
    eos = write(tmp_path / "eos.jsonl", [{"instruction": f"Say {w}.", "output": w + "<|im_end|>"} for w in "xyz"])
    cfg = load_train_config(None, [f"model.name={tiny_dir}", "data.eval_fraction=0", f"output_dir={tmp_path / 'o'}"],
                            base={"data": {"train": [str(a), str(eos)]}})
    _, _, stats, mixture = load_data(cfg, load_tokenizer(str(tiny_dir)))
    assert [s["n_eos_stripped"] for s in stats["sources"]] == [0, 3] and stats["n_eos_stripped"] == 3
    lines = sources_report(mixture, stats).splitlines()
    assert lines[1].startswith("  data.train[0] add.jsonl: 30 records (0 truncated, 0 dropped), epochs 1: 30 "
                               "examples, ")
    assert lines[2].startswith("  data.train[1] eos.jsonl: 3 records (0 truncated, 0 dropped, 3 ending in the EOS text "
                               "(learnt once)), epochs 1: 3 examples, ")


def test_held_out_examples_that_are_also_training_examples_are_counted_on_the_data_line(tiny_dir, tmp_path):
    """data.eval naming the train file, or a record repeated in a file that eval_fraction splits, gave a held-out
    loss on examples the run trains on, without a word."""
    rows = [{"instruction": f"Add {x} and 1.", "output": str(x + 1)} for x in range(30)]
    path = write(tmp_path / "train.jsonl", rows)
    same = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"data.eval={path}",
                                    f"output_dir={tmp_path / 'o'}"])
    repeated = write(tmp_path / "repeated.jsonl", rows + rows[:10])  # 40 records, 10 of them twice
    split = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={repeated}", "data.eval_fraction=0.25",
                                     f"output_dir={tmp_path / 'o'}"])
    apart = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={path}", "data.eval_fraction=0.25",
                                     f"output_dir={tmp_path / 'o'}"])
    tok = load_tokenizer(str(tiny_dir))
    train, held, stats, _ = load_data(same, tok)
    assert stats["held_out_in_train"] == 30 == len(held)
    assert ("30 held out (30 of them also training examples, token for token: their loss measures recall, not "
            "generalisation)" in data_report(stats, len(held), 0.0, 0.0, False, "auto"))
    train, held, stats, _ = load_data(split, tok)
    ids = [tuple(ex.input_ids) for ex in train]
    assert stats["held_out_in_train"] == sum(tuple(ex.input_ids) in ids for ex in held) > 0
    assert "held_out_in_train" not in load_data(apart, tok)[2]


def test_a_source_that_takes_long_to_tokenize_shows_a_progress_bar_and_a_quick_one_none(tiny_dir, tmp_path, capsys,
                                                                                        monkeypatch):
    """Soak: 1,000,000 instruction rows took minutes to tokenize with nothing said after the precision line. A bar per
    source (train, held out) once a source has taken D.PROGRESS_DELAY_S; none for one that is quick."""
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(8) for b in range(5)]
    write(tmp_path / "add.jsonl", rows)
    write(tmp_path / "held.jsonl", rows[:10])
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={tmp_path / 'add.jsonl'}",
                                   f"data.eval={tmp_path / 'held.jsonl'}", f"output_dir={tmp_path / 'o'}"])
    tok = load_tokenizer(str(tiny_dir))
    load_data(cfg, tok, progress=True)
    assert capsys.readouterr().err == ""  # 50 rows: quicker than the delay
    monkeypatch.setattr(D, "PROGRESS_DELAY_S", 0.0)
    load_data(cfg, tok, progress=True)
    bars = [line.split("|")[0].strip() + " " + line.split("|")[2].split()[0]
            for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "100%" in line]
    assert bars[-2:] == ["tokenize add.jsonl: 100% 40/40", "tokenize held.jsonl (held out): 100% 10/10"]
    load_data(cfg, tok)  # a caller that shows no bar (torchrun's other ranks)
    assert capsys.readouterr().err == ""
