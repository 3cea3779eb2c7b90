"""Adapter weights on a half-precision base: fp32, as PEFT keeps them (autocast_adapter_dtype), with PEFT's logits;
the static decoder runs such a model."""

import peft
import pytest
import torch

from helpers import tiny_llama
from loraforge.config import LoraConfig
from loraforge.inference.llama import Decoder
from loraforge.lora.adalora import AdaLoraConfig, inject_adalora
from loraforge.lora.adapters import load_adapter, save_adapter
from loraforge.lora.inject import inject

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
CONFIGS = {"lora": LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"),
           "dora": LoraConfig(r=4, init_lora_weights=False, use_dora=True),
           "adalora": AdaLoraConfig(total_step=10, init_r=4, target_r=2, init_lora_weights=False)}


def _adapter_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for name, p in model.named_parameters() if "lora_" in name}


def _inject(model, config):
    return (inject_adalora if isinstance(config, AdaLoraConfig) else inject)(model, config)


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.parametrize("kind", CONFIGS)
def test_an_adapter_on_a_half_precision_base_is_fp32_with_peft_logits(kind, dtype, tmp_path, input_ids):
    """soak: inject and load_adapter made lora_A / lora_B in the base's bf16 (a +1e-4 step left every entry as it
    was); PEFT upcasts them to fp32 and casts x to lora_A's dtype, the sum back to the base's once. The same ops in
    the same order: equal logits, bit for bit."""
    fresh = _inject(tiny_llama().to(dtype), CONFIGS[kind])
    assert _adapter_dtypes(fresh) == {torch.float32}
    save_adapter(_inject(tiny_llama(), CONFIGS[kind]), tmp_path)  # fp32, loaded on the half-precision base by both
    ours = load_adapter(tiny_llama().to(dtype), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)
    assert _adapter_dtypes(ours) == _adapter_dtypes(theirs) == {torch.float32}
    with torch.no_grad():
        got, expected = ours(input_ids).logits, theirs(input_ids).logits
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fresh_adapters_have_peft_dtypes():
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    theirs = peft.get_peft_model(tiny_llama().to(torch.bfloat16), config)
    ours = inject(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=("q_proj", "v_proj"), use_dora=True))
    assert _adapter_dtypes(ours) == _adapter_dtypes(theirs) == {torch.float32}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_the_static_decoder_runs_fp32_adapters_on_a_bf16_base(kind, tmp_path):
    """It multiplied bf16 activations by the fp32 lora_A ("expected m1 and m2 to have the same dtype"). Against the
    fp32 model: within twice the bf16 model's own error (both round in bf16, at other points)."""
    full = _inject(tiny_llama(), CONFIGS[kind])
    save_adapter(full, tmp_path)
    model = load_adapter(tiny_llama().to(torch.bfloat16), tmp_path)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        reference, rounded = full(ids).logits[:, -1], model(ids).logits[:, -1].float()
    got = Decoder(model, max_batch=2, max_len=8).forward(ids, torch.zeros(2, dtype=torch.long)).float()
    assert 0 < (got - reference).abs().max() <= 2 * (rounded - reference).abs().max()
