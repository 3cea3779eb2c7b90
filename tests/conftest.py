"""Shared fixtures (tiny models, a tiny model saved to disk, a small dataset); the builders are in helpers.py."""

import signal

import pytest
import torch

from helpers import VOCAB, tiny_gpt2, tiny_llama
from loraforge.utils.hub import hub_resolves

# A suite started in the background by a non-interactive shell (`bash .ci/run &` in a script) inherits SIGINT
# ignored, and so would the processes it starts. The tests that stop something with SIGINT (the CLI's Ctrl-C, the
# dashboard's Stop, whose uvicorn runs in a thread here and installs no handler) need it as Python sets it in a
# foreground process. `loraforge ui` itself serves in its main thread, where uvicorn handles SIGINT, so the runs it
# launches never inherit it ignored.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def fresh_hub_lookup():
    """Each test looks the Hub's host up anew: the answer is kept for the process (utils.hub.hub_resolves), and
    tests stand in for the resolver (socket.getaddrinfo) one way or the other."""
    hub_resolves.cache_clear()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two threads of tiny matmuls spin against other processes (a
    tiny Gemma 2's greedy decode took 7.5 s on 2 threads under load, 0.14 s on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
