"""Adapters on disk (PEFT's format both ways), several adapters, mixed batches, merging."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import randomize, tiny_gpt2, tiny_llama
from loraforge.lora.adapters import (AdapterError, delete_adapter, disable_adapters, list_adapters, load_adapter,
                                     mixed_batch, save_adapter, set_adapter)
from loraforge.config import LoraConfig
from loraforge.lora.inject import inject, lora_layers
from loraforge.lora.layer import LoraLayer
from loraforge.lora.merge import add_weighted_adapter, merge, merge_and_unload, unmerge

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# fp32 on the same machine: PEFT and we run the same ops, so logits agree to rounding (≤1e-5 per the issue).
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "rank_pattern": {"q_proj": 2, "c_attn": 2},
                                        "alpha_pattern": {"v_proj": 5}}])
def test_ours_loads_in_peft_with_equal_logits(arch, extra, tmp_path, input_ids):
    build = BUILDERS[arch]
    model = randomize(inject(build(), LoraConfig(r=4, lora_alpha=8, **extra)))
    ours = model(input_ids).logits
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)(input_ids).logits
    torch.testing.assert_close(theirs, ours, **TOL)
    assert not torch.allclose(ours, build()(input_ids).logits)  # the adapter really changes the output


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_loads_in_ours_with_equal_logits(arch, tmp_path, input_ids):
    build = BUILDERS[arch]
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False,
                          rank_pattern={targets[0]: 3})
    peft_model = peft.get_peft_model(build(), cfg)
    theirs = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    model = load_adapter(build(), tmp_path)
    torch.testing.assert_close(model(input_ids).logits, theirs, **TOL)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference by default


def test_modules_to_save_round_trip_with_peft(tmp_path, input_ids):
    model = randomize(inject(tiny_llama(), LoraConfig(r=4, target_modules=("q_proj",), modules_to_save=("lm_head",))))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ours = model(input_ids).logits
    save_adapter(model, tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)(input_ids).logits, ours, **TOL)
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path)(input_ids).logits, ours, **TOL)


@pytest.mark.parametrize("targets,saved", [("all-linear", ["o_proj"]), (["q_proj", "gate_proj"], ["mlp"])])
def test_a_module_saved_whole_gets_no_adapter_as_in_peft(targets, saved, tmp_path, input_ids):
    """PEFT puts no LoRA on a module in modules_to_save or inside one; we wrapped both: PEFT's adapter failed to
    load (and the failed load's cleanup crashed), training crashed, saving crashed on shared tensors."""
    peft_model = randomize(peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, target_modules=targets, modules_to_save=saved, init_lora_weights=False)))
    theirs = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path / "peft")(input_ids).logits, theirs, **TOL)
    ours = randomize(inject(tiny_llama(), LoraConfig(r=4, target_modules=targets if isinstance(targets, str)
                                                     else tuple(targets), modules_to_save=tuple(saved))))
    paths = [p for p, _ in lora_layers(ours)]
    saved_whole = (lambda p: p.endswith(".o_proj")) if saved == ["o_proj"] else (lambda p: ".mlp." in p)
    assert paths and not any(saved_whole(p) for p in paths)
    save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")(input_ids).logits,
                               ours(input_ids).logits, **TOL)


def test_float8_adapter_tensors_load_as_fp32_and_lora_on_embeddings_is_named(tmp_path, input_ids):
    """float8 tensors passed the floating-point test, then isfinite raised NotImplementedError; PEFT's LoRA on an
    embedding was reported as tensors "not in this model" for a model that has embed_tokens."""
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
                        ).save_pretrained(tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(file).items()}, file)
    upcast = {k: v.float() for k, v in load_file(file).items()}
    ours = load_adapter(tiny_llama(), tmp_path / "a")
    layer = dict(lora_layers(ours))["model.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.lora_A["default"].weight, upcast["base_model.model.model.layers.0.self_attn.q_proj."
                                                             "lora_A.weight"])
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
                        ).save_pretrained(tmp_path / "emb")
    with pytest.raises(AdapterError, match=r"lora_embedding_A is LoRA on an embedding layer \(model.embed_tokens\); "
                                           r"loraforge reads LoRA on linear layers only"):
        load_adapter(tiny_llama(), tmp_path / "emb")


@pytest.mark.parametrize("alpha", [-16, 0])
def test_peft_adapters_with_zero_or_negative_alpha_load_with_equal_logits(alpha, tmp_path, input_ids):
    """PEFT saves and loads them (a negative alpha negates an adapter); we refused them. Training still refuses."""
    peft_model = randomize(peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)))
    theirs = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path)(input_ids).logits, theirs, **TOL)



def test_a_peft_config_without_lora_alpha_means_peft_default_and_null_is_refused(tmp_path, input_ids):
    """PEFT's LoraConfig defaults lora_alpha to 8, ours to 16: a file without the field (written by hand or by
    another tool) loaded with every update doubled, unsaid; lora_alpha null did the same (PEFT raises a TypeError)."""
    peft_model = randomize(peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)))
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    assert config.pop("lora_alpha") == 8
    path.write_text(json.dumps(config))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)(input_ids).logits
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path)(input_ids).logits, theirs, **TOL)
    path.write_text(json.dumps({**config, "lora_alpha": None}))
    with pytest.raises(AdapterError, match=r"adapter_config.json: lora_alpha: null is not a number \(PEFT cannot load "
                                           r"it either\); write the value the adapter was trained with$"):
        load_adapter(tiny_llama(), tmp_path)



@pytest.mark.parametrize("absent", [{"target_modules": None}, {}], ids=["null", "missing"])
def test_a_peft_config_without_target_modules_loads_the_layers_its_file_holds(absent, tmp_path, input_ids):
    """PEFT reads a missing or null target_modules as its default for the architecture (Llama: q_proj, v_proj); we
    read ours (q, k, v, o) and refused the adapter: k_proj and o_proj "missing from the file"."""
    peft_model = randomize(peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)))
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["target_modules"]
    path.write_text(json.dumps({**config, **absent}))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)(input_ids).logits
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path)(input_ids).logits, theirs, **TOL)
    assert not torch.allclose(theirs, tiny_llama()(input_ids).logits)

@pytest.mark.parametrize("field", ["velora_config", "monteclora_config"])
def test_peft_velora_and_monteclora_adapters_load_as_peft_computes_them(field, tmp_path, input_ids):
    """VeLoRA changes only the backward pass and MonteCLoRA samples A only in training: in eval mode PEFT computes
    plain LoRA. Their saved training state (lora_velora_embed, lora_monteclora_sampler.*) made us refuse both adapters
    as tensors "not in this model", naming neither field."""
    sub = {"velora_config": peft.tuners.lora.config.VeloraConfig(num_groups=4),
           "monteclora_config": peft.tuners.lora.config.MontecloraConfig()}[field]
    peft_model = randomize(peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **{field: sub}))).eval()
    theirs = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(".lora_velora_" in k or ".lora_monteclora_" in k for k in saved)  # the training state is in the file
    with pytest.warns(UserWarning, match=rf"ignoring fields this version does not use: \['{field}'\]"):
        ours = load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(ours(input_ids).logits, theirs, **TOL)
    assert not torch.allclose(theirs, tiny_llama()(input_ids).logits)

def test_saved_files_use_peft_names(tmp_path):
    save_adapter(inject(tiny_llama(), LoraConfig(r=2, target_modules=("q_proj",))), tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[:2] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == ["q_proj"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert list_adapters(model) == []
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)


def test_corrupted_file_is_a_clear_error(tmp_path):
    save_adapter(inject(tiny_llama(), LoraConfig(r=2)), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(AdapterError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(model, tmp_path)
    _assert_untouched(model, before)


def test_missing_key_names_the_module_and_loads_nothing(tmp_path):
    save_adapter(randomize(inject(tiny_llama(), LoraConfig(r=2))), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    save_file(tensors, path)
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.self_attn\.k_proj: missing from the file"):
        load_adapter(model, tmp_path)
    _assert_untouched(model, before)


def test_adapter_for_another_base_is_a_shape_error(tmp_path):
    save_adapter(inject(tiny_llama(hidden_size=48), LoraConfig(r=2)), tmp_path)
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(AdapterError, match=r"self_attn\.q_proj: lora_A of shape \(2, 48\) in the file, \(2, 32\) in "
                                           r"this model"):
        load_adapter(model, tmp_path)
    _assert_untouched(model, before)


def test_pickle_and_bad_json_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="is not valid JSON"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="a pickle.*never loads"):
        load_adapter(tiny_llama(), tmp_path)


def test_unknown_config_keys_are_ignored_and_missing_take_defaults(tmp_path):
    model = randomize(inject(tiny_llama(), LoraConfig(r=2, lora_alpha=2)))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["some_future_field"] = {"x": 1}
    del config["lora_dropout"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="some_future_field"):
        loaded = load_adapter(tiny_llama(), tmp_path)
    assert loaded.lora_configs["default"].lora_dropout == 0.0


def _two_adapters(tmp_path):
    a = randomize(inject(tiny_llama(), LoraConfig(r=4, target_modules=("q_proj", "v_proj"))), seed=1)
    b = randomize(inject(tiny_llama(), LoraConfig(r=2, target_modules="all-linear")), seed=2)
    save_adapter(a, tmp_path / "a")
    save_adapter(b, tmp_path / "b")
    return a, b


def test_several_adapters_set_disable_delete(tmp_path, input_ids):
    a, b = _two_adapters(tmp_path)
    base_logits = tiny_llama()(input_ids).logits
    model = tiny_llama()
    load_adapter(model, tmp_path / "a", "a")
    load_adapter(model, tmp_path / "b", "b")
    assert list_adapters(model) == ["a", "b"]
    set_adapter(model, "a")
    torch.testing.assert_close(model(input_ids).logits, a(input_ids).logits)
    set_adapter(model, "b")
    torch.testing.assert_close(model(input_ids).logits, b(input_ids).logits)
    with disable_adapters(model):
        torch.testing.assert_close(model(input_ids).logits, base_logits)
    delete_adapter(model, "b")
    assert list_adapters(model) == ["a"]
    with pytest.raises(KeyError, match="no adapter named 'b'; loaded adapters: \\['a'\\]"):
        set_adapter(model, "b")
    set_adapter(model, "a")
    torch.testing.assert_close(model(input_ids).logits, a(input_ids).logits)
    delete_adapter(model, "a")
    torch.testing.assert_close(model(input_ids).logits, base_logits)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_mixed_batch_rows_equal_single_adapter_runs(tmp_path, input_ids):
    a, b = _two_adapters(tmp_path)
    model = tiny_llama()
    load_adapter(model, tmp_path / "a", "a")
    load_adapter(model, tmp_path / "b", "b")
    names = ["b", None, "a"]
    with mixed_batch(model, names):
        mixed = model(input_ids).logits
    refs = {"a": a(input_ids).logits, "b": b(input_ids).logits, None: tiny_llama()(input_ids).logits}
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], refs[name][row])


def test_mixed_batch_rows_equal_single_adapter_runs_on_a_base_that_flattens_its_rows(input_ids):
    """OPT's MLP takes its input flattened to (B·T, in): mixed_rows indexed those tokens as if they were rows (the
    first B tokens got the rows' adapters, fc1's and fc2's deltas of every other token were lost)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=32, dropout=0.0)).eval()
    for name, r in (("a", 4), ("b", 2)):
        inject(model, LoraConfig(r=r, target_modules=("fc1", "fc2")), name)
    randomize(model)
    names = ["b", None, "a"]
    with torch.no_grad():
        with mixed_batch(model, names):
            mixed = model(input_ids).logits
        refs = {}
        for name in ("a", "b"):
            set_adapter(model, name)
            refs[name] = model(input_ids).logits
        with disable_adapters(model):
            refs[None] = model(input_ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], refs[name][row])


def test_merge_is_explicit_idempotent_and_exact(input_ids):
    model = randomize(inject(tiny_gpt2(), LoraConfig(r=4, target_modules="all-linear")))
    weights_before = {p: m.base_layer.weight.clone() for p, m in lora_layers(model)}
    unmerged = model(input_ids).logits
    model.train()
    model.eval()  # no merge as a side effect of train()/eval()
    assert all(not m.merged_adapters for _, m in lora_layers(model))
    merge(model)
    merge(model)  # twice: a no-op
    torch.testing.assert_close(model(input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        with disable_adapters(model):
            pass
    unmerge(model)
    unmerge(model)
    for p, m in lora_layers(model):
        torch.testing.assert_close(m.base_layer.weight, weights_before[p], rtol=0, atol=1e-6)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(plain(input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def _sum_of_deltas(model, names, weights):
    return {p: sum(w * m.delta_weight(n) for n, w in zip(names, weights)) for p, m in lora_layers(model)}


def test_weighted_combinations_match_the_weighted_sum_of_deltas(tmp_path):
    model = tiny_llama()
    _two_adapters(tmp_path)
    # different ranks and targets: b covers all linear layers, a only q and v
    load_adapter(model, tmp_path / "a", "a")
    load_adapter(model, tmp_path / "b", "b")
    names, weights = ["a", "b"], [0.7, -0.4]
    expected = {p: sum(w * m.delta_weight(n) for n, w in zip(names, weights) if n in m.r)
                for p, m in lora_layers(model)}
    add_weighted_adapter(model, names, weights, "cat", combination_type="cat")
    add_weighted_adapter(model, names, weights, "svd", combination_type="svd", svd_rank=6)  # ≥ 4+2: exact
    for p, m in lora_layers(model):
        torch.testing.assert_close(m.delta_weight("cat"), expected[p], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.delta_weight("svd"), expected[p], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'linear' needs adapters of one rank"):
        add_weighted_adapter(model, names, weights, "lin", combination_type="linear")


def test_linear_combination_matches_peft(tmp_path, input_ids):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg), adapter_name="x")
    peft_model.add_adapter("y", peft.LoraConfig(**cfg))
    peft_model.save_pretrained(tmp_path)  # writes tmp_path/x and tmp_path/y
    peft_model.add_weighted_adapter(["x", "y"], [0.6, 0.3], "lin", combination_type="linear")
    peft_model.set_adapter("lin")
    theirs = peft_model(input_ids).logits
    model = tiny_llama()
    load_adapter(model, tmp_path / "x", "x")
    load_adapter(model, tmp_path / "y", "y")
    add_weighted_adapter(model, ["x", "y"], [0.6, 0.3], "lin", combination_type="linear")
    set_adapter(model, "lin")
    torch.testing.assert_close(model(input_ids).logits, theirs, **TOL)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_bias_adapter_gives_the_base_its_biases_back_when_disabled_deleted_or_refused(bias, tmp_path, input_ids):
    """PEFT's bias adapters train the base's own bias tensors. Loading one copied its biases into the base, and
    disable_adapters, delete_adapter and a refused load all left them there: the "base" a study compared against
    carried the adapter's biases."""
    base = tiny_llama(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        reference = base(input_ids).logits
    peft_model = peft.get_peft_model(tiny_llama(attention_bias=True, mlp_bias=True),
                                     peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], bias=bias))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # trained A, B and biases
    peft_model.save_pretrained(tmp_path / "a")
    model = load_adapter(tiny_llama(attention_bias=True, mlp_bias=True), str(tmp_path / "a"))
    with torch.no_grad():
        loaded = model(input_ids).logits
        assert not torch.allclose(loaded, reference)
        with disable_adapters(model):
            torch.testing.assert_close(model(input_ids).logits, reference, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids).logits, loaded, rtol=0, atol=0)  # and back again
    delete_adapter(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference, rtol=0, atol=0)
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    # the bias copied last (lora_B stays fp32 on a half-precision base, the biases are the base's own fp16 tensors)
    last = "base_model.model.model.layers.1.mlp.down_proj.base_layer.bias"
    tensors[last][0] = 1e5  # past fp16's range: refused while copying, after the biases before it came in
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    half = tiny_llama(attention_bias=True, mlp_bias=True).half()
    biases = {k: p.clone() for k, p in half.named_parameters() if k.endswith(".bias")}
    with pytest.raises(AdapterError, match="once cast from float32 to the model's float16"):
        load_adapter(half, str(tmp_path / "a"))
    assert all(torch.equal(p, biases[k]) for k, p in half.named_parameters() if k.endswith(".bias"))


def test_biases_trained_in_place_are_the_base_again_once_the_adapter_goes(input_ids):
    model = inject(tiny_llama(attention_bias=True), LoraConfig(r=4, target_modules=("q_proj",), bias="all"))
    with torch.no_grad():
        reference = model(input_ids).logits  # B = 0: the base
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids, labels=input_ids).loss.backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids).logits, reference)
        with disable_adapters(model):
            torch.testing.assert_close(model(input_ids).logits, reference, rtol=0, atol=0)
    delete_adapter(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference, rtol=0, atol=0)


def test_an_adapter_saved_from_python_names_the_folder_its_base_was_loaded_from(tiny_dir, tmp_path, input_ids):
    # soak (the README's Python API): save_adapter wrote base_model_name_or_path null, and PEFT's
    # AutoPeftModelForCausalLM, which reads the base from the file, could not load the adapter
    model = randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, lora_alpha=8)))
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids).logits, model(input_ids).logits, rtol=1e-5, atol=1e-5)
    # a name the config gives is kept
    named = inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, base_model_name_or_path="x/y"))
    save_adapter(named, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "x/y"


def test_a_peft_adapter_excluding_a_layer_another_adapter_holds_loads_beside_it(tmp_path, input_ids):
    """PEFT saves all-linear as the full path of every layer it took, exclude_modules beside it. Loaded after an
    adapter on q and v, such an adapter excluding v_proj was refused ("'model.layers.0.self_attn.v_proj' names ...
    (LoraLinear), not a linear layer"), loaded first it loaded: merge --adapter qv ex failed where ex qv worked.
    It loads either way now, with PEFT's logits for both adapters active."""
    configs = {"qv": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
               "ex": peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["v_proj"],
                                     init_lora_weights=False)}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / name)
    saved = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())["target_modules"]
    assert "model.layers.0.self_attn.v_proj" in saved  # PEFT's form: every path, v_proj among them
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "qv", "qv")
    theirs.load_adapter(tmp_path / "ex", "ex")
    theirs.base_model.set_adapter(["qv", "ex"])
    with torch.no_grad():
        want = theirs.eval()(input_ids).logits
    for order in (["qv", "ex"], ["ex", "qv"]):
        ours = tiny_llama()
        for name in order:
            load_adapter(ours, tmp_path / name, name)
        set_adapter(ours, order)
        assert not any("ex" in layer.r for path, layer in lora_layers(ours) if path.endswith("v_proj"))
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids).logits, want, **TOL)


def _peft_saved(tmp_path, base_fn, configs: dict) -> None:
    """Each PEFT LoraConfig saved from its own `base_fn()` with every trainable tensor random (B = 0 tests nothing)."""
    for seed, (name, config) in enumerate(configs.items()):
        model = peft.get_peft_model(base_fn(), config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_pretrained(tmp_path / name)


def test_mixed_batch_with_modules_to_save_gives_each_row_its_adapters_copy_as_peft(tmp_path):
    """mixed_batch refused any model holding modules_to_save (NotImplementedError), which PEFT batches. Each row
    now runs through its adapter's copy of a saved module (the original where it saved none, or for base rows):
    row by row PEFT's logits for that adapter alone, and PEFT's mixed batch where PEFT can run one (its
    _mixed_batch_forward raises KeyError for a row whose adapter saved no copy of a module another one saved)."""
    _peft_saved(tmp_path, tiny_llama, {
        "e": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        "e2": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"],
                              modules_to_save=["lm_head", "embed_tokens"]),
        "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])})
    rows = ["e", None, "a", "e2", "e", "e2"]
    ids = torch.randint(0, 128, (len(rows), 9), generator=torch.Generator().manual_seed(2))
    ours, theirs = tiny_llama(), peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "e", "e").eval()
    for name in ("e", "e2", "a"):
        load_adapter(ours, tmp_path / name, name)
        if name != "e":
            theirs.load_adapter(tmp_path / name, name)
    with torch.no_grad():
        with mixed_batch(ours, rows):
            got = ours(ids).logits
        for i, name in enumerate(rows):
            if name is None:
                with theirs.disable_adapter():
                    want = theirs(ids[i:i + 1]).logits
            else:
                theirs.set_adapter(name)
                want = theirs(ids[i:i + 1]).logits
            torch.testing.assert_close(got[i:i + 1], want, **TOL)
        both = [i for i, name in enumerate(rows) if name in ("e2", None)]
        want = theirs(input_ids=ids[both], adapter_names=[rows[i] or "__base__" for i in both]).logits
        torch.testing.assert_close(got[both], want, **TOL)
    assert all(m.row_adapters is None for m in ours.modules() if hasattr(m, "modules_to_save"))


def test_mixed_batch_refuses_rows_without_an_adapter_that_trains_the_shared_biases(tmp_path):
    """A bias adapter's biases are the base's own: in a mixed batch (as in PEFT's) the base rows got them, 0.4 off the
    base's logits. Refused now, naming the adapter and the fix; a batch of its rows alone is PEFT's numbers."""
    base = lambda: tiny_llama(attention_bias=True)  # noqa: E731
    _peft_saved(tmp_path, base, {
        "f": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only"),
        "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])})
    ours = base()
    for name in ("f", "a"):
        load_adapter(ours, tmp_path / name, name)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    for rows in (["f", None], ["a", None], ["f", "a"]):
        with pytest.raises(AdapterError) as e, mixed_batch(ours, rows):
            pass
        assert str(e.value) == ("a mixed-adapter batch cannot hold rows without adapter 'f' while it is loaded: it "
                                "trains biases (bias 'lora_only'), which are the base's own and so every row's; run "
                                "its rows alone (set_adapter), or delete_adapter('f') first")
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "f").eval()
    with torch.no_grad(), mixed_batch(ours, ["f", "f"]):
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **TOL)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_gpt2_bias_training_names_counts_and_file_equal_peft(bias, tmp_path, input_ids):
    """Left from an earlier note (GPT-2's ln_f with bias all): the trainable names and counts, the saved file's keys
    and, with every trainable tensor moved, PEFT's logits from our file and ours from PEFT's, are PEFT's. bias all:
    every bias of the model trains (the LayerNorms' and ln_f's too, as PEFT's "bias" in the name); lora_only: the
    adapted layers' own."""
    targets = ["c_attn", "c_proj"]
    ours = inject(tiny_gpt2(), LoraConfig(r=4, bias=bias, target_modules=tuple(targets)))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, bias=bias, target_modules=targets,
                                                              fan_in_fan_out=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for model in (ours, theirs):  # a stand-in for training: every trainable tensor moved (each file is loaded
            g = torch.Generator().manual_seed(3)  # by both below, so the two models' values need not agree)
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    trainable = {n: p.numel() for n, p in ours.named_parameters() if p.requires_grad}
    expected = {n.removeprefix("base_model.model."): p.numel() for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert ("transformer.ln_f.bias" in trainable) == (bias == "all")
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    for saved in ("ours", "peft"):
        reference = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / saved).eval()
        loaded = load_adapter(tiny_gpt2(), tmp_path / saved)
        torch.testing.assert_close(loaded(input_ids).logits, reference(input_ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loaded(input_ids).logits, tiny_gpt2()(input_ids).logits, atol=1e-2)
