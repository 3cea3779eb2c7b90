"""A notebook's stop button (SIGINT: KeyboardInterrupt between two bytecodes) in the middle of merge, unmerge and
inject: the model is left as a rerun of the cell expects it, never half changed."""

import os
import signal

import pytest
import torch

from helpers import randomize, tiny_llama
from loraforge.lora.layer import LoraLinear
from loraforge.lora.merge import merge, unmerge
from loraforge.lora.inject import inject
from loraforge.config import LoraConfig


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
