"""A half-precision merge is round(W0 + Σ w·s·B·A), rounded once, against the plain formula in float64; the svd
combination's warning says how much of ΔW it drops for any size of weights."""

import copy
import json
import re
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import tiny_llama
from loraforge.config import LoraConfig
from loraforge.lora.adapters import AdapterError, load_adapter, save_adapter
from loraforge.lora.inject import inject, lora_layers
from loraforge.lora import merge
from loraforge.lora.merge import add_weighted_adapter, export_merged

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _dyadic_adapter(base_dir, path, seed: int, r: int) -> None:
    """An adapter whose A is k/4096 (12 bits: rounded in bf16 and fp16) and B k/64: with scales and weights of
    few bits, ΔW is exact in fp32 (float64's answer, whatever the order of the sums), so round(W0 + ΔW) is one
    tensor to compare with."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # A and B saved in fp32
    inject(model, LoraConfig(r=r, lora_alpha=4 * r))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(torch.randint(-4095, 4096, A.shape, generator=g) / 4096)
            B.copy_(torch.randint(-63, 64, B.shape, generator=g) / 64)
    save_adapter(model, path)


def _plain_merge(base_dir, adapters, weights) -> dict[str, torch.Tensor]:
    """W0 + Σ w·(lora_alpha / r)·B·A in float64, from the files alone."""
    merged = {k: v.double() for k, v in load_file(base_dir / "model.safetensors").items()}
    for adapter, w in zip(adapters, weights):
        config = json.loads((adapter / "adapter_config.json").read_text())
        tensors = load_file(adapter / "adapter_model.safetensors")
        for key in (k for k in tensors if k.endswith("lora_A.weight")):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = tensors[key.replace("lora_A", "lora_B")].double()
            merged[module + ".weight"] += w * config["lora_alpha"] / config["r"] * (B @ tensors[key].double())
    return merged


@pytest.fixture(scope="module")
def half_bases(tiny_dir, tmp_path_factory):
    """The tiny model stored in bf16 and in fp16 (its config says so), with its tokenizer."""
    root = tmp_path_factory.mktemp("half")
    for name, dtype in HALF.items():
        AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype).save_pretrained(root / name)
        for f in tiny_dir.glob("*token*"):
            (root / name / f.name).write_bytes(f.read_bytes())
    return root


@pytest.mark.parametrize("weights", [[1.0], [0.75, -0.375]])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_half_precision_base_merges_in_fp32_and_rounds_once(dtype, weights, half_bases, tmp_path):
    """A base stored in bf16/fp16 merged to the same --dtype was loaded in it: A and B were cast to it and ΔW
    built in it, so W0 + ΔW was rounded twice (half of one adapter's merged elements off by a rounding)."""
    base = half_bases / dtype
    adapters = [tmp_path / f"a{i}" for i in range(len(weights))]
    for i, path in enumerate(adapters):
        _dyadic_adapter(base, path, seed=i, r=2 + 2 * i)
    out = export_merged(str(base), [str(a) for a in adapters], tmp_path / "out", dtype=dtype,
                        weights=None if weights == [1.0] else weights)
    ours, want = load_file(out / "model.safetensors"), _plain_merge(base, adapters, weights)
    assert ours.keys() == want.keys()
    for key in want:
        assert ours[key].dtype == HALF[dtype]
        assert torch.equal(ours[key], want[key].to(HALF[dtype])), key


def test_an_fp16_base_whose_merge_overflows_names_the_range_not_the_adapter(half_bases, tmp_path):
    """Finite adapter weights whose merge passes ±65504: from an fp16-stored base the error said the adapter had
    "NaN/inf weights" (the sum overflowed); it is the message an fp32-stored base gives."""
    base = half_bases / "fp16"
    model = inject(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A["default"].weight.fill_(200.0)
            layer.lora_B["default"].weight.fill_(200.0)  # ΔW = 16 / 2 · 200 · 200 · 2 = 640,000
    save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        export_merged(str(base), [str(tmp_path / "a")], tmp_path / "out", dtype="fp16")
    assert re.fullmatch(rf"cannot merge into --dtype fp16: adapter {re.escape(str(tmp_path / 'a'))}: the merged "
                        r"weight model\.layers\.0\.self_attn\.q_proj\.weight passes float16's range \(\|W\| up to "
                        r"6\.4\d*e\+05\); merge in fp32 or bf16", str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()


def _one_layer_adapters(tmp_path):
    """Two rank-4 adapters on one layer's q_proj (PEFT-made, random): their sum has rank 8."""
    base = tiny_llama()
    for i, name in enumerate(("x", "y")):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                          layers_to_transform=[1]))
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in (p for p in model.parameters() if p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_pretrained(tmp_path / name)
    return base


@pytest.mark.parametrize("weights", [[0.7, -0.3], [7e19, -3e19], [7e-21, -3e-21]])
def test_the_svd_warning_gives_the_dropped_energy_for_any_size_of_weights(weights, tmp_path):
    """σ² overflowed fp32 for weights near 1e20 and underflowed near 1e-20: the warning (1.5% dropped) was gone."""
    model = _one_layer_adapters(tmp_path)
    load_adapter(model, tmp_path / "x", "x")
    load_adapter(model, tmp_path / "y", "y")
    want = _plain_merge_delta(tmp_path, weights)
    S = torch.linalg.svdvals(want / want.abs().max())  # float64, scaled: any weights
    dropped = (S[4:].square().sum() / S.square().sum()).item()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_weighted_adapter(model, ["x", "y"], weights, "svd", combination_type="svd")
    texts = [str(w.message) for w in caught if "svd_rank" in str(w.message)]
    assert len(texts) == 1, [str(w.message) for w in caught]
    found = re.fullmatch(r"svd_rank 4 is below the rank of the combined ΔW in 1 layer: up to ([0-9.]+)% of its "
                         r"energy is dropped \(model\.layers\.1\.self_attn\.q_proj\); .*", texts[0])
    assert found, texts[0]
    assert abs(float(found.group(1)) / 100 - dropped) <= 0.00005 + 1e-6, (found.group(1), dropped)  # 2 decimals


def _plain_merge_delta(root, weights) -> torch.Tensor:
    """Σ w·s·B·A of the adapters x and y (float64)."""
    total = 0
    for name, w in zip(("x", "y"), weights):
        tensors = load_file(root / name / "adapter_model.safetensors")
        A = next(v for k, v in tensors.items() if k.endswith("lora_A.weight")).double()
        B = next(v for k, v in tensors.items() if k.endswith("lora_B.weight")).double()
        total = total + w * 2.0 * (B @ A)  # lora_alpha 8 / r 4
    return total


@pytest.mark.parametrize("case", ["one", "two-weighted", "dora"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_half_base_loads_in_its_dtype_and_merges_a_layer_at_a_time_bit_equal(case, dtype, half_bases, tmp_path,
                                                                                 monkeypatch):
    """A base stored in bf16 was loaded whole in fp32 for the merge (2× its size in memory). It loads in bf16 now,
    each layer merged in fp32 and cast back: the export is bit for bit the whole-fp32 path's (random adapters, so
    any other order of the sums or a rounding of A or B would show), DoRA's rescaled rows included."""
    base = half_bases / dtype
    adapters = []
    for i in range(2 if case == "two-weighted" else 1):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        inject(model, LoraConfig(r=4, lora_alpha=7, use_dora=case == "dora", target_modules="all-linear"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.05)
        save_adapter(model, tmp_path / f"a{i}")
        adapters.append(str(tmp_path / f"a{i}"))
    weights = [0.7, -0.3] if case == "two-weighted" else None
    loads = []
    load_base = merge.load_base
    monkeypatch.setattr(merge, "load_base", lambda *a, **kw: loads.append(kw["dtype"]) or load_base(*a, **kw))
    ours = load_file(export_merged(str(base), adapters, tmp_path / "ours", dtype=dtype, weights=weights)
                     / "model.safetensors")
    monkeypatch.setattr(merge, "_load_dtype", lambda *a: "fp32")  # the whole model in fp32, cast at the end
    want = load_file(export_merged(str(base), adapters, tmp_path / "want", dtype=dtype, weights=weights)
                     / "model.safetensors")
    assert loads == [dtype, "fp32"]
    assert ours.keys() == want.keys()
    for key in want:
        assert ours[key].dtype == want[key].dtype == HALF[dtype]
        assert torch.equal(ours[key], want[key]), key


@pytest.mark.parametrize("says, holds", [("bfloat16", "fp32"), ("float32", "bf16")])
def test_a_base_whose_config_misstates_its_dtype_loads_in_the_stored_one(says, holds, tiny_dir, half_bases, tmp_path,
                                                                          monkeypatch):
    """config.json saying bfloat16 over fp32 weights: merge --dtype bf16 loaded the base in bf16 (its config's
    dtype), rounding W0 before the merge, so 8 of 20 tensors were round(round(W0) + ΔW). The safetensors header
    decides now: fp32 weights load in fp32 (rounded once, at the end); bf16 weights under a float32 config load in
    bf16 (a layer at a time, never the whole model in fp32), both the plain merge rounded once."""
    source = tiny_dir if holds == "fp32" else half_bases / "bf16"
    base = tmp_path / "base"
    base.mkdir()
    for f in source.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = says
    (base / "config.json").write_text(json.dumps(config))
    _dyadic_adapter(base, tmp_path / "a", seed=0, r=2)
    loads = []
    load_base = merge.load_base
    monkeypatch.setattr(merge, "load_base", lambda *a, **kw: loads.append(kw["dtype"]) or load_base(*a, **kw))
    ours = load_file(export_merged(str(base), [str(tmp_path / "a")], tmp_path / "out", dtype="bf16")
                     / "model.safetensors")
    assert loads == [holds]
    want = _plain_merge(base, [tmp_path / "a"], [1.0])
    assert ours.keys() == want.keys()
    for key in want:
        assert torch.equal(ours[key], want[key].to(torch.bfloat16)), key
