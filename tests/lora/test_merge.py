"""Combining adapters and the merged checkpoint: PEFT's numbers, exact sums by default, clear refusals."""

import copy
import json
import math
import re
import shutil
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import randomize, tiny_llama
from loraforge.config import ConfigError, LoraConfig
from loraforge.lora.adapters import AdapterError, load_adapter, read_adapter_config, save_adapter, set_adapter
from loraforge.lora.inject import inject, lora_layers
from loraforge.lora import merge as M
from loraforge.lora.merge import add_weighted_adapter, embeddings_tied, export_merged, merge_and_unload
from loraforge.quant.bnb import dequantize, quantize_model
from loraforge.utils.hf import set_submodule

# fp32, the same ops in PEFT and here: rounding only (the bound for logits)
TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = ["q_proj", "v_proj"]


def _peft_adapters(base, root, configs: dict) -> None:
    """Each PEFT LoraConfig in its own copy of `base`, every adapter tensor random (B = 0 would test nothing)."""
    for i, (name, cfg) in enumerate(configs.items()):
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_magnitude_vector" in key:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
                elif p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_pretrained(root / name)


@pytest.mark.parametrize("weights", [[0.7, 0.5], [0.7, -0.5]])
def test_linear_splits_the_scale_as_peft_does(weights, tmp_path, input_ids):
    """Scales 8/4 and 32/4 differ, so the cross terms B_i·A_j show whether sqrt(|w·s|) sits on both factors."""
    base = tiny_llama()
    _peft_adapters(base, tmp_path, {"x": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                                    "y": peft.LoraConfig(r=4, lora_alpha=32, target_modules=TARGETS)})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x", adapter_name="x")
    theirs.load_adapter(tmp_path / "y", adapter_name="y")
    theirs.add_weighted_adapter(["x", "y"], weights, "lin", combination_type="linear")
    theirs.set_adapter("lin")
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "x", "x")
    load_adapter(ours, tmp_path / "y", "y")
    add_weighted_adapter(ours, ["x", "y"], weights, "lin", combination_type="linear")
    set_adapter(ours, "lin")
    with torch.no_grad():
        want, got = theirs(input_ids).logits, ours(input_ids).logits
        assert (want - base(input_ids).logits).abs().max() > 0.1  # the combination really moves the logits
    torch.testing.assert_close(got, want, **TOL)


def test_svd_below_the_rank_of_the_sum_warns_and_cat_is_exact(tmp_path):
    a = randomize(inject(tiny_llama(), LoraConfig(r=4, target_modules=tuple(TARGETS))), seed=1)
    b = randomize(inject(tiny_llama(), LoraConfig(r=4, target_modules=tuple(TARGETS))), seed=2)
    save_adapter(a, tmp_path / "a")
    save_adapter(b, tmp_path / "b")
    model = tiny_llama()
    load_adapter(model, tmp_path / "a", "a")
    load_adapter(model, tmp_path / "b", "b")
    with pytest.warns(UserWarning, match=r"svd_rank 4 is below the rank of the combined ΔW in 4 layers"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "svd", combination_type="svd")
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    for _, m in lora_layers(model):
        exact = m.delta_weight("a") + m.delta_weight("b")  # the plain formula s_a·B_a·A_a + s_b·B_b·A_b
        torch.testing.assert_close(m.delta_weight("cat"), exact, rtol=1e-5, atol=1e-6)


def test_an_svd_rank_above_what_a_layer_can_hold_is_capped_per_layer_as_peft_keeps_it(tmp_path, input_ids):
    """svd_rank 1000 wrote A (1000, in) and B (out, 1000), mostly zero rows. Now each layer keeps what its ΔW can
    have: q_proj (32×32) 32 = 16 + 16, v_proj (16×32) 16 = min(out, in), in rank_pattern; PEFT's own svd keeps the
    same ranks in its tensors (full_matrices=False) but writes r 1000 beside them: our file loads in PEFT."""
    base = tiny_llama()
    _peft_adapters(base, tmp_path, {n: peft.LoraConfig(r=16, lora_alpha=a, target_modules=TARGETS)
                                    for n, a in (("x", 8), ("y", 32))})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x", adapter_name="x")
    theirs.load_adapter(tmp_path / "y", adapter_name="y")
    theirs.add_weighted_adapter(["x", "y"], [0.7, -0.5], "s", combination_type="svd", svd_rank=1000,
                                svd_full_matrices=False)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "x", "x")
    load_adapter(ours, tmp_path / "y", "y")
    with pytest.warns(UserWarning, match=re.escape("svd_rank 1000 is above the rank the combined ΔW can have in 4 "
                                                   "layers (min(out, in) of the layer, or the sum of the adapters' "
                                                   "ranks there; e.g. model.layers.0.self_attn.q_proj): rank 16 to "
                                                   "32 is used there (adapter r 32, the others in rank_pattern)")):
        add_weighted_adapter(ours, ["x", "y"], [0.7, -0.5], "s", combination_type="svd", svd_rank=1000)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    for path, layer in lora_layers(ours):
        want_r = 16 if "v_proj" in path else 32
        assert layer.lora_A["s"].weight.shape[0] == layer.lora_B["s"].weight.shape[1] == want_r
        assert peft_layers[path].lora_A["s"].weight.shape[0] == want_r  # PEFT's tensors: the same rank
        exact = 0.7 * layer.delta_weight("x") - 0.5 * layer.delta_weight("y")  # full rank here: svd is exact
        torch.testing.assert_close(layer.delta_weight("s"), exact, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.delta_weight("s"), peft_layers[path].get_delta_weight("s"), **TOL)
    save_adapter(ours, tmp_path / "s", "s")
    saved = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    v_paths = sorted(p for p, _ in lora_layers(ours) if "v_proj" in p)
    assert (saved["r"], saved["rank_pattern"], saved["alpha_pattern"]) == (32, dict.fromkeys(v_paths, 16),
                                                                           dict.fromkeys(v_paths, 16))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "s")
    set_adapter(ours, "s")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, ours(input_ids).logits, **TOL)


@pytest.mark.parametrize("extra,reason", [
    (dict(use_dora=True), "'odd' uses DoRA (use_dora)"),
    (dict(modules_to_save=("lm_head",)), "'odd' has modules_to_save ['lm_head']"),
    (dict(bias="lora_only"), "'odd' trains biases (bias 'lora_only')"),
])
def test_combining_refuses_what_a_and_b_do_not_hold(extra, reason, tmp_path):
    save_adapter(randomize(inject(tiny_llama(), LoraConfig(r=4, target_modules=tuple(TARGETS), **extra))),
                 tmp_path / "odd")
    save_adapter(randomize(inject(tiny_llama(), LoraConfig(r=4, target_modules=tuple(TARGETS)))), tmp_path / "ok")
    model = tiny_llama()
    load_adapter(model, tmp_path / "odd", "odd")
    load_adapter(model, tmp_path / "ok", "ok")
    for single in (["odd"], ["odd", "ok"]):  # even alone with weight 1: the combined adapter would lose it
        with pytest.raises(AdapterError, match=r"cannot combine adapters into one LoRA adapter: " + re.escape(reason)):
            add_weighted_adapter(model, single, [1.0] * len(single), "c", combination_type="cat")
    assert "c" not in model.lora_configs


def test_combining_refuses_adalora(tmp_path):
    from loraforge.lora.adalora import AdaLoraConfig, inject_adalora

    model = tiny_llama()
    inject_adalora(model, AdaLoraConfig(total_step=10, init_r=4, target_r=2, tinit=2, tfinal=3), "ada")
    with pytest.raises(AdapterError, match=re.escape("'ada' is AdaLoRA (its E scales are not in A and B; ")):
        add_weighted_adapter(model, ["ada"], [1.0], "c", combination_type="svd")


def test_bad_weights_and_combination_are_config_errors():
    model = tiny_llama()
    inject(model, LoraConfig(r=2, target_modules=tuple(TARGETS)), "a")
    inject(model, LoraConfig(r=2, target_modules=tuple(TARGETS)), "b")
    with pytest.raises(ConfigError, match=r"weights \[1.0\]: give one weight per adapter \(2\)"):
        add_weighted_adapter(model, ["a", "b"], [1.0], "c")
    with pytest.raises(ConfigError, match=r"weights \[nan, 1.0\]: nan is not a finite number"):
        add_weighted_adapter(model, ["a", "b"], [math.nan, 1.0], "c")
    with pytest.raises(ConfigError, match=r"combination_type 'foo': use one of cat, svd, linear"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "c", combination_type="foo")


# --- merge_and_unload on a 4-bit base -------------------------------------------------------------------------------
def _dequantized_copy(qmodel):
    """The same model with every bnb 4-bit layer replaced by an fp32 nn.Linear holding its de-quantized weight."""
    plain = copy.deepcopy(qmodel)
    for path, module in list(plain.named_modules()):
        if type(module).__name__ == "Linear4bit":
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dequantize(module))
            set_submodule(plain, path, linear)
    return plain


@pytest.mark.parametrize("first_dora", [True, False])
def test_4bit_merge_and_unload_of_two_adapters_with_dora_equals_the_unquantized_merge(first_dora, tmp_path,
                                                                                      input_ids):
    """A DoRA adapter after another on one layer rescales the running weight (PEFT's order: W ← m/‖W0+ΔW‖ ⊙ (W+ΔW)),
    on a 4-bit base as on the same base de-quantized; adding each adapter's ΔW on its own gives another model."""
    base = tiny_llama(hidden_size=64, intermediate_size=128)  # in_features a multiple of bnb's CPU block of 64
    _peft_adapters(base, tmp_path, {
        "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=first_dora),
        "b": peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True)})
    qmodel = quantize_model(copy.deepcopy(base), "nf4", compute_dtype=torch.float32)
    plain = _dequantized_copy(qmodel)  # every Linear4bit is targeted ("all-linear"): the same modules once merged
    for model in (qmodel, plain):
        load_adapter(load_adapter(model, tmp_path / "a", "a"), tmp_path / "b", "b")
        set_adapter(model, ["a", "b"])
    with torch.no_grad():
        unmerged = qmodel(input_ids).logits
        merged, reference = merge_and_unload(qmodel), merge_and_unload(plain)
        assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
        want = reference.state_dict()
        assert merged.state_dict().keys() == want.keys()
        for key, value in merged.state_dict().items():  # the same fp32 ops on the same de-quantized weights
            torch.testing.assert_close(value, want[key], rtol=0, atol=0)
        torch.testing.assert_close(merged(input_ids).logits, unmerged, **TOL)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_merge_and_unload_leaves_no_quantized_layer_and_one_dtype(quantize, tmp_path, input_ids):
    """An adapter on q_proj and v_proj only: the MLP's 4-/8-bit layers stayed bitsandbytes layers (a checkpoint no
    loader reads), and int8's merged layers became bf16 in an fp32 model (forward: a dtype mismatch)."""
    base = tiny_llama(hidden_size=64, intermediate_size=128)
    qmodel = quantize_model(copy.deepcopy(base), quantize, compute_dtype=torch.float32)
    reference = _dequantized_copy(qmodel)  # every layer de-quantized, in fp32
    for model in (qmodel, reference):
        randomize(inject(model, LoraConfig(r=4, target_modules=tuple(TARGETS))))
    with torch.no_grad():
        unmerged = qmodel(input_ids).logits
        merged, want = merge_and_unload(qmodel), merge_and_unload(reference)
        assert {p.dtype for p in merged.parameters()} == {torch.float32}
        assert merged.state_dict().keys() == want.state_dict().keys()
        for key, value in merged.state_dict().items():
            torch.testing.assert_close(value, want.state_dict()[key], rtol=0, atol=0)
        # int8's own matmul rounds its input to fp16 (bitsandbytes): the merged fp32 model differs by that much
        torch.testing.assert_close(merged(input_ids).logits, unmerged, **(TOL if quantize == "nf4" else
                                                                           dict(rtol=0, atol=0.05)))
    merged.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, merged(input_ids).logits, rtol=0, atol=0)


# --- the merged checkpoint (export_merged, `loraforge merge`) ---------------------------------------------------
def test_merging_two_adapters_is_exact_by_default(tiny_dir, tmp_path, input_ids):
    """Two rank-4 adapters whose sum has rank 8: the default gives PEFT's logits with both active (x + y)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    _peft_adapters(base, tmp_path, {"x": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                                    "y": peft.LoraConfig(r=4, lora_alpha=32, target_modules=TARGETS,
                                                         rank_pattern={"q_proj": 2})})
    export_merged(str(tiny_dir), [str(tmp_path / "x"), str(tmp_path / "y")], tmp_path / "merged")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x", adapter_name="x")
    theirs.load_adapter(tmp_path / "y", adapter_name="y")
    theirs.base_model.set_adapter(["x", "y"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = theirs(input_ids).logits
        assert (want - base(input_ids).logits).abs().max() > 0.1
        torch.testing.assert_close(merged(input_ids).logits, want, **TOL)


def test_an_adapter_of_another_architecture_or_adapters_of_two_bases_are_warned_about(tiny_dir, tmp_path):
    # soak: a Qwen2 adapter whose shapes fit merged into a Llama base, and a Llama and a Qwen3 adapter summed,
    # silently (PEFT writes the base's class in auto_mapping where task_type is null)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    _peft_adapters(base, tmp_path, {"x": peft.LoraConfig(r=4, target_modules=TARGETS),
                                    "y": peft.LoraConfig(r=4, target_modules=TARGETS)})
    written = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert written["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own class, one base: no warning
        export_merged(str(tiny_dir), [str(tmp_path / "x"), str(tmp_path / "y")], tmp_path / "same")
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps({
        **written, "auto_mapping": {**written["auto_mapping"], "base_model_class": "Qwen2ForCausalLM"},
        "base_model_name_or_path": "models/qwen2"}))
    with pytest.warns(UserWarning) as seen:
        export_merged(str(tiny_dir), [str(tmp_path / "x"), str(tmp_path / "y")], tmp_path / "other")
    messages = [str(w.message) for w in seen]
    assert (f"the adapters to combine name different bases ({tmp_path / 'x'}: models/qwen2; {tmp_path / 'y'}: "
            f"{tiny_dir}): adapters trained on different bases do not add up to a model; combine adapters of one "
            f"base") in messages
    assert (f"{tmp_path / 'x'}: this adapter was trained on a Qwen2ForCausalLM (adapter_config.json's auto_mapping) "
            f"and the model given is a LlamaForCausalLM: its shapes fit, but it was not made for this model; give "
            f"the base it was trained on") in messages


def test_linear_on_adapters_of_two_ranks_names_the_commands_flag(tiny_dir, tmp_path):
    """`loraforge merge --combination linear` was told about combination_type, the library's argument."""
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    _peft_adapters(base, tmp_path, {"x": peft.LoraConfig(r=4, target_modules=TARGETS),
                                    "y": peft.LoraConfig(r=2, target_modules=TARGETS)})
    with pytest.raises(ConfigError) as e:
        export_merged(str(tiny_dir), [str(tmp_path / "x"), str(tmp_path / "y")], tmp_path / "merged",
                      combination_type="linear")
    assert e.value.problems == ["--combination linear needs adapters of one rank, got ranks [2, 4] in "
                                "model.layers.0.self_attn.q_proj (adapter0: 4, adapter1: 2); use --combination cat "
                                "(exact) or svd"]


def test_linear_checks_ranks_per_layer_and_equals_peft_where_a_rank_pattern_meets_no_other_adapter(tmp_path, input_ids):
    """x (r 4 on q, v) and y (r 4 on q, v, o, with rank_pattern o_proj: 2): PEFT combines them (each adapter's
    largest rank is 4) and linear was refused here ("got ranks [2, 4]"), though o_proj holds y alone. The ranks are
    checked per layer now: PEFT's logits, and a saved combination PEFT loads with the same logits (rank_pattern)."""
    base = tiny_llama()
    _peft_adapters(base, tmp_path, {
        "x": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
        "y": peft.LoraConfig(r=4, lora_alpha=16, target_modules=[*TARGETS, "o_proj"], rank_pattern={"o_proj": 2},
                             init_lora_weights=False)})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x", "x")
    theirs.load_adapter(tmp_path / "y", "y")
    theirs.add_weighted_adapter(["x", "y"], [0.7, -0.4], "c", combination_type="linear")
    theirs.set_adapter("c")
    ours = copy.deepcopy(base)
    for name in "xy":
        load_adapter(ours, tmp_path / name, name)
    add_weighted_adapter(ours, ["x", "y"], [0.7, -0.4], "c", combination_type="linear")
    set_adapter(ours, "c")
    save_adapter(ours, tmp_path / "c", "c")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "c").eval()
    with torch.no_grad():
        want = theirs.eval()(input_ids).logits
        torch.testing.assert_close(ours(input_ids).logits, want, **TOL)
        torch.testing.assert_close(reloaded(input_ids).logits, want, **TOL)


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_a_saved_head_or_embedding_unties_the_merged_checkpoint(saved, tiny_dir, tmp_path, input_ids):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert base.config.tie_word_embeddings and embeddings_tied(base)
    _peft_adapters(base, tmp_path, {"a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         modules_to_save=[saved])})
    out = export_merged(str(tiny_dir), [str(tmp_path / "a")], tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    stored = load_file(out / "model.safetensors")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        want = theirs(input_ids).logits
        plain = theirs.merge_and_unload()
        # both matrices stored, each PEFT's: the head that loaders honouring the flag would otherwise skip
        torch.testing.assert_close(stored["lm_head.weight"], plain.lm_head.weight, rtol=0, atol=0)
        torch.testing.assert_close(stored["model.embed_tokens.weight"], plain.model.embed_tokens.weight, rtol=0, atol=0)
        assert not torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(reloaded(input_ids).logits, want, **TOL)


def test_merge_and_unload_keeps_a_tied_model_tied(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    merge_and_unload(randomize(inject(model, LoraConfig(r=2, target_modules=tuple(TARGETS)))))
    assert model.config.tie_word_embeddings and embeddings_tied(model)


def test_merge_options_are_checked_before_loading(tmp_path):
    """A base that does not exist: each error below is raised before anything loads, naming the CLI's option."""
    nope = str(tmp_path / "no-base")
    cases = [
        (dict(adapters=["a", "b"], weights=[1.0]),
         "--weights [1.0]: give one weight per adapter (2), or none for 1 each"),
        (dict(adapters=["a", "b"], weights=[math.inf, 1.0]), "--weights [inf, 1.0]: inf is not a finite number"),
        (dict(adapters=["a", "b"], combination_type="foo"), "--combination 'foo': use one of cat, svd, linear"),
        (dict(adapters=["a"], dtype="fp8"), "--dtype 'fp8': use one of fp32, float32, bf16, bfloat16, fp16, float16"),
        (dict(adapters=["a"], quantize="nf5"), "--quantize 'nf5': use one of nf4, fp4, int8, or leave it out"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as info:
            export_merged(nope, out_dir=tmp_path / "out", **kwargs)
        assert info.value.problems == [message]
    assert not (tmp_path / "out").exists()


def test_merge_refuses_a_dora_adapter_in_a_combination_by_its_directory(tmp_path):
    save_adapter(randomize(inject(tiny_llama(), LoraConfig(r=2, use_dora=True))), tmp_path / "d")
    save_adapter(randomize(inject(tiny_llama(), LoraConfig(r=2))), tmp_path / "p")
    with pytest.raises(AdapterError, match=re.escape(f"'{tmp_path / 'd'}' uses DoRA (use_dora)")):
        export_merged(str(tmp_path / "no-base"), [str(tmp_path / "d"), str(tmp_path / "p")], tmp_path / "out")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_combining_refuses_a_pissa_adapter_and_leaves_the_base(init, tmp_path, input_ids):
    """Its A and B fit the residual base its init made: a weighted sum of them on another base means nothing, and a
    combined adapter's own inject must not run the init (that would replace the base by a residual again)."""
    model = inject(tiny_llama(), LoraConfig(r=2, target_modules=tuple(TARGETS), init_lora_weights=init), "x")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(AdapterError, match=f"'x' is a {init} adapter .*save_converted"):
        add_weighted_adapter(model, ["x"], [0.5], "c", combination_type="cat")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    save_adapter(model, tmp_path / "a", "x")
    with pytest.raises(AdapterError, match=f"'{tmp_path / 'a'}' is a {init} adapter"):
        export_merged(str(tmp_path / "no-base"), [str(tmp_path / "a")], tmp_path / "out", weights=[0.5])


def test_merge_refuses_nan_weights_naming_the_directory_and_tensor(tiny_dir, tmp_path):
    save_adapter(randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2))), tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = math.nan
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=re.escape(key) + ".* NaN"):  # named by read_adapter_weights
        export_merged(str(tiny_dir), [str(tmp_path / "a")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dora", [False, True])
def test_a_merge_past_fp16s_range_names_the_adapter_and_the_dtype(dora, tiny_dir, tmp_path):
    """Finite adapter weights whose merge passes ±65504 in fp16: the error blamed "NaN/inf weights" in the adapter
    (a traceback from the CLI). fp32 merges the same adapter. DoRA rescales each row to its magnitude: merged in
    fp32, then cast, its fp16 export is finite (merged in fp16, it overflowed on the way)."""
    model = inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, use_dora=dora))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A["default"].weight.fill_(200.0)
            layer.lora_B["default"].weight.fill_(200.0)  # ΔW = lora_alpha / r · B·A = 4 · 200 · 200 · 2 = 320,000
    save_adapter(model, tmp_path / "a")
    fp32 = export_merged(str(tiny_dir), [str(tmp_path / "a")], tmp_path / "out32")
    if dora:
        fp16 = export_merged(str(tiny_dir), [str(tmp_path / "a")], tmp_path / "out", dtype="fp16")
        ours, exact = load_file(fp16 / "model.safetensors"), load_file(fp32 / "model.safetensors")
        assert all(torch.equal(ours[k], exact[k].half()) for k in exact)  # round(W0 + ΔW), once
        return
    with pytest.raises(AdapterError) as e:
        export_merged(str(tiny_dir), [str(tmp_path / "a")], tmp_path / "out", dtype="fp16")
    assert re.fullmatch(rf"cannot merge into --dtype fp16: adapter {re.escape(str(tmp_path / 'a'))}: the merged "
                        r"weight model\.layers\.0\.[a-z_.]+ passes float16's range \(\|W\| up to [0-9.e+]+\); merge in "
                        r"fp32 or bf16", str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight", ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"])
def test_a_base_weight_past_fp16s_range_is_the_base_s_not_the_adapter_s(weight, tiny_dir, tmp_path):
    """Soak: `merge --dtype fp16` of an fp32 base holding a weight past ±65504 said "adapter X: the merged weight
    ... passes float16's range", though no adapter touched it (down_proj here; the adapter takes q_proj only) or the
    base alone passed it (q_proj). It now names the base and its weight, before any adapter loads."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.get_parameter(weight)[0, 0] = 1e5
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    save_adapter(randomize(inject(model, LoraConfig(r=2, target_modules=["q_proj"]))), tmp_path / "a")
    with pytest.raises(FloatingPointError) as e:
        export_merged(str(tmp_path / "base"), [str(tmp_path / "a")], tmp_path / "out", dtype="fp16")
    assert str(e.value) == (f"cannot merge into --dtype fp16: the base {tmp_path / 'base'}'s own weight {weight} "
                            f"passes float16's range (|W| up to 1e+05) before any adapter is added; merge in fp32 or "
                            f"bf16")
    assert not (tmp_path / "out").exists()
    export_merged(str(tmp_path / "base"), [str(tmp_path / "a")], tmp_path / "out", dtype="bf16")  # as it says


def test_merge_overwrite_interrupted_leaves_the_earlier_export_whole(tiny_dir, tmp_path, monkeypatch):
    """--overwrite replaced an earlier export file by file: a Ctrl-C between two renames left a mix of both."""
    import loraforge.utils.files as F

    save_adapter(randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2))), tmp_path / "a")
    out = export_merged(str(tiny_dir), [str(tmp_path / "a")], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "_exchange", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_merged(str(tiny_dir), [str(tmp_path / "a")], out, dtype="bf16", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]  # no temporary folder left


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_half_precision_export_is_the_fp32_merge_rounded_once(dtype, tiny_dir, tmp_path):
    """The base (stored in fp32) was loaded in bf16, so W0 was rounded, then W0 + ΔW again: half the adapted
    weights were off round(W0 + ΔW), by up to 2.5× a rounding. Now every tensor is the fp32 merge, cast once."""
    for name in ("a", "b"):
        model = randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2)))
        save_adapter(model, tmp_path / name)
    adapters = [str(tmp_path / "a"), str(tmp_path / "b")]
    exact = load_file(export_merged(str(tiny_dir), adapters, tmp_path / "fp32", weights=[0.7, -0.3])
                      / "model.safetensors")
    ours = load_file(export_merged(str(tiny_dir), adapters, tmp_path / dtype, dtype=dtype, weights=[0.7, -0.3])
                     / "model.safetensors")
    assert ours.keys() == exact.keys()
    assert all(torch.equal(ours[k], exact[k].to(ours[k].dtype)) for k in exact)


def test_a_weighted_combination_past_fp16s_range_names_the_adapters_and_weights(tiny_dir, tmp_path):
    """--weights 1 1e6 in fp16: the error blamed the first adapter for "NaN/inf weights" (both were finite)."""
    for name in ("a", "b"):
        model = randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2)))
        save_adapter(model, tmp_path / name)
    with pytest.raises(AdapterError) as e:
        export_merged(str(tiny_dir), [str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out", dtype="fp16",
                      weights=[1.0, 1e6])
    assert str(e.value).startswith(f"cannot merge into --dtype fp16: adapter {tmp_path / 'a'}, {tmp_path / 'b'} with "
                                   f"--weights 1 1e+06: the merged weight ")
    assert str(e.value).endswith("; merge in fp32 or bf16, or with smaller --weights")


def test_merge_overwrite_drops_an_adapter_left_in_out_and_keeps_other_files(tiny_dir, tmp_path, input_ids):
    """--overwrite into a folder that held an adapter kept its adapter_config.json and weights beside the merged
    model: from_pretrained attached that adapter to the merged weights again (logits 0.24 off)."""
    for name, seed in (("a", 1), ("stale", 2)):
        save_adapter(randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2)), seed=seed),
                     tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    for f in (tmp_path / "stale").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "adapter_model.bin").write_bytes(b"an older adapter")
    (out / "notes.txt").write_text("mine")
    export_merged(str(tiny_dir), [str(tmp_path / "a")], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("adapter")) == []
    assert (out / "notes.txt").read_text() == "mine"
    want = AutoModelForCausalLM.from_pretrained(tiny_dir)  # W0 + s·B·A, the plain formula on the saved adapter
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    scale = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_alpha"] / 2
    with torch.no_grad():
        for key in (k for k in tensors if k.endswith("lora_A.weight")):
            module = want.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
            module.weight += scale * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids).logits
        assert (want(input_ids).logits - AutoModelForCausalLM.from_pretrained(tiny_dir)(input_ids).logits
                ).abs().max() > 0.1  # the adapter moves the logits
        torch.testing.assert_close(got, want(input_ids).logits, rtol=1e-5, atol=1e-5)  # fp32 sums in two orders


def _two_adapters(tmp_path):
    model = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        save_adapter(randomize(inject(tiny_llama(), LoraConfig(r=2, target_modules=tuple(TARGETS))), seed=seed),
                     tmp_path / name)
        load_adapter(model, tmp_path / name, name)
    return model


@pytest.mark.parametrize("weights,want", [(None, [1.0, 1.0]), (torch.tensor([0.5, -2.0]), [0.5, -2.0]),
                                          ((1, 2), [1.0, 2.0])])
def test_weights_may_be_none_a_tuple_or_a_tensor(weights, want, tmp_path):
    """weights=None was a TypeError (export_merged defaults it to 1 each), a tensor "Boolean value of Tensor ...
    is ambiguous"; each is the weighted sum Σ w·s·B·A now."""
    model = _two_adapters(tmp_path)
    add_weighted_adapter(model, ["a", "b"], weights, "c", combination_type="cat")
    for _, m in lora_layers(model):
        exact = sum(w * m.scaling[n] * m.lora_B[n].weight @ m.lora_A[n].weight for n, w in zip("ab", want))
        torch.testing.assert_close(m.delta_weight("c"), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda m: add_weighted_adapter(m, [], [], "x", "cat"),
     "adapters []: give the names of the loaded adapters to combine (loaded: ['a', 'b'])"),
    (lambda m: add_weighted_adapter(m, [], [], "x", "svd"),
     "adapters []: give the names of the loaded adapters to combine (loaded: ['a', 'b'])"),
    (lambda m: add_weighted_adapter(m, ["a", "b"], [1, 1], "x", "svd", svd_rank=0),
     "svd_rank 0: give a positive whole number, or None for the largest adapter rank"),
    (lambda m: add_weighted_adapter(m, ["a", "b"], [1, 1], "x", "svd", svd_rank=-3),
     "svd_rank -3: give a positive whole number, or None for the largest adapter rank"),
    (lambda m: add_weighted_adapter(m, ["a", "b"], torch.ones(2, 2), "x", "cat"),
     "weights [[1.0, 1.0], [1.0, 1.0]]: give one number per adapter, e.g. [0.7, 0.3]"),
    (lambda m: export_merged("unused", [], "unused"),
     "adapters []: give at least one adapter directory to merge (the command's --adapter)"),
    (lambda m: add_weighted_adapter(m, ["a", "b"], [1, 1], "x", "cat", svd_rank=3),
     "svd_rank 3: only with combination_type 'svd' (the rank it truncates to; 'cat' keeps every rank): pass "
     "combination_type='svd' or leave svd_rank out"),
], ids=["empty-cat", "empty-svd", "svd_rank-0", "svd_rank-negative", "weights-2d", "export-empty", "svd_rank-cat"])
def test_empty_adapters_a_zero_svd_rank_and_odd_weights_are_value_errors(call, message, tmp_path):
    """[] was an IndexError (cat, export_merged) or "max() arg is an empty sequence" (svd); svd_rank 0 silently
    meant the default, and an svd_rank beside cat was dropped without a word (export_merged's --svd-rank refused)."""
    model = _two_adapters(tmp_path)
    with pytest.raises(ConfigError) as e:  # a ValueError
        call(model)
    assert e.value.problems == [message]
    assert list(model.lora_configs) == ["a", "b"]  # nothing made



@pytest.mark.parametrize("combination", ["cat", "svd", "linear"])
def test_weights_past_float32s_range_are_refused_by_name_and_leave_no_adapter(combination, tmp_path):
    """weights [1e300, 1]: svd failed inside torch (LinAlgError: "failed to converge"; PEFT too), cat and linear
    made an adapter of inf (PEFT too). Refused now, naming the weights and a layer; at [1e30, 1] the combination is
    the formula's Σ w·s·B·A (PEFT's numbers for cat and svd, which are exact at these ranks)."""
    model = _two_adapters(tmp_path)
    with pytest.raises(M.MergeError) as e:
        add_weighted_adapter(model, ["a", "b"], [1e300, 1.0], "x", combination)
    assert str(e.value) == ("weights [1e+300, 1]: the weighted ΔW of model.layers.0.self_attn.q_proj passes "
                            "float32's range (inf); use smaller weights")
    assert list(model.lora_configs) == ["a", "b"]
    assert all("x" not in layer.r for _, layer in lora_layers(model))
    add_weighted_adapter(model, ["a", "b"], [1e30, 1.0], "x", combination)
    if combination != "linear":  # linear is PEFT's approximation, not the sum
        for _, m in lora_layers(model):
            exact = sum(w * m.scaling[n] * m.lora_B[n].weight @ m.lora_A[n].weight for n, w in zip("ab", [1e30, 1.0]))
            # fp32 rounding of sums of terms ~1e30: relative to the largest element (one near 0 cancels)
            torch.testing.assert_close(m.delta_weight("x"), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_merge_with_svd_and_weights_past_float32s_range_is_refused_naming_weights(tiny_dir, tmp_path):
    """`loraforge merge --combination svd --weights 1e300 1` ended in torch's LinAlgError traceback; cat said this."""
    for name, seed in (("a", 1), ("b", 2)):
        save_adapter(randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2)), seed=seed),
                     tmp_path / name)
    adapters = [str(tmp_path / "a"), str(tmp_path / "b")]
    for combination in ("svd", "cat"):
        with pytest.raises(AdapterError) as e:
            export_merged(str(tiny_dir), adapters, tmp_path / "out", weights=[1e300, 1.0],
                          combination_type=combination)
        assert str(e.value) == (f"cannot merge into --dtype fp32: adapter {adapters[0]}, {adapters[1]} with --weights "
                                f"1e+300 1: the weighted ΔW passes float32's range (inf); use smaller --weights")
    assert not (tmp_path / "out").exists()


def test_one_adapter_given_twice_warns_and_adds_it_twice_as_peft_does(tiny_dir, tmp_path):
    """`--adapter a a` merged 2 × a's ΔW without a word: a warning says so and names the --weights that mean it;
    the checkpoint is PEFT's (add_weighted_adapter of the two copies, cat, merge_and_unload) and `--weights 2`'s."""
    save_adapter(randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2)), seed=1),
                 tmp_path / "a")
    twice = [str(tmp_path / "a"), f"{tmp_path}/./a"]
    with pytest.warns(UserWarning) as caught:
        export_merged(str(tiny_dir), twice, tmp_path / "twice", weights=[0.5, 1.0])
    assert [str(w.message) for w in caught if "one folder" in str(w.message)] == [
        f"--adapter {twice[0]} and {twice[1]}: one folder given 2 times, so its ΔW is added 2 times (weight 1.5 in "
        f"all); give it once, with --weights 1.5 if that is what you mean"]
    export_merged(str(tiny_dir), twice[:1], tmp_path / "once", weights=[1.5])
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), twice[0], "a1")
    peft_model.load_adapter(twice[1], "a2")
    peft_model.add_weighted_adapter(["a1", "a2"], [0.5, 1.0], "c", combination_type="cat")
    reference = peft_model.merge_and_unload(adapter_names=["c"]).state_dict()
    for out in ("twice", "once"):
        merged = load_file(tmp_path / out / "model.safetensors")
        for key, value in merged.items():
            torch.testing.assert_close(value, reference[key], **TOL)


@pytest.mark.parametrize("combination", ["cat", "svd", "linear"])
def test_a_name_given_twice_to_add_weighted_adapter_adds_it_twice_as_peft_does_with_a_warning(combination, tmp_path):
    """add_weighted_adapter(["a", "a"]) added a's ΔW twice without a word (set_adapter refuses a name given twice:
    its forward would add the ΔW once per mention). PEFT's add_weighted_adapter adds it twice, the reference kept:
    the combined adapter's logits are PEFT's for the same call, and a warning names the weight that means it."""
    save_adapter(randomize(inject(tiny_llama(), LoraConfig(r=2, lora_alpha=4)), seed=1), tmp_path / "a")
    ours = tiny_llama()
    load_adapter(ours, tmp_path / "a", "a")
    with pytest.warns(UserWarning) as caught:
        add_weighted_adapter(ours, ["a", "a"], [0.5, 1.0], "c", combination)
    assert [str(w.message) for w in caught if "given 2 times" in str(w.message)] == [
        "add_weighted_adapter: 'a' given 2 times in ['a', 'a'], so its ΔW is added 2 times (weight 1.5 in all), as "
        "PEFT's add_weighted_adapter does; give it once, with weight 1.5, if that is what you mean"]
    set_adapter(ours, "c")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    theirs.add_weighted_adapter(["a", "a"], [0.5, 1.0], "c", combination_type=combination)
    theirs.set_adapter("c")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **TOL)


def test_a_weight_on_one_dora_adapter_names_weights(tmp_path):
    """`merge --adapter DORA --weights 0.5` said to merge "with that one --adapter", which the user had done."""
    save_adapter(inject(tiny_llama(), LoraConfig(r=2, use_dora=True)), tmp_path / "dora")
    with pytest.raises(AdapterError) as e:
        export_merged("unused", [str(tmp_path / "dora")], tmp_path / "out", weights=[0.5])
    assert str(e.value) == (f"--weights 0.5: cannot scale the adapter: '{tmp_path / 'dora'}' uses DoRA "
                            f"(use_dora): its magnitude vector is not a low-rank update. Leave --weights out to merge "
                            f"it as trained")


@pytest.mark.parametrize("small_b", [True, False], ids=["finite-weights-nan-forward", "delta-overflows"])
def test_weights_of_1e38_are_refused_naming_weights_and_the_value(small_b, tiny_dir, tmp_path):
    """--weights 1e38 1: with B of 0.01 and scaling 1 the merged weights stay finite (|W| ~1e36), but SiLU(gate)·up
    of such weights passes float32's range, and the checkpoint written gave NaN logits; with scaling 8 and B of 0.3
    the weighted ΔW itself overflows, and the error blamed the adapters for "NaN/inf weights" they do not hold."""
    config = LoraConfig(r=2, lora_alpha=2, target_modules="all-linear") if small_b else LoraConfig(r=2)
    for name in ("a", "b"):
        model = randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), config))
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B["default"].weight.mul_(0.01 if small_b else 1.0)
        save_adapter(model, tmp_path / name)
    adapters = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(AdapterError) as e:
        export_merged(str(tiny_dir), adapters, tmp_path / "out", weights=[1e38, 1.0])
    start = f"cannot merge into --dtype fp32: adapter {adapters[0]}, {adapters[1]} with --weights 1e+38 1: "
    if small_b:
        assert re.fullmatch(re.escape(start) + r"the merged model's logits are NaN/inf \(its largest weight: "
                            r"[0-9.]+e\+3[5-7] in model\.layers\.\d\.[a-z_.]+\); use smaller --weights", str(e.value))
    else:
        assert str(e.value) == start + "the weighted ΔW passes float32's range (inf); use smaller --weights"
    assert not (tmp_path / "out").exists()
    export_merged(str(tiny_dir), adapters, tmp_path / "out", weights=[1e3, 1.0])  # large, yet a working model
    assert torch.isfinite(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(torch.tensor([[1, 2]])).logits).all()


def _trained_adapter(base_dir, path, target_modules, seed: int) -> None:
    """A real-ish adapter: 5 AdamW steps of next-token loss on random tokens from B = 0 (lr 1e-2)."""
    model = inject(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=target_modules))
    torch.manual_seed(seed)
    ids = torch.randint(0, 1000, (4, 16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(model, path)


def test_weights_that_break_the_forward_with_finite_logits_are_refused_and_trained_ones_at_1_and_2_pass(
        tiny_dir, tmp_path):
    """--weights 1e10: the merged weights and logits are finite, yet the residual stream (|h| ~1e21) squared passes
    float32's range in RMSNorm, which zeroes it: the checkpoint's logits were finite garbage. An adapter on lm_head
    at --weights 1e5 gave logits 1e5 × the base's. Both are refused now; trained adapters at 1 and 2 are far from
    either bound (their logits within 3 × the base's; the bound is 1e3 ×)."""
    _trained_adapter(tiny_dir, tmp_path / "a", "all-linear", seed=1)
    _trained_adapter(tiny_dir, tmp_path / "b", ("q_proj", "v_proj"), seed=2)
    adapters = [str(tmp_path / "a"), str(tmp_path / "b")]
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits.abs().max()
        for weights in ([1.0, 2.0], [2.0, 2.0]):
            out = export_merged(str(tiny_dir), adapters, tmp_path / f"ok{weights[0]:g}", weights=weights)
            merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits.abs().max()
            assert 0.3 < merged / base < 3  # the adapters move the logits, nowhere near the bound (1e3 ×)
    start = f"cannot merge into --dtype fp32: adapter {adapters[0]}, {adapters[1]} with --weights "
    with pytest.raises(AdapterError) as e:
        export_merged(str(tiny_dir), adapters, tmp_path / "out", weights=[1e10, 1.0])
    assert re.fullmatch(re.escape(start + "1e+10 1: the merged model's hidden state entering model.layers.") +
                        r"\d\.[a-z_]+layernorm reaches \|h\| [0-9.]+e\+(19|[2-9]\d) \(the base's: [0-9.]+\), too large "
                        r"to square in float32: the layer zeroes it and the logits mean nothing; use smaller --weights",
                        str(e.value)), str(e.value)
    with pytest.raises(AdapterError, match=re.escape(start + "1e+30 1: the merged model's ")):
        export_merged(str(tiny_dir), adapters, tmp_path / "out", weights=[1e30, 1.0])
    with pytest.warns(UserWarning, match="lm_head"):  # the tied head gets its own copy
        _trained_adapter(tiny_dir, tmp_path / "head", ("lm_head",), seed=3)
    with pytest.raises(AdapterError) as e:
        export_merged(str(tiny_dir), [str(tmp_path / "head")], tmp_path / "out", weights=[1e5])
    assert re.fullmatch(re.escape(f"cannot merge into --dtype fp32: adapter {tmp_path / 'head'} with --weights 100000: "
                                  f"the merged model's largest |logit| is ") + r"[0-9.]+e\+0[4-5], over 1000 × the "
                        r"base's \([0-9.]+, counted as at least 1\); use smaller --weights", str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()


def test_an_int8_merge_past_fp16s_range_is_refused_not_written_as_inf(tiny_dir, tmp_path, monkeypatch):
    """--quantize int8 --dtype fp16: the de-quantized layer merged in fp32 was cast to fp16 unchecked, and a ΔW of
    640,000 was written as inf (8 weights). Now the one refusal the unquantized merge gives; and whatever path
    casts unchecked, the last check before writing refuses NaN/inf in any weight."""

    model = inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A["default"].weight.fill_(200.0)
            layer.lora_B["default"].weight.fill_(200.0)  # ΔW = lora_alpha / r · B·A = 8 · 200 · 200 · 2 = 640,000
    save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        export_merged(str(tiny_dir), [str(tmp_path / "a")], tmp_path / "out", dtype="fp16", quantize="int8")
    assert re.fullmatch(rf"cannot merge into --dtype fp16: adapter {re.escape(str(tmp_path / 'a'))}: the merged "
                        r"weight model\.layers\.0\.self_attn\.q_proj\.weight passes float16's range \(\|W\| up to "
                        r"6\.4e\+05\); merge in fp32 or bf16", str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(M, "_cast_merged", lambda base, dtype, names, path: base.to(dtype))  # unchecked
    with pytest.raises(AdapterError) as e:
        export_merged(str(tiny_dir), [str(tmp_path / "a")], tmp_path / "out", dtype="fp16", quantize="int8")
    assert re.fullmatch(rf"cannot merge into --dtype fp16: adapter {re.escape(str(tmp_path / 'a'))}: the merged "
                        r"weight model\.layers\.0\.self_attn\.q_proj\.weight holds 1024 NaN/inf of 1024 values in "
                        r"float16; merge in fp32", str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_peft_save_of_several_adapters_merges_its_top_one_and_names_the_ones_in_subfolders(tiny_dir, tmp_path,
                                                                                            input_ids):
    """Soak: `merge --adapter DIR` of PEFT's save_pretrained of `default` and `other` (default at the top, other in
    DIR/other) merged default alone, unsaid. Every command reads the folder through read_adapter_json: one warning."""
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    _peft_adapters(base, tmp_path, {"x": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x")  # as "default"
    theirs.load_adapter(tmp_path / "x", adapter_name="other")
    theirs.save_pretrained(tmp_path / "both")  # default at the top, other in both/other
    assert (tmp_path / "both" / "other" / "adapter_config.json").is_file()
    with pytest.warns(UserWarning) as said:
        export_merged(str(tiny_dir), [str(tmp_path / "both")], tmp_path / "merged")
    subfolders = [str(w.message) for w in said if "subfolders" in str(w.message)]
    assert subfolders == [f"{tmp_path / 'both'}: only its top adapter (PEFT's 'default') is used, not the 1 in its "
                          f"subfolders (other: PEFT's save of several adapters); to use one, give its folder, e.g. "
                          f"--adapter {tmp_path / 'both' / 'other'}"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    top = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "both")  # PEFT's reading of the folder
    with torch.no_grad():  # what was merged: the top adapter
        torch.testing.assert_close(merged(input_ids).logits, top(input_ids).logits, **TOL)
    with warnings.catch_warnings():  # the subfolder's own adapter: nothing below it
        warnings.simplefilter("error")
        assert read_adapter_config(tmp_path / "both" / "other").r == 4
    # soak: `merge --adapter both both/other` still warned that other was left out; both are merged, unsaid
    (tmp_path / "third").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "both" / "third").mkdir(exist_ok=True)
        (tmp_path / "both" / "third" / name).write_bytes((tmp_path / "both" / "other" / name).read_bytes())
    with pytest.warns(UserWarning) as said:
        export_merged(str(tiny_dir), [str(tmp_path / "both"), str(tmp_path / "both" / "other")], tmp_path / "two")
    # read to check the combination, then loaded: the same line twice, which Python's default filter says once
    subfolders = list(dict.fromkeys(str(w.message) for w in said if "subfolders" in str(w.message)))
    assert subfolders == [f"{tmp_path / 'both'}: only its top adapter (PEFT's 'default') is used, not the 1 in its "
                          f"subfolders (third: PEFT's save of several adapters); to use one, give its folder, e.g. "
                          f"--adapter {tmp_path / 'both' / 'third'}"]
    shutil.rmtree(tmp_path / "both" / "third")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_merged(str(tiny_dir), [str(tmp_path / "both"), str(tmp_path / "both" / "other")], tmp_path / "three")
