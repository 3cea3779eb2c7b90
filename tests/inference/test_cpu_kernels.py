"""The fp32 / bf16 / int8 matrix-vector kernel against F.linear on the same rounded weight, and StoredWeight's two
paths (kernel and blocked widen-then-matmul, or MKL for fp32) against each other."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from loraforge.inference import cpu_kernels
from loraforge.inference.weights import StoredWeight

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2/FMA x86 CPU or no C compiler here")


@pytest.fixture(autouse=True)
def all_storages(monkeypatch):
    """fp32 weights through the kernels too, whatever this CPU's default (cpu_kernels.FP32: not on Intel + MKL)."""
    monkeypatch.setattr(cpu_kernels, "_KINDS", tuple(cpu_kernels._KIND))


@pytest.mark.parametrize("value", ["0", "1"])
def test_fp32_kernels_switch(value):
    """LORAFORGE_FP32_KERNELS=0/1 decides whether fp32 weights take the kernels (default: by CPU vendor)."""
    code = ("import torch; from loraforge.inference import cpu_kernels as k; "
            "print(k.FP32, k.fits_weight(torch.zeros(8, 64)), k.fits_weight(torch.zeros(8, 64, dtype=torch.bfloat16)))")
    env = {**os.environ, "LORAFORGE_FP32_KERNELS": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == (["True", "True", "True"] if value == "1" else ["False", "False", "True"])


@pytest.mark.parametrize("name, value", [("LORAFORGE_FP32_KERNELS", "yes"), ("LORAFORGE_CPU_KERNELS", "false")])
def test_kernel_switches_refuse_other_values(name, value):
    """0 or 1 only: "false" used to read as on for LORAFORGE_CPU_KERNELS."""
    env = {**os.environ, name: value}
    done = subprocess.run([sys.executable, "-c", "import loraforge.inference.cpu_kernels"], env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert f"{name} must be 0" in done.stderr and repr(value) in done.stderr


def test_cpu_kernels_switch_off():
    env = {**os.environ, "LORAFORGE_CPU_KERNELS": "0"}
    code = "from loraforge.inference import cpu_kernels as k; print(k.ENABLED, k.available())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


BUILD = "from loraforge.inference import cpu_kernels as k; print(k.CACHE, k.available())"


@needs_kernel
def test_the_kernel_cache_follows_loraforge_cache_and_processes_may_race(tmp_path):
    """LORAFORGE_CACHE moves the kernels as every other cache of the project; two processes building into the same
    empty folder at once both load the library, and one whole .so with its SHA-256 is left, no temporary folder."""
    env = {**os.environ, "LORAFORGE_CACHE": str(tmp_path / "cache"), "LORAFORGE_CPU_KERNELS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    folder = tmp_path / "cache" / "kernels"
    assert [r[0].split() for r in results] == [[str(folder), "True"]] * 2, [r[1] for r in results]
    (lib,) = folder.glob("decode-*.so")
    assert sorted(p.name for p in folder.iterdir()) == [lib.stem + ".sha256", lib.name]
    assert cpu_kernels._intact(lib)


DECODE = """
import sys
import torch
from loraforge.inference import cpu_kernels as k
from loraforge.inference.weights import StoredWeight

g = torch.Generator().manual_seed(3)
stored = StoredWeight(torch.randn(300, 128, generator=g), "bf16")
x = torch.randn(1, 2, 128, generator=g)
print(k.available(), k.available())
torch.save(stored.linear(x), sys.argv[1])
"""


@needs_kernel
@pytest.mark.parametrize("unwritable", ["read-only", "a file in the way"])
def test_an_unwritable_kernel_cache_is_said_once_and_decoding_runs_plain(unwritable, tmp_path):
    """A cache folder the process cannot write turns the kernels off with one warning line (the folder, the errno's
    text, the slower path, the fix); decode-sized products still come out, the plain PyTorch path's."""
    if unwritable == "read-only":
        cache = tmp_path / "cache"
        cache.mkdir()
        cache.chmod(0o555)
        if os.access(cache, os.W_OK):
            cache.chmod(0o755)
            pytest.skip("this user (root) writes into read-only folders")
        reason = "Permission denied"
    else:
        (tmp_path / "afile").write_text("")
        cache, reason = tmp_path / "afile" / "cache", "Not a directory"
    env = {**os.environ, "LORAFORGE_CACHE": str(cache), "LORAFORGE_CPU_KERNELS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", DECODE, str(tmp_path / "y.pt")], env=env, capture_output=True,
                              text=True, timeout=300)
    finally:
        if cache.is_dir():
            cache.chmod(0o755)  # tmp_path can be cleaned up
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
    folder = cache / "kernels"
    assert [line for line in done.stderr.splitlines() if "warning" in line] == [
        f"warning: cannot write the CPU kernel cache {folder} ({reason}): decoding falls back to the slower plain "
        f"PyTorch path; make {folder} writable or set LORAFORGE_CACHE to a folder this user can write"]
    g = torch.Generator().manual_seed(3)
    stored = StoredWeight(torch.randn(300, 128, generator=g), "bf16")
    x = torch.randn(1, 2, 128, generator=g)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), F.linear(x, stored.dequantized()), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("out_features, in_features", [(1, 32), (7, 64), (1000, 576), (576, 1536), (193, 96)])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_kernel_equals_linear_on_the_stored_weight(storage, out_features, in_features, rows):
    g = torch.Generator().manual_seed(out_features * 31 + in_features + rows)
    stored = StoredWeight(torch.randn(out_features, in_features, generator=g), storage)
    x = torch.randn(2, rows, in_features, generator=g)[:1]  # (1, rows, in): a leading dim, and a view
    assert cpu_kernels.fits(stored.data, x)
    got = cpu_kernels.linear(x, stored.data, stored.scale)
    want = F.linear(x, stored.dequantized())
    assert got.shape == (1, rows, out_features)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * in_features ** 0.5)


@needs_kernel
def test_what_the_kernel_does_not_take():
    w = StoredWeight(torch.randn(8, 64), "bf16").data
    assert not cpu_kernels.fits(w, torch.randn(cpu_kernels.MAX_ROWS + 1, 64))  # a prefill: the blocked matmul
    assert not cpu_kernels.fits(w, torch.randn(1, 64, dtype=torch.bfloat16))  # fp32 activations only
    assert not cpu_kernels.fits(StoredWeight(torch.randn(8, 48), "bf16").data, torch.randn(1, 48))  # in % 32
    assert not cpu_kernels.fits(torch.randn(64, 8).to(torch.bfloat16).T, torch.randn(1, 64))  # not contiguous


@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
def test_stored_weight_paths_agree(storage, monkeypatch):
    """StoredWeight.linear with the kernel (where it runs) and without it (as on a machine without AVX2 or a
    compiler) gives the same products, for decode-sized and prefill-sized inputs."""
    g = torch.Generator().manual_seed(3)
    stored = StoredWeight(torch.randn(300, 128, generator=g), storage)
    small, big = torch.randn(1, 2, 128, generator=g), torch.randn(4, 9, 128, generator=g)
    with_kernel = stored.linear(small), stored.linear(big)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    assert not cpu_kernels.available()
    without = stored.linear(small), stored.linear(big)
    for a, b in zip(with_kernel, without):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_rms_norm_equals_torch():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 4, 576, generator=g) * 3, torch.randn(576, generator=g)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("positions", [(0, 17, 39), (200,), (63, 64, 130, 255)])
def test_attend_equals_rope_cache_write_and_sdpa(heads, kv_heads, D, positions):
    """Rows at different positions, behind row0 = 1 of the cache: rope as Decoder._rope, k and v written at each
    row's position, attention over slots 0..pos as scaled_dot_product_attention with grouped heads. Positions
    past one chunk of slots (64: the running sums rescaled by a later chunk's maximum), one row alone (a group's
    heads shared out among the threads), head sizes not a multiple of 32; scores large enough that the maximum
    matters."""
    g = torch.Generator().manual_seed(heads + D + len(positions))
    B, max_len, row0 = len(positions), 256, 1
    max_batch = B + 2
    pos = torch.tensor(positions)
    keys = torch.randn(max_batch, kv_heads, max_len, D, generator=g)
    values = torch.randn(max_batch, kv_heads, max_len, D, generator=g)
    q = torch.randn(B, heads * D, generator=g) * 3
    k, v = torch.randn(B, kv_heads * D, generator=g), torch.randn(B, kv_heads * D, generator=g)
    angle = pos[:, None] * torch.rand(D // 2, generator=g).repeat(2)[None]  # (B, D), halves alike as Llama's
    cos, sin = angle.cos(), angle.sin()
    sin = torch.cat((-sin[:, :D // 2], sin[:, D // 2:]), -1)

    def rope(x):  # x (B, n, D)
        swapped = x.view(B, -1, 2, D // 2).flip(2).view(B, -1, D)
        return x * cos[:, None] + swapped * sin[:, None]

    want_keys, want_values = keys.clone(), values.clone()
    rows = torch.arange(row0, row0 + B)
    want_keys[rows, :, pos] = rope(k.view(B, kv_heads, D))
    want_values[rows, :, pos] = v.view(B, kv_heads, D)
    want = []
    for b in range(B):
        K, V = want_keys[row0 + b, :, :pos[b] + 1], want_values[row0 + b, :, :pos[b] + 1]
        qb = rope(q.view(B, heads, D))[b][:, None]  # (H, 1, D)
        want.append(F.scaled_dot_product_attention(qb[None], K[None], V[None], scale=D ** -0.5,
                                                   enable_gqa=heads != kv_heads)[0].reshape(-1))
    got = cpu_kernels.attend(q, k, v, cos, sin, pos, keys, values, row0, heads, D ** -0.5)
    torch.testing.assert_close(keys, want_keys, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values, want_values)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)



@needs_kernel
@pytest.mark.parametrize("dtypes", ["fp32 fp32 fp32", "bf16 bf16 bf16", "bf16 fp32 bf16", "fp32 bf16 fp32"])
@pytest.mark.parametrize("rank", [8, 16, 24, 64])
@pytest.mark.parametrize("in_features, out_features, tokens", [(576, 576, 1), (576, 192, 3), (70, 200, 2), (3, 8, 1)])
def test_lora_rows_equals_gathered_bmm(dtypes, rank, in_features, out_features, tokens):
    """out[b, t] += (x[b, t] · Aᵀ[slot]) · (sB)ᵀ[slot], read in place from the stacks, against fp32 bmm on gathered
    copies of the same (rounded) values: ranks 8 (its own path) and wider, widths that are not multiples of 32 or 4,
    several tokens a row, rows on slot 0 (left exactly as they were), repeated slots; x, stacks, out in fp32 or bf16."""
    x_dtype, w_dtype, out_dtype = ({"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in dtypes.split())
    g = torch.Generator().manual_seed(rank * 1000 + in_features + out_features)
    At = torch.randn(7, in_features, rank, generator=g).to(w_dtype)
    Bt = torch.randn(7, rank, out_features, generator=g).to(w_dtype)
    index = torch.tensor([3, 0, 6, 3, 1, 0, 5, 2, 6])
    x = torch.randn(len(index), tokens, in_features, generator=g).to(x_dtype)
    out = (torch.randn(len(index), tokens, out_features, generator=g) * 30).to(out_dtype)
    want = out.float() + torch.bmm(torch.bmm(x.float(), At[index].float()), Bt[index].float())
    want[index == 0] = out[index == 0].float()
    assert cpu_kernels.fits_rows(x, At, Bt, out)
    before = out.clone()
    cpu_kernels.lora_rows(x, At, Bt, index, out)
    assert torch.equal(out[index == 0], before[index == 0])
    if out_dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * (in_features * rank) ** 0.5)
    else:  # one rounding of the fp32 sum: within one bf16 step of the reference's
        torch.testing.assert_close(out.float(), want, rtol=2 ** -7, atol=1e-5 * (in_features * rank) ** 0.5)


@needs_kernel
@pytest.mark.parametrize("dtypes", ["fp32 fp32 fp32", "bf16 bf16 bf16"])
def test_lora_rows_a_rows_delta_does_not_depend_on_its_batch(dtypes):
    """Rows on one adapter go through the kernel in pairs (rank 8: A and B read once for both): each row's result
    is bit for bit what it gets alone, or in any other batch (a request's output does not depend on who shares its
    step); an index outside the stacks is refused, not read."""
    x_dtype, w_dtype, out_dtype = ({"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in dtypes.split())
    g = torch.Generator().manual_seed(5)
    At, Bt = torch.randn(5, 576, 8, generator=g).to(w_dtype), torch.randn(5, 8, 200, generator=g).to(w_dtype)
    index = torch.tensor([2, 4, 2, 0, 2, 1, 4, 3, 3, 3])  # three on slot 2 (a pair and one alone), pairs on 4 and 3
    x = torch.randn(len(index), 1, 576, generator=g).to(x_dtype)
    base = torch.randn(len(index), 1, 200, generator=g).to(out_dtype)
    out = base.clone()
    cpu_kernels.lora_rows(x, At, Bt, index, out)
    for b in range(len(index)):
        alone = base[b:b + 1].clone()
        cpu_kernels.lora_rows(x[b:b + 1], At, Bt, index[b:b + 1], alone)
        assert torch.equal(out[b:b + 1], alone), b
    for bad in (5, -1):
        with pytest.raises(ValueError, match=rf"index \[{bad}\] outside the stacks' 5 slots \(0 \.\. 4\)"):
            cpu_kernels.lora_rows(x[:2], At, Bt, torch.tensor([1, bad]), out[:2].clone())


@needs_kernel
def test_what_lora_rows_does_not_take():
    At, Bt, x, out = torch.randn(3, 64, 8), torch.randn(3, 8, 32), torch.randn(2, 5, 64), torch.zeros(2, 5, 32)
    assert cpu_kernels.fits_rows(x, At, Bt, out)
    assert not cpu_kernels.fits_rows(x.half(), At, Bt, out)  # fp32 or bf16 only
    assert not cpu_kernels.fits_rows(x, At, Bt.bfloat16(), out)  # both stacks one dtype
    assert not cpu_kernels.fits_rows(x, torch.randn(3, 64, 4), torch.randn(3, 4, 32), out)  # rank % 8
    assert not cpu_kernels.fits_rows(x, torch.randn(3, 64, 72), torch.randn(3, 72, 32), out)  # above MAX_RANK
    assert not cpu_kernels.fits_rows(x, At, torch.randn(3, 8, 36), torch.zeros(2, 5, 36))  # out % 8
    assert not cpu_kernels.fits_rows(x, torch.randn(3, 8, 64).transpose(1, 2), Bt, out)  # stacks contiguous
    assert not cpu_kernels.fits_rows(x, At, Bt, torch.zeros(2, 32, 5).transpose(1, 2))  # out contiguous
    assert not cpu_kernels.fits_rows(x, At, Bt, torch.zeros(2, 4, 32))  # out shaped as the rows


@needs_kernel
@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 5, 10, 11, 33])
def test_linear3_and_gate_up_equal_torch(storage, rows):
    """q, k, v in one call and silu(gate)·up in one call, against F.linear / F.silu on the same stored weights;
    two weights or three, outputs of different widths (not all multiples of 4). fp32 past TILED_FROM rows (a
    server's batch: 3-row tiles and the one or two rows left over): the tiled products, the very sums `linear`
    gives each weight alone."""
    g = torch.Generator().manual_seed(rows)
    ws = [StoredWeight(torch.randn(n, 96, generator=g), storage) for n in (96, 32, 42)]
    x = torch.randn(1, rows, 96, generator=g)
    if storage != "fp32" and rows > cpu_kernels.MAX_ROWS:
        assert not cpu_kernels.fits_many([w.data for w in ws], x)
        return
    assert cpu_kernels.fits_many([w.data for w in ws], x)
    for k in (2, 3):
        got = cpu_kernels.linear3(x, [w.data for w in ws[:k]], [w.scale for w in ws[:k]])
        for y, w in zip(got, ws[:k]):
            torch.testing.assert_close(y, F.linear(x, w.dequantized()), rtol=1e-5, atol=1e-4)
            if storage == "fp32":
                assert torch.equal(y, cpu_kernels.linear(x, w.data))
    gate, up = (StoredWeight(torch.randn(202, 96, generator=g), storage) for _ in range(2))
    got = cpu_kernels.gate_up(x, gate.data, gate.scale, up.data, up.scale)
    want = F.silu(F.linear(x, gate.dequantized())) * F.linear(x, up.dequantized())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    if storage == "fp32":  # the same products as `linear`'s, then silu(g) · u
        gx, ux = cpu_kernels.linear(x, gate.data), cpu_kernels.linear(x, up.data)
        torch.testing.assert_close(got, gx / (1 + torch.exp(-gx)) * ux, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_what_the_fused_products_do_not_take(monkeypatch):
    bf = StoredWeight(torch.randn(8, 64), "bf16").data
    x = torch.randn(1, 64)
    assert cpu_kernels.fits_many([torch.randn(8, 64)], x)  # fp32 where cpu_kernels.FP32 (this test's fixture)
    monkeypatch.setattr(cpu_kernels, "_KINDS", (torch.bfloat16, torch.int8))  # not: fp32 weights stay with MKL
    assert not cpu_kernels.fits_many([torch.randn(8, 64)], x)
    assert not cpu_kernels.fits(torch.randn(8, 64), x)
    assert not cpu_kernels.fits_many([bf, StoredWeight(torch.randn(8, 64), "int8").data], x)  # one storage
    assert not cpu_kernels.fits_many([bf, StoredWeight(torch.randn(8, 96), "bf16").data], x)  # one input width
    assert not cpu_kernels.fits_many([bf], torch.randn(cpu_kernels.MAX_ROWS + 1, 64))  # a prefill


@needs_kernel
@pytest.mark.parametrize("out_features, in_features", [(1, 32), (7, 64), (193, 96), (576, 1536), (1536, 576)])
@pytest.mark.parametrize("rows", [9, 16, 17, 20, 32, 64])
def test_tiled_fp32_product_equals_linear(out_features, in_features, rows):
    """fp32 weights times 9-64 rows (a server's batch): 3 x 4 tiles, the one or two rows left over (rows not a
    multiple of 3) as a narrower tile, the weight rows left over (outputs not a multiple of 4) as plain dots;
    through StoredWeight too, and past MAX_TILED_ROWS to MKL."""
    g = torch.Generator().manual_seed(out_features + in_features + rows)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, 1, in_features, generator=g)
    want = F.linear(x, w)
    torch.testing.assert_close(cpu_kernels.linear(x, w), want, rtol=1e-5, atol=1e-5 * in_features ** 0.5)
    stored = StoredWeight(w, "fp32")
    assert stored.kernel and cpu_kernels.fits_input(x, in_features, stored.max_rows)
    torch.testing.assert_close(stored.linear(x), want, rtol=1e-5, atol=1e-5 * in_features ** 0.5)
    big = torch.randn(cpu_kernels.MAX_TILED_ROWS + 1, in_features, generator=g)
    assert not cpu_kernels.fits_input(big, in_features, stored.max_rows)
    torch.testing.assert_close(stored.linear(big), F.linear(big, w))


@needs_kernel
@pytest.mark.parametrize("shape", [(708, 1536), (3, 5, 7)])
def test_silu_mul_equals_torch(shape):
    """silu(g) · u in one pass (8 at a time, the rest one by one: 105 elements leave 1) against F.silu(g) · u,
    with the extremes: large negative g (e^-g capped, silu → -0), large positive, 0, denormal. Gates far below -88
    give -0 as torch does (the cap alone left g · e⁻⁸⁸: -6e-9 for -1e30)."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 4
    u = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    flat = g.view(-1)
    flat[:8] = torch.tensor([-100.0, 100.0, 0.0, -88.5, 1e-40, -1e-3, -1e30, -3e38])
    u.view(-1)[:8] = 1.0
    got = cpu_kernels.silu_mul(g, u)
    torch.testing.assert_close(got, F.silu(g) * u, rtol=1e-6, atol=1e-7)
    assert abs(got.view(-1)[0].item()) < 1e-30 and got.view(-1)[1].item() == 100.0
    assert got.view(-1)[6].item() == 0.0 == (F.silu(g) * u).view(-1)[6].item()
    assert got.view(-1)[7].item() == 0.0 and torch.signbit(got.view(-1)[6:8]).all()
