"""A notebook's stop button (SIGINT: KeyboardInterrupt between two bytecodes) in the middle of merge, unmerge and
inject: the model is left as a rerun of the cell expects it, never half changed."""

import os
import signal
import warnings

import pytest
import torch
from torch import nn

from helpers import randomize, tiny_llama
from loraforge.config import ConfigError, LoraConfig
from loraforge.lora import adapters
from loraforge.lora.adapters import delete_adapter, load_adapter, save_adapter, set_adapter
from loraforge.lora.inject import inject, lora_layers
from loraforge.lora.layer import LoraLinear
from loraforge.lora.merge import merge, unmerge


def ctrl_c_after(owner, name: str, monkeypatch, nth: int = 3) -> None:
    """`owner.name` runs as before, and its nth call then sends this process SIGINT, as a press of the stop button
    while that call runs (a layer's ΔW computed, a merged weight copied in)."""
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize("dora, call, during", [
    (False, "merge", "_scaled_BA"), (False, "merge", "copy_"), (False, "unmerge", "_scaled_BA"),
    (False, "unmerge", "__isub__"), (True, "merge", "_scaled_BA"), (True, "unmerge", "_scaled_BA")])
def test_merge_or_unmerge_stopped_by_ctrl_c_and_run_again_gives_the_uninterrupted_model(dora, call, during,
                                                                                         monkeypatch, input_ids):
    """Stopped while it computed ΔW, unmerge() had already taken the adapter off the layer's merged list: every later
    unmerge() left ΔW in the base (outputs off by ~0.1 for good). Stopped right after it copied a merged weight in,
    merge() had not yet listed the adapter: run again, it added ΔW a second time."""
    model = randomize(inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_dora=dora)))
    base = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        reference = model(input_ids).logits  # the adapter unmerged; merged, the same outputs
    if call == "unmerge":
        merge(model)
    ctrl_c_after(LoraLinear if during == "_scaled_BA" else torch.Tensor, during, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        (merge if call == "merge" else unmerge)(model)
    monkeypatch.undo()
    (merge if call == "merge" else unmerge)(model)  # the cell run again

    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference, rtol=0, atol=1e-5)
    unmerge(model)
    for key, weight in model.state_dict().items():
        if "base_layer" in key:  # W + ΔW − ΔW: fp32 rounding of the sum only
            torch.testing.assert_close(weight, base[key], rtol=0, atol=1e-6)


def model_state(model) -> dict:
    """What a failed inject must leave as it found: every module's class, every parameter's values and
    requires_grad, which ones are one tensor (a tied head), and tie_word_embeddings."""
    return {"modules": [(path, type(m).__name__) for path, m in model.named_modules()],
            "params": {k: (p.detach().clone(), p.requires_grad) for k, p in model.named_parameters()},
            "shared": sorted(k for k, p in model.named_parameters(remove_duplicate=False)
                             if p is model.get_input_embeddings().weight),
            "tied": model.config.tie_word_embeddings, "adapters": dict(getattr(model, "lora_configs", {}))}


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("modules", "shared", "tied", "adapters"):
        assert a[key] == b[key], key
    assert a["params"].keys() == b["params"].keys()
    for key, (value, grad) in a["params"].items():
        assert grad == b["params"][key][1], key
        torch.testing.assert_close(value, b["params"][key][0], rtol=0, atol=0)


@pytest.mark.parametrize("init", [True, "pissa"])
def test_an_inject_stopped_midway_leaves_the_model_as_it_was_and_runs_again(init, monkeypatch):
    """Ctrl-C while the adapter's layers were being added (PiSSA's SVDs take minutes on a 7B) left them wrapped,
    and running the cell again was refused: "adapter 'default' already exists on this layer". Here the head is
    targeted too, on a tied model (inject unties it), so the tie must come back."""
    model = tiny_llama(tie_word_embeddings=True)
    model.lm_head.weight.requires_grad_(False)
    before = model_state(model)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=["q_proj", "v_proj", "lm_head"])
    ctrl_c_after(LoraLinear, "add_adapter", monkeypatch)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untie's
        inject(model, config)
    monkeypatch.undo()
    assert_same_state(model_state(model), before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject(model, config)  # the cell run again
    assert sorted(model.lora_configs) == ["default"] and len(lora_layers(model)) == 5


def test_a_modules_to_save_that_names_nothing_is_refused_without_touching_the_model():
    """The refusal came after every LoRA layer was added: fixed and run again, inject said "already exists"."""
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(ConfigError, match=r"modules_to_save: \['lm_haed'\] match no module"):
        inject(model, LoraConfig(r=4, modules_to_save=["lm_haed"]))
    assert_same_state(model_state(model), before)
    inject(model, LoraConfig(r=4, modules_to_save=["lm_head"]))
    assert sorted(model.lora_configs) == ["default"] and len(lora_layers(model)) == 8


def test_a_delete_stopped_midway_leaves_a_model_that_runs_and_the_next_delete_finishes_it(monkeypatch, input_ids):
    """Ctrl-C inside a layer's delete_adapter, its lora_A gone and the adapter still active: every forward raised
    KeyError: 'b' until the delete was run again."""
    model = inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8))
    randomize(inject(model, LoraConfig(r=2, lora_alpha=4), adapter_name="b"))
    set_adapter(model, "default")
    with torch.no_grad():
        reference = model(input_ids).logits  # "default" alone
    set_adapter(model, ["default", "b"])
    ctrl_c_after(nn.ModuleDict, "__delitem__", monkeypatch, nth=1)  # the first layer's lora_A["b"] deleted
    with pytest.raises(KeyboardInterrupt):
        delete_adapter(model, "b")
    monkeypatch.undo()
    with torch.no_grad():
        model(input_ids)  # runs: the half-deleted layer without "b", the others with it
    delete_adapter(model, "b")  # the cell run again
    assert all("b" not in layer.r and "b" not in layer.lora_A for _, layer in lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_a_load_stopped_after_its_weights_were_in_leaves_the_model_as_it_was(is_trainable, tmp_path, monkeypatch,
                                                                            input_ids):
    """Ctrl-C in load_adapter's last lines (switching to the new adapter, freezing, eval()) left it loaded but the
    model neither frozen nor switched back, and the rerun was refused: "adapter 'two' is already loaded"."""
    source = randomize(inject(tiny_llama(), LoraConfig(r=2, lora_alpha=4)), seed=5)
    save_adapter(source, tmp_path / "two")
    model = randomize(inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8))).train()
    before = model_state(model)
    with torch.no_grad():
        reference = model.eval()(input_ids).logits
    model.train()
    ctrl_c_after(adapters, "set_adapter", monkeypatch, nth=1)
    with pytest.raises(KeyboardInterrupt):
        load_adapter(model, tmp_path / "two", name="two", is_trainable=is_trainable)
    monkeypatch.undo()
    assert_same_state(model_state(model), before)
    assert model.training and all(layer.active_adapters == ["default"] for _, layer in lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids).logits, reference, rtol=0, atol=0)
    model.train()
    load_adapter(model, tmp_path / "two", name="two", is_trainable=is_trainable)  # the cell run again
    assert sorted(model.lora_configs) == ["default", "two"] and model.training == is_trainable
