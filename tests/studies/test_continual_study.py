"""The continual study end to end on a tiny model: base, the old adapter, and arms trained on from it (with and
without replay), each scored on the old and the new task; the replay arm's data really mixes the two."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.config import ConfigError, LoraConfig, load_train_config
from loraforge.studies.continual import arm_config, arm_name, arm_slug, cli_continual, format_report, run_continual
from loraforge.studies.demo import asset
from loraforge.models import load_tokenizer
from loraforge.training.data import build_dataset, read_records
from loraforge.training.loop import Stopped, load_data, train
from loraforge.lora.adapters import save_adapter
from loraforge.lora.inject import inject


def adapter_for(config, out: Path) -> str:
    """A rank-2 adapter saved in `out` for the model of that transformers config: its base weights are left
    uninitialized (only the adapter's tensors are saved, and only their shapes are checked up front)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return str(save_adapter(inject(model.to_empty(device="cpu"), LoraConfig(r=2)), out))


@pytest.fixture
def old_adapter(tmp_path) -> str:
    """An adapter folder --adapter can name for the built-in model, the default study's (the checks up front read
    its config and weights and compare its shapes with the base's)."""
    from loraforge.models import load_config

    return adapter_for(load_config("smollm2-135m"), tmp_path / "old")


def task_config(tiny_dir, out, train_file, eval_file, steps=2):
    over = [f"model.name={tiny_dir}", "model.dtype=fp32", f"data.train={train_file}", f"data.eval={eval_file}",
            f"training.max_steps={steps}", "training.batch_size=4", "training.precision=fp32",
            "training.warmup_steps=0", "training.save_every=0", "lora.r=4", "lora.lora_alpha=8", f"output_dir={out}"]
    return load_train_config(None, over)


def test_replay_arm_mixes_old_data_into_the_new_task(tiny_dir, tmp_path):
    cfg = task_config(tiny_dir, tmp_path, asset("times_train.jsonl"), asset("times_test.jsonl"))
    arm = arm_config(cfg, "runs/old/adapter", asset("demo_train.jsonl"), 0.25, tmp_path, sizes=[50])
    (new, old) = arm.data.sources("train")
    assert (new.path, new.weight, old.path, old.weight) == (asset("times_train.jsonl"), 0.75,
                                                            asset("demo_train.jsonl"), 0.25)
    assert arm.training.init_adapter == "runs/old/adapter" and arm.data.eval is None
    plain = arm_config(cfg, "runs/old/adapter", asset("demo_train.jsonl"), 0.0, tmp_path)
    assert plain.data.sources("train") == cfg.data.sources("train") and plain.output_dir != arm.output_dir


def test_replay_is_read_in_its_own_format_not_the_new_tasks(tiny_dir, tmp_path):
    # soak: a chat-format new task (data.format: chat) read the instruction-format replay as chat, and the replay
    # arm failed ("field 'messages' is missing") after the probes and the arm without replay had run
    chat = tmp_path / "times_chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                     {"role": "assistant", "content": r["output"]}]}) + "\n"
                            for r in map(json.loads, Path(asset("times_train.jsonl")).read_text().splitlines())))
    cfg = task_config(tiny_dir, tmp_path, str(chat), str(chat))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format="chat"))
    arm = arm_config(cfg, "old", asset("demo_train.jsonl"), 0.5, tmp_path, sizes=[50])
    train, _, counts, _ = load_data(arm, load_tokenizer(tiny_dir))
    replay = build_dataset(read_records(asset("demo_train.jsonl")), load_tokenizer(tiny_dir), "instruction")[0]
    assert {tuple(e.input_ids) for e in replay} <= {tuple(e.input_ids) for e in train}


def test_replay_arms_keep_the_shares_the_new_tasks_sources_have_without_replay(tiny_dir, tmp_path):
    """Sources without weights are drawn by their records × epochs (750 and 50 × 2 rows: 750/850, 100/850); the
    replay arm gave them equal weights (the 50-row file drawn 0.45 of the time: 14 times over an epoch), so it
    changed the new task's own mix as well as adding replay. Weighted sources keep their weights."""
    cfg = task_config(tiny_dir, tmp_path, "[a.jsonl, {path: b.jsonl, epochs: 2}]", asset("times_test.jsonl"))
    arm = arm_config(cfg, "old", asset("demo_train.jsonl"), 0.2, tmp_path, sizes=[750, 50])
    assert [s.weight for s in arm.data.sources("train")] == pytest.approx([0.8 * 750 / 850, 0.8 * 100 / 850, 0.2])
    weighted = task_config(tiny_dir, tmp_path, "[{path: a.jsonl, weight: 3}, {path: b.jsonl, weight: 1}]",
                           asset("times_test.jsonl"))
    arm = arm_config(weighted, "old", asset("demo_train.jsonl"), 0.2, tmp_path, sizes=[750, 50])
    assert [s.weight for s in arm.data.sources("train")] == pytest.approx([0.6, 0.2, 0.2])


def test_a_rerun_that_is_stopped_leaves_no_earlier_result_in_out(tiny_dir, tmp_path, monkeypatch):
    """--overwrite: a study killed in its first arm left the earlier continual.json, naming adapters it had begun
    to replace, as if it were this study's result; it holds this study's rows so far ("complete": false)."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    old = train(task_config(tiny_dir, tmp_path / "old", asset("demo_train.jsonl"), asset("demo_test.jsonl")),
                progress=False)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "continual.json").write_text('{"rows": []}')

    def stopped(*args, **kwargs):  # Ctrl-C in the first arm
        raise Stopped(2, "stopped by SIGINT after step 1 of 2: checkpoint study/new/checkpoints/step-0000001 saved")

    monkeypatch.setattr("loraforge.studies.rerun.train", stopped)
    cfg = task_config(tiny_dir, tmp_path / "unused", asset("times_train.jsonl"), asset("times_test.jsonl"))
    with pytest.raises(Stopped) as e:
        run_continual(cfg, str(old.output_dir / "adapter"), asset("demo_test.jsonl"), shares=(0.0,),
                      out=tmp_path / "study", general=False, limit=2, progress=False, overwrite=True)
    left = json.loads((tmp_path / "study" / "continual.json").read_text())  # this study's rows so far, not the earlier
    assert [r["name"] for r in left["rows"]] == ["base", "before"] and left["complete"] is False
    # train's stop said a checkpoint was saved; a study has no --resume: the same command goes on
    assert str(e.value).endswith("step-0000001 saved; run the same `loraforge continual` command again to go on (the "
                                 "arms it finished are kept, this one goes on from its checkpoint)")
    assert not e.value.resumable


def test_a_lora_setting_at_its_default_that_the_adapter_contradicts_is_refused_before_out_is_written(tiny_dir,
                                                                                                     tmp_path):
    """lora.r: 8 (the default) against an r=2 adapter trained r=2 without a word (only values other than the
    default were compared), and a refusal came after the task's files were written into --out, so the corrected
    command was refused for a non-empty --out. --previous of text records was found after the model loaded."""
    from loraforge.models import load_config

    old_adapter = adapter_for(load_config(str(tiny_dir)), tmp_path / "old")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {asset('times_train.jsonl')}}}\nlora: {{r: 8}}\n")
    with pytest.raises(ConfigError) as e:
        cli_continual(str(config), adapter=old_adapter, previous=asset("demo_test.jsonl"), replay_share=["0"],
                      out=str(tmp_path / "o"))
    assert e.value.problems[0].startswith(f"lora.r: 8 here, 2 in {tmp_path / 'old' / 'adapter_config.json'}")
    assert not (tmp_path / "o").exists()
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "just text"}\n')
    with pytest.raises(ConfigError) as e:
        cli_continual(str(config), adapter=old_adapter, previous=str(text), replay_share=["0"],
                      out=str(tmp_path / "o"))
    assert e.value.problems == [f"--previous {text}: format 'text' has no reference answer; generation eval needs "
                                f"instruction or chat records"]


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


def test_cli_problems_are_one_line_each(tmp_path, old_adapter):
    with pytest.raises(ConfigError) as e:
        cli_continual(out=str(tmp_path / "o"), replay_share=["0.2", "1.5"], adapter=old_adapter)
    assert e.value.problems == ["--replay-share: 1.5 is not in [0, 1) (0: the new task alone; 0.2: a fifth of each "
                                "batch from --replay)"]


def test_default_study_is_times_after_dates_with_the_adapters_own_settings(tmp_path, monkeypatch, old_adapter):
    seen = {}
    monkeypatch.setattr("loraforge.studies.continual.run_continual",
                        lambda cfg, adapter, previous, replay, shares, out, general, limit, overwrite:
                        seen.update(cfg=cfg, previous=previous, replay=replay, shares=shares, general=general))
    cli_continual(adapter=old_adapter, out=str(tmp_path / "o"), skip_general=True)
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


@pytest.mark.parametrize("shares,given,slug", [(["0.2", "0.2"], "0.2 and 0.2", "replay20"),
                                               (["0", "0.3", "0"], "0 and 0", "new")])
def test_a_share_given_twice_is_refused_up_front(shares, given, slug, tmp_path, old_adapter):
    """Two arms of one share wrote one folder: the second was refused after the first trained and was scored."""
    with pytest.raises(ConfigError) as e:
        cli_continual(out=str(tmp_path / "o"), replay_share=shares, adapter=old_adapter)
    assert e.value.problems == [f"--replay-share: {given} give one arm (folder {slug}); give each share once"]
    assert not (tmp_path / "o").exists()


def test_distinct_shares_get_distinct_names_and_folders():
    """0.001 and 0.004 were both "new + 0% replay" in folder replay0."""
    shares = (0.0, 0.001, 0.004, 0.2, 0.07, 0.5)
    assert [arm_name(s) for s in shares] == ["new task", "new + 0.1% replay", "new + 0.4% replay",
                                             "new + 20% replay", "new + 7% replay", "new + 50% replay"]
    assert [arm_slug(s) for s in shares] == ["new", "replay0.1", "replay0.4", "replay20", "replay7", "replay50"]


def test_an_init_adapter_other_than_adapter_is_refused(tiny_dir, tmp_path):
    """Every arm trains on from --adapter: a config's training.init_adapter was replaced without a word."""
    from loraforge.models import load_config

    old_adapter = adapter_for(load_config(str(tiny_dir)), tmp_path / "old")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {asset('times_train.jsonl')}}}\n"
                      f"training: {{init_adapter: {tmp_path / 'other'}}}\n")
    with pytest.raises(ConfigError) as e:
        cli_continual(str(config), adapter=old_adapter, previous=asset("demo_test.jsonl"),
                      replay_share=["0"], out=str(tmp_path / "o"))
    assert e.value.problems == [f"training.init_adapter: continual trains every arm on from --adapter "
                                f"({tmp_path / 'old'}), not from {tmp_path / 'other'}; remove training.init_adapter, "
                                f"or pass --adapter {tmp_path / 'other'}"]


def test_a_run_of_epochs_reports_the_steps_it_trained(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    """training.epochs instead of max_steps: "training None steps" was printed and "steps": null written."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    old = train(task_config(tiny_dir, tmp_path / "old", data_file, data_file), progress=False)
    cfg = task_config(tiny_dir, tmp_path / "unused", asset("times_train.jsonl"), asset("times_test.jsonl"))
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=None, epochs=1))
    n = len(read_records(asset("times_train.jsonl")))
    report = run_continual(cfg, str(old.output_dir / "adapter"), str(data_file), shares=(0.0,),
                           out=tmp_path / "study", general=False, limit=2, progress=False)
    out = capsys.readouterr().out
    assert report["steps"] == report["rows"][2]["steps"] == n // 4  # batches of 4: one epoch
    assert json.loads((tmp_path / "study" / "continual.json").read_text())["steps"] == n // 4
    assert "[new task] training 1 epoch × batch 4" in out and f", {n // 4} steps × batch 4" in out
    assert "None" not in out


def test_an_adapter_that_cannot_be_read_is_refused_before_any_probe(tmp_path, monkeypatch, old_adapter):
    """A truncated --adapter was found after the base's probes (75 s on 2 cores); the missing default named
    training.init_adapter, not --adapter, and not `loraforge demo`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("loraforge.studies.continual.run_continual", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(ConfigError) as e:
        cli_continual(out=str(tmp_path / "o"))
    assert e.value.problems == ["--adapter runs/demo/adapter: no such folder; run `loraforge demo` first (it trains "
                                "the adapter this study starts from), or give --adapter DIR"]
    weights = Path(old_adapter) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError) as e:
        cli_continual(out=str(tmp_path / "o"), adapter=old_adapter)
    assert e.value.problems[0].startswith(f"--adapter {old_adapter}: {weights} is not a readable safetensors file")


def test_replay_and_an_adapter_for_another_base_are_refused_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    """An empty --replay (or a folder) was refused by the first replay arm's train(), after the probes and the arm
    without replay had trained; an --adapter made for another base passed the checks up front and was refused
    once the base had been probed. Both are found before the model loads, by what a real load would say."""
    from loraforge.lora.adapters import AdapterError, load_adapter
    from loraforge.models import load_base, load_config
    import loraforge.studies.continual as continual

    monkeypatch.setattr(continual, "load_base", lambda *a, **k: pytest.fail("the base model loaded"))
    monkeypatch.setattr(continual, "run_continual", lambda *a, **k: pytest.fail("the study ran"))
    fits = adapter_for(load_config(str(tiny_dir)), tmp_path / "fits")
    wider = load_config(str(tiny_dir))
    wider.hidden_size = 48  # another base: every projection's input is wider
    other = adapter_for(wider, tmp_path / "other")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "keys.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {asset('times_train.jsonl')}}}\n")

    def problems(adapter, replay, shares=("0", "0.2")):
        with pytest.raises(ConfigError) as e:
            cli_continual(str(config), adapter=adapter, previous=asset("demo_test.jsonl"), replay=replay,
                          replay_share=list(shares), out=str(tmp_path / "o"))
        return e.value.problems

    assert problems(fits, str(tmp_path / "empty.jsonl")) == [
        f"--replay {tmp_path / 'empty.jsonl'}: {tmp_path / 'empty.jsonl'}: no records (the file is empty)"]
    assert problems(fits, str(tmp_path)) == [
        f"--replay {tmp_path}: {tmp_path} is a directory; give a .jsonl, .json, .csv, .parquet or .txt file"]
    assert problems(fits, str(tmp_path / "keys.jsonl"))[0].startswith(
        f"--replay {tmp_path / 'keys.jsonl'}: {tmp_path / 'keys.jsonl'}:1: cannot tell the format")
    # What the real load says of the other base's adapter, on the real model, is what is said up front.
    base, _ = load_base(str(tiny_dir))
    with pytest.raises(AdapterError) as real:
        load_adapter(base, other)
    assert problems(other, None, shares=["0"]) == [f"--adapter {other}: {real.value}"]
    assert "of shape (2, 48) in the file, (2, 32) in this model" in str(real.value)
    # share 0 reads no --replay; an adapter that fits passes (the study would run)
    monkeypatch.setattr(continual, "run_continual", lambda *a, **k: None)
    cli_continual(str(config), adapter=fits, previous=asset("demo_test.jsonl"), replay=str(tmp_path / "empty.jsonl"),
                  replay_share=["0"], out=str(tmp_path / "o2"))


def test_a_second_study_into_one_out_is_refused_while_the_first_runs(tiny_dir, tmp_path):
    """Two studies into one --out both ran and both printed "wrote continual.json": the first one's table
    described files the second had replaced. The study holds --out's lock as a training run holds its folder."""
    from loraforge.utils.outputs import OutputError, hold_output

    old = train(task_config(tiny_dir, tmp_path / "old", asset("demo_train.jsonl"), asset("demo_test.jsonl")),
                progress=False)
    cfg = task_config(tiny_dir, tmp_path / "unused", asset("times_train.jsonl"), asset("times_test.jsonl"))
    with hold_output(tmp_path / "study", "--out"):  # the first study, running
        with pytest.raises(OutputError, match=r"another loraforge process \(pid \d+\) is training into --out "):
            run_continual(cfg, str(old.output_dir / "adapter"), asset("demo_test.jsonl"), shares=(0.0,),
                          out=tmp_path / "study", general=False, limit=2, progress=False)


def test_an_8bit_optimizer_without_bitsandbytes_is_refused_before_the_base_loads(old_adapter, tiny_dir, data_file,
                                                                                 tmp_path, monkeypatch):
    """Soak (packaging, no quant extra): continual and forgetting with training.optimizer adamw_8bit loaded and
    probed the base before the first arm's train() found bitsandbytes missing. Both check first now (a None in
    sys.modules hides an installed bitsandbytes from importlib.util.find_spec)."""
    import sys

    from loraforge.studies import continual, forgetting

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for module in (continual, forgetting):
        monkeypatch.setattr(module, "load_base", lambda *a, **k: pytest.fail("the base loaded before the refusal"))
    line = ("training.optimizer: adamw_8bit needs bitsandbytes, which is not installed here: pip install "
            "'loraforge[quant]' (or pip install bitsandbytes)")
    with pytest.raises(ConfigError) as e:
        cli_continual(out=str(tmp_path / "c"), adapter=old_adapter, overrides=["training.optimizer=adamw_8bit"])
    assert e.value.problems == [line]
    task = tmp_path / "task.yaml"
    task.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data_file}, eval: {data_file}}}\n"
                    f"training: {{optimizer: adamw_8bit}}\n")
    with pytest.raises(ConfigError) as e:
        forgetting.cli_forgetting(str(task), out=str(tmp_path / "f"))
    assert e.value.problems == [line]


def test_arms_trained_in_another_precision_than_the_probes_are_reported_in_theirs(tiny_dir, tmp_path, monkeypatch):
    """Soak: the report said the probes' CPU precision ("fp32 compute") while train() ran the arms on a GPU in bf16
    (TrainResult.precision: here as a GPU's train() says it)."""
    from loraforge.studies import continual

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    old = train(task_config(tiny_dir, tmp_path / "old", asset("demo_train.jsonl"), asset("demo_test.jsonl"), steps=1),
                progress=False)
    gpu = "precision fp16 + loss scaling, base stored in fp32: Tesla T4 (compute capability 7.5) has no bf16: fp16"
    arm = continual.train_arm
    monkeypatch.setattr(continual, "train_arm", lambda *a: dataclasses.replace(arm(*a), precision=gpu))
    cfg = task_config(tiny_dir, tmp_path / "unused", asset("times_train.jsonl"), asset("times_test.jsonl"), steps=1)
    report = run_continual(cfg, str(old.output_dir / "adapter"), asset("demo_test.jsonl"), asset("demo_train.jsonl"),
                           shares=(0.0,), out=tmp_path / "study", general=False, limit=2, progress=False)
    assert (report["precision"], report["train_precision"]) == ("fp32", ["fp16 + loss scaling, base stored in fp32"])
    assert (", fp32 compute (the probes, on the CPU; the arms trained in fp16 + loss scaling, base stored in fp32); "
            "old task = greedy exact match" in format_report(report))


def test_a_study_stopped_mid_arm_goes_on_when_run_again(tiny_dir, tmp_path, monkeypatch, capsys):
    """Soak: Ctrl-C in the second arm said "`loraforge continual` has no --resume: run it again with --overwrite",
    which trained the finished arm again. The same study run again goes on: base, before and the finished arm's
    rows kept (not scored or trained again), the stopped arm resumed from the checkpoint its stop saved, the numbers
    those of the study never stopped; other settings are refused."""
    import os
    import signal

    from loraforge.studies import rerun
    from loraforge.training import loop
    from loraforge.utils.outputs import OutputError

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    old = train(task_config(tiny_dir, tmp_path / "old", asset("demo_train.jsonl"), asset("demo_test.jsonl")),
                progress=False)
    cfg = task_config(tiny_dir, tmp_path / "unused", asset("times_train.jsonl"), asset("times_test.jsonl"), steps=3)
    args = (cfg, str(old.output_dir / "adapter"), asset("demo_test.jsonl"), asset("demo_train.jsonl"))

    def study(out, **kw):
        return run_continual(*args, **{"shares": (0.0, 0.5), "out": tmp_path / out, "general": False, "limit": 2,
                                       "progress": False, **kw})
    real_step, real_train = loop.optimizer_step, rerun.train

    def ctrl_c(run, batches):  # Ctrl-C in the replay arm's second step: the run stops after it, checkpointed
        if run.cfg.data.sources("train")[-1].weight == 0.5 and run.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(run, batches)
    monkeypatch.setattr(loop, "optimizer_step", ctrl_c)
    with pytest.raises(Stopped) as e:
        study("study")
    assert "after step 2 of 3" in str(e.value) and str(e.value).endswith(
        "run the same `loraforge continual` command again to go on (the arms it finished are kept, this one goes on "
        "from its checkpoint)")
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    kept = json.loads((tmp_path / "study" / "continual.json").read_text())
    assert [r["name"] for r in kept["rows"]] == ["base", "before", "new task"] and not kept["complete"]
    with pytest.raises(OutputError, match=r"other settings \(shares: \[0.0, 0.5\] -> \[0.0\]\); run it as it was"):
        study("study", shares=(0.0,))

    trained = []
    monkeypatch.setattr(rerun, "train", lambda c, **kw: trained.append(kw["resume"]) or real_train(c, **kw))
    capsys.readouterr()
    again = study("study")
    assert trained == [True] and "replay50: going on from its checkpoint step-0000002" in capsys.readouterr().out
    whole = study("whole")
    numbers = [[(r["name"], r["old"]["correct"], r["new"]["correct"]) for r in report["rows"]]
               for report in (again, whole)]
    assert numbers[0] == numbers[1] and again["complete"]
    for arm in ("new", "replay50"):  # the weights trained: the resumed arm's equal the arm never stopped
        resumed, never = (load_file(tmp_path / out / arm / "adapter" / "adapter_model.safetensors")
                          for out in ("study", "whole"))
        assert resumed.keys() == never.keys()
        for name in never:
            torch.testing.assert_close(resumed[name], never[name], rtol=0, atol=0)


def test_a_rerun_refuses_a_continual_json_edited_since_the_study_wrote_it(tiny_dir, tmp_path, monkeypatch):
    """Soak: a finished study run again from Python trained its arms again and replaced the continual.json the user
    had edited since. It is refused, naming it and --overwrite, before anything trains; unchanged, the rerun reads
    the first run's numbers back."""
    from loraforge.studies import rerun
    from loraforge.utils.outputs import OutputError

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    old = train(task_config(tiny_dir, tmp_path / "old", asset("demo_train.jsonl"), asset("demo_test.jsonl"), steps=1),
                progress=False)
    cfg = task_config(tiny_dir, tmp_path / "unused", asset("times_train.jsonl"), asset("times_test.jsonl"), steps=1)
    real_train, trained = rerun.train, []
    monkeypatch.setattr(rerun, "train", lambda c, **kw: trained.append(c.output_dir) or real_train(c, **kw))

    def study():
        return run_continual(cfg, str(old.output_dir / "adapter"), asset("demo_test.jsonl"), None, shares=(0.0,),
                             out=tmp_path / "study", general=False, limit=2, progress=False)
    first = study()
    report = tmp_path / "study" / "continual.json"
    written = report.read_bytes()
    report.write_bytes(written.replace(b'"complete": true', b'"complete": true, "note": "mine"'))
    trained.clear()
    with pytest.raises(OutputError) as e:
        study()
    assert str(e.value) == (f"--out {tmp_path / 'study'}: continual.json is not this command's own (another file of "
                            f"that name, or one changed since it wrote it); pass --overwrite (overwrite=True) to "
                            f"replace it, or choose another --out")
    assert b'"note": "mine"' in report.read_bytes() and trained == []
    report.write_bytes(written)
    again = study()
    assert trained == [] and [(r["name"], r["old"]["correct"], r["new"]["correct"]) for r in again["rows"]] == [
        (r["name"], r["old"]["correct"], r["new"]["correct"]) for r in first["rows"]]
