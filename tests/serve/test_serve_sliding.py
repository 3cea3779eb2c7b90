"""Bases that transformers' forward runs with sliding-window layers (Gemma 2 with its soft-capping, Gemma 3, Mistral,
Phi-3 and Qwen 3 with sliding_window set): each request's greedy tokens, alone and in a batch mixing adapters, equal
transformers' generate (do_sample=False) with the adapter through PEFT, for prompts shorter and longer than the
window, and with a cached, chunked system prompt. A soak found every such base hung: its sliding cache layers made
the batch's join raise after the prompts had left the queue, and no one ended their requests."""

import copy
import queue
import threading

import peft
import pytest
import torch
import transformers

from helpers import randomize
from loraforge.config import LoraConfig
from loraforge.lora.adapters import save_adapter
from loraforge.lora.inject import inject
from loraforge.serve import Engine, SamplingParams, ServeError
from loraforge.serve.batch import Batch
from test_serve_engine import collect, prompts

pytestmark = pytest.mark.usefixtures("one_thread")

# (no warnings-as-errors here: PEFT, the reference, calls transformers' deprecated is_gradient_checkpointing)
N = 8
WINDOW = 8  # tokens a sliding layer attends to: the prompts run from shorter than it to four times it
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
MODELS = {
    "gemma2": lambda v: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=v, **SIZES, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, query_pre_attn_scalar=16)),
    "gemma3_text": lambda v: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=v, **SIZES, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"])),
    "mistral": lambda v: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=v, **SIZES, sliding_window=WINDOW)),
    "phi3": lambda v: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=v, **SIZES, sliding_window=WINDOW, pad_token_id=0)),
    "qwen3": lambda v: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=v, **SIZES, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
}


@pytest.fixture(scope="module", autouse=True)
def decode_path():
    """Not Llama: these bases take transformers' forward whatever the engine's default (conftest's two paths)."""
    yield "forward"


def generate(base, adapter, prompt):
    """transformers' own greedy generate, with its sliding-window cache, the adapter through PEFT."""
    model = copy.deepcopy(base)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.generation_config.eos_token_id = None  # every row N tokens, as ignore_eos serves them
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=N, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", MODELS)
def test_a_sliding_window_base_serves_generates_tokens(kind, tokenizer, tmp_path):
    torch.manual_seed(0)
    base = MODELS[kind](len(tokenizer)).eval()
    assert [type(layer).__name__ for layer in transformers.DynamicCache(config=base.config).layers].count(
        "DynamicSlidingWindowLayer") >= 1  # transformers' own cache for it: sliding layers
    linear = ("qkv_proj", "o_proj") if kind == "phi3" else ("q_proj", "v_proj")
    for i, (name, targets) in enumerate({"a": "all-linear", "b": linear}.items()):
        model = copy.deepcopy(base)
        torch.manual_seed(10 + i)
        inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), name)
        save_adapter(randomize(model, seed=20 + i), tmp_path / name, name)
    system = prompts(len(tokenizer), [3 * WINDOW], seed=1)[0]  # cached in blocks of 4, prefilled 8 tokens a pass
    jobs = list(zip(["a", None, "b", "a", "b", None, "a", "b"],
                    prompts(len(tokenizer), [1, 5, WINDOW + 1, 20, 4 * WINDOW], seed=2) +
                    [system + p for p in prompts(len(tokenizer), [2, 11, 3 * WINDOW], seed=3)]))
    expected = [generate(base, adapter and tmp_path / adapter, prompt) for adapter, prompt in jobs]
    assert len({tuple(e) for e in expected[:3]}) == 3  # the adapters matter
    engine = Engine(copy.deepcopy(base), tokenizer, adapters={"a": tmp_path / "a", "b": tmp_path / "b"},
                    prefix_block=4, prefill_chunk=WINDOW)
    try:
        params = SamplingParams(max_tokens=N, ignore_eos=True)
        singles = [engine.generate(prompt, adapter, params, timeout=60).token_ids for adapter, prompt in jobs]
        gate = threading.Event()
        engine.call(gate.wait)  # hold the engine: every request joins one batch, the cached prefixes among them
        queues = [queue.Queue() for _ in jobs]
        for (adapter, prompt), q in zip(jobs, queues):
            engine.submit(prompt, adapter, params, q.put)
        gate.set()
        batched = [collect(q)[0] for q in queues]
        assert engine.stats["max_running"] == len(jobs) and engine.stats["cached_tokens"] > 0
    finally:
        engine.stop()
    assert singles == expected
    assert batched == expected


def test_a_failed_join_ends_its_requests(base, tokenizer, monkeypatch):
    """Requests that left the queue for a prefill end with an error if their rows cannot join the batch, and the
    engine serves on; they were lost (their clients waited for ever) when Gemma 2's join raised."""
    def no_room(*args):
        raise RuntimeError("no room")

    engine = Engine(copy.deepcopy(base), tokenizer, static=False)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(Batch, "join", no_room)
            q = queue.Queue()
            engine.submit(prompts(len(tokenizer), [5])[0], None, SamplingParams(max_tokens=4), q.put)
            _, _, last = collect(q, timeout=30)
        assert last.finish_reason == "error" and last.error == "RuntimeError: no room"
        assert engine.generate(prompts(len(tokenizer), [5])[0], None, SamplingParams(max_tokens=4),
                               timeout=30).completion_tokens == 4
    finally:
        engine.stop()


@pytest.mark.skipif(not hasattr(transformers, "Lfm2ForCausalLM"), reason="transformers without LFM2")
def test_a_base_whose_cache_the_batch_cannot_hold_is_refused_at_start(tokenizer):
    """LFM2's convolution layers keep a state, not keys/values per token: refused when the engine starts, naming
    the model type and what runs it, not at its first request."""
    model = transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        vocab_size=len(tokenizer), **SIZES, layer_types=["conv", "full_attention"])).eval()
    with pytest.raises(ServeError, match="cannot batch lfm2: its LinearAttentionLayer .*`loraforge generate`"):
        Engine(model, tokenizer)
