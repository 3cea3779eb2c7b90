"""kernels.packed_attention with the queries of sequences over two blocks in blocks (kernels.QUERY_BLOCK, each block
against the keys up to its own end) against the same node with a sequence's queries at once and against a float64
reference of the block-diagonal causal mask: outputs and the gradients of q, k and v, with shared key heads (GQA),
sequences of 1 token, sequences of one block and of several, a block that does not divide the sequence.

Tolerances: a block's softmax and products run over the keys up to its end, not the sequence's, so their sums
are cut into other vector lengths and GEMM blocks: fp32 at torch's defaults (and within 1e-5 of the float64
reference); bf16 at most 1.5× the unblocked
node's own largest error against the float64 reference (dk and dv sum the blocks' parts in fp32, so one position a
block, 300 parts, stays within it too).
"""

import pytest
import torch
from helpers import kept_equals_recomputed, output_and_grads, packed_causal_mask
from transformers import AttentionInterface

from loraforge.kernels import QUERY_BLOCK, attention, packed_attention, segment_starts
from loraforge.training import fastpath
from loraforge.training.fastpath import LEAN_WHOLE_ATTENTION

HEADS, KV_HEADS, DIM = 6, 2, 64
POSITIONS = [list(range(300)) + list(range(1)) + list(range(211)),
             list(range(512)),
             list(range(37)) + list(range(100)) + list(range(375))]
MASK = packed_causal_mask(torch.tensor(POSITIONS))[:, None]  # (B, 1, T, T): the block-diagonal causal mask


def _inputs(dtype, seed=0):
    """q (B, H, T, D), k, v (B, Hkv, T, D) as transformers makes them: views of (B, T, heads, D)."""
    gen = torch.Generator().manual_seed(seed)
    batch, length = len(POSITIONS), len(POSITIONS[0])
    q = torch.randn(batch, length, HEADS, DIM, generator=gen).transpose(1, 2)
    k, v = (torch.randn(batch, length, KV_HEADS, DIM, generator=gen).transpose(1, 2) for _ in range(2))
    target = torch.randn(batch, HEADS, length, DIM, generator=gen)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], target.to(dtype)


def _reference(inputs, target):
    """Attention over the whole row with the block-diagonal causal mask, in float64."""
    wide = [t.detach().double().requires_grad_() for t in inputs]
    return output_and_grads(lambda q, k, v: attention(q, k, v, MASK, DIM ** -0.5), wide, target.double())


@pytest.mark.parametrize("block", [QUERY_BLOCK, 1, 77], ids=["default", "one-position", "77"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_query_blocks_equal_whole_sequences_and_the_float64_mask(dtype, block):
    inputs, target = _inputs(dtype)
    starts = segment_starts(torch.tensor(POSITIONS))
    assert starts[0] == [0, 300, 301, 512] and QUERY_BLOCK == 128
    blocked = output_and_grads(lambda q, k, v: packed_attention(q, k, v, starts, DIM ** -0.5, block=block), inputs,
                               target)
    whole = output_and_grads(lambda q, k, v: packed_attention(q, k, v, starts, DIM ** -0.5, block=None), inputs,
                             target)
    reference = _reference(inputs, target)
    for name, b, w, r in zip(("out", "dq", "dk", "dv"), blocked, whole, reference):
        assert b.dtype == w.dtype == dtype and b.shape == w.shape == r.shape, name
        if dtype == torch.float32:
            torch.testing.assert_close(b, w, msg=name)
            torch.testing.assert_close(b.double(), r, rtol=1e-5, atol=1e-5, msg=name)
        else:
            err_blocked, err_whole = ((t.double() - r).abs().max().item() for t in (b, w))
            assert err_blocked <= 1.5 * err_whole, (name, err_blocked, err_whole)


def test_sequences_are_isolated():
    """Changing one sequence's q, k and v changes nothing, bit for bit, in the other sequences of its row or in
    other rows (outputs and gradients)."""
    (q, k, v), target = _inputs(torch.float32)
    starts = segment_starts(torch.tensor(POSITIONS))
    before = output_and_grads(lambda q, k, v: packed_attention(q, k, v, starts, DIM ** -0.5), (q, k, v), target)
    with torch.no_grad():
        for t in (q, k, v):
            t[0, :, :300] += 1.0  # row 0's first sequence
    after = output_and_grads(lambda q, k, v: packed_attention(q, k, v, starts, DIM ** -0.5), (q, k, v), target)
    for a, b in zip(before, after):
        assert torch.equal(a[0, :, 300:], b[0, :, 300:]) and torch.equal(a[1:], b[1:])
        assert not torch.equal(a[0, :, :300], b[0, :, :300])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kept_block_probabilities_give_the_recomputed_bits(dtype):
    """Keeping each block's probabilities (keep_probs=True) against recomputing them: the same bits, in fp32 and
    under bf16 autocast; kept, each block is its own rows × the keys up to its end (a sequence of up to two blocks
    is one block: L²); recomputing keeps q, k and v only."""
    inputs, target = _inputs(torch.float32)
    starts = segment_starts(torch.tensor(POSITIONS))
    attend = lambda q, k, v, keep: packed_attention(q, k, v, starts, DIM ** -0.5, keep)  # noqa: E731
    saved = kept_equals_recomputed(output_and_grads, attend, inputs, target, dtype)
    q, k, v = inputs
    assert sorted(saved[False]) == sorted([q.numel(), k.numel(), v.numel()])
    lengths = [e - a for row in starts for a, e in zip(row, row[1:])]
    assert sorted(lengths) == [1, 37, 100, 211, 300, 375, 512]
    whole = [HEADS * n * n for n in lengths if n <= 2 * QUERY_BLOCK]  # 1, 37, 100, 211: one block
    blocks = [HEADS * (min(c + QUERY_BLOCK, n) - c) * min(c + QUERY_BLOCK, n)
              for n in (300, 375, 512) for c in range(0, n, QUERY_BLOCK)]
    assert sorted(saved[True]) == sorted(saved[False] + whole + blocks)
    assert sum(blocks) < 0.7 * HEADS * (300 ** 2 + 375 ** 2 + 512 ** 2)


def test_a_block_must_be_positive():
    (q, k, v), _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="block must be a positive number of positions or None, not 0"):
        packed_attention(q, k, v, segment_starts(torch.tensor(POSITIONS)), DIM ** -0.5, block=0)


def test_lean_attention_blocks_unless_lean_whole(monkeypatch):
    """fastpath's "lean" attention hands packed rows to packed_attention with QUERY_BLOCK, "lean_whole"
    (bench/train.py's lf-wholeseq) with None; both give the same output to fp32's rounding."""
    calls = []
    original = fastpath.K.packed_attention
    monkeypatch.setattr(fastpath.K, "packed_attention", lambda *a: calls.append(a[-1]) or original(*a))
    fastpath.register_attention()
    (q, k, v), _ = _inputs(torch.float32)
    outs = [AttentionInterface()[name](torch.nn.Module(), q, k, v, MASK, DIM ** -0.5,
                                       position_ids=torch.tensor(POSITIONS))[0]
            for name in ("lean", LEAN_WHOLE_ATTENTION)]
    assert calls == [QUERY_BLOCK, None]
    torch.testing.assert_close(outs[0], outs[1])
