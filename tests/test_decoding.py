"""loraforge.decoding against transformers' own greedy generate: the same tokens, with the shared prefix computed
once and finished rows leaving the batch; the model's context (models.context_length) checked against
data.max_seq_len and reached by generation, which stops there."""

import functools
import re

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, MistralConfig, MistralForCausalLM, T5Config

from helpers import VOCAB, tiny_gpt2, tiny_llama
from loraforge.config import ConfigError
from loraforge import decoding
from loraforge.decoding import _hf_generate as hf_generate
from loraforge.decoding import greedy, left_pad, select_rows, shared_prefix_len
from loraforge.models import check_fits_context, context_length, load_config


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


# --- the model's context: data.max_seq_len checked against it, generation cut at it ------------------------------
def _yarn(factor):
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 128}


def test_context_length_reads_positions_and_rope_scalings_that_say_their_reach():
    assert context_length(tiny_llama(max_position_embeddings=128).config) == 128
    assert context_length(tiny_gpt2().config) == 64  # n_positions
    assert context_length(LlamaConfig(max_position_embeddings=128, rope_scaling=_yarn(4.0))) == 512  # 128 × 4
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0}  # Llama 3.1's: max_position_embeddings is already the scaled context
    assert context_length(LlamaConfig(max_position_embeddings=131072, rope_scaling=llama3)) == 131072
    assert context_length(LlamaConfig(max_position_embeddings=128, rope_scaling={"rope_type": "linear",
                                                                                  "factor": 4.0})) == 128
    assert context_length(T5Config()) is None  # relative positions: no limit


def test_max_seq_len_past_the_context_is_refused_by_name(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")  # what a training run reads before its data: the config alone
    config = load_config(str(tmp_path / "gpt2"))
    check_fits_context(64, config)
    with pytest.raises(ConfigError, match=re.escape(
            f"data.max_seq_len: 65 is past the model's context of 64 tokens (n_positions in the config of "
            f"{tmp_path / 'gpt2'}); use at most 64")):
        check_fits_context(65, config)
    with pytest.raises(IndexError):  # what training would have met: GPT-2 has no 65th position embedding
        tiny_gpt2()(torch.zeros(1, 65, dtype=torch.long))
    llama = tiny_llama(max_position_embeddings=128).config
    check_fits_context(128, llama)
    with pytest.raises(ConfigError, match=re.escape(  # RoPE runs past it, on positions it never saw: refused too
            "data.max_seq_len: 512 is past the model's context of 128 tokens (max_position_embeddings in its "
            "config); use at most 128")):
        check_fits_context(512, llama)


def test_rope_scaling_moves_the_limit_or_only_warns():
    yarn = LlamaConfig(max_position_embeddings=128, rope_scaling=_yarn(4.0))
    check_fits_context(512, yarn)
    with pytest.raises(ConfigError, match=re.escape(
            "data.max_seq_len: 513 is past the model's context of 512 tokens (rope_scaling yarn: "
            "original_max_position_embeddings 128 × factor 4.0 in its config); use at most 512")):
        check_fits_context(513, yarn)
    dynamic = LlamaConfig(max_position_embeddings=128, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    with pytest.warns(UserWarning, match=re.escape(
            "data.max_seq_len 300 is past the model's 128 positions (max_position_embeddings in its config); its "
            "rope_scaling 'dynamic' may reach further, by an amount the config does not say: check the model "
            "card, or use at most 128")):
        check_fits_context(300, dynamic)


@pytest.mark.parametrize("make, static", [(tiny_llama, True), (tiny_llama, False), (tiny_gpt2, False)],
                         ids=["llama-static", "llama-transformers", "gpt2"])
def test_generation_stops_at_the_context_with_one_warning(make, static):
    """A huge max_new_tokens: each row stops where it reaches the context (the others run to max_new_tokens),
    the tokens transformers' generate gives for that many; one warning for the batch."""
    model = make()
    context = context_length(model.config)
    prompts = _prompts(0, [context - 6, 3, context - 2])
    never = [VOCAB + 1]  # a stop token never produced: rows end at their limit
    with pytest.warns(UserWarning) as caught:
        out = greedy(model, prompts, never, max_new_tokens=10, batch_size=3, static=static)
    assert [str(w.message) for w in caught] == [
        f"max_new_tokens 10: 2 of 3 prompts reach the model's context of {context} tokens first (the longest prompt "
        f"takes {context - 2}); their continuations stop at the context"]
    assert [len(o) for o in out] == [6, 10, 2]
    assert out == [_reference(model, [p], never, n)[0] for p, n in zip(prompts, [6, 10, 2])]


def test_sliding_window_models_stop_at_the_context_too(monkeypatch):
    """transformers' generate (the path for sliding-window caches) runs once per limit, on the rows of that limit:
    none runs past the context."""
    calls = []
    monkeypatch.setattr(decoding, "_hf_generate", lambda model, prompts, stop, n, device: calls.append(
        ([len(p) for p in prompts], n)) or hf_generate(model, prompts, stop, n, device))
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=48, sliding_window=16)).eval()
    prompts = _prompts(0, [45, 4])
    stop = [VOCAB - 1]  # in the vocabulary (generate pads with it), never produced here: rows end at their limit
    with pytest.warns(UserWarning, match="1 of 2 prompts reach the model's context of 48 tokens first"):
        out = greedy(model, prompts, stop, max_new_tokens=8, static=False)
    assert calls == [([45], 3), ([4], 8)] and [len(o) for o in out] == [3, 8]  # 45 + 3 = 48: to the context
    assert out == [_reference(model, [prompts[0]], stop, 3)[0], _reference(model, [prompts[1]], stop, 8)[0]]


WINDOW = 8  # tokens a sliding layer attends to; the prompts run from shorter than it to five times it
SLIDING = {
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=WINDOW,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=8)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=WINDOW)),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", SLIDING)
def test_sliding_window_models_batch_through_generate_with_its_tokens_per_prompt(kind, monkeypatch):
    """Sliding-window models run transformers' generate on left-padded batches (the rows of one limit together),
    not a prompt at a time: the tokens equal generate's run per prompt, unpadded, for prompts shorter and longer
    than the window and rows that stop early. (The server's way, full cache layers and a mask, gave the same tokens
    but was no faster: equal on a Mistral, 1.5x slower on a Gemma 2, 64 prompts on CPU.)"""
    calls = []
    monkeypatch.setattr(decoding, "_hf_generate", lambda model, prompts, *a: calls.append(len(prompts)) or
                        hf_generate(model, prompts, *a))
    torch.manual_seed(0)
    model = SLIDING[kind]().eval()
    prompts = _prompts(6, [1, 3, WINDOW, WINDOW + 3, 2 * WINDOW, 5 * WINDOW - 6, 20])  # a 6-token shared head
    found = greedy(model, prompts, [VOCAB - 1], max_new_tokens=12, static=False)  # VOCAB - 1: never produced
    stop = sorted({t[4] for t in found})[:2]  # tokens that really occur: rows end early
    reference = _reference(model, prompts, stop, 12)
    assert len({len(r) for r in reference}) > 1
    calls.clear()
    assert greedy(model, prompts, stop, max_new_tokens=12, batch_size=4, static=False) == reference
    assert calls == [4, 3]  # batched


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_prompt_that_fills_the_context_is_refused(make):
    model = make()
    context = context_length(model.config)
    with pytest.raises(ValueError, match=re.escape(
            f"prompt 1 takes {context} tokens and the model's context is {context}: no new token fits after it; "
            f"shorten it")):
        greedy(model, _prompts(0, [3, context]), [0], max_new_tokens=1)
