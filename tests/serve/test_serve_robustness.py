"""Issue 19's four defects with their exact inputs, per-request isolation, and the API's refusals.

Each answered completion is compared with the engine's greedy output (which test_serve_engine.py compares with a
plain greedy loop): a temperature or top_p so small that only the best token can be drawn must give exactly the
greedy text, and greedy requests batched with it must too.
"""

import copy
import queue
import shutil
import threading
import time

import httpx
import pytest
import torch

from loraforge.serve import Engine, SamplingParams, ServeError
from loraforge.serve.api import ServerThread, create_app
from loraforge.serve.sampling import sample
from test_serve_engine import adapters_dir, collect, prompts, reference  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]

KEY = "sk-test"
PROMPT = "The quick brown fox"
TINY = 5e-324  # the smallest positive float


@pytest.fixture(scope="module")
def server(base, tokenizer, adapters_dir, tmp_path_factory, decode_path):  # noqa: F811
    root = tmp_path_factory.mktemp("upload")
    for name in ("a", "b"):
        shutil.copytree(adapters_dir / name, root / name)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    shutil.copy(adapters_dir / "a" / "adapter_config.json", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}garbage")
    engine = Engine(copy.deepcopy(base), tokenizer, base_name="tiny", adapters_dir=root, max_loaded=1,
                    adapters={"a": root / "a"})
    with ServerThread(create_app(engine, api_key=KEY)) as url:
        yield engine, url
    engine.stop()


def post(server, path, body, timeout=60):
    return httpx.post(server[1] + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


def greedy_text(server, model, n):
    ids = server[0].tokenizer(PROMPT)["input_ids"]
    return server[0].generate(ids, None if model == "tiny" else model, SamplingParams(max_tokens=n,
                                                                                       ignore_eos=True)).text


def held(engine):
    """Hold the engine between two steps until the returned event is set (requests pile up, then batch)."""
    gate, holding = threading.Event(), threading.Event()
    engine.call(lambda: (holding.set(), gate.wait(60)))
    assert holding.wait(30)
    return gate


def concurrently(server, bodies, path="/v1/completions"):
    results = [None] * len(bodies)

    def go(i):
        results[i] = post(server, path, bodies[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, results


def wait_waiting(engine, n):
    deadline = time.monotonic() + 30
    while engine.load()["waiting"] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load()["waiting"] >= n


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"top_p": 1e-300, "temperature": 1.0},
                                     {"temperature": TINY}, {"top_p": TINY, "temperature": 2.0},
                                     {"temperature": TINY, "top_p": TINY, "top_k": 1, "seed": 2**64 - 1}])
def test_extreme_sampling_batched_with_greedy_requests(server, extreme):
    """Defect 1: it answered 500 and failed the 8 greedy requests in its batch. Now every one answers, and a
    temperature / top_p that leaves only the best token gives exactly the greedy text."""
    n = 8
    expected = {m: greedy_text(server, m, n) for m in ("a", "tiny")}
    greedy = [{"model": m, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
              for m in ("a", "tiny") * 4]
    bad = {"model": "a", "prompt": PROMPT, "max_tokens": n, "ignore_eos": True, **extreme}
    gate = held(server[0])
    threads, results = concurrently(server, greedy + [bad])
    try:
        wait_waiting(server[0], len(greedy) + 1)  # all nine in one batch
    finally:
        gate.set()
    for t in threads:
        t.join()
    for body, r in zip(greedy + [bad], results):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[body["model"]]


def test_sampling_is_finite_for_every_accepted_value():
    """The sampler alone: tiny temperatures/top_p pick the argmax; ties at a tiny temperature split evenly;
    a seed repeats; top_k=1 is the argmax."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 30
    best = int(logits.argmax())
    for t, p in [(TINY, 1.0), (1e-300, 1.0), (1.0, TINY), (100.0, TINY), (1e-38, 1e-38)]:
        params = SamplingParams(temperature=t, top_p=p)
        assert all(sample(logits, params, torch.Generator().manual_seed(s)) == best for s in range(20))
    assert sample(logits, SamplingParams(temperature=100.0, top_k=1), torch.Generator()) == best
    tied = torch.zeros(4)
    drawn = {sample(tied, SamplingParams(temperature=TINY), torch.Generator().manual_seed(s)) for s in range(64)}
    assert drawn == {0, 1, 2, 3}
    params = SamplingParams(temperature=1.0, seed=2**64 - 1)
    a = [sample(logits, params, torch.Generator().manual_seed(2**64 - 1)) for _ in range(3)]
    assert len(set(a)) == 1
    for bad in [dict(seed=2**64), dict(seed=-1), dict(seed=-(2**63) - 1), dict(temperature=float("nan")),
                dict(top_p=float("inf")), dict(top_k=-2), dict(top_k=1.5), dict(max_tokens=True)]:
        with pytest.raises(ServeError, match=next(iter(bad))):
            SamplingParams(**bad)


@pytest.mark.parametrize("seed", [18446744073709551616, -(2**63) - 1, -1])
def test_seed_out_of_range_is_400(server, seed):
    """Defect 2: a plain-text 500 (torch.Generator overflow). Now a 400 naming the field."""
    r = post(server, "/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": 2, "temperature": 1,
                                         "seed": seed})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "invalid_request_error" and "seed" in r.json()["error"]["message"]
    ok = post(server, "/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": 2, "temperature": 1,
                                          "seed": 18446744073709551615})
    assert ok.status_code == 200


def test_non_string_content_part_is_400(server):
    """Defect 3: a TypeError in the chat template step, a plain-text 500. Now a 400 naming the field."""
    r = post(server, "/v1/chat/completions", {"model": "a", "max_tokens": 2,
                                              "messages": [{"role": "user", "content": [{"type": "text",
                                                                                         "text": 123}]}]})
    assert r.status_code == 400 and "messages.0.content" in r.json()["error"]["message"]
    good = post(server, "/v1/chat/completions", {"model": "a", "max_tokens": 2, "temperature": 0,
                                                 "messages": [{"role": "user", "content": [{"type": "text",
                                                                                            "text": "Hi"}]}]})
    assert good.status_code == 200


@pytest.mark.parametrize("body", [
    {"temperature": "0.5"}, {"temperature": 2.5}, {"temperature": None}, {"top_p": 0}, {"top_p": 1.5},
    {"top_k": -2}, {"top_k": 2.5}, {"max_tokens": 0}, {"max_tokens": "8"}, {"max_tokens": 1.5},
    {"stop": 5}, {"stop": [1, 2]}, {"stop": ["x"] * 9}, {"stop": [""]}, {"stream": "yes"}, {"n": 2},
    {"seed": 1.5}, {"seed": "7"}, {"ignore_eos": "no"}, {"prompt": 5}, {"prompt": [-1]}, {"prompt": [10**9]},
    {"prompt": ["a", "b"]}, {"prompt": []}, {"model": 7}, {"stream_options": 3}])
def test_every_field_is_checked(server, body):
    r = post(server, "/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": 2, **body})
    assert r.status_code == 400, (body, r.status_code, r.text)
    assert r.headers["content-type"] == "application/json" and r.json()["error"]["message"]


@pytest.mark.parametrize("messages", [
    [], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}], "hi"])
def test_chat_messages_are_checked(server, messages):
    r = post(server, "/v1/chat/completions", {"model": "a", "max_tokens": 2, "messages": messages})
    assert r.status_code == 400, (messages, r.status_code, r.text)
    assert r.json()["error"]["type"] == "invalid_request_error"


def slow_consumer(q: queue.Queue):
    """An on_event that takes 10 ms a token (the engine thread waits on it): an 80-token request then holds its slot
    for about 0.8 s however fast the steps are, while the checks below run between two of them."""
    def on_event(ev):
        q.put(ev)
        time.sleep(0.01)
    return on_event


def test_corrupt_upload_is_refused_while_every_slot_is_busy(server):
    """Defect 4: with every slot in use, a corrupt safetensors file answered 200 "loaded" and its requests got
    500. Now the files are checked before the answer, whether or not a slot is free (max_loaded=1 here)."""
    engine = server[0]
    for busy in (True, False):
        q = queue.Queue()
        if busy:  # "a" holds the only slot for 80 slow steps
            engine.submit([1, 2, 3, 4], "a", SamplingParams(max_tokens=80, ignore_eos=True), slow_consumer(q))
            q.get(timeout=30)
        r = post(server, "/v1/adapters", {"name": "broken", "path": "corrupt"})
        if busy:
            assert engine.load()["running"] == 1  # the slot was busy while it was checked
        assert r.status_code == 400 and "corrupt" in r.json()["error"]["message"], r.text
        assert "broken" not in engine.adapter_names()
        if busy:
            assert collect(q)[2].finish_reason == "length"
    # a good adapter uploaded while the slot is busy: accepted, checked, served on first use
    q = queue.Queue()
    engine.submit([1, 2, 3, 4], "a", SamplingParams(max_tokens=80, ignore_eos=True), slow_consumer(q))
    q.get(timeout=30)
    assert post(server, "/v1/adapters", {"name": "b-up", "path": "b"}).status_code == 200
    assert engine.load()["running"] == 1 and "b-up" not in engine.resident_adapters()
    collect(q)
    r = post(server, "/v1/completions", {"model": "b-up", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                         "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy_text(server, "b-up", 4)
    assert post(server, "/v1/adapters", {"name": "b-up2", "path": 5}).status_code == 400


def test_a_failing_request_fails_alone(base, tokenizer, adapters_dir):  # noqa: F811
    """Isolation in prefill (a prompt the model cannot embed) and in decode (a consumer that raises): the greedy
    requests in the same batch still give the reference tokens."""
    engine = Engine(copy.deepcopy(base), tokenizer, adapters={"a": adapters_dir / "a"})
    try:
        n = 6
        good = prompts(len(tokenizer), [5, 9, 3], seed=11)
        gate = held(engine)
        queues = [queue.Queue() for _ in good]
        for p, q in zip(good, queues):
            engine.submit(p, "a", SamplingParams(max_tokens=n, ignore_eos=True), q.put)
        bad_prefill = queue.Queue()
        engine.submit([1, len(tokenizer) + 1000, 2], None, SamplingParams(max_tokens=n), bad_prefill.put)
        calls = []

        def explode(ev):
            calls.append(ev)
            if len(calls) == 2:
                raise RuntimeError("consumer broke")

        engine.submit(good[0], None, SamplingParams(max_tokens=n, ignore_eos=True), explode)
        gate.set()
        for p, q in zip(good, queues):
            ids, _, last = collect(q)
            assert last.finish_reason == "length" and ids == reference(base, adapters_dir, "a", p, n)
        last = collect(bad_prefill)[2]
        assert last.finish_reason == "error" and "index" in last.error.lower()
        deadline = time.monotonic() + 10
        while not (calls and calls[-1].finish_reason) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls[-1].finish_reason == "error" and "consumer broke" in calls[-1].error
    finally:
        engine.stop()


def test_unexpected_errors_answer_json(server, monkeypatch):
    """A bug in a route is a JSON 500 in OpenAI's shape, never plain text."""
    import loraforge.serve.api as api

    def boom(*a, **k):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(api, "prompt_ids", boom)
    r = post(server, "/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "server_error" and "ZeroDivisionError" in r.json()["error"]["message"]
