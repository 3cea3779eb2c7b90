"""A LoRA layer on a tied weight (lm_head = embed_tokens) and PiSSA/OLoRA's residual base: merges change the
targeted layer alone, pissa_niter_N loads as it trained, and deleting an adapter gives the base back."""

import copy
import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import perturb, randomize, tiny_gpt2, tiny_llama
from loraforge.config import LoraConfig
from loraforge.lora.adalora import AdaLoraConfig, inject_adalora
from loraforge.lora.adapters import (AdapterError, delete_adapter, disable_adapters, load_adapter, save_adapter,
                                     save_converted)
from loraforge.lora.inject import inject, lora_layers
from loraforge.lora.layer import svd_lowrank
from loraforge.lora.merge import embeddings_tied, merge, merge_and_unload, unmerge

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: the same ops in another order (merged vs unmerged), rounding only
EXACT_W0 = dict(rtol=1e-6, atol=1e-6)  # W_res + s·B0 A0 in fp32: |W0| ~ 0.1, rounding ~1e-8
TIED = ("lm_head", "q_proj")


def _tied():
    return tiny_llama(tie_word_embeddings=True)


def test_a_tied_head_gets_its_own_weight_with_one_warning():
    model = _tied()
    embedding = model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match=r"lm_head \(tied to model\.embed_tokens, \+0\.0 MiB\)") as caught:
        inject(model, LoraConfig(r=4, target_modules=TIED))
    assert len([w for w in caught if "shared with another module" in str(w.message)]) == 1
    assert model.lm_head.base_layer.weight is not embedding and model.model.embed_tokens.weight is embedding
    assert torch.equal(model.lm_head.base_layer.weight, embedding)
    assert model.config.tie_word_embeddings is False


def test_merging_a_tied_head_leaves_the_embedding_and_equals_the_adapter(tmp_path, input_ids):
    base = _tied()
    embedding = base.model.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied to model.embed_tokens"):
        model = randomize(inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=TIED)))
    with torch.no_grad():
        unmerged = model(input_ids).logits
        save_adapter(model, tmp_path / "a")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")(input_ids).logits
        torch.testing.assert_close(unmerged, theirs, **TOL)  # the unmerged forward is PEFT's (embedding W0)
        assert (unmerged - base(input_ids).logits).abs().max() > 1  # the head's adapter really moves the logits
        merge(model)
        torch.testing.assert_close(model(input_ids).logits, unmerged, **TOL)
        assert torch.equal(model.model.embed_tokens.weight, embedding)  # bit for bit
        unmerge(model)
        plain = merge_and_unload(model)
        assert not embeddings_tied(plain) and plain.config.tie_word_embeddings is False
        torch.testing.assert_close(plain(input_ids).logits, unmerged, **TOL)
        assert torch.equal(plain.model.embed_tokens.weight, embedding)
        plain.save_pretrained(tmp_path / "merged")
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(reloaded(input_ids).logits, unmerged, **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_on_a_tied_head_leaves_the_embedding(init, input_ids):
    base = _tied()
    with pytest.warns(UserWarning, match="tied to model.embed_tokens"):
        model = inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=TIED, init_lora_weights=init))
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, **TOL)  # unchanged at step 0
        want = perturb(model)(input_ids).logits
        torch.testing.assert_close(merge_and_unload(model)(input_ids).logits, want, **TOL)


def test_deleting_the_adapter_ties_the_head_again(input_ids):
    base = _tied()
    model = copy.deepcopy(base)
    embedding = model.model.embed_tokens.weight
    with pytest.warns(UserWarning):
        inject(model, LoraConfig(r=4, target_modules=TIED, init_lora_weights="pissa"))
        inject(model, LoraConfig(r=2, target_modules=("lm_head",)), "second")  # already untied: no copy again
    delete_adapter(model, "default")
    assert model.lm_head.base_layer.weight is not embedding  # "second" still holds it
    delete_adapter(model, "second")
    assert model.lm_head.weight is embedding and model.config.tie_word_embeddings is True
    with torch.no_grad():  # the head is the embedding itself again; q_proj is W_res + s·B0 A0 (fp32 rounding)
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, **EXACT_W0)


def test_a_failed_load_on_a_tied_head_leaves_it_tied(tmp_path):
    with pytest.warns(UserWarning):
        save_adapter(randomize(inject(_tied(), LoraConfig(r=4, target_modules=TIED))), tmp_path / "a")
    model = tiny_llama(tie_word_embeddings=True, num_hidden_layers=1)  # the file's layer 1 is not in this model
    embedding = model.model.embed_tokens.weight
    with pytest.warns(UserWarning), pytest.raises(AdapterError, match="model.layers.1.self_attn.q_proj"):
        load_adapter(model, tmp_path / "a")
    assert model.lm_head.weight is embedding and model.config.tie_word_embeddings is True


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
@pytest.mark.parametrize("niter", [0, 2])
def test_svd_lowrank_is_torchs_with_a_seeded_test_matrix(shape, niter):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)  # torch's draws from the global generator; ours from its own, seeded alike
    want = torch.svd_lowrank(W, q=5, niter=niter)
    torch.manual_seed(8)  # ours ignores the global state
    for got, expected in zip(svd_lowrank(W, q=5, niter=niter, seed=7), want):
        assert torch.equal(got, expected)


def test_pissa_niter_loads_as_it_trained_whatever_the_global_seed(tmp_path, input_ids):
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                        init_lora_weights="pissa_niter_1")
    model = perturb(inject(tiny_llama(), config))
    with torch.no_grad():
        trained = model(input_ids).logits
        save_adapter(model, tmp_path / "a")
        torch.manual_seed(2)
        first = load_adapter(tiny_llama(), tmp_path / "a")(input_ids).logits
        torch.manual_seed(3)
        second = load_adapter(tiny_llama(), tmp_path / "a")(input_ids).logits
    torch.testing.assert_close(first, trained, rtol=1e-6, atol=1e-6)  # the same ops on the same base: equal bits
    assert torch.equal(first, second)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_delete_puts_back_the_base_and_a_second_load_equals_a_fresh_one(arch, init, tmp_path, input_ids):
    build = BUILDERS[arch]
    save_adapter(perturb(inject(build(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init))), tmp_path / "a")
    base = build()
    model = load_adapter(copy.deepcopy(base), tmp_path / "a")
    delete_adapter(model, "default")
    assert not lora_layers(model)
    for (name, got), want in zip(model.named_parameters(), base.parameters()):
        torch.testing.assert_close(got, want, **EXACT_W0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, **EXACT_W0)
        again = load_adapter(model, tmp_path / "a")(input_ids).logits
        fresh = load_adapter(copy.deepcopy(base), tmp_path / "a")(input_ids).logits
    torch.testing.assert_close(again, fresh, **EXACT_W0)


def test_two_pissa_adapters_deleted_in_either_order_give_w0(input_ids):
    base = tiny_llama()
    for order in (["x", "y"], ["y", "x"]):
        model = copy.deepcopy(base)
        inject(model, LoraConfig(r=4, init_lora_weights="pissa"), "x")
        inject(model, LoraConfig(r=2, init_lora_weights="olora"), "y")
        for name in order:
            delete_adapter(model, name)
        for got, want in zip(model.parameters(), base.parameters()):
            torch.testing.assert_close(got, want, **EXACT_W0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_original_base_factors_on_w0_equal_the_adapter_on_its_residual(use_dora):
    """What a per-row server needs: W0 back for the base rows, the adapter as [A; A0], [B, −B0] on it."""
    W0 = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = perturb(inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                     use_dora=use_dora)))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x)
        A, B = layer.original_base_factors("default")
        assert A.shape == (8, 32) and B.shape == (32, 8)
        delta = layer.scaling["default"] * (B @ A)
        W = W0 + delta
        if use_dora:  # m / ‖W_res + s·BA‖ = m / ‖W0 + s·B'A'‖: the same rescaling on the original base
            W = (layer.lora_magnitude_vector["default"] / torch.linalg.norm(W, dim=1))[:, None] * W
        layer.restore_base("default")
        torch.testing.assert_close(layer.base_layer.weight, W0, **EXACT_W0)
        torch.testing.assert_close(x @ W.T, want, **TOL)


def test_disable_adapters_on_pissa_runs_the_residual_as_peft_does(tmp_path, input_ids):
    """PEFT's disable_adapter() on a PiSSA adapter runs the residual base (W0 − s·B0 A0), not W0; so does ours."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    theirs.save_pretrained(tmp_path / "a")
    ours = load_adapter(tiny_llama(), tmp_path / "a")
    with torch.no_grad(), theirs.disable_adapter(), disable_adapters(ours):
        want = theirs(input_ids).logits
        torch.testing.assert_close(ours(input_ids).logits, want, **TOL)
        assert (want - tiny_llama()(input_ids).logits).abs().max() > 1e-2  # the residual, not the base


def test_adalora_on_a_tied_head_merges_without_touching_the_embedding(input_ids):
    base = _tied()
    embedding = base.model.embed_tokens.weight.detach().clone()
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="tied to model.embed_tokens"):
        inject_adalora(model, AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=TIED))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_E["default"].normal_(0, 1)  # a non-zero update
        unmerged = model(input_ids).logits
        assert (unmerged - base(input_ids).logits).abs().max() > 1e-3
        merge(model)
        torch.testing.assert_close(model(input_ids).logits, unmerged, **TOL)
        assert torch.equal(model.model.embed_tokens.weight, embedding)
        unmerge(model)
    delete_adapter(model, "default")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings is True


def test_olora_on_conv1d_says_peft_cannot_load_it_and_the_converted_form_loads_equal(tmp_path, input_ids):
    """PEFT 0.21's olora_init ignores fan_in_fan_out: its A and B for a GPT-2 Conv1D come out transposed, so loading
    our (right) adapter fails with a size mismatch (0.22 loads it equal). Saving says so; save_converted's plain LoRA
    loads equal in PEFT."""
    base = tiny_gpt2()
    model = inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=("c_attn",), init_lora_weights="olora"))
    with pytest.warns(UserWarning, match=r"olora on transformer\.h\.0\.attn\.c_attn, a Conv1D layer \(GPT-2 style, "
                                         r"fan_in_fan_out\): PEFT before 0.22 cannot load this adapter"):
        save_adapter(model, tmp_path / "initial")
    if tuple(int(part) for part in peft.__version__.split(".")[:2]) < (0, 22):
        with pytest.raises(RuntimeError, match="size mismatch"):
            peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "initial")
    else:
        with torch.no_grad():
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "initial").eval()(input_ids)
            torch.testing.assert_close(theirs.logits, model.eval()(input_ids).logits, rtol=0, atol=1e-5)
    perturb(model)  # as if trained
    save_converted(model, tmp_path / "lora", tmp_path / "initial")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")(input_ids).logits
        torch.testing.assert_close(theirs, model(input_ids).logits, rtol=0, atol=1e-5)
