"""Serving benchmark: N concurrent clients over K adapters, batched across adapters vs one adapter at a time.

    python bench/serve.py [--clients 16] [--requests 1] [--max-tokens 16] [--adapters 1,4,16] [--threads 1]

Defaults take about 3 minutes on a busy 2-core CPU. The base is stored, and decodes, in the precision the rule picks
(loraforge.precision: auto is fp32 on a CPU without native bf16, bf16 where it is native); --dtype overrides it.

Each client sends `--requests` completions one after another through the HTTP API (uvicorn in a thread,
httpx clients), using adapter (client index mod K); outputs have a fixed length (ignore_eos). Two schedulers on
the same engine code:
  batched    continuous batching, a batch mixes adapters (per-row gather + bmm of the LoRA weights);
  switching  the naive way: the batch serves one adapter; when it drains, switch to the adapter of the oldest
             waiting request (what one gets by calling set_adapter per batch).
Printed: throughput in generated tokens/s, p50/p95 request latency, and ratios against K=1 (batched) and
against switching at the same K. Goal (issue 6): K=16 batched >= 0.8x K=1 and well above switching.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loraforge.adapters import delete_adapter, save_adapter
from loraforge.config import LoraConfig
from loraforge.inject import inject, lora_layers
from loraforge.models import load_base
from loraforge.precision import choose
from loraforge.serve import Engine
from loraforge.serve.api import ServerThread, create_app

WORDS = ("river stone light garden morning engine window silver forest letter music winter harbor "
         "mountain paper candle ocean bridge market island").split()


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--adapters", default="1,4,16", help="K values")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 (default) gives steady numbers on a shared CPU, 0 keeps torch's default")
    ap.add_argument("--dtype", default="auto", help="auto (loraforge.precision's choice here), fp32, bf16 or fp16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.adapters.split(",")]
    precision = choose(args.dtype, "auto")  # the engine decodes in the dtype the base is stored in
    print(precision.line())
    model, tokenizer = load_base(args.model, dtype=precision.storage)
    print(f"model {args.model} ({precision.storage}), {args.clients} clients x {args.requests} requests x "
          f"{args.max_tokens} tokens, LoRA r={args.rank} on q,k,v,o, torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, Path(tmp), max(ks), args.rank)
        for k in ks:
            models = [f"ad{i % k}" for i in range(args.clients)]
            for mode, cls in (("batched", Engine), ("switching", SwitchingEngine)):
                adapters = {f"ad{i}": paths[f"ad{i}"] for i in range(k)}
                engine = cls(model, tokenizer, base_name=args.model, adapters=adapters, max_loaded=k,
                             max_batch=args.clients, max_queue=4 * args.clients)
                with ServerThread(create_app(engine)) as url:
                    asyncio.run(run_clients(url, [f"ad{i}" for i in range(k)], 1, 2))  # warm-up
                    steps0 = engine.stats["steps"]
                    tokens, wall, lat = asyncio.run(run_clients(url, models, args.requests, args.max_tokens))
                    steps = engine.stats["steps"] - steps0
                engine.stop()  # the model comes back without adapters, for the next engine
                rows.append(dict(k=k, mode=mode, tokens=tokens, wall=wall, tps=tokens / wall,
                                 p50=percentile(lat, 50), p95=percentile(lat, 95), steps=steps))
                print(f"  K={k:<3} {mode:<9} {tokens / wall:7.1f} tok/s  ({tokens} tokens in {wall:.1f} s, "
                      f"{steps} decode steps)", flush=True)
    base_tps = next(r["tps"] for r in rows if r["k"] == ks[0] and r["mode"] == "batched")
    print(f"\n| K | scheduler | tok/s | p50 s | p95 s | decode steps | vs K={ks[0]} batched | vs switching |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        naive = next(x["tps"] for x in rows if x["k"] == r["k"] and x["mode"] == "switching")
        print(f"| {r['k']} | {r['mode']} | {r['tps']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['steps']} | "
              f"{r['tps'] / base_tps:.2f}x | {r['tps'] / naive:.2f}x |")


if __name__ == "__main__":
    main()
