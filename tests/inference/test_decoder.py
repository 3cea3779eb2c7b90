"""The static decoder against transformers: the same greedy tokens as `generate` (fp32) and the same logits as the
model's forward, for no adapter, plain LoRA, rank/alpha patterns, DoRA and mixed-adapter batches; bf16 and int8
storage against the same model with its weights rounded the same way; the cache never past the model's context."""

import re

import pytest
import torch
import torch.nn.functional as F

from helpers import VOCAB, randomize, tiny_gpt2, tiny_llama
from loraforge.config import ConfigError, LoraConfig
from loraforge.decoding import greedy as shared_greedy
from loraforge.inference import cpu_kernels, llama
from loraforge.inference.greedy import argmax_rows, check_fits, greedy, stream
from loraforge.inference.llama import Decoder, cache_zeros, unsupported
from loraforge.inference.weights import StoredWeight
from loraforge.lora.adapters import mixed_batch, set_adapter
from loraforge.lora.inject import inject

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "plain": LoraConfig(r=4, lora_alpha=8, target_modules=tuple(ALL), init_lora_weights=False),
    "pattern": LoraConfig(r=4, lora_alpha=8, target_modules=tuple(ALL), init_lora_weights=False,
                          rank_pattern={"v_proj": 2, "down_proj": 6}, alpha_pattern={"o_proj": 3}),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj"), use_dora=True),
}


def _reference(model, prompts, stop, max_new_tokens):
    """transformers' generate, one prompt at a time (no padding), cut after the first stop token."""
    out = []
    for p in prompts:
        ids = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                             pad_token_id=stop[0])[0, len(p):].tolist()
        end = next((k for k, t in enumerate(ids) if t in stop), None)
        out.append(ids if end is None else ids[:end + 1])
    return out


def _prompts(shared, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, VOCAB, (shared,), generator=g).tolist()
    return [head + torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _with_adapter(kind, seed=0):
    model = tiny_llama(seed=seed)
    inject(model, CONFIGS[kind], kind)
    randomize(model, seed=seed + 1)  # B ≠ 0 (and DoRA's m then differs from the row norm)
    return model


def _stop_tokens(model, prompts):
    """Two tokens the model really emits, so that rows end at different steps."""
    first = _reference(model, prompts, [VOCAB + 1], 12)
    return sorted({t[3] for t in first})[:2]


@pytest.mark.parametrize("kind", [None, "plain", "pattern", "dora"])
@pytest.mark.parametrize("shared", [0, 12], ids=["no-prefix", "shared-prefix"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_greedy_equals_transformers_generate(kind, shared, batch_size):
    model = tiny_llama() if kind is None else _with_adapter(kind)
    prompts = _prompts(shared, [1, 5, 2, 9, 3, 1, 7])
    stop = _stop_tokens(model, prompts)
    reference = _reference(model, prompts, stop, 12)
    assert len({len(r) for r in reference}) > 1  # rows do leave the batch early
    assert greedy(model, prompts, stop, max_new_tokens=12, batch_size=batch_size) == reference


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", [None, "plain", "pattern", "dora"])
def test_prefill_and_step_logits_equal_the_models(kind, packed, monkeypatch):
    """Right-padded prefill of rows of different lengths, then one step at different positions: each row's logits
    equal the model's forward on that row alone. Given the lengths, the products run on the 18 real tokens only
    (not 3 x 9) and the padded slots of the cache hold zeros."""
    model = tiny_llama() if kind is None else _with_adapter(kind)
    prompts = _prompts(0, [6, 3, 9], seed=2)
    dec = Decoder(model, max_batch=3, max_len=16)
    ids = torch.zeros(3, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    tokens, linear = [], StoredWeight.linear
    monkeypatch.setattr(StoredWeight, "linear", lambda self, x: tokens.append(x.numel() // x.shape[-1]) or
                        linear(self, x))
    if packed:
        got = dec.forward(ids, torch.zeros(3, dtype=torch.long), lengths=lengths)
    else:
        got = dec.forward(ids, torch.zeros(3, dtype=torch.long), keep=lengths - 1)
    assert set(tokens[:-1]) == {18 if packed else 27}  # every layer's products; the head: one row each
    if packed:
        assert dec.keys[:, 1, :, 3:9].abs().sum() == 0 and dec.values[:, 0, :, 6:9].abs().sum() == 0
    nxt = torch.tensor([[7], [11], [13]])
    step = dec.forward(nxt, lengths)
    with torch.no_grad():
        for row, p in enumerate(prompts):
            full = model(input_ids=torch.tensor([p + [int(nxt[row])]])).logits[0]
            # fp32 with a different summation order (our attention, transformers' sdpa): a few ulps of the logits
            torch.testing.assert_close(got[row], full[-2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[row], full[-1], rtol=1e-5, atol=1e-5)


def _mixed_model():
    model = tiny_llama()
    for kind in ("plain", "pattern", "dora"):
        inject(model, CONFIGS[kind], kind)
    return randomize(model, seed=3)


def test_mixed_adapter_batch_equals_each_rows_adapter():
    """A batch mixing three adapters (one DoRA, ranks padded) and the base: the logits of each row equal the model's
    with that row's adapter set; set_rows (explicit) and a mixed_batch block agree."""
    model = _mixed_model()
    names = ["plain", None, "dora", "pattern", "plain"]
    prompts = _prompts(0, [4, 4, 4, 4, 4], seed=4)
    ids = torch.tensor(prompts)
    dec = Decoder(model, max_batch=5, max_len=8, adapters=names)
    got = dec.forward(ids, torch.zeros(5, dtype=torch.long))
    assert not dec.packs(4)  # each row's own LoRA weights: lengths leave the rows padded
    torch.testing.assert_close(dec.forward(ids, torch.zeros(5, dtype=torch.long), lengths=torch.full((5,), 4)), got,
                               rtol=0, atol=0)
    with mixed_batch(model, names):
        blocked = Decoder(model, max_batch=5, max_len=8).forward(ids, torch.zeros(5, dtype=torch.long))
        with torch.no_grad():
            theirs = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(got, blocked, rtol=0, atol=0)
    torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for row, name in enumerate(names):
            if name is None:
                continue
            set_adapter(model, name)
            alone = model(input_ids=ids[row:row + 1]).logits[0, -1]
            torch.testing.assert_close(got[row], alone, rtol=1e-5, atol=1e-5)


def test_mixed_adapter_greedy_equals_generate_per_adapter():
    model = _mixed_model()
    prompts = _prompts(10, [2, 5, 3, 6], seed=5)
    names = ["dora", "plain", None, "pattern"]
    reference = []
    for p, name in zip(prompts, names):
        if name is None:
            with mixed_batch(model, [None]):
                reference += _reference(model, [p], [VOCAB + 1], 10)
        else:
            set_adapter(model, name)
            reference += _reference(model, [p], [VOCAB + 1], 10)
    assert greedy(model, prompts, [VOCAB + 1], max_new_tokens=10, adapters=names) == reference


def _rounded_like(model, storage):
    """The model with its base linears and embedding rounded to `storage` and back to fp32 (adapters untouched)."""
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and ".lora_" not in name:
            module.weight.data = StoredWeight(module.weight.data, storage).dequantized()
    return model


@pytest.mark.parametrize("storage", ["bf16", "int8"])
@pytest.mark.parametrize("kind", [None, "plain", "dora"])
def test_stored_precision_logits_equal_the_rounded_model(storage, kind):
    """bf16 / int8 storage computes in fp32 on the rounded base weights (adapters stay fp32, DoRA's row norm is
    taken from the rounded base): the same logits as the fp32 model whose base weights were rounded the same way."""
    model = tiny_llama() if kind is None else _with_adapter(kind)
    dec = Decoder(model, max_batch=2, max_len=8, storage=storage)  # its own rounded copies of the base weights
    ids = torch.tensor(_prompts(0, [6, 6], seed=6))
    got = dec.forward(ids, torch.zeros(2, dtype=torch.long))
    rounded = _rounded_like(model, storage)
    with torch.no_grad():
        theirs = rounded(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-5)
    # decode steps: the kernels' path (q, k, v in one call; gate, up and silu in one where they have no adapter)
    for step in range(2):
        ids = torch.cat([ids, got.argmax(-1, keepdim=True)], 1)
        got = dec.forward(ids[:, -1:], torch.full((2,), ids.shape[1] - 1))
        with torch.no_grad():
            theirs = rounded(input_ids=ids).logits[:, -1]
        torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_stored_weight_rounding_bound_and_blocked_product(storage):
    """The stored weight is W to within its format's rounding (bf16: 2⁻⁸ relative; int8: half a step of its
    group's scale), and the blocked widen-then-multiply equals F.linear on the rounded weight."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(1000, 64, generator=g)  # 1000 rows: several blocks and a partial last one
    stored = StoredWeight(W, storage)
    stored.block = 96
    Wq = stored.dequantized()
    if storage == "bf16":
        assert ((Wq - W).abs() <= W.abs() * 2 ** -8).all()
    else:
        assert ((Wq - W).abs() <= stored.scale.repeat_interleave(32, 1) / 2 + 1e-7).all()  # groups of 32 inputs
    x = torch.randn(3, 5, 64, generator=g)
    torch.testing.assert_close(stored.linear(x), F.linear(x, Wq), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored.rows(torch.tensor([[3, 999]])), Wq[torch.tensor([[3, 999]])])


def test_unsupported_models_fall_back_to_transformers():
    assert "gpt2" in unsupported(tiny_gpt2())
    assert unsupported(tiny_llama()) is None
    with pytest.raises(NotImplementedError, match="gpt2"):
        Decoder(tiny_gpt2(), 1, 8)
    model = tiny_gpt2()
    prompts = _prompts(0, [3, 5])
    assert shared_greedy(model, prompts, [VOCAB + 1], max_new_tokens=4) == _reference(model, prompts, [VOCAB + 1], 4)


def test_an_adapter_on_the_head_falls_back_to_transformers():
    model = tiny_llama()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "lm_head"), init_lora_weights=False), "h")
    randomize(model, seed=1)
    assert unsupported(model) == "an adapter on lm_head"  # it crashed reading lm_head.weight
    prompts = _prompts(0, [3, 5])
    assert shared_greedy(model, prompts, [VOCAB + 1], max_new_tokens=4) == _reference(model, prompts, [VOCAB + 1], 4)


def test_shared_prefix_is_computed_once(monkeypatch):
    """loraforge.decoding.greedy(static=True) runs Llama models here: the shared prefix as one row, then each
    row's own tokens, then one token per running row per step."""
    model = tiny_llama()
    prompts = _prompts(20, [3, 4, 5])
    widths = []
    forward = Decoder.forward
    monkeypatch.setattr(Decoder, "forward", lambda self, ids, start, **kw: widths.append(
        tuple(ids.shape)) or forward(self, ids, start, **kw))
    shared_greedy(model, prompts, [VOCAB + 1], max_new_tokens=3, batch_size=8, static=True)  # stop never produced
    assert widths == [(1, 20), (3, 5), (3, 1), (3, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_zeros_and_resize_keep_what_rows_hold(dtype):
    """The cache on fresh pages: zeros, writable, freed with the tensor. A resize keeps the first `rows` rows'
    first `used` slots (what a server's rows hold) and the rest is zero, growing and shrinking."""
    z = cache_zeros((2, 3, 5), dtype, torch.device("cpu"))
    assert z.dtype == dtype and z.is_contiguous() and not z.any()
    z[1, 2] = 7
    assert z.sum() == 35 and z[0].sum() == 0
    dec = Decoder(tiny_llama(), max_batch=2, max_len=8)
    dec.keys.normal_()
    dec.values.normal_()
    keys, values = dec.keys.clone(), dec.values.clone()
    dec.resize(4, 16, rows=1, used=5)
    assert dec.keys.shape[1:4:2] == (4, 16)
    torch.testing.assert_close(dec.keys[:, :1, :, :5], keys[:, :1, :, :5], rtol=0, atol=0)
    torch.testing.assert_close(dec.values[:, :1, :, :5], values[:, :1, :, :5], rtol=0, atol=0)
    assert not dec.keys[:, 1:].any() and not dec.keys[:, :, :, 5:].any() and not dec.values[:, :, :, 5:].any()
    dec.resize(2, 8)  # no rows or used given: everything that fits
    torch.testing.assert_close(dec.keys[:, :1, :, :5], keys[:, :1, :, :5], rtol=0, atol=0)
    dec.resize(1, 4, rows=0)
    assert dec.keys.shape[1:4:2] == (1, 4) and not dec.keys.any() and not dec.values.any()


def test_rows_prefilled_behind_running_rows_decode_together():
    """A server's pattern: row 0 runs; a new request (another adapter) is prefilled into row 1 with only its
    adapter set; then both decode in one step with both adapters. Each row's logits equal the model's alone."""
    model = _mixed_model()
    a, b = _prompts(0, [5, 3], seed=8)
    dec = Decoder(model, max_batch=2, max_len=12, adapters=["plain"])
    dec.forward(torch.tensor([a]), torch.zeros(1, dtype=torch.long))
    dec.set_rows(["dora"])
    dec.forward(torch.tensor([b]), torch.zeros(1, dtype=torch.long), row0=1)
    dec.set_rows(["plain", "dora"])
    step = dec.forward(torch.tensor([[9], [10]]), torch.tensor([len(a), len(b)]))
    with torch.no_grad():
        for row, (p, token, name) in enumerate([(a, 9, "plain"), (b, 10, "dora")]):
            set_adapter(model, name)
            torch.testing.assert_close(step[row], model(input_ids=torch.tensor([p + [token]])).logits[0, -1],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [None, "plain", "dora"])
def test_greedy_equals_generate_without_the_kernels(kind, monkeypatch):
    """Decode steps off the C kernels (as on a CPU without AVX2 or a compiler, or in bf16): grouped matmul
    attention with each row at its own position; the same greedy tokens as transformers' generate."""
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    model = tiny_llama() if kind is None else _with_adapter(kind)
    prompts = _prompts(0, [1, 5, 2, 9, 3])
    stop = _stop_tokens(model, prompts)
    assert greedy(model, prompts, stop, max_new_tokens=12, batch_size=5) == _reference(model, prompts, stop, 12)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2/FMA x86 CPU or no C compiler here")
@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
def test_whole_layer_kernel_equals_the_per_part_calls(storage, monkeypatch):
    """A plain layer's decode step in one C call (`cpu_kernels.layer`) against the per-part calls (q/k/v, attend,
    o, gate/up, down) and, for fp32, the model's own forward: rows at different positions, several steps; a layer
    with an adapter takes the per-part path in the same step. fp32 weights too, whatever this CPU's default."""
    monkeypatch.setattr(cpu_kernels, "_KINDS", tuple(cpu_kernels._KIND))
    model = tiny_llama(num_hidden_layers=3)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=("model.layers.1.self_attn.v_proj",)), "one")
    randomize(model)
    prompts = _prompts(0, [6, 3, 9], seed=4)
    decs = [Decoder(model, max_batch=3, max_len=16, storage=storage) for _ in range(2)]
    decs[1].layer_kernel = False
    assert all(w.ok for w in decs[0].whole)
    taken = []
    real = cpu_kernels.layer
    monkeypatch.setattr(cpu_kernels, "layer", lambda *a, **k: taken.append(1) or real(*a, **k))
    ids = torch.zeros(3, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    outs = [d.forward(ids, torch.zeros(3, dtype=torch.long), keep=lengths - 1) for d in decs]
    seqs = [list(p) for p in prompts]
    for step in range(3):
        nxt = outs[0].argmax(-1, keepdim=True)
        for row in range(3):
            seqs[row].append(int(nxt[row]))
        outs = [d.forward(nxt, lengths + step) for d in decs]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        if storage == "fp32":
            with torch.no_grad():
                for row in range(3):
                    full = model(input_ids=torch.tensor([seqs[row]])).logits[0, -1]
                    torch.testing.assert_close(outs[0][row], full, rtol=1e-5, atol=1e-5)
    assert len(taken) == 3 * 2  # layers 0 and 2 in one call each step; layer 1 (an adapter) per part


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_torchs_argmax(dtype):
    """Each row's argmax through numpy on a CPU: torch's answer on random rows, ties (the first of equal maxima),
    NaN (counted above everything), ±inf, a row of one value; fp32 and bf16 logits, inference tensors."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        logits = torch.randn(8, 1000, generator=g)
        logits[1, [10, 500]] = 9.0  # a tie
        logits[2, [3, 700]] = float("nan")
        logits[3, 42] = float("inf")
        logits[4] = float("-inf")
        logits[4, 999] = -1e30
        logits[5] = 0.25
        logits = logits.to(dtype)
        got = argmax_rows(logits)
        assert got == logits.argmax(-1).tolist()
    assert got[1:6] == [10, 3, 42, 999, 0]


# --- the model's context: no cache slot past it, a stream that would pass it refused ------------------------------
def test_the_cache_is_never_allocated_past_the_context(monkeypatch):
    """A context of 128: a Decoder or a resize past it is refused; greedy with a huge max_new_tokens allocates at
    most 128 slots a row and returns the tokens generate gives for the room left."""
    model = tiny_llama(max_position_embeddings=128)
    with pytest.raises(ValueError, match=re.escape("a cache of max_len=129 positions is past the model's context of "
                                                   "128 tokens; cut the prompt and new tokens to fit it")):
        Decoder(model, max_batch=1, max_len=129)
    dec = Decoder(model, max_batch=1, max_len=128)
    with pytest.raises(ValueError, match="max_len=200 positions is past the model's context of 128 tokens"):
        dec.resize(1, 200)
    assert dec.keys.shape[3] == 128  # the refused resize kept the cache
    shapes = []
    monkeypatch.setattr(llama, "cache_zeros", lambda shape, *a: shapes.append(shape) or cache_zeros(shape, *a))
    prompts = _prompts(0, [120, 5])
    with pytest.warns(UserWarning, match=re.escape("max_new_tokens 1000000000000: 2 of 2 prompts reach the model's "
                                                   "context of 128 tokens first")):
        out = greedy(model, prompts, [VOCAB + 1], max_new_tokens=10 ** 12)
    assert {s[3] for s in shapes} == {128}  # keys and values: (layers, rows, kv heads, slots, head dim)
    assert out == [_reference(model, [prompts[0]], [VOCAB + 1], 8)[0], _reference(model, [prompts[1]], [VOCAB + 1],
                                                                                  123)[0]]


def test_stream_refuses_logits_that_are_not_finite():
    """Soak: an adapter whose lora_alpha (1e39: its scale 1.25e38 still finite) overflows the forward gave NaN logits,
    and `loraforge generate` printed an empty answer and exited 0."""
    model = inject(tiny_llama(), LoraConfig(r=8, lora_alpha=1e39, init_lora_weights=False))
    seen = []
    with pytest.raises(FloatingPointError, match=r"the model's logits are not finite \(the greedy choice's is nan\) "
                                                 r"after 0 tokens: the forward overflowed"):
        stream(model, _prompts(0, [5])[0], [VOCAB + 1], 4, seen.append)
    assert seen == []


def test_stream_refuses_what_does_not_fit_the_context():
    model = tiny_llama(max_position_embeddings=128)
    prompt = _prompts(0, [120])[0]
    with pytest.raises(ConfigError, match=re.escape("max_new_tokens 9: the model's context is 128 tokens and the "
                                                    "prompt takes 120; at most 8 new tokens fit")):
        stream(model, prompt, [VOCAB + 1], 9, lambda token: None)
    with pytest.raises(ConfigError, match=re.escape("the prompt takes 130 tokens and the model's context is 128: no "
                                                    "new token fits after it; shorten the prompt")):
        stream(model, _prompts(0, [130])[0], [VOCAB + 1], 1, lambda token: None)
    seen = []
    assert stream(model, prompt, [VOCAB + 1], 8, seen.append) == seen == _reference(model, [prompt], [VOCAB + 1], 8)[0]
    with pytest.raises(ConfigError, match=re.escape("--max-new-tokens 65: the model's context is 64 tokens and the "
                                                    "prompt takes 1; at most 63 new tokens fit")):
        check_fits(tiny_gpt2(), 1, 65, flag="--max-new-tokens")  # loraforge generate, before either path


def _greedy_widths(model, prompt, steps, monkeypatch):
    """Greedy decode steps of one row on the decoder (bf16 activations: off the C kernels); the tokens, the last
    step's logits and the cache width each step's attention read."""
    dec, widths, attend = Decoder(model, max_batch=1, max_len=128), [], Decoder._attend_one
    with monkeypatch.context() as m:
        m.setattr(Decoder, "_attend_one", lambda self, q, keys, values, mask:
                  widths.append(keys.shape[2]) or attend(self, q, keys, values, mask))
        logits = dec.forward(torch.tensor([prompt]), torch.zeros(1, dtype=torch.long))
        tokens = [int(logits.argmax(-1))]
        for k in range(steps):
            logits = dec.forward(torch.tensor([tokens[-1:]]), torch.tensor([len(prompt) + k]))
            tokens.append(int(logits.argmax(-1)))
    return tokens, logits, widths


def test_bf16_decode_steps_attend_over_few_widths(monkeypatch):
    """bf16 decode steps on a CPU attend over the cache rounded up to ATTEND_BLOCK slots (oneDNN keeps a kernel per
    matmul shape: a width per step grew a server by hundreds of MB), with the same tokens and logits as over the
    exact width."""
    model = tiny_llama().to(torch.bfloat16)
    prompt = _prompts(0, [5], seed=4)[0]
    tokens, logits, widths = _greedy_widths(model, prompt, 70, monkeypatch)
    # 2 layers a step; positions 5 .. 74 read 6 .. 75 slots
    assert sorted(set(widths)) == [32, 64, 96] and len(widths) == 140
    monkeypatch.setattr(llama, "ATTEND_BLOCK", 1)
    exact_tokens, exact_logits, exact_widths = _greedy_widths(model, prompt, 70, monkeypatch)
    assert sorted(set(exact_widths)) == list(range(6, 76))
    assert tokens == exact_tokens
    torch.testing.assert_close(logits, exact_logits, rtol=2e-2, atol=2e-2)
