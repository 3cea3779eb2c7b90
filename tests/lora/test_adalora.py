"""AdaLoRA: PEFT round trips (before and after pruning), the budget schedule, masking, the orthogonality penalty."""

import json
import warnings

import peft
import pytest
import torch
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

from helpers import tiny_gpt2, tiny_llama
from loraforge.lora.adalora import (AdaLoraConfig, RankAllocator, SVDLinear, final_rank_pattern, inject_adalora,
                                    orth_regularization, plot_rank_heatmap, svd_layers)
from loraforge.lora.adapters import AdapterError, load_adapter, save_adapter
from loraforge.lora.inject import lora_layers, regex_budget
from loraforge.config import ConfigError, TrainConfig
from loraforge.lora.merge import merge, unmerge

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# fp32, same ops as PEFT: logits agree to rounding (≤1e-5 per the issue).
TOL = dict(rtol=1e-5, atol=1e-5)


def _config(**kw):
    base = dict(total_step=10, init_r=4, target_r=2, tinit=2, tfinal=3, lora_alpha=16, init_lora_weights=False)
    return AdaLoraConfig(**{**base, **kw})


def _train(model, steps, input_ids, allocator=None, first=1):
    """A tiny explicit loop: loss + orth penalty, backward, optimizer step, allocator step, zero_grad."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    budgets = {}
    for step in range(first, first + steps):
        loss = model(input_ids, labels=input_ids).loss + orth_regularization(model)
        loss.backward()
        opt.step()
        if allocator is not None:
            budgets[step] = (allocator.step(model, step), sum(final_rank_pattern(model).values()))
        opt.zero_grad()
    return budgets


def test_fresh_adapter_is_a_no_op(input_ids):
    model = inject_adalora(tiny_llama(), AdaLoraConfig(total_step=10))
    torch.testing.assert_close(model(input_ids).logits, tiny_llama()(input_ids).logits, rtol=0, atol=0)
    layer = svd_layers(model)[0][1]
    assert layer.lora_A["default"].shape == (12, 32) and layer.lora_E["default"].shape == (12, 1)
    assert all(p.requires_grad == any(k in n for k in ("lora_A", "lora_B", "lora_E"))
               for n, p in model.named_parameters())


def test_forward_matches_formula():
    base = torch.nn.Linear(6, 5)
    layer = SVDLinear(base)
    layer.add_adapter("a", init_r=3, lora_alpha=7, init_lora_weights=False)
    A, E, B = layer.lora_A["a"], layer.lora_E["a"], layer.lora_B["a"]
    x = torch.randn(2, 6)
    expected = base(x) + x @ (A * E).T @ B.T * 7 / (3 + 1e-5)
    torch.testing.assert_close(layer(x), expected)
    merged = base.weight + layer.delta_weight("a")
    torch.testing.assert_close(x @ merged.T + base.bias, expected, rtol=1e-5, atol=1e-6)


def test_config_validation_and_peft_names():
    with pytest.raises(ConfigError, match="total_step"):
        AdaLoraConfig()
    with pytest.raises(ConfigError, match="tinit"):
        AdaLoraConfig(total_step=10, tinit=8, tfinal=2)
    with pytest.raises(ConfigError, match="target_r"):
        AdaLoraConfig(total_step=10, init_r=4, target_r=6)
    # beta2 0 (PEFT takes it): the uncertainty is the last step's; beta1 0 would make every uncertainty, so score, 0
    assert AdaLoraConfig(total_step=10, beta2=0.0).beta2 == 0.0
    with pytest.raises(ConfigError, match=r"beta1: must be in \(0, 1\), got 0\.0"):
        AdaLoraConfig(total_step=10, beta1=0.0)
    with pytest.raises(ConfigError, match=r"beta2: must be in \[0, 1\), got 1\.0"):
        AdaLoraConfig(total_step=10, beta2=1.0)
    theirs = peft.AdaLoraConfig(total_step=10, target_modules=["q_proj"]).to_dict()
    ours = AdaLoraConfig.from_peft_dict(json.loads(json.dumps(theirs, default=list)))
    assert (ours.init_r, ours.target_r, ours.beta1, ours.beta2, ours.orth_reg_weight, ours.lora_alpha) == \
           (12, 8, 0.85, 0.85, 0.5, 8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ours_loads_in_peft_with_equal_logits(arch, tmp_path, input_ids):
    build = BUILDERS[arch]
    model = inject_adalora(build(), _config())  # all weights random, nothing pruned
    ours = model(input_ids).logits
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is None
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)(input_ids).logits
    torch.testing.assert_close(theirs, ours, **TOL)
    assert not torch.allclose(ours, build()(input_ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruned_adapter_saves_rank_pattern_and_loads_in_peft_and_ours(arch, tmp_path, input_ids):
    build = BUILDERS[arch]
    model = inject_adalora(build(), _config())
    _train(model, 10, input_ids, RankAllocator(model))
    ranks = final_rank_pattern(model)
    assert sum(ranks.values()) == 2 * len(ranks)  # the target budget: target_r per layer on average
    ours = model(input_ids).logits
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()} == ranks
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    for path, layer in theirs.base_model.model.named_modules():
        if hasattr(layer, "lora_E") and "default" in layer.lora_E:
            assert layer.lora_E["default"].shape[0] == ranks[path]  # sliced to the kept triplets
    torch.testing.assert_close(theirs(input_ids).logits, ours, **TOL)
    reloaded = load_adapter(build(), tmp_path)
    torch.testing.assert_close(reloaded(input_ids).logits, ours, **TOL)
    save_adapter(reloaded, tmp_path / "again")  # a loaded pruned adapter re-saves the same pattern
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == \
        saved["rank_pattern"]


def peft_pruned(cfg, input_ids):
    """A tiny Llama with PEFT's AdaLoRA `cfg`, trained 10 SGD steps with PEFT's rank allocation (pruned by step 10)."""
    model = peft.get_peft_model(tiny_llama(), cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 11):
        model(input_ids, labels=input_ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return model


def test_peft_pruned_adapter_loads_in_ours(tmp_path, input_ids):
    cfg = peft.AdaLoraConfig(total_step=10, init_r=4, target_r=2, tinit=2, tfinal=3, lora_alpha=16,
                             target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = peft_pruned(cfg, input_ids)
    model.eval()
    theirs = model(input_ids).logits
    model.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and not all(all(v) for v in pattern.values())  # PEFT really pruned
    ours = load_adapter(tiny_llama(), tmp_path)
    assert final_rank_pattern(ours) == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    torch.testing.assert_close(ours(input_ids).logits, theirs, **TOL)



def test_an_adalora_file_with_use_dora_is_refused_as_peft_refuses_it(tmp_path):
    """PEFT's AdaLoRA has no DoRA and raises on use_dora; we ignored the field and loaded plain AdaLoRA, unsaid."""
    peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=[
        "q_proj"], init_lora_weights=False)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match="does not support DoRA"):
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora: True with peft_type ADALORA: AdaLoRA has "
                                         r"no DoRA \(PEFT refuses to load it too\); set use_dora to false, or give "
                                         r"a LORA adapter$"):
        load_adapter(tiny_llama(), tmp_path)

def _formula(step, init, target, tinit, tfinal, total):
    if step <= tinit:
        return init
    if step > total - tfinal:
        return target
    return int((init - target) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + target)


def test_budget_schedule_equals_cubic_formula_and_peft(input_ids):
    cfg = AdaLoraConfig(total_step=100, init_r=12, target_r=4, tinit=10, tfinal=20, deltaT=5)
    model = inject_adalora(tiny_llama(), cfg)
    allocator = RankAllocator(model)
    n = len(svd_layers(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(
            total_step=100, init_r=12, target_r=4, tinit=10, tfinal=20, deltaT=5, target_modules=cfg.target_modules
            or ["q_proj", "k_proj", "v_proj", "o_proj"]))
    theirs = PeftRankAllocator(peft_model.base_model.model, peft_model.peft_config["default"], "default")
    for step in (0, 1, 10, 11, 15, 37, 50, 79, 80, 81, 100):
        budget, mask = allocator.budget(step)
        assert budget == _formula(step, 12 * n, 4 * n, 10, 20, 100)
        assert (budget, mask) == theirs.budget_schedule(step)


def test_ranks_follow_the_budget_and_masked_triplets_stay_masked(input_ids):
    model = inject_adalora(tiny_llama(), _config(total_step=12, tinit=2, tfinal=4))
    allocator = RankAllocator(model)
    n = len(svd_layers(model))
    budgets = _train(model, 8, input_ids, allocator)  # steps 1..8: warm-up, budget phase, final allocation at 8
    for step, (budget, kept) in budgets.items():
        assert budget == _formula(step, 4 * n, 2 * n, 2, 4, 12)
        assert kept == budget  # deltaT=1: every step of the budget phase masks down to the budget
    pattern = {p: list(layer.rank_mask["default"]) for p, layer in svd_layers(model)}
    _train(model, 4, input_ids, allocator, first=9)  # the final phase: the optimizer regrows E, step re-masks
    for path, layer in svd_layers(model):
        assert layer.rank_mask["default"] == pattern[path]
        masked = ~torch.tensor(pattern[path])
        torch.testing.assert_close(layer.lora_E["default"][masked], torch.zeros(int(masked.sum()), 1), rtol=0, atol=0)
        assert (layer.lora_E["default"][~masked] != 0).all()


@pytest.mark.parametrize("total_step, tfinal", [(1, 0), (3, 2)])
def test_a_schedule_whose_first_step_is_its_last_still_prunes_to_target_r(input_ids, total_step, tfinal):
    """The final allocation at step total_step - tfinal = 1 had no scores yet and kept every triplet: now it ranks
    by that step's gradients, as the budget phase would have (the kept ranks are the scores' top target_r · n)."""
    model = inject_adalora(tiny_llama(), _config(total_step=total_step, tinit=0, tfinal=tfinal))
    allocator = RankAllocator(model)
    n = len(svd_layers(model))
    budgets = _train(model, total_step, input_ids, allocator)
    assert budgets[1] == (2 * n, 2 * n) and allocator.kept_rank() == 2 * n  # init_r 4 -> target_r 2 per layer
    assert all(kept == 2 * n for _, kept in budgets.values())


def test_the_final_allocation_comes_at_the_next_step_where_its_own_was_skipped(input_ids):
    """fp16: the loss scaler skips an update whose gradients overflowed, and the loop then does not call
    allocator.step; where that was step total_step - tfinal, the final allocation waited for the save (after the
    tfinal steps, a kept rank above target_r until then). The next step makes it, as step total_step - tfinal
    would have with the same scores (the reference: finalize on a copy of the allocator at that point)."""
    import copy

    model = inject_adalora(tiny_llama(), _config(total_step=12, tinit=6, tfinal=4))  # the final allocation at 8
    allocator = RankAllocator(model)
    n = len(svd_layers(model))
    budgets = _train(model, 7, input_ids, allocator)
    assert budgets[7][1] > 2 * n  # still above target_r · n = 2n
    # step 8's update skipped (its fp16 gradients overflowed): neither the optimizer nor allocator.step ran
    reference_model = copy.deepcopy(model)
    reference = copy.deepcopy(allocator)
    reference.model = reference_model
    reference.finalize(reference_model)
    assert _train(model, 1, input_ids, allocator, first=9) == {9: (2 * n, 2 * n)}
    assert allocator.finalized and allocator.kept_rank() == 2 * n
    assert ({p: layer.rank_mask["default"] for p, layer in svd_layers(model)}
            == {p: layer.rank_mask["default"] for p, layer in svd_layers(reference_model)})


def test_a_step_after_the_final_allocation_keeps_it_and_a_negative_step_is_refused(input_ids):
    """soak: step 1 given again after the final step reopened the schedule (budget 25, kept rank 16 -> 25 of
    target 16); a negative step answered with the full budget. After the final allocation every step keeps it."""
    model = inject_adalora(tiny_llama(), _config(total_step=6, tinit=0, tfinal=0))
    allocator = RankAllocator(model)
    n = len(svd_layers(model))
    _train(model, 6, input_ids, allocator)  # steps 1..6: the final allocation at 6
    pattern = {p: list(layer.rank_mask["default"]) for p, layer in svd_layers(model)}
    again = _train(model, 2, input_ids, allocator, first=1)  # steps 1, 2 given again
    assert again == {1: (2 * n, 2 * n), 2: (2 * n, 2 * n)}
    assert {p: list(layer.rank_mask["default"]) for p, layer in svd_layers(model)} == pattern
    for step in (-1, 2.5, True):
        with pytest.raises(ValueError) as e:
            allocator.step(model, step)
        assert str(e.value) == f"global_step: must be an integer ≥ 0 (the optimizer steps taken so far), got {step!r}"
    with pytest.raises(ValueError, match=r"got -5$"):
        allocator.budget(-5)


def test_allocator_needs_gradients(input_ids):
    model = inject_adalora(tiny_llama(), _config())
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        RankAllocator(model).step(model, 1)


def test_orth_regularization_equals_plain_formula():
    model = inject_adalora(tiny_llama(), _config(orth_reg_weight=0.3))
    norms = []
    for _, layer in svd_layers(model):
        A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
        norms.append(((A @ A.T - torch.eye(4)) ** 2).sum().sqrt())
        norms.append(((B.T @ B - torch.eye(4)) ** 2).sum().sqrt())
    torch.testing.assert_close(orth_regularization(model), 0.3 * sum(norms) / len(norms))


def test_merge_equals_unmerged_logits(input_ids):
    model = inject_adalora(tiny_gpt2(), _config())
    before = model(input_ids).logits
    merge(model)
    torch.testing.assert_close(model(input_ids).logits, before, rtol=1e-5, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(input_ids).logits, before, rtol=1e-5, atol=1e-5)


def test_rank_heatmap_png(tmp_path, input_ids):
    model = inject_adalora(tiny_llama(), _config())
    _train(model, 10, input_ids, RankAllocator(model))
    out = plot_rank_heatmap(model, tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out == tmp_path / "ranks.png"


def test_train_config_section_total_step_override_and_state_round_trip(input_ids):
    from loraforge.config import LoraConfig

    lora = LoraConfig(r=8, lora_alpha=32, target_modules=("q_proj", "v_proj"), lora_dropout=0.1)
    cfg = AdaLoraConfig.from_train_config(lora, {"init_r": 4, "target_r": 2, "tinit": 1, "total_step": 1000})
    assert (cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.init_r) == (32, 0.1, ("q_proj", "v_proj"), 4)
    with pytest.raises(ConfigError, match="adalora.init_r"):
        AdaLoraConfig.from_train_config(lora, {"init_r": "x", "total_step": 10})
    # lora: settings AdaLoRA would ignore are refused here too (a TrainConfig built in code, not from YAML)
    with pytest.raises(ConfigError) as e:
        AdaLoraConfig.from_train_config(LoraConfig(use_dora=True, modules_to_save=("lm_head",)), {"total_step": 10})
    assert e.value.problems == [
        "lora.use_dora: true is not supported with method: adalora (AdaLoRA trains its own SVD-shaped update, with "
        "no DoRA magnitude); remove lora.use_dora, or use method: dora",
        "lora.modules_to_save: ['lm_head'] is not supported with method: adalora (an AdaLoRA adapter trains and "
        "saves no whole modules); remove lora.modules_to_save, or use method: lora"]
    model = inject_adalora(tiny_llama(), _config(total_step=1, tinit=0, tfinal=0))  # total unknown at build time
    allocator = RankAllocator(model, total_step=10)
    assert allocator.config.total_step == 10 and model.lora_configs["default"].total_step == 10
    _train(model, 4, input_ids, allocator)
    state = json.loads(json.dumps(allocator.state()))
    fresh = RankAllocator(model)
    fresh.load_state(state)
    assert fresh.exp_avg_ipt.keys() == allocator.exp_avg_ipt.keys()
    for key, value in allocator.exp_avg_unc.items():
        torch.testing.assert_close(fresh.exp_avg_unc[key], value, rtol=0, atol=0)
    allocator.finalize(model)
    assert sum(final_rank_pattern(model).values()) == 2 * len(svd_layers(model))


def test_training_with_lora_alpha_zero_is_refused_and_init_r_gives_its_scale_with_the_saved_adapter_equal(
        tmp_path, input_ids):
    """PEFT scales an alpha-0 layer by init_r while training but by its kept rank once saved and loaded: trained
    pruned at alpha 0, the saved adapter's logits were up to 0.15 off the trained model's (Δ from the base 0.5)."""
    for section, name in (({"adalora": {"lora_alpha": 0}}, "adalora.lora_alpha"),
                          ({"lora": {"lora_alpha": 0}}, "lora.lora_alpha")):
        with pytest.raises(ConfigError, match=rf"{name}: must be positive to train with method: adalora, got 0"):
            TrainConfig(method="adalora", model={"name": "m"}, data={"train": "t.jsonl"}, **section)
    with pytest.raises(ValueError, match=r"inject with lora_alpha=4 \(init_r\)"):
        RankAllocator(inject_adalora(tiny_llama(), _config(lora_alpha=0)))
    torch.manual_seed(0)
    zero = inject_adalora(tiny_llama(), _config(lora_alpha=0))(input_ids).logits  # unpruned: alpha 0 means init_r
    torch.manual_seed(0)
    model = inject_adalora(tiny_llama(), _config(lora_alpha=4))
    torch.testing.assert_close(model(input_ids).logits, zero, rtol=0, atol=0)
    _train(model, 10, input_ids, RankAllocator(model))
    assert any(0 < r < 4 for r in final_rank_pattern(model).values())
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(theirs(input_ids).logits, model(input_ids).logits, **TOL)


def test_a_peft_file_without_target_r_and_an_init_r_below_8_loads_with_peft_logits(tmp_path, input_ids):
    """PEFT's default target_r (8) is not checked against the file's init_r; loraforge refused such a file with
    "target_r: must be in 1..init_r" (its default 8 against init_r 4). A pruned adapter loads with the shapes the
    file holds and PEFT's logits."""
    model = peft_pruned(peft.AdaLoraConfig(total_step=10, init_r=4, target_r=2, tinit=2, tfinal=3,
                                           target_modules=["q_proj", "v_proj"], init_lora_weights=False), input_ids)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    kept = ("peft_type", "rank_pattern", "target_modules", "init_r", "total_step")
    path.write_text(json.dumps({k: v for k, v in config.items() if k in kept}))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(input_ids).logits
    ours = load_adapter(tiny_llama(), tmp_path)
    assert ours.lora_configs["default"].target_r == 4  # PEFT's 8, at most init_r: no pruning left to do
    assert final_rank_pattern(ours) == {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()}
    torch.testing.assert_close(ours(input_ids).logits, theirs, **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("lora_alpha", [16, 0])
def test_an_adalora_adapter_as_lora_gives_peft_logits(arch, lora_alpha, tmp_path, input_ids):
    """load_adapter(as_lora=True), as the server loads AdaLoRA: plain LoRA layers, each of its kept rank, A ∘ E as
    lora_A and AdaLoRA's scaling (lora_alpha, or where it is 0 the kept rank, over init_r + 1e-5); a layer pruned to
    rank 0 left out. PEFT's logits for the pruned file (rank_pattern), in fp32."""
    build = BUILDERS[arch]
    model = inject_adalora(build(), _config(lora_alpha=lora_alpha))
    layers = svd_layers(model)
    with torch.no_grad():
        for i, (_, layer) in enumerate(layers):  # kept 0, 2, 2, 3, 2, 3, ... of init_r 4; E non-zero
            layer.rank_mask["default"] = [i > 0, i % 2 == 1, i > 1, False] if i else [False] * 4
            layer.lora_E["default"].normal_().masked_fill_(~torch.tensor(layer.rank_mask["default"]).view(-1, 1), 0)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)(input_ids).logits
    with regex_budget(0):  # no regex per layer (rank_pattern's took over the server's 2 s on a 160-layer base)
        ours = load_adapter(build(), tmp_path, as_lora=True)
    kinds = {type(layer).__name__: path for path, layer in lora_layers(ours)}
    assert list(kinds) == ["LoraLinear"] and layers[0][0] not in dict(lora_layers(ours))
    assert {path: layer.r["default"] for path, layer in lora_layers(ours)} == \
        {path: sum(layer.rank_mask["default"]) for path, layer in layers[1:]}
    torch.testing.assert_close(ours(input_ids).logits, theirs, **TOL)
    assert not torch.allclose(theirs, build()(input_ids).logits, **TOL)  # the adapter changes the output


def test_an_adalora_file_whose_ranks_differ_from_its_rank_pattern_is_refused_as_lora(tmp_path):
    model = inject_adalora(tiny_llama(), _config(target_modules=("q_proj",)))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.0.self_attn.q_proj.lora_E": [True, True, False, False]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as e:
        load_adapter(tiny_llama(), tmp_path, as_lora=True)
    assert str(e.value) == (f"{tmp_path}: model.layers.0.self_attn.q_proj: lora_A (4, 32) has rank 4, but "
                            f"adapter_config.json keeps 2 of that layer's init_r 4 triplets (rank_pattern): the two "
                            f"files are not of one adapter")
