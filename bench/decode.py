"""Single-request decode speed of the built-in model: loraforge's decoders against llama.cpp, beside the
memory-bandwidth ceiling, all measured in one run (issue 26).

    python bench/decode.py [--rounds 3] [--tokens 64] [--threads 2] [--profile] [--heldout]

Each engine decodes one chat prompt greedily for --tokens new tokens (stop tokens ignored); tokens/s counts the
decode steps only (the prompt's forward is left out, for every engine alike). Rounds are interleaved (engine 1,
2, ..., then again) and the median is printed, so that load from other processes falls on every engine alike.

Ceiling: one decode step reads every stored weight once (the tied embedding's rows aside), so tokens/s cannot
exceed (memory read bandwidth) / (weight bytes). The bandwidth is measured here, in this run, by summing a 512 MB
tensor with the same number of threads.

--heldout: the greedy outputs of the base model on the demo's 100 held-out prompts with bf16 and int8 storage,
compared with fp32 storage (how many are the same text, and the exact-match accuracy of each).

llama.cpp rows need `pip install 'loraforge[llamacpp]'` (llama-cpp-python); where it is absent the rows say so.
Its GGUF files at F32, BF16 and Q8_0 are written from the built-in Q4_1 file's own weights (de-quantized, so every
engine runs the same numbers), with the gguf package, into ~/.cache/loraforge/bench.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hardware import describe, header  # noqa: E402

from loraforge.config import LoraConfig  # noqa: E402
from loraforge.inference.greedy import greedy  # noqa: E402
from loraforge.inference.llama import Decoder  # noqa: E402
from flags import at_least  # noqa: E402
from loraforge.lora.inject import inject, lora_layers  # noqa: E402
from loraforge.models import builtin_gguf_path, load_base  # noqa: E402
from loraforge.utils.hf import cache_argument  # noqa: E402

PROMPT = "Write a short poem about rivers and the sea."
CACHE = Path.home() / ".cache" / "loraforge" / "bench"


def bandwidth(threads: int) -> float:
    """Memory read bandwidth in GB/s: the best of 5 sums over a 512 MB fp32 tensor."""
    torch.set_num_threads(threads)
    t = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - start)
    return t.numel() * 4 / best / 1e9


def loraforge_engine(decoder: Decoder, prompt: list[int], tokens: int):
    """A function decoding `tokens` greedy tokens after `prompt`; returns (decode seconds, token ids)."""
    def run():
        logits = decoder.forward(torch.tensor([prompt]), torch.zeros(1, dtype=torch.long))
        out = []
        start = time.perf_counter()
        for i in range(tokens):
            token = logits.argmax(-1)
            out.append(int(token))
            logits = decoder.forward(token[:, None], torch.tensor([len(prompt) + i]))
        return time.perf_counter() - start, out
    return run


def transformers_engine(model, prompt: list[int], tokens: int):
    """transformers' own greedy loop (DynamicCache, one forward per token): the path before this issue."""
    from transformers import DynamicCache

    kv = cache_argument(type(model)) or "past_key_values"  # "cache" on newer transformers

    @torch.no_grad()
    def run():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=torch.tensor([prompt]), use_cache=True, **{kv: cache}).logits[:, -1]
        out = []
        start = time.perf_counter()
        for _ in range(tokens):
            token = logits.argmax(-1)
            out.append(int(token))
            logits = model(input_ids=token[:, None], use_cache=True, **{kv: cache}).logits[:, -1]
        return time.perf_counter() - start, out
    return run


def write_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """The GGUF at `src` with every 2-D tensor de-quantized and stored as `qtype` (F32, BF16, Q8_0)."""
    import gguf
    import numpy as np

    if dst.exists():
        return dst
    target = gguf.GGMLQuantizationType[qtype]
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst) + ".tmp", arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type({"F32": 0, "BF16": 32, "Q8_0": 7}[qtype])
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # (rows, cols) in GGUF order
        kind = target if data.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay F32, as convert does
        stored = gguf.quants.quantize(data, kind) if kind != gguf.GGMLQuantizationType.F32 else data
        writer.add_tensor(t.name, stored, raw_shape=stored.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(dst) + ".tmp").rename(dst)
    return dst


def last_logits(llm):
    """The logits of the last token llama.cpp evaluated, read from its context (llama-cpp-python 0.3.x no longer
    copies them into `scores` unless logits_all is set, which would compute every position's)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def llama_cpp_greedy(llm, tokens: int) -> list[int]:
    """`tokens` greedy tokens after what llama.cpp has evaluated, one llm.eval per token."""
    import numpy as np

    out = []
    for _ in range(tokens):
        token = int(np.argmax(last_logits(llm)))
        out.append(token)
        llm.eval([token])
    return out


def llama_cpp_engine(path: Path, prompt: list[int], tokens: int, threads: int):
    from llama_cpp import Llama

    ctx = len(prompt) + tokens + 8
    llm = Llama(model_path=str(path), n_ctx=ctx, n_threads=threads, n_batch=ctx, verbose=False)

    def run():
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        out = llama_cpp_greedy(llm, tokens)
        return time.perf_counter() - start, out
    return run


def heldout(model, tok) -> None:
    """The demo's held-out prompts, greedy, with the base stored in fp32, bf16 and int8."""
    import json
    from importlib import resources

    from loraforge.decoding import stop_ids
    from loraforge.training import data as D
    from loraforge.training.evaluate import normalize

    text = resources.files("loraforge").joinpath("assets/demo_test.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    fmt = D.detect_format(records[0])
    prompts = [D.prompt_ids(r, tok, fmt) for r in records]
    references = [normalize(D.reference_output(r, fmt)) for r in records]
    texts = {}
    for storage in ("fp32", "bf16", "int8"):
        start = time.perf_counter()
        out = greedy(model, prompts, stop_ids(tok), max_new_tokens=32, batch_size=32, storage=storage)
        texts[storage] = [normalize(t) for t in tok.batch_decode(out, skip_special_tokens=True)]
        correct = sum(p == r for p, r in zip(texts[storage], references))
        same = sum(a == b for a, b in zip(texts[storage], texts["fp32"]))
        print(f"held-out ({len(records)} demo prompts, base model): {storage}: {same}/{len(records)} outputs equal to "
              f"fp32's, exact match {correct}/{len(records)} ({time.perf_counter() - start:.0f} s)")
    for storage in ("bf16", "int8"):
        diff = [(a, b) for a, b in zip(texts["fp32"], texts[storage]) if a != b][:3]
        for a, b in diff:
            print(f"  {storage} differs: fp32 {a!r} vs {storage} {b!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print where one fp32 decode step goes, per op")
    parser.add_argument("--heldout", action="store_true", help="only compare storages on the demo's held-out set")
    args = parser.parse_args()
    at_least(parser, args, rounds=1, tokens=1, threads=1)
    torch.set_num_threads(args.threads)
    model, tok = load_base("smollm2-135m", dtype="fp32")
    model.eval()
    if args.heldout:
        return heldout(model, tok)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    n = args.tokens
    max_len = len(prompt) + n + 1

    engines = {}  # label -> (weights, bytes per token, run)
    engines["transformers forward (before)"] = ("fp32", None, transformers_engine(model, prompt, n))
    for storage in ("fp32", "bf16", "int8"):
        dec = Decoder(model, 1, max_len, storage=storage)
        engines[f"loraforge {storage}"] = (storage, dec.nbytes, loraforge_engine(dec, prompt, n))
    adapted = load_base("smollm2-135m", dtype="fp32")[0].eval()
    torch.manual_seed(0)
    inject(adapted, LoraConfig(r=8, lora_alpha=16), "ad0")  # q, k, v, o; B random so the adapter is not a no-op
    with torch.no_grad():
        for _, layer in lora_layers(adapted):
            layer.lora_B["ad0"].weight.normal_(0, 0.02)
    dec = Decoder(adapted, 1, max_len)
    engines["loraforge fp32 + 1 adapter (r=8, q,k,v,o)"] = ("fp32", dec.nbytes, loraforge_engine(dec, prompt, n))

    try:
        import llama_cpp  # noqa: F401
        missing = None
    except ImportError:
        missing = "llama-cpp-python is not installed (pip install 'loraforge[llamacpp]')"
    if missing is None:
        src = Path(builtin_gguf_path("smollm2-135m"))
        CACHE.mkdir(parents=True, exist_ok=True)
        for qtype, weights in (("F32", "fp32"), ("BF16", "bf16"), ("Q8_0", "int8")):
            path = write_gguf(src, CACHE / f"smollm2-135m.{qtype}.gguf", qtype)
            engines[f"llama.cpp {qtype}"] = (weights, None, llama_cpp_engine(path, prompt, n, args.threads))
        engines["llama.cpp Q4_1 (the shipped file)"] = ("q4_1", None, llama_cpp_engine(src, prompt, n, args.threads))

    gbps = bandwidth(args.threads)
    speeds = {label: [] for label in engines}
    outputs = {}
    for _ in range(args.rounds):  # interleaved: load from other processes falls on every engine alike
        for label, (_, _, run) in engines.items():
            seconds, out = run()
            speeds[label].append(n / seconds)
            outputs[label] = out
    gbps = max(gbps, bandwidth(args.threads))

    print(header(describe()))
    print(f"one request, {len(prompt)}-token prompt, {n} new tokens, {args.threads} threads, {args.rounds} interleaved "
          f"rounds (median; min-max); memory read bandwidth {gbps:.1f} GB/s measured in this run")
    fp32_bytes = engines["loraforge fp32"][1]
    ref = {"fp32": "llama.cpp F32", "bf16": "llama.cpp BF16", "int8": "llama.cpp Q8_0"}
    print("| engine | weights | MB read/token | tokens/s | ceiling tokens/s | of ceiling | vs llama.cpp same weights |")
    print("|---|---|---|---|---|---|---|")
    for label, (weights, nbytes, _) in engines.items():
        nbytes = nbytes or {"fp32": fp32_bytes, "bf16": fp32_bytes / 2, "int8": fp32_bytes / 4 * 1.0625,
                            "q4_1": fp32_bytes / 32 * 5 * 1.2}[weights]  # GGUF block sizes: Q8_0 34/32 B, Q4_1 20/32
        med = statistics.median(speeds[label])
        ceiling = gbps * 1e9 / nbytes
        other = ref.get(weights)
        versus = f"{med / statistics.median(speeds[other]):.2f}x" if other in speeds and not label.startswith(
            "llama.cpp") else ""
        print(f"| {label} | {weights} | {nbytes / 1e6:.0f} | {med:.1f} ({min(speeds[label]):.1f}-"
              f"{max(speeds[label]):.1f}) | {ceiling:.1f} | {med / ceiling:.0%} | {versus} |")
    if missing:
        print(f"llama.cpp rows skipped: {missing}")
    same = outputs["loraforge fp32"] == outputs["transformers forward (before)"]
    print(f"greedy tokens, static fp32 decoder vs transformers: {'equal' if same else 'DIFFERENT'}; "
          + "; ".join(f"{s} vs fp32: "
                      f"{sum(a == b for a, b in zip(outputs[f'loraforge {s}'], outputs['loraforge fp32']))}/{n} equal"
                      for s in ("bf16", "int8")))
    if "llama.cpp F32" in outputs:
        agree = sum(a == b for a, b in zip(outputs["llama.cpp F32"], outputs["loraforge fp32"]))
        print(f"llama.cpp F32 vs loraforge fp32: {agree}/{n} greedy tokens equal")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for label in ("transformers forward (before)", "loraforge fp32"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engines[label][2]()
            print(f"\n{label}: where {n} decode steps go (self CPU time per op)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
