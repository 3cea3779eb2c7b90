"""The command line: merge export, generate, eval, and the built-in model (marked slow)."""

import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraforge.cli import main
from loraforge.config import LoraConfig
from loraforge.inject import inject
from loraforge.models import load_tokenizer
from test_adapters import randomize


def test_merge_command_writes_a_plain_transformers_checkpoint(tiny_dir, tmp_path):
    model = randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, target_modules="all-linear")))
    from loraforge.adapters import save_adapter

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


def test_generate_streams_the_greedy_answer(tiny_dir, capsys):
    tok = load_tokenizer(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    enc = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert main(["generate", "hi", "--model", str(tiny_dir), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_errors_name_the_problem(tiny_dir, tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["serve", "--adapter", "no-equals-sign"]) == 2
    assert "write it as NAME=DIR" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: x.jsonl}\ntraining: {lr: fast}\n")
    assert main(["train", str(bad)]) == 2
    assert "training.lr: expected a number, got 'fast'" in capsys.readouterr().err


@pytest.mark.slow
def test_builtin_model_loads_from_cache_and_answers(smollm2, capsys):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    start = time.perf_counter()
    main(["generate", "What is the capital of France?", "--max-new-tokens", "12"])
    assert "Paris" in capsys.readouterr().out
    assert time.perf_counter() - start < 60  # cached: no GGUF conversion


def test_eval_probe_runs_without_a_data_file_and_matches_the_scorer(tiny_dir, capsys):
    from loraforge.probes import load_probe, perplexity

    tok = load_tokenizer(str(tiny_dir))
    expected = perplexity(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), tok, load_probe("text"))["ppl"]
    assert main(["eval", "--model", str(tiny_dir), "--probe", "text"]) == 0
    assert f"perplexity on general text: {expected:.3f}" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_dir)]) == 2
    assert "give a DATA file, or --probe" in capsys.readouterr().err


def test_forgetting_takes_its_config_as_a_positional_argument():
    from loraforge.cli import parse_args

    args = parse_args(["forgetting", "task.yaml", "--seeds", "1", "training.lr=1e-4"])
    assert (args["config"], args["seeds"], args["overrides"]) == ("task.yaml", 1, ["training.lr=1e-4"])
    assert parse_args(["forgetting"])["config"] is None
    args = parse_args(["forgetting", "training.lr=1e-4", "lora.r=4"])  # no CONFIG: the demo task
    assert (args["config"], args["overrides"]) == (None, ["training.lr=1e-4", "lora.r=4"])
    assert parse_args(["train", "a.yaml", "--resume", "lora.r=4"])["overrides"] == ["lora.r=4"]
    with pytest.raises(SystemExit):
        parse_args(["train", "a.yaml", "--no-such-flag"])


def test_every_command_prints_its_help(capsys):
    from loraforge.cli import _commands

    for name in [None, *_commands()]:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"] if name else ["--help"])
        assert e.value.code == 0
        assert f"usage: loraforge {name or ''}" in capsys.readouterr().out


def test_bad_probe_and_tiny_task_are_clear_errors(tiny_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--probe", "mmlu"]) == 2
    assert "--probe: unknown probe(s) ['mmlu']; use mc, text and/or kl" in capsys.readouterr().err
    small = tmp_path / "small.jsonl"
    small.write_text('{"instruction": "Say hi.", "output": "hi"}\n' * 5)
    task = tmp_path / "task.yaml"
    task.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {small}}}\n")  # no data.eval: split from train
    assert main(["forgetting", str(task), "--out", str(tmp_path / "fg")]) == 2
    assert f"{small} has 5 records and data.eval is unset" in capsys.readouterr().err
