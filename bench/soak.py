"""Soak the server: concurrent openai clients for N minutes, the server's resident memory (RSS) over time.

    python bench/soak.py [--minutes 10] [--clients 24] [--max-loaded 2] [--max-queue 16]

The server runs in its own process (so its RSS is its own): a tiny random Llama (SmolLM2's tokenizer) with
--adapters adapters in an adapters directory, one more loaded and unloaded at run time, `--api-key`. Clients (threads,
the `openai` package) mix: greedy completions and chats, half of them streaming, checked against the answer the
server gave alone before the soak; seeded sampling; streams dropped after two chunks (disconnects); bursts;
bad input of many kinds (each must be a 4xx with a JSON error); hot load/unload of one adapter.
Printed: RSS every --every seconds, then the counts by status and kind, every failure (a 5xx, a wrong 200, a
stream that ended with an error), and RSS growth after warm-up (--warmup seconds).
tests/serve/test_serve_soak.py runs the same traffic for about half a minute.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from flags import at_least

KEY = "sk-soak"
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning there was", "Tell me about rivers",
           "Numbers: 1, 2, 3,", "A list of fruits:"]
BAD = [  # (path, body): every one must answer 4xx with a JSON error
    ("/v1/completions", {"model": "a0", "prompt": "x", "temperature": "hot"}),
    ("/v1/completions", {"model": "a0", "prompt": "x", "seed": 18446744073709551616}),
    ("/v1/completions", {"model": "a0", "prompt": "x", "seed": -(2**63) - 1}),
    ("/v1/completions", {"model": "a0", "prompt": "x", "top_p": 0}),
    ("/v1/completions", {"model": "a0", "prompt": "x", "max_tokens": -3}),
    ("/v1/completions", {"model": "a0", "prompt": "x", "max_tokens": 10**6}),
    ("/v1/completions", {"model": "a0", "prompt": "x", "n": 3}),
    ("/v1/completions", {"model": "a0", "prompt": [10**9]}),
    ("/v1/completions", {"model": "nope", "prompt": "x"}),
    ("/v1/completions", {"model": "a0"}),
    ("/v1/completions", "not json"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": [{"type": "text",
                                                                                      "text": 123}]}]}),
    ("/v1/chat/completions", {"model": "a0", "messages": []}),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "robot", "content": "x"}]}),
    ("/v1/adapters", {"name": "../x", "path": "a0"}),
    ("/v1/adapters", {"name": "x", "path": "../../etc"}),
    ("/v1/adapters", {"name": "broken", "path": "corrupt"}),
]


def build(root: Path, adapters: int):
    """A tiny random Llama and its adapters a0.. (+ hot-src, a copy of a1, + a corrupt one) under root."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.lora.adapters import delete_adapter, save_adapter
    from loraforge.config import LoraConfig
    from loraforge.lora.inject import inject
    from loraforge.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=False)).eval()
    for i, name in enumerate(f"a{i}" for i in range(adapters)):
        torch.manual_seed(100 + i)
        inject(model, LoraConfig(r=4 + 4 * (i % 2), lora_alpha=8, init_lora_weights=False), name)
        save_adapter(model, root / name, name)
        delete_adapter(model, name)
    shutil.copytree(root / "a1", root / "hot-src")  # loaded and unloaded at run time as "hot": answers as a1
    (root / "corrupt").mkdir(exist_ok=True)
    (root / "corrupt" / "adapter_config.json").write_text((root / "a0" / "adapter_config.json").read_text())
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    return model, tokenizer


def make_engine(root: Path, adapters: int, max_loaded: int, max_queue: int):
    from loraforge.serve import Engine

    model, tokenizer = build(root, adapters)
    return Engine(model, tokenizer, base_name="tiny", adapters_dir=root, max_loaded=max_loaded,
                  max_queue=max_queue, max_batch=32, default_max_tokens=32)


class Traffic:
    """Clients against `url`: counts by (kind, status) and the failures."""

    def __init__(self, url: str, models: list[str], seed: int = 0):
        import openai

        self.url, self.models = url, models
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        self.counts = collections.Counter()
        self.failures: list[str] = []
        self.expected: dict[tuple, str] = {}
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.hot_loaded = False

    def note(self, kind: str, status, detail: str | None = None):
        with self.lock:
            self.counts[(kind, status)] += 1
            if detail is not None:
                self.failures.append(f"{kind} {status}: {detail}"[:400])

    def greedy(self, model: str, prompt: str, chat: bool, stream: bool) -> str:
        kw = dict(model=model, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        if chat:
            msgs = [{"role": "user", "content": prompt}]
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in
                               self.client.chat.completions.create(messages=msgs, stream=True, **kw) if c.choices)
            return self.client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
        if stream:
            return "".join(c.choices[0].text for c in self.client.completions.create(prompt=prompt, stream=True, **kw))
        return self.client.completions.create(prompt=prompt, **kw).choices[0].text

    def learn(self):
        """The answer each (model, prompt, chat) gets alone, before the traffic starts."""
        for model in self.models:
            for prompt in PROMPTS:
                for chat in (False, True):
                    self.expected[(model, prompt, chat)] = self.greedy(model, prompt, chat, False)
        self.expected.update({("hot", *k[1:]): v for k, v in self.expected.items() if k[0] == "a1"})

    def one(self, rng: random.Random):
        import httpx
        import openai

        kind = rng.choices(["greedy", "sample", "disconnect", "bad", "burst"], [10, 3, 2, 3, 1])[0]
        try:
            if kind == "greedy":
                model = rng.choice(self.models + (["hot"] if self.hot_loaded else []))
                prompt, chat, stream = rng.choice(PROMPTS), rng.random() < 0.5, rng.random() < 0.5
                text = self.greedy(model, prompt, chat, stream)
                want = self.expected[(model, prompt, chat)]
                self.note(f"greedy{'-stream' if stream else ''}", 200,
                          None if text == want else f"{model} {prompt!r}: {text!r} != {want!r}")
            elif kind == "sample":
                r = self.client.completions.create(model=rng.choice(self.models), prompt=rng.choice(PROMPTS),
                                                   max_tokens=8, temperature=rng.choice([1e-300, 5e-324, 0.7, 2.0]),
                                                   top_p=rng.choice([1e-300, 0.5, 1.0]), seed=rng.randrange(2**64))
                self.note(kind, 200, None if r.choices[0].finish_reason in ("stop", "length") else str(r))
            elif kind == "disconnect":
                stream = self.client.completions.create(model=rng.choice(self.models), prompt=rng.choice(PROMPTS),
                                                        max_tokens=60, stream=True, extra_body={"ignore_eos": True})
                for i, _ in enumerate(stream):
                    if i == 1:
                        break
                stream.close()
                self.note(kind, 200)
            elif kind == "bad":
                path, body = rng.choice(BAD)
                kw = {"content": body} if isinstance(body, str) else {"json": body}
                r = httpx.post(self.url + path, headers={"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"}, timeout=120, **kw)
                ok = 400 <= r.status_code < 500 and r.headers.get("content-type") == "application/json" \
                    and r.json()["error"]["message"] and r.status_code != 429
                self.note(kind, r.status_code, None if ok or r.status_code == 429 else f"{body}: {r.text}")
            else:  # a burst: many at once, 429 allowed, every 200 right
                threads = [threading.Thread(target=self.one_greedy, args=(random.Random(rng.random()),))
                           for _ in range(10)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        except openai.RateLimitError:
            self.note(kind, 429)
        except openai.NotFoundError as e:  # the hot adapter was unloaded meanwhile
            self.note(kind, 404, None if "hot" in str(e) else str(e))
        except openai.APIStatusError as e:
            self.note(kind, e.status_code, str(e))
        except openai.APIError as e:  # a stream that ended with an error event, a connection error
            self.note(kind, "error", f"{type(e).__name__}: {e}")

    def one_greedy(self, rng):
        import openai

        model, prompt = rng.choice(self.models), rng.choice(PROMPTS)
        try:
            text = self.greedy(model, prompt, False, False)
            want = self.expected[(model, prompt, False)]
            self.note("burst", 200, None if text == want else f"{model} {prompt!r}: {text!r} != {want!r}")
        except openai.RateLimitError:
            self.note("burst", 429)
        except openai.APIStatusError as e:
            self.note("burst", e.status_code, str(e))

    def hot_swap(self, stop: threading.Event):
        """Load 'hot' (a copy of models[1]), let it serve a while, unload it; again."""
        import httpx

        headers = {"Authorization": f"Bearer {KEY}"}
        while not stop.wait(1.0):
            r = httpx.post(self.url + "/v1/adapters", json={"name": "hot", "path": "hot-src"}, headers=headers,
                           timeout=120)
            self.note("load", r.status_code, None if r.status_code == 200 else r.text)
            self.hot_loaded = r.status_code == 200
            if stop.wait(2.0):
                break
            self.hot_loaded = False
            r = httpx.delete(self.url + "/v1/adapters/hot", headers=headers, timeout=120)
            self.note("unload", r.status_code, None if r.status_code == 200 else r.text)

    def run(self, seconds: float, clients: int):
        stop = threading.Event()
        deadline = time.monotonic() + seconds

        def client(i):
            rng = random.Random(i)
            while time.monotonic() < deadline:
                self.one(rng)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        threads.append(threading.Thread(target=self.hot_swap, args=(stop,)))
        for t in threads:
            t.start()
        for t in threads[:-1]:
            t.join()
        stop.set()
        threads[-1].join()

    def fives(self) -> int:
        return sum(n for (_, status), n in self.counts.items() if isinstance(status, int) and status >= 500)


def _serve(root: str, adapters: int, max_loaded: int, max_queue: int, threads: int, ready) -> None:
    import torch
    import uvicorn

    from loraforge.serve.api import create_app

    torch.set_num_threads(threads)
    engine = make_engine(Path(root), adapters, max_loaded, max_queue)
    config = uvicorn.Config(create_app(engine, api_key=KEY), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)

    def announce():
        while not server.started:
            time.sleep(0.05)
        ready.put(server.servers[0].sockets[0].getsockname()[1])

    threading.Thread(target=announce, daemon=True).start()
    server.run()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--max-loaded", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--every", type=float, default=30, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=120, help="seconds of traffic before growth is measured")
    args = ap.parse_args()
    at_least(ap, args, minutes=0.01, clients=1, adapters=1, max_loaded=1, max_queue=1, threads=1, every=0.1, warmup=0)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        ready = ctx.Queue()
        proc = ctx.Process(target=_serve, args=(tmp, args.adapters, args.max_loaded, args.max_queue, args.threads,
                                                ready), daemon=True)
        proc.start()
        try:
            url = f"http://127.0.0.1:{ready.get(timeout=600)}"
            traffic = Traffic(url, [f"a{i}" for i in range(args.adapters)] + ["tiny"])
            traffic.learn()
            samples = [(0.0, rss_mb(proc.pid))]
            print(f"server pid {proc.pid}: RSS {samples[0][1]:.0f} MB before the traffic", flush=True)
            t0 = time.monotonic()
            runner = threading.Thread(target=traffic.run, args=(args.minutes * 60, args.clients))
            runner.start()
            while runner.is_alive():
                runner.join(args.every)
                samples.append((time.monotonic() - t0, rss_mb(proc.pid)))
                done = sum(traffic.counts.values())
                print(f"  t={samples[-1][0]:6.0f} s  RSS {samples[-1][1]:6.1f} MB  requests {done}  "
                      f"failures {len(traffic.failures)}", flush=True)
        finally:
            proc.terminate()
            proc.join(10)
    print("\nby kind and status:", json.dumps({f"{k} {s}": n for (k, s), n in sorted(traffic.counts.items(),
                                                                                     key=str)}))
    for f in traffic.failures[:30]:
        print("FAILURE", f)
    after = [rss for t, rss in samples if t >= args.warmup]
    warm = after[0] if after else samples[-1][1]
    print(f"\n{sum(traffic.counts.values())} requests in {samples[-1][0]:.0f} s, {traffic.fives()} 5xx, "
          f"{len(traffic.failures)} failures; RSS {samples[0][1]:.0f} MB before, {warm:.0f} MB after "
          f"{args.warmup:.0f} s of warm-up, {samples[-1][1]:.0f} MB at the end: growth after warm-up "
          f"{samples[-1][1] - warm:+.1f} MB (max {max(r for _, r in samples):.0f} MB)")


if __name__ == "__main__":
    main()
