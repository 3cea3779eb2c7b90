"""Many adapters at once: loraforge's server engine against llama.cpp on the same requests (issue 26, item 3).

    python bench/adapters_llamacpp.py [--adapters 16] [--clients 16] [--tokens 32] [--threads 2] [--rounds 3]

--clients requests arrive together, request i for adapter i mod --adapters (random LoRA adapters, r=8 on q, k, v,
o, B drawn from N(0, 0.02) so none is a no-op), each decoding --tokens greedy tokens after its own prompt; printed:
total generated tokens/s of each engine and the ratio, the median of --rounds interleaved rounds.

  loraforge   `loraforge.serve.Engine` (what `loraforge serve` runs), every adapter resident, the requests
              submitted at once: continuous batching, one batch mixing all the adapters.
  llama.cpp   llama-cpp-python on the same base (a GGUF at the storage precision loraforge picks here: F32 or
              BF16) with every adapter loaded once (`loraforge export --to gguf-lora` files, llama_adapter_lora_init)
              and the requests run one after another, each with its adapter set on the context. That is what
              llama.cpp's servers give for these requests: llama-cpp-python's server runs one request at a time,
              and llama-server does not batch requests whose LoRA settings differ.

Both engines take the same prompt token ids and skip the HTTP layer. The llama.cpp row needs
`pip install 'loraforge[llamacpp]'`; where llama-cpp-python is absent (or its build failed) the row says so and the
loraforge row still runs.
"""

from __future__ import annotations

import argparse
import ctypes
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import CACHE, llama_cpp_greedy, write_gguf  # noqa: E402
from hardware import describe, header  # noqa: E402
from serve import make_adapters, prompt  # noqa: E402

from loraforge.export.gguf_lora import export_gguf_lora  # noqa: E402
from loraforge.models import builtin_gguf_path, load_base  # noqa: E402
from flags import at_least  # noqa: E402
from loraforge.precision import choose  # noqa: E402
from loraforge.serve import Engine  # noqa: E402
from loraforge.serve.sampling import SamplingParams  # noqa: E402

MODEL = "smollm2-135m"


def loraforge_run(engine: Engine, prompts: list[list[int]], names: list[str], tokens: int):
    """Submit every request at once, wait for all: (seconds, generated tokens, outputs)."""
    done: queue.Queue = queue.Queue()
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}

    def on_event(i):
        def handle(ev):
            outputs[i].extend(ev.token_ids)
            if ev.finish_reason is not None:
                done.put(ev.error)
        return handle

    start = time.perf_counter()
    for i, (ids, name) in enumerate(zip(prompts, names)):
        engine.submit(ids, name, SamplingParams(max_tokens=tokens, ignore_eos=True), on_event(i))
    errors = [done.get() for _ in prompts]
    seconds = time.perf_counter() - start
    if any(errors):
        raise RuntimeError(f"loraforge requests failed: {[e for e in errors if e]}")
    return seconds, sum(len(o) for o in outputs.values()), [outputs[i] for i in range(len(prompts))]


class LlamaCpp:
    """One llama.cpp context over the base GGUF with every adapter loaded; requests one after another."""

    def __init__(self, base: Path, loras: list[Path], n_ctx: int, threads: int):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(base), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   verbose=False)
        self.adapters = []
        for path in loras:
            adapter = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
            if not adapter:
                raise RuntimeError(f"llama.cpp could not load the LoRA file {path}")
            self.adapters.append(adapter)

    def use(self, i: int) -> None:
        lib = self.lib
        adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[i])
        scales = (ctypes.c_float * 1)(1.0)
        if lib.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, scales):
            raise RuntimeError(f"llama.cpp could not set adapter {i}")

    def run(self, prompts: list[list[int]], adapter_of: list[int], tokens: int):
        llm, outputs = self.llm, []
        start = time.perf_counter()
        for ids, a in zip(prompts, adapter_of):
            self.use(a)
            llm.reset()
            llm.eval(ids)
            outputs.append(llama_cpp_greedy(llm, tokens))
        seconds = time.perf_counter() - start
        return seconds, sum(len(o) for o in outputs), outputs

    def close(self) -> None:
        for adapter in self.adapters:
            self.lib.llama_adapter_lora_free(adapter)
        self.llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    at_least(parser, args, adapters=1, clients=1, tokens=1, threads=1, rounds=1)
    torch.set_num_threads(args.threads)
    precision = choose("auto", "auto", warn=False)
    storage = precision.storage if precision.storage in ("fp32", "bf16") else "fp32"
    qtype = {"fp32": "F32", "bf16": "BF16"}[storage]
    model, tok = load_base(MODEL, dtype=storage)
    model.eval()
    prompts = [tok(prompt(i * 31))["input_ids"] for i in range(args.clients)]
    adapter_of = [i % args.adapters for i in range(args.clients)]
    names = [f"ad{a}" for a in adapter_of]

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, Path(tmp), args.adapters, 8)
        engine = Engine(model, tok, base_name=MODEL, adapters=paths, max_loaded=args.adapters,
                        max_batch=args.clients, max_queue=4 * args.clients)
        for name in paths:  # warm-up: every adapter resident before the clock starts
            engine.generate(prompts[0], name, SamplingParams(max_tokens=2))
        runs = {"loraforge (one batch, every adapter)": lambda: loraforge_run(engine, prompts, names, args.tokens)}
        cpp = None
        try:
            import llama_cpp  # noqa: F401
            why = None
        except ImportError:
            why = "llama-cpp-python is not installed (pip install 'loraforge[llamacpp]')"
        if why is None:
            CACHE.mkdir(parents=True, exist_ok=True)
            base = write_gguf(Path(builtin_gguf_path(MODEL)), CACHE / f"{MODEL}.{qtype}.gguf", qtype)
            loras = [export_gguf_lora(MODEL, paths[f"ad{i}"], Path(tmp) / "gguf" / f"ad{i}" / "adapter.gguf")
                     for i in range(args.adapters)]
            cpp = LlamaCpp(base, loras, max(len(p) for p in prompts) + args.tokens + 8, args.threads)
            runs[f"llama.cpp {qtype} (one request at a time)"] = lambda: cpp.run(prompts, adapter_of, args.tokens)
        speeds = {label: [] for label in runs}
        outputs = {}
        for _ in range(args.rounds):  # interleaved: load from other processes falls on every engine alike
            for label, run in runs.items():
                seconds, n, outputs[label] = run()
                speeds[label].append(n / seconds)
        engine.stop()
        if cpp is not None:
            cpp.close()

    print(header(describe()))
    print(f"{args.clients} requests at once over {args.adapters} adapters (r=8, q,k,v,o), {args.tokens} greedy tokens "
          f"each, base stored {storage}, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("| engine | tokens/s (median; min-max) |")
    print("|---|---|")
    for label, xs in speeds.items():
        print(f"| {label} | {statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f}) |")
    if why is not None:
        print(f"| llama.cpp | not run: {why} |")
        return
    labels = list(runs)
    each = [a / b for a, b in zip(speeds[labels[0]], speeds[labels[1]])]
    ratio = statistics.median(each)
    print(f"\nloraforge / llama.cpp: {ratio:.2f}x (each round: {', '.join(f'{x:.2f}' for x in each)}; goal >= 2x: "
          f"{'met' if ratio >= 2 else 'NOT met'})")
    a, b = (outputs[label] for label in labels)
    first = sum(x[:8] == y[:8] for x, y in zip(a, b))
    print(f"greedy outputs, loraforge vs llama.cpp: {sum(x == y for x, y in zip(a, b))}/{len(a)} identical, "
          f"{first}/{len(a)} agree on the first 8 tokens ({storage} in both; llama.cpp rounds activations its own way)")


if __name__ == "__main__":
    main()
