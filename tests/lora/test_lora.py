"""The LoRA layer and injection, against plain PyTorch formulas."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from helpers import tiny_gpt2, tiny_llama
from loraforge.config import ConfigError, DataConfig, LoraConfig, TrainingConfig
from loraforge.lora.adalora import AdaLoraConfig, inject_adalora
from loraforge.lora.adapters import load_adapter, save_adapter
from loraforge.lora.inject import count_parameters, find_targets, inject, lora_layers, parameter_report
from loraforge.lora.layer import LoraLinear


class OneLinear(nn.Module):
    def __init__(self, d=200, k=200):
        super().__init__()
        self.proj = nn.Linear(k, d, bias=False)

    def forward(self, x):
        return self.proj(x)


def test_200x200_rank2_trains_800_parameters():
    model = inject(OneLinear(), LoraConfig(r=2, target_modules=("proj",)))
    trainable, total = count_parameters(model)
    assert trainable == 800  # A: 2×200, B: 200×2
    assert total == 40_000 + 800
    assert parameter_report(model) == "trainable params: 800 || all params: 40,800 || trainable%: 1.9608"


def test_fresh_adapter_is_a_no_op(input_ids):
    model = tiny_llama()
    ref = model(input_ids).logits
    inject(model, LoraConfig(r=8))
    torch.testing.assert_close(model(input_ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_forward_matches_formula(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=4, lora_alpha=8, use_rslora=use_rslora, init_lora_weights=False)
    x = torch.randn(5, 16)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    s = 8 / math.sqrt(4) if use_rslora else 8 / 4
    expected = x @ base.weight.T + base.bias + s * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight("a"), s * B @ A)


def test_conv1d_fan_in_fan_out_matches_formula():
    torch.manual_seed(0)
    base = Conv1D(12, 16)  # GPT-2: weight (in=16, out=12)
    layer = LoraLinear(base)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (16, 12)
    layer.add_adapter("a", r=4, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(2, 3, 16)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    torch.testing.assert_close(layer(x), x @ base.weight + base.bias + x @ A.T @ B.T)
    assert layer.delta_weight("a").shape == base.weight.shape


def test_init_defaults():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(256, 64))
    layer.add_adapter("k", r=8, lora_alpha=16)
    layer.add_adapter("g", r=8, lora_alpha=16, init_lora_weights="gaussian")
    assert torch.count_nonzero(layer.lora_B["k"].weight) == 0 and torch.count_nonzero(layer.lora_B["g"].weight) == 0
    # kaiming_uniform(a=sqrt(5)) on fan_in=256: U(-1/sqrt(256), 1/sqrt(256))
    assert layer.lora_A["k"].weight.abs().max() <= 1 / 16
    # gaussian: N(0, 1/r) std
    assert abs(layer.lora_A["g"].weight.std().item() - 1 / 8) < 0.01


def test_default_targets_are_attention_projections():
    model = inject(tiny_llama(), LoraConfig())
    paths = [p for p, _ in lora_layers(model)]
    assert sorted({p.rsplit(".", 1)[-1] for p in paths}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(paths) == 8
    assert model.lora_configs["default"].target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    gpt2 = inject(tiny_gpt2(), LoraConfig())
    assert sorted(p for p, _ in lora_layers(gpt2)) == [f"transformer.h.{i}.attn.{n}" for i in (0, 1)
                                                       for n in ("c_attn", "c_proj")]


TINY = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
ATTENTION_OF = {  # a tiny model of each architecture whose attention projections are not q/k/v/o_proj
    "gptj": (lambda t: t.GPTJForCausalLM(t.GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)),
             "transformer.h.{}.attn.", ("q_proj", "k_proj", "v_proj", "out_proj")),
    "opt": (lambda t: t.OPTForCausalLM(t.OPTConfig(**TINY, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32)),
            "model.decoder.layers.{}.self_attn.", ("q_proj", "k_proj", "v_proj", "out_proj")),
    "phi3": (lambda t: t.Phi3ForCausalLM(t.Phi3Config(**TINY, hidden_size=32, intermediate_size=64, pad_token_id=0)),
             "model.layers.{}.self_attn.", ("qkv_proj", "o_proj")),
    "gpt_neox": (lambda t: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**TINY, hidden_size=32, intermediate_size=64)),
                 "gpt_neox.layers.{}.attention.", ("query_key_value", "dense")),
    "falcon": (lambda t: t.FalconForCausalLM(t.FalconConfig(**TINY, hidden_size=32)),
               "transformer.h.{}.self_attention.", ("query_key_value", "dense")),
}


@pytest.mark.parametrize("arch", list(ATTENTION_OF))
def test_default_targets_are_each_architectures_attention_projections(arch):
    """The default (target_modules None) is every layer's attention projections, fused ones included, under each
    architecture's names: GPT-J's out_proj was left out (its q, k and v alone, found by the q/k/v/o_proj names)."""
    import transformers

    build, prefix, names = ATTENTION_OF[arch]
    torch.manual_seed(0)
    assert sorted(find_targets(build(transformers), LoraConfig())) == sorted(
        prefix.format(i) + n for i in (0, 1) for n in names)


def test_target_modules_list_regex_all_linear_and_layers():
    model = tiny_llama()
    names = lambda cfg: sorted(find_targets(model, cfg))  # noqa: E731
    assert names(LoraConfig(target_modules=("q_proj",))) == ["model.layers.0.self_attn.q_proj",
                                                            "model.layers.1.self_attn.q_proj"]
    assert names(LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj")) == ["model.layers.1.mlp.down_proj",
                                                                              "model.layers.1.mlp.up_proj"]
    all_linear = names(LoraConfig(target_modules="all-linear"))
    assert len(all_linear) == 14 and not any("lm_head" in n for n in all_linear)
    assert names(LoraConfig(target_modules=("v_proj",), layers_to_transform=(1,))) == [
        "model.layers.1.self_attn.v_proj"]


def test_target_matching_nothing_lists_linear_names():
    with pytest.raises(ConfigError, match=r"target_modules: \('qkv',\) matches no linear layer.*'down_proj'.*'q_proj'"):
        inject(tiny_llama(), LoraConfig(target_modules=("qkv",)))
    with pytest.warns(UserWarning) as caught:  # soak: one typo among good names trained the rest without a word
        model = inject(tiny_llama(), LoraConfig(target_modules=("q_proj", "nonexistent_proj")))
    assert [str(w.message) for w in caught] == [
        "target_modules: 'nonexistent_proj' matches no layer of this model that gets an adapter (LlamaForCausalLM; its "
        "linear layers are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', "
        "'v_proj']): check the spelling"]
    assert sorted({n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}) == ["q_proj"]


def test_targets_taken_by_modules_to_save_or_exclude_modules_name_that_field():
    """Soak: `target_modules=[q_proj]` with `modules_to_save=[q_proj]` said q_proj "matches no linear layer" (the
    message then listed q_proj among the layer names); with the default targets, "check the spelling"."""
    with pytest.raises(ConfigError) as e:
        inject(tiny_llama(), LoraConfig(target_modules=("q_proj",), modules_to_save=("q_proj",)))
    assert e.value.problems == [
        "target_modules: ('q_proj',) matches 2 layer(s) of this model, but modules_to_save takes all 2 (it trains "
        "them in full; a layer cannot be both saved whole and adapted), so no layer is left for an adapter: remove "
        "them from modules_to_save, or target other layers"]
    with pytest.raises(ConfigError, match=r"but exclude_modules takes all 2 \(it removes them from target_modules"):
        inject(tiny_llama(), LoraConfig(target_modules=("q_proj",), exclude_modules=("q_proj",)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # taken on purpose (PEFT's rule): no "check the spelling"
        model = inject(tiny_llama(), LoraConfig(target_modules=("q_proj", "v_proj"), modules_to_save=("q_proj",)))
        assert sorted({n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}) == ["v_proj"]
        inject(tiny_llama(), LoraConfig(target_modules=("q_proj", "v_proj"), exclude_modules=("q_proj",)))
        inject(tiny_llama(), LoraConfig(modules_to_save=("q_proj",)))  # the default targets: nothing was named


def test_a_bias_setting_on_a_model_without_biases_says_it_trains_none():
    """Soak: `bias: all` on a Llama (no biases) trained exactly as `none`, without a word."""
    for bias, which in (("all", "this model has"), ("lora_only", "the targeted layers have")):
        with pytest.warns(UserWarning) as caught:
            inject(tiny_llama(), LoraConfig(target_modules=("q_proj",), bias=bias))
        assert [str(w.message) for w in caught] == [f"bias: {bias!r} trains no bias: {which} none "
                                                    f"(LlamaForCausalLM), so it trains as bias: 'none' does"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(tiny_gpt2(), LoraConfig(target_modules=("c_attn",), bias="all"))  # GPT-2's layers have biases


@pytest.mark.parametrize("model, changes, problem", [
    ("llama", {"layers_pattern": "blocks"}, "layers_pattern: 'blocks' names no layer list of this model "
     "(LlamaForCausalLM), whose targeted layers sit in ['layers']; use layers_pattern: 'layers', or remove "
     "layers_pattern"),
    ("llama", {"layers_to_transform": (99,)}, "layers_to_transform: [99] selects no layer: this model "
     "(LlamaForCausalLM) has layers 0..1 in 'layers' (counted from 0; a negative index does not count from the end); "
     "use indices from 0 to 1"),
    ("llama", {"layers_to_transform": (-1,), "layers_pattern": "layers"}, "layers_to_transform: [-1] selects no "
     "layer: this model (LlamaForCausalLM) has layers 0..1 in 'layers' (counted from 0; a negative index does not "
     "count from the end); use indices from 0 to 1"),
    ("gpt2", {"layers_to_transform": (2, 3)}, "layers_to_transform: [2, 3] selects no layer: this model "
     "(GPT2LMHeadModel) has layers 0..1 in 'h' (counted from 0; a negative index does not count from the end); use "
     "indices from 0 to 1"),
])
def test_a_layer_selection_that_drops_every_target_names_its_own_field(model, changes, problem):
    """A wrong layers_pattern or an index past the model's layers was blamed on target_modules ("matches no linear
    layer"), though the targets match: the field that dropped them is named, with what the model has."""
    build, targets = {"llama": (tiny_llama, ("q_proj",)), "gpt2": (tiny_gpt2, ("c_attn",))}[model]
    with pytest.raises(ConfigError) as e:
        find_targets(build(), LoraConfig(target_modules=targets, **{"layers_to_transform": (0,), **changes}))
    assert e.value.problems == [problem]


def test_only_adapter_trains_and_bias_options():
    model = inject(tiny_gpt2(), LoraConfig(target_modules=("c_attn",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model = inject(tiny_gpt2(), LoraConfig(target_modules=("c_attn",), bias="lora_only"))
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)}
    model = inject(tiny_gpt2(), LoraConfig(target_modules=("c_attn",), bias="all"))
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert len(biases) == sum(1 for n, _ in model.named_parameters() if n.endswith("bias"))


def test_rank_and_alpha_patterns():
    model = inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8,
                                             rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
                                             alpha_pattern={"o_proj": 3}))
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 2
    assert layers["model.layers.1.self_attn.v_proj"].r["default"] == 6
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 4
    assert layers["model.layers.0.self_attn.o_proj"].scaling["default"] == 3 / 4


def test_a_huge_target_list_is_not_echoed_back_whole():
    with pytest.raises(ConfigError) as caught:
        inject(tiny_llama(), LoraConfig(target_modules=("x" * 5000,)))
    text = str(caught.value)
    assert text.startswith("invalid config:\n  target_modules: ('xxxx")
    assert "... (5,005 characters) matches no linear layer" in text
    assert len(text) < 400, text
    with pytest.raises(ConfigError, match=r"target_modules: 'x{99}\.\.\. \(5,000 characters\)"):
        LoraConfig(target_modules="x" * 4999 + "(")


def test_a_pattern_key_that_matches_no_adapted_layer_is_named_in_a_warning():
    """PEFT ignores such a key silently: a typo (q_prj) or a layer outside target_modules trained at r."""
    with pytest.warns(UserWarning) as caught:
        model = inject(tiny_llama(), LoraConfig(r=4, target_modules=("q_proj", "v_proj"),
                                                rank_pattern={"q_prj": 2, "v_proj": 6}, alpha_pattern={"o_proj": 3}))
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("rank_pattern: 'q_prj' matches none of the 4 layers that get an adapter (e.g. "
                            "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj), so r applies there")
               for m in messages), messages
    assert any(m.startswith("alpha_pattern: 'o_proj' matches none of the 4 layers") for m in messages), messages
    assert not any("'v_proj'" in m for m in messages)
    assert dict(lora_layers(model))["model.layers.0.self_attn.q_proj"].r["default"] == 4


@pytest.mark.parametrize("bad,field", [({"r": 0}, "r:"), ({"lora_dropout": 1.5}, "lora_dropout:"),
                                        ({"bias": "some"}, "bias:"), ({"target_modules": "("}, "target_modules:")])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        LoraConfig(**bad)


@pytest.mark.parametrize("build, problem", [
    (lambda: LoraConfig(r=2.5), "r: must be a positive integer (at most 65536), got 2.5"),
    (lambda: LoraConfig(r=True), "r: must be a positive integer (at most 65536), got True"),
    (lambda: LoraConfig(r="8"), "r: must be a positive integer (at most 65536), got '8'"),
    (lambda: LoraConfig(rank_pattern={"q_proj": 2.5}), "rank_pattern.q_proj: must be a positive integer (at most "
                                                        "65536), got 2.5"),
    (lambda: LoraConfig(layers_to_transform=[0.5]), "layers_to_transform: must be a list of layer indices "
                                                    "(integers), e.g. [0, 1], got (0.5,)"),
    (lambda: AdaLoraConfig(total_step=10, init_r=4.0), "init_r: must be a positive integer, got 4.0"),
    (lambda: AdaLoraConfig(total_step=9.5), "total_step: must be the run's number of optimizer steps (a positive "
                                            "integer), got 9.5"),
    (lambda: TrainingConfig(batch_size=2.0), "batch_size: must be a positive integer, got 2.0"),
    (lambda: DataConfig(train="x.jsonl", max_seq_len=512.0), "max_seq_len: must be an integer (tokens, at least 8), "
                                                             "got 512.0"),
])
def test_integer_fields_built_in_python_refuse_other_numbers(build, problem):
    """soak: LoraConfig(r=2.5) gave rank-2 layers, saved r 2.5 in adapter_config.json (PEFT cannot load it);
    r=True gave rank 1; r='8' a TypeError. A YAML's values were already checked (from_dict)."""
    with pytest.raises(ConfigError) as e:
        build()
    assert e.value.problems == [problem]


def test_numpy_integers_are_whole_numbers():
    config = LoraConfig(r=np.int64(4))
    assert type(config.r) is int and config.to_peft_dict()["r"] == 4


def test_config_from_dict_collects_every_problem():
    from loraforge.config import from_dict

    with pytest.raises(ConfigError) as e:
        from_dict(LoraConfig, {"r": "eight", "alpha": 3, "lora_dropout": 0.1}, prefix="lora.")
    text = str(e.value)
    assert "lora.r: expected an integer, got 'eight'" in text
    assert "lora.alpha: unknown field" in text


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_training_the_base_bias_keeps_the_plain_path_under_fused_lora(bias):
    """bias lora_only / all trains the base layer's bias, which the fused kernel refuses (it trains only the
    adapter): with training.fused_lora on (the default) every run on a model with biases (Qwen2's q/k/v) stopped
    with its ValueError. Such layers take the plain path: the same loss and gradients as fused_lora off."""
    grads = []
    for fused in (False, True):
        model = inject(tiny_llama(attention_bias=True),
                       LoraConfig(r=4, lora_alpha=8, bias=bias, init_lora_weights="gaussian"))
        for _, layer in lora_layers(model):
            layer.fused = fused
        ids = torch.arange(12)[None] % 50
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, g0), (loss1, g1) = grads
    assert any(n.endswith("q_proj.base_layer.bias") for n in g1)  # the bias trains
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0)


@pytest.mark.parametrize("entry, path, kind", [("embed_tokens", "model.embed_tokens", "Embedding"),
                                               ("self_attn", "model.layers.0.self_attn", "LlamaAttention")])
def test_a_target_that_names_no_linear_layer_is_refused_by_name(entry, path, kind):
    """('q_proj', 'embed_tokens') adapted q_proj alone and saved embed_tokens in the config: silently not what was
    asked (PEFT puts LoRA on the embedding). The default targets and regexes are unchanged."""
    with pytest.raises(ConfigError) as e:
        inject(tiny_llama(), LoraConfig(target_modules=("q_proj", entry)))
    assert e.value.problems == [f"target_modules: {entry!r} names {path} ({kind}), not a linear layer; loraforge "
                                f"puts LoRA on linear layers only (not on embeddings or whole blocks): remove it, or "
                                f"name the linear layers inside it"]
    assert len(lora_layers(inject(tiny_llama(), LoraConfig(target_modules=r".*(q_proj|embed_tokens)")))) == 2


def test_layers_to_transform_takes_one_index_as_peft_does():
    """LoraConfig(layers_to_transform=1) from Python (PEFT's form) was a TypeError inside inject."""
    one, listed = LoraConfig(layers_to_transform=1), LoraConfig(layers_to_transform=[1])
    assert one.layers_to_transform == listed.layers_to_transform == (1,)
    adapted = [p for p, _ in lora_layers(inject(tiny_llama(), one))]
    assert adapted and all(p.startswith("model.layers.1.") for p in adapted)


def test_a_rank_above_a_layers_dimensions_is_warned_about_once():
    """r=48 on the tiny model (hidden 32, key/value 16, MLP 64): B·A cannot exceed min(in, out), so the adapter
    trains more than the layer holds; one warning names the first such layer, the count, and the r that fits."""
    model = tiny_llama()
    with pytest.warns(UserWarning) as caught:
        inject(model, LoraConfig(r=48, target_modules=["q_proj", "v_proj"]))
    assert len(caught) == 1
    said = str(caught[0].message)
    assert said.startswith("r=48 on model.layers.0.self_attn.q_proj (32 → 32) is more than the rank its update can "
                           "have (32): the adapter trains 3,072 parameters there, the frozen layer holds 1,024;")
    assert "4 of the 4 targeted layers are so (use r ≤ 16;" in said  # v_proj: 32 → 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(tiny_llama(), LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))  # r = min(in, out): no warning
        inject(tiny_llama(), LoraConfig(r=48), advise=False)  # a trained adapter's load, a merge's combination


def test_a_new_adapter_of_an_extreme_scale_is_warned_about_once_from_python_and_a_loaded_one_is_not(tmp_path):
    """lora_alpha 1e30 through inject (or inject_adalora) alone said nothing: only a training config warned. Now
    the one place new adapters are made warns, at the caller's line; loading the saved adapter does not."""
    said = ("lora_alpha: 1e+30 makes the adapter's scale lora_alpha / {rule} = 1e+30 / {r} = {scale}, outside the "
            "usual 0.0001 to 1000 (most runs use 1 to 2); updates that large usually diverge: try lora_alpha {fix} "
            "(2*{rule})")
    with pytest.warns(UserWarning) as record:
        model = inject(tiny_llama(), LoraConfig(r=4, lora_alpha=1e30))
    assert [(str(w.message), w.filename) for w in record] == [
        (said.format(rule="r", r=4, scale="2.5e+29", fix=8), __file__)]
    with pytest.warns(UserWarning) as record:
        inject_adalora(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, lora_alpha=1e30, total_step=10))
    assert [(str(w.message), w.filename) for w in record] == [
        (said.format(rule="init_r", r=4, scale="2.5e+29", fix=8), __file__)]
    save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_llama(), tmp_path / "a")
        inject(tiny_llama(), LoraConfig(r=4, lora_alpha=-8))  # a negated adapter: a usual size
