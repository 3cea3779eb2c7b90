"""DoRA: the forward formula, PEFT round trips both ways, gradients equal PEFT's, exact merge / unmerge."""

import peft
import pytest
import torch
from torch import nn

from helpers import tiny_gpt2, tiny_llama
from loraforge.lora.adapters import load_adapter, mixed_batch, save_adapter
from loraforge.config import LoraConfig
from loraforge.lora.inject import inject, lora_layers
from loraforge.lora.layer import LoraLinear
from loraforge.lora.merge import merge, merge_and_unload, unmerge
from helpers import randomize as randomize_ab

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, the same ops as PEFT: agreement to rounding (the 1e-5)


def randomize(model, seed=1):
    """Non-zero A, B and a magnitude that is not ‖W0 + sBA‖, so every term of DoRA shows in the output."""
    randomize_ab(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.r:
                m = layer.lora_magnitude_vector[name]
                m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))
    return model


def test_forward_matches_formula_and_fresh_adapter_is_a_no_op():
    base = nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, lora_alpha=4, use_dora=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 and m = ‖W0‖: the base layer exactly
    randomize_layer = layer.lora_magnitude_vector["a"]
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
        randomize_layer.mul_(1.5)
    W = base.weight + 2 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight  # W0 + s·BA, s = 4/2
    expected = x @ (randomize_layer[:, None] * W / W.norm(dim=1, keepdim=True)).T + base.bias
    torch.testing.assert_close(layer(x), expected)


def test_magnitude_starts_at_row_norm():
    layer = LoraLinear(nn.Linear(6, 5))
    layer.add_adapter("a", r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    W = layer.base_layer.weight + 2 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    torch.testing.assert_close(layer.lora_magnitude_vector["a"], W.norm(dim=1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ours_loads_in_peft_with_equal_logits(arch, tmp_path, input_ids):
    build = BUILDERS[arch]
    model = randomize(inject(build(), LoraConfig(r=4, lora_alpha=8, use_dora=True)))
    ours = model(input_ids).logits
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)(input_ids).logits
    torch.testing.assert_close(theirs, ours, **TOL)
    assert not torch.allclose(ours, build()(input_ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_loads_in_ours_with_equal_logits(arch, tmp_path, input_ids):
    build = BUILDERS[arch]
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                              use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.3)
    theirs = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    model = load_adapter(build(), tmp_path)
    torch.testing.assert_close(model(input_ids).logits, theirs, **TOL)


def test_gradients_equal_peft(input_ids):
    """The norm is detached (DoRA §4.3) and computed with BA detached: the gradients say whether we do the same."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    model = inject(tiny_llama(), LoraConfig(**{**cfg, "target_modules": tuple(cfg["target_modules"])}))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    ours_layers = dict(lora_layers(model))
    with torch.no_grad():  # same adapter weights in both
        for path, layer in theirs.base_model.model.named_modules():
            if path in ours_layers:
                ours_layers[path].lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
                ours_layers[path].lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
                layer.lora_magnitude_vector["default"].weight.mul_(1.1)
                ours_layers[path].lora_magnitude_vector["default"].copy_(layer.lora_magnitude_vector["default"].weight)
    model.train(), theirs.train()
    model(input_ids, labels=input_ids).loss.backward()
    theirs(input_ids, labels=input_ids).loss.backward()
    for path, layer in theirs.base_model.model.named_modules():
        if path in ours_layers:
            ours = ours_layers[path]
            torch.testing.assert_close(ours.lora_A["default"].weight.grad, layer.lora_A["default"].weight.grad)
            torch.testing.assert_close(ours.lora_B["default"].weight.grad, layer.lora_B["default"].weight.grad)
            torch.testing.assert_close(ours.lora_magnitude_vector["default"].grad,
                                       layer.lora_magnitude_vector["default"].weight.grad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_unmerged_and_unmerge_restores(arch, input_ids):
    model = randomize(inject(BUILDERS[arch](), LoraConfig(r=4, lora_alpha=8, use_dora=True)))
    weights = {p: layer.base_layer.weight.detach().clone() for p, layer in lora_layers(model)}
    before = model(input_ids).logits
    merge(model)
    merge(model)  # idempotent
    torch.testing.assert_close(model(input_ids).logits, before, **TOL)
    unmerge(model)
    for path, layer in lora_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, weights[path], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(input_ids).logits, before, **TOL)
    plain = merge_and_unload(model)
    torch.testing.assert_close(plain(input_ids).logits, before, **TOL)


def test_merged_weight_equals_peft_merge(tmp_path):
    model = randomize(inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_dora=True)))
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).merge_and_unload()
    ours = merge_and_unload(model)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_mixed_batch_with_dora_equals_single_adapter_runs(input_ids):
    model = randomize(inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_dora=True)))
    inject(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False), "plain")
    with mixed_batch(model, ["default", "plain", None]):
        mixed = model(input_ids).logits
    from loraforge.lora.adapters import disable_adapters, set_adapter

    set_adapter(model, "default")
    torch.testing.assert_close(mixed[0], model(input_ids).logits[0], **TOL)
    set_adapter(model, "plain")
    torch.testing.assert_close(mixed[1], model(input_ids).logits[1], **TOL)
    with disable_adapters(model):
        torch.testing.assert_close(mixed[2], model(input_ids).logits[2], **TOL)
