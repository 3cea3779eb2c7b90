"""An engine whose thread dies on an error outside a step's own try (the scheduling code; a KeyboardInterrupt raised
in the thread, which `except Exception` lets through): every waiting `generate(timeout=None)` and every HTTP request
on it, streamed or not, waited for ever, new requests were queued to the dead thread, and /health said "ok". Now
what is pending fails at once with the reason, later requests are refused with it (HTTP: a JSON 503), /health says
so, the log has the traceback once, and the model is given back without adapters. stop() still aborts as before.

Every wait is bounded (a join or a get of 60 s), so the hang that was fails the test instead of stopping the run;
tokens a request streamed before the death are the greedy reference's first ones.
"""

import copy
import json
import queue
import threading
import time

import httpx
import pytest

from loraforge.lora.inject import lora_layers
from loraforge.serve import Engine, SamplingParams
from loraforge.serve.api import ServerThread, create_app
from loraforge.serve.errors import EngineStopped, ShuttingDown
import test_serve_engine
from test_serve_engine import collect, prompts, reference

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]

adapters_dir = test_serve_engine.adapters_dir  # a shared fixture, found by its name (base, tokenizer: conftest.py)
BOUND_S = 60  # generous: a request that hangs fails the test here, one that answers does so in well under a second
LONG = SamplingParams(max_tokens=60, ignore_eos=True)


def slowed(engine):
    """The engine, its decode steps slowed to 50 ms: a 60-token request is still decoding when the test holds it."""
    step = engine._batch.step
    engine._batch.step = lambda: (time.sleep(0.05), step())[1]
    return engine


def hold(engine):
    """Hold the engine between two steps until the returned event is set (requests pile up meanwhile)."""
    gate, holding = threading.Event(), threading.Event()
    engine.call(lambda: (holding.set(), gate.wait(BOUND_S)))
    assert holding.wait(BOUND_S)
    return gate


def kill_once(engine, where: str, error: BaseException):
    """Arm `where` ("evict": the scheduling code before a step's try; "step": a decode step) to raise `error` once;
    "finish": a decode step fails (a RuntimeError the step's try catches) and ending a request raises `error`, in
    that try's handler (the thread dies) and again when the death fails the pending requests."""
    if where == "finish":
        kill_once(engine, "step", RuntimeError("a step broke"))

        def finish(*args, **kwargs):
            raise error
        engine._finish = finish
        return
    target, name = (engine._residency, "evict_unregistered") if where == "evict" else (engine._batch, "step")
    original = getattr(target, name)
    fired = []

    def dying(*args):
        if not fired:
            fired.append(True)
            raise error
        return original(*args)
    setattr(target, name, dying)


def in_thread(fn):
    """Run fn() in a thread; (thread, result list): the list gets its return value or the exception it raised."""
    out = []

    def go():
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("where,error", [("evict", RuntimeError("scheduling bug")),
                                         ("step", KeyboardInterrupt("sent to the thread")),
                                         ("finish", AttributeError("a bug in _finish"))])
def test_pending_requests_fail_with_the_reason_and_later_ones_are_refused(base, tokenizer, adapters_dir, where,
                                                                         error, caplog):
    model = copy.deepcopy(base)
    engine = slowed(Engine(model, tokenizer, adapters={"a": adapters_dir / "a"}))
    try:
        running_prompt, waiting_prompt = prompts(len(tokenizer), [5, 7], seed=3)
        running = queue.Queue()
        engine.submit(running_prompt, "a", LONG, running.put)
        assert running.get(timeout=BOUND_S).token_ids == []  # admitted
        first = running.get(timeout=BOUND_S).token_ids  # decoding: a row of the batch
        gate = hold(engine)
        waiting, got = in_thread(lambda: engine.generate(waiting_prompt, "a", LONG))  # timeout=None: waited for ever
        command = engine.call(lambda: "never run")
        kill_once(engine, where, error)
        gate.set()
        waiting.join(BOUND_S)
        assert not waiting.is_alive(), "a generate waiting when the engine's thread died never returned"
        why = f"{type(error).__name__}: {error}"
        assert isinstance(got[0], RuntimeError) and why in str(got[0]) and "engine stopped" in str(got[0])
        ids, _, last = collect(running, timeout=BOUND_S)  # the running row: its tokens so far, then the error
        assert last.finish_reason == "error" and why in last.error and last.status == 503
        assert first + ids == reference(base, adapters_dir, "a", running_prompt, len(first + ids))
        assert isinstance(command.exception(timeout=BOUND_S), EngineStopped)
        engine._thread.join(BOUND_S)
        assert not engine._thread.is_alive() and not lora_layers(model)  # not restarted; the model given back
        for refused in (lambda: engine.generate(waiting_prompt), lambda: engine.call(lambda: None)):
            with pytest.raises(EngineStopped, match=why):
                refused()
        logged = [r for r in caplog.records if r.name == "loraforge.serve" and r.exc_info]
        assert len(logged) == 1 and logged[0].exc_info[1] is error
    finally:
        engine.stop()


def test_stop_still_aborts_waiting_and_running_requests(base, tokenizer, adapters_dir, caplog):
    """stop() is not a death: what is pending gets "abort" (HTTP: shutting down), later requests "shutting down",
    and nothing is logged."""
    engine = slowed(Engine(copy.deepcopy(base), tokenizer, adapters={"a": adapters_dir / "a"}))
    running, waiting = queue.Queue(), queue.Queue()
    engine.submit(prompts(len(tokenizer), [5], seed=3)[0], "a", LONG, running.put)
    assert running.get(timeout=BOUND_S).token_ids == []
    gate = hold(engine)
    engine.submit([1, 2, 3], None, LONG, waiting.put)
    stopper, _ = in_thread(lambda: engine.stop(timeout=BOUND_S))
    gate.set()
    stopper.join(BOUND_S)
    assert collect(running, timeout=BOUND_S)[2].finish_reason == "abort"
    assert collect(waiting, timeout=BOUND_S)[2].finish_reason == "abort"
    with pytest.raises(ShuttingDown):
        engine.generate([1, 2, 3])
    assert engine.died is None and not [r for r in caplog.records if r.name == "loraforge.serve"]


def post(url, body, got, key):
    """POST /v1/completions; got[key] = (status, JSON body) or, streamed, (status, the SSE data lines)."""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=BOUND_S) as r:
        if body.get("stream") and r.status_code == 200:
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if key == "started" and len(lines) == 2:
                        got["started_streaming"].set()  # a text chunk came: it is decoding
            got[key] = (200, lines)
        else:
            r.read()
            got[key] = (r.status_code, r.json())


def test_http_requests_waiting_and_streaming_get_503_and_health_says_why(base, tokenizer, adapters_dir):
    engine = slowed(Engine(copy.deepcopy(base), tokenizer, base_name="tiny", adapters={"a": adapters_dir / "a"}))
    body = {"model": "a", "prompt": "The quick brown fox", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
    got = {"started_streaming": threading.Event()}
    try:
        with ServerThread(create_app(engine)) as url:
            started = threading.Thread(target=post, args=(url, {**body, "stream": True}, got, "started"), daemon=True)
            started.start()
            assert got["started_streaming"].wait(BOUND_S)
            gate = hold(engine)
            clients = [threading.Thread(target=post, args=(url, {**body, "stream": stream}, got, stream), daemon=True)
                       for stream in (False, True)]
            for c in clients:
                c.start()
            while engine.load()["waiting"] < 2:
                time.sleep(0.01)
            kill_once(engine, "evict", RuntimeError("scheduling bug"))
            gate.set()
            for c in clients + [started]:
                c.join(BOUND_S)
                assert not c.is_alive(), "an HTTP request waiting when the engine's thread died never got an answer"
            why = "RuntimeError: scheduling bug"
            for stream in (False, True):  # waiting: no 200 sent yet (a stream's waits for its first event)
                status, answer = got[stream]
                assert status == 503 and answer["error"]["code"] == "EngineStopped"
                assert why in answer["error"]["message"]
            status, lines = got["started"]  # its 200 had gone: the error is its last event
            assert status == 200 and lines[-1] == "[DONE]"
            error = json.loads(lines[-2])["error"]
            assert error["code"] == "EngineStopped" and why in error["message"]
            for stream in (False, True):  # later ones: refused at once
                post(url, {**body, "stream": stream}, got, "later")
                status, answer = got["later"]
                assert status == 503 and answer["error"]["code"] == "EngineStopped"
                assert why in answer["error"]["message"]
            health = httpx.get(url + "/health", timeout=BOUND_S)
            assert health.status_code == 503 and health.json()["status"] == "stopped"
            assert why in health.json()["error"]
    finally:
        engine.stop()


def test_health_after_stop_says_shutting_down(base, tokenizer, adapters_dir):
    """After stop() every request is refused (503 shutting down), and /health said 200 "ok" (a load balancer would
    keep sending it requests); it says 503 "shutting_down" as a request would."""
    engine = Engine(copy.deepcopy(base), tokenizer, base_name="tiny", adapters={"a": adapters_dir / "a"})
    try:
        with ServerThread(create_app(engine)) as url:
            assert httpx.get(url + "/health", timeout=BOUND_S).json()["status"] == "ok"
            engine.stop()
            health = httpx.get(url + "/health", timeout=BOUND_S)
            got = {}
            post(url, {"model": "a", "prompt": "Hi", "max_tokens": 2}, got, "after")
            assert got["after"][0] == 503
            assert health.status_code == 503 and health.json()["status"] == "shutting_down"
    finally:
        engine.stop()
