"""The CUDA paths against the CPU fp32 reference: precision rule, LoRA layer, fused kernel, training in bf16 and
fp16 + loss scaling, QLoRA with bitsandbytes' CUDA kernels, decoding, mixed-adapter batches.

Skipped without a GPU (CI has none); bench/gpu.sh runs them on a GPU machine. LORAFORGE_TEST_DEVICE=cpu runs the
same comparisons CPU against CPU (a check of the tests themselves).
"""

import os

import pytest
import torch

from helpers import randomize, tiny_llama
from loraforge.config import LoraConfig, load_train_config
from loraforge.decoding import greedy
from loraforge.kernels import fused_lora_linear
from loraforge.lora.adapters import disable_adapters, mixed_batch, read_adapter_weights, set_adapter
from loraforge.lora.inject import inject
from loraforge.precision import choose, detect
from loraforge.training.loop import train

DEVICE = os.environ.get("LORAFORGE_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_precision_rule_on_this_gpu():
    if DEVICE != "cuda":
        pytest.skip("the rule on a GPU")
    hw = detect("cuda")
    p = choose("auto", "auto", hw, "cuda")
    major = torch.cuda.get_device_capability()[0]
    assert (p.compute, p.storage) == (("bf16", "bf16") if major >= 8 else ("fp16", "fp16"))
    assert p.needs_scaler == (major < 8)


def test_lora_forward_backward_matches_cpu():
    model = randomize(inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    ref.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    gpu = model.to(DEVICE)
    out = gpu(ids.to(DEVICE)).logits
    out.square().mean().backward()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)  # fp32 both sides (no TF32 by default)
    for n, p in gpu.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.cpu(), grads[n], rtol=1e-3, atol=1e-6)


def _fused_and_plain(dtype):
    """(output, dx, dA, dB) of the fused node and of plain autograd ops, and the same in fp32 as the reference."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 9, 64, generator=g)
    w, b = torch.randn(96, 64, generator=g) / 8, torch.randn(96, generator=g)
    A0, B0 = torch.randn(8, 64, generator=g) / 8, torch.randn(96, 8, generator=g) / 8

    def run(fn, dt):
        x = x0.to(DEVICE, dt).requires_grad_()
        A, B = A0.to(DEVICE).requires_grad_(), B0.to(DEVICE).requires_grad_()  # fp32 adapters, as in training
        out = fn(x, w.to(DEVICE, dt), b.to(DEVICE, dt), A, B)
        out.float().square().sum().backward()
        return [t.detach().float().cpu() for t in (out, x.grad, A.grad, B.grad)]

    plain = lambda x, w, b, A, B: x @ w.T + b + 2.0 * ((x @ A.to(x.dtype).T) @ B.to(x.dtype).T)  # noqa: E731
    fused = lambda x, w, b, A, B: fused_lora_linear(x, w, b, A, B, 2.0)  # noqa: E731
    return run(fused, dtype), run(plain, dtype), run(plain, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_linear_matches_plain(dtype):
    """fp32: equal to plain autograd ops; bf16: no further from the fp32 result than plain bf16 ops are."""
    fused, plain, ref = _fused_and_plain(dtype)
    for f, p, r in zip(fused, plain, ref):
        if dtype == torch.float32:
            torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)
        else:
            scale = r.abs().max()
            assert (f - r).abs().max() <= 2 * (p - r).abs().max() + 1e-3 * scale


def _run(tiny_dir, data_file, out, precision, steps=4, extra=()):
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0",
                                   f"output_dir={out}", "lora.r=4", "lora.lora_dropout=0", "training.lr=1e-2",
                                   f"training.max_steps={steps}", "training.batch_size=4", "training.seed=3",
                                   f"training.precision={precision}", *extra])
    return train(cfg, progress=False)


def test_training_fp32_on_the_gpu_equals_cpu(tiny_dir, data_file, tmp_path, monkeypatch):
    """The same run on the GPU and on the CPU, fp32 both: the same adapter up to reduction order."""
    gpu = _run(tiny_dir, data_file, tmp_path / "gpu", "fp32", extra=["model.dtype=fp32"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the loop picks its device from this
    cpu = _run(tiny_dir, data_file, tmp_path / "cpu", "fp32", extra=["model.dtype=fp32"])
    a, b = read_adapter_weights(tmp_path / "gpu" / "adapter"), read_adapter_weights(tmp_path / "cpu" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert abs(gpu.final_loss - cpu.final_loss) < 1e-3 * abs(cpu.final_loss)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_in_half_precision_follows_fp32(tiny_dir, data_file, tmp_path, precision):
    """bf16 autocast, and fp16 autocast with loss scaling (the T4/V100 path): the loss curve follows fp32's."""
    ref = _run(tiny_dir, data_file, tmp_path / "fp32", "fp32", steps=6, extra=["model.dtype=fp32"])
    half = _run(tiny_dir, data_file, tmp_path / precision, precision, steps=6)
    assert half.precision.startswith(f"precision {precision}")
    assert abs(half.final_loss - ref.final_loss) < 0.05 * ref.final_loss
    if precision == "fp16":  # GradScaler starts at 2**16: the first steps may overflow and are skipped, counted
        assert 0 <= half.skipped_steps < 6


def test_qlora_nf4_dequantize_equals_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    from loraforge.quant.bnb import dequantize, quantize_linear

    linear = torch.nn.Linear(256, 128, bias=False)
    layer = quantize_linear(linear, "nf4", torch.float32, double_quant=True, device=DEVICE)
    ours = dequantize(layer)
    theirs = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert (ours - linear.weight.to(DEVICE)).abs().max() < 0.2 * linear.weight.abs().max()


def test_qlora_training_runs(tiny_dir, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    if DEVICE == "cpu":
        pytest.skip("bitsandbytes' CPU 4-bit kernels need widths that are multiples of 64 (tests/training covers it)")
    result = _run(tiny_dir, data_file, tmp_path / "q", "auto", steps=3, extra=["model.quantization=nf4"])
    assert torch.isfinite(torch.tensor(result.final_loss))


def test_greedy_decoding_matches_generate():
    model = randomize(inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8))).to(DEVICE)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [5, 6, 7, 12, 13]]
    ours = greedy(model, prompts, stop=[127], max_new_tokens=8)
    for p, got in zip(prompts, ours):
        ids = torch.tensor([p], device=DEVICE)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=127, pad_token_id=0)[0, len(p):].tolist()
        assert got == ref[:len(got)] and (len(got) == 8 or got[-1] == 127)


def test_mixed_adapter_batch_equals_each_adapter(tmp_path):
    model = tiny_llama()
    inject(model, LoraConfig(r=4, lora_alpha=8), adapter_name="a")
    inject(model, LoraConfig(r=2, lora_alpha=8), adapter_name="b")
    randomize(model)
    model.to(DEVICE)
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with mixed_batch(model, ["a", "b", None]):
        mixed = model(ids).logits
    for row, name in enumerate(["a", "b", None]):
        if name is None:
            with disable_adapters(model):
                ref = model(ids[row:row + 1]).logits
        else:
            set_adapter(model, name)
            ref = model(ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], ref, rtol=1e-4, atol=1e-5)
