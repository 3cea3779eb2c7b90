"""loraforge.decoding against transformers' own greedy generate: the same tokens, with the shared prefix computed
once and finished rows leaving the batch."""

import functools

import pytest
import torch

from helpers import VOCAB, tiny_gpt2, tiny_llama
from loraforge.decoding import greedy, left_pad, select_rows, shared_prefix_len


def _reference(model, prompts, stop, max_new_tokens):
    """transformers' generate, one prompt at a time (no padding at all), cut after the first stop token."""
    out = []
    for p in prompts:
        ids = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stop, pad_token_id=stop[0])[0, len(p):].tolist()
        end = next((k for k, t in enumerate(ids) if t in stop), None)
        out.append(ids if end is None else ids[:end + 1])
    return out


def _prompts(shared: int, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, VOCAB, (shared,), generator=g).tolist()
    return [head + torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("shared", [0, 12], ids=["no-prefix", "shared-prefix"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("static", [True, False], ids=["static", "transformers"])
def test_greedy_equals_transformers_generate(make, shared, batch_size, static):
    """Llama: the static decoder by default, transformers' forward with static=False; GPT-2: transformers' always."""
    model = make()
    prompts = _prompts(shared, [1, 5, 2, 9, 3, 1, 7])
    reference = _reference(model, prompts, [0, 1], 12)
    stop = sorted({t[3] for t in reference if len(t) > 3})[:2]  # tokens that really occur: rows end at different steps
    reference = _reference(model, prompts, stop, 12)
    assert len({len(r) for r in reference}) > 1  # rows do leave the batch early
    assert greedy(model, prompts, stop, max_new_tokens=12, batch_size=batch_size, static=static) == reference


def test_shared_prefix_is_computed_once(monkeypatch):
    model = tiny_gpt2()  # transformers' forward (the static decoder on Llama: tests/inference)
    prompts = _prompts(20, [3, 4, 5])
    widths = []
    forward = type(model).forward

    @functools.wraps(forward)  # the signature stays the model's: greedy passes the cache by its current name
    def recording(self, input_ids=None, **kw):
        widths.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(model), "forward", recording)
    greedy(model, prompts, [VOCAB + 1], max_new_tokens=2, batch_size=8)  # a stop id never produced
    assert widths[:2] == [(1, 20), (3, 5)]  # the prefix as one row; then each row's own tokens, padded to 5
    assert widths[2:] == [(3, 1)]  # one decode step for the second token


def test_shared_prefix_len_leaves_each_row_a_token():
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix_len([[5, 2], [1, 2]]) == 0


def test_select_rows_and_left_pad():
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.arange(2 * 1 * 4 * 1, dtype=torch.float).reshape(2, 1, 4, 1)
    cache.update(k, -k, 0)
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    new = select_rows(cache, mask, torch.tensor([0]))
    assert new.tolist() == [[1, 1]]  # columns that are padding in every remaining row are dropped
    assert cache.layers[0].keys.flatten().tolist() == [2.0, 3.0]
    assert left_pad(torch.ones(1, 2), 4, dim=1).tolist() == [[0, 0, 1, 1]]


def test_bad_arguments_are_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_new_tokens must be ≥ 1, got 0"):
        greedy(model, [[1]], [0], max_new_tokens=0)
    with pytest.raises(ValueError, match="empty prompt"):
        greedy(model, [[1], []], [0])
