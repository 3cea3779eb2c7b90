"""Training's SwiGLU activation in one C pass each way (loraforge.inference.cpu_kernels.SwiGLU) against torch's ops
(kernels.TorchSwiGLU), through kernels.swiglu_linear: outputs and the gradients of gate, up, A and B.

Tolerances: the C pass rounds to bf16 where torch's ops round, so bf16 differs only where its exp (Cephes') and
torch's (Sleef's) differ in an fp32 result's last bit and that bit decides a rounding; fp32 differs by that last
bit (and one fused multiply-add): a relative 1e-6.
"""

import pytest
import torch
from helpers import tiny_llama

from loraforge import kernels as K
from loraforge.config import LoraConfig
from loraforge.inference import cpu_kernels as C
from loraforge.lora.inject import inject, lora_layers
from loraforge.training import fastpath

needs_kernels = pytest.mark.skipif(not C.available(), reason="no C compiler or no AVX2 here")


def _run(activation, dtype, autocast, shape, seed=0, lora=True):
    """[y, d gate, d up, dA, dB] of swiglu_linear for a loss Σ y · ramp."""
    torch.manual_seed(seed)
    inter = shape[-1]
    gate = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape).to(dtype).requires_grad_()
    weight = (torch.randn(24, inter) * 0.1).to(torch.float32 if autocast else dtype)
    A = (torch.randn(4, inter) * 0.1).requires_grad_() if lora else None
    B = torch.randn(24, 4).requires_grad_() if lora else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = K.swiglu_linear(gate, up, weight, None, A, B, 2.0, activation=activation)
    (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return [y.detach(), gate.grad, up.grad] + ([A.grad, B.grad] if lora else [])


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 37, 1536), (3, 5, 13), (1, 1, 7)], ids=["wide", "tail", "under-eight"])
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.float32, True)], ids=["fp32", "bf16", "bf16-autocast"])
def test_the_c_activation_equals_torchs_ops(dtype, autocast, shape):
    calls = []
    forward = C.SwiGLU.forward

    class Counted(C.SwiGLU):
        @staticmethod
        def forward(g, u):
            calls.append(g.dtype)
            return forward(g, u)

    got = _run(Counted, dtype, autocast, shape)
    expected = _run(None, dtype, autocast, shape)
    assert calls == [torch.bfloat16 if autocast else dtype]  # the C pass ran, in the compute dtype
    for name, a, b in zip(("y", "d gate", "d up", "dA", "dB"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if dtype == torch.float32 and not autocast:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item(), msg=name)
        else:  # bf16: the same bits but for a last-bit exp difference deciding a rounding (none in these cases)
            assert (a != b).float().mean().item() <= 1e-4, name
            torch.testing.assert_close(a.float(), b.float(), msg=name)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_c_activation_at_extreme_values(dtype):
    """NaN stays NaN (bf16's rounding must not turn a NaN into inf), +inf gives inf, gates far below -88 give -0
    as torch's (e^-g past float's range), and the gradients agree with torch's there too."""
    g = torch.tensor([float("nan"), float("inf"), 1e30, -1e30, 100.0, -100.0, 88.0, -88.0, 0.0, -0.0, 3.0],
                     dtype=dtype)
    u = torch.full_like(g, 2.0)
    dh = torch.full_like(g, 0.5)
    h = C.SwiGLU.forward(g, u)
    expected = K.TorchSwiGLU.forward(g, u)
    assert h.isnan().tolist() == expected.isnan().tolist() == [True] + [False] * 10
    torch.testing.assert_close(h[1:], expected[1:], atol=1e-30, rtol=1e-6 if dtype == torch.float32 else 8e-3)
    h2, dg, du = C.SwiGLU.backward(dh, g, u, True, True, True)
    _, dg_t, du_t = K.TorchSwiGLU.backward(dh, g, u, True, True, True)
    assert h2[0].isnan() and torch.equal(h2[1:], h[1:])  # the backward's h is the forward's
    finite = torch.isfinite(g)  # torch's silu' of ±inf is nan (inf · 0); the C pass's is not asked for here
    for a, b in ((dg, dg_t), (du, du_t)):
        torch.testing.assert_close(a[finite], b[finite], atol=1e-30, rtol=1e-6 if dtype == torch.float32 else 8e-3)


def test_without_the_kernels_the_node_runs_torchs_ops(monkeypatch):
    """No compiler, no AVX2 or LORAFORGE_CPU_KERNELS=0 (available() False), a non-contiguous gate or another
    dtype: fits says no and the node runs torch's ops, the same bits as without an activation."""
    expected = _run(None, torch.float32, False, (2, 5, 40))
    monkeypatch.setattr(C, "available", lambda: False)
    for a, b in zip(_run(C.SwiGLU, torch.float32, False, (2, 5, 40)), expected):
        assert torch.equal(a, b)
    monkeypatch.undo()
    g = torch.randn(4, 6)
    assert not C.SwiGLU.fits(g.T, g.T.contiguous())  # not contiguous
    assert not C.SwiGLU.fits(g.half(), g.half())  # fp16: not taken
    assert not C.SwiGLU.fits(g, g.bfloat16())  # mixed dtypes
    assert not C.SwiGLU.fits(g, g[:3])  # shapes differ


@pytest.mark.parametrize("lora", [True, False], ids=["lora-on-down", "no-adapter"])
def test_the_torch_activation_skips_h_without_an_adapter(monkeypatch, lora):
    """The backward recomputes h only for the down projection's dA: without an adapter it is not computed."""
    asked = []
    backward = K.TorchSwiGLU.backward
    monkeypatch.setattr(K.TorchSwiGLU, "backward",
                        staticmethod(lambda dh, g, u, need_h, *a: asked.append(need_h) or backward(dh, g, u, need_h,
                                                                                                    *a)))
    _run(None, torch.float32, False, (2, 3, 16), lora=lora)
    assert asked == [lora]


@needs_kernels
def test_a_lean_model_trains_the_same_with_the_c_activation(monkeypatch):
    """fastpath's MLP passes the C activation: a tiny Llama with LoRA on every linear, bf16 autocast, gives the
    loss and the adapter's gradients of torch's ops (fits made False)."""

    def loss_and_grads():
        model = tiny_llama(seed=3)
        torch.manual_seed(0)
        inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        for _, layer in lora_layers(model):
            layer.fused = True  # as train() sets it (training.fused_lora)
        assert fastpath.install(model)["mlp"] == 2
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    runs = []
    forward = C.SwiGLU.forward
    monkeypatch.setattr(C.SwiGLU, "forward", staticmethod(lambda g, u: runs.append(1) or forward(g, u)))
    loss, grads = loss_and_grads()
    assert len(runs) == 2  # both layers' MLPs ran the C pass
    monkeypatch.setattr(C.SwiGLU, "fits", staticmethod(lambda g, u: False))
    loss_t, grads_t = loss_and_grads()
    torch.testing.assert_close(loss, loss_t)
    assert grads.keys() == grads_t.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_t[name], msg=name)
