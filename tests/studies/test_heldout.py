"""Held-out accuracy cached by weights: a hit returns what training.evaluate.accuracy computed for the same weights
and examples; other weights (the base, another adapter), examples or settings are scored anew; the base's logits
for KL stay the base's while an adapter sits on the same model. `loraforge eval`'s records at the model's context:
the same ones in the perplexity and the accuracy."""

import json
import re

import pytest
import torch

from loraforge.config import LoraConfig
from loraforge.lora.adapters import delete_adapter, load_adapter, save_adapter
from loraforge.lora.inject import inject
from loraforge.models import load_base
from loraforge.studies import heldout
from loraforge.studies.demo import asset
from loraforge.studies.forgetting import CachedLogits
from loraforge.studies.heldout import heldout_accuracy, model_hash, with_adapter_hash, within_context
from loraforge.training.data import DataError, detect_format, encode, prompt_ids, read_records
from loraforge.training.evaluate import accuracy


def random_adapter(tiny_dir, out, seed):
    model, _ = load_base(str(tiny_dir), dtype="fp32")
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")), "default")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a LoRA_B of zeros would leave the base's outputs
    save_adapter(model, out)
    return out


def test_scores_are_cached_by_weights_examples_and_settings(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = heldout.accuracy
    monkeypatch.setattr(heldout, "accuracy", lambda *a, **k: calls.append(1) or real(*a, **k))
    records = read_records(asset("demo_test.jsonl"))[:4]
    fmt = detect_format(records[0])
    base, tokenizer = load_base(str(tiny_dir), dtype="fp32")
    key = model_hash(base, tokenizer)
    assert with_adapter_hash(key, base) == key  # no adapter: the base's key

    first = heldout_accuracy(base, tokenizer, records, fmt, 6, "fp32", key, "base")
    reference = accuracy(base, tokenizer, records, fmt, 6, batch_size=heldout.BATCH_SIZE, precision="fp32")
    assert first["cached"] is None and calls == [1]
    assert (first["correct"], first["samples"]) == (reference["correct"], reference["samples"])

    again, _ = load_base(str(tiny_dir), dtype="fp32")  # the same weights loaded by another command
    second = heldout_accuracy(again, tokenizer, records, fmt, 6, "fp32", model_hash(again, tokenizer), "base")
    assert calls == [1] and second["cached"] and "score read from" in capsys.readouterr().out
    assert {k: v for k, v in second.items() if k != "cached"} == json.loads(json.dumps(
        {k: v for k, v in first.items() if k != "cached"}))

    heldout_accuracy(base, tokenizer, records[:3], fmt, 6, "fp32", key, "base")  # other examples
    heldout_accuracy(base, tokenizer, records, fmt, 7, "fp32", key, "base")  # another generation length
    heldout_accuracy(base, tokenizer, records, fmt, 6, "fp32", None, "base")  # no key: never cached
    assert calls == [1] * 4

    one, two = random_adapter(tiny_dir, tmp_path / "a1", 0), random_adapter(tiny_dir, tmp_path / "a2", 1)
    load_adapter(base, one)
    key_one = with_adapter_hash(key, base)
    heldout_accuracy(base, tokenizer, records, fmt, 6, "fp32", key_one, "adapter")
    delete_adapter(base, "default")
    load_adapter(base, two)
    assert len({key, key_one, with_adapter_hash(key, base)}) == 3
    delete_adapter(base, "default")
    load_adapter(again, one)
    assert with_adapter_hash(key, again) == key_one  # the same adapter on the same base: the same key
    assert heldout_accuracy(again, tokenizer, records, fmt, 6, "fp32", key_one, "adapter")["cached"]
    assert calls == [1] * 5


def test_a_score_an_older_scorer_cached_is_scored_anew(tiny_dir, tmp_path, monkeypatch):
    """Upgrade soak: the key held HELDOUT_CACHE_VERSION 1 through three changes of the exact-match scoring (the stop
    set, a reference's EOS text, the prompt's ids), so a score an older loraforge cached (a Gemma model's 0% from
    generating past <end_of_turn>) was read back as this version's, silently."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    records = read_records(asset("demo_test.jsonl"))[:4]
    fmt = detect_format(records[0])
    base, tokenizer = load_base(str(tiny_dir), dtype="fp32")
    key = model_hash(base, tokenizer)
    older = {"accuracy": 0.0, "correct": 0, "n": 4, "ci95": [0.0, 0.49], "samples": [], "seconds": 9.0}
    with monkeypatch.context() as m:  # what loraforge before version 2 wrote, under its key
        m.setattr(heldout, "HELDOUT_CACHE_VERSION", 1)
        m.setattr(heldout, "score", lambda *args: older)
        assert heldout_accuracy(base, tokenizer, records, fmt, 6, "fp32", key, "base")["cached"] is None
    now = heldout_accuracy(base, tokenizer, records, fmt, 6, "fp32", key, "base")
    reference = accuracy(base, tokenizer, records, fmt, 6, batch_size=heldout.BATCH_SIZE, precision="fp32")
    assert now["cached"] is None
    assert (now["correct"], now["samples"]) == (reference["correct"], reference["samples"])


def test_base_logits_ignore_an_adapter_loaded_later_on_the_same_model(tiny_dir, tmp_path):
    model, _ = load_base(str(tiny_dir), dtype="fp32")
    ids = torch.tensor([[1, 5, 9, 12, 7], [1, 5, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    reference = CachedLogits(model)
    load_adapter(model, random_adapter(tiny_dir, tmp_path / "a", 0))
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=mask).logits
        base = reference(ids, mask)
    valid = mask.bool()
    assert not torch.allclose(tuned[valid], plain[valid], atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(base[valid], plain[valid], atol=1e-5, rtol=1e-5)


# --- loraforge eval at the model's context: the same records in the perplexity and the accuracy ------------------
def test_eval_records_fit_the_context_and_say_what_it_cut(tiny_dir):
    """A context of 128 tokens: a prompt past it is left out of both scores; a long answer is truncated at it for
    the perplexity, a long text cut into windows of it; the line says each."""
    _, tokenizer = load_base(str(tiny_dir), dtype="fp32")
    short = {"instruction": "Add 1 and 2.", "output": "3"}
    long_prompt = {"instruction": "word " * 200, "output": "y"}
    long_answer = {"instruction": "x", "output": "word " * 200}
    kept, examples, line = within_context([short, long_prompt, long_answer], tokenizer, 128)
    assert kept == [short, long_answer]
    reference = [encode(r, tokenizer, "instruction") for r in kept]
    assert [e.input_ids for e in examples] == [r.input_ids[:128] for r in reference]
    assert [e.labels for e in examples] == [r.labels[:128] for r in reference]
    assert len(reference[1].input_ids) > 128  # it was truncated
    assert line == ("at the model's context of 128 tokens: 1 record truncated, 1 record left out of the perplexity "
                    "and the accuracy (the prompt alone fills the context)")
    assert within_context([short], tokenizer, 128) == ([short], [encode(short, tokenizer, "instruction")], None)
    text = [{"text": "word " * 200}, {"text": "hi"}]  # no prompt: cut into windows, every token scored
    kept, examples, line = within_context(text, tokenizer, 128)
    whole = encode(text[0], tokenizer, "text").input_ids
    assert kept == text and [e.input_ids for e in examples] == [whole[:128], whole[127:]] + [
        encode(text[1], tokenizer, "text").input_ids]
    assert line == "at the model's context of 128 tokens: 1 record cut into windows of the context"


def test_eval_with_no_record_within_the_context_says_so_in_eval_terms(tiny_dir):
    _, tokenizer = load_base(str(tiny_dir), dtype="fp32")
    records = [{"instruction": "word " * 200, "output": "y"}, {"instruction": "word " * 150, "output": "y"}]
    shortest = len(prompt_ids(records[1], tokenizer, "instruction"))
    with pytest.raises(DataError, match=re.escape(
            f"no record fits the model's context of 128 tokens: the shortest of the 2 prompts alone takes "
            f"{shortest}, leaving no room for an answer; shorten the prompts, or evaluate a model with a longer "
            f"context")):
        within_context(records, tokenizer, 128)
    with pytest.raises(DataError, match=re.escape("no record fits the model's context of 128 tokens: its prompt "
                                                  "alone takes")):
        within_context(records[:1], tokenizer, 128)


def test_a_study_leaves_out_the_records_past_the_context_with_a_line(tiny_dir, capsys):
    """continual's --previous with a 27,000-token prompt was a ValueError traceback from the greedy decoder, after
    the model loaded and the probes began; `eval` left such records out. The studies now do as eval does."""
    model, tokenizer = load_base(str(tiny_dir))
    records = [{"instruction": "word " * 300, "output": "x"}, {"instruction": "hi", "output": "there"}]
    assert heldout.fitting(records, tokenizer, model, "old task (--previous)") == records[1:]
    assert capsys.readouterr().out == ("old task (--previous): at the model's context of 128 tokens: 1 record left "
                                       "out of the perplexity and the accuracy (the prompt alone fills the context)\n")
