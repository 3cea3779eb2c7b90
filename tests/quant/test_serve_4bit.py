"""`serve --quantize` and `ui --quantize`: adapters served over the bitsandbytes base they trained on (QLoRA), each
answer PEFT's greedy tokens over bitsandbytes' 4-bit base, and `generate --quantize`'s text. The servers run in
this process: their uvicorn loop is replaced by requests through FastAPI's TestClient on the app they built."""

import shutil

import peft
import pytest
from fastapi.testclient import TestClient

from helpers import full_forward_greedy, randomize, tiny_llama
from loraforge.cli import main
from loraforge.config import LoraConfig
from loraforge.decoding import greedy
from loraforge.inference.llama import Decoder
from loraforge.lora.adapters import save_adapter
from loraforge.lora.inject import inject
from loraforge.models import load_model, load_tokenizer
from loraforge.serve import Engine, SamplingParams, api
from loraforge.ui import app as ui_app

PROMPT = "The capital of France is"
N = 12


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """(base folder, adapter folder): a 64-wide Llama (bnb's CPU 4-bit kernels need in_features % 64 == 0) with the
    real tokenizer, and an adapter on every linear layer saved over its NF4 base, as a QLoRA run saves one."""
    root = tmp_path_factory.mktemp("qserve")
    tok = load_tokenizer("smollm2-135m")
    tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = load_model(str(root / "base"), "fp32", quantize="nf4")
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "qa")
    save_adapter(randomize(model, seed=3), root / "qa", "qa")
    return root / "base", root / "qa"


def peft_text(base_dir, adapter, quantize):
    """PEFT's greedy text: PeftModel over load_model's base (bitsandbytes' NF4 layers, or the fp32 one), a full
    forward per token."""
    tok = load_tokenizer(str(base_dir))
    model = peft.PeftModel.from_pretrained(load_model(str(base_dir), "fp32", quantize=quantize), adapter).eval()
    return tok.decode(full_forward_greedy(model, tok(PROMPT)["input_ids"], N), skip_special_tokens=True)


def served(monkeypatch, module, argv):
    """(completion, chat answer) the server started by `argv` gives PROMPT with adapter "qa" (greedy, N tokens)."""
    answers = []

    def ask(app, *args, announce, **kwargs):
        announce(8000)  # listening: the start-up line
        with TestClient(app, base_url="http://127.0.0.1:8000") as client:  # the host the guard expects
            sampling = {"model": "qa", "max_tokens": N, "temperature": 0, "ignore_eos": True}
            r = client.post("/v1/completions", json={"prompt": PROMPT, **sampling})
            chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                             **sampling})
            assert (r.status_code, chat.status_code) == (200, 200), (r.text, chat.text)
            answers.append((r.json()["choices"][0]["text"], chat.json()["choices"][0]["message"]["content"]))

    monkeypatch.setattr(module, "run_until_signal", ask)
    assert main(argv) == 0
    return answers[0]


def test_serve_quantize_answers_what_peft_answers_over_the_4bit_base(qlora, monkeypatch, tmp_path, capsys):
    """serve had no --quantize: a QLoRA adapter was served over the full-precision base it never trained on, and
    its greedy text was another (logits ~0.09 apart on SmolLM2). With --quantize nf4 the served text is PEFT's over
    bitsandbytes' NF4 base, token for token (fp32 compute), and `generate --quantize nf4`'s."""
    base_dir, adapter = qlora
    want = peft_text(base_dir, adapter, "nf4")
    assert want != peft_text(base_dir, adapter, None)  # the full-precision base answers otherwise
    argv = ["--model", str(base_dir), "--precision", "fp32", "--quantize", "nf4"]
    text, chat = served(monkeypatch, api, ["serve", *argv, "--adapter", f"qa={adapter}"])
    assert text == want
    assert "(nf4 base)" in capsys.readouterr().out  # the start line says which base is served
    runs = tmp_path / "runs"
    shutil.copytree(adapter, runs / "qa" / "adapter")  # a QLoRA run's folder, as the dashboard lists it
    assert served(monkeypatch, ui_app, ["ui", *argv, "--runs", str(runs)]) == (text, chat)
    capsys.readouterr()
    assert main(["generate", PROMPT, *argv, "--adapter", str(adapter), "--max-new-tokens", str(N)]) == 0
    assert capsys.readouterr().out.rstrip("\n") == chat  # the chat template's prompt, as generate sends it


def test_serve_quantize_refuses_a_bad_value_before_loading(qlora, capsys):
    assert main(["serve", "--model", str(qlora[0]), "--quantize", "nf5"]) == 2
    assert capsys.readouterr().err.endswith("--quantize 'nf5': use one of nf4, fp4, int8 (the one a QLoRA adapter "
                                            "trained over), or leave it out for the full-precision base\n")


def test_the_fast_paths_leave_a_4bit_base_to_transformers_forward(qlora):
    """The static decoder and its C kernels read each linear's float `weight` (StoredWeight): a bitsandbytes layer's
    is packed 4-bit codes (uint8, half the columns), not weights. They refuse such a base, naming it, and the engine
    and greedy decoding take transformers' forward, whose answers are those of a full forward per token."""
    tok = load_tokenizer(str(qlora[0]))
    model = load_model(str(qlora[0]), "fp32", quantize="nf4")
    with pytest.raises(NotImplementedError, match="the static decoder does not run a bitsandbytes-quantized base"):
        Decoder(model, 1, 16)
    with pytest.raises(ValueError, match="static=True: the static decoder does not run a bitsandbytes-quantized base"):
        Engine(model, tok, static=True)
    prompt = tok(PROMPT)["input_ids"]
    engine = Engine(model, tok)
    try:
        assert engine.static is False
        got = engine.generate(prompt, None, SamplingParams(max_tokens=N, ignore_eos=True)).token_ids
    finally:
        engine.stop()
    want = full_forward_greedy(model, prompt, N)
    assert got == want
    assert greedy(model, [prompt], stop=[], max_new_tokens=N) == [want]  # eval's decoding, static asked for
