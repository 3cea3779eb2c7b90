"""The bf16 / int8 matrix-vector kernel against F.linear on the same rounded weight, and StoredWeight's two paths
(kernel and blocked widen-then-matmul) against each other."""

import pytest
import torch
import torch.nn.functional as F

from loraforge.inference import cpu_gemv
from loraforge.inference.weights import StoredWeight

needs_kernel = pytest.mark.skipif(not cpu_gemv.available(), reason="no AVX2/FMA x86 CPU or no C compiler here")


@needs_kernel
@pytest.mark.parametrize("storage", ["bf16", "int8"])
@pytest.mark.parametrize("out_features, in_features", [(1, 32), (7, 64), (1000, 576), (576, 1536), (193, 96)])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_kernel_equals_linear_on_the_stored_weight(storage, out_features, in_features, rows):
    g = torch.Generator().manual_seed(out_features * 31 + in_features + rows)
    stored = StoredWeight(torch.randn(out_features, in_features, generator=g), storage)
    x = torch.randn(2, rows, in_features, generator=g)[:1]  # (1, rows, in): a leading dim, and a view
    assert cpu_gemv.fits(stored.data, x)
    got = cpu_gemv.linear(x, stored.data, stored.scale)
    want = F.linear(x, stored.dequantized())
    assert got.shape == (1, rows, out_features)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * in_features ** 0.5)


@needs_kernel
def test_what_the_kernel_does_not_take():
    w = StoredWeight(torch.randn(8, 64), "bf16").data
    assert not cpu_gemv.fits(w, torch.randn(cpu_gemv.MAX_ROWS + 1, 64))  # a prefill: the blocked matmul
    assert not cpu_gemv.fits(w, torch.randn(1, 64, dtype=torch.bfloat16))  # fp32 activations only
    assert not cpu_gemv.fits(StoredWeight(torch.randn(8, 48), "bf16").data, torch.randn(1, 48))  # in % 32
    assert not cpu_gemv.fits(torch.randn(64, 8).to(torch.bfloat16).T, torch.randn(1, 64))  # not contiguous


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_stored_weight_paths_agree(storage, monkeypatch):
    """StoredWeight.linear with the kernel (where it runs) and without it (as on a machine without AVX2 or a
    compiler) gives the same products, for decode-sized and prefill-sized inputs."""
    g = torch.Generator().manual_seed(3)
    stored = StoredWeight(torch.randn(300, 128, generator=g), storage)
    small, big = torch.randn(1, 2, 128, generator=g), torch.randn(4, 9, 128, generator=g)
    with_kernel = stored.linear(small), stored.linear(big)
    monkeypatch.setattr(cpu_gemv, "_lib", None)
    assert not cpu_gemv.available()
    without = stored.linear(small), stored.linear(big)
    for a, b in zip(with_kernel, without):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
