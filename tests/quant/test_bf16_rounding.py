"""bf16 compute over a 4-bit base: the LoRA layer adds the fp32 adapter output to the bf16 base output in fp32 and
rounds the sum once (as PEFT's plain lora.Linear does), where PEFT's bitsandbytes layer (lora.bnb.Linear4bit, which
PEFT picks for a model transformers loaded with a BitsAndBytesConfig) rounds the adapter output to bf16 first and
adds in bf16: two roundings. Reference: the sum in fp32; ours is the bf16 value nearest to it, never further than
PEFT's (docs/DESIGN.md, "bf16 over a 4-bit base")."""

import copy

import peft
import torch

from helpers import tiny_llama
from loraforge.config import LoraConfig
from loraforge.lora.adapters import save_adapter
from loraforge.lora.inject import inject, lora_layers
from loraforge.quant.bnb import quantize_model


def test_bf16_over_4bit_adds_the_adapter_in_fp32_and_rounds_once(tmp_path):
    q = quantize_model(tiny_llama(hidden_size=128, intermediate_size=256).to(torch.bfloat16), "nf4",
                       compute_dtype=torch.bfloat16)
    ours = inject(copy.deepcopy(q), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(ours):  # B as after training: the adapter output ~10% of the base output
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.02)
    save_adapter(ours, tmp_path / "a")
    marked = copy.deepcopy(q)
    marked.is_loaded_in_4bit = True  # as transformers marks a BitsAndBytesConfig load: PEFT then wraps in its bnb layer
    theirs = peft.PeftModel.from_pretrained(marked, tmp_path / "a").eval()
    layer = dict(lora_layers(ours))["model.layers.0.mlp.up_proj"]
    peft_layer = theirs.base_model.model.model.layers[0].mlp.up_proj
    assert type(peft_layer).__name__ == "Linear4bit" and peft_layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        base_out = layer.base_layer(x)  # (64, 256) bf16: the 4-bit matmul, the same in both
        delta = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]  # fp32
        exact = base_out.float() + delta
        got, peft_out = layer(x), peft_layer(x)
    torch.testing.assert_close(got, exact.to(torch.bfloat16), rtol=0, atol=0)  # rounded once
    torch.testing.assert_close(peft_out, base_out + delta.to(torch.bfloat16), rtol=0, atol=0)  # PEFT: twice
    ours_error, peft_error = (got.float() - exact).abs(), (peft_out.float() - exact).abs()
    assert bool((ours_error <= peft_error).all())  # round-to-nearest of the sum: never further, element by element
    assert ours_error.mean() < peft_error.mean()  # and closer where the two roundings differ
