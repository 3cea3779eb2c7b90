"""Train/eval mode: adapter layers take the mode of the module they wrap, an inference load leaves the model in
eval(), and the CLI's inference paths run without dropout (PEFT's from_pretrained is the reference)."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import randomize, tiny_llama
from loraforge.cli import main
from loraforge.config import LoraConfig
from loraforge.lora.adalora import AdaLoraConfig, inject_adalora
from loraforge.lora.adapters import load_adapter, save_adapter
from loraforge.lora.inject import inject

# fp32, the same ops in both libraries: rounding only (as test_adapters.py)
TOL = dict(rtol=1e-5, atol=1e-5)


def _in_train_mode(model) -> list[str]:
    return [name for name, m in model.named_modules() if m.training]


@pytest.mark.parametrize("config", [LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False),
                                    LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False, use_dora=True),
                                    AdaLoraConfig(total_step=10, init_r=4, target_r=2, lora_dropout=0.5,
                                                  init_lora_weights=False)], ids=["lora", "dora", "adalora"])
def test_an_adapter_injected_into_an_eval_model_runs_without_dropout_as_peft_loads_it(config, tmp_path, input_ids):
    """soak: inject on an eval() model left model.training False but the new Dropout in training mode: two no_grad
    forwards differed by 0.61 (lora_dropout 0.5)."""
    model = tiny_llama()  # eval()
    (inject_adalora if isinstance(config, AdaLoraConfig) else inject)(model, config)
    assert _in_train_mode(model) == []
    with torch.no_grad():
        ours = model(input_ids).logits
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # inference load: eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids).logits, ours, **TOL)
    model.train()  # and training mode still reaches the dropout
    assert "model.layers.0.self_attn.q_proj.lora_dropout.default" in _in_train_mode(model)


def test_a_new_layer_in_a_training_model_trains(input_ids):
    model = inject(tiny_llama().train(), LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False))
    assert {n for n, _ in model.named_modules()} == set(_in_train_mode(model))


def test_load_adapter_for_inference_leaves_the_model_in_eval_with_peft_logits(tmp_path, input_ids):
    """soak: a lora_dropout=0.1 adapter loaded onto an eval() base gave logits 0.218 off. is_trainable=False: the
    model goes to eval() as PEFT's from_pretrained puts it, even from train(); is_trainable=True keeps the mode."""
    model = inject(tiny_llama(), LoraConfig(r=4, lora_dropout=0.1, init_lora_weights=False))
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        expected = theirs(input_ids).logits
    for base in (tiny_llama(), tiny_llama().train()):
        load_adapter(base, tmp_path)
        assert _in_train_mode(base) == []
        with torch.no_grad():
            torch.testing.assert_close(base(input_ids).logits, expected, **TOL)
    trainable = load_adapter(tiny_llama().train(), tmp_path, is_trainable=True)
    assert {n for n, _ in trainable.named_modules()} == set(_in_train_mode(trainable))


def test_generate_with_a_dropout_adapter_is_greedy_whatever_the_seed(tiny_dir, tmp_path, capsys):
    """soak: `generate --temperature 0 --precision bf16` (transformers' generate) with a lora_dropout=0.5 adapter
    gave other text for --seed 1 and 2. The reference: the same weights with lora_dropout 0."""
    model = randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, lora_dropout=0.5)))
    with torch.no_grad():  # large enough that dropout on the adapter's input changes the greedy tokens
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(10)
    save_adapter(model, tmp_path / "drop")
    no_dropout = copy.deepcopy(model)
    no_dropout.lora_configs["default"] = LoraConfig(r=4, lora_dropout=0.0,
                                                    target_modules=model.lora_configs["default"].target_modules)
    save_adapter(no_dropout, tmp_path / "plain")
    assert load_file(tmp_path / "drop/adapter_model.safetensors").keys() == \
        load_file(tmp_path / "plain/adapter_model.safetensors").keys()
    answers = {}
    for adapter, seed in (("plain", "1"), ("drop", "1"), ("drop", "2")):
        args = ["generate", "hi", "--model", str(tiny_dir), "--adapter", str(tmp_path / adapter), "--max-new-tokens",
                "8", "--temperature", "0", "--seed", seed, "--precision", "bf16"]
        assert main(args) == 0
        answers[adapter, seed] = capsys.readouterr().out
    assert answers["drop", "1"] == answers["drop", "2"] == answers["plain", "1"]
