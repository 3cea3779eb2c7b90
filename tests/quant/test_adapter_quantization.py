"""An adapter records the base's quantization it trained over (safetensors metadata, where PEFT does not look), and a
load over a base stored otherwise warns once, naming both and the flag that fixes it."""

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import loraforge
from helpers import tiny_llama
from loraforge.cli import main
from loraforge.config import LoraConfig
from loraforge.lora.adapters import BASE_QUANTIZATION, WEIGHTS_NAME, load_adapter, save_adapter
from loraforge.lora.inject import inject
from loraforge.models import load_tokenizer
from loraforge.quant.bnb import quantize_model
from loraforge.studies.continual import adapter_fits


def _base(quantization: str):
    # hidden 64: bnb's CPU 4-bit kernels take rows of whole 64-weight blocks (quant.bnb.quantize_linear)
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    return model if quantization == "none" else quantize_model(model, quantization, compute_dtype=torch.float32)


def _trained(quantization: str, out):
    """A non-zero adapter saved from a model over a base stored as `quantization`; the model."""
    torch.manual_seed(1)
    model = inject(_base(quantization), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, out)
    return model


def _load(quantization: str, adapter_dir):
    """The adapter loaded over a base stored as `quantization`, and the warnings the load gave."""
    base = _base(quantization)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_adapter(base, adapter_dir)
    return model, [str(w.message) for w in caught]


@pytest.mark.parametrize("quantization", ["none", "nf4", "fp4", "int8"])
def test_the_adapter_records_its_base_quantization_in_a_fixed_order(quantization, tmp_path):
    _trained(quantization, tmp_path)
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt", "library": "loraforge", BASE_QUANTIZATION: quantization,
                                "base_model_type": "llama"}
    assert BASE_QUANTIZATION not in json.loads((tmp_path / "adapter_config.json").read_text())  # PEFT would warn
    header = (tmp_path / WEIGHTS_NAME).read_bytes()[8:400]  # safetensors writes these keys in hash order
    assert b'"__metadata__":{"format":"pt","library":"loraforge","base_quantization":"%s","base_model_type":"llama"}' \
        % quantization.encode() in header


def test_a_qlora_adapter_over_the_full_base_warns_once_naming_both_and_the_flag(tmp_path, input_ids):
    _trained("nf4", tmp_path)
    _, said = _load("none", tmp_path)
    assert said == [f"{tmp_path}: this adapter was trained over an NF4 base and this base is a full-precision one: its "
                    f"outputs differ from those it trained to give; give --quantize nf4 (model.quantization: nf4)"]


def test_a_full_base_adapter_over_nf4_warns_to_leave_the_flag_off(tmp_path):
    _trained("none", tmp_path)
    _, said = _load("nf4", tmp_path)
    assert len(said) == 1 and "trained over a full-precision base and this base is an NF4" in said[0]
    assert said[0].endswith("leave --quantize (model.quantization) off")


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_the_matching_base_loads_silently_with_the_trained_logits(quantization, tmp_path, input_ids):
    trained = _trained(quantization, tmp_path)
    loaded, said = _load(quantization, tmp_path)
    assert said == []
    torch.testing.assert_close(loaded(input_ids).logits, trained(input_ids).logits, rtol=0, atol=0)


def test_peft_adapters_record_nothing_and_load_over_any_base_silently(tmp_path, input_ids):
    model = peft.get_peft_model(_base("none"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    model.save_pretrained(tmp_path)
    for quantization in ("none", "nf4"):
        _, said = _load(quantization, tmp_path)
        assert said == []


def test_peft_loads_the_recording_file_with_our_logits(tmp_path, input_ids):
    """The header key is where PEFT does not look: a QLoRA adapter loaded by PEFT over the full base gives the
    logits loraforge's load over it gives (what the warning is about is the base, not the file)."""
    _trained("nf4", tmp_path)
    ours, _ = _load("none", tmp_path)
    theirs = peft.PeftModel.from_pretrained(_base("none"), tmp_path).eval()
    torch.testing.assert_close(theirs(input_ids).logits, ours(input_ids).logits, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (hidden 64, for 4 bits on CPU) with the real SmolLM2 tokenizer, saved."""
    tok = load_tokenizer("smollm2-135m")
    path = tmp_path_factory.mktemp("tiny64")
    tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_cli_warns_once_only_over_the_other_base(command, model_dir, tmp_path, monkeypatch):
    """Once per command, from loraforge's own code (so the CLI prints it as one `warning: ...` line: cli.
    one_line_warnings), and not with --quantize as the adapter's run had it."""
    monkeypatch.setattr("loraforge.serve.api.run_until_signal", lambda app, *a, **k: None)
    model = quantize_model(AutoModelForCausalLM.from_pretrained(model_dir), "nf4", compute_dtype=torch.float32)
    save_adapter(inject(model, LoraConfig(r=2, target_modules="all-linear")), tmp_path / "qlora")
    args = (["generate", "hi", "--max-new-tokens", "2", "--adapter", str(tmp_path / "qlora")] if command == "generate"
            else ["serve", "--port", "0", "--adapter", f"q={tmp_path / 'qlora'}"])
    said = {}
    for quantize in ([], ["--quantize", "nf4"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main([*args, "--model", str(model_dir), "--precision", "fp32", *quantize]) == 0
        said[bool(quantize)] = [(str(w.message), Path(w.filename).is_relative_to(Path(loraforge.__file__).parent))
                                for w in caught if "trained over" in str(w.message)]
    assert said == {False: [(f"{tmp_path / 'qlora'}: this adapter was trained over an NF4 base and this base is a "
                             f"full-precision one: its outputs differ from those it trained to give; give --quantize "
                             f"nf4 (model.quantization: nf4)", True)], True: []}


def test_continual_studys_shape_check_on_the_meta_device_does_not_warn(model_dir, tmp_path):
    """studies.continual.adapter_fits loads the adapter onto the model built on the meta device (unquantized, shapes
    only) before the real load, which warns where the base differs: the check itself says nothing."""
    model = quantize_model(AutoModelForCausalLM.from_pretrained(model_dir), "nf4", compute_dtype=torch.float32)
    save_adapter(inject(model, LoraConfig(r=2, target_modules="all-linear")), tmp_path / "qlora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter_fits(str(tmp_path / "qlora"), str(model_dir))
    assert [str(w.message) for w in caught] == []
    _, said = _load("none", tmp_path / "qlora")  # the control: over this base, the load does say it
    assert len(said) == 1 and "trained over an NF4 base" in said[0]
