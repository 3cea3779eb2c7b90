"""Builders the tests share: tiny randomly initialised transformers models made in code (seconds, no downloads).

Imported by test modules (`from helpers import tiny_llama`); conftest.py holds only fixtures.
"""

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from loraforge.lora.adapters import save_adapter
from loraforge.lora.inject import inject, lora_layers
from loraforge.training import loop

VOCAB = 128


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def opt_that_mixes_packed_rows(tmp_path: Path, tok) -> tuple[Path, Path]:
    """A tiny OPT saved with `tok` (OPT builds a plain causal mask whatever the position_ids: packed examples attend
    to each other), and instruction data whose answers run from 1 to 100 words (padded batches would be mostly
    padding, so data.packing auto would pack): (model folder, data file)."""
    base = tmp_path / "opt"
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=32, dropout=0.0)).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Count to {n}.", "input": "",
                                        "output": " ".join(map(str, range(n)))}) + "\n" for n in [1, 2, 3, 100] * 4))
    return base, data


def long_output(tmp_path: Path, size: int) -> Path:
    """A path of `size` bytes under tmp_path: folders of 200-byte names (each within NAME_MAX), a shorter last."""
    out, left = tmp_path, size - len(os.fsencode(tmp_path))
    while left > 0:
        out, left = out / ("d" * min(200, left - 1)), left - min(201, left)
    return out


def lr_at(schedule: str, lr: float, warmup: int, total: int, step: int) -> float:
    """The learning rate of update `step` (from 0), written out: training.warmup_steps' rule (step k < warmup:
    lr·(k+1)/(warmup+1)), then linear or half-cosine decay towards 0 at `total`, or constant."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / (total - warmup)
    return lr * {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "constant": 1.0}[schedule]


def _adapter_weights(model):
    """Every adapter's lora_A and lora_B weight, layer by layer."""
    for _, layer in lora_layers(model):
        for name in layer.r:
            yield from (layer.lora_A[name].weight, layer.lora_B[name].weight)


def randomize(model, seed=1):
    """Give every adapter weight non-zero values (a fresh B is zero, which would hide key mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in _adapter_weights(model):
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    return model


def perturb(model, seed=2):
    """Stand-in for training: move every adapter's A and B away from their initial values (PiSSA/OLoRA's too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in _adapter_weights(model):
            w.add_(torch.randn(w.shape, generator=g) * 0.05)
    return model


def full_forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from a full forward per step (no cache, batch 1): the reference for cached decoders."""
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], 1)
    return out


def save_adapters(base, root, configs: dict, seed: int):
    """Each config injected into its own copy of `base` (torch seed `seed` + its index) and saved under root/name."""
    for i, (name, config) in enumerate(configs.items()):
        model = copy.deepcopy(base)
        torch.manual_seed(seed + i)
        inject(model, config, name)
        save_adapter(model, root / name, name)
    return root


def output_and_grads(fn, inputs, target) -> list[torch.Tensor]:
    """[fn(*inputs), each input's gradient] of the loss Σ fn(*inputs) · target, summed in fp32 (bf16 outputs
    included); the inputs' earlier gradients are cleared first."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    (out.float() * target.float()).sum().backward()
    return [out.detach()] + [t.grad.clone() for t in inputs]


def packed_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool for packed rows' position ids (B, T): query i may attend to key j where both lie in the same
    sequence (a sequence starts wherever a position is not the previous one + 1) and j ≤ i."""
    seq = (torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    causal = torch.ones(positions.shape[1], positions.shape[1], dtype=torch.bool).tril()
    return (seq[:, :, None] == seq[:, None, :]) & causal


def kept_equals_recomputed(grads, attend, inputs, target, dtype) -> dict[bool, list[int]]:
    """Attention that recomputes its probabilities against the same attention keeping them: grads(run, inputs,
    target) of attend(*inputs, keep) for keep False and True (under bf16 autocast where dtype is bf16) must be the
    same bits. Returns, per keep, the numel of every tensor its autograd nodes saved."""
    results, saved = {}, {}
    for keep in (False, True):
        sizes = []

        def run(*args, keep=keep, sizes=sizes):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
                return attend(*args, keep)

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            results[keep] = grads(run, inputs, target)
        saved[keep] = sizes
    for a, b in zip(results[False], results[True]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    return saved


class Interrupt(Exception):
    """What stop_in_last_save raises in place of the last checkpoint save."""


def stop_in_last_save(cfg) -> None:
    """Train `cfg` (3 steps) and stop it in its last checkpoint save, like a kill: checkpoints 1 and 2 stay, and
    every step has been logged."""
    save = loop.save_checkpoint

    def save_or_stop(root, step, *args):
        if step == 3:
            raise Interrupt
        return save(root, step, *args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "save_checkpoint", save_or_stop)
        with pytest.raises(Interrupt):
            loop.train(cfg, progress=False)


def forbid_loading(monkeypatch, module) -> None:
    """`module`'s load_base fails the test: its refusals must come before the base model loads."""
    def load_base(*args, **kwargs):
        raise AssertionError("the base model was loaded before the refusal")

    monkeypatch.setattr(module, "load_base", load_base)


def env_when_base_loads(monkeypatch, module, start, names, error, given: dict | None = None) -> dict:
    """The values of environment variables `names` at the moment `start()` has `module`'s load_base load the model
    (stopped there with `error`, an exception `start` lets through); `given` set beforehand, the others unset."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in names} | (given or {}))
    seen = {}

    def load_base(*args, **kwargs):
        seen.update({name: os.environ.get(name) for name in names})
        raise error("stop here")

    monkeypatch.setattr(module, "load_base", load_base)
    with pytest.raises(error, match="stop here"):
        start()
    return seen


@contextlib.contextmanager
def default_recursion_limit():
    """Python's default recursion limit (1,000) for the block: a test of input nested too deeply to parse must not
    depend on what earlier tests left (a library that raised the limit made 3,000 levels parse: a random order
    of the suite failed). The limit is the process's: a server thread of the test runs under it too."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def assert_same_adapter(run, reference) -> None:
    """The adapters two training runs wrote (each output_dir's adapter/) hold the same tensors, bit for bit."""
    got, want = (load_file(f"{out}/adapter/adapter_model.safetensors") for out in (run, reference))
    assert got.keys() == want.keys(), run
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), (run, key)


@contextlib.contextmanager
def output_held_elsewhere(out: Path):
    """Another process holding `out` as a live run does (outputs.hold_output): yields its Popen, killed at the end."""
    hold = f"import time\nfrom loraforge.utils.outputs import hold_output\nwith hold_output({str(out)!r}):\n" \
           f"    print('held', flush=True)\n    time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()
