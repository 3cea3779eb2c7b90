"""The command line: merge export, generate, eval, and the built-in model (marked slow)."""

import copy
import dataclasses
import errno
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, modeling_utils

from loraforge import cli, models
from loraforge.cli import main
from loraforge.config import LoraConfig, load_train_config
from loraforge.lora.adapters import load_adapter, save_adapter, set_adapter
from loraforge.lora.inject import inject
from loraforge.lora.merge import add_weighted_adapter, merge_and_unload
from loraforge.models import load_tokenizer
from loraforge.precision import Hardware
from loraforge.serve.connections import HEADER_TIMEOUT_S, MAX_CONNECTIONS
from loraforge.training.data import prompt_ids
from helpers import forbid_loading, randomize


def test_merge_command_writes_a_plain_transformers_checkpoint(tiny_dir, tmp_path):
    model = randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir),
                             LoraConfig(r=4, target_modules="all-linear")))
    from loraforge.lora.adapters import save_adapter

    save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 1000, (2, 9))
    expected = model(ids).logits
    assert main(["merge", "--base", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged")]) == 0
    names = sorted(os.listdir(tmp_path / "merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    # merged W0 + ΔW in fp32 vs the unmerged two-path forward: rounding only
    torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_svd_rank_truncates_as_add_weighted_adapter_does(tiny_dir, tmp_path, capsys):
    """`merge --combination svd` always truncated to the largest rank: the Python API's svd_rank had no flag. Now
    --svd-rank 3 writes the weights add_weighted_adapter(svd_rank=3) merges; without --combination svd it is refused
    in one line naming both flags, before anything loads."""
    adapters = []
    for name, seed in (("a", 1), ("b", 2)):
        model = inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, target_modules="all-linear"))
        save_adapter(randomize(model, seed=seed), tmp_path / name)
        adapters.append(str(tmp_path / name))
    want = AutoModelForCausalLM.from_pretrained(tiny_dir)
    for name, path in zip("ab", adapters):
        load_adapter(want, path, name)
    with pytest.warns(UserWarning, match="svd_rank [23] is below the rank of the combined ΔW"):
        add_weighted_adapter(want, ["a", "b"], [0.7, 0.5], "c", "svd", svd_rank=3)
        set_adapter(want, "c")
        for rank in ("3", None):  # None: the default, the largest adapter rank (2)
            assert main(["merge", "--base", str(tiny_dir), "--adapter", *adapters, "--weights", "0.7", "0.5",
                         "--combination", "svd", "--out", str(tmp_path / f"m{rank}")]
                        + (["--svd-rank", rank] if rank else [])) == 0
    want = merge_and_unload(want).state_dict()
    got, rank2 = load_file(tmp_path / "m3" / "model.safetensors"), load_file(tmp_path / "mNone" / "model.safetensors")
    assert got.keys() <= want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert any(not torch.equal(got[k], rank2[k]) for k in got)  # rank 3, not the default 2
    capsys.readouterr()
    assert main(["merge", "--base", str(tiny_dir), "--adapter", *adapters, "--svd-rank", "3", "--out",
                 str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == ("error: invalid arguments:\n  --svd-rank 3: only with --combination svd (the "
                                       "rank it truncates to; --combination cat keeps every rank): add --combination "
                                       "svd or leave --svd-rank out\n")
    with pytest.raises(SystemExit):
        main(["merge", "--base", str(tiny_dir), "--adapter", *adapters, "--combination", "svd", "--svd-rank", "0",
              "--out", str(tmp_path / "x")])
    assert "argument --svd-rank: '0': give a whole number ≥ 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_generate_streams_the_greedy_answer(tiny_dir, capsys):
    tok = load_tokenizer(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    enc = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    # the reference decodes in fp32; auto would pick bf16 on a CPU that has it
    assert main(["generate", "hi", "--model", str(tiny_dir), "--max-new-tokens", "8", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_generate_past_the_context_is_an_argument_error(tiny_dir, capsys):
    """The prompt and --max-new-tokens are the command's arguments: `invalid arguments:`, not `invalid config:`."""
    assert main(["generate", "hi", "--model", str(tiny_dir), "--max-new-tokens", "200", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "\nerror: invalid arguments:\n  --max-new-tokens 200: the model's context is 128 tokens" in err
    assert main(["generate", "hi " * 200, "--model", str(tiny_dir), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "\nerror: invalid arguments:\n  the prompt takes " in err and "shorten the prompt" in err



def copy_without_chat_template(tiny_dir: Path, tmp_path: Path) -> Path:
    """The tiny model's folder copied, its tokenizer's chat template taken out (a base model's)."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir, plain)
    tok_config = json.loads((plain / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    return plain

def test_generate_without_a_chat_template_puts_the_system_message_first_and_refuses_an_empty_prompt(
        tiny_dir, tmp_path, capsys):
    """A base model's tokenizer with no chat template: --system was dropped without a word, and an empty prompt (no
    token to continue from) ended in a RuntimeError from the decoder."""
    plain = copy_without_chat_template(tiny_dir, tmp_path)
    tok = load_tokenizer(str(plain))
    assert not tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(plain)
    enc = tok("Be brief.\n\nhi", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    args = ["--model", str(plain), "--max-new-tokens", "6", "--precision", "fp32"]
    assert main(["generate", "hi", "--system", "Be brief.", *args]) == 0
    got = capsys.readouterr()
    assert got.out.strip() == expected.strip()
    assert "no chat template: --system is put before the prompt as plain text" in got.err
    assert main(["generate", "", *args]) == 2
    assert ("error: invalid arguments:\n  PROMPT: empty, and the model has no chat template to begin the text; give "
            "a prompt for it to continue") in capsys.readouterr().err


def test_generate_chat_sends_a_model_without_a_chat_template_the_text_chat_training_used(tiny_dir, tmp_path, capsys):
    """Soak: an adapter trained on chat records with a tokenizer that has no chat template learns "### User:" text,
    but generate sent it the raw prompt. --chat sends the ids training read before an answer."""
    plain = copy_without_chat_template(tiny_dir, tmp_path)
    tok = load_tokenizer(str(plain))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"}]
    ids = torch.tensor([prompt_ids({"messages": messages}, tok, "chat")])
    assert tok.decode(ids[0]).endswith("### System:\nBe brief.\n\n### User:\nhi\n\n### Assistant:\n")
    model = AutoModelForCausalLM.from_pretrained(plain)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    args = ["--model", str(plain), "--max-new-tokens", "6", "--precision", "fp32"]
    assert main(["generate", "hi", "--system", "Be brief.", *args]) == 0
    raw = capsys.readouterr().out
    assert main(["generate", "hi", "--system", "Be brief.", "--chat", *args]) == 0
    got = capsys.readouterr()
    assert got.out.strip() == expected.strip() != raw.strip() and "no chat template" not in got.err


def test_errors_name_the_problem(tiny_dir, tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["serve", "--adapter", "no-equals-sign"]) == 2
    assert "write it as NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--adapter-dtype", "fp16"]) == 2
    assert "--adapter-dtype 'fp16': use auto, fp32 or bf16" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: x.jsonl}\ntraining: {lr: fast}\n")
    assert main(["train", str(bad)]) == 2
    assert "training.lr: expected a number, got 'fast'" in capsys.readouterr().err


def test_serve_refuses_an_adapter_name_it_cannot_serve_or_given_twice_before_the_base_loads(tmp_path, monkeypatch,
                                                                                              capsys):
    """Soak: `serve --adapter café=DIR` (or ../x, a/b, a 10,000-character name) loaded the base, then was refused:
    minutes for a large base; `--adapter a=X --adapter a=Y` served Y as a and dropped X, unsaid."""
    from loraforge.serve import api

    forbid_loading(monkeypatch, api)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    rule = "use letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)"
    for name in ["caf\u00e9", "cafe\u0301", "../x", "a/b", "a\nb", "x" * 65]:
        item = f"{name}={tmp_path / 'x'}"
        assert main(["serve", "--adapter", item]) == 2
        err = capsys.readouterr().err
        expected = f"error: invalid arguments:\n  --adapter {item!r}: the name {name!r} is not allowed: {rule}\n"
        assert err == expected, err
    long = "a" * 10_000
    assert main(["serve", "--adapter", f"{long}={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert len(err) < 600 and "(10,000 characters) is not allowed" in err  # cut, with its length said
    assert main(["serve", "--adapter", f"a={tmp_path / 'x'}", "--adapter", f"a={tmp_path / 'y'}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"  --adapter 'a={tmp_path / 'y'}': the name 'a' is given twice (DIR {tmp_path / 'x'} and {tmp_path / 'y'}); "
        f"give each adapter its own name")


def test_serve_refuses_the_base_models_name_for_an_adapter_before_the_base_loads(tmp_path, monkeypatch, capsys):
    """`serve --adapter base=DIR` (or the --model's own name) loaded the base, then Residency.register refused the
    name: the CLI checked only the characters. One rule now (residency.name_refusal), register's words, before it."""
    from loraforge.serve import api

    forbid_loading(monkeypatch, api)
    (tmp_path / "x").mkdir()
    for name, model in [("base", []), ("smollm2-135m", []), ("tiny", ["--model", "tiny"])]:
        item = f"{name}={tmp_path / 'x'}"
        assert main(["serve", *model, "--adapter", item]) == 2
        assert capsys.readouterr().err == (f"error: invalid arguments:\n  --adapter {item!r}: the name {name!r} is "
                                           f"the base model's name; pick another\n")


def test_a_path_too_long_for_the_file_system_is_one_line_naming_it(tiny_dir, data_file, tmp_path, capsys):
    """A folder name over 255 bytes (or a path over 4,096) was an OSError traceback from wherever a command first
    touched it: output_dir, a data file, a model, --out."""
    name = "b" * 300
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data_file}}}\ntraining: {{max_steps: 1}}\n")
    config = [str(yaml)]
    for argv, path in [
        (["train", *config, f"output_dir={tmp_path / name}"], tmp_path / name),
        (["train", *config, f"data.train={tmp_path / name}.jsonl", f"output_dir={tmp_path / 'run'}"],
         f"{tmp_path / name}.jsonl"),
        (["generate", "hi", "--model", str(tmp_path / name)], tmp_path / name),
        (["merge", "--base", str(tiny_dir), "--adapter", str(tmp_path / name), "--out", str(tmp_path / "m")],
         tmp_path / name),
    ]:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: {path}: the name is too long for the file system (a part of the path is "
            f"{len(Path(path).name)} bytes, most allow 255); shorten it")
    deep = tmp_path.joinpath(*["c" * 200] * 25)  # every part allowed, the whole past PATH_MAX
    assert main(["train", *config, f"output_dir={deep}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f": the path is too long for the file system ({len(str(deep))} characters); shorten it")


def test_a_model_folder_with_unreadable_files_is_one_line_naming_the_file(tiny_dir, tmp_path, capsys):
    """A folder saved without its tokenizer, a weights file cut short, a config.json that is not JSON: each was a
    transformers or safetensors traceback from deep in its loader."""
    broken = {}
    for case in ("no-tokenizer", "cut-weights", "bad-config"):
        broken[case] = tmp_path / case
        shutil.copytree(tiny_dir, broken[case])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (broken["no-tokenizer"] / name).unlink(missing_ok=True)
    weights = broken["cut-weights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (broken["bad-config"] / "config.json").write_text('{"model_type": "llama",\n  oops}\n')
    expected = {
        "no-tokenizer": f"error: model {broken['no-tokenizer']}: its tokenizer cannot be read from "
                        f"{broken['no-tokenizer']}: it holds no tokenizer files (tokenizer.json, "
                        f"tokenizer_config.json): save the tokenizer beside the weights "
                        f"(tokenizer.save_pretrained(folder))",
        "cut-weights": f"error: model {broken['cut-weights']}: its weights cannot be read from "
                       f"{broken['cut-weights']}: Error while deserializing header: invalid header length: a weights "
                       f"file is damaged or cut short; save or copy the model again",
        "bad-config": f"error: model {broken['bad-config']}: {broken['bad-config'] / 'config.json'} is not valid JSON "
                      f"(line 2, column 3: Expecting property name enclosed in double quotes); save or copy the "
                      f"model again",
    }
    for case, folder in broken.items():
        assert main(["generate", "hi", "--model", str(folder)]) == 2, case
        assert capsys.readouterr().err.splitlines()[-1] == expected[case]


def test_a_model_file_this_user_may_not_read_is_named_as_permission_denied(tiny_dir, tmp_path, capsys, monkeypatch):
    """Carried over: a model.safetensors of mode 0600 and another owner was "No such file or directory" (what
    safetensors says, passed through), and such a config.json a PermissionError traceback. A user who may not read
    them is simulated (tests may run as root, who may): os.access says no, the loaders fail as they do then."""
    folder = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    weights, config = folder / "model.safetensors", folder / "config.json"
    for f in (weights, config):
        f.chmod(0o600)
    denied, access, read_bytes = {weights}, os.access, Path.read_bytes

    def may_read(path, mode, **kwargs):
        return Path(path) not in denied and access(path, mode, **kwargs)

    def read_denied(path):
        if path in denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_bytes(path)

    def no_such_file(file, *args, **kwargs):  # safetensors' (Rust) answer to EACCES, as transformers passes it on
        raise FileNotFoundError(f"No such file or directory: {file}")

    monkeypatch.setattr(os, "access", may_read)
    monkeypatch.setattr(Path, "read_bytes", read_denied)
    monkeypatch.setattr(modeling_utils, "safe_open", no_such_file)
    said = f"permission denied: this user may not read {{0}} (-rw-------, owner uid {weights.stat().st_uid}); make it "
    assert main(["generate", "hi", "--model", str(folder)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: model {folder}: its weights cannot be read from {folder}: {said.format(weights)}readable (chmod a+r "
        f"{weights}) or run as its owner")
    denied.add(config)
    assert main(["generate", "hi", "--model", str(folder)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: model {folder}: its config cannot be read from {folder}: {said.format(config)}readable (chmod a+r "
        f"{config}) or run as its owner")


@pytest.mark.slow
def test_builtin_model_loads_from_cache_and_answers(smollm2, capsys, monkeypatch):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    # cached: no GGUF is read again (was a 60 s timing, which a loaded machine passed: 53 s alone, over it at load 12)
    for name in ("gguf_model", "convert_gguf"):
        monkeypatch.setattr(models, name, lambda *a, **k: pytest.fail("the GGUF was converted again"))
    main(["generate", "What is the capital of France?", "--max-new-tokens", "12"])
    assert "Paris" in capsys.readouterr().out


def test_eval_probe_runs_without_a_data_file_and_matches_the_scorer(tiny_dir, capsys):
    from loraforge.studies.probes import load_probe, perplexity

    tok = load_tokenizer(str(tiny_dir))
    expected = perplexity(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), tok, load_probe("text"))["ppl"]
    assert main(["eval", "--model", str(tiny_dir), "--probe", "text", "--precision", "fp32"]) == 0  # as the reference
    assert f"perplexity on general text: {expected:.3f}" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_dir)]) == 2
    assert "give a DATA file, or --probe" in capsys.readouterr().err


def test_a_file_whose_name_starts_with_a_dash_is_named_with_the_way_to_give_it(tmp_path, monkeypatch, capsys):
    """Soak: `loraforge eval -x.jsonl` was "unrecognized arguments: -x.jsonl", with no word of the file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-x.jsonl").write_text('{"text": "x"}\n')
    for argv in (["eval", "-x.jsonl"], ["eval", "--limit", "2", "-x.jsonl"]):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        assert capsys.readouterr().err.splitlines()[-1] == (
            "loraforge: error: unrecognized arguments: -x.jsonl (-x.jsonl is a file here: a name that starts with "
            "'-' reads as an option; write ./-x.jsonl, or put -- before it)")
    assert cli.parse_args(["eval", "./-x.jsonl"])["data"] == "./-x.jsonl"
    assert cli.parse_args(["eval", "--", "-x.jsonl"])["data"] == "-x.jsonl"
    with pytest.raises(SystemExit):
        cli.parse_args(["eval", "-y.jsonl"])  # no such file: argparse's line alone
    assert capsys.readouterr().err.splitlines()[-1] == "loraforge: error: unrecognized arguments: -y.jsonl"


def test_a_value_that_starts_with_a_dash_is_named_in_argparses_error_with_the_way_to_give_it(tmp_path, monkeypatch,
                                                                                              capsys):
    """Soak: `merge ... --out -m` was "argument --out: expected one argument", `train -x.yaml` (the file there)
    "the following arguments are required: config", `generate -hello` "argument -h/--help: ignored explicit
    argument 'ello'", none saying the word was read as an option; and an option after `--` was "(did you mean
    --max-new-tokens?)" for --max-new-tokens itself."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-x.yaml").write_text("model: x\n")
    cases = {
        ("merge", "--base", "b", "--adapter", "a", "--out", "-m"): "loraforge merge: error: argument --out: expected "
        "one argument (-m starts with '-', so it reads as an option, not as --out's value: write --out=-m)",
        ("train", "-x.yaml"): "loraforge train: error: the following arguments are required: config (-x.yaml is a "
        "file here: a name that starts with '-' reads as an option; write ./-x.yaml, or put -- before it)",
        ("generate", "-hello"): "loraforge generate: error: argument -h/--help: ignored explicit argument 'ello' "
        "(-hello starts with '-', so it reads as an option; if it is a value, put -- before it)",
        ("generate", "--", "-hello", "--max-new-tokens", "4"): "loraforge: error: unrecognized arguments: "
        "--max-new-tokens (after -- every word is a value: put --max-new-tokens before the --) 4",
        ("train", "--bogus"): "loraforge train: error: the following arguments are required: config (--bogus is "
        "not an option of train)",  # a typo: said, where argparse's line came first and named none
    }
    for argv, line in cases.items():
        with pytest.raises(SystemExit) as e:
            cli.parse_args(list(argv))
        assert (e.value.code, capsys.readouterr().err.splitlines()[-1]) == (2, line)
    # each way the hints name parses as meant
    assert cli.parse_args(["merge", "--base", "b", "--adapter", "a", "--out=-m"])["out"] == "-m"
    assert cli.parse_args(["train", "./-x.yaml"])["config"] == "./-x.yaml"
    assert cli.parse_args(["train", "--", "-x.yaml"])["config"] == "-x.yaml"
    args = cli.parse_args(["generate", "--max-new-tokens", "4", "--", "-hello"])
    assert (args["prompt"], args["max_new_tokens"]) == ("-hello", 4)
    # values argparse takes as they are get no hint: a number, a word with a space
    assert cli.parse_args(["generate", "-5 degrees?", "--temperature", "-0"])["prompt"] == "-5 degrees?"


def test_forgetting_takes_its_config_as_a_positional_argument():
    from loraforge.cli import parse_args

    args = parse_args(["forgetting", "task.yaml", "--seeds", "1", "training.lr=1e-4"])
    assert (args["config"], args["seeds"], args["overrides"]) == ("task.yaml", 1, ["training.lr=1e-4"])
    assert parse_args(["forgetting"])["config"] is None
    args = parse_args(["forgetting", "training.lr=1e-4", "lora.r=4"])  # no CONFIG: the demo task
    assert (args["config"], args["overrides"]) == (None, ["training.lr=1e-4", "lora.r=4"])
    assert parse_args(["train", "a.yaml", "--resume", "lora.r=4"])["overrides"] == ["lora.r=4"]
    # a run's own field, without a section: it was read as the config file ("method=qlora: no such config file")
    args = parse_args(["continual", "--adapter", "a", "method=qlora", "output_dir=o"])
    assert (args["config"], args["overrides"]) == (None, ["method=qlora", "output_dir=o"])
    with pytest.raises(SystemExit):
        parse_args(["train", "a.yaml", "--no-such-flag"])


@pytest.mark.parametrize("command,refused_by", [
    ("demo", ["output_dir=elsewhere"]),  # refused (--out is where demo writes) after the config is read
    ("forgetting", []),  # refused: --out is not empty
    ("continual", ["--replay-share", "2"]),
])
def test_max_steps_given_also_as_an_override_is_warned_about_as_typed_and_the_flag_wins(command, refused_by,
                                                                                          tmp_path, capsys):
    """Soak: `demo --max-steps 5 training.max_steps=7` trained 7 steps, unsaid; forgetting and continual used the
    flag but the warning named training.max_steps=7 and a training.max_steps=5 the user never typed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.warns(UserWarning) as said:
        assert main([command, "--out", str(out), "--max-steps", "5", "training.max_steps=7", *refused_by]) != 0
    assert [str(w.message) for w in said] == ["training.max_steps given twice on the command line "
                                              "(training.max_steps=7, --max-steps 5): the flag, --max-steps 5, is used"]
    assert "error: " in capsys.readouterr().err  # refused before anything loads


def test_quantize_given_also_as_an_override_names_the_flag_as_typed():
    with pytest.warns(UserWarning) as said:
        cfg = load_train_config(None, cli._with_quantize(["data.train=a.jsonl", "model.quantization=int8"], "nf4"))
    assert [str(w.message) for w in said] == ["model.quantization given twice on the command line "
                                              "(model.quantization=int8, --quantize nf4): the flag, --quantize nf4, "
                                              "is used"]
    assert cfg.quantization == "nf4"
    flag = cli._with_quantize([], "nf4")[0]
    copied = copy.deepcopy(flag)  # a copied override list keeps what was typed (it was a TypeError)
    assert (copied, copied.typed) == ("model.quantization=nf4", "--quantize nf4")


def test_train_takes_its_config_after_the_overrides_and_says_when_there_is_none(capsys):
    """The usage says overrides may come anywhere; argparse filed the first one as CONFIG (a TypeError later)."""
    from loraforge.cli import parse_args

    args = parse_args(["train", "lora.r=4", "base.yaml", "training.lr=1e-4"])
    assert (args["config"], args["overrides"]) == ("base.yaml", ["lora.r=4", "training.lr=1e-4"])
    args = parse_args(["forgetting", "lora.r=4", "task.yaml"])
    assert (args["config"], args["overrides"]) == ("task.yaml", ["lora.r=4"])
    with pytest.raises(SystemExit) as e:
        parse_args(["train", "lora.r=4"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: the following arguments are required: config (before "
                                                    "or after the KEY=VALUE overrides)")


@pytest.mark.parametrize("argv,said", [
    (["train", "a.yaml", "--o"], "unrecognized arguments: --o (did you mean --overwrite?)"),
    (["train", "a.yaml", "--overwrit", "--resum"],
     "unrecognized arguments: --overwrit (did you mean --overwrite?) --resum (did you mean --resume?)"),
    (["serve", "--adapters", "a=b"], "unrecognized arguments: --adapters (did you mean --adapters-dir or --adapter?)"),
    (["demo", "--max-step", "3"], "unrecognized arguments: --max-step (did you mean --max-steps?)"),
    (["train", "--config", "a.yaml"],
     "unrecognized arguments: --config (CONFIG is positional: give it without --config)"),
    (["trian", "a.yaml"], "argument command: invalid choice: 'trian' (did you mean train?)"),
    (["train", "a.yaml", "--zzz"], "unrecognized arguments: --zzz"),
])
def test_a_shortened_or_mistyped_option_or_command_is_refused_with_the_name_it_resembles(argv, said, capsys):
    """Soak: argparse took any unique prefix of an option silently: `train x.yaml --o` was --overwrite (a finished
    run started over) and `serve --adapters a=b` was --adapters-dir (its error then named a flag never typed); a
    typo got no hint. Prefixes are off; a name that is not an option is refused with the ones it resembles."""
    from loraforge.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "loraforge: error: " + said
    args = parse_args(["train", "a.yaml", "--overwrite", "lora.r=4"])  # the whole names as before
    assert (args["config"], args["overwrite"], args["overrides"]) == ("a.yaml", True, ["lora.r=4"])


@pytest.mark.parametrize("argv,said", [
    (["eval", "d.jsonl", "--batch-size", "0"],
     "unrecognized arguments: --batch-size (eval has no --batch-size; estimate has it) 0"),
    (["eval", "d.jsonl", "--seeds", "3"], "unrecognized arguments: --seeds (eval has no --seeds; forgetting has it) 3"),
    (["eval", "d.jsonl", "--max-new-token", "4"],
     "unrecognized arguments: --max-new-token (did you mean --max-new-tokens?) 4"),
    (["forgetting", "--seed", "3"], "unrecognized arguments: --seed (did you mean --seeds?)"),
])
def test_an_option_of_another_command_names_that_command_not_a_look_alike(argv, said, capsys):
    """Soak (smalls): `eval --batch-size 0` said "(did you mean --quantize?)": difflib scored the two names with
    their '--' (0.64, past its 0.6 cutoff; 0.56 without). Names are compared without dashes, and an option that
    another command has says which."""
    from loraforge.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "loraforge: error: " + said


@pytest.mark.parametrize("argv,said", [
    (["train", "c.yaml", "--batch-size", "4"],
     "unrecognized arguments: --batch-size (train has no --batch-size; give the config field as "
     "training.batch_size=VALUE) 4"),
    (["demo", "--lr=1e-4"], "unrecognized arguments: --lr=1e-4 (demo has no --lr; give the config field as "
                            "training.lr=VALUE)"),
    (["train", "c.yaml", "--output-dir", "x"],
     "unrecognized arguments: --output-dir (train has no --output-dir; give the config field as output_dir=VALUE) x"),
    (["eval", "d.jsonl", "--batch-size", "0"],  # eval takes no KEY=VALUE: the command that has the option
     "unrecognized arguments: --batch-size (eval has no --batch-size; estimate has it) 0"),
])
def test_an_option_that_is_a_config_field_names_the_key_to_give(argv, said, capsys):
    """`train c.yaml --batch-size 4` said "(train has no --batch-size; estimate has it)", a command that does not
    train: a command taking KEY=VALUE overrides names the config field the option spells."""
    from loraforge.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "loraforge: error: " + said


def test_every_command_prints_its_help(capsys):
    from loraforge.cli import _commands

    for name in [None, *_commands()]:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"] if name else ["--help"])
        assert e.value.code == 0
        assert f"usage: loraforge {name or ''}" in capsys.readouterr().out


def test_every_line_of_a_commands_docstring_reaches_its_help():
    """Soak: `loraforge --help` cut continual's line at its docstring's first line break ("... task accuracy (and
    the"), and `generate --help` cut --chat's at its first line ("... the "### User:" text chat records are"). The
    summary is the docstring's first paragraph, and every Args: line, continuations too, is in its option's help."""
    import argparse

    from loraforge.cli import _commands, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help.replace("%%", "%") for a in sub._choices_actions}
    for name, func in _commands().items():
        doc = inspect.getdoc(func)
        assert summaries[name] == " ".join(doc.split("\n\n")[0].split())
        helps = [a.help.replace("%%", "%") for a in sub.choices[name]._actions if a.help]
        lines = [" ".join(line.split()) for line in doc.split("Args:", 1)[-1].splitlines() if line.strip()]
        missing = [line for line in lines if not any(line.partition(": ")[2] in h or line in h for h in helps)]
        assert missing == [], name
    assert summaries["continual"].endswith("(and the general probes) of the base, the adapter, and the adapter "
                                           "trained on with and without replaying old data.")


def test_help_and_a_mistyped_command_import_no_torch():
    """Soak (packaging): `loraforge --help`, every `loraforge COMMAND --help` and a mistyped command took 7-11 s on
    2 cores: the parser imported the study modules (estimate, forgetting, continual) for their signatures, and they
    import torch and transformers. Now those three are declared in cli.py too; the parser needs no heavy module."""
    script = ("import sys\nfrom loraforge.cli import _commands, main\n"
              "for argv in [['--help'], ['trian'], *([c, '--help'] for c in _commands())]:\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "heavy = [m for m in ('torch', 'transformers', 'numpy', 'fastapi') if m in sys.modules]\n"
              "print(heavy, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stderr.splitlines()[-1] == "[]", proc.stderr[-2000:]


@pytest.mark.parametrize("command,module,function", [("estimate", "estimate", "cli_estimate"),
                                                     ("forgetting", "forgetting", "cli_forgetting"),
                                                     ("continual", "continual", "cli_continual")])
def test_the_studies_commands_pass_every_argument_on(command, module, function, monkeypatch):
    """cli.estimate/forgetting/continual declare the arguments their study's cli_* function takes (the help is built
    from them without importing the study): the same signature, defaults included, and each value arrives."""
    import importlib

    study = importlib.import_module(f"loraforge.studies.{module}")
    ours = inspect.signature(getattr(cli, command))
    assert ours == inspect.signature(getattr(study, function))
    seen = {}
    monkeypatch.setattr(study, function, lambda *args: seen.update(zip(ours.parameters, args)))
    given = {name: f"<{name}>" for name in ours.parameters}
    getattr(cli, command)(**given)
    assert seen == given


def test_bad_probe_and_tiny_task_are_clear_errors(tiny_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--probe", "mmlu"]) == 2
    assert "--probe: unknown probe(s) ['mmlu']; use mc, text and/or kl" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "absent"), "--probe", "kl"]) == 2  # before loading any model
    assert "--probe kl: needs --adapter (KL compares the model with and without it" in capsys.readouterr().err
    small = tmp_path / "small.jsonl"
    small.write_text('{"instruction": "Say hi.", "output": "hi"}\n' * 5)
    task = tmp_path / "task.yaml"
    task.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {small}}}\n")  # no data.eval: split from train
    assert main(["forgetting", str(task), "--out", str(tmp_path / "fg")]) == 2
    assert f"{small} has 5 records and data.eval is unset" in capsys.readouterr().err


def test_eval_probe_kl_without_adapter_is_refused_before_the_precision_line_or_any_loading(tiny_dir, tmp_path, capsys,
                                                                                           monkeypatch):
    """Soak: `eval --probe kl` without --adapter printed the precision line and read DATA before its refusal. Now the
    refusal is the one line the command prints (DATA, absent here, is not read, nor the model loaded); with mc and
    text too, those run as before and kl's line says it needs an adapter."""
    import loraforge.studies.forgetting as forgetting
    from loraforge.studies.probes import load_probe

    forbid_loading(monkeypatch, forgetting)
    assert main(["eval", str(tmp_path / "absent.jsonl"), "--model", str(tiny_dir), "--probe", "kl"]) == 2
    assert capsys.readouterr() == ("", "error: invalid arguments:\n  --probe kl: needs --adapter (KL compares the "
                                       "model with and without it; without one the model is the base and KL is 0)\n")
    monkeypatch.undo()
    short = {"mc": lambda: load_probe("mc")[:8], "text": lambda: load_probe("text")[:300]}  # seconds, not 13
    monkeypatch.setattr(forgetting, "load_probe", lambda name: short[name]())
    assert main(["eval", "--model", str(tiny_dir), "--probe", "mc", "text", "kl", "--precision", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["precision fp32", "MC accuracy", "perplexity on general text",
                                                      "KL vs base"]
    assert lines[-1] == "KL vs base: needs --adapter (without one the model is the base: KL = 0)"


# ------------------------------------------------------------------ precision: eval, generate, serve follow the rule

AVX2 = Hardware("cpu", "CPU", None, "AVX2", False, False)  # as tests/test_precision.py: no native bf16
SAPPHIRE = Hardware("cpu", "CPU", None, "AVX512", True, True)  # AVX-512 BF16 + AMX


@pytest.fixture
def loads(monkeypatch):
    """The storage dtype of every model load (the real load still runs), wherever load_model is imported (load_base
    calls it)."""
    import sys

    import loraforge.models
    import loraforge.serve.api  # noqa: F401  (imports load_base at its top)

    seen, real = [], loraforge.models.load_model

    def load_model(name, dtype="fp32", *args, **kwargs):
        seen.append(dtype)
        return real(name, dtype, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("loraforge") and getattr(module, "load_model", None) is real:
            monkeypatch.setattr(module, "load_model", load_model)
    return seen


@pytest.fixture
def evaluation(monkeypatch):
    """The precision eval hands to mean_token_loss and accuracy (stubbed: a bf16 eval is slow where emulated)."""
    import loraforge.training.evaluate

    seen = {}

    def mean_token_loss(*args, precision, **kwargs):
        seen["loss"] = precision
        return 1.0

    def accuracy(*args, precision, **kwargs):
        seen["accuracy"] = precision
        return {"accuracy": 1.0, "correct": 1, "n": 1, "ci95": (0.0, 1.0)}

    monkeypatch.setattr(loraforge.training.evaluate, "mean_token_loss", mean_token_loss)
    monkeypatch.setattr(loraforge.training.evaluate, "accuracy", accuracy)
    return seen


@pytest.mark.parametrize("hw,line,compute", [
    (AVX2, "precision fp32: this CPU has no native bf16 (AVX2)", "fp32"),
    (SAPPHIRE, "precision bf16: this CPU has native bf16 (AVX512 with AVX-512 BF16/AMX)", "bf16"),
])
def test_eval_precision_is_the_rule_s_choice(hw, line, compute, tiny_dir, data_file, monkeypatch, loads, evaluation,
                                             capsys):
    monkeypatch.setattr("loraforge.precision.detect", lambda device="cpu": hw)
    assert main(["eval", str(data_file), "--model", str(tiny_dir), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == line
    assert loads == [compute] and evaluation == {"loss": compute, "accuracy": compute}


def test_eval_dtype_overrides_the_storage_and_explicit_slow_choices_warn(tiny_dir, data_file, monkeypatch, loads,
                                                                           evaluation, capsys):
    monkeypatch.setattr("loraforge.precision.detect", lambda device="cpu": SAPPHIRE)
    assert main(["eval", str(data_file), "--model", str(tiny_dir), "--limit", "2", "--precision", "bf16",
                 "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("precision bf16, base stored in fp32: ")
    assert loads == ["fp32"] and evaluation == {"loss": "bf16", "accuracy": "bf16"}
    monkeypatch.setattr("loraforge.precision.detect", lambda device="cpu": AVX2)
    loads.clear(), evaluation.clear()
    with pytest.warns(UserWarning, match="without native bf16.*50-200x slower"):
        assert main(["eval", str(data_file), "--model", str(tiny_dir), "--limit", "2", "--precision", "bf16"]) == 0
    assert loads == ["bf16"] and evaluation == {"loss": "bf16", "accuracy": "bf16"}  # as asked


def test_eval_bad_precision_is_named_and_the_old_bf16_flag_is_gone(tiny_dir, data_file, capsys):
    assert main(["eval", str(data_file), "--model", str(tiny_dir), "--precision", "fp8", "--dtype", "int4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid arguments:\n")  # flags, not a config file's fields
    assert "--precision 'fp8': use one of auto, fp32, bf16, fp16" in err
    assert "--dtype 'int4': use one of auto, fp32, bf16, fp16" in err
    with pytest.raises(SystemExit):
        main(["eval", str(data_file), "--bf16"])


def test_eval_probe_gets_the_rule_s_dtype_and_autocast(tiny_dir, monkeypatch, capsys):
    import loraforge.studies.forgetting

    calls = []
    monkeypatch.setattr(loraforge.studies.forgetting, "cli_probe", lambda probe, **kw: calls.append(kw))
    for hw, dtype in ((SAPPHIRE, "bf16"), (AVX2, "fp32")):
        monkeypatch.setattr("loraforge.precision.detect", lambda device="cpu", hw=hw: hw)
        assert main(["eval", "--model", str(tiny_dir), "--probe", "mc"]) == 0
        assert (calls[-1]["dtype"], calls[-1]["precision"]) == (dtype, dtype)
    assert "precision fp32: this CPU has no native bf16 (AVX2)" in capsys.readouterr().out


def test_generate_says_its_precision_on_stderr(tiny_dir, monkeypatch, loads, capsys):
    monkeypatch.setattr("loraforge.precision.detect", lambda device="cpu": SAPPHIRE)
    assert main(["generate", "hi", "--model", str(tiny_dir), "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert "precision bf16: this CPU has native bf16" in err and "precision" not in out  # stdout: the answer only
    assert loads == ["bf16"]


def test_serve_loads_the_base_in_the_rule_s_dtype(tiny_dir, monkeypatch, loads, capsys):
    limits = []  # start-up only
    monkeypatch.setattr("loraforge.serve.api.run_until_signal",  # announce: the start-up line, once it listens
                        lambda app, host, port, log_level, announce, **kw: limits.append(kw))
    monkeypatch.setattr("loraforge.serve.api.check_port", lambda *a: None)  # port 8000 may be another's here
    monkeypatch.setattr("loraforge.precision.detect", lambda device="cpu": SAPPHIRE)
    assert main(["serve", "--model", str(tiny_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("precision bf16: this CPU has native bf16 (AVX512 with "
                                                       "AVX-512 BF16/AMX)")
    assert main(["serve", "--model", str(tiny_dir), "--precision", "fp32", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("precision fp32, base stored in bf16: ")
    assert loads == ["bf16", "bf16"]
    assert limits == [{"header_timeout": 30, "max_connections": 512}] * 2  # the slowloris bounds, on by default
    assert main(["serve", "--model", str(tiny_dir), "--header-timeout", "2.5", "--max-connections", "9"]) == 0
    assert limits[-1] == {"header_timeout": 2.5, "max_connections": 9}
    assert main(["serve", "--precision", "bf17"]) == 2
    assert "--precision 'bf17': use one of" in capsys.readouterr().err


def test_ui_takes_the_connection_guards_serve_does(tiny_dir, tmp_path, monkeypatch, capsys):
    """`loraforge ui` serves the same API: --header-timeout and --max-connections reach its server as serve's do (it
    had neither flag, always 30 s and 512)."""
    limits = []  # start-up only
    monkeypatch.setattr("loraforge.ui.app.run_until_signal",
                        lambda app, host, port, log_level, announce, **kw: limits.append(kw))
    monkeypatch.setattr("loraforge.ui.app.check_port", lambda *a: None)  # port 8000 may be another's here
    monkeypatch.chdir(tmp_path)
    assert main(["ui", "--model", str(tiny_dir)]) == 0
    assert main(["ui", "--model", str(tiny_dir), "--header-timeout", "2.5", "--max-connections", "9"]) == 0
    assert limits == [{"header_timeout": 30, "max_connections": 512}, {"header_timeout": 2.5, "max_connections": 9}]
    # the CLI writes the defaults as literals (it imports no server at start-up): the server's own, for serve too
    assert (HEADER_TIMEOUT_S, MAX_CONNECTIONS) == (30, 512)
    for command in (cli.serve, cli.ui):
        params = inspect.signature(command).parameters
        assert (params["header_timeout"].default, params["max_connections"].default) == (30, 512)
    with pytest.raises(SystemExit):
        main(["ui", "--max-connections", "0"])
    assert "argument --max-connections: '0': give a whole number ≥ 1" in capsys.readouterr().err


@pytest.mark.parametrize("host,allowed,refused", [
    ("127.0.0.1", ["127.0.0.1:8000", "localhost:9000", "[::1]:8000"], ["attacker.example:8000", "box.lan"]),
    ("0.0.0.0", ["attacker.example:8000", "box.lan"], []),
    ("10.0.0.5", ["gpu-box:8000", "10.0.0.5:8000"], [])])  # a network address: reachable by any name there
def test_plain_serve_refuses_a_rebinding_hosts_name_on_loopback_only(tiny_dir, monkeypatch, host, allowed, refused):
    """`loraforge serve` without --ui answered any Host: a page whose name is made to point at 127.0.0.1 (DNS
    rebinding) could list, run, load and unload adapters."""
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr("loraforge.serve.api.run_until_signal", lambda app, *a, **k: apps.append(app))
    monkeypatch.setattr("loraforge.serve.api.check_port", lambda *a: None)  # 10.0.0.5 is not this machine's
    assert main(["serve", "--model", str(tiny_dir), "--host", host, "--precision", "fp32"]
                + ([] if host == "127.0.0.1" else ["--api-key", "k"])) == 0
    client = TestClient(apps[0], base_url="http://127.0.0.1:8000", headers={"Authorization": "Bearer k"})
    for name in allowed:
        assert client.get("/v1/models", headers={"Host": name}).status_code == 200, name
    for name in refused:
        r = client.get("/v1/models", headers={"Host": name})
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            f"Host header {name!r}: not an address this server listens on; open http://127.0.0.1:8000/ (localhost "
            f"and [::1] work too), or start the server with --host set to the name you use"), name
    r = client.delete("/v1/adapters/none", headers={"Origin": "http://localhost:3000"})  # origins: the clients'
    assert r.status_code == 404, r.text



@pytest.mark.parametrize("host,key,warned", [("0.0.0.0", None, True), ("10.0.0.5", None, True),
                                             ("0.0.0.0", "k", False), ("127.0.0.1", None, False),
                                             ("[::1]", None, False), ("localhost", None, False)])
def test_serve_beyond_loopback_without_a_key_says_so(tiny_dir, monkeypatch, capsys, host, key, warned):
    """Security soak: `serve --host 0.0.0.0` without a key started without a word, while anyone who reaches the port
    may load and remove adapters (the dashboard refuses it; a plain server may run open, as vLLM's does)."""
    monkeypatch.setattr("loraforge.serve.api.run_until_signal", lambda app, *a, **k: None)
    monkeypatch.setattr("loraforge.serve.api.check_port", lambda *a: None)  # 10.0.0.5 is not this machine's
    monkeypatch.delenv("LORAFORGE_API_KEY", raising=False)
    assert main(["serve", "--model", str(tiny_dir), "--host", host, "--port", "8123", "--precision", "fp32"]
                + (["--api-key", key] if key else [])) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --host")]
    assert said == ([f"warning: --host {host} without an API key: anyone who reaches port 8123 can generate with "
                     f"this model and load or remove adapters; set LORAFORGE_API_KEY (or --api-key KEY) to require "
                     f"one"] if warned else [])

def test_merge_and_export_bad_input_is_one_error_line(tiny_dir, tmp_path, capsys):
    """Each bad option or adapter: exit 2 and `error: ...` naming it as typed (no traceback), nothing written."""
    from safetensors.torch import load_file, save_file

    from loraforge.lora.adapters import save_adapter

    save_adapter(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4)), tmp_path / "a")
    save_adapter(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, use_dora=True)),
                 tmp_path / "dora")
    (tmp_path / "noB").mkdir()
    (tmp_path / "noB" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    save_file({k: v for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items() if "lora_B" not in k},
              tmp_path / "noB" / "adapter_model.safetensors")
    a, dora, out = str(tmp_path / "a"), str(tmp_path / "dora"), str(tmp_path / "out")
    merge = ["merge", "--base", str(tiny_dir), "--out", out, "--adapter"]
    cases = [
        (merge + [a, a, "--weights", "1"], "--weights [1.0]: give one weight per adapter (2), or none for 1 each"),
        (merge + [a, a, "--weights", "x", "1"], "--weights 'x': give a number per adapter, e.g. --weights 0.7 0.3"),
        (merge + [a, a, "--weights", "nan", "1"], "--weights [nan, 1.0]: nan is not a finite number"),
        (merge + [a, a, "--combination", "foo"], "--combination 'foo': use one of cat, svd, linear"),
        (merge + [a, "--dtype", "fp8"], "--dtype 'fp8': use one of fp32, float32, bf16, bfloat16, fp16, float16"),
        (merge + [a, "--quantize", "nf5"], "--quantize 'nf5': use one of nf4, fp4, int8, or leave it out"),
        (merge + [dora, a], f"cannot combine adapters into one LoRA adapter: '{dora}' uses DoRA (use_dora)"),
        (["export", "--to", "vllm", "--adapter", str(tmp_path / "noB"), "--out", out],
         f"{tmp_path / 'noB'}: base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight has no "
         f"base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight beside it"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error: " in err and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_a_seed_count_past_any_useful_study_is_refused_and_the_help_says_the_range(capsys):
    """Soak (smalls): `forgetting --seeds 1000000000` started a study of 3e9 runs (each seed trains every arm: 3
    runs by default, ~7 min on 2 cores for the demo task). --seeds takes 1 to 100 (a mean's 95% interval narrows
    as 1/sqrt(seeds): 100 give a tenth of one seed's), and --help says so."""
    from loraforge.cli import parse_args

    for given in ("1000000000", "101"):
        with pytest.raises(SystemExit) as e:
            parse_args(["forgetting", "--seeds", given])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"loraforge forgetting: error: argument --seeds: '{given}': give a whole number from 1 to 100 (each seed "
            f"trains every arm again; 100 narrow the intervals to a tenth of one seed's)")
    assert parse_args(["forgetting", "--seeds", "100"])["seeds"] == 100
    with pytest.raises(SystemExit):
        main(["forgetting", "--help"])
    assert "--seeds SEEDS training seeds per arm, 1 to 100 (" in " ".join(capsys.readouterr().out.split())


def test_merge_help_says_the_default_combination_is_exact(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--combination COMBINATION cat (exact), svd (truncated to the largest rank)" in help_text
    assert "(default: cat)" in help_text


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: '0': give a whole number ≥ 1"),
    (["generate", "hi", "--top-p", "-1"], "argument --top-p: '-1': give a number in (0, 1]"),
    (["generate", "hi", "--top-p", "5"], "argument --top-p: '5': give a number in (0, 1]"),
    (["generate", "hi", "--temperature", "1e-300"], "argument --temperature: '1e-300': give 0 for greedy decoding"),
    (["generate", "hi", "--temperature", "-1"], "argument --temperature: '-1': give 0 for greedy decoding"),
    (["generate", "hi", "--temperature", "nan"], "argument --temperature: 'nan': give a finite number"),
    (["generate", "hi", "--seed", str(2**64)], f"argument --seed: '{2**64}': give a whole number from 0 to 2**64 - 1"),
    (["eval", "d.jsonl", "--max-new-tokens", "0"], "argument --max-new-tokens: '0': give a whole number ≥ 1"),
    (["eval", "d.jsonl", "--limit", "-1"], "argument --limit: '-1': give a whole number ≥ 1"),
    (["continual", "--limit", "0"], "argument --limit: '0': give a whole number ≥ 1"),
    (["continual", "--replay-share", "abc"], "argument --replay-share: 'abc': give a number"),
    (["forgetting", "--ranks", "abc"], "argument --ranks: 'abc': give a whole number"),
    (["forgetting", "--ranks", "8", "0"], "argument --ranks: '0': give a whole number ≥ 1"),
    (["forgetting", "--seeds", "0"], "argument --seeds: '0': give a whole number from 1 to 100"),
    (["forgetting", "--full-lr", "nan"], "argument --full-lr: 'nan': give a finite number"),
    (["forgetting", "--lora-lr", "-1"], "argument --lora-lr: '-1': give a number > 0"),
    (["serve", "--port", "-1"], "argument --port: '-1': give a port from 0 to 65535"),
    (["serve", "--port", "99999"], "argument --port: '99999': give a port from 0 to 65535"),
    (["serve", "--max-loaded", "0"], "argument --max-loaded: '0': give a whole number ≥ 1"),
    (["serve", "--max-batch", "0"], "argument --max-batch: '0': give a whole number ≥ 1"),
    (["serve", "--max-queue", "-1"], "argument --max-queue: '-1': give a whole number ≥ 1"),
    (["ui", "--port", "65536"], "argument --port: '65536': give a port from 0 to 65535"),
    (["estimate", "--method", "foo"], "argument --method: invalid choice: 'foo'"),
    (["estimate", "--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
    (["estimate", "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
    (["estimate", "--distributed", "zero"], "argument --distributed: invalid choice: 'zero'"),
    (["estimate", "--batch-size", "-5"], "argument --batch-size: '-5': give a whole number ≥ 1"),
    (["estimate", "--r", "0"], "argument --r: '0': give a whole number ≥ 1"),
    (["estimate", "--gpus", "0"], "argument --gpus: '0': give a whole number ≥ 1"),
    (["estimate", "--model", ""], "argument --model: '' is empty: give a path"),
    (["merge", "--base", "b", "--adapter", "a", "--out", ""], "argument --out: '' is empty: give a path"),
    (["merge", "--base", "", "--adapter", "a", "--out", "o"], "argument --base: '' is empty: give a path"),
    (["eval", ""], "argument data: '' is empty: give a path"),  # was "error:  is a directory"
    (["ui", "--model", ""], "argument --model: '' is empty: give a path"),
    (["ui", "--runs", ""], "argument --runs: '' is empty: give a path"),  # was this folder, silently
    (["serve", "--model", ""], "argument --model: '' is empty: give a path"),
])
def test_bad_option_values_are_refused_where_the_flag_is_declared(argv, message, capsys):
    """argparse refuses them (exit 2, the flag and value as typed), before any model or data loads."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_bad_paths_and_flag_combinations_are_one_error_line(tmp_path, capsys):
    a_file = tmp_path / "f.jsonl"
    a_file.write_text("{}\n")
    missing = str(tmp_path / "missing")
    cases = [
        (["train", str(tmp_path)], f"{tmp_path}: is a directory; give the training YAML file in it"),
        (["forgetting", str(tmp_path)], f"{tmp_path}: is a directory; give the training YAML file in it, e.g. "
                                        f"{tmp_path / 'config.yaml'}"),  # a traceback (IsADirectoryError)
        (["continual", str(tmp_path)], f"{tmp_path}: is a directory; give the training YAML file in it"),
        (["forgetting", missing], f"{missing}: no such config file; give the path of a training YAML file"),
        (["estimate", "--model", "3q"], "--model '3q': give a known size (7b, 13b, 65b, 70b), a transformers"),
        (["estimate", "--model", str(a_file)], f"--model '{a_file}' is a file; give the folder that holds it "
                                               f"({tmp_path}) if that is the model's, or give a known size"),
        (["estimate", "--model", str(tmp_path / "F.JSONL")], f"--model '{tmp_path / 'F.JSONL'}' ({a_file} is there: "
                                                             f"a name that differs in case only; give its name"),
        (["estimate", "--gradient-checkpointing", "--no-gradient-checkpointing"],
         "--gradient-checkpointing and --no-gradient-checkpointing: give one of them"),
        (["serve", "--adapter", f"a={missing}"], f"--adapter 'a={missing}': {missing} is not a directory"),
        (["ui", "--runs", str(a_file)], f"--runs {a_file}: is a file; give a folder"),
        (["ui", "--models-dir", missing], f"--models-dir {missing}: no such folder"),
        (["ui", "--data-dir", missing], f"--data-dir {missing}: no such folder"),
        (["ui", "--adapters-dir", missing], f"--adapters-dir {missing}: no such folder"),  # was after loading
        (["serve", "--adapters-dir", str(a_file)], f"--adapters-dir {a_file}: is a file; give a folder"),
        (["generate", "hi", "--model", str(a_file)], f"model '{a_file}' is a file, not a transformers directory or "
                                                     f"a .gguf file; give the folder that holds it ({tmp_path})"),
        (["export", "--to", "vllm", "--adapter", missing, "--out", str(tmp_path / "o"), "--type", "q8_0"],
         "--type q8_0: --to vllm keeps the adapter's own weights; leave --type out"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)


def test_a_run_stopped_by_a_signal_exits_128_plus_its_number(tmp_path, monkeypatch, capsys):
    """The loop's Stopped reaches main: the exit code a shell gives a process the signal ended (SIGTERM: 143), the
    loop's line on stderr, and for `train` (which has the flag) that --resume continues; a plain Ctrl-C elsewhere
    stays 130. The real signals, in a real process, are in tests/training/test_faults.py."""
    import signal

    import loraforge.studies.demo
    import loraforge.training.loop as loop

    said = "stopped by SIGTERM after step 2 of 6: checkpoint runs/x/checkpoints/step-0000002 saved"

    def stopped(*args, **kwargs):
        raise loop.Stopped(signal.SIGTERM, said)

    monkeypatch.setattr(loop, "train", stopped)
    monkeypatch.setattr(loraforge.studies.demo, "run_demo", stopped)
    config = tmp_path / "c.yaml"
    config.write_text("data: {train: x.jsonl}\n")
    assert main(["train", str(config)]) == 143
    assert capsys.readouterr().err == said + "; continue with --resume\n"
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 143  # demo has no --resume
    assert capsys.readouterr().err == said + "\n"

    finished = "stopped by SIGTERM at the end of the run (step 6 of 6); it had finished: adapter written to runs/x"

    def stopped_at_the_end(*args, **kwargs):
        raise loop.Stopped(signal.SIGTERM, finished, resumable=False)

    monkeypatch.setattr(loop, "train", stopped_at_the_end)
    assert main(["train", str(config)]) == 143
    assert capsys.readouterr().err == finished + "\n"  # nothing to resume

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", ctrl_c)
    assert main(["train", str(config)]) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def interrupted_import(*args, **kwargs):  # Ctrl-C inside an import: the half-made module fails later
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        raise RecursionError("maximum recursion depth exceeded")  # numpy's __getattr__, 900 lines deep

    monkeypatch.setattr(loop, "train", interrupted_import)
    assert main(["train", str(config)]) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def broken(*args, **kwargs):  # the same error without a Ctrl-C is a bug to show, not an interruption
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(loop, "train", broken)
    with pytest.raises(RecursionError):
        main(["train", str(config)])

    import loraforge.training.distributed as distributed  # a second Ctrl-C during the clean-up: no traceback
    monkeypatch.setattr(loop, "train", stopped)
    monkeypatch.setattr(distributed, "leave_processes", ctrl_c)
    assert main(["train", str(config)]) == 130
    assert capsys.readouterr().err == said + "; continue with --resume\ninterrupted\n"


KILLED_WHILE_WRITING = """
import os, signal, sys, time
import loraforge.lora.merge as merge
from loraforge.cli import main
from loraforge.utils.files import atomic_dir

for s in (signal.SIGTERM, signal.SIGHUP):  # as a terminal's shell starts a command: a test run under nohup
    signal.signal(s, signal.SIG_DFL)      # passes its ignored SIGHUP on (and ignored stays ignored: test_faults)

def killed(base, adapters, out, **kwargs):
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(bytes(1000))
        os.kill(os.getpid(), signal.Signals[sys.argv[2]])
        time.sleep(60)

merge.export_merged = killed
code = main(["merge", "--base", "b", "--adapter", "a", "--out", sys.argv[1]])
print(all(signal.getsignal(s) == signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGHUP)))
sys.exit(code)
"""


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_command_killed_while_writing_removes_its_temporary_folder_and_exits_128_plus_the_signal(
        signame, code, tmp_path):
    """Soak: SIGTERM (`kill`, `docker stop`) or SIGHUP during a merge's write ended the process where it stood: its
    `.tmp-OUT-*` folder (400 MB for the built-in model) stayed beside --out until a rerun into the same --out. The
    signal now unwinds the command (atomic_dir removes its folder), one line says so, the exit is 128 + its number,
    and the signals are given back as they were."""
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(out), signame], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stderr == f"stopped by {signame} before the command finished\n"
    assert proc.stdout == "True\n"
    assert list(tmp_path.iterdir()) == []


def test_trains_last_line_names_the_folder_it_wrote():
    from pathlib import Path

    from loraforge.cli import finished_line
    from loraforge.training.loop import TrainResult
    from loraforge.training.report import peak_memory_name

    result = TrainResult(output_dir=Path("runs/x"), steps=4, final_loss=1.23456, eval_loss=None, train_tokens=100,
                         seconds=2.0, tokens_per_second=50.0, peak_memory_mb=1234.4, trainable_params=1,
                         total_params=2, data_stats={})
    assert finished_line(result) == ("adapter written to runs/x/adapter after 4 steps: final loss 1.2346, "
                                     "50 tokens/s while training, peak memory 1234 MB")
    slow = dataclasses.replace(result, aside_seconds=9.2)  # a held-out evaluation's 9 s: not in tokens/s
    assert finished_line(slow).endswith("50 tokens/s while training (evaluating and saving took 9 s more), peak "
                                        "memory 1234 MB")
    full = dataclasses.replace(result, saved="model")
    assert finished_line(full).startswith("model written to runs/x/model after 4 steps")
    some = dataclasses.replace(result, skipped_steps=1)  # fp16: a step the loss scaler skipped made no update
    assert finished_line(some).startswith("adapter written to runs/x/adapter after 4 steps (1 of them skipped, their "
                                          "fp16 gradients overflowed; skipped_steps in metrics.jsonl): final loss ")
    every = dataclasses.replace(result, skipped_steps=4)
    assert finished_line(every).startswith("adapter written to runs/x/adapter after 4 steps (4 of them skipped, their "
                                           "fp16 gradients overflowed: the weights were never updated; skipped_steps "
                                           "in metrics.jsonl): final loss ")
    gpu = dataclasses.replace(result, device_type="cuda")  # torch.cuda.max_memory_allocated: not the process's RSS
    assert finished_line(gpu).endswith("50 tokens/s while training, peak GPU memory 1234 MB (max allocated)")
    assert [peak_memory_name(kind) for kind in ("cpu", "cuda")] == ["peak memory (RSS)",
                                                                    "peak GPU memory (max allocated)"]  # demo's row
    again = dataclasses.replace(result, tokens_per_second=0.0, already_finished=True)  # --resume of a finished run
    assert finished_line(again) == "adapter written to runs/x/adapter: the run had already finished its 4 steps, " \
                                   "nothing left to resume"
    diverged = dataclasses.replace(result, nonfinite_evals={"count": 2, "of": 4, "step": 2})  # null in metrics.jsonl
    assert finished_line(diverged).endswith("peak memory 1234 MB; 2 of 4 held-out losses were not finite (null in "
                                            "metrics.jsonl), the first at step 2")


def test_our_warnings_are_one_line_and_others_keep_pythons_form():
    """`loraforge train examples/demo.yaml method=full lora.r=4` printed '/path/loraforge/cli.py:94: UserWarning:
    ...' and a line of our source before the message."""
    import warnings

    import loraforge.config
    from loraforge.cli import one_line_warnings

    one_line_warnings()
    one_line_warnings()  # once is enough: not wrapped twice
    assert warnings.formatwarning("lora.r: ignored", UserWarning, loraforge.config.__file__, 94,
                                  "warnings.warn(...)") == "warning: lora.r: ignored\n"
    theirs = warnings.formatwarning("deprecated", FutureWarning, "/site-packages/lib.py", 3, "x = 1")
    assert theirs == "/site-packages/lib.py:3: FutureWarning: deprecated\n  x = 1\n"


def test_eval_reads_its_data_before_any_probe_and_a_diverged_loss_is_inf_perplexity(tiny_dir, tmp_path, capsys):
    """A missing DATA file was found only after every --probe had run (a minute on the built-in model); a mean
    token loss past ~709.78 made math.exp raise OverflowError (a traceback) where the perplexity is inf."""
    import math

    from loraforge.training.evaluate import perplexity_of

    assert main(["eval", str(tmp_path / "nope.jsonl"), "--probe", "text", "--model", str(tiny_dir)]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: no such file: {tmp_path / 'nope.jsonl'}\n" and "perplexity" not in out
    assert perplexity_of(2.0) == math.exp(2.0) and perplexity_of(709.0) == math.exp(709.0)
    assert perplexity_of(709.79) == perplexity_of(1e9) == math.inf


def _overflowing_in_fp16(tiny_dir, out: Path) -> Path:
    """tiny_dir's model with MLP weights that keep every value within fp16's range (|W| < 65504) but make its
    activations pass it: finite logits in fp32 and bf16, inf/NaN computed in fp16 (T5 and large models do this)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(50)
            layer.mlp.down_proj.weight.mul_(5e5).clamp_(-6e4, 6e4)
    model.save_pretrained(out)
    load_tokenizer(str(tiny_dir)).save_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        with torch.autocast("cpu", dtype=torch.float16):
            assert not torch.isfinite(model(ids).logits).all()
    return out


@pytest.mark.filterwarnings("ignore:--precision fp16 on a CPU", "ignore:--dtype fp16 on a CPU")
def test_generate_and_eval_refuse_an_fp16_forward_that_overflowed(tiny_dir, data_file, tmp_path, capsys):
    """Soak: in fp16 (transformers' generate, not the fp32 static decoder) greedy `generate` printed an empty answer
    and exited 0 (a NaN logit is the argmax: token 0, the end of text), sampling ended in torch.multinomial's
    traceback, and `eval` printed "perplexity: inf (mean token loss nan)" and exited 0; each now says fp16
    overflowed and what to use instead."""
    model = str(_overflowing_in_fp16(tiny_dir, tmp_path / "model"))
    fix = "fp16 holds values only up to ±65504, which this forward passed; use "
    fp16 = f"{fix}--precision fp32 (or bf16 where the hardware has it), with --dtype auto or fp32\n"
    for flags, said in [(["--precision", "fp16"], fp16), (["--precision", "fp16", "--temperature", "0.7"], fp16),
                        (["--precision", "fp32", "--dtype", "fp16"], f"{fix}--dtype fp32 (or bf16)\n")]:
        assert main(["generate", "hi", "--model", model, "--max-new-tokens", "4", *flags]) == 2
        out, err = capsys.readouterr()
        assert out.strip() == "" and err.endswith(f"error: the model's logits are not finite after 0 tokens: {said}")
    assert main(["eval", str(data_file), "--model", model, "--limit", "2", "--precision", "fp16"]) == 2
    out, err = capsys.readouterr()
    assert "perplexity" not in out
    said = f"error: the mean token loss over 2 examples is nan (the model's logits are not finite): {fp16}"
    assert err.endswith(f"\n{said}")
    # the same model in fp32 answers and evaluates: the overflow is fp16's
    assert main(["generate", "hi", "--model", model, "--max-new-tokens", "4", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["eval", str(data_file), "--model", model, "--limit", "2", "--precision", "fp32",
                 "--max-new-tokens", "2"]) == 0
    assert "perplexity: " in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:--dtype fp16 on a CPU")
def test_a_base_past_fp16_s_range_is_refused_in_fp16_not_loaded_as_inf(tiny_dir, tmp_path, capsys):
    """Soak: a weight of 1e5 (past fp16's 65504) became inf when the base loaded in fp16, without a word: NaN logits
    everywhere, and `merge --dtype fp16` of a base whose config says float16 (so it loads in fp16) wrote the inf
    into the merged checkpoint, in a layer no adapter covers (merge checks the layers it merges)."""
    from loraforge.lora.adapters import save_adapter
    from loraforge.models import load_model

    base = tmp_path / "base"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = -1e5
    model.save_pretrained(base)
    load_tokenizer(str(tiny_dir)).save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))  # fp32 values, config says fp16
    save_adapter(randomize(inject(model, LoraConfig(r=4, target_modules=["q_proj"]))), tmp_path / "adapter")
    said = (f"model {base}: model.layers.1.mlp.down_proj.weight holds values up to 1e+05, past fp16's ±65504, which "
            f"stored in fp16 are inf; load the base in bf16 or fp32 (train: model.dtype, which follows "
            f"training.precision; eval, generate, serve, merge: --dtype, which follows --precision)")
    with pytest.raises(FloatingPointError) as error:
        load_model(str(base), dtype="fp16")
    assert str(error.value) == said
    held = load_model(str(base), dtype="bf16").model.layers[1].mlp.down_proj.weight[3, 5]  # bf16 has fp32's range
    assert torch.equal(held, torch.tensor(-1e5).to(torch.bfloat16)) and held.isfinite()
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged"), "--dtype", "fp16"]) == 2
    # merge loads the base in its stored dtype (fp32 here, whatever the config says: models.stored_dtype), so the
    # base's own weight is refused before the cast to --dtype fp16, naming the base and not an adapter
    assert capsys.readouterr().err.endswith(
        f"error: cannot merge into --dtype fp16: the base {base}'s own weight model.layers.1.mlp.down_proj.weight "
        f"passes float16's range (|W| up to 1e+05) before any adapter is added; merge in fp32 or bf16\n")
    assert not (tmp_path / "merged").exists()
    assert main(["generate", "hi", "--model", str(base), "--dtype", "fp16", "--precision", "fp32"]) == 2
    assert capsys.readouterr().err.endswith(f"error: {said}\n")


def test_eval_refuses_a_bad_record_before_the_model_loads(tiny_dir, tmp_path, loads, capsys):
    """Soak: a record without an answer was refused after the base model loaded (minutes for a 7B base)."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["eval", str(path), "--model", str(tiny_dir)]) == 2
    assert capsys.readouterr().err == (f"error: record 1: {path}:2: field 'messages' has no assistant turn: nothing "
                                       f"to learn or score\n")
    assert loads == []


def test_generate_refuses_text_that_is_not_utf8_before_loading(capsys):
    """A Latin-1 byte in a prompt ($(cat latin1.txt)) reaches Python as a lone surrogate, which the tokenizer
    refused with a transformers traceback after the model loaded: argparse refuses it, naming the byte."""
    for argv, flag, what in [(["generate", "caf\udce9 au lait"], "prompt", "the byte 0xe9 at position 3"),
                             (["generate", "hi", "--system", "\ud83d!"], "--system", "half a character (U+D83D) at "
                                                                                     "position 0")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"loraforge generate: error: argument {flag}: it holds {what}, which is not UTF-8 text; re-encode it "
            f"(e.g. iconv -f latin1 -t utf-8) or use a UTF-8 terminal")


def ascii_locale(text: str) -> str:
    """`text` as Python reads it from the command line in a C locale without its UTF-8 mode (LC_ALL=C with
    PYTHONUTF8=0): every byte past ASCII a lone surrogate."""
    return text.encode().decode("ascii", "surrogateescape")


def test_utf8_typed_under_an_ascii_locale_is_read_and_a_latin1_name_is_refused(capsys, monkeypatch):
    """Soak, LC_ALL=C PYTHONUTF8=0: `generate "日本語"` was refused as "the byte 0xe6 ... is not UTF-8 text" (it is);
    a path holding a Latin-1 byte (`--model tin$'\\xe9'`) was a tokenizers traceback and `--adapter` one "no such
    adapter folder" for a folder that is there; an override with one "not valid YAML ... quote a string". The prompt
    is now read as typed; a path or override that is not UTF-8 is refused naming the byte or the locale, and the fix."""
    from loraforge.cli import parse_args
    from loraforge.config import ConfigError, load_train_config

    assert parse_args(["generate", ascii_locale("日本語で 1 と 2 🎉")])["prompt"] == "日本語で 1 と 2 🎉"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "tin\udce9"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "loraforge eval: error: argument --model: it holds the byte 0xe9 at position 3, which is not UTF-8; use a "
        "UTF-8 name (rename a Latin-1 one: convmv -f latin1 -t utf-8 --notest NAME)")
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "ascii")
    with pytest.raises(SystemExit):
        main(["merge", "--base", "b", "--adapter", "a", "--out", ascii_locale("runs/マージ")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "loraforge merge: error: argument --out: the locale's encoding (ascii: LC_ALL=C or LANG=C with PYTHONUTF8=0) "
        "cannot read its non-ASCII characters; run with PYTHONUTF8=1 or LC_ALL=C.UTF-8")
    # a config's own paths in that locale: output_dir was a UnicodeEncodeError traceback, a data file "no such file"
    with pytest.raises(ConfigError) as e:
        load_train_config(None, ["output_dir=runs/出力", "data.train=データ/学習.jsonl"])
    locale = ("the locale's encoding (ascii: LC_ALL=C or LANG=C with PYTHONUTF8=0) cannot read its non-ASCII "
              "characters; run with PYTHONUTF8=1 or LC_ALL=C.UTF-8")
    assert str(e.value).splitlines()[1:] == [f"  output_dir: 'runs/出力': {locale}", f"  data: 'データ/学習.jsonl': {locale}"]
    monkeypatch.undo()
    with pytest.raises(ConfigError) as e:
        load_train_config(None, ["output_dir=runs/caf\udce9"])
    assert str(e.value).splitlines()[-1].strip() == (
        "override output_dir: it holds the byte 0xe9 at position 8, which is not UTF-8; use a UTF-8 name (rename a "
        "Latin-1 one: convmv -f latin1 -t utf-8 --notest NAME)")


def test_a_command_run_from_a_deleted_folder_says_so_in_one_line(tmp_path):
    """Soak: run from a folder deleted meanwhile (`rm -rf` of the run folder the shell was in), every command ended
    with "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so" as torch was imported. Now one line says why,
    before any import, exit 2."""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = (f"import os, sys\nos.chdir({str(gone)!r})\nos.rmdir({str(gone)!r})\n"
              f"from loraforge.cli import main\nsys.exit(main(['eval', 'data.jsonl']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "error: the current directory no longer exists "
                                                                  "(deleted or moved away); cd into one that does "
                                                                  "and run the command again\n")


def test_a_model_folder_without_weights_is_one_line(tiny_dir, tmp_path, capsys):
    """A folder holding config.json alone (copied without its weights, a download cut short): generate and eval
    raised transformers' OSError as a traceback; the loader says which folder lacks what."""
    import shutil

    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Add 1 and 2.", "output": "3"}\n')
    line = (f"error: model folder {folder} has a config.json but no weights (model.safetensors or pytorch_model.bin); "
            f"give the folder save_pretrained wrote, or copy the weights files into it")
    assert main(["generate", "hi", "--model", str(folder)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == line
    assert main(["eval", str(data), "--model", str(folder)]) == 2  # eval reads the tokenizer first, for the records
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: model {folder}: its tokenizer cannot be read from {folder}: it holds no tokenizer files "
        f"(tokenizer.json, tokenizer_config.json): save the tokenizer beside the weights (tokenizer.save_pretrained("
        f"folder))")
    shutil.copy(tiny_dir / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy(tiny_dir / "tokenizer_config.json", folder / "tokenizer_config.json")
    assert main(["eval", str(data), "--model", str(folder)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == line


@pytest.mark.parametrize("everywhere, local_rank, printed", [(True, "1", False), (True, "0", True),
                                                              (False, "1", True), (False, "0", True)])
def test_a_training_error_every_process_raises_is_said_once_per_node(monkeypatch, capsys, everywhere, local_rank,
                                                                     printed):
    """Under torchrun, a TrainingError that every process raises alike (--resume's refusals, a non-finite loss) was
    printed by each of them: 8 identical lines at 8 processes. Now local rank 0 says it, as a config error; one only
    some processes raise (a peer that failed) is said by each; every process exits 2."""
    from loraforge import cli
    from loraforge.training.checkpoint import TrainingError

    def refuse(**_):
        raise TrainingError("--resume: refused", everywhere=everywhere)

    monkeypatch.setattr(cli, "_commands", lambda: {"train": refuse})
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert cli.run_command(["train", "run.yaml"]) == 2
    assert capsys.readouterr().err == ("error: --resume: refused\n" if printed else "")


@pytest.mark.parametrize("command,package", [("serve", "fastapi"), ("ui", "fastapi"), ("serve", "uvicorn")])
def test_serve_and_ui_without_the_serve_extra_say_what_to_install(command, package, tmp_path):
    """fastapi and uvicorn are the optional `serve` extra: without them `loraforge serve` and `loraforge ui` ended
    in a ModuleNotFoundError traceback. Where importing the package fails as a missing one does, the command exits
    2 with one line naming the command, the package and the install; any other missing module is still raised."""
    import subprocess
    import sys

    from loraforge.cli import missing_extra

    blocker = tmp_path / package
    blocker.mkdir()
    missing = f"raise ModuleNotFoundError(\"No module named '{package}'\", name='{package}')\n"
    (blocker / "__init__.py").write_text(missing)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "loraforge.cli", command], capture_output=True, text=True,
                          env=env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: loraforge {command} needs {package}, which is not "
                                                     f"installed here: pip install 'loraforge[serve]'")
    assert "Traceback" not in proc.stderr
    assert missing_extra("serve", ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")) is None


@pytest.mark.parametrize("command,package", [("serve", "fastapi"), ("ui", "uvicorn")])
def test_a_missing_serve_extra_is_said_before_torch_is_imported(command, package):
    """Soak (packaging, a wheel installed without the serve extra): `loraforge serve` said what to install only
    after importing torch, 13 s on 2 cores. The packages a command needs are looked for first (a None in
    sys.modules hides an installed one from importlib.util.find_spec, as an absent one is)."""
    script = (f"import sys\nsys.modules[{package!r}] = None\nfrom loraforge.cli import main\n"
              f"code = main([{command!r}])\nprint(code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (proc.stdout, proc.stderr) == ("2 False\n", f"error: loraforge {command} needs {package}, which is not "
                                                       f"installed here: pip install 'loraforge[serve]'\n")


@pytest.mark.parametrize("weights", [["1", "-1e-3"], ["-1e-3", "1"], ["-2E1", "-.5"], ["-inf", "-1_000.5e-2"],
                                     ["-Infinity", "-nan"], ["-0.5", "-3"]])
def test_merge_takes_negative_weights_in_any_float_spelling(weights):
    """argparse reads only plain decimals (-0.5) as negative numbers: `--weights 1 -1e-3` was "unrecognized
    arguments: -1e-3"."""
    from loraforge.cli import parse_args

    args = parse_args(["merge", "--base", "b", "--adapter", "a", "a", "--weights", *weights, "--out", "o"])
    assert args["weights"] == weights
    assert args["out"] == "o"


def test_the_api_key_can_come_from_the_environment(tiny_dir, tmp_path, monkeypatch, capsys):
    """soak: --api-key was the only way to give the key, and a command line is readable by every user of the machine
    (ps, /proc/PID/cmdline). LORAFORGE_API_KEY gives it to serve and ui unseen; --api-key still wins; an empty
    variable is no key (and so no --host 0.0.0.0 for the dashboard)."""
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr("loraforge.serve.api.run_until_signal", lambda app, *a, **k: apps.append(app))
    monkeypatch.setattr("loraforge.ui.app.run_until_signal", lambda app, *a, **k: apps.append(app))
    monkeypatch.setattr("loraforge.serve.api.check_port", lambda *a: None)
    monkeypatch.setattr("loraforge.ui.app.check_port", lambda *a: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAFORGE_API_KEY", "from-env")
    assert main(["serve", "--model", str(tiny_dir), "--precision", "fp32"]) == 0
    assert main(["serve", "--model", str(tiny_dir), "--precision", "fp32", "--api-key", "typed"]) == 0
    assert main(["ui", "--model", str(tiny_dir), "--host", "0.0.0.0", "--precision", "fp32"]) == 0
    statuses = []
    for app, key in zip(apps, ["from-env", "typed", "from-env"]):
        client = TestClient(app, base_url="http://127.0.0.1:8000")
        statuses.append([client.get("/v1/models", headers={"Authorization": f"Bearer {sent}"}).status_code
                         for sent in ("wrong", key)])
    assert statuses == [[401, 200]] * 3
    monkeypatch.setenv("LORAFORGE_API_KEY", "")
    assert main(["ui", "--model", str(tiny_dir), "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.endswith(
        "--host 0.0.0.0: the dashboard starts processes and reads files; listening beyond this machine needs a key: "
        "set LORAFORGE_API_KEY (or --api-key KEY, which the machine's other users can read in ps), or keep the "
        "default --host 127.0.0.1\n")


def test_no_command_takes_a_shortened_option_for_the_whole_one(capsys):
    """argparse takes a unique prefix of an option for it unless allow_abbrev is off on the parser that reads it:
    `train c.yaml --r 4` would be --resume, `--over` --overwrite (a finished run started over). Over every command
    and every option of it (--help too): the shortest prefix argparse would have taken (one option alone begins
    with it) and the name less its last letter, as `--x` and as `--x=1`, with the command's required arguments
    given, are refused (exit 2) with the whole option among the names suggested; so are they where a required
    argument is missing, whose line came first and named none (`merge --out x --ada a`)."""
    import re

    from loraforge.cli import _commands, _options, _subparser, build_parser, parse_args

    parser = build_parser()
    assert parser.allow_abbrev is False

    def suggested(argv) -> list[str]:
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        last = capsys.readouterr().err.splitlines()[-1]
        assert e.value.code == 2, last
        return [name for names in re.findall(r"did you mean (.*?)\?", last) for name in names.split(" or ")]

    checked = 0
    for command in _commands():
        sub = _subparser(parser, command)
        assert sub.allow_abbrev is False, command
        required = [word for a in sub._actions if a.required for word in [*a.option_strings[:1], a.choices[0]
                                                                          if a.choices else "x"]]
        options = _options(parser, command)
        for option in options:
            unique = next((option[:n] for n in range(3, len(option))  # none where it begins another (--adapter)
                           if [o for o in options if o.startswith(option[:n])] == [option]), option)
            for prefix in {unique, option[:-1]} - {option, "--"}:
                for typed in (prefix, f"{prefix}=1"):
                    assert option in suggested([command, *required, typed]), (command, typed)
                    checked += 1
        if required:
            assert options[-1] in suggested([command, options[-1][:-1]]), command  # a required one missing too
    assert checked > 300
