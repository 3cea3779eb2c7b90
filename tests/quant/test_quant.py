"""QLoRA: stored bits, de-quantization, LoRA on a 4-bit base, merging, gradients, optimizers.

References: bitsandbytes' own dequantize functions, QLoRA's bits-per-weight formula, and plain PyTorch
formulas on the de-quantized weights. fp32 compute is used where a test wants equality, so the only
difference left is floating-point summation order.
"""

import copy
import json
import os
import re
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import loraforge.models
from helpers import tiny_llama
from loraforge.cli import main
from loraforge.lora.adapters import save_adapter
from loraforge.config import ConfigError, LoraConfig
from loraforge.utils.hf import set_submodule
from loraforge.lora.inject import inject, lora_layers
from loraforge.lora.layer import LoraLayer, LoraLinear
from loraforge.lora.merge import merge_and_unload
from loraforge.models import load_model, load_tokenizer
from loraforge.training.optim import optimizer_by_name
from loraforge.quant.bnb import (bits_per_weight_formula, dequantize, prepare_for_kbit_training, quantize_linear,
                                 quantize_model, requantize, stored_bits_per_weight, stored_bytes)

# A 1024×1024 weight has 2^20 values = 64 superblocks of 64·256 weights: every block is full, so the byte
# counts below are exact, not rounded up.
N_IN = N_OUT = 1024


def _linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(N_IN, N_OUT, bias=bias)


def tiny_llama64(**kw):
    # in_features must be a multiple of the 64-weight block for bnb's CPU 4-bit kernels (see quantize_linear)
    return tiny_llama(hidden_size=64, intermediate_size=128, **kw)


def _plain_copy(qmodel: nn.Module) -> nn.Module:
    """The same model with every bnb layer replaced by an nn.Linear holding its de-quantized weight (fp32)."""
    plain = copy.deepcopy(qmodel)
    for path, module in list(plain.named_modules()):
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dequantize(module))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_submodule(plain, path, linear)
    return plain


def _lora_config(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", "all-linear")
    kw.setdefault("init_lora_weights", False)  # non-zero B, so the adapter changes the output
    return LoraConfig(**kw)


def _copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    dst_layers = dict(lora_layers(dst))
    with torch.no_grad():
        for path, layer in lora_layers(src):
            for name in layer.r:
                dst_layers[path].lora_A[name].weight.copy_(layer.lora_A[name].weight)
                dst_layers[path].lora_B[name].weight.copy_(layer.lora_B[name].weight)


# --- stored bits ---

@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_stored_bytes_match_the_formula(double_quant, quant_type):
    layer = quantize_linear(_linear(), quant_type, torch.float32, double_quant)
    n = N_IN * N_OUT
    got = stored_bytes(layer.weight)
    assert got["codes"] == n // 2  # 4 bits per weight
    if double_quant:
        assert got["absmax"] == n // 64  # one uint8 absmax per block of 64
        assert got["nested_absmax"] == 4 * n // (64 * 256)  # one fp32 per 256 absmax
        assert got["tables"] == 4 * (16 + 256 + 1)  # NF4/FP4 code, 8-bit dynamic code, offset (fp32)
    else:
        assert got["absmax"] == 4 * n // 64  # one fp32 absmax per block
        assert got["tables"] == 4 * 16
    per_block_bits = 8 * (got["codes"] + got["absmax"] + got["nested_absmax"]) / n
    assert per_block_bits == bits_per_weight_formula(double_quant)  # exact: 4.126953125 or 4.5
    expected_total = bits_per_weight_formula(double_quant) + 8 * got["tables"] / n
    assert stored_bits_per_weight(nn.Sequential(layer)) == pytest.approx(expected_total, rel=1e-12)
    assert bits_per_weight_formula(True) == pytest.approx(4.127, abs=5e-4)


# --- de-quantization ---

@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_matches_bitsandbytes(double_quant, quant_type):
    layer = quantize_linear(_linear(), quant_type, torch.float32, double_quant)
    ref = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.testing.assert_close(dequantize(layer), ref, rtol=0, atol=0)  # the same products, bit for bit
    # and it is a 4-bit approximation of the original, not something else: NF4/FP4 relative error ~0.09/0.11
    original = _linear().weight
    assert (dequantize(layer) - original).norm() / original.norm() < 0.15


def test_dequantize_int8_matches_bitsandbytes():
    layer = quantize_linear(_linear(), "int8", torch.float32)
    ref = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    # bnb multiplies by a rounded 1/127, we divide by 127: one rounding apart (fp32 eps ~ 1.2e-7 relative)
    torch.testing.assert_close(dequantize(layer), ref, rtol=3e-7, atol=0)


def test_cpu_refuses_rows_that_split_a_block():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_linear(nn.Linear(32, 64), "nf4", device="cpu")
    assert type(quantize_linear(nn.Linear(32, 64), "int8", device="cpu")).__name__ == "Linear8bitLt"


def test_a_model_too_narrow_for_4_bits_on_cpu_is_refused_by_layer_before_any_is_quantized(tiny_dir):
    """The first layer, its width and the ways out, before any layer is replaced: worded for the Python call
    (soak: quantize_model(m, "nf4") was told "use --quantize int8 (model.quantization: int8)") or, loading a run's
    base (load_model, as train does), for its setting: a ConfigError, which the CLI prints in one line."""
    model = tiny_llama()  # hidden 32: q/k/v/o, gate and up read 32 features; down reads 64
    before = {name: type(m) for name, m in model.named_modules()}
    message = ("quantize 'fp4' on CPU needs every linear layer's in_features to be a multiple of 64 (bitsandbytes' "
               "CPU 4-bit kernels), but model.layers.0.self_attn.q_proj has in_features=32 (and 11 more layers); use "
               "'int8', leave the model unquantized, or quantize on a GPU (device='cuda')")
    with pytest.raises(ValueError) as e:
        quantize_model(model, "fp4", compute_dtype=torch.float32)
    assert str(e.value) == message
    assert {name: type(m) for name, m in model.named_modules()} == before  # nothing half-quantized
    with pytest.raises(ValueError) as e:
        requantize(model, "nf4")
    assert str(e.value) == message.replace("fp4", "nf4")
    assert {name: type(m) for name, m in model.named_modules()} == before
    with pytest.raises(ConfigError) as e:
        load_model(str(tiny_dir), dtype="fp32", quantize="nf4")
    assert e.value.problems == [
        "model.quantization: nf4 on CPU needs every linear layer's in_features to be a multiple of 64 (bitsandbytes' "
        "CPU 4-bit kernels), but model.layers.0.self_attn.q_proj has in_features=32 (and 11 more layers); use "
        "--quantize int8 (model.quantization: int8), leave quantization off (method lora), or run on a GPU"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_quantizing_onto_cuda_without_it_names_the_device():
    """soak: quantize_model(device="cuda") without CUDA was torch's bare AssertionError."""
    model = tiny_llama64()
    for call in (lambda: quantize_model(model, "nf4", device="cuda"), lambda: quantize_linear(_linear(), "nf4",
                                                                                             device="cuda:0")):
        with pytest.raises(ValueError, match=r"^device='cuda(:0)?': (this torch is built without CUDA|no CUDA GPU "
                                             r"is visible) \(torch [^)]+\); use device='cpu'$"):
            call()
    assert all(type(m) is not bnb.nn.Linear4bit for m in model.modules())


def test_the_cli_says_it_in_one_error_line_and_exits_2(tiny_dir, data_file, tmp_path, capsys):
    from loraforge.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data_file}, eval_fraction: 0}}\n"
                      f"training: {{max_steps: 1, warmup_steps: 0, precision: fp32}}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["train", str(config), "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.endswith("error: invalid config:\n  model.quantization: nf4 on CPU needs every linear layer's "
                        "in_features to be a multiple of 64 (bitsandbytes' CPU 4-bit kernels), but "
                        "model.layers.0.self_attn.q_proj has in_features=32 (and 11 more layers); use --quantize int8 "
                        "(model.quantization: int8), leave quantization off (method lora), or run on a GPU\n"), err


@pytest.mark.parametrize("command", ["generate", "eval", "serve", "ui", "merge"])
def test_a_command_without_a_config_words_the_width_refusal_for_its_flag_before_loading(command, tiny_dir, data_file,
                                                                                     tmp_path, capsys, monkeypatch):
    """Soak: `generate --quantize nf4` (and eval, serve, ui, merge) on a base narrower than 64 loaded it, then said
    "model.quantization: nf4 ...; use --quantize int8 (model.quantization: int8), leave quantization off (method
    lora), or run on a GPU": training's words, where these commands take no config and run on the CPU on any machine.
    Each names its flag and the two ways out, with the layer and width train's refusal gives, before the base loads."""
    adapter_dir = tmp_path / "adapter"
    save_adapter(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2)), adapter_dir)
    monkeypatch.setattr(loraforge.models, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    args = {"generate": ["generate", "hi", "--model", str(tiny_dir)],
            "eval": ["eval", str(data_file), "--model", str(tiny_dir)],
            "serve": ["serve", "--model", str(tiny_dir), "--port", "0"],
            "ui": ["ui", "--model", str(tiny_dir), "--runs", str(tmp_path), "--data-dir", str(tmp_path)],
            "merge": ["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "m")]}
    assert main([*args[command], "--quantize", "fp4"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("error: invalid arguments:\n  --quantize fp4 on CPU needs every linear layer's in_features to "
                        "be a multiple of 64 (bitsandbytes' CPU 4-bit kernels), but model.layers.0.self_attn.q_proj "
                        "has in_features=32 (and 11 more layers); use --quantize int8, or leave --quantize off for the "
                        "full-precision base\n"), err
    assert not (tmp_path / "m").exists()


def test_cpu_repacking_is_off_and_weights_stay_put():
    """bnb repacks a Linear4bit on AVX512-BF16 CPUs in eval/no-grad (lossy absmax → bf16); we turn it off."""
    layer = quantize_linear(_linear(), "nf4", torch.bfloat16).eval()
    before = dequantize(layer)
    with torch.no_grad():
        layer(torch.randn(2, N_IN, dtype=torch.bfloat16))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(dequantize(layer), before, rtol=0, atol=0)


# --- LoRA on a 4-bit base ---

def test_lora_on_4bit_layer_is_the_plain_formula():
    base = quantize_linear(_linear(), "nf4", torch.float32)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=8, lora_alpha=16, init_lora_weights=False)
    x = torch.randn(2, 5, N_IN)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    expected = x @ dequantize(base).T + base.bias + 2.0 * (x @ A.T) @ B.T
    # bnb's CPU path de-quantizes to fp32 and calls the same matmul: equal up to summation order (fp32 defaults)
    torch.testing.assert_close(layer(x), expected)


def test_qlora_model_equals_dequantized_model_with_the_same_lora(input_ids):
    qmodel = quantize_model(tiny_llama64(), "nf4", compute_dtype=torch.float32)
    plain = _plain_copy(qmodel)
    with torch.no_grad():
        fresh = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
        q_fresh = inject(copy.deepcopy(qmodel), fresh)  # B = 0: a fresh adapter leaves the 4-bit model unchanged
        torch.testing.assert_close(q_fresh(input_ids).logits, qmodel(input_ids).logits, rtol=0, atol=0)
        inject(qmodel, _lora_config())
        inject(plain, _lora_config())
        _copy_adapters(qmodel, plain)
        torch.testing.assert_close(qmodel(input_ids).logits, plain(input_ids).logits)


def test_bf16_compute_on_cpu_runs_and_matches_dequantized_bf16(input_ids):
    """The CPU 4-bit path in bf16: forward and backward run; logits match the de-quantized model in bf16."""
    qmodel = quantize_model(tiny_llama64().to(torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
    plain = _plain_copy(qmodel).to(torch.bfloat16)  # bnb also rounds the de-quantized weight to bf16
    inject(qmodel, _lora_config())
    inject(plain, _lora_config())
    for _, layer in lora_layers(plain):  # a 4-bit base gets fp32 adapters (layers.py); give the copy the same
        layer.lora_A.float(), layer.lora_B.float()
    _copy_adapters(qmodel, plain)
    q_logits, p_logits = qmodel(input_ids).logits, plain(input_ids).logits
    assert q_logits.dtype == torch.bfloat16
    # Same bf16 weights, same bf16 matmuls: the remaining difference is summation order inside the kernels,
    # within bf16's own resolution (assert_close's bf16 defaults: rtol 1.6e-2 = 2 ulp, atol 1e-5).
    torch.testing.assert_close(q_logits, p_logits)
    q_logits.float().sum().backward()
    assert all(p.grad is not None for n, p in qmodel.named_parameters() if p.requires_grad)


# --- merging into a 4-bit base ---

def test_merged_logits_match_4bit_plus_adapter(input_ids):
    # fp32 compute: merged = x·(deq(W) + s·BA)ᵀ, unmerged = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ: the same sum in another
    # order. Hidden size 32 and |logits| ~ 1: a few fp32 ulps (1e-7) × 2 layers; rtol/atol 1e-5 leaves room.
    qmodel = inject(quantize_model(tiny_llama64(), "nf4", compute_dtype=torch.float32), _lora_config())
    with torch.no_grad():
        expected = qmodel(input_ids).logits
        merged = merge_and_unload(qmodel)
        assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
        torch.testing.assert_close(merged(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_bf16_error_is_within_bf16_and_quantization_error(input_ids, seed):
    # In bf16 the merge rounds deq(W) + ΔW to bf16 once per weight (relative 2^-9), and the merged model, like the
    # 4-bit model run in bf16, rounds every activation. By the triangle inequality through the fp32 4-bit model:
    # |merged - q16| <= |merged - q32| + |q32 - q16| <= weight rounding + 2 × the bf16 activation noise, where the
    # weight rounding is measured as the fp32 merged model with its weights rounded to bf16 (computed in fp32).
    # An earlier bound, 2 × the activation noise alone, held on a CPU with native bf16 with little room (seed 2:
    # 1.95×) and failed on an AVX2-only CPU, whose emulated bf16 matmuls round less (2.13×). Also, the issue's
    # wording: within the quantization error (4-bit vs full precision, same adapter).
    full = inject(tiny_llama64(seed=seed), _lora_config())
    q32 = inject(quantize_model(tiny_llama64(seed=seed), "nf4", compute_dtype=torch.float32), _lora_config())
    q16 = inject(quantize_model(tiny_llama64(seed=seed).to(torch.bfloat16), "nf4", compute_dtype=torch.bfloat16),
                 _lora_config())
    _copy_adapters(full, q32)
    _copy_adapters(full, q16)
    with torch.no_grad():
        reference, logits32, logits16 = full(input_ids).logits, q32(input_ids).logits, q16(input_ids).logits.float()
        merged = merge_and_unload(q16)(input_ids).logits.float()
        rounded = merge_and_unload(q32)
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        weight_rounding = (rounded(input_ids).logits - logits32).abs().max()
    quant_error = (logits32 - reference).abs().max()
    bf16_noise = (logits16 - logits32).abs().max()
    merge_error = (merged - logits16).abs().max()
    # measured (merge, weight rounding, noise): seed 2 0.0445, 0.0166, 0.0228 native bf16; 0.0439, 0.0166, 0.0206 AVX2
    assert 0 < merge_error <= weight_rounding + 2 * bf16_noise, (merge_error, weight_rounding, bf16_noise)
    assert merge_error <= quant_error, (merge_error, quant_error)


def test_requantize_is_explicit_and_reports_the_error(input_ids):
    qmodel = inject(quantize_model(tiny_llama64(), "nf4", compute_dtype=torch.float32), _lora_config())
    merged = merge_and_unload(qmodel)
    report = requantize(merged, "nf4", input_ids=input_ids)
    assert sum(type(m).__name__ == "Linear4bit" for m in merged.modules()) == report.layers == 14  # 7 per layer
    assert 0 < report.weight_rel_error_mean <= report.weight_rel_error_max < 0.2  # NF4 on N(0, 0.02): ~0.1
    assert report.logits_max_abs_diff > 0 and report.logits_rel_error > 0
    assert "re-quantized 14 linear layers to nf4" in str(report)


# --- training ---

def _loss(model, input_ids):
    return model(input_ids, labels=input_ids).loss


def test_gradients_reach_only_the_adapters(input_ids):
    def build(checkpointing):
        torch.manual_seed(0)
        model = quantize_model(tiny_llama64(), "nf4", compute_dtype=torch.float32)
        prepare_for_kbit_training(model, gradient_checkpointing=checkpointing)
        inject(model, _lora_config())
        return model.train()

    model = build(True)
    assert model.is_activation_checkpointing
    assert all(p.dtype == torch.float32 for p in model.parameters() if type(p).__name__ != "Params4bit")
    _loss(model, input_ids).backward()
    adapter_params = {id(p) for m in model.modules() if isinstance(m, LoraLayer)
                      for attr in ("lora_A", "lora_B") for p in getattr(m, attr).parameters()}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == adapter_params
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)

    plain = build(False)  # gradient checkpointing recomputes, it must not change the gradients
    _copy_adapters(model, plain)
    _loss(plain, input_ids).backward()
    for (path, a), (_, b) in zip(lora_layers(model), lora_layers(plain)):
        torch.testing.assert_close(a.lora_A["default"].weight.grad, b.lora_A["default"].weight.grad)
        torch.testing.assert_close(a.lora_B["default"].weight.grad, b.lora_B["default"].weight.grad)


def test_optimizers_on_cpu(capsys):
    p = nn.Parameter(torch.randn(64, 128))  # ≥ 4096 values: bnb keeps 8-bit state only for those
    opt = optimizer_by_name("adamw_8bit", [p], lr=1e-3)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8 and not torch.equal(p, before)
    if not torch.cuda.is_available():
        first = optimizer_by_name("paged_adamw", [p], lr=1e-3)
        optimizer_by_name("paged_adamw_8bit", [p], lr=1e-3)
        printed = capsys.readouterr().out
        assert isinstance(first, torch.optim.AdamW) or "paging needs CUDA" in printed
    with pytest.raises(ValueError, match="adamw_8bit"):
        optimizer_by_name("adam8", [p], lr=1e-3)


def test_load_quantized_keeps_embeddings_norms_and_head(tmp_path):
    from loraforge.models import load_model

    tiny_llama64().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="bf16", quantize="nf4")
    kinds = {type(m).__name__ for m in model.model.layers.modules()}
    assert "Linear4bit" in kinds and "Linear" not in kinds
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    state = model.model.layers[0].mlp.up_proj.weight.quant_state
    assert (state.blocksize, state.nested, state.quant_type) == (64, True, "nf4")
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="nf4"):
        load_model(str(tmp_path), quantize="nf3")


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_the_quantized_base_is_the_same_whatever_the_compute_dtype(tmp_path, quant_type):
    """An fp32 checkpoint loaded for a bf16 run and for `merge --quantize` (fp32): the same codes and scales, the
    same de-quantized weights (the bug: quantized from the weights cast to each compute dtype, 277 of 36,864
    packed bytes of a tiny model differed, and a bf16 run's adapter merged 0.025 off in the logits)."""
    from loraforge.models import load_model

    tiny_llama64().save_pretrained(tmp_path)
    fp32, bf16 = (load_model(str(tmp_path), dtype=d, quantize=quant_type) for d in ("fp32", "bf16"))
    for a, b in zip(fp32.model.layers.modules(), bf16.model.layers.modules()):
        if type(a).__name__ in ("Linear4bit", "Linear8bitLt"):
            assert torch.equal(a.weight.data, b.weight.data)  # packed codes / int8 values
            torch.testing.assert_close(dequantize(a), dequantize(b), rtol=0, atol=0)
    assert fp32.model.layers[0].mlp.up_proj(torch.ones(1, 64)).dtype == torch.float32  # each computes in its own
    assert bf16.model.layers[0].mlp.up_proj(torch.ones(1, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_prepare_bf16_4bit_model_trains(input_ids):
    """fp32 norms alone would feed fp32 hidden states to a bf16 lm_head and fail; prepare casts it too."""
    model = quantize_model(tiny_llama64().to(torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    assert all(p.dtype == torch.float32 for p in model.parameters() if type(p).__name__ != "Params4bit")
    inject(model, _lora_config())
    _loss(model.train(), input_ids).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_prepare_after_inject_is_refused_naming_the_order():
    """soak: prepare_for_kbit_training after inject froze the adapter without a word (trainable 1,792 -> 0)."""
    model = inject(quantize_model(tiny_llama64(), "nf4", compute_dtype=torch.float32), _lora_config())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"^the model has LoRA layers: prepare_for_kbit_training freezes every "
                                         r"parameter.*quantize_model\(model, \.\.\.\), then "
                                         r"prepare_for_kbit_training\(model\), then inject\(model, config\)$"):
        prepare_for_kbit_training(model, gradient_checkpointing=False)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable != set()


def test_importing_bitsandbytes_keeps_its_kernel_hub_notice_out():
    """On a CPU with AVX-512 BF16, bitsandbytes' first import tries to fetch a matmul kernel from the Hugging Face
    Hub and logs 'Failed to load CPU gemm_4bit_forward from kernels-community ...' when it cannot (every `train
    --quantize nf4` printed it). A fresh interpreter that quantizes a layer and builds an 8-bit optimizer through
    loraforge writes nothing about it; its own filter, applied to a record of that text, drops it, and passes
    others (the same check on CPUs where bitsandbytes never logs it)."""
    import logging
    import subprocess
    import sys

    from loraforge.quant.bnb import _NoKernelHubNotice

    code = ("import torch\n"
            "from loraforge.quant.bnb import quantize_linear\n"
            "from loraforge.training.optim import optimizer_by_name\n"
            "layer = quantize_linear(torch.nn.Linear(64, 64), 'nf4')\n"
            "optimizer_by_name('adamw_8bit', [torch.nn.Parameter(torch.zeros(64, 64))], 1e-3, 0.0, (0.9, 0.999))\n"
            "print('quantized', type(layer).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "quantized Linear4bit"
    assert "kernels-community" not in proc.stderr and "gemm_4bit_forward" not in proc.stderr, proc.stderr[-2000:]

    def record(msg):
        return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 1, msg, None, None)

    notice = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
              "`pip install kernels`")
    assert not _NoKernelHubNotice().filter(record(notice % "offline"))
    assert _NoKernelHubNotice().filter(record("some other warning"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_a_quantized_load_keeps_no_mapping_of_the_checkpoint_file(tmp_path):
    """transformers loads a checkpoint in its own dtype as views of the memory-mapped safetensors file: the
    embeddings and norms that stay in float kept the whole file mapped, with the pages quantizing read still
    resident (+405 MB of RSS for the built-in model's 538 MB file over a 160 MB quantized model). After
    load_quantized the file is mapped nowhere in the process, and the model computes what the same quantization of
    the model in memory computes."""
    from loraforge.quant.bnb import load_quantized

    source = tiny_llama64(tie_word_embeddings=True)
    source.save_pretrained(tmp_path)  # fp32 safetensors: loaded in fp32 below, i.e. as views of the mapping
    weights = str(tmp_path / "model.safetensors")
    model = load_quantized(str(tmp_path), "nf4", compute_dtype=torch.float32)
    with open("/proc/self/maps") as f:
        mapped = [line for line in f if line.rstrip().endswith(weights)]
    assert mapped == []
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied
    reference = quantize_model(copy.deepcopy(source), "nf4", torch.float32).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_the_int8_matmul_cast_warning_is_said_once_per_dtype():
    """bitsandbytes' int8 matmul logs 'MatMul8bitLt: inputs will be cast from <dtype> to float16 during
    quantization' on every call in eval mode: `train --quantize int8` printed 2,940 such lines in the demo's 6 steps
    (its held-out pass). Once
    loraforge has imported bitsandbytes, each distinct line is said once: 10 calls with fp32 inputs and 10 with bf16
    give the 2 lines, as many as the distinct input dtypes."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from loraforge.quant.bnb import quantize_linear\n"
            "layer = quantize_linear(torch.nn.Linear(64, 64), 'int8').eval()  # as in held-out evaluation\n"
            "with torch.no_grad():\n"
            "    for dtype in (torch.float32, torch.bfloat16):\n"
            "        for _ in range(10):\n"
            "            layer(torch.randn(3, 64, dtype=dtype))\n"
            "print('ran')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ran", proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("MatMul8bitLt:")]
    assert lines == ["MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
                     "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization"]


def test_without_bitsandbytes_the_setting_that_needs_it_is_named(tmp_path):
    """bitsandbytes is the optional `quant` extra: without it, `train --quantize nf4` and training.optimizer
    adamw_8bit ended in a ModuleNotFoundError traceback. In an interpreter where importing bitsandbytes fails as a
    missing package does, each is a ConfigError naming its setting and the install line."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "bitsandbytes"
    blocker.mkdir()
    (blocker / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'bitsandbytes'\", name='bitsandbytes')\n")
    code = ("import torch\n"
            "from loraforge.config import ConfigError\n"
            "from loraforge.quant.bnb import quantize_linear\n"
            "from loraforge.training.optim import optimizer_by_name\n"
            "for call in (lambda: quantize_linear(torch.nn.Linear(64, 64), 'nf4'),\n"
            "             lambda: optimizer_by_name('adamw_8bit', [torch.nn.Parameter(torch.zeros(2))], 1e-3)):\n"
            "    try:\n"
            "        call()\n"
            "    except ConfigError as e:\n"
            "        print(e.problems[0])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    install = ("needs bitsandbytes, which is not installed here: pip install 'loraforge[quant]' "
               "(or pip install bitsandbytes)")
    assert proc.stdout.splitlines() == [f"model.quantization (--quantize): nf4 {install}",
                                        f"training.optimizer: adamw_8bit {install}"]


def test_a_run_that_needs_bitsandbytes_without_it_is_refused_before_anything_loads(tiny_dir, data_file, tmp_path,
                                                                                   monkeypatch, capsys):
    """Soak (packaging, a wheel installed without the quant extra): `loraforge train` of a QLoRA config and
    `loraforge demo --quantize nf4` printed the precision line and loaded the whole base (the built-in model 15 s; a
    hub model its download) before saying bitsandbytes was missing. Now the settings that need it are checked first
    (a None in sys.modules hides the installed package from importlib.util.find_spec, as an absent one is)."""
    from loraforge.cli import main
    from loraforge.studies import demo
    from loraforge.training import loop

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for module, name in ((loop, "load_model"), (loop, "load_tokenizer"), (demo, "load_base")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a model or tokenizer loaded before the refusal"))
    config = tmp_path / "qlora.yaml"
    config.write_text(f"model: {{name: {tiny_dir}}}\nmethod: qlora\ndata: {{train: {data_file}}}\n"
                      f"training: {{optimizer: adamw_8bit}}\noutput_dir: {tmp_path / 'out'}\n")
    install = ("needs bitsandbytes, which is not installed here: pip install 'loraforge[quant]' "
               "(or pip install bitsandbytes)")
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr() == ("", f"error: invalid config:\n  model.quantization (--quantize): nf4 {install}\n"
                                       f"  training.optimizer: adamw_8bit {install}\n")
    assert main(["demo", "--quantize", "int8", "--out", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr() == ("", f"error: invalid config:\n  model.quantization (--quantize): int8 {install}\n")


_LOAD_PEAK = """
import sys
from loraforge.models import load_model
def status(field):  # kB: this process's own memory (ru_maxrss keeps the high-water mark of the forking parent's)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
load_model(sys.argv[2], "fp32", quantize="nf4")  # a tiny model first: the imports' own memory would hide the load's
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on
before = status("VmRSS:")
model = load_model(sys.argv[1], "fp32", quantize="nf4")
print((status("VmHWM:") - before) * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads VmHWM (Linux)")
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_a_quantized_load_never_holds_the_whole_model_in_full_precision(tmp_path, stored):
    """soak: load_model(..., quantize="nf4") loaded the whole checkpoint in the compute dtype, then quantized it:
    a 4-bit fp32-compute run on a 580 MB fp32 checkpoint peaked at 1.42 GB resident, above the unquantized run's
    1.14 GB (a bf16 checkpoint: the load peaked as high as the unquantized fp32 load). The model now loads in the
    dtype its file stores, each layer is quantized from there, freed, and the file's pages it read dropped: the
    load's peak growth stays under 3/4 of the fp32 model's size (measured: 33 and 37 MB of 65, against 99 and 97
    before), and the model is the one loading in fp32 and quantizing gives, logit for logit."""
    source = tiny_llama(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8)
    source.to(stored).save_pretrained(tmp_path / "model")
    tiny_llama64().save_pretrained(tmp_path / "tiny")
    fp32_bytes = sum(p.numel() * 4 for p in source.parameters())
    proc = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(tmp_path / "model"), str(tmp_path / "tiny")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    growth = int(proc.stdout.split()[-1])
    assert growth < 0.75 * fp32_bytes, f"the load grew {growth / 2**20:.0f} MB, fp32 is {fp32_bytes / 2**20:.0f} MB"
    ids = torch.randint(0, 128, (2, 9))
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32), "nf4",
                               torch.float32).eval()  # what loading in fp32 first gave
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "model"), "fp32", quantize="nf4")(ids).logits,
                                   reference(ids).logits, rtol=0, atol=0)


def test_eval_of_a_qlora_adapter_over_its_4bit_base_gives_the_runs_own_held_out_perplexity(tmp_path, data_file, capsys):
    """soak: `eval` and `generate` had no --quantize: a QLoRA adapter could only be scored over the full-precision
    base, which it never trained on (on a 64-wide Llama after 3 steps: mean token loss 10.2870 against the run's
    10.2880), and nothing said so. `eval --quantize nf4` loads the base as the run did and prints the mean token
    loss the run's own held-out evaluation wrote into metrics.jsonl; without it, another number."""
    tok = load_tokenizer("smollm2-135m")
    base = tmp_path / "base"
    tiny_llama64(vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: {base}}}\nmethod: qlora\nlora: {{target_modules: all-linear}}\n"
                      f"data: {{train: {data_file}, eval: {data_file}, max_seq_len: 64}}\n"
                      f"training: {{max_steps: 3, eval_every: 3, lr: 1.0e-2, batch_size: 4, precision: fp32}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [r for r in rows if "eval_loss" in r][-1]["eval_loss"]
    capsys.readouterr()
    args = ["eval", str(data_file), "--model", str(base), "--adapter", str(tmp_path / "run" / "adapter"),
            "--precision", "fp32", "--max-new-tokens", "1"]

    def mean_token_loss(extra):
        assert main([*args, *extra]) == 0
        return float(re.search(r"\(mean token loss ([0-9.]+) over 40 examples\)", capsys.readouterr().out)[1])

    assert mean_token_loss(["--quantize", "nf4"]) == pytest.approx(expected, abs=1e-4)  # batches sum in their order
    assert abs(mean_token_loss([]) - expected) > 5e-4  # the full-precision base: another model
    assert main([*args, "--quantize", "nf5"]) == 2
    assert capsys.readouterr().err.endswith("--quantize 'nf5': use one of nf4, fp4, int8 (the one a QLoRA adapter "
                                            "trained over), or leave it out for the full-precision base\n")
