"""Full fine-tuning trains every weight and saves a loadable checkpoint; the forgetting pipeline runs end to end.

The probe scorers themselves are checked against plain formulas in test_probes.py.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import forbid_loading
from loraforge.config import ConfigError, load_train_config
from loraforge.studies.demo import asset
from loraforge.studies import forgetting, rerun
from loraforge.studies.forgetting import (task_split, arm_config, arms, format_report, model_hash, probe_base,
                                          run_forgetting)
from loraforge.training.loop import build_model, train
from loraforge.utils.outputs import OutputError


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


def test_a_quantized_base_is_refused_before_anything_runs(tiny_dir, data_file, tmp_path):
    """The full fine-tuning arm cannot train a quantized base: bitsandbytes' traceback came at that arm, after the
    base's probes and the LoRA arms had run."""
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "model.quantization=nf4"])
    with pytest.raises(ConfigError) as e:
        run_forgetting(cfg, out=tmp_path / "f", progress=False)
    assert e.value.problems == ["model.quantization: nf4: forgetting compares LoRA with full fine-tuning, which "
                                "trains every weight of an unquantized base; remove model.quantization (the LoRA "
                                "arms train as method lora)"]
    assert not (tmp_path / "f").exists()


def test_arm_configs_change_only_method_rank_lr_seed(tiny_dir, data_file, tmp_path):
    cfg = full_config(tiny_dir, data_file, tmp_path)
    lora8, lora64, full = arms((8, 64), lora_lr=1e-3, full_lr=2e-5)
    a = arm_config(cfg, lora64, seed=1, out=tmp_path)
    assert (a.method, a.lora.r, a.lora.lora_alpha, a.training.lr, a.training.seed) == ("lora", 64, 128, 1e-3, 1)
    f = arm_config(cfg, full, seed=0, out=tmp_path)
    assert (f.method, f.training.lr, f.lora) == ("full", 2e-5, cfg.lora)
    assert a.training.max_steps == f.training.max_steps == cfg.training.max_steps
    # The same training data; no held-out loss during training (the probes score the held-out task afterwards).
    assert a.data == f.data == dataclasses.replace(cfg.data, eval=None, eval_fraction=0.0)
    assert a.output_dir != arm_config(cfg, lora64, seed=0, out=tmp_path).output_dir


def test_pipeline_end_to_end_on_tiny_model(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))  # the base's probe results are cached there
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
    assert report["rows"][0]["probes_cached"] is None  # a fresh cache: the base was probed
    assert set(report["time_split"]) == {"training", "loading", "task", "mc", "ppl", "kl"}

    table = format_report(report)
    for text in ("base", "lora r=2 s0", "lora r=4 s1", "full FT s1", "task acc", "MC acc", "acc_norm", "ppl",
                 "KL vs base", "MC drop", "4 held-out"):
        assert text in table, text
    # soak: a tiny KL read 0.0000 per arm and an 896-parameter adapter 0.00M trainable
    for arm in report["summary"][1:]:
        assert f"{arm['kl']['mean']:.4g} [{arm['kl']['min']:.4g}, {arm['kl']['max']:.4g}]" in table
    lora = report["rows"][1]["trainable_params"]
    assert lora < 10_000 and f" {lora:,} " in table
    saved = json.loads((tmp_path / "fg" / "forgetting.json").read_text())
    assert saved["complete"] and saved["rows"][0]["name"] == "base" and len(saved["rows"]) == 7
    assert (tmp_path / "fg" / "forgetting.png").stat().st_size > 0
    assert (Path(report["rows"][-1]["output_dir"]) / "model" / "config.json").is_file()
    assert (Path(report["rows"][1]["output_dir"]) / "adapter" / "adapter_config.json").is_file()


def test_task_split_is_fixed_for_every_seed(tiny_dir, data_file, tmp_path):
    """Without data.eval the held-out task set is split once and written, so every seed is scored on it."""
    from loraforge.training.data import read_records

    cfg = task_split(full_config(tiny_dir, data_file, tmp_path), tmp_path / "fg", "forgetting", False)
    train_rows, held = read_records(cfg.data.train), read_records(cfg.data.eval)
    assert len(train_rows) + len(held) == 40 and len(held) == 4
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in train_rows}


def small_probes():
    from loraforge.training.data import detect_format, read_records
    from loraforge.studies.probes import load_probe

    records = read_records(asset("demo_test.jsonl"))[:3]
    probes = {"mc": load_probe("mc")[:3], "kl": load_probe("kl")[:2],
              "text": "\n".join(load_probe("text").splitlines()[:2])}
    return records, detect_format(records[0]), probes


def test_base_probe_results_an_older_scorer_cached_are_probed_anew(tiny_dir, tmp_path, monkeypatch):
    """Upgrade soak: PROBE_CACHE_VERSION stayed 1 while the task probe's exact match changed (heldout's version 2),
    so an older loraforge's base scores were read back as this version's."""
    from loraforge.models import load_base

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    base, tokenizer = load_base(str(tiny_dir), dtype="fp32")
    records, fmt, probes = small_probes()
    with monkeypatch.context() as m:  # what loraforge before version 2 wrote, under its key
        m.setattr(forgetting, "PROBE_CACHE_VERSION", 1)
        first, cached = probe_base(base, tokenizer, "tiny", records, fmt, False, probes, 8)
    [file] = list((tmp_path / "cache" / "probes").iterdir())
    saved = json.loads(file.read_text())
    saved["scores"]["task"]["accuracy"] = 0.75  # the older scorer's number, unlike this one's
    file.write_text(json.dumps(saved))
    now, cached = probe_base(base, tokenizer, "tiny", records, fmt, False, probes, 8)
    assert cached is None
    assert {k: v for k, v in now.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}


def test_base_probe_results_are_cached_by_weights_and_probe_set(tiny_dir, tmp_path, monkeypatch, capsys):
    from loraforge.models import load_base

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    calls = []
    probe_all = forgetting.probe_all
    monkeypatch.setattr(forgetting, "probe_all", lambda *a, **k: calls.append(1) or probe_all(*a, **k))
    base, tokenizer = load_base(str(tiny_dir), dtype="fp32")
    records, fmt, probes = small_probes()

    first, cached = probe_base(base, tokenizer, "tiny", records, fmt, False, probes, 8)
    assert calls == [1] and cached is None and first["kl"] == {"kl": 0.0, "n_positions": 0}
    # A second invocation, on the same weights loaded again: read back, not probed.
    again, _ = load_base(str(tiny_dir), dtype="fp32")
    assert model_hash(again, tokenizer) == model_hash(base, tokenizer)
    second, cached = probe_base(again, tokenizer, "tiny", records, fmt, False, probes, 8)
    assert calls == [1] and cached is not None and "the base's probes are skipped" in capsys.readouterr().out
    assert second == json.loads(json.dumps(first))  # the numbers as computed (JSON: tuples come back as lists)
    files = list((tmp_path / "cache" / "probes").iterdir())
    assert [f.name for f in files] == [Path(cached).name]  # written atomically: no temporary file left
    json.loads(files[0].read_text())

    # The same examples read from another place (read_records tags each with its file): the same key.
    moved = [{**r, "_source": f"elsewhere.jsonl:{i}"} for i, r in enumerate(records)]
    assert probe_base(base, tokenizer, "tiny", moved, fmt, False, probes, 8)[1] == cached and calls == [1]
    # Another probe set, other settings or other weights: another key, probed again.
    probe_base(base, tokenizer, "tiny", records[:2], fmt, False, probes, 8)
    probe_base(base, tokenizer, "tiny", records, fmt, False, probes, 9)
    with torch.no_grad():
        again.model.norm.weight[0] += 1e-3
    probe_base(again, tokenizer, "tiny", records, fmt, False, probes, 8)
    assert calls == [1, 1, 1, 1]

    # A cache file that is not valid JSON is reported and replaced, never trusted.
    files[0].write_text("{not json")
    probe_base(base, tokenizer, "tiny", records, fmt, False, probes, 8)
    assert calls == [1] * 5 and "ignoring the unreadable probe cache" in capsys.readouterr().out
    assert json.loads(files[0].read_text())["scores"]["mc"] == json.loads(json.dumps(first["mc"]))


def test_probe_progress_names_model_and_probe(tiny_dir, capsys):
    from loraforge.models import load_base

    base, tokenizer = load_base(str(tiny_dir), dtype="fp32")
    records, fmt, probes = small_probes()
    scores = forgetting.probe_all(base, tokenizer, base, records, fmt, False, probes, 8, "lora r=8 seed 0",
                                  progress=True)
    err = capsys.readouterr().err
    for label in ("task accuracy", "multiple choice", "perplexity", "KL vs base"):
        assert f"lora r=8 seed 0: {label}" in err, label
    assert set(scores["seconds"]) == {"task", "mc", "ppl", "kl"} and scores["kl"]["kl"] == 0.0


def test_default_task_is_the_demo_dates_scored_on_their_test_file(tmp_path, monkeypatch):
    """Without CONFIG: trained on demo_train.jsonl, the task scored on the 100 dates of demo_test.jsonl."""
    seen = []
    monkeypatch.setattr(forgetting, "run_forgetting", lambda cfg, *a, **k: seen.append(cfg))
    forgetting.cli_forgetting(out=str(tmp_path / "fg"), overrides=["model.dtype=fp32", "training.precision=fp32"])
    assert (seen[0].data.train, seen[0].data.eval) == (asset("demo_train.jsonl"), asset("demo_test.jsonl"))
    assert seen[0].training.max_steps == forgetting.DEMO_STEPS


def _numbers(report: dict) -> list[dict]:
    """Every row's scores and final loss: what a run computes, without its timings and folders."""
    keep = ("name", "seed", "trainable_params", "final_loss", "task", "mc", "ppl", "kl")
    return [{k: row.get(k) for k in keep} for row in report["rows"]]


def test_a_list_of_sources_runs_as_its_single_file(tiny_dir, data_file, tmp_path, monkeypatch):
    """data.train (and data.eval) as a list of sources, as train reads them: a one-file list gives the numbers of
    that file given alone, also through the held-out split made when data.eval is unset; the CLI checks --out
    against every path of the lists."""
    over = [f"model.name={tiny_dir}", "model.dtype=fp32", "training.max_steps=2", "training.batch_size=4",
            "training.precision=fp32", "training.warmup_steps=0", "training.save_every=0", f"output_dir={tmp_path}"]
    reports = []
    for name, source in (("file", str(data_file)), ("list", f"[{data_file}]")):
        monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / name / "cache"))  # each computes its own numbers
        cfg = load_train_config(None, [*over, f"data.train={source}"])
        reports.append(run_forgetting(cfg, tmp_path / name / "fg", ranks=(2,), limit=4, progress=False))
    assert reports[1]["task_train"] == [{"path": str(tmp_path / "list" / "fg" / "task_train.jsonl"), "format": None,
                                         "weight": None, "epochs": None}]
    assert _numbers(reports[1]) == _numbers(reports[0])
    assert all(row["task"]["n"] == 4 for row in reports[0]["rows"])

    inside = tmp_path / "out" / "held.jsonl"  # an input inside --out, named in a list
    inside.parent.mkdir()
    inside.write_text(data_file.read_text())
    with pytest.raises(OutputError, match=f"contains this command's input {inside}"):
        forgetting.cli_forgetting(overrides=[f"model.name={tiny_dir}", f"data.train=[{data_file}]",
                                             f"data.eval=[{inside}]"], out=str(tmp_path / "out"))


def test_task_split_of_a_list_holds_out_part_of_each_source(tiny_dir, data_file, tmp_path):
    """Each source of 20 or more records gives max(eval_fraction, 0.1) of itself to task_test.jsonl; the rest is
    written per source, keeping its weight; data.eval as a list is scored in full, in order."""
    from loraforge.studies.forgetting import held_out_task
    from loraforge.training.data import DataError, read_records

    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"instruction": f"Echo {i}.", "output": str(i)}) + "\n" for i in range(5)))
    base = [f"model.name={tiny_dir}", f"output_dir={tmp_path}"]
    mix = f"data.train=[{{path: {data_file}, weight: 3}}, {{path: {small}, weight: 1}}]"
    cfg = load_train_config(None, [*base, mix])
    split = task_split(cfg, tmp_path / "fg", "forgetting", False)
    (big, rest) = split.data.sources("train")
    assert (big.weight, rest.weight) == (3, 1) and split.data.eval == str(tmp_path / "fg" / "task_test.jsonl")
    held = read_records(split.data.eval)
    assert len(read_records(big.path)) == 36 and len(held) == 4 and len(read_records(rest.path)) == 5  # 5 < 20: kept
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in read_records(big.path)}

    records, fmt = held_out_task(load_train_config(None, [*base, f"data.train={data_file}",
                                                          f"data.eval=[{small}, {data_file}]"]))
    assert fmt == "instruction" and [r["instruction"] for r in records] == [
        r["instruction"] for r in read_records(small) + read_records(data_file)]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi."},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    with pytest.raises(ConfigError) as e:  # one format per task: its accuracy prompts every example alike
        held_out_task(load_train_config(None, [*base, f"data.train={data_file}", f"data.eval=[{small}, {chat}]"]))
    assert e.value.problems == [
        "data.eval: the task's held-out examples come in several formats (data.eval[0] small.jsonl: instruction, "
        "data.eval[1] chat.jsonl: chat); the task accuracy scores one format: give sources of one format"]
    with pytest.raises(DataError) as e:
        task_split(load_train_config(None, [*base, f"data.train=[{small}, {small}]"]), tmp_path / "fg2", "forgetting",
                   False)
    assert str(e.value) == ("data.train: no source has 20 records to hold some out (data.train[0] small.jsonl: 5, "
                            "data.train[1] small.jsonl: 5) and data.eval is unset; the task accuracy needs held-out "
                            "examples: give 20 or more records, or set data.eval to a file of them")


@pytest.fixture
def no_loading(monkeypatch):
    """Refusals come before the base model loads: loading it fails the test."""
    forbid_loading(monkeypatch, forgetting)


def test_a_rank_given_twice_is_refused_before_anything_loads(tmp_path, no_loading):
    """`--ranks 2 2`: both arms wrote lorar2-seed0; the second was refused after the first trained and was probed."""
    with pytest.raises(ConfigError) as e:
        forgetting.cli_forgetting(out=str(tmp_path / "fg"), ranks=[2, 4, 2])
    assert e.value.problems == ["--ranks: 2 given more than once (each rank is one arm, in a folder of its own); "
                                "give each rank once"]
    assert not (tmp_path / "fg").exists()


def test_an_init_adapter_is_refused_before_anything_loads(tiny_dir, data_file, tmp_path, no_loading):
    """Every arm trains from the base: an init_adapter made the LoRA arms train on from it, and crashed a later arm."""
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data_file}}}\n"
                      f"training: {{init_adapter: {tmp_path / 'old'}}}\n")
    with pytest.raises(ConfigError) as e:
        forgetting.cli_forgetting(str(config), out=str(tmp_path / "fg"))
    assert e.value.problems == [f"training.init_adapter: forgetting trains every arm from the base model, not on "
                                f"from an adapter ({tmp_path / 'old'}); remove training.init_adapter (to measure "
                                f"training on from an adapter, use `loraforge continual --adapter`)"]
    assert not (tmp_path / "fg").exists()


def test_a_run_of_epochs_reports_the_steps_it_trained(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    """training.epochs instead of max_steps: "training None steps" was printed and "steps": null written."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    over = [f"model.name={tiny_dir}", "model.dtype=fp32", f"data.train={data_file}", "training.max_steps=null",
            "training.epochs=1", "training.batch_size=4", "training.precision=fp32", "training.warmup_steps=0",
            "training.save_every=0", f"output_dir={tmp_path}"]
    report = run_forgetting(load_train_config(None, over), tmp_path / "fg", ranks=(2,), limit=2, progress=False)
    out = capsys.readouterr().out
    assert report["steps"] == 9  # 36 training records (4 held out) in batches of 4: one epoch
    assert [r["steps"] for r in report["rows"][1:]] == [9, 9]
    assert json.loads((tmp_path / "fg" / "forgetting.json").read_text())["steps"] == 9
    assert "[lora r=2 seed 0] training 1 epoch at lr" in out and ": 9 steps × batch 4" in out and "None" not in out


@pytest.mark.parametrize("method,why", [
    ("qlora", " on the unquantized base (not nf4: full fine-tuning cannot train a quantized base, and its rounding "
              "would count as the LoRA arms' forgetting)"),
    ("dora", " on the same base")])
def test_a_method_the_arms_do_not_run_is_said_once_with_what_each_arm_runs(tiny_dir, data_file, tmp_path, no_loading,
                                                                          method, why):
    """Soak: a config of method: qlora ran its LoRA arms as plain LoRA on the unquantized base and the full arm as
    full fine-tuning, without a word. One warning before anything loads names the field and what each arm runs; the
    arms' configs are those of method lora (no quantization) and full."""
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", f"method={method}"])
    with pytest.warns(UserWarning) as said, pytest.raises(AssertionError, match="loaded before"):
        run_forgetting(cfg, tmp_path / "fg", ranks=(2, 4), progress=False)
    assert [str(w.message) for w in said if "forgetting runs" in str(w.message)] == [
        f"method: {method}: forgetting runs its own arms, not {method}: the LoRA arms (r=2, r=4) train as method "
        f"lora{why}, the full FT arm as method full; set method: lora to run as asked without this warning"]
    lora, full = (arm_config(cfg, arm, 0, tmp_path) for arm in arms((2,)))
    assert (lora.method, lora.quantization, full.method, full.quantization) == ("lora", None, "full", None)


def test_a_rank_past_the_largest_is_refused_by_its_flag_before_anything_loads(tmp_path, no_loading):
    """`--ranks 70000` was refused by the first arm's config ("invalid config: r: must be a positive integer"),
    after the base's probes, and without naming --ranks."""
    from loraforge.config import MAX_RANK

    with pytest.raises(ConfigError) as e:
        forgetting.cli_forgetting(out=str(tmp_path / "fg"), ranks=[8, 70000, MAX_RANK])
    assert e.value.problems == [f"--ranks: 70000 is more than the largest rank a run takes ({MAX_RANK}); typical "
                                f"ranks are 4-64"]
    with pytest.raises(ConfigError) as e:
        forgetting.check_ranks([0, 4, 4, -2])
    assert e.value.problems == [f"--ranks: 0 is not a rank: give whole numbers from 1 to {MAX_RANK} (typical ranks "
                                f"are 4-64)", f"--ranks: -2 is not a rank: give whole numbers from 1 to {MAX_RANK} "
                                f"(typical ranks are 4-64)",
                                "--ranks: 4 given more than once (each rank is one arm, in a folder of its own); "
                                "give each rank once"]
    assert not (tmp_path / "fg").exists()


def test_a_folder_holding_only_a_task_split_is_not_taken_as_the_studys_own(tmp_path, no_loading, monkeypatch):
    """A study killed before its first result leaves its task split (task_test.jsonl, task_train.jsonl); a file of
    those names is not known to be the study's (a user's own file in --out would be replaced), so the rerun asks
    for --overwrite, naming them, and runs nothing."""
    out = tmp_path / "fg"
    out.mkdir()
    for name in ("task_test.jsonl", "task_train.jsonl", ".lock"):
        (out / name).write_text("{}\n")
    ran = []
    monkeypatch.setattr(forgetting, "run_forgetting", lambda cfg, where, *args, **kw: ran.append(where))
    with pytest.raises(OutputError) as e:
        forgetting.cli_forgetting(out=str(out), ranks=[2])
    assert str(e.value) == (f"--out {out} exists and is not empty (task_test.jsonl, task_train.jsonl); pass "
                            f"--overwrite (overwrite=True) to write into it (only the files this command writes are "
                            f"replaced), or choose another --out")
    assert ran == [] and (out / "task_train.jsonl").read_text() == "{}\n"



def test_run_forgetting_from_python_refuses_a_users_forgetting_json(tiny_dir, data_file, tmp_path):
    """From Python (no CLI check before it), a fresh study deleted a user's own forgetting.json in `out` (and
    forgetting.png) before running. Now it refuses a file it did not write, as write_own does, before any work: the
    user's bytes stay."""
    out = tmp_path / "fg"
    out.mkdir()
    mine = json.dumps({"rows": [{"name": "mine"}]}).encode()
    (out / "forgetting.json").write_bytes(mine)
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "model.dtype=fp32",
                                   "training.max_steps=2", "training.batch_size=4", "training.precision=fp32",
                                   f"output_dir={tmp_path}"])
    with pytest.raises(OutputError) as e:
        run_forgetting(cfg, out, ranks=(2,), limit=4, progress=False)
    assert str(e.value) == (f"--out {out}: forgetting.json is not this command's own (another file of that name, or "
                            f"one changed since it wrote it); pass --overwrite (overwrite=True) to replace it, or "
                            f"choose another --out")
    assert (out / "forgetting.json").read_bytes() == mine and sorted(p.name for p in out.iterdir()) == [
        "forgetting.json"]

def test_a_study_stopped_before_its_first_result_is_rerun_into_its_own_task_split(tiny_dir, data_file, tmp_path,
                                                                                monkeypatch):
    """Soak: a study stopped (Ctrl-C, SIGKILL) while probing the base left its task split, and the rerun without
    --overwrite was refused, naming it. The split is recorded as the study's own (outputs.WRITTEN) before it is
    written: the rerun goes on and gives the uninterrupted run's numbers; a split file changed since is refused."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_dir}, dtype: fp32}}\ndata: {{train: {data_file}}}\n"
                      f"training: {{max_steps: 1, batch_size: 4, precision: fp32, warmup_steps: 0, save_every: 0}}\n")
    real_run, real_load = forgetting.run_forgetting, forgetting.load_base
    monkeypatch.setattr(forgetting, "run_forgetting", lambda *a, **kw: real_run(*a, **kw, limit=2, progress=False))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(forgetting, "load_base", stopped)  # Ctrl-C as the base loads: after the split was written
    for name in ("fg", "changed"):
        with pytest.raises(KeyboardInterrupt):
            forgetting.cli_forgetting(str(config), out=str(tmp_path / name), ranks=[2])
    assert sorted(p.name for p in (tmp_path / "fg").iterdir()) == [".loraforge-written.json", "task_test.jsonl",
                                                                   "task_train.jsonl"]
    monkeypatch.setattr(forgetting, "load_base", real_load)
    forgetting.cli_forgetting(str(config), out=str(tmp_path / "fg"), ranks=[2])  # no --overwrite
    forgetting.cli_forgetting(str(config), out=str(tmp_path / "whole"), ranks=[2])
    again, whole = (json.loads((tmp_path / name / "forgetting.json").read_text()) for name in ("fg", "whole"))
    numbers = [(r["task"]["correct"], r["mc"]["correct"], r["ppl"]["ppl"], r["kl"]["kl"], r.get("final_loss"))
               for r in whole["rows"]]
    assert [(r["task"]["correct"], r["mc"]["correct"], r["ppl"]["ppl"], r["kl"]["kl"], r.get("final_loss"))
            for r in again["rows"]] == numbers and numbers[1][-1] is not None
    assert (tmp_path / "fg" / "task_test.jsonl").read_bytes() == (tmp_path / "whole" / "task_test.jsonl").read_bytes()

    changed = tmp_path / "changed" / "task_train.jsonl"
    changed.write_text(changed.read_text() + json.dumps({"instruction": "mine", "output": "mine"}) + "\n")
    with pytest.raises(OutputError) as e:
        forgetting.cli_forgetting(str(config), out=str(tmp_path / "changed"), ranks=[2])
    assert str(e.value) == (f"--out {tmp_path / 'changed'} exists and is not empty (task_train.jsonl); pass "
                            f"--overwrite (overwrite=True) to write into it (only the files this command writes are "
                            f"replaced), or choose another --out")
    assert changed.read_text().endswith('"mine"}\n')


def test_arms_trained_in_another_precision_than_the_probes_are_reported_in_theirs(tiny_dir, tmp_path, monkeypatch):
    """Soak: the report said the probes' CPU precision ("fp32 compute") while train() ran the arms on a GPU in bf16.
    train() here says bf16, as it does on a GPU (TrainResult.precision)."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    gpu = "precision bf16: NVIDIA H100 80GB HBM3 (compute capability 9.0) has native bf16"
    monkeypatch.setattr(rerun, "train", lambda *a, **kw: dataclasses.replace(train(*a, **kw), precision=gpu))
    over = [f"model.name={tiny_dir}", "model.dtype=fp32", f"data.train={asset('demo_train.jsonl')}",
            f"data.eval={asset('demo_test.jsonl')}", "training.max_steps=1", "training.batch_size=2",
            "training.precision=fp32", "training.warmup_steps=0", "training.save_every=0", f"output_dir={tmp_path}"]
    report = run_forgetting(load_train_config(None, over), tmp_path / "fg", ranks=(2,), limit=2, progress=False)
    assert (report["precision"], report["train_precision"]) == ("fp32", ["bf16"])
    assert format_report(report).splitlines()[0] == (
        f"forgetting on {tiny_dir}: 1 steps × batch 2, 1 seed(s) per arm, fp32 compute (the probes, on the CPU; the "
        f"arms trained in bf16)")
    assert json.loads((tmp_path / "fg" / "forgetting.json").read_text())["train_precision"] == ["bf16"]
    monkeypatch.setattr(rerun, "train", train)  # the same precision: said once, as before
    report = run_forgetting(load_train_config(None, over), tmp_path / "fg2", ranks=(2,), limit=2, progress=False)
    assert report["train_precision"] == [] and ", fp32 compute\n" in format_report(report) + "\n"


def _scores(report: dict) -> list[tuple]:
    """What each row measured (task, MC, perplexity, KL, the last training loss), without timings and folders."""
    return [(r["name"], r["seed"], r["task"]["correct"], r["mc"]["correct"], r["ppl"]["ppl"], r["kl"]["kl"],
             r.get("final_loss")) for r in report["rows"]]


@pytest.mark.parametrize("save_every,how", [(2, "resumed"), (0, "restarted")])
def test_a_study_killed_mid_arm_goes_on_when_run_again(tiny_dir, data_file, tmp_path, monkeypatch, capsys, save_every,
                                                       how):
    """Soak: a study killed while its second arm trained was refused on rerun (its arm folders named, --overwrite
    asked for), and --overwrite trained the finished arm again. The same command now goes on: the finished arm's
    row is kept (not trained or probed again), the killed arm resumes from its newest checkpoint (save_every 2: the
    kill came in step 4) or, with none, trains again from the start; the numbers equal the uninterrupted study's.
    Run with other settings it is still refused, and a finished study run again reads its report back."""
    from loraforge.training import loop

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_dir}, dtype: fp32}}\ndata: {{train: {data_file}}}\ntraining: "
                      f"{{max_steps: 4, batch_size: 4, precision: fp32, warmup_steps: 0, save_every: {save_every}}}\n")
    real_run, real_train, real_step = forgetting.run_forgetting, rerun.train, loop.optimizer_step
    monkeypatch.setattr(forgetting, "run_forgetting", lambda *a, **kw: real_run(*a, **kw, limit=2, progress=False))
    trained = []
    monkeypatch.setattr(rerun, "train", lambda cfg, **kw: trained.append((cfg.method, kw["resume"]))
                        or real_train(cfg, **kw))

    def killed(run, batches):  # SIGKILL in the full arm's 4th step: no checkpoint of it, no Stopped
        if run.cfg.method == "full" and run.step == 3:
            raise KeyboardInterrupt
        return real_step(run, batches)
    monkeypatch.setattr(loop, "optimizer_step", killed)
    with pytest.raises(KeyboardInterrupt):
        forgetting.cli_forgetting(str(config), out=str(tmp_path / "fg"), ranks=[2])
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    partial = json.loads((tmp_path / "fg" / "forgetting.json").read_text())
    assert [r["name"] for r in partial["rows"]] == ["base", "lora r=2"] and not partial["complete"]
    assert [p.name for p in (tmp_path / "fg" / "fullFT-seed0" / "checkpoints").glob("step-*")] == (
        ["step-0000002"] if save_every else [])

    for changed, shown in (({"seeds": 2}, "seeds: 1 -> 2"), ({"lora_lr": 2e-3}, "lora_lr: 0.001 -> 0.002"),
                           ({"overrides": ["training.batch_size=2"]}, "training.batch_size: 4 -> 2")):
        with pytest.raises(OutputError) as e:
            forgetting.cli_forgetting(str(config), out=str(tmp_path / "fg"), ranks=[2], **changed)
        assert str(e.value) == (f"--out {tmp_path / 'fg'} holds a `loraforge forgetting` study run with other "
                                f"settings ({shown}); run it as it was to go on, pass --overwrite (overwrite=True) "
                                f"to start it over (its arms train again), or choose another --out")
    assert trained == [("lora", False), ("full", False)]  # the killed run's: the refusals trained nothing
    trained.clear()
    capsys.readouterr()
    forgetting.cli_forgetting(str(config), out=str(tmp_path / "fg"), ranks=[2])  # the same command, no --overwrite
    said = capsys.readouterr().out
    assert trained == [("full", how == "resumed")]  # the LoRA arm kept, the full arm resumed or trained again
    assert ("fullFT-seed0: going on from its checkpoint step-0000002" in said) == (how == "resumed")
    assert ("fullFT-seed0: stopped before its first complete checkpoint: training it again" in said) == (
        how == "restarted")
    forgetting.cli_forgetting(str(config), out=str(tmp_path / "whole"), ranks=[2])
    rerun_report, whole = (json.loads((tmp_path / name / "forgetting.json").read_text()) for name in ("fg", "whole"))
    assert _scores(rerun_report) == _scores(whole) and rerun_report["complete"]
    assert all(row[-1] is not None for row in _scores(whole)[1:])

    trained.clear()
    again = forgetting.run_forgetting(load_train_config(str(config)), tmp_path / "whole", ranks=[2])
    assert trained == [] and _scores(again) == _scores(whole)  # finished: read back, nothing trained
    assert (tmp_path / "whole" / "forgetting.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_refuses_result_files_edited_since_the_study_wrote_them(tiny_dir, tmp_path, monkeypatch):
    """Soak: a finished study run again from Python trained every arm again and replaced the forgetting.json the
    user had edited since (and a study going on, forgetting.png). A result file changed since the study wrote it
    is refused, naming it and --overwrite, before anything is read back or trained; the user's bytes stay. One
    edited while the study runs is refused at the study's next write of it. Unchanged, the rerun reads back the
    first run's numbers."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    over = [f"model.name={tiny_dir}", "model.dtype=fp32", f"data.train={asset('demo_train.jsonl')}",
            f"data.eval={asset('demo_test.jsonl')}", "training.max_steps=1", "training.batch_size=2",
            "training.precision=fp32", "training.warmup_steps=0", "training.save_every=0", f"output_dir={tmp_path}"]
    real_train, trained = rerun.train, []
    monkeypatch.setattr(rerun, "train", lambda cfg, **kw: trained.append(cfg.method) or real_train(cfg, **kw))

    def study():
        return run_forgetting(load_train_config(None, over), tmp_path / "fg", ranks=(2,), limit=2, progress=False)
    first = study()
    for name in ("forgetting.json", "forgetting.png"):
        file = tmp_path / "fg" / name
        written = file.read_bytes()
        file.write_bytes(written + b"\n")  # the user's edit
        trained.clear()
        with pytest.raises(OutputError) as e:
            study()
        assert str(e.value) == (f"--out {tmp_path / 'fg'}: {name} is not this command's own (another file of that "
                                f"name, or one changed since it wrote it); pass --overwrite (overwrite=True) to "
                                f"replace it, or choose another --out")
        assert file.read_bytes() == written + b"\n" and trained == []
        file.write_bytes(written)
    assert _scores(study()) == _scores(first) and trained == []  # unchanged: read back

    def edited_while_training(cfg, **kw):  # the user edits the report the base's row was written to
        (tmp_path / "run" / "forgetting.json").write_text("mine")
        return real_train(cfg, **kw)
    monkeypatch.setattr(rerun, "train", edited_while_training)
    with pytest.raises(OutputError, match=r"run: forgetting.json is not this command's own"):
        run_forgetting(load_train_config(None, over), tmp_path / "run", ranks=(2,), limit=2, progress=False)
    assert (tmp_path / "run" / "forgetting.json").read_text() == "mine"


def test_a_rerun_on_a_base_folder_whose_weights_changed_is_refused(tiny_dir, data_file, tmp_path, monkeypatch):
    """Soak: the settings a rerun compares held the base's name, not its files: after one module's weights in the
    base folder changed (a LoRA merged into it in place), the rerun went on, mixing arms trained on two bases. The
    base's fingerprint (utils.fingerprint; sampled here as a real model's weights are) is recorded and compared: the
    rerun is refused, naming the folder and --overwrite, before the base loads. A record made before fingerprints
    (none in it) is compared by name, as it was."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from loraforge.utils import fingerprint
    from loraforge.utils.outputs import WRITTEN

    monkeypatch.setattr(fingerprint, "WHOLE", 0)
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    cfg = load_train_config(None, [f"model.name={base}", f"data.train={data_file}", "model.dtype=fp32",
                                   "training.max_steps=1", f"output_dir={tmp_path}"])

    class Loading(Exception):
        """The study got as far as loading the base (its settings recorded): stopped there."""

    def stopped(*args, **kwargs):
        raise Loading
    monkeypatch.setattr(forgetting, "load_base", stopped)
    with pytest.raises(Loading):
        run_forgetting(cfg, tmp_path / "fg", ranks=(2,), progress=False)
    with pytest.raises(Loading):  # the same base: the rerun goes on, up to the base's loading
        run_forgetting(cfg, tmp_path / "fg", ranks=(2,), progress=False)

    weights = base / "model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    name = next(n for n in tensors if "layers.0.self_attn.q_proj" in n)
    save_file({**tensors, name: tensors[name] * 1.01}, weights, metadata=metadata)  # same names, shapes, size
    with pytest.raises(OutputError) as e:
        run_forgetting(cfg, tmp_path / "fg", ranks=(2,), progress=False)
    assert str(e.value) == (f"--out {tmp_path / 'fg'} holds a `loraforge forgetting` study run with other settings "
                            f"(the base model {base} (its weights, config or tokenizer) changed); run it as it was to "
                            f"go on, pass --overwrite (overwrite=True) to start it over (its arms train again), or "
                            f"choose another --out")

    record = json.loads((tmp_path / "fg" / WRITTEN).read_text())
    del record["settings"]["base"]  # as loraforge before fingerprints recorded it
    (tmp_path / "fg" / WRITTEN).write_text(json.dumps(record))
    with pytest.raises(Loading):
        run_forgetting(cfg, tmp_path / "fg", ranks=(2,), progress=False)
