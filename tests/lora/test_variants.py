"""PiSSA / OLoRA init (output unchanged, export for the original base), LoRA+ parameter groups."""

from types import SimpleNamespace

import peft
import pytest
import torch

from helpers import tiny_gpt2, tiny_llama
from loraforge.lora.adapters import load_adapter, save_adapter
from loraforge.config import ConfigError, LoraConfig
from loraforge.lora.inject import inject, lora_layers
from loraforge.lora.adapters import save_converted
from loraforge.training.optim import loraplus_param_groups, make_optimizer

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: the SVD and the residual round at ~1e-7 relative


def _perturb(model, seed=2):
    """Stand-in for training: move A and B away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                w.add_(torch.randn(w.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_init_leaves_output_unchanged(arch, init, input_ids):
    build = BUILDERS[arch]
    original = {p: m.weight.detach().clone() for p, m in build().named_modules() if hasattr(m, "weight")}
    model = inject(build(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init))
    for path, layer in lora_layers(model):
        residual = layer.base_layer.weight  # the base's own layout; delta_weight() uses the same
        torch.testing.assert_close(residual + layer.delta_weight("default"), original[path], **TOL)  # W_res + s·BA
        assert not torch.allclose(residual, original[path])  # W0 really was replaced by the residual
    torch.testing.assert_close(model(input_ids).logits, build()(input_ids).logits, rtol=1e-4, atol=1e-5)


def test_pissa_takes_the_principal_singular_triplets():
    model = inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"))
    W0 = tiny_llama().model.layers[0].self_attn.q_proj.weight
    layer = model.model.layers[0].self_attn.q_proj
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    torch.testing.assert_close(layer.delta_weight("default"), U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], **TOL)


def test_olora_B_has_orthonormal_columns():
    model = inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights="olora"))
    B = model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    torch.testing.assert_close(B.T @ B, torch.eye(4), **TOL)


@pytest.mark.parametrize("arch, r", [("llama", 4), ("gpt2", 4), ("llama", 20)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_converted_export_loads_on_the_original_base(arch, r, use_rslora, tmp_path, input_ids):
    """r 20 is wider than k_proj and v_proj (32 → 16): their SVD gives 16 directions, and the converted adapter
    makes up the declared rank with zeros (it wrote a (32, 32) lora_A for r 40: neither library loaded it)."""
    build = BUILDERS[arch]
    model = inject(build(), LoraConfig(r=r, lora_alpha=8, init_lora_weights="pissa", use_rslora=use_rslora))
    save_adapter(model, tmp_path / "initial")  # A0, B0: saved right after injection
    trained = _perturb(model)(input_ids).logits
    save_converted(model, tmp_path / "lora", tmp_path / "initial")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "lora")
    assert theirs.peft_config["default"].r == 2 * r and theirs.peft_config["default"].init_lora_weights is True
    torch.testing.assert_close(theirs(input_ids).logits, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(load_adapter(build(), tmp_path / "lora")(input_ids).logits, trained,
                               rtol=1e-4, atol=1e-5)


def test_pissa_adapter_round_trips_with_peft_unconverted(tmp_path, input_ids):
    """An unconverted PiSSA adapter fits the residual base: both libraries re-run the SVD on load."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(0.05)
    expected = theirs(input_ids).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(ours(input_ids).logits, expected, rtol=1e-4, atol=1e-5)
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(back(input_ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_init_option_validation():
    for ok in (True, False, "gaussian", "pissa", "pissa_niter_16", "olora"):
        LoraConfig(init_lora_weights=ok)
    with pytest.raises(ConfigError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pisa")
    assert LoraConfig.from_peft_dict({"peft_type": "LORA", "init_lora_weights": "olora"}).init_lora_weights == "olora"


def test_loraplus_groups_have_the_right_lrs():
    """As PEFT's create_loraplus_optimizer: B and the 1-D parameters at lr·ratio, decayed but for biases and norms
    (DoRA magnitudes decay there; they were left undecayed here, 0.27 apart from PEFT after 3 steps)."""
    model = inject(tiny_llama(attention_bias=True), LoraConfig(r=4, lora_alpha=8, use_dora=True, bias="lora_only",
                                                               modules_to_save=["norm"]))
    groups = loraplus_param_groups(model, lr=1e-4, ratio=16, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    a_ids = {id(layer.lora_A["default"].weight) for _, layer in lora_layers(model)}
    b_ids = {id(layer.lora_B["default"].weight) for _, layer in lora_layers(model)}
    m_ids = {id(layer.lora_magnitude_vector["default"]) for _, layer in lora_layers(model)}
    bias_ids = {id(layer.base_layer.bias) for _, layer in lora_layers(model) if layer.base_layer.bias is not None}
    norm_ids = {id(p) for n, p in model.named_parameters() if "modules_to_save" in n}
    assert bias_ids and norm_ids
    assert {id(p) for p in by_name["lora_A"]["params"]} == a_ids
    assert {id(p) for p in by_name["lora_B"]["params"]} == b_ids | m_ids
    assert {id(p) for p in by_name["no_decay"]["params"]} == bias_ids | norm_ids
    assert (by_name["lora_A"]["lr"], by_name["lora_B"]["lr"], by_name["no_decay"]["lr"]) == (1e-4, 1.6e-3, 1.6e-3)
    assert (by_name["lora_B"]["weight_decay"], by_name["no_decay"]["weight_decay"]) == (0.1, 0.0)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable  # every trainable parameter, once
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1.6e-3, 1.6e-3]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_residual_init_on_a_tied_head_warns_when_saved_and_converts_to_one_both_load_alike(init, tmp_path,
                                                                                              input_ids):
    """PiSSA/OLoRA on a tied lm_head: loraforge unties it before writing the residual, PEFT writes the residual
    into the shared weight (its embedding changes too), so PEFT's logits for the saved adapter differ (1.7 on a
    tiny model): saving says so, and save_converted's plain LoRA loads with the trained logits in both."""
    build = lambda: tiny_llama(tie_word_embeddings=True)  # noqa: E731
    model = inject(build(), LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "lm_head"),
                                       init_lora_weights=init))
    save_adapter(model, tmp_path / "initial")  # right after injection: the warning is for any save
    trained = _perturb(model)(input_ids).logits
    with pytest.warns(UserWarning, match=f"^{init} on lm_head, whose weight is tied to the input embedding: PEFT "):
        save_adapter(model, tmp_path / "plain")
    save_converted(model, tmp_path / "lora", tmp_path / "initial")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "lora")
    torch.testing.assert_close(theirs(input_ids).logits, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(load_adapter(build(), tmp_path / "lora")(input_ids).logits, trained,
                               rtol=1e-4, atol=1e-5)


def test_weight_decay_skips_biases_and_norms_and_decays_dora_magnitudes():
    """HF Trainer's rule (what PEFT users train with): every trainable parameter but biases and norms' weights."""
    model = inject(tiny_llama(attention_bias=True), LoraConfig(r=4, use_dora=True, bias="lora_only",
                                                               modules_to_save=["norm"]))
    t = SimpleNamespace(lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=None, optimizer="adamw")
    decay, no_decay = make_optimizer(model, t).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    kinds = ("lora_A", "lora_B", "lora_magnitude_vector")
    assert sorted({next(k for k in kinds if f".{k}." in names[id(p)]) for p in decay["params"]}) == list(kinds)
    assert {names[id(p)] for p in no_decay["params"]} == {
        *(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")),
        *(n for n, p in model.named_parameters() if ".modules_to_save." in n)}  # norm: every layer's norms
