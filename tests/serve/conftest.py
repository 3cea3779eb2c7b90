"""What the engine tests share: one torch thread, the real tokenizer, a tiny Llama base, adapters saved from it."""

import pytest

from helpers import tiny_llama
from loraforge.models import load_tokenizer
from loraforge.serve import Engine


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m")  # real tokenizer (chat template, decode); the model stays tiny


@pytest.fixture(scope="session")
def base(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=96)


@pytest.fixture(scope="module", autouse=True, params=["static", "forward"])
def decode_path(request):
    """Every serve test twice: on the static decoder (what a Llama-family base takes) and on transformers' forward
    with its concatenated cache (what other bases take), by the engine's `static` default."""
    if request.param == "static":
        yield request.param
        return
    init = Engine.__init__

    def forward_path(self, *args, **kwargs):
        kwargs.setdefault("static", False)
        init(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "__init__", forward_path)
        yield request.param
