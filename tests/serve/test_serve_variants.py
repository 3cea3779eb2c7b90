"""Beyond plain LoRA in the server's mixed batches: DoRA, rank/alpha patterns and AdaLoRA adapters, each row's
greedy tokens equal to PEFT's (PeftModel.from_pretrained on the same directory, a full forward per token, batch 1);
modules_to_save and bias adapters fail closed with the reason."""

import copy
import json
import queue
import shutil
import threading
import warnings

import peft
import pytest
import torch

from helpers import full_forward_greedy, perturb, tiny_llama
from loraforge.lora.adalora import AdaLoraConfig, inject_adalora
from loraforge.lora.adapters import AdapterError, save_adapter
from loraforge.config import LoraConfig
from loraforge.inference import cpu_kernels
from loraforge.lora.inject import inject, lora_layers
from loraforge.serve import Engine, SamplingParams
from test_serve_engine import collect, prompts

pytestmark = pytest.mark.usefixtures("one_thread")

# (no warnings-as-errors here: PEFT, the reference, calls transformers' deprecated is_gradient_checkpointing)
N = 8


def peft_greedy(base, path, prompt, n):  # noqa: F811
    return full_forward_greedy(peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval(), prompt, n)


@pytest.fixture(scope="module")
def variants(base, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("variants")
    configs = {
        "plain": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                           target_modules=("q_proj", "v_proj", "up_proj", "down_proj")),
        "other-ada-layer": LoraConfig(r=2, target_modules=("gate_proj",), init_lora_weights=False),
        "pattern": LoraConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6},
                              alpha_pattern={"v_proj": 32}, init_lora_weights=False),
        "ada": AdaLoraConfig(total_step=10, init_r=4, target_r=2, tinit=2, tfinal=3, lora_alpha=16,
                             init_lora_weights=False, target_modules=("gate_proj",)),  # see test_adalora_and_lora_*
    }
    for i, (name, config) in enumerate(configs.items()):
        model = copy.deepcopy(base)
        torch.manual_seed(200 + i)
        if isinstance(config, AdaLoraConfig):
            inject_adalora(model, config, name)
        else:
            inject(model, config, name)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in getattr(layer, "lora_magnitude_vector", {}):  # m away from ‖W0 + sBA‖: g != 1
                    m = layer.lora_magnitude_vector[name]
                    m.mul_(torch.rand(m.shape) + 0.5)
                if type(layer).__name__ == "SVDLinear":  # non-zero singular values and B
                    layer.lora_E[name].normal_(0, 1)
        save_adapter(model, root / name, name)
    return root


def greedy_in_one_batch(engine, names, ps):
    """Each prompt's N greedy tokens, all submitted while the engine is held so that they start in one batch."""
    gate, holding = threading.Event(), threading.Event()
    engine.call(lambda: (holding.set(), gate.wait(60)))
    assert holding.wait(30)
    queues = []
    for name, p in zip(names, ps):
        queues.append(queue.Queue())
        engine.submit(p, name, SamplingParams(max_tokens=N, ignore_eos=True), queues[-1].put)
    gate.set()
    return [collect(q)[0] for q in queues]


@pytest.mark.parametrize("kernels", [True, False], ids=["decode-kernel", "bmm"])
def test_mixed_batch_of_variants_equals_peft(base, tokenizer, variants, kernels, monkeypatch):  # noqa: F811
    """Decode steps through cpu_kernels.lora_rows (where it runs) and through bmm on gathered copies."""
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_lib", None)
    names = ["plain", "dora", "pattern", "ada", None, "dora", "ada", "pattern"]
    engine = Engine(copy.deepcopy(base), tokenizer, adapters={n: variants / n for n in set(names) - {None}})
    try:
        ps = prompts(len(tokenizer), [5, 9, 3, 12, 7, 4, 10, 6], seed=21)
        got = greedy_in_one_batch(engine, names, ps)
        assert engine.stats["max_running"] == len(names)  # one batch mixing every kind
        for name, p, tokens in zip(names, ps, got):
            want = peft_greedy(base, variants / name, p, N) if name else peft_greedy_base(base, p)
            assert tokens == want, name
        # each variant changes the output (so the comparison above is not base vs base)
        alone = {n: tuple(engine.generate(ps[0], n, SamplingParams(max_tokens=N, ignore_eos=True)).token_ids)
                 for n in ["plain", "dora", "pattern", "ada", None]}
        assert len(set(alone.values())) == 5
    finally:
        engine.stop()


def peft_greedy_base(base, prompt):  # noqa: F811
    return full_forward_greedy(base, prompt, N)


@pytest.mark.parametrize("extra, reason", [({"modules_to_save": ("lm_head",)}, "modules_to_save"),
                                           ({"bias": "all"}, "bias='all'"), ({"bias": "lora_only"}, "lora_only")])
def test_unservable_adapters_fail_closed(base, tokenizer, tmp_path, extra, reason):  # noqa: F811
    model = copy.deepcopy(base)
    inject(model, LoraConfig(r=2, target_modules=("q_proj",), **extra), "x")
    save_adapter(model, tmp_path / "x", "x")
    with pytest.raises(AdapterError, match=reason):
        Engine(copy.deepcopy(base), tokenizer, adapters={"x": tmp_path / "x"})
    engine = Engine(copy.deepcopy(base), tokenizer, adapters_dir=tmp_path)
    try:
        with pytest.raises(Exception, match=reason):
            engine.generate([1, 2, 3], "x", SamplingParams(max_tokens=2))
        assert engine.generate([1, 2, 3], None, SamplingParams(max_tokens=2)).completion_tokens >= 1
        assert not [layer for _, layer in lora_layers(engine.model)]  # nothing left on the model
    finally:
        engine.stop()


def test_adalora_and_lora_on_one_module_serve_in_one_batch(base, tokenizer, variants):  # noqa: F811
    """An AdaLoRA adapter serves as the equal LoRA, so it shares its modules with LoRA adapters: both kinds given at
    start, rows of each in one batch, each row's greedy tokens PEFT's (before: the second kind's load was refused,
    "gate_proj already holds a LoRA adapter; AdaLoRA and LoRA adapters cannot share a layer": a server given both
    did not start, and a request for the second was a 409 while the first was resident, idle or not)."""
    names = ["ada", "other-ada-layer", "plain", "ada", None, "other-ada-layer"]
    engine = Engine(copy.deepcopy(base), tokenizer, adapters={n: variants / n for n in set(names) - {None}})
    try:
        ps = prompts(len(tokenizer), [5, 9, 3, 12, 7, 4], seed=22)
        got = greedy_in_one_batch(engine, names, ps)
        assert engine.stats["max_running"] == len(names)
        for name, p, tokens in zip(names, ps, got):
            want = peft_greedy(base, variants / name, p, N) if name else peft_greedy_base(base, p)
            assert tokens == want, name
        assert all(t != peft_greedy_base(base, p) for n, p, t in zip(names, ps, got) if n)  # not base vs base
        assert {type(layer).__name__ for _, layer in lora_layers(engine.model)} == {"LoraLinear"}
    finally:
        engine.stop()


def test_an_adalora_adapter_whose_ranks_are_not_its_rank_patterns_is_not_listed(base, tokenizer, variants,
                                                                                 tmp_path):  # noqa: F811
    """As a LoRA adapter's (test_serve_engine): an AdaLoRA file of rank 4 whose rank_pattern keeps 2 triplets was
    listed from adapters_dir, then each request refused (as "an adapter made for another base?"); the start check
    now compares its ranks, keeps it off the list, and a request gets why."""
    shutil.copytree(variants / "ada", tmp_path / "cut")
    config = json.loads((tmp_path / "cut" / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.0.mlp.gate_proj.lora_E": [True, False, True, False]}
    (tmp_path / "cut" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="not serving 'cut'"):
        engine = Engine(copy.deepcopy(base), tokenizer, adapters_dir=tmp_path)
    try:
        assert engine.adapter_names() == []
        with pytest.raises(AdapterError) as e:
            engine.generate([1, 2, 3], "cut", SamplingParams(max_tokens=2))
        assert str(e.value) == ('adapter "cut" cannot be served: adapter_model.safetensors: '
                                'model.layers.0.mlp.gate_proj.lora_A (4, 32) has rank 4, but adapter_config.json '
                                'gives that layer r=2: the two files are not of one adapter')
    finally:
        engine.stop()


def test_pissa_and_olora_adapters_serve_on_the_original_base(base, tokenizer, tmp_path):  # noqa: F811
    """A PiSSA/OLoRA load writes the residual into the shared base; the server puts W0 back for every row and
    serves the adapter as [A; A0], [B, −B0] on it: each row equals PEFT's load of that adapter alone, base rows the
    base (before: the base rows and the plain adapter's rows ran on the residual)."""
    configs = {"pissa": LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"),
               "olora-dora": LoraConfig(r=4, lora_alpha=8, init_lora_weights="olora", use_dora=True,
                                        target_modules=("q_proj", "v_proj", "down_proj"))}
    for i, (name, config) in enumerate(configs.items()):
        model = copy.deepcopy(base)
        perturb(inject(model, config, name), seed=300 + i)  # trained: A and B moved away from their initial factors
        save_adapter(model, tmp_path / name, name)
    names = ["pissa", None, "olora-dora", "pissa", None]
    engine = Engine(copy.deepcopy(base), tokenizer, adapters={n: tmp_path / n for n in configs})
    try:
        ps = prompts(len(tokenizer), [6, 9, 4, 11, 5], seed=31)
        queues = []
        for name, p in zip(names, ps):
            queues.append(queue.Queue())
            engine.submit(p, name, SamplingParams(max_tokens=N, ignore_eos=True), queues[-1].put)
        got = [collect(q)[0] for q in queues]
        for name, p, tokens in zip(names, ps, got):
            want = peft_greedy(base, tmp_path / name, p, N) if name else peft_greedy_base(base, p)
            assert tokens == want, name
    finally:
        engine.stop()


@pytest.mark.parametrize("kernels", [True, False], ids=["decode-kernel", "bmm"])
def test_a_mixed_batch_on_a_base_that_flattens_its_rows_equals_peft(tokenizer, tmp_path, kernels, monkeypatch):
    """OPT's MLP takes its input flattened to (B·T, in): a mixed batch with adapters on fc1/fc2 failed in its bmm
    ("batch1 must be a 3D tensor"), every request of the batch a 500, base rows too (a soak's 4 of 6 concurrent
    requests); the library's mixed_batch indexed tokens as rows. Each row's greedy tokens now equal PEFT's."""
    from transformers import OPTConfig, OPTForCausalLM

    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_lib", None)
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                   dropout=0.0)).eval()
    for i, name in enumerate(("a", "b")):
        model = copy.deepcopy(opt)
        torch.manual_seed(300 + i)
        inject(model, LoraConfig(r=2 + 2 * i, target_modules="all-linear", init_lora_weights=False), name)
        save_adapter(model, tmp_path / name, name)
    names = ["a", None, "b", "a", "b"]
    engine = Engine(copy.deepcopy(opt), tokenizer, adapters={"a": tmp_path / "a", "b": tmp_path / "b"})
    try:
        ps = prompts(len(tokenizer), [5, 9, 3, 7, 4], seed=22)
        got = greedy_in_one_batch(engine, names, ps)
        assert engine.stats["max_running"] == len(names)  # one batch
        for name, p, tokens in zip(names, ps, got):
            assert tokens == (peft_greedy(opt, tmp_path / name, p, N) if name else full_forward_greedy(opt, p, N))
    finally:
        engine.stop()



@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_adapters_on_lm_head_are_served_as_peft_computes_them(tokenizer, tmp_path, tied):
    """The static decoder computed the logits from the head's stored weight and applied the adapters of the decoder
    layers' projections only: an adapter with LoRA on lm_head (all-linear takes it too) was served as if the head
    had none (soak: the base model's greedy tokens, no word). Each row of a mixed batch now equals PEFT's."""
    base = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=96, tie_word_embeddings=tied)
    configs = {"head": LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "lm_head"), init_lora_weights=False),
               "head-dora": LoraConfig(r=2, lora_alpha=8, target_modules=("lm_head",), use_dora=True,
                                       init_lora_weights=False)}
    for i, (name, config) in enumerate(configs.items()):
        model = copy.deepcopy(base)
        torch.manual_seed(400 + i)
        with warnings.catch_warnings():  # a tied head gets its own copy (said once; not what this test is about)
            warnings.simplefilter("ignore")
            inject(model, config, name)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in layer.lora_magnitude_vector:  # m away from ‖W0 + sBA‖: the factor is not 1
                    layer.lora_magnitude_vector[name].mul_(torch.rand(layer.out_features) + 0.5)
        save_adapter(model, tmp_path / name, name)
    names = ["head", None, "head-dora", "head", "head-dora"]
    engine = Engine(copy.deepcopy(base), tokenizer, adapters={n: tmp_path / n for n in configs})
    try:
        ps = prompts(len(tokenizer), [6, 9, 4, 11, 5], seed=41)
        got = greedy_in_one_batch(engine, names, ps)
        assert engine.stats["max_running"] == len(names)  # one batch
        for name, p, tokens in zip(names, ps, got):
            want = peft_greedy(base, tmp_path / name, p, N) if name else full_forward_greedy(base, p, N)
            assert tokens == want, name
            if name:
                assert want != full_forward_greedy(base, p, N)  # the adapter changes the tokens
    finally:
        engine.stop()
