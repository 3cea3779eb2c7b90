"""What the engine tests share: one torch thread, the real tokenizer, a tiny Llama base, adapters saved from it."""

import pytest
import torch

from helpers import tiny_llama
from loraforge.models import load_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m")  # real tokenizer (chat template, decode); the model stays tiny


@pytest.fixture(scope="session")
def base(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=96)
