"""loraforge.training.fastpath: the lean blocks go into Llama-family models only, and a whole model trains the same."""

import pytest
import torch
from helpers import VOCAB, tiny_gpt2, tiny_llama

from loraforge.config import LoraConfig
from loraforge.training.fastpath import install, register_attention, uninstall
from loraforge.lora.inject import inject, lora_layers


def test_install_swaps_llama_blocks_and_uninstall_restores():
    model = tiny_llama()
    before = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert install(model) == {"rms_norm": 2 * 2 + 1, "mlp": 2}  # 2 per layer and the final norm; 1 MLP per layer
    assert type(model.model.norm).__name__ == "LeanLlamaRMSNorm"
    assert install(model) == {"rms_norm": 0, "mlp": 0}  # idempotent
    assert model.state_dict().keys() == state.keys()
    uninstall(model)
    assert {name: type(m) for name, m in model.named_modules()} == before


def test_install_leaves_other_architectures_alone():
    assert install(tiny_gpt2()) == {"rms_norm": 0, "mlp": 0}


def _train_step(lean: bool, bf16: bool = False, padded: bool = True):
    """Loss and LoRA gradients of one step of a tiny Llama, LoRA on every linear layer, fused LoRA nodes on."""
    model = tiny_llama(seed=0)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "default")
    for _, layer in lora_layers(model):
        layer.fused = True
    if lean:
        install(model)
        model.set_attn_implementation(register_attention())
    else:
        model.set_attn_implementation("eager")
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding in one row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("padded", [False, True])
def test_lean_model_same_loss_and_gradients_fp32(padded):
    loss_plain, grads_plain = _train_step(lean=False, padded=padded)
    loss_lean, grads_lean = _train_step(lean=True, padded=padded)
    assert len(grads_plain) == 2 * 7 * 2
    torch.testing.assert_close(loss_lean, loss_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_lean[name], grad, msg=name)


def test_lean_model_bf16_as_accurate_as_plain():
    """bf16 autocast: the lean blocks' gradients are as close to fp32's as the plain blocks' are (relative error
    within 1.5× the plain path's, per parameter)."""
    loss_ref, grads_ref = _train_step(lean=False)
    loss_plain, grads_plain = _train_step(lean=False, bf16=True)
    loss_lean, grads_lean = _train_step(lean=True, bf16=True)
    assert abs(loss_lean - loss_ref) <= 2 * abs(loss_plain - loss_ref) + 1e-3
    for name, ref in grads_ref.items():
        plain_error = ((grads_plain[name] - ref).norm() / ref.norm()).item()
        assert ((grads_lean[name] - ref).norm() / ref.norm()).item() <= 1.5 * plain_error + 1e-4, name


def test_training_installs_lean_blocks(tiny_dir, data_file, tmp_path):
    from loraforge.config import load_train_config
    from loraforge.training.loop import build_model

    def build(*over):
        cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", f"output_dir={tmp_path}",
                                       "lora.target_modules=all-linear", *over])
        model, _ = build_model(cfg, torch.device("cpu"))
        return model

    model = build()
    assert model.config._attn_implementation == "lean"
    assert type(model.model.layers[0].mlp).__name__ == "LeanLlamaMLP"
    model = build("training.fused_blocks=false", "training.attention=sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_bad_kernel_settings_are_named_with_the_choices():
    from loraforge.config import ConfigError, load_train_config

    with pytest.raises(ConfigError) as e:
        load_train_config(None, ["data.train=x.jsonl", "training.attention=flash", "training.fused_blocks=maybe"])
    text = str(e.value)
    assert "training.attention: 'flash' is not one of ['auto', 'sdpa', 'eager', 'lean']" in text
    assert "training.fused_blocks: expected true or false, got 'maybe'" in text
