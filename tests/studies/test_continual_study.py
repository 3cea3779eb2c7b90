"""The continual study end to end on a tiny model: base, the old adapter, and arms trained on from it (with and
without replay), each scored on the old and the new task; the replay arm's data really mixes the two."""

import json
from pathlib import Path

import pytest
import torch

from loraforge.config import ConfigError, LoraConfig, load_train_config
from loraforge.studies.continual import arm_config, cli_continual, format_report, run_continual
from loraforge.studies.demo import asset
from loraforge.training.loop import train


def task_config(tiny_dir, out, train_file, eval_file, steps=2):
    over = [f"model.name={tiny_dir}", "model.dtype=fp32", f"data.train={train_file}", f"data.eval={eval_file}",
            f"training.max_steps={steps}", "training.batch_size=4", "training.precision=fp32",
            "training.warmup_steps=0", "training.save_every=0", "lora.r=4", "lora.lora_alpha=8", f"output_dir={out}"]
    return load_train_config(None, over)


def test_replay_arm_mixes_old_data_into_the_new_task(tiny_dir, tmp_path):
    cfg = task_config(tiny_dir, tmp_path, asset("times_train.jsonl"), asset("times_test.jsonl"))
    arm = arm_config(cfg, "runs/old/adapter", asset("demo_train.jsonl"), 0.25, tmp_path)
    (new, old) = arm.data.sources("train")
    assert (new.path, new.weight, old.path, old.weight) == (asset("times_train.jsonl"), 0.75,
                                                            asset("demo_train.jsonl"), 0.25)
    assert arm.training.init_adapter == "runs/old/adapter" and arm.data.eval is None
    plain = arm_config(cfg, "runs/old/adapter", asset("demo_train.jsonl"), 0.0, tmp_path)
    assert plain.data.sources("train") == cfg.data.sources("train") and plain.output_dir != arm.output_dir


def test_study_end_to_end_on_tiny_model(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    old = train(task_config(tiny_dir, tmp_path / "old", asset("demo_train.jsonl"), asset("demo_test.jsonl")),
                progress=False)
    cfg = task_config(tiny_dir, tmp_path / "unused", asset("times_train.jsonl"), asset("times_test.jsonl"))
    report = run_continual(cfg, str(old.output_dir / "adapter"), asset("demo_test.jsonl"), asset("demo_train.jsonl"),
                           shares=(0.0, 0.5), out=tmp_path / "study", limit=3, progress=False)
    assert [r["name"] for r in report["rows"]] == ["base", "before", "new task", "new + 50% replay"]
    for row in report["rows"]:
        assert row["old"]["n"] == row["new"]["n"] == row["mc"]["n"] == 3
    assert report["rows"][0]["kl"]["kl"] == 0 and all(r["kl"]["kl"] > 0 for r in report["rows"][1:])
    for row in report["rows"][2:]:
        saved = json.loads((Path(row["output_dir"]) / "adapter" / "adapter_config.json").read_text())
        assert (saved["r"], saved["lora_alpha"]) == (4, 8)  # the old adapter's settings, trained on
    table = format_report(report)
    for text in ("old task acc", "new task acc", "MC acc", "KL vs base", "new + 50% replay", "3 held-out"):
        assert text in table
    assert json.loads((tmp_path / "study" / "continual.json").read_text())["rows"][3]["replay_share"] == 0.5


def test_cli_problems_are_one_line_each(tmp_path):
    with pytest.raises(ConfigError) as e:
        cli_continual(out=str(tmp_path / "o"), replay_share=["0.2", "1.5"], adapter=str(tmp_path))
    assert e.value.problems == ["--replay-share: 1.5 is not in [0, 1) (0: the new task alone; 0.2: a fifth of each "
                                "batch from --replay)"]


def test_default_study_is_times_after_dates_with_the_adapters_own_settings(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("loraforge.studies.continual.run_continual",
                        lambda cfg, adapter, previous, replay, shares, out, general, limit, overwrite:
                        seen.update(cfg=cfg, previous=previous, replay=replay, shares=shares, general=general))
    cli_continual(adapter="runs/dates/adapter", out=str(tmp_path / "o"), skip_general=True)
    cfg = seen["cfg"]
    assert (cfg.data.train, cfg.data.eval) == (asset("times_train.jsonl"), asset("times_test.jsonl"))
    assert (seen["previous"], seen["replay"]) == (asset("demo_test.jsonl"), asset("demo_train.jsonl"))
    assert seen["shares"] == (0.0, 0.2) and seen["general"] is False and cfg.training.max_steps == 24
    assert cfg.lora == LoraConfig()  # nothing set here: the adapter's adapter_config.json decides


def test_lists_of_sources_score_as_their_single_files(tiny_dir, tmp_path, monkeypatch):
    """data.train and data.eval as one-file lists (README, "Keep teaching it"): the same rows, numbers and trained
    adapters as the files given alone, the replay arm's mixture included."""
    from safetensors.torch import load_file

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    old = train(task_config(tiny_dir, tmp_path / "old", asset("demo_train.jsonl"), asset("demo_test.jsonl")),
                progress=False)
    reports = []
    for name, wrap in (("file", str), ("list", lambda path: f"[{path}]")):
        monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / name / "cache"))  # each computes its own numbers
        cfg = task_config(tiny_dir, tmp_path / "unused", wrap(asset("times_train.jsonl")),
                          wrap(asset("times_test.jsonl")))
        reports.append(run_continual(cfg, str(old.output_dir / "adapter"), asset("demo_test.jsonl"),
                                     asset("demo_train.jsonl"), shares=(0.0, 0.5), out=tmp_path / name, limit=3,
                                     progress=False))
    keep = ("name", "old", "new", "mc", "ppl", "kl")
    strip = lambda d: {k: v for k, v in d.items() if k not in ("seconds", "cached")} if isinstance(d, dict) else d
    rows = [[{k: strip(r[k]) for k in keep} for r in report["rows"]] for report in reports]
    assert rows[1] == rows[0] and all(r["kl"]["kl"] > 0 for r in reports[1]["rows"][1:])
    for a, b in zip(reports[0]["rows"][2:], reports[1]["rows"][2:]):
        trained = [load_file(Path(r["output_dir"]) / "adapter" / "adapter_model.safetensors") for r in (a, b)]
        assert trained[0].keys() == trained[1].keys()
        for key in trained[0]:
            assert torch.equal(trained[0][key], trained[1][key]), key
    assert reports[1]["new_eval"] == [asset("times_test.jsonl")]
    assert "3 of times_test.jsonl" in format_report(reports[1])
