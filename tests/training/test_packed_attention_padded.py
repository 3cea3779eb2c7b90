"""kernels.packed_attention(padded=True): packed sequences attended as one padded batch (_PaddedPackedAttention)
against the sequence-by-sequence node and a float64 reference of the block-diagonal causal mask: outputs and the
gradients of q, k and v (shared key heads, sequences of 1 token, several rows); and through a tiny Llama, the loss
and LoRA gradients equal those of the sequence-by-sequence path and of each example on its own (packed rows stay
isolated).

Tolerances: the padded batch's softmax and products run over the longest sequence's length, the padded keys
contributing exact zeros, so their sums are cut into other vector lengths and GEMM blocks: fp32 at torch's
defaults (and within 1e-5 of the float64 reference); bf16 at most the sequence-by-sequence node's own largest
error against the float64 reference (both round the same fp32 softmax and products to bf16).
"""

import pytest
import torch
from helpers import output_and_grads, packed_causal_mask

from loraforge import kernels
from loraforge.kernels import attention, packed_attention, segment_starts
from loraforge.training import data as D
from loraforge.training.fastpath import LEAN_PADDED_ATTENTION

from test_packed_attention import _examples, _lean_model, _loss_and_grads

HEADS, KV_HEADS, DIM = 6, 2, 16
POSITIONS = [list(range(30)) + list(range(1)) + list(range(17)),
             list(range(48)),
             list(range(5)) + list(range(20)) + list(range(23))]


def _inputs(dtype, seed=0):
    """q (B, H, T, D), k, v (B, Hkv, T, D) as transformers makes them, a target for the loss Σ out · target."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(POSITIONS), len(POSITIONS[0])
    q = torch.randn(batch, HEADS, length, DIM, generator=g).to(dtype).requires_grad_()
    k = torch.randn(batch, KV_HEADS, length, DIM, generator=g).to(dtype).requires_grad_()
    v = torch.randn(batch, KV_HEADS, length, DIM, generator=g).to(dtype).requires_grad_()
    return (q, k, v), torch.randn(batch, HEADS, length, DIM, generator=g)


def _run(padded: bool, inputs, target):
    starts = segment_starts(torch.tensor(POSITIONS))
    return output_and_grads(lambda q, k, v: packed_attention(q, k, v, starts, DIM ** -0.5, padded=padded), inputs,
                            target)


def test_the_padded_node_runs_and_equals_the_sequence_loop_and_the_mask_in_fp32(monkeypatch):
    inputs, target = _inputs(torch.float32)
    calls = []
    monkeypatch.setattr(kernels._PaddedPackedAttention, "apply",
                        lambda *a, _f=kernels._PaddedPackedAttention.apply: calls.append(1) or _f(*a))
    got = _run(True, inputs, target)
    assert calls == [1]
    loop = _run(False, inputs, target)
    mask = packed_causal_mask(torch.tensor(POSITIONS))[:, None]
    wide = [t.detach().double().requires_grad_() for t in inputs]
    reference = output_and_grads(lambda q, k, v: attention(q, k, v, mask, DIM ** -0.5), wide, target.double())
    for name, a, b, ref in zip(["out", "dq", "dk", "dv"], got, loop, reference):
        torch.testing.assert_close(a, b, msg=name)
        torch.testing.assert_close(a.double(), ref, rtol=0, atol=1e-5, msg=name)


def test_the_padded_node_in_bf16_is_within_the_sequence_loops_own_error():
    inputs, target = _inputs(torch.bfloat16)
    got, loop = _run(True, inputs, target), _run(False, inputs, target)
    mask = packed_causal_mask(torch.tensor(POSITIONS))[:, None]
    wide = [t.detach().double().requires_grad_() for t in inputs]
    reference = output_and_grads(lambda q, k, v: attention(q, k, v, mask, DIM ** -0.5), wide, target.double())
    for name, a, b, ref in zip(["out", "dq", "dk", "dv"], got, loop, reference):
        own = (b.double() - ref).abs().max()
        assert own > 0, name  # bf16 rounds: a zero error would mean the comparison compared nothing
        assert (a.double() - ref).abs().max() <= own, name


def test_blocked_or_kept_probabilities_stay_on_the_sequence_loop(monkeypatch):
    """A sequence over two query blocks, or keep_probs, runs the sequence-by-sequence node (padded is ignored)."""
    calls = []
    monkeypatch.setattr(kernels._PaddedPackedAttention, "apply", lambda *a: calls.append(1))
    (q, k, v), _ = _inputs(torch.float32)
    starts = segment_starts(torch.tensor(POSITIONS))
    packed_attention(q, k, v, starts, DIM ** -0.5, padded=True, block=8)  # 30 and 48 positions: blocks
    packed_attention(q, k, v, starts, DIM ** -0.5, keep_probs=True, padded=True)
    assert calls == []


@pytest.mark.parametrize("reference", ["sequence loop", "each example alone"])
def test_a_padded_batch_trains_as_the_sequence_loop_and_keeps_rows_isolated(reference, monkeypatch):
    """Packed rows through a tiny Llama with lean_padded attention: the loss and every LoRA gradient equal those of
    the sequence-by-sequence path on the same rows, and those of each example forwarded on its own."""
    examples = _examples([9, 5, 12, 3, 7, 6, 2, 10], seed=3)
    packed = D.collate(D.pack(examples, 20), pad_id=0)
    assert packed["input_ids"].shape[0] > 1 and "position_ids" in packed
    calls = []
    monkeypatch.setattr(kernels._PaddedPackedAttention, "apply",
                        lambda *a, _f=kernels._PaddedPackedAttention.apply: calls.append(1) or _f(*a))
    model = _lean_model(LEAN_PADDED_ATTENTION)
    loss, grads = _loss_and_grads(model, [packed])
    assert len(calls) == model.config.num_hidden_layers  # every layer ran the padded batch
    if reference == "sequence loop":
        loss_ref, grads_ref = _loss_and_grads(_lean_model(), [packed])
    else:
        loss_ref, grads_ref = _loss_and_grads(_lean_model(), [D.collate([ex], pad_id=0) for ex in examples])
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and grads
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
