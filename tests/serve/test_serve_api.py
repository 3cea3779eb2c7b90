"""The OpenAI-compatible API, driven by the real `openai` client against uvicorn on 127.0.0.1 (a free port).

Outputs are compared with `Engine.generate`, which test_serve_engine.py compares with a plain greedy loop.
"""

import copy
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from helpers import env_when_base_loads, save_adapters, tiny_llama
from loraforge.config import LoraConfig
from loraforge.precision import ONEDNN_CACHES, Precision
from loraforge.serve import Engine, SamplingParams, ServeError, UnknownAdapter, residency
from loraforge.serve import engine as engine_module
from loraforge.serve import api
from loraforge.serve.api import ServerThread, TokenizerPool, create_app
from loraforge.serve.errors import shown
import test_serve_engine

# no deprecated transformers API on our code paths (the per-step `past_key_values` FutureWarning was one)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]
adapters_dir = test_serve_engine.adapters_dir  # a shared fixture, found by its name (base, tokenizer: conftest.py)
KEY = "sk-test-key"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(base, tokenizer, adapters_dir, decode_path):
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


def engine_text(server, tokenizer, model, prompt_ids, n):
    return server[0].generate(prompt_ids, None if model == "tiny" else model,
                              SamplingParams(max_tokens=n, ignore_eos=True))


def test_models_lists_base_and_adapters(client):
    assert {m.id for m in client.models.list().data} == {"tiny", "a", "b", "c"}


def test_completions_match_the_engine(client, server, tokenizer):
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


def test_a_chat_streams_role_chunk_goes_before_its_first_token_is_generated(client, monkeypatch):
    """Carried over: the role chunk went with the first token (the 200 waited for it); OpenAI sends
    `delta: {"role": "assistant", "content": ""}` at once. The first token's pick waits here until the client has
    read that chunk (3 s at most: without it, the chunk came only after the pick)."""
    role_read, waited = threading.Event(), []
    pick = engine_module.greedy_token

    def slow_first(logits, token, fix):
        if not waited:
            waited.append(role_read.wait(3))
        return pick(logits, token, fix)

    monkeypatch.setattr(engine_module, "greedy_token", slow_first)
    chunks = []
    for chunk in client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                                max_tokens=3, temperature=0, extra_body={"ignore_eos": True}):
        role_read.set()
        chunks.append(chunk)
    assert (chunks[0].choices[0].delta.role, chunks[0].choices[0].delta.content) == ("assistant", "")
    assert waited == [True]  # the first token was picked after the client had the role chunk
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.choices[0].delta.role is None for c in chunks[1:])


def test_a_character_cut_by_max_tokens_is_dropped_streamed_or_not(client, tokenizer, monkeypatch):
    """Output that stops inside a multi-byte character (byte-level BPE: "日" is 3 tokens) ended in U+FFFD, the
    non-streamed text and the stream's last chunk alike. The unfinished character's bytes are now dropped, as
    vLLM's detokenizer does; the model's tokens are scripted (greedy's pick replaced) so that the cut falls there."""
    script = tokenizer("Hi 日本語")["input_ids"]  # Hi, 3 bytes of 日, 本, 2 of 3 bytes of 語, the last byte
    assert tokenizer.decode(script[:2]) == "Hi \ufffd" and tokenizer.decode(script[:6]) == "Hi 日本\ufffd"
    for n, expected in ((2, "Hi "), (3, "Hi "), (4, "Hi 日"), (6, "Hi 日本"), (7, "Hi 日本"), (8, "Hi 日本語")):
        for stream in (False, True):
            picks = iter(script)
            monkeypatch.setattr(engine_module, "greedy_token", lambda logits, token, fix: next(picks))
            kw = dict(model="tiny", prompt=PROMPT, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
            if stream:
                chunks = list(client.completions.create(stream=True, **kw))
                text = "".join(c.choices[0].text for c in chunks)
                assert all("\ufffd" not in c.choices[0].text for c in chunks)
            else:
                text = client.completions.create(**kw).choices[0].text
            assert text == expected, (n, stream)


def test_a_u_fffd_the_model_writes_is_kept_at_the_end_streamed_or_not(client, tokenizer, monkeypatch):
    """A token that is U+FFFD's own three bytes is a character the model wrote, not a cut one: the text keeps it at
    the end too (every trailing U+FFFD was dropped: "Hi \ufffd\ufffd" came back "Hi "); only the bytes of an
    unfinished character after it (the emoji's first tokens) are dropped, streamed and not alike."""
    script = tokenizer("Hi \ufffd\ufffd😀")["input_ids"]  # Hi, space, U+FFFD twice, the emoji's 4 bytes in 3 tokens
    assert len(script) == 7 and tokenizer.decode(script[:5]) == "Hi \ufffd\ufffd\ufffd"
    for n, expected in ((3, "Hi \ufffd"), (4, "Hi \ufffd\ufffd"), (5, "Hi \ufffd\ufffd"), (6, "Hi \ufffd\ufffd"),
                        (7, "Hi \ufffd\ufffd😀")):
        for stream in (False, True):
            picks = iter(script)
            monkeypatch.setattr(engine_module, "greedy_token", lambda logits, token, fix: next(picks))
            kw = dict(model="tiny", prompt=PROMPT, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
            if stream:
                text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
            else:
                text = client.completions.create(**kw).choices[0].text
            assert text == expected, (n, stream)


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


def test_bad_input_answers_and_the_server_goes_on(client, server, tokenizer):
    wrong = openai.OpenAI(base_url=server[1] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="a", prompt=PROMPT, max_tokens=2)
    assert httpx.get(server[1] + "/v1/models").status_code == 401  # no key at all
    health = httpx.get(server[1] + "/health")  # health needs no key
    assert health.status_code == 200
    cache = server[0].prefix_cache  # what it holds, against the cache's own count (earlier tests filled it)
    assert health.json()["prefix_cache_mb"] == round(cache.bytes / 2**20, 2) and cache.bytes <= cache.budget
    assert health.json()["prefix_cache_budget_mb"] == round(cache.budget / 2**20, 2) > 0

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
    assert e.value.body["message"] == "model \"nope\" does not exist; available: ['tiny', 'a', 'b', 'c']"

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
    again = http(server, "POST", "/v1/adapters", json={"name": "c2", "path": "c"})
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict_error", again.text
    assert again.json()["error"]["message"] == ('an adapter named "c2" is already loaded; unload it first, or choose '
                                                'another name')  # no "DELETE /v1/adapters/c2": the page shows it
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


# ---- hostile input (stop 38's hunt): unsupported fields, bad text, broken adapter folders, short error bodies ----

@pytest.mark.parametrize("route, field, value", [
    ("chat", "logprobs", True), ("chat", "top_logprobs", 3), ("completions", "logprobs", 3),
    ("completions", "echo", True), ("completions", "logit_bias", {"28": 100}),
    ("chat", "response_format", {"type": "json_object"}), ("chat", "tools", [{"type": "function"}]),
    ("chat", "tool_choice", "required"), ("chat", "functions", [{"name": "f"}]), ("completions", "best_of", 2),
    ("completions", "frequency_penalty", 2), ("completions", "presence_penalty", -0.5),
    ("completions", "suffix", "end"), ("completions", "repetition_penalty", 1.2), ("completions", "min_p", 0.1)])
def test_unsupported_openai_fields_are_refused(server, route, field, value):
    """Fields the server does not implement were answered 200 and dropped (logit_bias not applied, no JSON mode,
    no logprobs): now a 400 naming the field, as n=2 is."""
    body = {"model": "a", "max_tokens": 2, field: value}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if route == "chat" else {"prompt": PROMPT})
    r = http(server, "POST", f"/v1/{'chat/' if route == 'chat' else ''}completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == \
        f"{field}: {json.dumps(value)} is not supported by this server; leave {field} out"


def test_values_that_mean_off_are_accepted(client, server, tokenizer):
    """What clients send by default (logprobs false, penalties 0, an empty logit_bias, text format) and fields that
    change nothing a client reads (user, metadata, store) are accepted, and the answer is the engine's."""
    off = dict(frequency_penalty=0, presence_penalty=0.0, logit_bias={}, user="u1")
    kw = dict(model="a", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt=PROMPT, echo=False, best_of=1, logprobs=None, suffix=None, **off, **kw)
    assert r.choices[0].text == engine_text(server, tokenizer, "a", tokenizer(PROMPT)["input_ids"], 6).text
    off.update(logprobs=False, store=False, metadata={"k": "v"}, response_format={"type": "text"}, tool_choice="none")
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], top_logprobs=0, **off, **kw)
    plain = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **kw)
    assert chat.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("path, body, message", [
    ("/v1/completions", '{"model": "a", "prompt": "abc\\ud800"}',
     "invalid request: prompt: contains an unpaired surrogate (\\ud800) at character 3; send valid UTF-8 text"),
    ("/v1/completions", '{"model": "a", "prompt": ["\\udc00"]}',
     "invalid request: prompt: item 0 contains an unpaired surrogate (\\udc00) at character 0; send valid UTF-8 text"),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "stop": ["ok", "x\\udfff"]}',
     "invalid request: stop: string 1 contains an unpaired surrogate (\\udfff) at character 1; send valid UTF-8 text"),
    ("/v1/chat/completions", '{"model": "a", "messages": [{"role": "user", "content": "\\ud83d"}]}',
     "invalid request: messages.0.content: contains an unpaired surrogate (\\ud83d) at character 0; send valid UTF-8 "
     "text"),
    ("/v1/chat/completions", '{"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": "ok"},'
     ' {"type": "text", "text": "a\\ud800b"}]}]}',
     "invalid request: messages.0.content: part 1 contains an unpaired surrogate (\\ud800) at character 1; send valid "
     "UTF-8 text"),
    ("/v1/adapters", '{"name": "x", "path": "a\\u0000/../../"}',
     "invalid request: path: contains a NUL character (\\x00) at character 1; send the name or path without it"),
    ("/v1/adapters", '{"name": "x", "path": "a\\ud800"}',
     "invalid request: path: contains an unpaired surrogate (\\ud800) at character 1; send valid UTF-8 text"),
    ("/v1/adapters", '{"name": "x\\u0000", "path": "a"}',
     "invalid request: name: contains a NUL character (\\x00) at character 1; send the name or path without it")])
def test_lone_surrogates_and_nul_characters_are_400(server, path, body, message):
    """Valid JSON escapes that are not valid text (a lone UTF-16 surrogate; NUL in a path) answered 500 from the
    tokenizer or from Path.resolve: now a 400 naming the field. A valid pair (an emoji) is one character: fine."""
    r = http(server, "POST", path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["message"]) == (400, message)
    ok = http(server, "POST", "/v1/completions", content=b'{"model": "a", "prompt": "hi \\ud83d\\ude00 \\u0000", '
              b'"max_tokens": 2}', headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text  # a NUL in a prompt is text the tokenizer encodes: accepted


def test_a_body_not_read_as_json_says_why(server):
    """Hunt: bytes that are not UTF-8 got FastAPI's "There was an error parsing the body" (code null), and a JSON
    body sent as text/plain (or with no Content-Type) "body: Input should be a valid dictionary..."; now each is one
    line saying what to fix."""
    json_type = {"Content-Type": "application/json"}
    for raw in (b'{"model": "a", "prompt": "caf\xe9"}', b'{"model": "a", "prompt": "\xff\xfe"}'):
        r = http(server, "POST", "/v1/completions", content=raw, headers=json_type)
        assert (r.status_code, r.json()["error"]["message"], r.json()["error"]["code"]) == \
            (400, "the request body is not valid UTF-8 JSON", "invalid_json"), r.text
    r = http(server, "POST", "/v1/completions", content=b"[" * 100_000, headers=json_type)
    assert (r.status_code, r.json()["error"]["message"]) == \
        (400, "the request body's JSON is nested too deeply to read")
    for raw in (b'{"model": "a", "prompt": "hi", "max_tokens": 9' + b"9" * 5000 + b"}",  # soak: 400, code null
                b'{"model": "a", "prompt": [1' + b"0" * 5000 + b"]}"):
        r = http(server, "POST", "/v1/completions", content=raw, headers=json_type)
        assert (r.status_code, r.json()["error"]["message"], r.json()["error"]["code"]) == (400, "the request "
            "body's JSON has a number too long to read (over 4,300 digits); no field takes one that long",
            "invalid_json"), r.text
    body = json.dumps({"model": "a", "prompt": PROMPT, "max_tokens": 2}).encode()
    for given, said in (("text/plain", 'Content-Type "text/plain" is not JSON'),
                        ("application/x-www-form-urlencoded",
                         'Content-Type "application/x-www-form-urlencoded" is not JSON'),
                        (None, "no Content-Type was sent")):
        r = http(server, "POST", "/v1/completions", content=body, headers={"Content-Type": given} if given else {})
        assert (r.status_code, r.json()["error"]["message"], r.json()["error"]["code"]) == \
            (400, f"{said}; send Content-Type: application/json", "invalid_content_type"), r.text
    for given in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert http(server, "POST", "/v1/completions", content=body, headers={"Content-Type": given}).status_code == 200
    r = http(server, "POST", "/v1/completions", content=b"[]", headers=json_type)  # JSON, not an object: as before
    assert r.json()["error"]["message"].startswith("invalid request: body: Input should be a valid dictionary")


def test_error_bodies_are_short_and_json_styled(server):
    """A rejected value came back whole, as a Python repr (a 900 KB body for 9 stop strings of 100 KB, a 70 KB 404
    for a long name); now values are shown as JSON cut to 200 characters, and stop strings are bounded (8, each
    1,000 characters)."""
    big = {"model": "a", "prompt": PROMPT, "max_tokens": 2, "stop": ["x" * 100_000] * 9}
    r = http(server, "POST", "/v1/completions", json=big)
    assert (r.status_code, r.json()["error"]["message"]) == \
        (400, "stop: 9 strings; send at most 8; stop: a string of 100,000 characters; each may have at most 1,000")
    assert len(r.content) < 400
    cases = [({"stop": [""]}, "stop: an empty string would end every answer at once; remove it"),
             ({"stop": "y" * 1001}, "stop: a string of 1,001 characters; each may have at most 1,000"),
             ({"stream": True, "stream_options": {"include_usage": "no"}},
              'invalid request: stream_options: include_usage: "no" must be true or false'),
             ({"n": 3}, "n: 3 is not supported; send n=1 (several requests batch together anyway)")]
    for extra, message in cases:
        r = http(server, "POST", "/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2, **extra})
        assert (r.status_code, r.json()["error"]["message"]) == (400, message)
    ok = http(server, "POST", "/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2,
                                                       "stop": ["z" * 1000] * 8})
    assert ok.status_code == 200
    name = "n" * 60_000
    r = http(server, "DELETE", f"/v1/adapters/{name}")
    assert r.status_code == 404 and len(r.content) < 600
    with pytest.raises(UnknownAdapter) as e:
        server[0].remove_adapter(name)
    assert str(e.value) == f'adapter "{"n" * 199}... (60,000 characters) is not loaded; loaded: [\'a\', \'b\', \'c\']'
    assert shown(("",)) == '[""]' and shown("a\ud800é") == '"a\\ud800é"'  # JSON, a lone surrogate escaped
    assert shown(10**5000) == "<a int too large to show>"


def broken_dir(root: Path, adapters_dir: Path, outside: Path) -> Path:
    """An adapters directory holding one good adapter and one of each broken kind the hunt found."""
    good = adapters_dir / "a"
    config = json.loads((good / "adapter_config.json").read_text())
    shutil.copytree(good, root / "a")
    shutil.copytree(good, outside / "a")

    def folder(name, files):
        (root / name).mkdir()
        for file, data in files.items():
            (root / name / file).write_bytes(data if isinstance(data, bytes) else data.encode())

    weights = (good / "adapter_model.safetensors").read_bytes()
    folder("pickleonly", {"adapter_config.json": json.dumps(config), "adapter_model.bin": b"\x80\x04K\x01."})
    folder("badjson", {"adapter_config.json": "{", "adapter_model.safetensors": weights})
    folder("r0", {"adapter_config.json": json.dumps({**config, "r": 0}), "adapter_model.safetensors": weights})
    folder("notarget", {"adapter_config.json": json.dumps({**config, "target_modules": ["nonexistent_proj"]}),
                        "adapter_model.safetensors": weights})
    other = tiny_llama(vocab_size=100, hidden_size=64, intermediate_size=128)  # another base's shapes
    save_adapters(other, root, {"othershape": LoraConfig(r=4, target_modules=("q_proj",))}, seed=1)
    (root / "cfg_link").mkdir()
    (root / "cfg_link" / "adapter_config.json").symlink_to(outside / "a" / "adapter_config.json")
    (root / "cfg_link" / "adapter_model.safetensors").write_bytes(weights)
    (root / "weights_link").mkdir()
    shutil.copy(good / "adapter_config.json", root / "weights_link")
    (root / "weights_link" / "adapter_model.safetensors").symlink_to(outside / "a" / "adapter_model.safetensors")
    (root / "link_out").symlink_to(outside / "a")  # a folder leading out: skipped, the server still starts
    (root / "link_in").symlink_to(root / "a")  # a link to an adapter inside: served
    return root


BROKEN = {  # what a request naming each broken adapter gets (400), its folder named as inside the adapters dir
    "pickleonly": "pickleonly holds adapter_model.bin (a pickle), which loraforge never loads; re-save it as "
                  "safetensors (PEFT: model.save_pretrained(dir, safe_serialization=True))",
    "badjson": "badjson/adapter_config.json is not valid JSON: Expecting property name enclosed in double quotes: "
               "line 1 column 2 (char 1)",
    "r0": "invalid config: r0/adapter_config.json: r: must be a positive integer (at most 65536), got 0 (try 8)",
    "othershape": "adapter_model.safetensors does not fit this base (an adapter made for another base?): "
                  "model.layers.0.self_attn.q_proj: lora_A (4, 64) in the file, but the layer is 32 -> 32 here; "
                  "model.layers.1.self_attn.q_proj: lora_A (4, 64) in the file, but the layer is 32 -> 32 here",
    "cfg_link": "cfg_link/adapter_config.json is a symlink to a file outside the adapters directory, which the "
                "server does not read; copy the file in its place",
    "weights_link": "weights_link/adapter_model.safetensors is a symlink to a file outside the adapters directory, "
                    "which the server does not read; copy the file in its place",
}


@pytest.fixture(scope="module")
def broken_server(base, tokenizer, adapters_dir, tmp_path_factory, decode_path):
    root = broken_dir(tmp_path_factory.mktemp("broken"), adapters_dir, tmp_path_factory.mktemp("outside"))
    with pytest.warns(UserWarning) as caught:
        engine = Engine(copy.deepcopy(base), tokenizer, base_name="tiny", adapters_dir=root, max_loaded=2)
    with ServerThread(create_app(engine, api_key=KEY)) as url:
        yield engine, url, root, [str(w.message) for w in caught]
    engine.stop()


def test_broken_adapters_in_the_directory_are_400s(broken_server, tokenizer):
    """A broken adapter in --adapters-dir was listed and every request to it was a 500 carrying the server's path;
    a symlinked folder stopped the server from starting. Now the folder's adapters get the cheap checks at start:
    the broken ones are not listed, each request naming one is a 400 with its problem (no server path), a symlink
    leading out is skipped with a warning, and a symlinked file leading out is refused."""
    engine, url, root, warned = broken_server
    server = (engine, url)
    assert {m["id"] for m in http(server, "GET", "/v1/models").json()["data"]} == {"tiny", "a", "link_in", "notarget"}
    outside = (root / "link_out").resolve()
    assert f"adapters dir {root}: skipping 'link_out': it is a symlink to {outside}, outside the adapters dir " \
           f"(only adapters inside it are served); move or copy the adapter into {root} to serve it" in warned
    for name, problem in BROKEN.items():
        message = f'adapter "{name}" cannot be served: {problem}'
        assert f"adapters dir {root}: not serving '{name}': {message} (requests naming it get this answer until " \
               f"its files change)" in warned
        for stream in (False, True):
            r = http(server, "POST", "/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2,
                                                              "stream": stream})
            assert (r.status_code, r.json()["error"]["message"]) == (400, message), r.text
    # a folder the cheap checks pass but the load refuses: that request and the ones after it are 400s
    first = http(server, "POST", "/v1/completions", json={"model": "notarget", "prompt": PROMPT, "max_tokens": 2})
    assert first.status_code == 400 and str(root) not in first.text, first.text
    assert "notarget" not in {m["id"] for m in http(server, "GET", "/v1/models").json()["data"]}
    r = http(server, "POST", "/v1/completions", json={"model": "notarget", "prompt": PROMPT, "max_tokens": 2})
    assert (r.status_code, r.json()["error"]["message"]) == (400, (
        "adapter \"notarget\" cannot be served: notarget: this adapter does not fit the model: invalid config: "
        "target_modules: ('nonexistent_proj',) matches no linear layer of this model (LlamaForCausalLM); its linear "
        "layers are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"))
    kw = dict(prompt=PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
    link = http(server, "POST", "/v1/completions", json={"model": "link_in", **kw})
    assert link.json()["choices"][0]["text"] == http(server, "POST", "/v1/completions",
                                                     json={"model": "a", **kw}).json()["choices"][0]["text"]


def test_an_adapter_that_fails_to_load_is_the_same_error_streamed(broken_server):
    """Hunt: an adapter that passed the cheap checks but failed to load answered a non-streamed request 400
    invalid_request_error 'adapter "f" cannot be served: ...', a streamed one a server_error event "generation
    failed: adapter ...". Then the stream's 200 had gone when the adapter loaded: a 200 whose one event was the error.
    Now a stream's 200 waits for its first event: the stream is answered the same 400 and JSON error."""
    engine, url, root, _ = broken_server
    server = (engine, url)
    for name in ("late_whole", "late_stream"):  # found by the first request naming them; fail as they load
        shutil.copytree(root / "notarget", root / name)
    whole = http(server, "POST", "/v1/completions", json={"model": "late_whole", "prompt": PROMPT, "max_tokens": 2})
    assert whole.status_code == 400, whole.text
    stream = http(server, "POST", "/v1/completions",
                  json={"model": "late_stream", "prompt": PROMPT, "max_tokens": 2, "stream": True})
    assert (stream.status_code, stream.headers["content-type"]) == (400, "application/json"), stream.text
    error = stream.json()["error"]
    assert error == {**whole.json()["error"], "message": whole.json()["error"]["message"].replace("late_whole",
                                                                                                   "late_stream")}
    assert error["type"] == "invalid_request_error" and error["message"].startswith(
        'adapter "late_stream" cannot be served: late_stream: this adapter does not fit the model')


def test_a_broken_adapter_is_not_read_again_until_its_files_change(broken_server, monkeypatch):
    engine, url, root, _ = broken_server
    server = (engine, url)
    reads = []
    real = residency.read_adapter_config
    monkeypatch.setattr(residency, "read_adapter_config", lambda path: reads.append(path) or real(path))
    for _ in range(3):
        assert http(server, "POST", "/v1/completions", json={"model": "r0", "prompt": PROMPT}).status_code == 400
    assert reads == []
    config = json.loads((root / "r0" / "adapter_config.json").read_text())
    (root / "r0" / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))  # fixed
    r = http(server, "POST", "/v1/completions", json={"model": "r0", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert "r0" in {m["id"] for m in http(server, "GET", "/v1/models").json()["data"]}


def test_adapter_refusals_name_no_server_path(broken_server):
    """POST /v1/adapters refusals named the server's absolute paths (the adapters directory, the adapter's
    folder); now the path as the client sent it."""
    engine, url, root, _ = broken_server
    server = (engine, url)
    cases = [
        ({"name": "x", "path": "../a"}, 'adapter path "../a" is not allowed: it must be inside the adapters directory'),
        ({"name": "x", "path": "link_out"},
         'adapter path "link_out" is not allowed: it must be inside the adapters directory (it is a symlink leading '
         'out of it)'),
        ({"name": "x", "path": "weights_link"}, f'adapter "x" cannot be served: {BROKEN["weights_link"]}'),
        ({"name": "x", "path": "pickleonly"}, f'adapter "x" cannot be served: {BROKEN["pickleonly"]}'),
        ({"name": "x", "path": str(root / "othershape")},
         f'adapter "x" cannot be served: {BROKEN["othershape"]}'),
        ({"name": "x" * 65, "path": "a"},
         f'adapter name "{"x" * 65}" is not allowed: use letters, digits, \'.\', \'_\', \'-\' (at most 64, starting '
         f'with a letter or digit)')]
    for body, message in cases:
        r = http(server, "POST", "/v1/adapters", json=body)
        assert (r.status_code, r.json()["error"]["message"]) == (400, message)
        assert str(root) not in r.text  # the absolute path the client sent is named relative to the directory
    assert "x" not in engine.adapter_names()
    with pytest.raises(ServeError) as e:  # the engine's own check, for callers other than the API
        engine.add_adapter("x", "a\x00/../..")
    assert str(e.value) == 'adapter path "a\\u0000/../.." contains a NUL character or a lone surrogate; send a ' \
                           'plain path'


def test_prompts_tokenize_on_copies_of_their_own(tokenizer):
    """Request threads each borrow a copy (a Rust tokenizer shared by two threads may raise "Already borrowed"), so a
    short prompt does not wait behind a long one; at most `size` at once; what they encode is the tokenizer's."""
    pool = TokenizerPool(tokenizer, size=2)
    third = threading.Event()

    def borrow_one():
        with pool.borrow():
            third.set()

    with pool.borrow() as a, pool.borrow() as b:  # two prompts at once, on two copies
        assert len({id(a), id(b), id(tokenizer)}) == 3
        waiter = threading.Thread(target=borrow_one)
        waiter.start()
        assert not third.wait(0.3)  # a third waits for one of them
    assert third.wait(10)
    waiter.join()
    texts = [f"prompt {i}: " + "lorem ipsum dolor " * (i % 7) for i in range(64)]
    expected = [tokenizer(t)["input_ids"] for t in texts]
    got = [None] * len(texts)

    def encode(i):
        with pool.borrow() as tok:
            got[i] = tok(texts[i])["input_ids"]

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_a_forward_that_overflows_fp16_is_a_500_naming_fp16_s_range(base, tokenizer):
    """Soak: `serve --precision fp16` on a base whose activations pass 65504 (its weights within fp16's range)
    answered 500 "generation failed: FloatingPointError: the model's logits have no finite value" and no more. The
    500 stays (the server's setting, not the request, is wrong), its message now says fp16 overflowed and what to
    use instead, as generate and eval say (precision.overflow_fix); greedy and sampled alike."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(50)
            layer.mlp.down_proj.weight.mul_(5e5).clamp_(-6e4, 6e4)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()  # fine in fp32
    model.half()
    fix = "fp16 holds values only up to ±65504, which this forward passed; use "
    for precision, said in [(None, "--precision fp32 (or bf16 where the hardware has it), with --dtype auto or fp32"),
                            (Precision("fp32", "fp16", "asked"), "--dtype fp32 (or bf16)")]:
        engine = Engine(model, tokenizer, base_name="tiny", precision=precision)
        with ServerThread(create_app(engine, api_key=KEY)) as url:
            for temperature, logits in [(0, "are not finite (the greedy choice's is nan)"),
                                        (0.7, "have no finite value")]:
                r = http((engine, url), "POST", "/v1/completions",
                         json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": temperature})
                message = f"generation failed: FloatingPointError: the model's logits {logits}: {fix}{said}"
                assert (r.status_code, r.json()["error"]) == (500, {"message": message, "type": "server_error",
                                                                    "param": None, "code": "generation_error"})
        engine.stop()


@pytest.mark.parametrize("given", [None, "512"])
def test_run_server_bounds_onednns_kernel_caches_before_the_model_loads(given, monkeypatch):
    """oneDNN and ideep keep a kernel per bf16 matmul shape (1,024 by default, up to 1.5 MB each): run_server sets
    both caches to 128 before the model loads (precision.choose: they are read once, at the first bf16 matmul); a
    value the user's environment gives is kept."""
    seen = env_when_base_loads(monkeypatch, api, lambda: api.run_server("tiny", port=0), ONEDNN_CACHES, ServeError,
                               {} if given is None else {"LRU_CACHE_CAPACITY": given})
    assert seen == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": given or "128"}
