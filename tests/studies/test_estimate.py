"""The memory estimator: each part against plain arithmetic, and the well-known claims it must reproduce."""

import json
import warnings

import pytest
import torch

from loraforge import cli
from loraforge.config import METHODS as RUN_METHODS, ConfigError, LoraConfig
from loraforge.lora.adalora import AdaLoraConfig, SVDLinear, inject_adalora
from loraforge.lora.inject import inject
from loraforge.lora.layer import LoraLinear
from loraforge.studies.estimate import (KNOWN_SHAPES, ModelShape, activation_bytes, adapter_params, cli_estimate,
                                        config_shape, estimate, format_breakdown, model_shape, per_device)
from loraforge.quant.bnb import bits_per_weight_formula
from loraforge.training.loss import HEAD_CHUNK, CausalLMLoss

GB = 1e9
LLAMA7B = KNOWN_SHAPES["7b"]


def test_parameter_counts_match_the_published_sizes():
    assert LLAMA7B.total_params == 6_738_415_616  # Llama 2 7B, as transformers counts it
    assert 65.2e9 < KNOWN_SHAPES["65b"].total_params < 65.3e9
    assert 68.9e9 < KNOWN_SHAPES["70b"].total_params < 69.1e9


def test_adapter_params_are_r_times_in_plus_out():
    h, i = 4096, 11008
    per_layer = 16 * (4 * (h + h) + 2 * (h + i) + (i + h))
    assert adapter_params(LLAMA7B, 16) == 32 * per_layer
    assert adapter_params(LLAMA7B, 8, ("q_proj", "v_proj")) == 32 * 8 * 2 * (h + h)
    with pytest.raises(ValueError, match="q_proj"):
        adapter_params(LLAMA7B, 8, ("c_attn",))


def test_activation_formula_is_the_documented_arithmetic():
    s = ModelShape(64, 128, 3, 4, 2, 100)
    h, kv, i, L, V, T, a, r = 64, 32, 128, 3, 100, 10, 2, 7 * 4
    per = 8 * h + a * (5 * h + 2 * kv + 4 * i) + 4 * r
    back = a * (4 * i + 2 * h)  # one layer's backward: the MLP's gradients beside the residual stream's
    off = activation_bytes(s, T, a, r, gradient_checkpointing=False)
    on = activation_bytes(s, T, a, r, gradient_checkpointing=True)
    # a trained head (full): every token's fp32 log-softmax output, and one chunk's two fp32 gradients in backward;
    # it was 3 × 4·V per token for every token (soak: full fine-tuning estimated at 1.93× its measured growth)
    assert off == {"layers": T * (L * per + back), "logits": T * 4 * V + T * 8 * V}
    assert on == {"layers": T * (L * a * h + per + back), "logits": T * 4 * V + T * 8 * V}
    assert HEAD_CHUNK == 512
    assert activation_bytes(s, 5000, 4, r, False)["logits"] == 5000 * 4 * V + 512 * 8 * V
    # a frozen head (LoRA, QLoRA): one chunk of at most HEAD_CHUNK rows of logits (bf16 + its fp32 copy) at a time, and
    # the saved gradient of the head's input; it was 3 × 4·V per token (1.2 GB where 18.6 MB were kept)
    assert activation_bytes(s, T, a, r, False, "lora")["logits"] == T * V * (2 + 4) + T * a * h
    assert activation_bytes(s, 5000, 4, r, False, "qlora")["logits"] == 512 * V * 4 + 5000 * 4 * h
    # DoRA: W0x (a·out) and the fp32 adapter output (4·out) per target; DoRA and AdaLoRA in bf16: each target's fp32
    # copy of its input (4·in)
    outs, ins = 2 * h + 2 * kv + 2 * i + h, 6 * h + i  # q, o, k, v, gate, up, down
    assert activation_bytes(s, T, a, r, False, "dora")["layers"] == T * (L * (per + (a + 4) * outs + 4 * ins) + back)
    assert activation_bytes(s, T, a, r, False, "adalora")["layers"] == T * (L * (per + 4 * ins) + back)
    assert activation_bytes(s, T, 4, r, False, "adalora") == activation_bytes(s, T, 4, r, False, "lora")
    # wide heads (q = heads × head_dim), norms on q and k, and k = 2 of E = 4 experts per token
    moe = ModelShape(64, 128, 3, 4, 2, 100, head_dim=32, num_experts=4, experts_per_token=2, qk_norm=True)
    q, kv = 4 * 32, 2 * 32
    per = 8 * h + a * (2 * h + 3 * q + 2 * kv) + 2 * a * (h + 4 * i) + 4 * 4 + (4 + a) * (q + kv) + 4 * r
    back = 2 * a * 4 * i + 2 * a * h
    assert activation_bytes(moe, T, a, r, gradient_checkpointing=False)["layers"] == T * (L * per + back)


def _saved_per_token(run, lengths=(8, 16), wide: int | None = None) -> float:
    """Bytes per token that autograd saves during `run(T, skip)` (unique storages; those in `skip` excluded: the
    parameters), `wide`: only tensors of that last dimension. The difference between two lengths, so that what does
    not grow with the tokens (parameter-sized products) cancels."""
    totals = []
    for T in lengths:
        seen, skip = {}, set()

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip and (wide is None or t.shape[-1:] == (wide,)):
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(T, skip)
        totals.append(sum(seen.values()))
    return (totals[1] - totals[0]) / (lengths[1] - lengths[0])


def _layer_run(layer, dtype):
    def run(T, skip):
        skip.update(p.untyped_storage().data_ptr() for p in layer.parameters())
        x = torch.randn(1, T, layer.in_features, dtype=dtype, requires_grad=True)
        skip.add(x.untyped_storage().data_ptr())  # the layer's input is the block's tensor, counted there
        layer(x)
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["dora", "adalora"])
def test_dora_and_adalora_layers_keep_what_the_estimate_counts(method, dtype):
    """One target layer's saved tensors per token (autograd's saved_tensors_hooks) against the estimate's terms for
    it: DoRA's W0x and adapter output, the bf16 run's fp32 copy of the input, and the r-wide A output (4·r) that
    LoRA's term already counts. Exact: the same bytes, no tolerance."""

    h, r, a = 32, 4, 4 if dtype == torch.float32 else 2
    torch.manual_seed(0)
    layer = (SVDLinear if method == "adalora" else LoraLinear)(torch.nn.Linear(h, h, bias=False, dtype=dtype))
    layer.base_layer.requires_grad_(False)
    if method == "adalora":
        layer.add_adapter("default", init_r=r, lora_alpha=8)
    else:
        layer.add_adapter("default", r=r, lora_alpha=8, use_dora=True)
    for p in layer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters, as build_model keeps them
    shape = ModelShape(h, 64, 1, 4, 4, 100)  # targets q_proj alone: in = out = h
    one = dict(tokens=10, act_bytes=a, lora_r_per_layer=r, gradient_checkpointing=False, targets=("q_proj",))
    extra = (activation_bytes(shape, method=method, **one)["layers"]
             - activation_bytes(shape, method="lora", **one)["layers"]) / 10
    assert _saved_per_token(_layer_run(layer, dtype)) == extra + 4 * r


def test_dora_keeps_no_tensor_another_op_keeps_in_a_llama_block():
    """Whole tiny Llama, every linear layer adapted: what DoRA keeps per token beyond plain LoRA is exactly the
    estimate's DoRA term (so W0x and the adapter output are no other op's tensors); AdaLoRA keeps what LoRA keeps."""
    from helpers import tiny_llama

    def run_of(method):
        model = tiny_llama()
        if method == "adalora":
            inject_adalora(model, AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules="all-linear"))
        else:
            inject(model, LoraConfig(r=4, target_modules="all-linear", use_dora=method == "dora"))
        model.train()

        def run(T, skip):
            skip.update(t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()))
            model(torch.randint(0, 100, (1, T)))
        return run

    shape = ModelShape(32, 64, 2, 4, 2, 128)  # tiny_llama's: 2 layers, K/V 16 wide
    one = dict(tokens=10, act_bytes=4, lora_r_per_layer=4 * 7, gradient_checkpointing=False)
    per = {m: activation_bytes(shape, method=m, **one)["layers"] / 10 for m in ("lora", "dora", "adalora")}
    saved = {m: _saved_per_token(run_of(m)) for m in ("lora", "dora", "adalora")}
    # W0x and s·B(A(x)), fp32 (8 bytes) per output of q, k, v, o, gate, up, down, in each of the 2 layers
    assert saved["dora"] - saved["lora"] == per["dora"] - per["lora"] == 2 * 8 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    assert saved["adalora"] == saved["lora"] and per["adalora"] == per["lora"]


def test_a_trained_head_keeps_its_log_softmax_for_every_token():
    """Method full: the loss runs the trained head in HEAD_CHUNK-row chunks, and each chunk's fp32 log-softmax
    output (V wide) stays for backward: 4·V bytes per token, past the first chunk too, as the estimate counts."""
    from helpers import tiny_llama

    model = tiny_llama().train()
    loss = CausalLMLoss(model, share_prefix=False)
    V = model.config.vocab_size

    def run(T, skip):
        skip.update(p.untyped_storage().data_ptr() for p in model.parameters())
        ids = torch.randint(0, V, (1, T))
        loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})

    lengths = (HEAD_CHUNK + 100, HEAD_CHUNK + 300)  # past one chunk: the part that grows with every token
    shape = ModelShape(32, 64, 2, 4, 2, V)
    logits = [activation_bytes(shape, T, 4, 0, False)["logits"] for T in lengths]
    head = _saved_per_token(run, lengths, wide=V)
    assert head == (logits[1] - logits[0]) / (lengths[1] - lengths[0]) == 4 * V


def test_breakdown_pieces():
    n = LLAMA7B.total_params
    full = estimate("7b", "full", 1, 512, gradient_checkpointing=False)
    assert (full["weights"], full["gradients"], full["optimizer_states"]) == (4 * n, 4 * n, 8 * n)  # 16 B/param
    lora = estimate("7b", "lora", 1, 512, r=16)
    t = adapter_params(LLAMA7B, 16)
    assert (lora["adapter"], lora["gradients"], lora["optimizer_states"]) == (4 * t, 4 * t, 8 * t)
    assert lora["weights"] == 2 * (LLAMA7B.linear_params + LLAMA7B.embedding_params) + 4 * LLAMA7B.norm_params
    q = estimate("7b", "qlora", 1, 512, r=16)
    assert q["weights"] == pytest.approx(bits_per_weight_formula() / 8 * LLAMA7B.linear_params
                                         + 4 * (LLAMA7B.embedding_params + LLAMA7B.norm_params))
    eight = estimate("7b", "qlora", 1, 512, r=16, optimizer="adamw_8bit")
    assert eight["optimizer_states"] == pytest.approx(t * (2 + 8 / 256))
    for b in (full, lora, q):
        assert b["total"] == pytest.approx(sum(b[k] for k in ("weights", "adapter", "gradients",
                                                              "optimizer_states", "activations")))


def test_dora_and_adalora_breakdowns():
    """DoRA: LoRA's A and B plus a magnitude per output row; AdaLoRA: A, B and r singular values per layer (its r is
    init_r), with the rank allocator's two fp32 averages per adapter value beside AdamW's two moments."""
    t = adapter_params(LLAMA7B, 16)
    outs = sum(out for _, out in LLAMA7B.linear_shapes().values()) * LLAMA7B.num_hidden_layers
    assert adapter_params(LLAMA7B, 16, method="dora") == t + outs
    assert adapter_params(LLAMA7B, 16, method="adalora") == t + 16 * 7 * LLAMA7B.num_hidden_layers
    lora, dora, ada = (estimate("7b", m, 2, 512, r=16) for m in ("lora", "dora", "adalora"))
    assert dora["weights"] == ada["weights"] == lora["weights"]
    assert dora["activations"] > lora["activations"] and dora["gradient_checkpointing"] == 0
    n = adapter_params(LLAMA7B, 16, method="adalora")
    assert (ada["adapter"], ada["optimizer_states"]) == (4 * n, (8 + 8) * n)


def test_every_method_a_run_takes_has_an_estimate(capsys):
    for method in RUN_METHODS:  # soak: --method dora was argparse's "invalid choice" though train takes it
        assert cli.main(["estimate", "--method", method]) == 0
        assert capsys.readouterr().out.startswith(f"7b {method}: ")


def test_named_sizes_are_checked_against_their_context(capsys):
    """--seq-len past a named size's context is refused as a directory's is (soak: 7b at 10M tokens gave 8652 GB)."""
    with pytest.raises(ConfigError, match=r"^invalid arguments:\n  --seq-len: 10000000 is past the model's context of "
                                          r"4096 tokens \(max_position_embeddings in the config of Llama 2 7B\); use "
                                          r"at most 4096$"):
        cli_estimate("7b", seq_len=10**7)
    with pytest.raises(ConfigError, match="context of 2048 tokens .* LLaMA-1 65B"):
        cli_estimate("65B", seq_len=2049)
    cli_estimate("70b", seq_len=4096, method="dora")
    assert capsys.readouterr().out.startswith("70b dora: batch 1 × 4096 tokens, r=16, ")


def test_well_known_claims():
    # QLoRA paper: a 65B model fine-tunes on one 48 GB GPU (batch 1, gradient checkpointing).
    assert estimate("65b", "qlora", batch_size=1, seq_len=512, gradient_checkpointing=True)["total"] < 48 * GB
    assert estimate("7b", "full", batch_size=1, seq_len=512)["total"] > 100 * GB  # 16 bytes per parameter
    assert estimate("65b", "lora", 1, 512)["total"] > 120 * GB  # a 16-bit 65B base alone is 130 GB
    q7 = estimate("7b", "qlora", 1, 512)["total"]
    assert 4 * GB < q7 < 8 * GB  # ~3.9 GB of 4-bit weights + adapter/optimizer + activations
    assert estimate("7b", "lora", 1, 512)["total"] > 2.5 * q7


def test_checkpointing_cuts_activations_and_errors_name_the_value():
    on = estimate("13b", "lora", 4, 1024, gradient_checkpointing=True)["activations"]
    off = estimate("13b", "lora", 4, 1024, gradient_checkpointing=False)["activations"]
    assert on < off / 5
    with pytest.raises(ValueError, match="'qlra'"):
        estimate("7b", "qlra")
    with pytest.raises(ValueError, match="'3b'"):
        estimate("3b", "lora")
    assert "total" in format_breakdown(estimate("7b", "qlora"))
    with pytest.raises(ConfigError, match=r"--r: 65537 is more than the largest rank a run takes \(65536\)"):
        cli_estimate("7b", r=65537)  # as lora.r: a run would refuse it
    for kw, message in (({"batch_size": 10**309}, "--batch-size a number of 310 digits × --seq-len 512: more than "
                         "1e+12 tokens a micro-batch"),  # soak: OverflowError tracebacks past a float's range
                        ({"batch_size": 10**6, "seq_len": 10**7}, "--batch-size 1000000 × --seq-len 10000000: more"),
                        ({"gpus": 10**309, "distributed": "fsdp"}, "--gpus a number of 310 digits: more than 1e+09 "
                         "devices, past any cluster")):
        with pytest.raises(ConfigError) as e:
            cli_estimate("7b", **kw)
        assert e.value.problems[0].startswith(message)


def test_local_config(tmp_path):
    from helpers import tiny_llama

    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    assert model_shape(str(tmp_path)) == ModelShape(64, 128, 2, 4, 2, 128, False, head_dim=16)


def test_cli_refuses_a_sequence_past_the_context_and_shows_no_rank_for_full(tmp_path, capsys):
    """--seq-len as data.max_seq_len in a run: past the model's 128 positions it is refused by name; full
    fine-tuning has no rank, so its title shows none."""
    from helpers import tiny_llama

    tiny_llama(max_position_embeddings=128).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"^invalid arguments:\n  --seq-len: 129 is past the model's context of 128 "
                                          r"tokens \(max_position_embeddings in the config of .*\); use at most 128$"):
        cli_estimate(str(tmp_path), seq_len=129)
    cli_estimate(str(tmp_path), seq_len=128, method="full")
    cli_estimate(str(tmp_path), seq_len=128, method="lora", r=4)
    full, lora = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert full == (f"{tmp_path} full: batch 1 × 128 tokens, adamw, bf16, gradient checkpointing off, "
                    f"{full.split(', ')[-1]}")
    assert lora.startswith(f"{tmp_path} lora: batch 1 × 128 tokens, r=4, adamw, bf16, ")


SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "qwen3_moe", "phi3", "gemma2", "gemma3_text"])
def test_parameter_counts_equal_the_real_models(arch, tmp_path):
    """Model and LoRA (all-linear, r=16) parameters, estimated from config.json, equal those of the model built
    from it: Qwen3 sets head_dim apart from hidden/heads (and norms q and k), the MoE models hold experts and a
    router per layer (3-D tensors that "all-linear" does not adapt). Phi-3's fused qkv_proj and gate_up_proj were
    counted as seven LoRA layers (26,624 adapter parameters read as 32,768 in a soak), Gemma 2's and 3's four norms
    a layer (and Gemma 3's q/k norms) as Llama's two."""
    import transformers

    from loraforge.lora.inject import count_parameters, inject

    config, model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[arch]
    extra = {"llama": {}, "qwen3": {"head_dim": 48}, "mixtral": {"num_local_experts": 4},
             "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 40, "head_dim": 24}, "phi3": {"pad_token_id": 0},
             "gemma2": {"head_dim": 24}, "gemma3_text": {"head_dim": 24}}[arch]
    torch.manual_seed(0)
    real = model(config(**SIZES, **extra))
    real.save_pretrained(tmp_path)
    total = sum(p.numel() for p in real.parameters())
    inject(real, LoraConfig(r=16, target_modules="all-linear"))
    trainable = count_parameters(real)[0]

    shape = model_shape(str(tmp_path))
    assert shape.total_params == total
    assert estimate(str(tmp_path), "full", 1, 16)["trainable_params"] == total
    assert estimate(str(tmp_path), "lora", 1, 16, r=16)["trainable_params"] == trainable
    assert adapter_params(shape, 16) == trainable


def test_real_qwen3_config_counts_its_wide_heads():
    """Qwen3-0.6B (its config.json's sizes): 596,049,920 parameters, 176M of them in the attention projections
    (head_dim 128 with 16 heads is twice hidden_size 1024)."""
    shape = config_shape({"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
                          "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                          "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True})
    assert shape.total_params == 596_049_920
    attention = {k: v for k, v in shape.linear_shapes().items() if k in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert 28 * sum(a * b for a, b in attention.values()) == 176_160_768


GPT2_AND_MOE = {  # each config as a real folder holds it; the estimate reads config.json alone
    "gpt2": lambda t: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2-n_inner-untied": lambda t: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4,
                                                                     n_positions=48, n_inner=80,
                                                                     tie_word_embeddings=False)),
    "qwen2": lambda t: t.Qwen2ForCausalLM(t.Qwen2Config(**SIZES)),
    "llama-biases": lambda t: t.LlamaForCausalLM(t.LlamaConfig(**SIZES, attention_bias=True, mlp_bias=True)),
    "qwen2_moe": lambda t: t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(**SIZES, num_experts=4, moe_intermediate_size=40,
                                                                  shared_expert_intermediate_size=56)),
    "qwen2_moe-no-qkv-bias": lambda t: t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(
        **SIZES, num_experts=4, moe_intermediate_size=40, shared_expert_intermediate_size=56, qkv_bias=False)),
}


@pytest.mark.parametrize("arch", list(GPT2_AND_MOE))
def test_gpt2_qwen2_moe_and_biases_count_exactly_as_the_real_models(arch, tmp_path, capsys):
    """GPT-2 and Qwen2-MoE folders were refused ("not a Llama-style decoder", "a mixture of experts that the estimate
    does not know", 300+ characters); Qwen2's q/k/v biases were left out. Now the frozen parameters (the model's,
    biases, positions and LayerNorm biases included) and the trainable ones (all-linear LoRA, r=16: GPT-2's Conv1D
    layers; Qwen2-MoE's attention, shared expert and its gate, not the experts) equal the real model's."""
    import transformers

    from loraforge.lora.inject import count_parameters

    torch.manual_seed(0)
    real = GPT2_AND_MOE[arch](transformers)
    real.save_pretrained(tmp_path)
    frozen = sum(p.numel() for p in real.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-linear on a mixture of experts: its experts get no adapter (said)
        inject(real, LoraConfig(r=16, target_modules="all-linear"))
    trainable, _ = count_parameters(real)
    shape = model_shape(str(tmp_path))
    assert shape.total_params == frozen
    assert estimate(str(tmp_path), "full", 1, 16)["trainable_params"] == frozen
    assert estimate(str(tmp_path), "lora", 1, 16, r=16)["trainable_params"] == trainable
    cli_estimate(str(tmp_path), "lora", seq_len=16, r=16)
    assert f"{trainable:,} trainable parameters" in capsys.readouterr().out


def test_architectures_it_cannot_read_are_refused_in_one_short_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 64, "vocab_size": 100}))
    with pytest.raises(ConfigError) as e:
        cli_estimate(str(tmp_path))
    assert e.value.problems == [f"--model {str(tmp_path)!r}: model_type 't5': its config.json lacks hidden_size, "
                                f"intermediate_size, num_hidden_layers, num_attention_heads; the estimate reads "
                                f"Llama-style decoders, gpt2 and mixtral, qwen2_moe, qwen3_moe"]
    moe = {"model_type": "olmoe", "num_experts": 64, "num_experts_per_tok": 8, **SIZES}
    with pytest.raises(ConfigError) as e:
        config_shape(moe)
    assert e.value.problems == ["model_type 'olmoe' is a mixture of experts the estimate does not know (it knows "
                                "mixtral, qwen2_moe, qwen3_moe)"]
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        config_shape({**SIZES, "model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 8,
                      "mlp_only_layers": [0]})
    with pytest.raises(ConfigError) as e:
        config_shape({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "vocab_size": 10, "n_positions": 8})
    assert e.value.problems == ["model_type 'gpt2': its config.json lacks n_embd"]


OTHER_BLOCKS = {  # configs with Llama's fields whose models hold other layers
    "gpt_neox": lambda t: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**SIZES)),
    "olmo2": lambda t: t.Olmo2ForCausalLM(t.Olmo2Config(**SIZES, pad_token_id=0)),
    "cohere": lambda t: t.CohereForCausalLM(t.CohereConfig(**SIZES, pad_token_id=0)),
    "stablelm": lambda t: t.StableLmForCausalLM(t.StableLmConfig(**SIZES)),
}


@pytest.mark.parametrize("arch", list(OTHER_BLOCKS))
def test_configs_with_llama_fields_and_another_block_are_refused_in_one_line(arch, tmp_path):
    """A soak's GPT-NeoX, OLMo 2, Cohere and StableLM folders were read as Llama blocks: wrong totals (GPT-NeoX's
    LayerNorm biases and ungated MLP; OLMo 2's q/k norms; Cohere's one norm a layer) and GPT-NeoX's LoRA count 42%
    high, printed as if exact. Now the model transformers builds from the config (on the meta device) is counted
    against the reading, and a difference is one line naming the model_type and what the estimate reads."""
    import transformers

    torch.manual_seed(0)
    real = OTHER_BLOCKS[arch](transformers)
    real.save_pretrained(tmp_path)
    total = sum(p.numel() for p in real.parameters())
    with pytest.raises(ConfigError) as e:
        cli_estimate(str(tmp_path), "lora", seq_len=16)
    read = config_shape(real.config.to_dict()).total_params
    assert e.value.problems == [
        f"--model {str(tmp_path)!r}: model_type {arch!r}: its model holds {total:,} parameters where a Llama-style "
        f"decoder of its config.json's sizes holds {read:,}; the estimate reads llama, mistral, qwen2, qwen3, gemma "
        f"(1-3), phi3, gpt2 and the mixtures of experts mixtral, qwen2_moe, qwen3_moe"]


def test_per_device_memory_under_fsdp_and_ddp():
    """FSDP splits weights, adapter, gradients and optimizer states over the devices and gathers the root
    (embeddings, head, final norm) and two decoder layers whole; DDP keeps a whole replica plus its gradient
    buckets. The arithmetic, on the 70B shape."""
    s = KNOWN_SHAPES["70b"]
    one = estimate("70b", "lora", batch_size=1, seq_len=512, r=16, dtype="bf16")
    fsdp = per_device(one, "70b", "lora", 4, "fsdp", "bf16")
    for part in ("weights", "adapter", "gradients", "optimizer_states"):
        assert fsdp[part] == pytest.approx(one[part] / 4)
    assert fsdp["activations"] == one["activations"]  # batch_size is per device
    assert fsdp["buffers"] == pytest.approx(2 * (s.embedding_params + s.hidden_size) + 2 * 2 * s.linear_params / 80)
    parts = ("weights", "adapter", "gradients", "optimizer_states", "activations", "buffers")
    assert fsdp["total"] == pytest.approx(sum(fsdp[p] for p in parts))
    ddp = per_device(one, "70b", "lora", 4, "ddp", "bf16")
    assert ddp["weights"] == one["weights"] and ddp["buffers"] == one["gradients"]
    qlora = per_device(estimate("70b", "qlora"), "70b", "qlora", 2, "fsdp")
    assert qlora["buffers"] == pytest.approx(4 * (s.embedding_params + s.hidden_size)
                                             + 2 * 4.127 / 8 * s.linear_params / 80, rel=1e-3)
    assert "buffers" in format_breakdown(fsdp)
    with pytest.raises(ValueError, match="'zero3'"):
        per_device(one, "70b", "lora", 2, "zero3")
    # experts are gathered with their layer, unquantized: fp32 under QLoRA, the base's dtype under LoRA
    moe = ModelShape(64, 96, 2, 4, 2, 128, num_experts=4, experts_per_token=2)
    layer = moe.linear_params / 2, moe.expert_params / 2
    root = moe.embedding_params + moe.hidden_size
    assert per_device(estimate(moe, "lora"), moe, "lora", 2, "fsdp")["buffers"] == 2 * root + 2 * 2 * sum(layer)
    assert per_device(estimate(moe, "qlora"), moe, "qlora", 2, "fsdp")["buffers"] == pytest.approx(
        4 * root + 2 * (4.127 / 8 * layer[0] + 4 * layer[1]), rel=1e-3)


def test_class_defaults_apply_where_config_json_is_silent(tmp_path):
    """A Gemma config.json without tie_word_embeddings (GemmaConfig's default: tied) or head_dim (default 256)
    was counted with a separate output head and hidden_size // heads: 197,952 parameters where transformers
    builds 133,952. The counts now equal those of the model transformers builds from that file."""
    import transformers

    from loraforge.lora.inject import count_parameters, inject

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 1000,
        "max_position_embeddings": 512}))
    torch.manual_seed(0)
    real = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    total = sum(p.numel() for p in real.parameters())
    inject(real, LoraConfig(r=4, target_modules="all-linear"))
    shape = model_shape(str(tmp_path))
    assert (shape.tie_word_embeddings, shape.head_size) == (True, 256)
    assert estimate(str(tmp_path), "full", 1, 8)["trainable_params"] == total
    assert estimate(str(tmp_path), "lora", 1, 8, r=4)["trainable_params"] == count_parameters(real)[0]


@pytest.mark.parametrize("config,line", [
    ({"num_attention_heads": 0}, "num_attention_heads in {file} is 0; it must be a positive whole number"),
    ({"vocab_size": None}, "vocab_size in {file} is null; it must be a positive whole number"),
    ({"hidden_size": "64"}, 'hidden_size in {file} is a string ("64"); it must be a positive whole number'),
    ({"num_key_value_heads": 2.5}, "num_key_value_heads in {file} is a number (2.5); it must be a positive whole "
                                   "number"),
    ({"tie_word_embeddings": "false"}, 'tie_word_embeddings in {file} is a string ("false"); it must be true or '
                                       'false'),
    ([1, 2], "{file} holds an array, not an object of config fields: not a transformers config"),
])
def test_malformed_config_values_are_refused_in_one_line(config, line, tmp_path):
    """0 heads, a null vocab_size, a size given as a string or a config.json holding an array were tracebacks
    (ZeroDivisionError, TypeError, AttributeError): one line naming the field and the file."""
    fields = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 10, "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps({**fields, **config} if isinstance(config, dict) else config))
    with pytest.raises(ConfigError) as e:
        cli_estimate(str(tmp_path), seq_len=8)
    fix = "" if isinstance(config, list) else ": fix the config.json"
    assert e.value.problems == [f"--model {str(tmp_path)!r}: " + line.format(file=tmp_path / "config.json") + fix]


def test_trainable_counts_read_at_every_size(tmp_path, capsys):
    """A tiny model's count read "0.0M trainable parameters": below a million it is given digit by digit."""
    from helpers import tiny_llama

    from loraforge.studies.estimate import count_text

    assert [count_text(n) for n in (0, 8192, 999_999, 1_000_000, 40_370_176, 6_738_415_616)] == [
        "0", "8,192", "999,999", "1.0M", "40.4M", "6.74B"]
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    cli_estimate(str(tmp_path), seq_len=8, method="lora", r=4)
    trainable = estimate(str(tmp_path), "lora", 1, 8, r=4)["trainable_params"]
    assert capsys.readouterr().out.splitlines()[0].endswith(f", {int(trainable):,} trainable parameters")


def test_a_config_transformers_cannot_read_is_one_line(tmp_path):
    """Llama fields under a model_type transformers does not know passed the shape and then crashed the context
    check (load_config's ValueError, with pip advice over several sentences): one line, its first sentence."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "no_such_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 10, "max_position_embeddings": 64}))
    with pytest.raises(ConfigError) as e:
        cli_estimate(str(tmp_path), seq_len=8)
    [line] = e.value.problems
    assert line.startswith(f"--model {str(tmp_path)!r}: transformers cannot read its config.json (")
    assert "no_such_model" in line and "\n" not in line and "pip install" not in line
