"""Prefix caching: greedy outputs with the cache on equal the cache off and the reference (a full forward per step,
no cache, the adapter loaded by `load_adapter`), for the base model, LoRA adapters and batches mixing them; an
adapter unloaded, evicted or re-uploaded under the same name never reads stale keys/values; the budget holds.
"""

import copy
import queue
import shutil
import threading

import pytest
import torch

from helpers import full_forward_greedy, save_adapters
from loraforge.config import LoraConfig
from loraforge.lora.adapters import load_adapter
from loraforge.serve import Engine, SamplingParams
from loraforge.serve.prefix import PrefixCache

CONFIGS = {  # "a" on every projection of every layer; "b" on the first layer's q/v and an MLP only
    "a": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
    "b": LoraConfig(r=8, lora_alpha=4, target_modules=("q_proj", "v_proj", "gate_proj"), init_lora_weights=False),
}
BLOCK = 8
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, base):
    return save_adapters(base, tmp_path_factory.mktemp("adapters"), CONFIGS, seed=200)


@pytest.fixture(scope="module")
def references(base, adapters_dir):
    """Memoised reference greedy tokens per (adapter, prompt)."""
    models, memo = {None: base}, {}
    for name in CONFIGS:
        models[name] = copy.deepcopy(base)
        load_adapter(models[name], adapters_dir / name, name)

    def ref(adapter, prompt):
        key = (adapter, tuple(prompt))
        if key not in memo:
            memo[key] = full_forward_greedy(models[adapter], prompt, GREEDY.max_tokens)
        return memo[key]

    return ref


@pytest.fixture
def make_engine(base, tokenizer, adapters_dir):
    engines = []

    def make(**kw):
        kw.setdefault("adapters", {n: adapters_dir / n for n in CONFIGS})
        kw.setdefault("prefix_block", BLOCK)
        engines.append(Engine(copy.deepcopy(base), tokenizer, **kw))
        return engines[-1]

    yield make
    for engine in engines:
        engine.stop()


def tokens(vocab, n, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_together(engine, jobs):
    """Submit every (adapter, prompt) while the engine is held, so they are admitted and prefilled together."""
    gate, queues = threading.Event(), []
    engine.call(gate.wait)
    for adapter, prompt in jobs:
        queues.append(queue.Queue())
        engine.submit(prompt, adapter, GREEDY, queues[-1].put)
    gate.set()
    out = []
    for q in queues:
        ids = []
        while True:
            ev = q.get(timeout=60)
            ids += ev.token_ids
            if ev.finish_reason is not None:
                assert ev.error is None, ev.error
                break
        out.append(ids)
    return out


def test_cache_on_equals_off_and_reference(make_engine, tokenizer, references):
    vocab = len(tokenizer)
    system = tokens(vocab, 4 * BLOCK, seed=1)  # a shared "system prompt" of exactly four blocks
    diverge0 = [system[0], (system[1] + 1) % vocab] + system[2:]  # differs one token in: nothing to reuse
    diverge_mid = system[:2 * BLOCK + 3] + [(system[2 * BLOCK + 3] + 1) % vocab] + system[2 * BLOCK + 4:]
    warm = [(a, system + tokens(vocab, 5, seed=2)) for a in (None, "a", "b")]
    jobs = [(a, p) for a in ("a", None, "b") for p in (
        system,  # the prompt equals a cached prefix exactly: its last block is recomputed for the logits
        system + tokens(vocab, 3, seed=3),
        system[:BLOCK + 1],  # one token past a cached block
        system[:BLOCK],  # exactly one cached block long
        diverge0 + tokens(vocab, 2, seed=4),
        diverge_mid,
        tokens(vocab, 13, seed=5),  # unrelated
    )]
    on, off = make_engine(), make_engine(prefix_cache_mb=0)
    for engine in (on, off):
        for adapter, prompt in warm:  # one at a time: each caches its prompt's blocks
            assert engine.generate(prompt, adapter, GREEDY).token_ids == references(adapter, prompt), adapter
    before = on.stats["cached_tokens"]
    assert before == 0  # the three warm-up prompts share the tokens but not the adapter
    got_on, got_off = run_together(on, jobs), run_together(off, jobs)
    assert on.stats["prefills"] == len(warm) + 1  # the mixed batch in one forward, cached prefixes and all
    for (adapter, prompt), a, b in zip(jobs, got_on, got_off):
        assert a == b == references(adapter, prompt), (adapter, len(prompt))
    # what was reused, per adapter: 3 + 4 + 1 + 0 + 0 + 2 + 0 blocks (at least one token always runs)
    assert on.stats["cached_tokens"] == 3 * 10 * BLOCK
    assert off.stats["cached_tokens"] == 0 and len(off.prefix_cache) == 0
    # and again, now that the batch cached its own blocks: hits from the mixed batch's rows
    hits = on.stats["cached_tokens"]
    again = [(a, p + tokens(vocab, 2, seed=6)) for a, p in jobs]
    assert run_together(on, again) == [references(a, p) for a, p in again]
    assert on.stats["cached_tokens"] == hits + 3 * (4 + 4 + 1 + 1 + 4 + 4 + 1) * BLOCK


def test_adapters_never_read_stale_or_foreign_prefixes(make_engine, adapters_dir, tokenizer, references, tmp_path):
    vocab = len(tokenizer)
    prompt = tokens(vocab, 3 * BLOCK + 2, seed=7)
    engine = make_engine(adapters={}, adapters_dir=adapters_dir, max_loaded=1)
    engine.add_adapter("x", "a")
    assert engine.generate(prompt, "x", GREEDY).token_ids == references("a", prompt)
    engine.remove_adapter("x")
    engine.add_adapter("x", "b")  # the same name, other weights: a new load, the old blocks are gone
    hits = engine.stats["cached_tokens"]
    assert engine.generate(prompt, "x", GREEDY).token_ids == references("b", prompt)
    assert engine.stats["cached_tokens"] == hits
    assert engine.generate(prompt, "x", GREEDY).token_ids == references("b", prompt)  # its own blocks: a hit
    assert engine.stats["cached_tokens"] == hits + 3 * BLOCK
    # evicted from the model (one slot) and reloaded: its blocks left with it, nothing reused
    engine.add_adapter("y", "a")
    assert engine.resident_adapters() == ["y"] and len(engine.prefix_cache) == 0
    for name, ref in (("y", "a"), ("x", "b"), ("y", "a")):
        hits = engine.stats["cached_tokens"]
        assert engine.generate(prompt, name, GREEDY).token_ids == references(ref, prompt)
        assert engine.stats["cached_tokens"] == hits
    # the base model's blocks are the base's own: an adapter with the same prompt does not read them
    assert engine.generate(prompt, None, GREEDY).token_ids == references(None, prompt)
    # files replaced on disk while the adapter is off the model: its reload reads the new ones and no old block
    root = tmp_path / "adapters"
    shutil.copytree(adapters_dir / "a", root / "z")
    shutil.copytree(adapters_dir / "b", root / "w")
    engine = make_engine(adapters={}, adapters_dir=root, max_loaded=1)
    assert engine.generate(prompt, "z", GREEDY).token_ids == references("a", prompt)
    assert engine.generate(prompt, "w", GREEDY).token_ids == references("b", prompt)  # z leaves the model
    shutil.rmtree(root / "z")
    shutil.copytree(adapters_dir / "b", root / "z")
    hits = engine.stats["cached_tokens"]
    assert engine.generate(prompt, "z", GREEDY).token_ids == references("b", prompt)
    assert engine.stats["cached_tokens"] == hits


def test_budget_bounds_the_cache(make_engine, base, tokenizer, references):
    config = base.config
    head_dim = config.hidden_size // config.num_attention_heads
    block_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * BLOCK * head_dim * 4  # fp32
    engine = make_engine(prefix_cache_mb=5.5 * block_bytes / 2**20)  # room for five blocks
    vocab = len(tokenizer)
    for seed in range(6):
        prompt = tokens(vocab, 3 * BLOCK + 1, seed=10 + seed)
        assert engine.generate(prompt, "a", GREEDY).token_ids == references("a", prompt)
        assert engine.prefix_cache.bytes == len(engine.prefix_cache) * block_bytes <= 5.5 * block_bytes
    assert len(engine.prefix_cache) == 5
    hits = engine.stats["cached_tokens"]
    last = tokens(vocab, 3 * BLOCK + 1, seed=15)
    assert engine.generate(last + [1], "a", GREEDY).token_ids == references("a", last + [1])
    assert engine.stats["cached_tokens"] == hits + 3 * BLOCK  # the newest prompt survived whole


def test_lru_evicts_leaves_and_matches_longest_prefix():
    cache = PrefixCache(budget=6 * 4, block=2)  # room for six blocks of (2, 1, 2, 1) int8, 4 bytes each

    def kv(n):
        return torch.zeros(2, 1, n, 1, dtype=torch.int8)

    shared, x, y = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    cache.store(7, shared + x, [], kv(8))  # four blocks
    assert len(cache) == 4 and [len(cache.match(7, shared + x + [0]))] == [4]
    assert cache.match(7, shared + x) != [] and len(cache.match(7, shared + x)) == 3  # one token left to run
    assert cache.match(8, shared + x + [0]) == []  # another owner
    assert len(cache.match(7, [1, 2, 3, 5, 0])) == 1  # diverges inside the second block
    cache.store(7, shared + y, cache.match(7, shared + y), kv(4))  # two new blocks under the shared two
    assert len(cache) == 6 and cache.bytes == 24
    cache.store(7, [4, 4, 4, 4], [], kv(4))  # over budget: the least recent leaves go (x's tail), never a parent
    assert len(cache) == 6 and cache.bytes == 24
    assert len(cache.match(7, shared + x + [0])) == 2 and len(cache.match(7, shared + y + [0])) == 4
    cache.forget(7)
    assert len(cache) == 0 and cache.bytes == 0
