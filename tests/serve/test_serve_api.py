"""The OpenAI-compatible API, driven by the real `openai` client against uvicorn on 127.0.0.1 (a free port).

Outputs are compared with `Engine.generate`, which test_serve_engine.py compares with a plain greedy loop.
"""

import copy
import threading
import time

import httpx
import openai
import pytest

from loraforge.serve import Engine, SamplingParams
from loraforge.serve.api import ServerThread, create_app
from test_serve_engine import adapters_dir  # noqa: F401 (a shared fixture; base, tokenizer: conftest.py)

# no deprecated transformers API on our code paths (the per-step `past_key_values` FutureWarning was one)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]
KEY = "sk-test-key"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(base, tokenizer, adapters_dir, decode_path):  # noqa: F811
    engine = Engine(copy.deepcopy(base), tokenizer, base_name="tiny", adapters_dir=adapters_dir, max_queue=8,
                    adapters={"a": adapters_dir / "a", "b": adapters_dir / "b"})  # "c": from the directory
    with ServerThread(create_app(engine, api_key=KEY)) as url:
        yield engine, url
    engine.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(server, method, path, **kw):
    headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
    return httpx.request(method, server[1] + path, headers=headers, timeout=60, **kw)


def engine_text(server, tokenizer, model, prompt_ids, n):  # noqa: F811
    return server[0].generate(prompt_ids, None if model == "tiny" else model,
                              SamplingParams(max_tokens=n, ignore_eos=True))


def test_models_lists_base_and_adapters(client):
    assert {m.id for m in client.models.list().data} == {"tiny", "a", "b", "c"}


def test_completions_match_the_engine(client, server, tokenizer):  # noqa: F811
    ids = tokenizer(PROMPT)["input_ids"]
    texts = set()
    for model in ["a", "c", "tiny"]:  # "c" is loaded from the adapters directory on first use
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        ref = engine_text(server, tokenizer, model, ids, 8)
        assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)
        assert r.model == model
        texts.add(ref.text)
    assert len(texts) == 3


def test_streaming_equals_non_streaming(client):
    kw = dict(model="b", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt=PROMPT, **kw).choices[0].text
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    chat = client.chat.completions.create(messages=messages, **kw)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 12
    stream = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == 12 and stream[-2].choices[0].finish_reason == "length"


def test_concurrent_requests_over_adapters(client, server):
    models = ["a", "b", "c", "tiny", "a", "c", "b", "b"]
    kw = dict(prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    alone = {m: client.completions.create(model=m, **kw).choices[0].text for m in set(models)}
    results = [None] * len(models)

    def ask(i):
        results[i] = client.completions.create(model=models[i], **kw).choices[0].text

    before = server[0].stats["max_running"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [alone[m] for m in models]
    assert server[0].stats["max_running"] >= max(before, 2)  # they shared batches


def test_bad_input_answers_and_the_server_goes_on(client, server, tokenizer):  # noqa: F811
    wrong = openai.OpenAI(base_url=server[1] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="a", prompt=PROMPT, max_tokens=2)
    assert httpx.get(server[1] + "/v1/models").status_code == 401  # no key at all
    assert httpx.get(server[1] + "/health").status_code == 200  # health needs no key

    r = http(server, "POST", "/v1/completions", content=b'{"model": "a", "prompt": ',
             headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = http(server, "POST", "/v1/completions", json={"model": "a"})  # no prompt
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n: 2"):
        client.completions.create(model="a", prompt=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="a", prompt=PROMPT, temperature=-1)

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT)
    assert "'nope'" in str(e.value) and all(f"'{m}'" in str(e.value) for m in ["tiny", "a", "b", "c"])

    too_long = [5] * 96  # the tiny model's context is 96
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="a", prompt=too_long)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a", prompt=[5] * 90, max_tokens=20)

    ok = client.completions.create(model="a", prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 3


def test_queue_full_is_429(client, server):
    engine = server[0]
    gate = threading.Event()
    engine.call(gate.wait)  # the engine holds; requests pile up in the queue (max_queue=8)
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.completions.create(
        model="a", prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True}))) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while engine.load()["waiting"] < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client.completions.create(model="b", prompt=PROMPT, max_tokens=4)
    finally:
        gate.set()
    for t in threads:
        t.join()
    assert [r.usage.completion_tokens for r in results] == [4] * 8


def test_load_and_unload_adapters_at_run_time(client, server):
    assert http(server, "POST", "/v1/adapters", json={"name": "x", "path": "../a"}).status_code == 400
    assert http(server, "POST", "/v1/adapters", json={"name": "x", "path": "/etc"}).status_code == 400
    assert http(server, "POST", "/v1/adapters", json={"name": "../x", "path": "a"}).status_code == 400
    assert http(server, "POST", "/v1/adapters", json={"name": "x"}).status_code == 400
    assert httpx.post(server[1] + "/v1/adapters", json={"name": "x", "path": "a"}).status_code == 401
    r = http(server, "POST", "/v1/adapters", json={"name": "c2", "path": "c"})
    assert r.status_code == 200, r.text
    assert "c2" in {m.id for m in client.models.list().data}
    kw = dict(prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert client.completions.create(model="c2", **kw).choices[0].text == \
        client.completions.create(model="c", **kw).choices[0].text
    assert http(server, "DELETE", "/v1/adapters/c2").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c2", **kw)
    assert http(server, "DELETE", "/v1/adapters/c2").status_code == 404


def test_unloading_an_adapter_lets_its_stream_finish(client, server):
    assert http(server, "POST", "/v1/adapters", json={"name": "b-tmp", "path": "b"}).status_code == 200
    kw = dict(model="b-tmp", prompt=PROMPT, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    expected = client.completions.create(**kw).choices[0].text
    stream = client.completions.create(stream=True, **kw)
    parts = [next(iter(stream)).choices[0].text]
    held, gate = threading.Event(), threading.Event()
    server[0].call(lambda: (held.set(), gate.wait()))  # hold the engine between two steps, the stream mid-way
    try:
        assert held.wait(30)
        assert server[0].load()["running"] == 1
        assert http(server, "DELETE", "/v1/adapters/b-tmp").status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(**kw)
    finally:
        gate.set()
    chunks = list(stream)
    parts += [c.choices[0].text for c in chunks]
    assert "".join(parts) == expected and chunks[-1].choices[0].finish_reason == "length"
    assert client.completions.create(model="b", prompt=PROMPT, max_tokens=2).usage.completion_tokens <= 2
