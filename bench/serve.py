"""Serving benchmark: N concurrent clients over K adapters, batched across adapters vs one adapter at a time.

    python bench/serve.py [--clients 64] [--requests 1] [--max-tokens 16] [--adapters 1,16,64] [--threads N]
                          [--repeats 3]
    python bench/serve.py --shared-prefix [--clients 64] [--system-tokens 200] [--max-tokens 16]
    python bench/serve.py --device cuda ...      # the engine on a GPU (bench/gpu.sh)

Defaults take about 15 minutes on a 2-core CPU (three rounds). The base is stored, and decodes, in the precision
the rule picks (loraforge.precision: auto is fp32 on a CPU without native bf16, bf16 where it is native); --dtype
overrides it.

Each client sends `--requests` completions one after another through the HTTP API (uvicorn in a thread,
httpx clients), using adapter (client index mod K); outputs have a fixed length (ignore_eos). Two schedulers on
the same engine code:
  batched    continuous batching, a batch mixes adapters (per-row gather + bmm of the LoRA weights);
  switching  the naive way: the batch serves one adapter; when it drains, switch to the adapter of the oldest
             waiting request (what one gets by calling set_adapter per batch).
Runs, in one process, --repeats rounds of: the base model alone (no adapter), K=1, 16, 64 batched, K=16 switching.
Printed: throughput in generated tokens/s, p50/p95 request latency, and the goals of issue 19: one adapter
>= 0.85x the base alone, 64 distinct adapters >= 0.9x one, batched >= 5x switching at 16 adapters (medians);
with K=16, also the base's products alone at 2 rows (switching's steps) and at --clients rows (a batched step):
what a token costs in each with no other work, the ratio an engine without overhead would reach here.

--shared-prefix runs instead the prefix-cache workload: every client sends one streamed chat completion to one
adapter, all sharing a system prompt of about --system-tokens tokens, each with its own short question, after one
warm-up request with that system prompt; the engine with the prefix cache off, then on, then off and on again.
Printed: time to first token (p50, p95) and generated tokens/s, and the ratios on / off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flags import at_least, whole_numbers

from loraforge.lora.adapters import delete_adapter, save_adapter
from loraforge.config import LoraConfig
from loraforge.inference.llama import Decoder
from loraforge.lora.inject import inject, lora_layers
from loraforge.models import load_base
from loraforge.precision import choose
from loraforge.serve import Engine
from loraforge.serve.api import ServerThread, create_app
from loraforge.serve.residency import ADAPTER_DTYPES

WORDS = ("river stone light garden morning engine window silver forest letter music winter harbor "
         "mountain paper candle ocean bridge market island").split()


STATIC = {"auto": None, "static": True, "forward": False}


class SwitchingEngine(Engine):
    """The naive baseline: only requests for one adapter run at a time; switch when the batch drains."""

    def _select(self, waiting):
        if self._batch.rows or not waiting:
            return []
        first = waiting[0].adapter
        return [r for r in waiting if r.adapter is first]


def make_adapters(model, root: Path, k: int, r: int) -> dict[str, str]:
    """k random adapters (non-zero B) on the attention projections, saved in PEFT format."""
    paths = {}
    for i in range(k):
        torch.manual_seed(1000 + i)
        name = f"ad{i}"
        inject(model, LoraConfig(r=r, lora_alpha=2 * r), name)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B[name].weight.normal_(0, 0.02)
        paths[name] = str(save_adapter(model, root / name, name))
        delete_adapter(model, name)
    return paths


def prompt(i: int) -> str:
    n = 8 + (i * 7) % 17  # 8..24 words: rows of different lengths
    return f"Client {i} asks: " + " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(n))


async def run_clients(url: str, models: list[str], requests: int, max_tokens: int):
    import httpx

    latencies, tokens = [], 0

    async def client(http, i):
        nonlocal tokens
        for j in range(requests):
            body = {"model": models[i], "prompt": prompt(i * 31 + j), "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=len(models) + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, i) for i in range(len(models))))
        wall = time.perf_counter() - t0
    return tokens, wall, latencies


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def run_one(model, tokenizer, args, label: str, cls, adapters: dict[str, str], models: list[str]) -> dict:
    """One engine + server, a warm-up of every client, then the clients; the model comes back without adapters."""
    engine = cls(model, tokenizer, base_name=args.model, adapters=adapters, max_loaded=max(1, len(adapters)),
                 adapter_dtype=args.adapter_dtype, static=STATIC[args.decode],
                 max_batch=args.clients, max_queue=4 * args.clients)
    with ServerThread(create_app(engine)) as url:
        # warm-up: every client once (2 tokens), so the measured batch's shapes are not new to the device (on
        # a GPU the first batch of 32 paid for them: the base ran first and measured slower than 16 adapters)
        asyncio.run(run_clients(url, models, 1, 2))
        steps0 = engine.stats["steps"]
        tokens, wall, lat = asyncio.run(run_clients(url, models, args.requests, args.max_tokens))
        steps = engine.stats["steps"] - steps0
    engine.stop()
    row = dict(label=label, tokens=tokens, wall=wall, tps=tokens / wall, p50=percentile(lat, 50),
               p95=percentile(lat, 95), steps=steps)
    print(f"  {label:<22} {row['tps']:7.1f} tok/s  ({tokens} tokens in {wall:.1f} s, {steps} decode steps, "
          f"p50 {row['p50']:.2f} s, p95 {row['p95']:.2f} s)", flush=True)
    return row


def system_prompt(tokenizer, n: int) -> str:
    """About n tokens of a made-up assistant's instructions."""
    words, text = [], ""
    while len(tokenizer(text)["input_ids"]) < n:
        i = len(words)
        words.append(WORDS[(i * 7) % len(WORDS)] + ("." if i % 12 == 11 else ""))
        text = "You are the assistant of a small town's archive. Follow these notes: " + " ".join(words)
    return text


async def run_chats(url: str, model: str, system: str, questions: list[str], max_tokens: int):
    """One streamed chat completion per question, all at once: (tokens, wall s, times to first token)."""
    import httpx

    ttfts, tokens = [], 0

    async def client(http, question):
        nonlocal tokens
        body = {"model": model, "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": question}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        t0, first = time.perf_counter(), None
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
        ttfts.append(first)

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=len(questions) + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, q) for q in questions))
        wall = time.perf_counter() - t0
    return tokens, wall, [t for t in ttfts if t is not None]


def run_shared(model, tokenizer, args, label: str, cache_mb: float, adapter: dict[str, str]) -> dict:
    """The shared-system-prompt workload on one engine (prefix cache of `cache_mb` MB)."""
    system = system_prompt(tokenizer, args.system_tokens)
    questions = [f"Question {i}: where is the {WORDS[i % len(WORDS)]} kept, and since when?"
                 for i in range(args.clients)]
    engine = Engine(model, tokenizer, base_name=args.model, adapters=adapter, max_batch=args.clients,
                    max_queue=4 * args.clients, prefix_cache_mb=cache_mb)
    name = next(iter(adapter))
    with ServerThread(create_app(engine)) as url:
        asyncio.run(run_chats(url, name, system, ["Which year is it?"], 2))  # warm-up: the system prompt once
        before = dict(engine.stats)
        tokens, wall, ttft = asyncio.run(run_chats(url, name, system, questions, args.max_tokens))
        prefilled = engine.stats["prefilled_tokens"] - before.get("prefilled_tokens", 0)
        cached = engine.stats["cached_tokens"] - before.get("cached_tokens", 0)
    engine.stop()
    row = dict(label=label, tps=tokens / wall, ttft50=percentile(ttft, 50), ttft95=percentile(ttft, 95),
               prefilled=prefilled, cached=cached, wall=wall)
    print(f"  {label:<14} {row['tps']:7.1f} tok/s  TTFT p50 {row['ttft50']:.2f} s, p95 {row['ttft95']:.2f} s  "
          f"({tokens} tokens in {wall:.1f} s; prompt tokens: {prefilled} prefilled, {cached} from the cache)",
          flush=True)
    return row


def shared_prefix(model, tokenizer, args, paths: dict[str, str]) -> None:
    print(f"shared-prefix workload: {args.clients} streamed chats to one adapter, a system prompt of "
          f"{args.system_tokens} tokens, {args.max_tokens} tokens each")
    rows = {"off": [], "on": []}
    for rep in range(args.repeats):  # interleaved: off, on, off, on ...
        for mode, mb in (("off", 0), ("on", 256)):
            rows[mode].append(run_shared(model, tokenizer, args, f"cache {mode} #{rep + 1}", mb, paths))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("tps", "ttft50", "ttft95")} for m, rs in rows.items()}
    print("\n| prefix cache | tok/s | TTFT p50 s | TTFT p95 s |")
    print("|---|---|---|---|")
    for m in ("off", "on"):
        print(f"| {m} | {med[m]['tps']:.1f} | {med[m]['ttft50']:.2f} | {med[m]['ttft95']:.2f} |")
    print(f"\ncache on / off (median of {args.repeats}): tokens/s {med['on']['tps'] / med['off']['tps']:.2f}x, "
          f"TTFT p50 {med['on']['ttft50'] / med['off']['ttft50']:.2f}x, "
          f"TTFT p95 {med['on']['ttft95'] / med['off']['ttft95']:.2f}x")


def products_alone(model, clients: int, rounds: int = 5) -> None:
    """The base's products alone, as switching's two-row steps and a batched step of `clients` rows run them (the
    static decoder's stored weights: StoredWeight.linear), interleaved rounds: what one token costs in each with no
    other work, so the printed ratio is the batched-vs-switching figure an engine with no overhead would reach."""
    dec = Decoder(model, 1, 8)
    sync = torch.cuda.synchronize if dec.device.type == "cuda" else lambda: None
    weights = [p.weight for _, ps in dec.layers for p in ps.values()] + [dec.head]

    def run(rows: int) -> float:
        xs = {w.in_features: torch.randn(rows, 1, w.in_features, dtype=dec.dtype, device=dec.device) for w in weights}
        sync()
        t0 = time.perf_counter()
        for w in weights:
            w.linear(xs[w.in_features])
        sync()
        return time.perf_counter() - t0

    small, big = [], []
    with torch.inference_mode():
        for _ in range(rounds):
            run(2)
            small.append(run(2))
            run(clients)
            big.append(run(clients))
    t2, tb = statistics.median(small), statistics.median(big)
    flops = 2 * sum(w.in_features * w.out_features for w in weights)
    print(f"\nthe products alone (median of {rounds} interleaved rounds): 2 rows {1000 * t2:.1f} ms "
          f"({dec.nbytes / t2 / 1e9:.1f} GB/s of weights), {1000 * t2 / 2:.2f} ms a token; {clients} rows "
          f"{1000 * tb:.1f} ms ({clients * flops / tb / 1e9:.1f} GFLOP/s), {1000 * tb / clients:.2f} ms a token: "
          f"a batched step with no other work would be {(t2 / 2) / (tb / clients):.2f}x switching's per token")


GOALS = [  # (what, numerator, denominator, goal)
    ("one adapter vs the base alone", "K=1 batched", "base", 0.85),
    ("64 distinct adapters vs one", "K=64 batched", "K=1 batched", 0.9),
    ("batched vs switching at 16 adapters", "K=16 batched", "K=16 switching", 5.0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--adapters", default="1,16,64", help="K values (batched; switching at 16 when listed)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--decode", default="auto", choices=tuple(STATIC),
                    help="the engine's decode path: auto (the static decoder for Llama-family bases), static, or "
                         "forward (transformers' forward, a concatenated cache)")
    ap.add_argument("--adapter-dtype", default="auto", choices=ADAPTER_DTYPES,
                    help="the served adapters' weights (auto: bf16 for a bf16 base, else fp32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads (default: all cores); 1 gives steadier numbers on a shared CPU")
    ap.add_argument("--dtype", default="auto", help="auto (loraforge.precision's choice here), fp32, bf16 or fp16")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the engine runs: cpu (what `loraforge serve` does in this version) or cuda")
    ap.add_argument("--shared-prefix", action="store_true",
                    help="run the shared-system-prompt workload, prefix cache off vs on, instead")
    ap.add_argument("--system-tokens", type=int, default=200, help="--shared-prefix: system prompt length")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds, interleaved (every run once per round; --shared-prefix: off/on pairs); medians "
                         "are printed, so that load from other processes falls on every run alike")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1 (one round of every run), got {args.repeats}")
    at_least(ap, args, clients=1, requests=1, max_tokens=1, rank=1, threads=1, system_tokens=1)
    ks = whole_numbers(ap, "adapters", args.adapters, "K")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); leave --device "
                 "out to run the engine on the CPU")
    torch.set_num_threads(args.threads)
    # the engine decodes in the dtype the base is stored in
    precision = choose(args.dtype, "auto", device=args.device, training=False)
    print(precision.line())
    model, tokenizer = load_base(args.model, dtype=precision.storage, device=args.device)
    print(f"model {args.model} ({precision.storage} on {args.device}), {args.clients} clients x {args.requests} "
          f"requests x {args.max_tokens} tokens, LoRA r={args.rank} on q,k,v,o ({args.adapter_dtype} adapter "
          f"weights), decode {args.decode}, torch threads {torch.get_num_threads()}")
    if args.shared_prefix:
        with tempfile.TemporaryDirectory() as tmp:
            shared_prefix(model, tokenizer, args, make_adapters(model, Path(tmp), 1, args.rank))
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, Path(tmp), max(ks), args.rank)
        runs = [("base", Engine, {}, [args.model] * args.clients)]
        for k in ks:
            adapters = {f"ad{i}": paths[f"ad{i}"] for i in range(k)}
            models = [f"ad{i % k}" for i in range(args.clients)]
            for mode, cls in (("batched", Engine), ("switching", SwitchingEngine)):
                if mode == "batched" or k == 16:
                    runs.append((f"K={k} {mode}", cls, adapters, models))
        rounds = []
        for rep in range(args.repeats):  # interleaved: every run once per round
            print(f"round {rep + 1} of {args.repeats}", flush=True)
            rounds.append({label: run_one(model, tokenizer, args, label, cls, adapters, models)
                           for label, cls, adapters, models in runs})
    med = lambda label, key: statistics.median(r[label][key] for r in rounds)  # noqa: E731
    print(f"\n| run (median of {args.repeats} rounds) | tok/s | p50 s | p95 s | decode steps |")
    print("|---|---|---|---|---|")
    for label, *_ in runs:
        print(f"| {label} | {med(label, 'tps'):.1f} | {med(label, 'p50'):.2f} | {med(label, 'p95'):.2f} | "
              f"{med(label, 'steps'):.0f} |")
    print("\n| ratio (median over rounds of the ratio within a round) | measured | each round | goal |")
    print("|---|---|---|---|")
    for what, num, den, goal in GOALS:
        if num in rounds[0] and den in rounds[0]:
            each = [r[num]["tps"] / r[den]["tps"] for r in rounds]
            ratio = statistics.median(each)
            print(f"| {what} ({num} / {den}) | {ratio:.2f}x | {', '.join(f'{x:.2f}' for x in each)} | "
                  f">= {goal}x {'met' if ratio >= goal else 'NOT met'} |")
    if 16 in ks:
        products_alone(model, args.clients)

if __name__ == "__main__":
    main()
