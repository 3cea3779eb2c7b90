"""loraforge.training.slab: the kept activations copied into one buffer give the plain path's loss, gradients and
adapter bit for bit (fp32 and bf16, packed rows, accumulation, checkpointing), whatever the chunking; a tensor is
copied once however often it is saved, and never confused with a later tensor at the same address."""

import contextlib

import pytest
import torch
from helpers import VOCAB, assert_same_adapter, tiny_llama

from loraforge.config import LoraConfig, load_train_config
from loraforge.lora.inject import inject, lora_layers
from loraforge.training import slab as slab_module
from loraforge.training.fastpath import install, register_attention
from loraforge.training.loop import train
from loraforge.training.slab import ActivationSlab, unused_settings, uses_buffer
from loraforge.utils import allocator


@pytest.fixture
def every_tensor(monkeypatch):
    """The tiny model's activations are all under SMALLEST: copy every one."""
    monkeypatch.setattr(slab_module, "SMALLEST", 0)


def _model(checkpointing=False, kind="fused"):
    """The tiny model with LoRA on every linear. kind: fused (loraforge's kernels and lean attention, as training
    runs on CPU), plain (LoRA through autograd, transformers' modules and eager attention), dora (use_dora, plain)."""
    model = tiny_llama(seed=0)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                             use_dora=kind == "dora"), "default")
    if kind == "fused":
        for _, layer in lora_layers(model):
            layer.fused = True
        install(model)
        model.set_attn_implementation(register_attention())
    else:
        model.set_attn_implementation("eager")
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def _steps(slab_of, dtype=torch.float32, checkpointing=False, steps=3, micro=2, kind="fused"):
    """Losses and the final LoRA weights after `steps` AdamW steps of `micro` micro-batches each."""
    model = _model(checkpointing, kind)
    slab = slab_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        for _ in range(micro):
            ids = torch.randint(0, VOCAB, (3, 24), generator=g)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), \
                    slab.saving() if slab else contextlib.nullcontext():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / micro).backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in params], slab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [1 << 12, 1 << 26], ids=["many-chunks", "one-chunk"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "checkpointed"])
def test_the_buffer_gives_the_plain_paths_numbers_bit_for_bit(every_tensor, dtype, chunk, checkpointing):
    plain_losses, plain_params, _ = _steps(lambda m: None, dtype, checkpointing)
    losses, params, slab = _steps(lambda m: ActivationSlab(m, chunk=chunk), dtype, checkpointing)
    assert losses == plain_losses
    for got, want in zip(params, plain_params):
        assert torch.equal(got, want)
    if not checkpointing:  # (checkpointed layers keep only their inputs: the buffer holds little)
        assert slab.nbytes > 0 and (len(slab.chunks) > 1) == (chunk < 1 << 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["plain", "dora"])
def test_the_buffer_gives_the_plain_paths_numbers_through_autograds_own_layers(every_tensor, dtype, kind):
    """Without loraforge's kernels autograd saves many views (transposes, reshapes, slices of q, k and v): the
    buffer, sharing one copy among them, still gives the same losses and adapters bit for bit, with DoRA too."""
    plain_losses, plain_params, _ = _steps(lambda m: None, dtype, kind=kind)
    losses, params, slab = _steps(lambda m: ActivationSlab(m, chunk=1 << 14), dtype, kind=kind)
    assert losses == plain_losses and slab.nbytes > 0
    for got, want in zip(params, plain_params):
        assert torch.equal(got, want)


def test_a_tensor_saved_twice_is_copied_once_and_a_later_one_at_its_address_is_not_taken_for_it(every_tensor):
    slab = ActivationSlab(torch.nn.Linear(2, 2))
    with slab.saving():
        x = torch.randn(64, 64)
        first, again = slab._pack(x), slab._pack(x.view(64, 64))
        assert again.data_ptr() == first.data_ptr() and torch.equal(again, x) and first.data_ptr() != x.data_ptr()
        x.add_(1)  # changed in place after it was saved: a new version, a new copy
        assert torch.equal(slab._pack(x), x) and not torch.equal(first, x)
        address = x.data_ptr()
        del x
        y = torch.full((64, 64), 7.0)  # the allocator often hands the freed block straight back
        assert torch.equal(slab._pack(y), y), address == y.data_ptr()


def test_views_of_a_saved_tensor_share_its_copy(every_tensor):
    """A norm's output kept as (B, T, H) and the next linear's input kept as its (B·T, H) view: one copy, not two
    (SmolLM2, fp32, 4 packed 512-token rows: 8 MB a layer, ~245 MB a step, copied twice before). A view reaching
    past the copied elements, and a tensor changed in place since, get copies of their own."""
    slab = ActivationSlab(torch.nn.Linear(2, 2))
    with slab.saving():
        base = torch.randn(10, 4, 6, 8)
        x = base[1:9]  # contiguous, at an offset into its storage
        first = slab._pack(x)
        used = slab.used
        views = [x.reshape(32, 6, 8).reshape(-1, 8), x.transpose(1, 2), x[2:5, :, 1], x[-1]]
        packed = [slab._pack(v) for v in views]
        assert slab.used == used  # nothing more copied
        for v, p in zip(views, packed):
            assert torch.equal(p, v) and p.shape == v.shape and p.stride() == v.stride()
            assert first.data_ptr() <= p.data_ptr() < first.data_ptr() + first.nbytes
        wider = slab._pack(base[1:10])  # reaches past the copy: its own
        assert torch.equal(wider, base[1:10]) and slab.used != used
        used = slab.used
        x.mul_(2)  # changed in place after it was saved: a new version, a new copy
        again = slab._pack(x.reshape(-1, 8))
        assert torch.equal(again, x.reshape(-1, 8)) and slab.used != used
        assert not torch.equal(packed[0], again)  # the first copy kept the values the graph saved


def test_a_copy_keeps_the_layout_of_a_dense_tensor_and_packs_one_with_gaps(every_tensor):
    """A transposed operand given to the backward contiguous would take another product path (other roundings): a
    dense tensor's copy keeps its strides; a slice with gaps, or an expanded one, is copied compactly."""
    slab = ActivationSlab(torch.nn.Linear(2, 2))
    with slab.saving():
        cases = [(lambda x: x.transpose(0, 2), (1, 4, 32)), (lambda x: x.permute(1, 2, 0), (4, 1, 32)),
                 (lambda x: x[:, ::2], (16, 4, 1)), (lambda x: x[0, :, :1].expand(8, 5), (5, 1))]
        for view, strides in cases:
            t = view(torch.randn(6, 8, 4))  # a tensor of its own each: nothing copied before to share
            copy = slab._pack(t)
            assert torch.equal(copy, t) and copy.stride() == strides and copy.data_ptr() != t.data_ptr()


def test_a_small_copy_takes_the_room_a_large_one_left_in_an_earlier_chunk(every_tensor):
    slab = ActivationSlab(torch.nn.Linear(2, 2), chunk=1024)
    for _ in range(2):  # and again in the next forward, from the first chunk on
        with slab.saving():
            large = [slab._pack(torch.full((150,), float(i))) for i in range(2)]  # 600 bytes: one a chunk
            small = slab._pack(torch.full((64,), 9.0))  # 256 bytes: fits after the first
            assert len(slab.chunks) == 2 and slab.used == 640 + 640 + 256
            assert small.data_ptr() == slab.chunks[0].data_ptr() + 640
            assert [float(t[0]) for t in (*large, small)] == [0.0, 1.0, 9.0]


def test_weights_are_saved_by_reference_not_copied(every_tensor):
    model = torch.nn.Linear(64, 64)
    slab = ActivationSlab(model)
    with slab.saving():
        assert slab._pack(model.weight) is model.weight
    assert slab.nbytes == 0


def test_the_buffer_is_for_cpu_training_outside_fsdp_and_compile():
    """true: always there; auto: where the run keeps glibc's heap (training.reuse_memory); false: never."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_buffer(True, cpu) and not uses_buffer(False, cpu) and not uses_buffer(True, cuda)
    assert not uses_buffer(True, cpu, sharded=True) and not uses_buffer(True, cpu, compiled=True)
    assert uses_buffer("auto", cpu, reuses=True) and not uses_buffer("auto", cpu, reuses=False)
    assert not uses_buffer("auto", cuda, reuses=True) and not uses_buffer(False, cpu, reuses=True)
    assert not uses_buffer("auto", cpu, sharded=True, reuses=True)
    assert not uses_buffer("auto", cpu, compiled=True, reuses=True)


def test_a_true_the_run_leaves_off_is_said(tiny_dir, data_file, tmp_path, capsys, monkeypatch):
    """training.activation_buffer or training.reuse_memory set to true where the run resolves it off (a GPU, FSDP,
    training.compile, another allocator) was silently off: one line each says so and why; auto and false say
    nothing."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert unused_settings("auto", "auto", cuda, True) == [] and unused_settings(False, False, cpu, True) == []
    assert unused_settings(True, "auto", cpu, packed=False) == []  # true on glibc: on
    assert unused_settings("auto", True, cpu, True) == []
    on_gpu = unused_settings(True, True, cuda, True)
    assert [line.split(":")[0] for line in on_gpu] == ["training.activation_buffer", "training.reuse_memory"]
    assert all("is off on a GPU" in line for line in on_gpu), on_gpu
    assert "under FSDP" in unused_settings("auto", True, cpu, True, sharded=True)[0]
    assert "under training.compile" in unused_settings("auto", True, cpu, True, compiled=True)[0]
    monkeypatch.setattr(allocator, "loaded", lambda: "jemalloc")
    assert unused_settings(True, "auto", cpu, True) == ["training.reuse_memory: true is off under jemalloc, which "
                                                        "reuses freed memory itself; set it to auto to drop this line"]
    monkeypatch.undo()
    # a run: activation_buffer true (it trims the heap) turns reuse_memory off, and the run says so
    train(load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0",
                                   f"output_dir={tmp_path / 'run'}", "lora.r=4", "training.max_steps=1",
                                   "training.precision=fp32", "training.activation_buffer=true",
                                   "training.reuse_memory=true"]), progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: training.")]
    assert notes == ["note: training.reuse_memory: true is off with training.activation_buffer: true (which trims "
                     "the heap); set it to auto to drop this line"], notes


def test_a_run_with_the_buffer_writes_the_adapter_of_a_run_without(every_tensor, tiny_dir, data_file, tmp_path,
                                                                   monkeypatch):
    """true (copies and trims), auto (packed rows on glibc: the copies alone) and false train the same adapter, bit
    for bit; the run makes its buffer as each says."""
    made = []
    def recorded(model, trim=True):
        made.append(trim)
        return ActivationSlab(model, trim=trim)

    monkeypatch.setattr(slab_module, "ActivationSlab", recorded)
    for on in ("true", "auto", "false"):
        made.clear()
        cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0",
                                       f"output_dir={tmp_path / on}", "lora.r=4", "training.lr=1e-2",
                                       "training.max_steps=3", "training.batch_size=4", "training.precision=fp32",
                                       "model.dtype=fp32", "training.gradient_accumulation=2", "data.packing=true",
                                       f"training.activation_buffer={on}"])
        train(cfg, progress=False)
        glibc = allocator.reuses_memory("auto", "cpu", True)  # auto's buffer comes with the heap kept
        assert made == {"true": [True], "auto": [False] if glibc else [], "false": []}[on], on
    for on in ("true", "auto"):
        assert_same_adapter(tmp_path / on, tmp_path / "false")


@pytest.mark.parametrize("trim,every", [(True, 1 << 14), (True, 1 << 40), (False, 1 << 14)])
def test_the_heap_is_trimmed_as_activations_are_kept_and_read_back(every_tensor, monkeypatch, trim, every):
    """With trim, every TRIM_EVERY bytes packed (forward) or unpacked (backward) the heap's free holes are handed
    back; without, never."""
    trims = []
    monkeypatch.setattr(allocator, "trim_heap", lambda: trims.append(1) or True)
    monkeypatch.setattr(slab_module, "TRIM_EVERY", every)
    model = _model()
    slab = ActivationSlab(model, trim=trim)
    with slab.saving():
        loss = model(input_ids=torch.randint(0, VOCAB, (3, 24)), use_cache=False).logits.sum()
    after_forward = len(trims)
    loss.backward()
    kept = slab.used  # bytes the forward copied (one chunk, aligned)
    if every > kept or not trim:
        assert trims == []
    else:
        assert 0 < after_forward <= kept // every and after_forward < len(trims)  # and on the way back
