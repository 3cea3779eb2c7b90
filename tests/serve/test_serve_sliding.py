"""Bases that transformers' forward runs with sliding-window layers (Gemma 2 first): a soak found every such base
hung, its requests lost when the batch's join raised after their prompts had left the queue."""

import copy
import queue

import pytest

from loraforge.serve import Engine, SamplingParams
from loraforge.serve.batch import Batch
from test_serve_engine import collect, prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_failed_join_ends_its_requests(base, tokenizer, monkeypatch):
    """Requests that left the queue for a prefill end with an error if their rows cannot join the batch, and the
    engine serves on; they were lost (their clients waited for ever) when Gemma 2's join raised."""
    def no_room(*args):
        raise RuntimeError("no room")

    engine = Engine(copy.deepcopy(base), tokenizer, static=False)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(Batch, "join", no_room)
            q = queue.Queue()
            engine.submit(prompts(len(tokenizer), [5])[0], None, SamplingParams(max_tokens=4), q.put)
            _, _, last = collect(q, timeout=30)
        assert last.finish_reason == "error" and last.error == "RuntimeError: no room"
        assert engine.generate(prompts(len(tokenizer), [5])[0], None, SamplingParams(max_tokens=4),
                               timeout=30).completion_tokens == 4
    finally:
        engine.stop()
