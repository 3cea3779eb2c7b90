"""The probe scorers against plain, unbatched formulas on a tiny random Llama, and the shipped probe data."""

import collections
import math

import pytest
import torch
import torch.nn.functional as F

from loraforge.studies import probes
from loraforge.models import load_tokenizer

# fp32 everywhere. Batched (right-padded) and unbatched forwards differ only by float reordering in the matmuls
# (~1e-6 relative on a 64-wide model); sums of a few hundred log-probs keep that well inside 1e-4.
TOL = dict(rtol=1e-4, atol=1e-4)
# A multiple-choice score computed from the question's cached keys and values against the option as one full
# sequence: the same fp32 arithmetic in other matmul shapes. Scores are sums of at most 7 log-probs of |score| < 60;
# observed differences are <= 4e-6 absolute (3e-7 relative) on both tiny models, so this leaves a margin of ~3x on
# the absolute term while a wrong position id or a missed key (differences of 0.1 and more) cannot pass.
MC_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def tiny_llama(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a wider init than the default 0.02, so distributions are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def other_model(tokenizer):
    return tiny_llama(len(tokenizer), seed=1)


def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one unpadded sequence: (T, V)."""
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


ITEMS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Lyon", "a very long option text", "Nice"],
     "answer": 0},
    {"question": "What is 7 + 5?", "choices": ["11", "12", "13", "10"], "answer": 1},
    {"question": "Which planet is known as the Red Planet?", "choices": ["Venus", "Jupiter", "Mars", "Earth"],
     "answer": 2},
    {"question": "Short?", "choices": ["yes", "no", "maybe", "it depends on the weather"], "answer": 3},
    {"question": "What do bees make?", "choices": ["honey", "silk"], "answer": 0},
]


def test_continuation_logprobs_match_per_option_loop(model, tokenizer):
    pairs = [(f"Question: {it['question']}\nAnswer:", " " + c) for it in ITEMS for c in it["choices"]]
    expected = []
    for context, continuation in pairs:
        ctx = tokenizer(context).input_ids
        cont = tokenizer(context + continuation).input_ids[len(ctx):]
        logprobs = plain_logprobs(model, ctx + cont)
        expected.append(sum(logprobs[len(ctx) - 1 + k, tok].item() for k, tok in enumerate(cont)))
    got = probes.continuation_logprobs(model, tokenizer, pairs, batch_size=3)  # batches of mixed lengths
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               **TOL)


def test_mc_accuracy_matches_argmax_of_plain_scores(model, tokenizer):
    correct = correct_norm = 0
    for it in ITEMS:
        context = f"Question: {it['question']}\nAnswer:"
        ctx = tokenizer(context).input_ids
        scores = []
        for choice in it["choices"]:
            cont = tokenizer(context + " " + choice).input_ids[len(ctx):]
            logprobs = plain_logprobs(model, ctx + cont)
            scores.append(sum(logprobs[len(ctx) - 1 + k, tok].item() for k, tok in enumerate(cont)))
        correct += max(range(len(scores)), key=scores.__getitem__) == it["answer"]
        normed = [s / len(c) for s, c in zip(scores, it["choices"])]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == it["answer"]
    result = probes.mc_accuracy(model, tokenizer, ITEMS, batch_size=4)
    assert (result["n"], result["correct"], result["correct_norm"]) == (len(ITEMS), correct, correct_norm)
    assert result["accuracy"] == correct / len(ITEMS) and result["acc_norm"] == correct_norm / len(ITEMS)
    assert result["ci95"] == probes.wilson_interval(correct, len(ITEMS))


def tiny_gpt2(vocab_size: int, seed: int):
    """GPT-2 learns absolute position embeddings: the options' position ids must continue after their question."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256)).eval()


# Options of 1 to 6 tokens, 2 to 4 per question, questions of different lengths: both passes are padded.
VARIED = ITEMS + [
    {"question": "Pick a letter.", "choices": ["A", "B", "C"], "answer": 1},  # single-token options
    {"question": "Which of these is the longest answer among the ones listed here, counting words?",
     "choices": ["one", "one two three four five", "one two"], "answer": 1},
]


def per_option_scores(model, tokenizer, items) -> torch.Tensor:
    """Today's scorer, one option at a time: the whole sequence question + option, no padding, no batch."""
    scores = []
    for it in items:
        for choice in it["choices"]:
            ctx, cont = probes._encode_pair(tokenizer, f"Question: {it['question']}\nAnswer:", " " + choice)
            logprobs = plain_logprobs(model, ctx + cont)
            scores.append(sum(logprobs[len(ctx) - 1 + k, tok].item() for k, tok in enumerate(cont)))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_mc_shared_question_scores_equal_full_sequences(tokenizer, family, batch_size):
    """Each question computed once (its keys and values shared by its options) gives the scores of every option run
    as its own full sequence, and of today's batched full-sequence scorer (continuation_logprobs)."""
    model = tiny_llama(len(tokenizer), seed=0) if family == "llama" else tiny_gpt2(len(tokenizer), seed=0)
    question_rows = []  # rows of each question pass (the options' passes carry position ids)
    model.base_model.register_forward_pre_hook(
        lambda m, args, kwargs: None if "position_ids" in kwargs else question_rows.append(len(kwargs["input_ids"])),
        with_kwargs=True)
    got = torch.tensor(probes.mc_option_logprobs(model, tokenizer, VARIED, batch_size), dtype=torch.float64)
    # One row per question: each question ran once, not once per option.
    assert question_rows == [len(VARIED[i:i + batch_size]) for i in range(0, len(VARIED), batch_size)]
    torch.testing.assert_close(got, per_option_scores(model, tokenizer, VARIED), **MC_TOL)
    pairs = [(f"Question: {it['question']}\nAnswer:", " " + c) for it in VARIED for c in it["choices"]]
    batched = probes.continuation_logprobs(model, tokenizer, pairs, batch_size=4)
    torch.testing.assert_close(got, torch.tensor(batched, dtype=torch.float64), **MC_TOL)


def test_mc_single_token_options_need_no_second_pass(model, tokenizer):
    items = [{"question": "Pick a letter.", "choices": ["A", "B", "C", "D"], "answer": 0}]
    assert all(len(probes._encode_pair(tokenizer, "Question: Pick a letter.\nAnswer:", " " + c)[1]) == 1
               for c in items[0]["choices"])
    calls = []
    hook = model.base_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        got = probes.mc_option_logprobs(model, tokenizer, items)
    finally:
        hook.remove()
    assert len(calls) == 1
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), per_option_scores(model, tokenizer, items),
                               **MC_TOL)


def test_mc_logits_callable_is_scored_as_full_sequences(model, tokenizer):
    """A plain (input_ids, attention_mask) -> logits callable has no cache to share: today's scorer, same scores."""
    def logits_fn(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    got = probes.mc_option_logprobs(logits_fn, tokenizer, VARIED)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), per_option_scores(model, tokenizer, VARIED),
                               **MC_TOL)


def test_perplexity_head_on_scored_positions_equals_full_logits(model, tokenizer):
    text = probes.load_probe("text")[:1500]
    as_module = probes.perplexity(model, tokenizer, text, max_len=40, stride=16, batch_size=3)
    as_logits = probes.perplexity(lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits, tokenizer,
                                  text, max_len=40, stride=16, batch_size=3)
    assert as_module["n_tokens"] == as_logits["n_tokens"]
    torch.testing.assert_close(torch.tensor(as_module["nll"], dtype=torch.float64),
                               torch.tensor(as_logits["nll"], dtype=torch.float64), **TOL)


def test_mc_accuracy_rejects_bad_answer(model, tokenizer):
    with pytest.raises(ValueError, match="answer 4"):
        probes.mc_accuracy(model, tokenizer, [{"question": "q", "choices": ["a", "b"], "answer": 4}])


def test_wilson_interval_endpoints_solve_the_score_equation():
    # Wilson's interval is every p0 with |p_hat - p0| <= z * sqrt(p0 (1 - p0) / n): both endpoints make that an
    # equality. Checked by the defining equation, not by re-deriving the closed form.
    z = 1.959963984540054
    for k, n in [(30, 120), (121, 200), (0, 10), (10, 10), (1, 3)]:
        lo, hi = probes.wilson_interval(k, n)
        ends = torch.tensor([lo, hi], dtype=torch.float64)
        torch.testing.assert_close((k / n - ends) ** 2, z * z * ends * (1 - ends) / n, rtol=1e-9, atol=1e-12)
        assert lo - 1e-12 <= k / n <= hi + 1e-12  # at k = n the upper end is 1 up to rounding
    # A published value: 0 successes in 10 trials gives (0, 0.2775).
    torch.testing.assert_close(torch.tensor(probes.wilson_interval(0, 10), dtype=torch.float64),
                               torch.tensor([0.0, 0.2775], dtype=torch.float64), rtol=0, atol=5e-5)


def plain_perplexity(model, tokens: list[int], max_len: int, stride: int) -> tuple[float, int]:
    """Per-window loop: each window scores the tokens past those already scored (HF's strided recipe)."""
    nll, count, scored_until, start = 0.0, 0, 0, 0
    while True:
        end = min(start + max_len, len(tokens))
        window = tokens[start:end]
        logprobs = plain_logprobs(model, window)
        for j in range(max(start + 1, scored_until), end):
            nll -= logprobs[j - start - 1, tokens[j]].item()
            count += 1
        scored_until = end
        start += stride
        if end == len(tokens) or start >= len(tokens) - 1:
            return nll / count, count


@pytest.mark.parametrize("max_len,stride", [(32, None), (32, 32), (32, 8), (50, 49), (1000, None)])
def test_perplexity_matches_plain_window_loop(model, tokenizer, max_len, stride):
    text = probes.load_probe("text")[:1500]
    tokens = tokenizer(text).input_ids
    nll, count = plain_perplexity(model, tokens, max_len, stride or max_len)
    result = probes.perplexity(model, tokenizer, text, max_len=max_len, stride=stride, batch_size=3)
    assert result["n_tokens"] == count
    torch.testing.assert_close(torch.tensor([result["nll"], result["ppl"]], dtype=torch.float64),
                               torch.tensor([nll, math.exp(nll)], dtype=torch.float64), **TOL)


def test_perplexity_counts(model, tokenizer):
    text = probes.load_probe("text")[:1500]
    n = len(tokenizer(text).input_ids)
    # Non-overlapping windows: every token except those at multiples of 32 (window starts) is predicted.
    assert probes.perplexity(model, tokenizer, text, max_len=32)["n_tokens"] == n - math.ceil(n / 32)
    # Overlapping windows: every token except the very first is predicted exactly once.
    assert probes.perplexity(model, tokenizer, text, max_len=32, stride=8)["n_tokens"] == n - 1


def plain_kl(base, tuned, ids: list[int]) -> torch.Tensor:
    """KL(p || q) at each position by the explicit sum p * (log p - log q): (T,)."""
    log_p, log_q = plain_logprobs(base, ids), plain_logprobs(tuned, ids)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def test_kl_matches_explicit_sum(model, other_model, tokenizer):
    prompts = probes.load_probe("kl")[:7]
    encoded = probes.encode_prompts(tokenizer, prompts)
    per_position = torch.cat([plain_kl(model, other_model, ids) for ids in encoded])
    result = probes.kl_divergence(model, other_model, tokenizer, prompts, batch_size=3)
    assert result["n_positions"] == per_position.numel() == sum(len(ids) for ids in encoded)
    torch.testing.assert_close(torch.tensor(result["kl"], dtype=torch.float64),
                               per_position.double().mean(), **TOL)
    assert result["kl"] > 0.01  # two different random models: the test above is not comparing zeros


def test_kl_accepts_logits_callables(model, other_model, tokenizer):
    prompts = probes.load_probe("kl")[:5]
    as_modules = probes.kl_divergence(model, other_model, tokenizer, prompts)

    def base_fn(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    def tuned_fn(input_ids, attention_mask):
        return other_model(input_ids=input_ids, attention_mask=attention_mask).logits

    as_callables = probes.kl_divergence(base_fn, tuned_fn, tokenizer, prompts)
    # Modules compute the prompts' shared chat-template prefix once (prefix_sharing_logits), plain callables run
    # every row in full: the same fp32 arithmetic in other shapes, so equal up to TOL, not bit for bit.
    assert as_callables["n_positions"] == as_modules["n_positions"]
    torch.testing.assert_close(torch.tensor(as_callables["kl"], dtype=torch.float64),
                               torch.tensor(as_modules["kl"], dtype=torch.float64), **TOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_sharing_logits_equal_plain_forward(tokenizer, family):
    model = tiny_llama(len(tokenizer), seed=0) if family == "llama" else tiny_gpt2(len(tokenizer), seed=0)
    encoded = probes.encode_prompts(tokenizer, probes.load_probe("kl")[:5])  # a shared system prompt, then each own
    ids, mask = probes._pad_right(encoded, probes._pad_id(tokenizer), "cpu")
    shapes = []
    hook = model.base_model.register_forward_pre_hook(
        lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    with torch.no_grad():
        got = probes.prefix_sharing_logits(model)(ids, mask)
        hook.remove()
        expected = model(input_ids=ids, attention_mask=mask).logits
    prefix = shapes[0][1]
    assert shapes[0][0] == 1 and prefix >= 20  # the shared prefix ran once, as one row
    assert shapes[1] == (len(encoded), ids.shape[1] - prefix)
    real = mask.bool()  # padded positions are never used
    # Logits (not sums): the fp32 reordering error of a 2-layer model is ~1e-6 of logits of size ~10.
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_kl_of_model_with_itself_is_zero(model, tokenizer):
    result = probes.kl_divergence(model, model, tokenizer, probes.load_probe("kl")[:12], batch_size=16)
    assert result["kl"] == 0.0 and result["n_positions"] > 0


def test_prompts_use_chat_template(tokenizer):
    ids = probes.encode_prompts(tokenizer, ["Hello there"])[0]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n") and "Hello there" in text
    assert probes.encode_prompts(tokenizer, ["Hello there"], chat_template=False)[0] == \
        tokenizer("Hello there").input_ids


def test_mc_asset():
    items = probes.load_probe("mc")
    assert len(items) >= 120
    for it in items:
        assert set(it) == {"question", "choices", "answer", "subject"}, it
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4, it
        assert isinstance(it["answer"], int) and 0 <= it["answer"] <= 3, it
    assert len({it["question"] for it in items}) == len(items)  # no duplicated question
    positions = collections.Counter(it["answer"] for it in items)
    assert max(positions.values()) - min(positions.values()) <= 2, positions
    assert len({it["subject"] for it in items}) >= 6


def test_text_and_prompt_assets():
    text = probes.load_probe("text")
    assert 3000 <= len(text.split()) <= 5000
    prompts = probes.load_probe("kl")
    assert len(prompts) >= 30 and all(isinstance(p, str) and p.strip() for p in prompts)
    assert len(set(prompts)) == len(prompts)


def test_scorers_run_in_bf16(tokenizer):
    # Smoke test only: bf16 logits go through an fp32 log-softmax, so results are finite and counts unchanged.
    model = tiny_llama(len(tokenizer), seed=0).to(torch.bfloat16)
    text = probes.load_probe("text")[:800]
    result = probes.perplexity(model, tokenizer, text, max_len=64)
    assert math.isfinite(result["ppl"]) and result["n_tokens"] == len(tokenizer(text).input_ids) - math.ceil(
        len(tokenizer(text).input_ids) / 64)
    assert probes.mc_accuracy(model, tokenizer, ITEMS)["n"] == len(ITEMS)
    assert probes.kl_divergence(model, model, tokenizer, ["Hello"])["kl"] == 0.0


def test_load_probe_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown probe 'mmlu'"):
        probes.load_probe("mmlu")


def test_perplexity_windows_fit_the_models_context(model, tokenizer):
    """The probe's 512-token windows crashed a GPT-2 of 128 positions (IndexError in its position embedding) and
    ran a 256-context Llama on positions it never saw: the default window is the context where that is shorter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    text = probes.load_probe("text")[:3000]
    tokens = tokenizer(text).input_ids
    assert len(tokens) > 512
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                      n_positions=128)).eval()
    for net, window in ((gpt2, 128), (model, 256)):  # the tiny Llama: max_position_embeddings 256
        assert probes.probe_window(net) == window
        nll, count = plain_perplexity(net, tokens, window, window)
        result = probes.perplexity(net, tokenizer, text)
        assert result["n_tokens"] == count == len(tokens) - math.ceil(len(tokens) / window)
        torch.testing.assert_close(torch.tensor(result["nll"], dtype=torch.float64),
                                   torch.tensor(nll, dtype=torch.float64), **TOL)
    # A logits callable names no context; a context past 512 keeps 512-token windows.
    assert probes.probe_window(lambda ids, mask: model(input_ids=ids).logits) == probes.PPL_WINDOW == 512
    model.config.max_position_embeddings = 8192
    try:
        assert probes.probe_window(model) == 512
    finally:
        model.config.max_position_embeddings = 256
