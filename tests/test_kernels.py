"""The fused LoRA kernel (loraforge.kernels) against the plain PyTorch path: same outputs, loss and gradients.

Tolerances: fp32 compares the same products summed in a different order (x Wᵀ + s·(xAᵀ)Bᵀ in one addmm,
dx = gW + s·(gB)A in one addmm), so float32 rounding only: torch's default fp32 tolerances. Under bf16
autocast both paths round their matmul outputs to bf16 (8 significant bits) at different points, so the
bf16 defaults (rtol 1.6e-2, atol 1e-5) scaled by the magnitude of what is compared are used.
"""

import pytest
import torch
from conftest import VOCAB, tiny_llama

from loraforge.config import LoraConfig
from loraforge.inject import inject, lora_layers
from loraforge.kernels import fused_lora_linear


def plain_lora_linear(x, base: torch.nn.Linear, A, B, scaling):
    return base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * scaling


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)])
def test_fused_matches_plain_fp32(bias, shape):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=bias).requires_grad_(False)
    A = torch.nn.Parameter(torch.randn(4, 12))
    B = torch.nn.Parameter(torch.randn(10, 4))
    x = torch.randn(*shape, requires_grad=True)
    target = torch.randn(*shape[:-1], 10)
    grads = []
    for f in (plain_lora_linear, lambda x, base, A, B, s: fused_lora_linear(x, base.weight, base.bias, A, B, s)):
        y = f(x, base, A, B, 2.0)
        loss = ((y - target) ** 2).sum()
        grads.append((y.detach(), loss.detach(), *torch.autograd.grad(loss, (x, A, B))))
    for plain, fused in zip(*grads):
        torch.testing.assert_close(fused, plain)


def test_fused_refuses_a_trainable_base():
    base = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="freeze"):
        fused_lora_linear(torch.randn(2, 4), base.weight, base.bias, torch.randn(2, 4), torch.randn(3, 2), 1.0)


def _model_grads(fused: bool, bf16: bool, bf16_base: bool = False, rounded_base: bool = False):
    model = tiny_llama(seed=0)
    if rounded_base:  # fp32 weights holding bf16 values: the fp32 reference for a bf16 base
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "default")
    if bf16_base:  # the frozen base in bf16, the adapters in fp32, as build_model does for model.dtype bf16
        model.to(torch.bfloat16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    for _, layer in lora_layers(model):
        layer.fused = fused
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_model_same_loss_and_gradients_fp32():
    """A whole (tiny) Llama with LoRA on every linear layer: the fused path trains like the plain one."""
    loss_plain, grads_plain = _model_grads(fused=False, bf16=False)
    loss_fused, grads_fused = _model_grads(fused=True, bf16=False)
    assert grads_plain.keys() == grads_fused.keys() and len(grads_plain) == 2 * 7 * 2  # A, B × 7 linears × 2 layers
    torch.testing.assert_close(loss_fused, loss_plain)
    for name in grads_plain:
        torch.testing.assert_close(grads_fused[name], grads_plain[name], msg=name)


@pytest.mark.parametrize("bf16_base", [False, True], ids=["fp32-base", "bf16-base"])
def test_fused_model_bf16_as_accurate_as_plain(bf16_base):
    """Under bf16 autocast both paths round differently, so neither equals the other bit for bit; the fused path
    must be as close to the fp32 computation (on the same base weights) as the plain path is: within 2× its error."""
    reference = _model_grads(fused=False, bf16=False, rounded_base=bf16_base)
    loss_plain, grads_plain = _model_grads(fused=False, bf16=True, bf16_base=bf16_base)
    loss_fused, grads_fused = _model_grads(fused=True, bf16=True, bf16_base=bf16_base)
    loss_ref, grads_ref = reference
    torch.testing.assert_close(loss_fused, loss_ref, rtol=0, atol=2 * (loss_plain - loss_ref).abs().item() + 1e-3)
    for name, ref in grads_ref.items():
        plain_error = (grads_plain[name] - ref).abs().max().item()
        assert plain_error < 0.1 * ref.abs().max().item(), name  # the reference itself is sane
        torch.testing.assert_close(grads_fused[name], ref, rtol=0, atol=2 * plain_error, msg=name)


def test_fused_is_off_by_default_and_skips_dropout():
    model = tiny_llama(seed=0)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1), "default")
    _, layer = lora_layers(model)[0]
    assert layer.fused is False and layer._fusable() is None
    layer.fused = True
    assert layer._fusable() is None  # dropout: the plain path keeps PEFT's exact semantics


def test_training_turns_the_kernel_on_where_it_applies(tiny_dir, data_file, tmp_path):
    from loraforge.config import load_train_config
    from loraforge.inject import lora_layers
    from loraforge.train import build_model

    def fused_layers(*over):
        cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", f"output_dir={tmp_path}",
                                       "lora.target_modules=all-linear", *over])
        model, _ = build_model(cfg, torch.device("cpu"))
        return [layer._fusable() is not None for _, layer in lora_layers(model)]

    assert all(fused_layers())
    assert not any(fused_layers("training.fused_lora=false"))
    assert not any(fused_layers("lora.lora_dropout=0.1"))  # dropout: the plain path
