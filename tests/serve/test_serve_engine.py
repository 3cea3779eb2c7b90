"""The serving engine: a batch mixing adapters gives each row exactly what it gets alone, and the reference.

Reference = a plain greedy loop over the full sequence (no KV cache, no padding, no batching) on a copy of the
model with the adapter loaded by `load_adapter`: the engine's cache, left padding, per-row gather/bmm and joining
between steps must not change one token (fp32, greedy).
"""

import copy
import gc
import json
import queue
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import full_forward_greedy, save_adapters, tiny_llama
from loraforge.lora.adapters import AdapterError, load_adapter, save_adapter
from loraforge.config import LoraConfig
from loraforge.lora.inject import inject, lora_layers
from loraforge.models import context_length
from loraforge.serve import Engine, PromptTooLong, QueueFull, SamplingParams, ServeError, UnknownAdapter
from loraforge.serve import engine as serve_engine
from loraforge.serve import static_batch
from loraforge.serve.engine import IDLE_CHECK_S

# Three adapters on different modules with different ranks and scalings; non-zero B (init False) so each one
# changes the output.
CONFIGS = {
    "a": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
    "b": LoraConfig(r=8, lora_alpha=4, target_modules=("q_proj", "v_proj", "gate_proj"), init_lora_weights=False),
    "c": LoraConfig(r=2, lora_alpha=2, target_modules=("down_proj",), init_lora_weights=False),
}
# no deprecated transformers API on our code paths (the per-step `past_key_values` FutureWarning was one)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, base):
    return save_adapters(base, tmp_path_factory.mktemp("adapters"), CONFIGS, seed=100)


def reference(base, adapters_dir, adapter, prompt, n):
    """Greedy tokens from a full forward per step: no cache, batch 1."""
    model = copy.deepcopy(base)
    if adapter is not None:
        load_adapter(model, adapters_dir / adapter, adapter)
    return full_forward_greedy(model, prompt, n)


def prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def collect(q: queue.Queue, timeout=60):
    """(token ids, text, final event) from an on_event queue."""
    ids, text = [], []
    while True:
        ev = q.get(timeout=timeout)
        ids += ev.token_ids
        text.append(ev.text)
        if ev.finish_reason is not None:
            return ids, "".join(text), ev


@pytest.fixture
def make_engine(base, tokenizer, adapters_dir):
    engines = []

    def make(**kw):
        kw.setdefault("adapters", {n: adapters_dir / n for n in CONFIGS})
        engine = Engine(copy.deepcopy(base), tokenizer, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def test_mixed_batch_equals_reference_and_single(make_engine, base, adapters_dir, tokenizer):
    engine = make_engine()
    jobs = list(zip(["a", "b", None, "c", "a", "b"], prompts(len(tokenizer), [5, 17, 3, 9, 12, 1])))
    gate = threading.Event()
    engine.call(gate.wait)  # hold the engine so every request is admitted into the same batch
    queues = []
    for adapter, prompt in jobs:
        queues.append(queue.Queue())
        engine.submit(prompt, adapter, GREEDY, queues[-1].put)
    gate.set()
    batched = [collect(q)[0] for q in queues]
    assert engine.stats["max_running"] == len(jobs)
    assert engine.stats["prefills"] == 1  # the six prompts in one left-padded forward
    assert engine.stats["steps"] == GREEDY.max_tokens - 1  # one prefill token, then every row decoded together
    for (adapter, prompt), got in zip(jobs, batched):
        assert got == reference(base, adapters_dir, adapter, prompt, GREEDY.max_tokens), adapter
    singles = [engine.generate(prompt, adapter, GREEDY).token_ids for adapter, prompt in jobs]
    assert singles == batched
    # the adapters matter: the same prompt gives different outputs per adapter
    outs = {a: engine.generate(jobs[0][1], a, GREEDY).token_ids for a in ("a", "b", "c", None)}
    assert len({tuple(v) for v in outs.values()}) == 4


def test_an_idle_engine_is_woken_by_a_request_a_command_and_a_stop_not_by_its_idle_check(make_engine, tokenizer,
                                                                                              monkeypatch):
    """The idle engine thread waits on its condition with a timeout (IDLE_CHECK_S: whether its Engine is still
    referenced). With that check an hour away, a request, a command and a stop still end, and every wake-up of the
    thread was a notify, none the timeout: nothing waits for it."""
    monkeypatch.setattr(serve_engine, "IDLE_CHECK_S", 3600.0)
    engine = make_engine()
    cv, woke = engine._cv, []
    wait = type(cv).wait

    def counted(timeout=None):
        woke.append(wait(cv, timeout))  # True: notified; False: the timeout ran out
        return woke[-1]

    cv.wait = counted  # the thread's next idle wait, and every one after
    engine.call(lambda: None).result(60)
    prompt = prompts(len(tokenizer), [5])[0]
    for adapter in ("a", None):
        assert engine.generate(prompt, adapter, GREEDY, timeout=60).finish_reason == "length"
    assert engine.call(lambda: 42).result(60) == 42
    engine.stop(timeout=60)
    assert not engine._thread.is_alive()
    assert woke and all(woke), woke


def test_an_engine_dropped_without_stop_ends_its_thread_and_gives_the_model_back(base, adapters_dir, tokenizer):
    """soak (a notebook running `engine = Engine(model, tokenizer)` again): the thread ran the bound Engine._loop,
    so an Engine nobody held any more was never collected: ten such kept ten threads, each with its KV cache and
    copy of the tokenizer (+8.5 MB each on a tiny base), and their adapters stayed on the model."""
    model = copy.deepcopy(base)
    engine = Engine(model, tokenizer, adapters={"a": adapters_dir / "a"})
    prompt = prompts(len(tokenizer), [6])[0]
    assert engine.generate(prompt, "a", GREEDY).token_ids == reference(base, adapters_dir, "a", prompt, 10)
    assert lora_layers(model)  # "a" is on the model while the engine serves it
    thread, alive = engine._thread, weakref.ref(engine)
    del engine
    gc.collect()
    thread.join(10 * IDLE_CHECK_S)
    assert alive() is None and not thread.is_alive()
    assert lora_layers(model) == []  # given back as it came
    assert full_forward_greedy(model, prompt, 10) == reference(base, adapters_dir, None, prompt, 10)


def test_an_engine_dropped_with_requests_in_flight_finishes_them(base, adapters_dir, tokenizer):
    """soak: an Engine dropped right after submit (a script's loop of engines) was collected between two steps
    (the thread held it only during a step), and its requests' consumers waited for ever for their last event."""
    model = copy.deepcopy(base)
    engine = Engine(model, tokenizer, adapters={"a": adapters_dir / "a"})
    jobs = list(zip(["a", None], prompts(len(tokenizer), [6, 9], seed=3)))
    events = [queue.Queue() for _ in jobs]
    for (adapter, prompt), q in zip(jobs, events):
        engine.submit(prompt, adapter, GREEDY, q.put)
    thread, alive = engine._thread, weakref.ref(engine)
    del engine
    for (adapter, prompt), q in zip(jobs, events):
        got = [q.get(timeout=30) for _ in range(GREEDY.max_tokens + 1)]  # admitted, then one event a token
        assert got[-1].finish_reason == "length"
        assert [t for ev in got for t in ev.token_ids] == reference(base, adapters_dir, adapter, prompt, 10)
    gc.collect()
    thread.join(10 * IDLE_CHECK_S)  # idle then: collected, and its thread ends
    assert alive() is None and not thread.is_alive()
    assert lora_layers(model) == []


def test_engines_made_in_a_loop_on_one_model_each_start(base, adapters_dir, tokenizer):
    """soak: `del engine` then Engine(model, ...) again (a script's loop) was refused "the engine needs a base model
    without adapters" until the dropped engine's thread woke (IDLE_CHECK_S) and gave the model back; a model that
    an engine still held is refused, the message saying what to do."""
    model = copy.deepcopy(base)
    prompt = prompts(len(tokenizer), [6])[0]
    for _ in range(3):
        engine = Engine(model, tokenizer, adapters={"a": adapters_dir / "a"})
        assert engine.generate(prompt, "a", GREEDY).token_ids == reference(base, adapters_dir, "a", prompt, 10)
        del engine
    held = Engine(model, tokenizer, adapters={"a": adapters_dir / "a"})
    with pytest.raises(ValueError, match=r"another Engine serves: call that engine's stop\(\) first"):
        Engine(model, tokenizer)
    held.stop()
    assert Engine(model, tokenizer).generate(prompt, None, GREEDY).token_ids == \
        reference(base, adapters_dir, None, prompt, 10)


ENDS_WITHOUT_STOP = """
import atexit, sys
sys.path.insert(0, sys.argv[1])  # tests/: helpers


def at_exit():  # registered first, so it runs after the engine's own handler
    print("adapters on the model:", len(lora_layers(model)), "engine thread alive:", thread.is_alive())


atexit.register(at_exit)
from helpers import tiny_llama
from loraforge.lora.inject import lora_layers
from loraforge.models import load_tokenizer
from loraforge.serve import Engine, SamplingParams

tokenizer = load_tokenizer("smollm2-135m")
model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=96)
engine = Engine(model, tokenizer, adapters={"a": sys.argv[2]})
thread = engine._thread
print(len(engine.generate([1, 2, 3], "a", SamplingParams(max_tokens=4, ignore_eos=True)).token_ids), "tokens")
if sys.argv[3] == "drop":
    del engine
"""


@pytest.mark.parametrize("end", ["keep", "drop"])
def test_a_script_ending_without_stop_exits_cleanly(adapters_dir, decode_path, end):
    """soak: a script that ended without engine.stop() (its engine kept or dropped) aborted about every other run
    ("terminate called without an active exception", exit status 134): its engine thread, still giving the model
    back, was killed inside a torch op at the interpreter's end. It now ends at exit, the model given back first."""
    if decode_path == "forward":
        pytest.skip("the engine thread's end is the same on both decode paths")
    done = subprocess.run([sys.executable, "-c", ENDS_WITHOUT_STOP, str(Path(__file__).parents[1]),
                           str(adapters_dir / "a"), end], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (done.returncode, done.stdout) == (0, "4 tokens\nadapters on the model: 0 engine thread alive: False\n"), \
        done.stderr[-2000:]


def test_requests_join_between_decode_steps(make_engine, base, adapters_dir, tokenizer):
    engine = make_engine()
    long_q, first = queue.Queue(), prompts(len(tokenizer), [7], seed=1)[0]
    engine.submit(first, "b", SamplingParams(max_tokens=40, ignore_eos=True), long_q.put)
    assert long_q.get(timeout=30).token_ids == []  # admitted: the empty event a stream's 200 goes with
    long_q.get(timeout=30)  # its first token: it is decoding now
    later = list(zip(["a", "c", None], prompts(len(tokenizer), [20, 2, 11], seed=2)))
    queues = [queue.Queue() for _ in later]
    for (adapter, prompt), q in zip(later, queues):
        engine.submit(prompt, adapter, GREEDY, q.put)
    for (adapter, prompt), q in zip(later, queues):
        assert collect(q)[0] == reference(base, adapters_dir, adapter, prompt, GREEDY.max_tokens)
    assert engine.stats["max_running"] >= 2  # they joined the running batch
    rest = collect(long_q)[0]
    assert len(rest) == 39


def test_lru_eviction_and_reload(make_engine, base, adapters_dir, tokenizer):
    engine = make_engine(max_loaded=2)  # three adapters, two slots
    assert len(engine.resident_adapters()) == 2
    prompt = prompts(len(tokenizer), [6], seed=3)[0]
    expected = {a: reference(base, adapters_dir, a, prompt, GREEDY.max_tokens) for a in CONFIGS}
    for adapter in ["a", "b", "c", "a", "c", "b"]:
        assert engine.generate(prompt, adapter, GREEDY).token_ids == expected[adapter]
        assert engine.resident_adapters()[-1] == adapter and len(engine.resident_adapters()) == 2
    assert engine.stats["evictions"] >= 4
    # concurrent requests over more adapters than slots: the extra one waits for a slot, then runs
    engine1 = make_engine(max_loaded=1)
    queues = {a: queue.Queue() for a in CONFIGS}
    for a, q in queues.items():
        engine1.submit(prompt, a, GREEDY, q.put)
    for a, q in queues.items():
        assert collect(q)[0] == expected[a]


def test_a_max_loaded_past_any_memory_serves_as_the_reference(make_engine, base, adapters_dir, tokenizer):
    """Soak (fields): `serve --max-loaded 1000000000000` was a MemoryError traceback at start (a list of every
    slot); the slots are now handed out as used, and the stacks grow with them."""
    engine = make_engine(max_loaded=10 ** 12)
    prompt = prompts(len(tokenizer), [6], seed=3)[0]
    for adapter in ["a", "b", "c", None]:
        assert engine.generate(prompt, adapter, GREEDY).token_ids == reference(base, adapters_dir, adapter, prompt,
                                                                               GREEDY.max_tokens)
    assert sorted(engine.resident_adapters()) == ["a", "b", "c"]


def test_adapter_paths_are_confined(make_engine, adapters_dir, tmp_path):
    adapters_dir = Path(shutil.copytree(adapters_dir, tmp_path / "adapters"))
    outside = tmp_path / "outside"
    (tmp_path / "evil").mkdir()
    engine = make_engine(adapters={"a": adapters_dir / "a"}, adapters_dir=adapters_dir)
    assert set(engine.adapter_names()) == {"a", "b", "c"}  # b, c registered from the directory, not loaded yet
    assert engine.resident_adapters() == ["a"]
    for path in ["../evil", str(adapters_dir.parent / "evil"), str(outside), "/etc", ".", "a/../../evil"]:
        with pytest.raises(ServeError, match="not allowed"):
            engine.add_adapter("x", path)
    (adapters_dir / "link-out").symlink_to(tmp_path / "evil")
    with pytest.raises(ServeError, match="not allowed"):
        engine.add_adapter("x", "link-out")
    for name in ["../x", "a/b", "", "base", "-x"]:
        with pytest.raises(ServeError, match="name"):
            engine.add_adapter(name, "b")
    with pytest.raises(ServeError, match="already loaded"):
        engine.add_adapter("a", "b")
    engine.add_adapter("b2", "b")  # inside the directory: fine, and loaded once to check it
    assert "b2" in engine.resident_adapters()
    # no adapters_dir: only the start paths load
    engine2 = make_engine(adapters={"a": adapters_dir / "a"})
    with pytest.raises(ServeError, match="given at start"):
        engine2.add_adapter("b", str(adapters_dir / "b"))
    engine2.remove_adapter("a")
    engine2.add_adapter("a-again", str(adapters_dir / "a"))


def test_a_relative_start_path_is_the_working_directorys_beside_an_adapters_dir(make_engine, base, adapters_dir,
                                                                                 tmp_path, monkeypatch):
    """--adapter a=adapters/a with --adapters-dir DIR read DIR/adapters/a: another adapter served as `a` when DIR
    held one there (silently), a refusal naming a folder that is an adapter when not."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(adapters_dir, tmp_path / "adapters")
    other = tmp_path / "other"
    shutil.copytree(adapters_dir / "b", other / "adapters" / "a")  # DIR/adapters/a holds b's weights
    prompt = prompts(base.config.vocab_size, [5])[0]
    for folders in (other, tmp_path / "empty"):
        folders.mkdir(exist_ok=True)
        engine = make_engine(adapters={"a": "adapters/a"}, adapters_dir=folders)
        q = queue.Queue()
        engine.submit(prompt, "a", GREEDY, q.put)
        assert collect(q)[0] == reference(base, adapters_dir, "a", prompt, GREEDY.max_tokens)


def test_bad_adapters_are_refused(make_engine, base, adapters_dir, tmp_path):
    torch.manual_seed(0)
    mts = copy.deepcopy(base)
    inject(mts, LoraConfig(r=2, modules_to_save=("lm_head",)), "d")  # DoRA is served now (test_serve_variants.py)
    save_adapter(mts, tmp_path / "mts", "d")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text((adapters_dir / "a" / "adapter_config.json").read_text())
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(AdapterError, match="modules_to_save"):
        make_engine(adapters={"d": tmp_path / "mts"})
    with pytest.raises(AdapterError, match="pickle"):
        make_engine(adapters={"p": tmp_path / "pickle"})
    engine = make_engine(adapters={}, adapters_dir=tmp_path)
    with pytest.raises(ServeError, match="pickle"):
        engine.add_adapter("p2", "pickle")
    assert "p2" not in engine.adapter_names()
    assert engine.generate([1, 2, 3], None, GREEDY).finish_reason == "length"  # still serving


def test_an_adapter_whose_ranks_are_not_its_configs_is_refused_at_start(make_engine, base, adapters_dir, tokenizer,
                                                                         tmp_path):
    """Soak: an adapter whose tensors are rank 2 and whose config says r=4 passed the start check (listed, served),
    then its first request was refused as "an adapter made for another base?", naming the base's folder on the
    server (its cache). Now the start check reads the ranks, and a refusal names the base by its served name."""
    weights = load_file(adapters_dir / "a" / "adapter_model.safetensors")
    (tmp_path / "cut").mkdir()
    shutil.copy(adapters_dir / "a" / "adapter_config.json", tmp_path / "cut")
    save_file({k: (v[:2] if ".lora_A." in k else v[:, :2]).contiguous() for k, v in weights.items()},
              tmp_path / "cut" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"k_proj.lora_A \(2, 32\) has rank 2, but adapter_config.json gives that "
                                           r"layer r=4: the two files are not of one adapter"):
        make_engine(adapters={"cut": tmp_path / "cut"})
    (tmp_path / "other").mkdir()  # tensors missing from the file, another base named: load_adapter's misfit message
    config = json.loads((adapters_dir / "a" / "adapter_config.json").read_text())
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "x/y"}))
    save_file({k: v for k, v in weights.items() if ".layers.0." not in k},
              tmp_path / "other" / "adapter_model.safetensors")
    model = copy.deepcopy(base)
    model.name_or_path = str(tmp_path / "cache" / "the-base")  # where load_adapter reads the model's name
    with pytest.raises(AdapterError) as e:
        Engine(model, tokenizer, base_name="tiny", adapters={"other": tmp_path / "other"})
    assert "the model given is tiny" in str(e.value) and str(tmp_path / "cache") not in str(e.value)


def test_unload_while_running_lets_requests_finish(make_engine, base, adapters_dir, tokenizer):
    engine = make_engine()
    prompt = prompts(len(tokenizer), [8], seed=4)[0]
    q = queue.Queue()
    engine.submit(prompt, "a", SamplingParams(max_tokens=30, ignore_eos=True), q.put)
    first = q.get(timeout=30)
    held, gate = threading.Event(), threading.Event()
    engine.call(lambda: (held.set(), gate.wait()))  # hold the engine between two steps, the request mid-way
    assert held.wait(30) and engine.load()["running"] == 1
    engine.remove_adapter("a")
    with pytest.raises(UnknownAdapter, match=r"available: \['base', 'b', 'c'\]"):
        engine.submit(prompt, "a", GREEDY, print)
    gate.set()
    ids, _, last = collect(q)
    assert first.token_ids + ids == reference(base, adapters_dir, "a", prompt, 30)
    assert last.finish_reason == "length" and last.completion_tokens == 30
    engine.generate(prompt, "b", GREEDY)  # an iteration after it went idle: evicted
    assert "a" not in engine.resident_adapters()
    with pytest.raises(UnknownAdapter):
        engine.remove_adapter("a")


def test_queue_full_and_prompt_too_long(make_engine, tokenizer):
    engine = make_engine(max_queue=2)
    gate = threading.Event()
    engine.call(gate.wait)
    queues = [queue.Queue(), queue.Queue()]
    for q in queues:
        engine.submit([1, 2, 3], "a", GREEDY, q.put)
    with pytest.raises(QueueFull):
        engine.submit([1, 2, 3], "b", GREEDY, print)
    gate.set()
    for q in queues:
        assert collect(q)[2].finish_reason == "length"
    with pytest.raises(PromptTooLong, match="96"):
        engine.submit(list(range(96)), "a", GREEDY, print)
    with pytest.raises(PromptTooLong, match="max_tokens"):
        engine.submit(list(range(90)), "a", SamplingParams(max_tokens=10), print)
    with pytest.raises(ServeError, match="empty"):
        engine.submit([], "a", GREEDY, print)
    with pytest.raises(ServeError, match="temperature"):
        SamplingParams(temperature=-1)
    assert engine.generate(list(range(90)), "a", SamplingParams()).completion_tokens == 6  # the context left


def test_stop_strings_eos_and_usage(make_engine, tokenizer):
    engine = make_engine()
    prompt = prompts(len(tokenizer), [5], seed=5)[0]
    full = engine.generate(prompt, "c", SamplingParams(max_tokens=12, ignore_eos=True))
    assert full.finish_reason == "length" and (full.prompt_tokens, full.completion_tokens) == (5, 12)
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[len(full.text) // 2:][:3]  # a stop string from the middle of the output
    cut = engine.generate(prompt, "c", SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    # eos: put the first generated token into the engine's eos set
    engine.eos_ids.add(full.token_ids[0])
    done = engine.generate(prompt, "c", SamplingParams(max_tokens=12))
    assert (done.finish_reason, done.completion_tokens, done.token_ids) == ("stop", 1, full.token_ids[:1])
    # sampling with a seed repeats
    s1, s2 = (engine.generate(prompt, "c", SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
                                                          ignore_eos=True)) for _ in range(2))
    assert s1.token_ids == s2.token_ids


def test_fresh_adapter_equals_base(make_engine, base, tokenizer, tmp_path):
    model = copy.deepcopy(base)
    inject(model, LoraConfig(r=4), "zero")  # B = 0
    save_adapter(model, tmp_path / "zero", "zero")
    engine = make_engine(adapters={"zero": tmp_path / "zero"})
    prompt = prompts(len(tokenizer), [9], seed=6)[0]
    assert engine.generate(prompt, "zero", GREEDY).token_ids == engine.generate(prompt, None, GREEDY).token_ids


def test_an_overflowing_request_leaves_nothing_for_the_next_in_its_row(make_engine, base, adapters_dir, tokenizer,
                                                                          tmp_path):
    """An adapter whose finite weights overflow (every LoRA weight 1e30) fails its own greedy request with a clear
    error (it used to answer 200 with empty text), and the NaN keys/values its request left in its cache row do not
    reach the next request there. Found by a soak: a base-model request prefilled beside a prefix-cached one read
    the stale slots under its mask (0 · NaN = NaN) and answered ''. Here: "big" in row 0 (70 prompt tokens), then
    "a" caches a 32-token prefix in row 0, then a base request (row 0, start 0) and an "a" request (row 1, start 32
    at its cached prefix) are prefilled together: the base row's attention spans slots past its 20 tokens."""
    model = copy.deepcopy(base)
    inject(model, LoraConfig(r=4, init_lora_weights=False), "big")
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.fill_(1e30)
    save_adapter(model, tmp_path / "big", "big")
    engine = make_engine(adapters={"big": tmp_path / "big", "a": adapters_dir / "a"})
    victim, prefix, big = prompts(len(tokenizer), [20, 32, 70], seed=9)
    later = prefix + prompts(len(tokenizer), [30], seed=10)[0]
    alone = [engine.generate(victim, None, GREEDY).token_ids, engine.generate(later, "a", GREEDY).token_ids]
    assert alone[0] == reference(base, adapters_dir, None, victim, GREEDY.max_tokens)
    with pytest.raises(RuntimeError, match="logits are not finite"):
        engine.generate(big, "big", GREEDY)
    engine.generate(prefix, "a", SamplingParams(max_tokens=1))  # caches its two blocks
    gate, queues = threading.Event(), [queue.Queue(), queue.Queue()]
    engine.call(gate.wait)
    engine.submit(victim, None, GREEDY, queues[0].put)
    engine.submit(later, "a", GREEDY, queues[1].put)
    gate.set()
    assert [collect(q)[0] for q in queues] == alone


def test_a_long_prompt_is_prefilled_in_passes_with_decode_steps_between(make_engine, base, adapters_dir, tokenizer):
    """Soak: one long prompt was one prefill, every stream stalled for its length (30 s for 3,000 tokens on SmolLM2)
    and it ran on after its client left. With prefill_chunk=16 an 80-token prompt goes in four 16-token passes into
    the prefix cache, a running row decoding a step between passes, then the request with 16 tokens of its own;
    both answers equal the reference. Aborted after its first pass, it makes no other."""
    engine = make_engine(prefill_chunk=16)
    order, prefill, step = [], engine._batch.prefill, engine._batch.step
    engine._batch.prefill = lambda reqs: (order.append(len(reqs[0].prompt_ids)), prefill(reqs))[1]
    engine._batch.step = lambda: (order.append("step"), step())[1]
    long_prompt, short = prompts(len(tokenizer), [80, 5], seed=11)
    running = queue.Queue()
    engine.submit(short, "a", SamplingParams(max_tokens=40, ignore_eos=True), running.put)
    first = running.get(timeout=30).token_ids
    assert engine.generate(long_prompt, "b", GREEDY).token_ids == \
        reference(base, adapters_dir, "b", long_prompt, GREEDY.max_tokens)
    assert first + collect(running)[0] == reference(base, adapters_dir, "a", short, 40)
    assert engine.stats["prefill_passes"] == 4
    passes = [i for i, o in enumerate(order) if o in (16, 32, 48, 64, 80)]
    assert [order[i] for i in passes] == [16, 32, 48, 64, 80]  # 80: the request itself, 64 of it cached
    assert all("step" in order[a:b] for a, b in zip(passes, passes[1:]))
    engine._batch.prefill = lambda reqs: (engine.abort(req), prefill(reqs))[1]
    gate = threading.Event()
    engine.call(gate.wait)  # `req` is set before the engine's first pass
    req = engine.submit(prompts(len(tokenizer), [80], seed=12)[0], "c", GREEDY, (done := queue.Queue()).put)
    gate.set()
    assert collect(done)[2].finish_reason == "abort"
    assert engine.stats["prefill_passes"] == 5


def test_static_cache_grows_and_rows_move(make_engine, base, adapters_dir, tokenizer, decode_path, monkeypatch):
    """The static decoder's cache starting at 8 slots × 4 rows: it grows (doubling) while rows of different lengths
    run, finished rows' places are taken by later rows (copied), rows join behind running ones; every row's greedy
    tokens equal the full-forward reference; the cache goes back to its first size when the batch empties."""
    if decode_path != "static":
        pytest.skip("the static decoder's cache")
    monkeypatch.setattr(static_batch, "FIRST_LEN", 8)
    engine = make_engine()
    decoder = engine._batch.decoder
    assert engine.static and (decoder.max_batch, decoder.max_len) == (4, 8)
    sizes, resize = [], decoder.resize
    monkeypatch.setattr(decoder, "resize", lambda b, n, **kw: (sizes.append((b, n)), resize(b, n, **kw)))
    jobs = list(zip(["a", "b", None, "c", "a"], prompts(len(tokenizer), [5, 17, 3, 9, 12], seed=4),
                    [30, 25, 24, 2, 20]))
    gate = threading.Event()
    engine.call(gate.wait)
    queues = []
    for adapter, prompt, n in jobs[:3]:
        queues.append(queue.Queue())
        engine.submit(prompt, adapter, SamplingParams(max_tokens=n, ignore_eos=True), queues[-1].put)
    gate.set()
    first = queues[0].get(timeout=30).token_ids  # decoding: the last two join behind the running rows
    held = threading.Event()
    engine.call(held.wait)  # the three are still running (one token each so far) when the two join
    for adapter, prompt, n in jobs[3:]:
        queues.append(queue.Queue())
        engine.submit(prompt, adapter, SamplingParams(max_tokens=n, ignore_eos=True), queues[-1].put)
    held.set()
    for i, ((adapter, prompt, n), q) in enumerate(zip(jobs, queues)):
        got = (first if i == 0 else []) + collect(q)[0]
        assert got == reference(base, adapters_dir, adapter, prompt, n), adapter
    assert max(n for _, n in sizes) >= 32  # grown from 8: 5 + 30 positions in row "a"
    assert max(b for b, _ in sizes) == 8  # five rows at once at most: 4 -> 8
    engine.call(lambda: None)  # the engine has dropped the finished rows
    assert (decoder.max_batch, decoder.max_len) == (4, 8)


def test_a_waiting_adapter_gets_a_slot_under_steady_traffic(make_engine, base, adapters_dir, tokenizer):
    """One slot (--max-loaded 1) and adapter "a" never idle: four "a" requests of staggered lengths, each that ends
    sending the next, 60 in all. A request for "b" used to wait until the "a" traffic stopped (every pass admitted
    the "a" requests queued behind it, so the slot never went idle). Now "a" takes no new rows while "b" waits: its
    rows end within the longest one's steps, "b" gets the slot, answers, and the "a" traffic goes on after it.
    Every answer is the reference's (greedy: an "a" request of n tokens gives the first n of the longest)."""
    engine = make_engine(max_loaded=1)
    prompt = prompts(len(tokenizer), [6], seed=7)[0]
    longest, total, b_tokens = 16, 60, 4
    finished_a, sent = [], [0]  # (max_tokens, ids, finish_reason) of each "a" request as it ends; "a" requests sent

    def send_a(n: int) -> None:
        ids = []

        def on_event(ev):  # the engine thread
            ids.extend(ev.token_ids)
            if ev.finish_reason is not None:
                finished_a.append((n, ids, ev.finish_reason))
                if sent[0] < total:
                    sent[0] += 1
                    send_a(longest - sent[0] % 9)  # 8 to 16 tokens: the rows never all end together

        engine.submit(prompt, "a", SamplingParams(max_tokens=n, ignore_eos=True), on_event)

    first = queue.Queue()
    for n in (8, 11, 14, longest):
        sent[0] += 1
        send_a(n)
    engine.submit([1, 2], "a", SamplingParams(max_tokens=2, ignore_eos=True), first.put)
    collect(first)  # the "a" traffic is running
    b_queue, at_b_end = queue.Queue(), {}

    def on_b(ev):
        if ev.finish_reason is not None:
            at_b_end.update(steps=engine.stats["steps"], a_done=len(finished_a))
        b_queue.put(ev)

    steps = engine.stats["steps"]
    engine.submit(prompt, "b", SamplingParams(max_tokens=b_tokens, ignore_eos=True), on_b)
    ids, _, last = collect(b_queue)
    assert last.finish_reason == "length" and ids == reference(base, adapters_dir, "b", prompt, b_tokens)
    # the "a" rows drain (at most `longest` steps), then "b" prefills and decodes; one step may have been under way
    assert at_b_end["steps"] - steps <= longest + b_tokens + 1
    assert at_b_end["a_done"] < total  # the "a" traffic had not stopped
    deadline = time.monotonic() + 60
    while len(finished_a) < total and time.monotonic() < deadline:
        time.sleep(0.01)
    expected = reference(base, adapters_dir, "a", prompt, longest)
    assert len(finished_a) == total
    assert all(reason == "length" and got == expected[:n] for n, got, reason in finished_a)
    assert engine.stats["max_running"] >= 4  # "a" rows still batched together


def test_context_is_the_models_own(tokenizer, tmp_path):
    """The served context is models.context_length's: a yarn scaling's reach (original × factor), not the
    pre-scaling max_position_embeddings."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    model = tiny_llama(max_position_embeddings=32, rope_scaling=rope, rope_parameters=rope)
    assert context_length(model.config) == 128
    prompt = prompts(model.config.vocab_size, [100])[0]
    expected = full_forward_greedy(copy.deepcopy(model), prompt, 28)
    engine = Engine(model, tokenizer)
    try:
        assert engine.context_length == 128
        done = engine.generate(prompt, None, SamplingParams(ignore_eos=True))
        assert done.completion_tokens == 28  # the room left at 128, not a refusal at 32
        assert done.token_ids == expected  # the scaled positions as a full forward runs them
    finally:
        engine.stop()
