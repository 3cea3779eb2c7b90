"""The server's per-layer adapter stacks against the plain formula base(x) + x·Aᵀ·(s·B)ᵀ per row, in fp32 and for a
bf16 base (bf16 stacks), through the CPU kernel (where it runs) and through bmm on gathered copies."""

import types

import pytest
import torch
from torch import nn

from loraforge.inference import cpu_kernels
from loraforge.serve import Engine
from loraforge.serve.residency import RowSlots, Stack, stack_dtype


def layer(in_features: int, out_features: int, dtype: torch.dtype):
    base = nn.Linear(in_features, out_features, bias=True).to(dtype)
    return types.SimpleNamespace(base_layer=base, in_features=in_features, out_features=out_features)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "bmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("slots, tokens", [([1, 0, 2, 1, 3], 1), ([2, 2, 2], 1), ([3, 1, 0], 4)])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("adapter_dtype", ["auto", "bf16"])
def test_stack_equals_the_formula(kernels, dtype, slots, tokens, dora, adapter_dtype, monkeypatch):
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_lib", None)
    g = torch.Generator().manual_seed(len(slots) * 10 + tokens)
    lin = layer(64, 40, dtype)
    rows = RowSlots(torch.device("cpu"))
    stack = Stack(lin, 4, 4, rows, adapter_dtype)
    held = stack_dtype(adapter_dtype, dtype)  # auto: the base's dtype
    assert stack.At.dtype == held == (dtype if adapter_dtype == "auto" else torch.bfloat16)
    assert stack.At.shape[2] == 8  # rank padded to 8
    factors = {}
    for slot, r in [(1, 4), (2, 2), (3, 12)]:  # rank 12 grows the stack to 16
        A, B = torch.randn(r, 64, generator=g), torch.randn(40, r, generator=g)
        m = torch.rand(40, generator=g) + 0.5 if dora and slot != 2 else None
        stack.put(slot, A, B, 0.5, m)
        factors[slot] = (A, B, m)
    assert stack.At.shape[2] == 16
    x = torch.randn(len(slots), tokens, 64, generator=g).to(dtype)
    rows.set(slots)
    with torch.inference_mode():
        base_out = lin.base_layer(x)
        want = base_out.float().clone()
        for i, s in enumerate(slots):
            if s == 0:
                continue
            A, B, m = factors[s]
            # what the stack holds: A and s·B in its dtype
            A, sB = A.to(held).float(), (B * 0.5).to(held).float()
            delta = x[i].float() @ A.T @ sB.T
            if m is None:
                want[i] += delta
            else:
                w0x = base_out[i].float() - lin.base_layer.bias.float()
                want[i] += (m - 1) * w0x + m * delta
        got = stack.forward(x, base_out.clone())
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:  # the sum rounded to bf16 (DoRA / bmm paths round the delta first, then the sum)
        torch.testing.assert_close(got.float(), want, rtol=2 ** -6, atol=2 ** -6)


def test_adapter_dtype_is_checked(base, tokenizer):  # noqa: F811
    with pytest.raises(ValueError, match="adapter_dtype must be one of auto, fp32, bf16, got 'fp16'"):
        Engine(base, tokenizer, adapter_dtype="fp16")


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "bmm"])
def test_a_stack_of_a_huge_max_loaded_holds_the_slots_used_and_equals_the_formula(kernels, monkeypatch):
    """Soak (fields): `serve --max-loaded 1000000000000` died of MemoryError at start (a list of every slot), and
    a large one allocated (max_loaded + 1, in, r) per layer at the first adapter (100,000 on SmolLM2: 1.8 GB a
    layer). A stack now holds 9 slots and doubles as higher ones are put; rows of slots past the first 9 and a DoRA
    factor put before the growth give the plain formula."""
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_lib", None)
    g = torch.Generator().manual_seed(7)
    lin = layer(64, 40, torch.float32)
    rows = RowSlots(torch.device("cpu"))
    stack = Stack(lin, 10 ** 12 + 1, 4, rows)
    assert stack.At.shape[0] == 9
    factors = {}
    for slot in (1, 30, 12):  # 30: grows to 31 slots; 12 fits
        A, B = torch.randn(4, 64, generator=g), torch.randn(40, 4, generator=g)
        m = torch.rand(40, generator=g) + 0.5 if slot == 1 else None
        stack.put(slot, A, B, 0.5, m)
        factors[slot] = (A, B, m)
    assert stack.At.shape[0] == stack.Bt.shape[0] == stack.g.shape[0] == 31
    assert torch.equal(stack.g[2:], torch.ones(29, 40))  # the grown rows' DoRA factor is no factor
    x = torch.randn(4, 3, 64, generator=g)
    rows.set([30, 1, 0, 12])
    with torch.inference_mode():
        base_out = lin.base_layer(x)
        want = base_out.clone()
        for i, s in enumerate([30, 1, 0, 12]):
            if s:
                A, B, m = factors[s]
                delta = x[i] @ A.T @ (B * 0.5).T
                want[i] += delta if m is None else (m - 1) * (base_out[i] - lin.base_layer.bias) + m * delta
        got = stack.forward(x, base_out.clone())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # test_stack_equals_the_formula's fp32 bound
    stack2 = Stack(lin, 5, 4, rows, first=1)  # --max-loaded 4: never past its 5 slots
    stack2.put(4, *factors[12][:2], 0.5)
    assert stack2.At.shape[0] == 5
