"""Serving benchmark: N concurrent clients over K adapters, batched across adapters vs one adapter at a time.

    python bench/serve.py [--clients 64] [--requests 1] [--max-tokens 16] [--adapters 1,16,64] [--threads N]

Defaults take about 5 minutes on a busy 2-core CPU. The base is stored, and decodes, in the precision the rule picks
(loraforge.precision: auto is fp32 on a CPU without native bf16, bf16 where it is native); --dtype overrides it.

Each client sends `--requests` completions one after another through the HTTP API (uvicorn in a thread,
httpx clients), using adapter (client index mod K); outputs have a fixed length (ignore_eos). Two schedulers on
the same engine code:
  batched    continuous batching, a batch mixes adapters (per-row gather + bmm of the LoRA weights);
  switching  the naive way: the batch serves one adapter; when it drains, switch to the adapter of the oldest
             waiting request (what one gets by calling set_adapter per batch).
Runs, in one process: the base model alone (no adapter), K=1, 16, 64 batched, K=16 switching.
Printed: throughput in generated tokens/s, p50/p95 request latency, and the goals of issue 19: one adapter
>= 0.85x the base alone, 64 distinct adapters >= 0.9x one, batched >= 5x switching at 16 adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loraforge.lora.adapters import delete_adapter, save_adapter
from loraforge.config import LoraConfig
from loraforge.lora.inject import inject, lora_layers
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


def run_one(model, tokenizer, args, label: str, cls, adapters: dict[str, str], models: list[str]) -> dict:
    """One engine + server, a warm-up, then the clients; the model comes back without adapters."""
    engine = cls(model, tokenizer, base_name=args.model, adapters=adapters, max_loaded=max(1, len(adapters)),
                 max_batch=args.clients, max_queue=4 * args.clients)
    with ServerThread(create_app(engine)) as url:
        asyncio.run(run_clients(url, sorted(set(models)), 1, 2))  # warm-up: every adapter once
        steps0 = engine.stats["steps"]
        tokens, wall, lat = asyncio.run(run_clients(url, models, args.requests, args.max_tokens))
        steps = engine.stats["steps"] - steps0
    engine.stop()
    row = dict(label=label, tokens=tokens, wall=wall, tps=tokens / wall, p50=percentile(lat, 50),
               p95=percentile(lat, 95), steps=steps)
    print(f"  {label:<22} {row['tps']:7.1f} tok/s  ({tokens} tokens in {wall:.1f} s, {steps} decode steps, "
          f"p50 {row['p50']:.2f} s, p95 {row['p95']:.2f} s)", flush=True)
    return row


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
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads (default: all cores); 1 gives steadier numbers on a shared CPU")
    ap.add_argument("--dtype", default="auto", help="auto (loraforge.precision's choice here), fp32, bf16 or fp16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.adapters.split(",")]
    precision = choose(args.dtype, "auto")  # the engine decodes in the dtype the base is stored in
    print(precision.line())
    model, tokenizer = load_base(args.model, dtype=precision.storage)
    print(f"model {args.model} ({precision.storage}), {args.clients} clients x {args.requests} requests x "
          f"{args.max_tokens} tokens, LoRA r={args.rank} on q,k,v,o, torch threads {torch.get_num_threads()}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, Path(tmp), max(ks), args.rank)
        rows["base"] = run_one(model, tokenizer, args, "base", Engine, {}, [args.model] * args.clients)
        for k in ks:
            adapters = {f"ad{i}": paths[f"ad{i}"] for i in range(k)}
            models = [f"ad{i % k}" for i in range(args.clients)]
            for mode, cls in (("batched", Engine), ("switching", SwitchingEngine)):
                if mode == "switching" and k != 16:
                    continue
                label = f"K={k} {mode}"
                rows[label] = run_one(model, tokenizer, args, label, cls, adapters, models)
    print("\n| run | tok/s | p50 s | p95 s | decode steps |")
    print("|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['label']} | {r['tps']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['steps']} |")
    print("\n| ratio | measured | goal |")
    print("|---|---|---|")
    for what, num, den, goal in GOALS:
        if num in rows and den in rows:
            ratio = rows[num]["tps"] / rows[den]["tps"]
            print(f"| {what} ({num} / {den}) | {ratio:.2f}x | >= {goal}x {'met' if ratio >= goal else 'NOT met'} |")


if __name__ == "__main__":
    main()
