"""Text of a growing output: decoding it whole at every token (the server before) against serve.detokenize's
TextStream, per token, at several output lengths.

    python bench/detokenize.py [--tokens 100,1000,4000] [--model smollm2-135m]

The tokens are the shipped general text's first ones, fed one at a time; both ways must give the same text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hardware  # noqa: E402
from flags import whole_numbers  # noqa: E402
from loraforge.models import load_tokenizer  # noqa: E402
from loraforge.serve.detokenize import TextStream  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="100,1000,4000", help="comma-separated output lengths")
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer")
    args = p.parse_args()
    lengths = whole_numbers(p, "tokens", args.tokens, "length")
    tok = load_tokenizer(args.model)
    ids = tok((ROOT / "loraforge" / "assets" / "general_text.txt").read_text())["input_ids"]
    print(f"CPU {hardware.cpu_model() or 'unknown model'}; "
          f"the tokenizer of {args.model} (tokenizers, in Python's thread)")
    print("| output tokens | whole decode, ms a token | TextStream, ms a token | ratio |\n|---|---|---|---|")
    for n in lengths:
        sub = ids[:n]
        t = time.perf_counter()
        for i in range(1, len(sub) + 1):
            whole = tok.decode(sub[:i], skip_special_tokens=True)
        whole_s = time.perf_counter() - t
        t = time.perf_counter()
        stream = TextStream(tok)
        for token in sub:
            stream.add(token)
            text = stream.text()
        stream_s = time.perf_counter() - t
        if text != whole:
            raise SystemExit(f"at {n} tokens TextStream's text differs from the whole decode")
        print(f"| {len(sub)} | {whole_s * 1e3 / len(sub):.3f} | {stream_s * 1e3 / len(sub):.3f} | "
              f"{whole_s / stream_s:.0f}× |")


if __name__ == "__main__":
    main()
