"""Full fine-tuning trains every weight and saves a loadable checkpoint; the forgetting pipeline runs end to end.

The probe scorers themselves are checked against plain formulas in test_probes.py.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraforge.config import load_train_config
from loraforge.demo import asset
from loraforge.forgetting import _task_split, arm_config, arms, format_table, run_forgetting
from loraforge.train import build_model, train


def full_config(tiny_dir, data_file, out, steps=3):
    over = [f"model.name={tiny_dir}", "model.dtype=fp32", "method=full", f"data.train={data_file}",
            "data.eval_fraction=0", f"output_dir={out}", "training.lr=1e-3", f"training.max_steps={steps}",
            "training.batch_size=4", "training.precision=fp32", "training.warmup_steps=0", "training.save_every=0"]
    return load_train_config(None, over)


def test_full_makes_every_parameter_trainable(tiny_dir, data_file, tmp_path):
    model, _ = build_model(full_config(tiny_dir, data_file, tmp_path), torch.device("cpu"))
    params = list(model.parameters())
    assert all(p.requires_grad for p in params)
    assert all(p.dtype == torch.float32 for p in params)  # fp32 master weights


def test_full_trains_every_parameter_and_saves_a_loadable_checkpoint(tiny_dir, data_file, tmp_path):
    cfg = full_config(tiny_dir, data_file, tmp_path / "run")
    result = train(cfg, progress=False)
    assert result.trainable_params == result.total_params

    before = dict(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).named_parameters())
    # The final checkpoint holds every trainable tensor exactly as the optimizer left it.
    trained = load_file(next((tmp_path / "run" / "checkpoints").glob("step-*")) / "trainable.safetensors")
    assert trained.keys() == before.keys()
    unchanged = [n for n, w in trained.items() if torch.equal(w, before[n].detach())]
    assert unchanged == [], f"full fine-tuning left these weights untouched: {unchanged}"

    # out/model is a standard transformers checkpoint whose logits equal the trained weights'.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    reference.load_state_dict(trained, strict=False)  # lm_head is tied to the embedding
    assert (tmp_path / "run" / "model" / "tokenizer_config.json").is_file()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_arm_configs_change_only_method_rank_lr_seed(tiny_dir, data_file, tmp_path):
    cfg = full_config(tiny_dir, data_file, tmp_path)
    lora8, lora64, full = arms((8, 64), lora_lr=1e-3, full_lr=2e-5)
    a = arm_config(cfg, lora64, seed=1, out=tmp_path)
    assert (a.method, a.lora.r, a.lora.lora_alpha, a.training.lr, a.training.seed) == ("lora", 64, 128, 1e-3, 1)
    f = arm_config(cfg, full, seed=0, out=tmp_path)
    assert (f.method, f.training.lr, f.lora) == ("full", 2e-5, cfg.lora)
    assert a.data == f.data == cfg.data and a.training.max_steps == f.training.max_steps == cfg.training.max_steps
    assert a.output_dir != arm_config(cfg, lora64, seed=0, out=tmp_path).output_dir


def test_pipeline_end_to_end_on_tiny_model(tiny_dir, tmp_path):
    over = [f"model.name={tiny_dir}", "model.dtype=fp32", f"data.train={asset('demo_train.jsonl')}",
            f"data.eval={asset('demo_test.jsonl')}", "training.max_steps=2", "training.batch_size=4",
            "training.precision=fp32", "training.warmup_steps=0", "training.save_every=0", f"output_dir={tmp_path}"]
    cfg = load_train_config(None, over)
    report = run_forgetting(cfg, tmp_path / "fg", ranks=(2, 4), seeds=2, limit=4, progress=False)

    names = [(r["name"], r["seed"]) for r in report["rows"]]
    assert names == [("base", None)] + [(a, s) for a in ("lora r=2", "lora r=4", "full FT") for s in (0, 1)]
    for row in report["rows"]:
        assert row["task"]["n"] == row["mc"]["n"] == 4
        assert row["ppl"]["n_tokens"] > 0 and row["ppl"]["ppl"] > 1
        assert row["kl"]["kl"] >= 0 if row["seed"] is not None else row["kl"]["kl"] == 0
    assert all(r["kl"]["kl"] > 0 for r in report["rows"][1:])  # every run moved away from the base
    assert [s["name"] for s in report["summary"]] == ["base", "lora r=2", "lora r=4", "full FT"]

    table = format_table(report)
    for text in ("base", "lora r=2 s0", "lora r=4 s1", "full FT s1", "task acc", "MC acc", "acc_norm", "ppl",
                 "KL vs base", "MC drop", "4 held-out"):
        assert text in table, text
    saved = json.loads((tmp_path / "fg" / "forgetting.json").read_text())
    assert saved["complete"] and saved["rows"][0]["name"] == "base" and len(saved["rows"]) == 7
    assert (tmp_path / "fg" / "forgetting.png").stat().st_size > 0
    assert (Path(report["rows"][-1]["output_dir"]) / "model" / "config.json").is_file()
    assert (Path(report["rows"][1]["output_dir"]) / "adapter" / "adapter_config.json").is_file()


def test_task_split_is_fixed_for_every_seed(tiny_dir, data_file, tmp_path):
    """Without data.eval the held-out task set is split once and written, so every seed is scored on it."""
    from loraforge.data import read_records

    cfg = _task_split(full_config(tiny_dir, data_file, tmp_path), tmp_path / "fg")
    train_rows, held = read_records(cfg.data.train), read_records(cfg.data.eval)
    assert len(train_rows) + len(held) == 40 and len(held) == 4
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in train_rows}
