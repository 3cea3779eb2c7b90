"""Packed rows attended sequence by sequence (kernels.packed_attention, fastpath's "lean" attention): the same
outputs and gradients as attention over the whole row with transformers' block-diagonal causal mask, and a packed
forward equals the per-example forwards.

Tolerances: fp32, the same products summed in the same order per sequence (the masked positions of the whole-row
softmax contribute exact zeros), so torch's default fp32 tolerances.
"""

import pytest
import torch
from helpers import VOCAB, kept_equals_recomputed, output_and_grads, packed_causal_mask, tiny_llama

from loraforge import kernels
from loraforge.config import LoraConfig
from loraforge.kernels import attention, packed_attention, segment_starts
from loraforge.lora.inject import inject, lora_layers
from loraforge.training import data as D
from loraforge.training import fastpath
from loraforge.training.fastpath import LEAN_MASKED_ATTENTION, install, register_attention
from loraforge.training.loss import CausalLMLoss


def test_segment_starts_follow_restarting_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segment_starts(pos) == [[0, 3, 5, 6], [0, 6]]
    assert segment_starts(torch.arange(6)[None].repeat(2, 1)) is None  # nothing packed


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["MHA", "GQA"])
def test_packed_attention_equals_the_block_diagonal_mask(heads):
    torch.manual_seed(0)
    (h, h_kv), dim = heads, 8
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 1, 0, 1, 2, 3, 4, 5]])
    batch, length = pos.shape
    q = torch.randn(batch, h, length, dim, requires_grad=True)
    k = torch.randn(batch, h_kv, length, dim, requires_grad=True)
    v = torch.randn(batch, h_kv, length, dim, requires_grad=True)
    keep = packed_causal_mask(pos)
    target = torch.randn(batch, h, length, dim)
    expected = output_and_grads(lambda q, k, v: attention(q, k, v, keep[:, None], dim ** -0.5), (q, k, v), target)
    got = output_and_grads(lambda q, k, v: packed_attention(q, k, v, segment_starts(pos), dim ** -0.5), (q, k, v),
                           target)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("start", [0, 16], ids=["first-block", "later-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_segment_probabilities_are_the_masked_softmax(dim, dtype, start):
    """The last block of a sequence's queries (positions start..37, against the keys up to 37; scaling folded into
    one baddbmm with the additive causal mask) against the plain formula over the whole sequence,
    softmax(masked_fill(q kᵀ · scaling)) in fp32 rounded to the dtype, its rows start..37: the same bits at 1/√64,
    within the dtype's tolerance at 1/√128 (the scale is then rounded once instead of twice)."""
    torch.manual_seed(0)
    n, groups, kv_heads = 37, 3, 2
    qs, ks = torch.randn(kv_heads, groups, n, dim).to(dtype), torch.randn(kv_heads, n, dim).to(dtype)
    block = qs[:, :, start:].reshape(kv_heads, groups * (n - start), dim)
    got = kernels._segment_probs(block, ks, kernels._causal_bias([[0, n]], dtype, "cpu"), start, dim ** -0.5)
    scores = torch.matmul(qs, ks[:, None].transpose(-1, -2)) * dim ** -0.5  # (Hkv, G, n, n)
    scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)[:, :, start:].flatten(1, 2)
    if dim == 64:
        assert torch.equal(got, expected)
    torch.testing.assert_close(got, expected)


def _lean_model(attn: str = "lean"):
    model = tiny_llama(seed=0)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "default")
    for _, layer in lora_layers(model):
        layer.fused = True
    install(model)
    register_attention()
    model.set_attn_implementation(attn)
    return model.train()


def _examples(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        out.append(D.Example(ids, [-100] * 2 + ids[2:]))
    return out


def _loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    loss_fn = CausalLMLoss(model, share_prefix=False)
    total = n = 0
    for batch in batches:
        loss, count = loss_fn(batch)
        total, n = total + loss, n + count
    (total / n).backward()
    return (total / n).detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_packed_forward_equals_per_example_forwards(monkeypatch):
    """Packed rows (several examples, a padding tail) through the lean attention: loss and LoRA gradients equal
    those of each example on its own, and the sequence-by-sequence path is the one that ran."""
    examples = _examples([9, 5, 12, 3, 7, 6])
    packed = D.collate(D.pack(examples, 16), pad_id=0)
    assert "position_ids" in packed and packed["input_ids"].shape[0] > 1
    calls = []
    monkeypatch.setattr(fastpath.K, "packed_attention",
                        lambda *a, _f=fastpath.K.packed_attention: calls.append(1) or _f(*a))
    model = _lean_model()
    loss_packed, grads_packed = _loss_and_grads(model, [packed])
    assert len(calls) == model.config.num_hidden_layers
    loss_single, grads_single = _loss_and_grads(model, [D.collate([ex], pad_id=0) for ex in examples])
    torch.testing.assert_close(loss_packed, loss_single)
    for name, grad in grads_single.items():
        torch.testing.assert_close(grads_packed[name], grad, msg=name)


def test_packed_rows_same_as_the_whole_row_mask():
    """The sequence-by-sequence path against lean attention over the whole row with the (T, T) mask."""
    examples = _examples([9, 5, 12, 3, 7, 6, 2, 10], seed=2)
    packed = D.collate(D.pack(examples, 20), pad_id=0)
    loss_seq, grads_seq = _loss_and_grads(_lean_model(), [packed])
    loss_mask, grads_mask = _loss_and_grads(_lean_model(LEAN_MASKED_ATTENTION), [packed])
    torch.testing.assert_close(loss_seq, loss_mask)
    for name, grad in grads_mask.items():
        torch.testing.assert_close(grads_seq[name], grad, msg=name)


def test_a_padding_mask_is_never_replaced_by_sequences():
    """Position ids that restart but a mask that is not their block-diagonal one (here: padding given as an
    attention mask): the whole mask is used, so the output equals the masked path's."""
    model = _lean_model()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
        model.set_attn_implementation(LEAN_MASKED_ATTENTION)
        expected = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_probabilities_give_the_kept_ones_bits(dtype):
    """By default the packed node keeps only q, k and v and recomputes each sequence's probabilities in the backward
    by the forward's own formula: outputs and gradients bit-equal to keeping the probabilities (keep_probs=True),
    in fp32 and under bf16 autocast, and nothing of Σ Lᵢ² size is saved."""
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    starts = segment_starts(pos)
    q = torch.randn(2, 6, 12, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 12, 8, requires_grad=True) for _ in range(2))
    target = torch.randn(2, 6, 12, 8)
    attend = lambda q, k, v, keep: packed_attention(q, k, v, starts, 8 ** -0.5, keep)  # noqa: E731
    saved = kept_equals_recomputed(output_and_grads, attend, (q, k, v), target, dtype)
    assert sorted(saved[False]) == sorted([q.numel(), k.numel(), v.numel()])  # q, k, v only
    probs = [6 * n * n for n in (4, 3, 2, 3, 12)]  # (Hkv, G·L, L) per sequence: 2 · 3 · L · L
    assert sorted(saved[True]) == sorted(saved[False] + probs)


@pytest.mark.parametrize("lengths,packed_path", [([3, 4, 2, 4], True), ([3, 9, 2], False)],
                         ids=["short-sequences", "one-long-sequence"])
def test_rows_longer_than_the_lean_limit_run_packed_or_on_sdpa(monkeypatch, lengths, packed_path):
    """With the limit at 5 tokens: a packed row of sequences up to 5 runs sequence by sequence, a row holding a
    longer sequence goes to SDPA; either way loss and gradients equal transformers' SDPA over the whole row."""
    monkeypatch.setattr(fastpath, "LEAN_MAX_LENGTH", 5)
    calls = {"packed": 0, "sdpa": 0}
    monkeypatch.setattr(fastpath.K, "packed_attention",
                        lambda *a, _f=fastpath.K.packed_attention: calls.update(packed=calls["packed"] + 1) or _f(*a))
    monkeypatch.setattr(fastpath, "sdpa_attention_forward", lambda *a, _f=fastpath.sdpa_attention_forward, **k:
                        calls.update(sdpa=calls["sdpa"] + 1) or _f(*a, **k))
    packed = D.collate(D.pack(_examples(lengths, seed=3), 16), pad_id=0)
    assert packed["input_ids"].shape == (1, sum(lengths))
    loss, grads = _loss_and_grads(_lean_model(), [packed])
    layers = _lean_model().config.num_hidden_layers
    assert calls == ({"packed": layers, "sdpa": 0} if packed_path else {"packed": 0, "sdpa": layers})
    loss_sdpa, grads_sdpa = _loss_and_grads(_lean_model("sdpa"), [packed])
    torch.testing.assert_close(loss, loss_sdpa)
    for name, grad in grads_sdpa.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_an_unpacked_row_longer_than_the_lean_limit_goes_to_sdpa(monkeypatch):
    monkeypatch.setattr(fastpath, "LEAN_MAX_LENGTH", 5)
    calls = []
    monkeypatch.setattr(fastpath, "sdpa_attention_forward", lambda *a, _f=fastpath.sdpa_attention_forward, **k:
                        calls.append(1) or _f(*a, **k))
    short, long = (D.collate(_examples([n], seed=4), pad_id=0) for n in (5, 8))
    model = _lean_model()
    for batch, expected in ((short, 0), (long, model.config.num_hidden_layers)):
        calls.clear()
        loss, grads = _loss_and_grads(model, [batch])
        assert len(calls) == expected
        loss_sdpa, grads_sdpa = _loss_and_grads(_lean_model("sdpa"), [batch])
        torch.testing.assert_close(loss, loss_sdpa)
        for name, grad in grads_sdpa.items():
            torch.testing.assert_close(grads[name], grad, msg=name)


@pytest.mark.parametrize("limit, kept", [(8, True), (6, False)])
def test_unpacked_rows_keep_probabilities_up_to_the_limit_and_recompute_beyond(monkeypatch, limit, kept):
    """fastpath.KEEP_PROBS_MAX_LENGTH: an unpacked row of 7 positions keeps its (B, H, L, S) probabilities under a
    limit of 8 and saves q, k, v and the mask instead under 6; the loss and every gradient are the same bits."""
    monkeypatch.setattr(fastpath, "KEEP_PROBS_MAX_LENGTH", limit)
    torch.manual_seed(0)
    q = torch.randn(2, 6, 7, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 8, requires_grad=True) for _ in range(2))
    mask = torch.zeros(7, 7).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    module, sizes = torch.nn.Module().train(), []

    def run(q, k, v):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            return fastpath.lean_attention_forward(module, q, k, v, mask[None, None], 8 ** -0.5)[0]

    target = torch.randn(2, 7, 6, 8)
    got = output_and_grads(run, (q, k, v), target)
    probs = 2 * 6 * 7 * 7
    assert sorted(sizes) == sorted([q.numel(), k.numel(), v.numel(), probs if kept else 49])  # or the mask
    reference = output_and_grads(
        lambda q, k, v: attention(q, k, v, mask[None, None], 8 ** -0.5, keep_probs=not kept).transpose(1, 2),
        (q, k, v), target)
    for a, b in zip(got, reference):
        assert torch.equal(a, b)
