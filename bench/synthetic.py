"""Random-weight models of real shapes, for speed benchmarks where the real weights cannot travel.

A GPU machine without internet (and with a limit on what can be copied to it) cannot get the built-in model's
GGUF file. Speed and memory do not depend on the weights' values, so the benches can run on a model of the same
shape with random weights and the real tokenizer:

    python bench/synthetic.py --builtin TOKDIR   # make `load_base("smollm2-135m")` load SmolLM2-135M's shape with
                                                 # random weights and the tokenizer in TOKDIR (config.json,
                                                 # tokenizer files); prints the PYTHONPATH entry to export
    python bench/synthetic.py --shape 1b --tokenizer TOKDIR --out DIR    # a ~1.1B Llama (TinyLlama's shape)

Quality numbers (accuracy, loss values) from such a model mean nothing; tokens/s, memory and ratios do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

SHAPES = {  # beyond the built-in model's own shape (read from TOKDIR/config.json)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")


def random_model(tokdir: Path, out: Path, shape: str | None = None, device: str = "cpu") -> Path:
    """Save a model with random weights (bf16 on disk) and the tokenizer from `tokdir` into `out`."""
    config = AutoConfig.from_pretrained(tokdir)
    if shape:
        base = config.to_dict()
        base.update(SHAPES[shape])
        config = LlamaConfig(**{k: v for k, v in base.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tokdir / name).is_file():
            shutil.copy(tokdir / name, tmp / name)
    os.replace(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {n / 1e6:.0f}M parameters, random weights ({shape or 'built-in shape'})", flush=True)
    return out


def stand_in_builtin(tokdir: Path, site: Path, device: str = "cpu") -> Path:
    """A stand-in for the built-in model's package (an empty file under the GGUF's name) and, at the cache path
    loraforge.models computes for it, a random-weight checkpoint of the built-in shape. Returns `site`."""
    from loraforge import models

    package, filename = models.BUILTIN_MODELS[models.DEFAULT_MODEL]
    (site / package).mkdir(parents=True, exist_ok=True)
    stand_in = '"""Stand-in: random weights of the real shape (bench/synthetic.py)."""\n'
    (site / package / "__init__.py").write_text(stand_in)
    gguf = site / package / filename
    gguf.write_bytes(b"stand-in")
    out = models._gguf_cache_path(gguf, models.DEFAULT_MODEL)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not models._complete(out):
        random_model(tokdir, out, device=device)
    return site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--builtin", type=Path, help="tokenizer dir: install the built-in model's random stand-in")
    ap.add_argument("--site", type=Path, default=Path("/tmp/loraforge-standin"), help="where the stand-in package goes")
    ap.add_argument("--shape", choices=list(SHAPES))
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.builtin:
        print(stand_in_builtin(args.builtin, args.site, args.device))
    elif args.shape and args.tokenizer and args.out:
        random_model(args.tokenizer, args.out, args.shape, args.device)
    else:
        sys.exit("give --builtin TOKDIR, or --shape, --tokenizer and --out")


if __name__ == "__main__":
    main()
