"""Export: merged GGUF read back by transformers' GGUF loader (and llama.cpp where installed), llama.cpp's LoRA GGUF
format, vLLM checks and exact conversions loaded in PEFT, adapters PEFT loads without a warning."""

import json
import warnings

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from conftest import tiny_gpt2, tiny_llama
from loraforge.adapters import load_adapter, save_adapter
from loraforge.config import LoraConfig
from loraforge.export.gguf import export_gguf
from loraforge.inject import inject, lora_layers
from loraforge.models import load_base, load_tokenizer

try:
    import llama_cpp
except ImportError:
    llama_cpp = None


def tiny_qwen2(seed=0, vocab_size=128):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=False)).eval()


def tiny_base(family: str, vocab_size: int):
    if family == "llama":
        return tiny_llama(vocab_size=vocab_size, tie_word_embeddings=True)
    if family == "qwen2":
        return tiny_qwen2(vocab_size=vocab_size)
    torch.manual_seed(0)
    # n_positions: transformers' GGUF loader does not read gpt2.context_length back (it keeps the default 1024)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=1024,
                                      bos_token_id=1, eos_token_id=2)).eval()


def randomize(model, seed=1):
    """Random A and B: a fresh adapter (B = 0) would equal the base and test nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B):
                for lin in d.values():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tiny_pair(request, tokenizer, tmp_path_factory):
    """(family, base dir with the SmolLM2 tokenizer, adapter dir of a random all-linear LoRA with patterns)."""
    root = tmp_path_factory.mktemp(request.param)
    model = tiny_base(request.param, len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                             rank_pattern={"v_proj": 2, "c_fc": 2}, alpha_pattern={"o_proj": 3, "c_proj": 3}))
    randomize(model)
    save_adapter(model, root / "adapter")
    return request.param, root / "base", root / "adapter"


def ours(base, adapter):
    model, _ = load_base(str(base), dtype="fp32")
    load_adapter(model, str(adapter))
    return model


IDS = torch.tensor([[5, 17, 923, 4000, 31, 77, 12000, 2, 640, 9]])
# Bounds per type on logits of a 2-layer width-32 model (|logits| < 3). f32: the same numbers, only summation order
# may differ. f16: each weight rounded to 11 significant bits (relative 2^-11 ≈ 5e-4), errors add over ~4
# matmuls. q8_0: 8-bit blocks of 32 with an f16 scale (relative ≈ 1/254 per weight).
BOUNDS = {"f32": dict(atol=1e-5, rtol=1e-5), "f16": dict(atol=5e-3, rtol=5e-3), "q8_0": dict(atol=5e-2, rtol=0)}


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_merged_gguf_loads_in_transformers_with_equal_logits(tiny_pair, kind, tmp_path):
    family, base, adapter = tiny_pair
    out = export_gguf(str(base), str(adapter), tmp_path / "merged.gguf", type=kind)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ours(base, adapter)(IDS).logits
        got = back(IDS).logits
    torch.testing.assert_close(got, want, **BOUNDS[kind])
