"""Shared fixtures: tiny randomly initialised transformers models built in code (seconds, no downloads)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (3, 11), generator=g)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gpt2()


@pytest.fixture(scope="session")
def smollm2():
    """The built-in model (fp32) and tokenizer; converted once into the cache."""
    from loraforge.models import load_base

    return load_base("smollm2-135m", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a transformers directory."""
    from loraforge.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab_size=len(tok), tie_word_embeddings=True).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """40 short instruction records (additions), JSONL."""
    import json

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}
            for a in range(8) for b in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
