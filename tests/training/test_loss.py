"""CausalLMLoss's shared prefix: the rows' common leading tokens computed once give the plain path's loss and
gradients, and it is skipped wherever it would change the math."""

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM
from transformers.utils import generic as transformers_generic

from helpers import VOCAB, tiny_llama
from loraforge.training import data as D
from loraforge.config import LoraConfig, load_train_config
from loraforge.lora.inject import inject
from loraforge.training.loss import MIN_SHARED_TOKENS, CausalLMLoss, shared_prefix
from loraforge.utils.hf import enable_checkpointing
from loraforge.training.loop import build_model, make_batch


def _batch(prefix=24, rest=(5, 9, 3, 7), seed=1):
    """Rows = the same `prefix` tokens, then `rest[i]` tokens of their own, right-padded; targets after the prefix."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, VOCAB, (prefix,), generator=g)
    width = prefix + max(rest)
    ids = torch.zeros(len(rest), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(rest):
        ids[i, :prefix + n] = torch.cat([head, torch.randint(0, VOCAB, (n,), generator=g)])
        labels[i, prefix + 1:prefix + n] = ids[i, prefix + 1:prefix + n]
        mask[i, :prefix + n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora(model):
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "default")
    return model.train()


def _loss_and_grads(model, batch, share, dtype=None):
    model.zero_grad(set_to_none=True)
    loss_fn = CausalLMLoss(model, share_prefix=share)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        total, n = loss_fn(batch)
    (total / n).backward()
    return total.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_same(shared, plain):
    """The shared path's loss and every adapter gradient equal the plain path's (fp32: summation order only)."""
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-6, atol=1e-5)
    for k, g in plain[1].items():
        torch.testing.assert_close(shared[1][k], g, rtol=1e-5, atol=1e-6, msg=k)


def test_shared_prefix_is_the_common_untargeted_real_prefix():
    batch = _batch(prefix=6, rest=(4, 2, 3))
    assert shared_prefix(batch) == 6  # the last shared token's state predicts the first target... of no row here
    batch["labels"][1, 6] = batch["input_ids"][1, 6]  # a target at position 6: the state at 5 feeds it
    assert shared_prefix(batch) == 5
    batch = _batch(prefix=6, rest=(4, 2, 3))
    batch["input_ids"][2, 3] = (batch["input_ids"][0, 3] + 1) % VOCAB  # rows part at token 3
    assert shared_prefix(batch) == 3
    one = {k: v[:1] for k, v in _batch(prefix=6).items()}
    assert shared_prefix(one) == 0  # nothing to share
    packed = dict(_batch(prefix=6), position_ids=torch.zeros(4, 13, dtype=torch.long))
    assert shared_prefix(packed) == 0
    same = _batch(prefix=6, rest=(0, 0))  # identical rows without targets: every row keeps its last token
    assert shared_prefix(same) == 5


@pytest.mark.parametrize("attention", ["eager", "sdpa", "lean"])
def test_shared_prefix_gives_the_plain_loss_and_gradients(attention):
    """fp32, LoRA on every linear layer of a GQA Llama, rows of different lengths (right padding)."""
    from loraforge.training.fastpath import register_attention

    register_attention()
    model = _lora(tiny_llama(seed=2, attn_implementation=attention))
    batch = _batch()
    assert CausalLMLoss(model).prefix_to_share(batch) == 24  # the shared path runs
    _assert_same(_loss_and_grads(model, batch, True), _loss_and_grads(model, batch, False))


@pytest.mark.parametrize("layers", ["all", "one"])
def test_shared_prefix_under_gradient_checkpointing(layers, monkeypatch):
    """Checkpointed layers recompute their forward in the backward pass: the prefix runs without checkpointing and
    the rest reads its keys and values from a cache that no recomputation can grow. Same loss and gradients as the
    plain path without checkpointing; the layers' checkpointing flags are as they were afterwards; and transformers
    is not left to warn that it turned caching off (a checkpointing model drops use_cache=True: a training run
    printed "`use_cache=True` is incompatible with gradient checkpointing" though the prefix's cache was used)."""
    from loraforge.training.loop import checkpoint_only

    warned = []
    monkeypatch.setattr(transformers_generic.logger, "warning_once", lambda *a, **k: warned.append(a))
    model = _lora(tiny_llama(seed=5, num_hidden_layers=3))
    batch = _batch()
    plain = _loss_and_grads(model, batch, False)
    enable_checkpointing(model)
    if layers == "one":
        checkpoint_only(model, 1)
    flags = [getattr(m, "gradient_checkpointing", None) for m in model.modules()]
    assert CausalLMLoss(model).prefix_to_share(batch) == 24
    _assert_same(_loss_and_grads(model, batch, True), plain)
    assert [getattr(m, "gradient_checkpointing", None) for m in model.modules()] == flags
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in model.modules())
    assert warned == []


def test_shared_prefix_with_learned_positions():
    """GPT-2 (absolute position embeddings, its positions taken from the cache), dropout off."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    model = _lora(model)
    batch = _batch()
    assert CausalLMLoss(model).prefix_to_share(batch) == 24
    _assert_same(_loss_and_grads(model, batch, True), _loss_and_grads(model, batch, False))


def test_shared_prefix_under_bf16_autocast_stays_as_close_to_fp64_as_the_plain_path():
    """The shared path rounds differently (other matmul shapes, the rows' gradients summed once): its error against
    an fp64 reference must stay within 2× the plain path's, on the loss and on the adapter gradients."""
    model = _lora(tiny_llama(seed=3, hidden_size=64, intermediate_size=128))
    batch = _batch(prefix=32, rest=(12, 20, 9, 16))
    ref = _loss_and_grads(model.double(), batch, False)
    model.float()
    errors = {}
    for share in (False, True):
        loss, grads = _loss_and_grads(model, batch, share, torch.bfloat16)
        g = torch.cat([grads[k].flatten().double() - ref[1][k].flatten() for k in ref[1]])
        gref = torch.cat([v.flatten() for v in ref[1].values()])
        errors[share] = (abs(loss.double() - ref[0]) / ref[0], g.norm() / gref.norm())
    assert errors[True][0] <= 2 * errors[False][0] + 1e-6
    assert errors[True][1] <= 2 * errors[False][1]
    assert errors[False][1] > 0  # bf16 did round: the comparison means something


def test_shared_prefix_is_skipped_where_it_would_change_the_math():
    batch = _batch()
    model = tiny_llama(seed=4)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1), "default")
    loss_fn = CausalLMLoss(model)
    model.train()
    assert loss_fn.prefix_to_share(batch) == 0  # dropout would draw one mask for every row's prefix
    model.eval()
    assert loss_fn.prefix_to_share(batch) == 24  # evaluation: dropout is off
    model = _lora(tiny_llama(seed=4, attention_dropout=0.1))
    assert CausalLMLoss(model).prefix_to_share(batch) == 0
    for drop in ("dropout", "layerdrop"):  # OPT's (a soak's OPT run shared its prefix with dropout 0.1 on)
        torch.manual_seed(0)
        opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                       num_attention_heads=4, word_embed_proj_dim=32, **{"dropout": 0.0, drop: 0.1}))
        assert CausalLMLoss(_lora(opt)).prefix_to_share(batch) == 0
        opt.config.update({drop: 0.0})
        assert CausalLMLoss(opt).prefix_to_share(batch) == 24  # no dropout: shared
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=16))
    assert CausalLMLoss(_lora(mistral)).prefix_to_share(batch) == 0  # a sliding-window cache drops keys
    assert CausalLMLoss(_lora(tiny_llama(seed=4)), share_prefix=False).prefix_to_share(batch) == 0
    short = _batch(prefix=MIN_SHARED_TOKENS // 3 - 1)  # 4 rows: (4 - 1) × prefix below the threshold
    assert CausalLMLoss(_lora(tiny_llama(seed=4))).prefix_to_share(short) == 0
    # where it is skipped, the loss is still the plain one
    plain, skipped = _loss_and_grads(mistral, batch, False), _loss_and_grads(mistral, batch, True)
    torch.testing.assert_close(skipped[0], plain[0], rtol=0, atol=0)


def test_training_batches_of_a_chat_template_share_its_system_prompt(tiny_dir, data_file, tmp_path):
    """Real rows (SmolLM2's chat template: its system prompt and the user header lead every row): the training
    configuration's model shares the prefix and keeps the plain gradients (fp32, lean blocks and kernels on)."""
    over = [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", f"output_dir={tmp_path}",
            "lora.r=4", "lora.lora_dropout=0", "training.precision=fp32"]
    cfg = load_train_config(None, over)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, init_lora_weights=False))
    torch.manual_seed(0)
    model, tok = build_model(cfg, torch.device("cpu"))
    model.train()
    examples, _ = D.build_dataset(D.read_records(str(data_file)), tok)
    batch = make_batch(examples, [0, 5, 17, 33, 2, 9], cfg, tok.pad_token_id, False)
    prefix = CausalLMLoss(model).prefix_to_share(batch)
    system = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert "You are a helpful AI assistant" in system
    assert prefix >= 20, prefix
    _assert_same(_loss_and_grads(model, batch, True), _loss_and_grads(model, batch, False))


def test_shared_prefix_on_a_qlora_model():
    """QLoRA's setup: an NF4 base (fp32 compute, so only summation order differs), checkpointing on every layer
    (prepare_for_kbit_training), LoRA on every linear layer."""
    from loraforge.quant.bnb import prepare_for_kbit_training, quantize_model

    torch.manual_seed(0)
    model = quantize_model(tiny_llama(seed=6, hidden_size=64, intermediate_size=128), "nf4",
                           compute_dtype=torch.float32)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    model = _lora(model)
    batch = _batch()
    assert CausalLMLoss(model).prefix_to_share(batch) == 24
    _assert_same(_loss_and_grads(model, batch, True), _loss_and_grads(model, batch, False))


def test_evaluation_builds_no_autograd_graph():
    """mean_token_loss (train's held-out loss, `loraforge eval`'s perplexity) runs without autograd: its
    @torch.no_grad() sat on perplexity_of, so evaluating a model with LoRA weights (or a QLoRA base, whose
    checkpointing is off in eval mode) saved every layer's activations for a backward that never came (the demo's
    QLoRA run: 1.05 -> 2.57 GB resident during its held-out pass). Nothing is saved for backward now, and the loss
    is the plain summed cross-entropy over supervised tokens divided by their count."""
    import torch.nn.functional as F

    from loraforge.training.evaluate import mean_token_loss

    model = tiny_llama(seed=4)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "default")
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 14, 6)]
    examples = [D.Example(input_ids=ids, labels=[-100] * 3 + list(ids[3:])) for ids in rows]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = mean_token_loss(model, examples, 0, batch_size=2, packing=False)
    assert saved == []
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
            target = torch.tensor(e.labels[1:])
            keep = target != -100
            total += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_evaluation_puts_the_callers_mode_back_when_it_is_interrupted():
    """mean_token_loss sets eval mode (no dropout) and put the caller's mode back only after its last batch: a
    Ctrl-C (or any error) in a notebook's evaluation left the model in eval mode, so the next training steps ran
    without dropout, unsaid. The mode comes back however it ends; an uninterrupted call is unchanged."""
    from loraforge.training.evaluate import mean_token_loss

    model = tiny_llama(seed=4)
    inject(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"), "default")
    examples = [D.Example(input_ids=list(range(3, 3 + n)), labels=list(range(3, 3 + n))) for n in (5, 7, 6)]
    model.train()
    calls = []

    def interrupt_second(module, args):
        calls.append(module.training)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = model.model.embed_tokens.register_forward_pre_hook(interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        mean_token_loss(model, examples, 0, batch_size=1, packing=False)
    handle.remove()
    assert calls == [False, False]  # evaluated in eval mode
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    mean_token_loss(model, examples, 0, batch_size=1, packing=False)
    assert not any(m.training for m in model.modules())


def test_evaluation_batches_by_tokens_and_gives_the_same_loss():
    """Held-out examples go EVAL_ACTIVATIONS (positions × MLP width) a forward, at most EVAL_MAX_BATCH examples and
    at least max(batch_size, 8), where they went max(batch_size, 8) at a time: the demo's 100 took 3.1 s instead
    of 5.6, and a wide model gets no more than before. The mean token loss does not depend on the grouping (fp32)."""
    from loraforge.training.evaluate import (EVAL_ACTIVATIONS, EVAL_MAX_BATCH, eval_batch_size, mean_token_loss,
                                             mlp_width)

    def examples(*lengths):
        return [D.Example(input_ids=[5] * n, labels=[5] * n) for n in lengths]

    assert EVAL_ACTIVATIONS == 16384 * 1536 and EVAL_MAX_BATCH == 64
    assert eval_batch_size(examples(80, 68), 1536) == 64  # the built-in model's short rows: the most examples
    assert eval_batch_size(examples(80, 600), 1536) == 27  # 16384 // 600
    assert eval_batch_size(examples(4096), 1536, at_least=1) == 4 and eval_batch_size(examples(4096), 1536) == 8
    assert eval_batch_size(examples(512), 11008) == 8  # a 7B Llama's MLP: 2,286 positions, so the old 8 examples
    assert eval_batch_size(examples(100000), 1536) == 8 and eval_batch_size(examples(80), 1536, at_least=100) == 100
    assert eval_batch_size([], 1536, at_least=2) == 64
    model = tiny_llama(seed=5)
    assert mlp_width(model) == model.config.intermediate_size and mlp_width(torch.nn.Linear(2, 2)) == 1536
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 14, 6, 11, 3, 8, 12, 7, 10, 5)]
    held = [D.Example(input_ids=ids, labels=[-100] * 2 + list(ids[2:])) for ids in rows]
    for packing in (False, True):
        by_tokens = mean_token_loss(model, held, 0, packing=packing)  # all 10 in one forward
        in_twos = mean_token_loss(model, held, 0, batch_size=2, packing=packing)
        assert by_tokens == pytest.approx(in_twos, rel=1e-6)


def test_evaluation_uses_the_training_loss_head_buffers():
    """mean_token_loss with the training loss's HeadBuffers (as train() evaluates between steps) gives the loss of
    one with its own buffers and allocates no second set: the held buffer is the same memory afterwards."""
    from loraforge.training.evaluate import mean_token_loss

    model = tiny_llama(seed=3)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "default")
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 14, 6)]
    examples = [D.Example(input_ids=ids, labels=list(ids)) for ids in rows]
    train_loss = CausalLMLoss(model)
    batch = D.collate(examples, 0)
    train_loss(batch)[0].backward()
    before = {k: t.data_ptr() for k, t in train_loss.head_buffers._held.items()}
    assert before  # the training call holds its chunk
    shared = mean_token_loss(model, examples, 0, batch_size=8, head_buffers=train_loss.head_buffers)
    own = mean_token_loss(model, examples, 0, batch_size=8)
    assert shared == own
    assert {k: t.data_ptr() for k, t in train_loss.head_buffers._held.items()} == before
