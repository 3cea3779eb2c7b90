"""`loraforge export --to gguf-lora`: the adapter alone in llama.cpp's LoRA GGUF format, and an Ollama Modelfile.

What `llama-cli --lora FILE`, llama-server and Ollama's `ADAPTER` line load, as llama.cpp's convert_lora_to_gguf.py
writes it: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted weight
`blk.N.attn_q.weight.lora_a` (r, in) and `.lora_b` (out, r), in the base's GGUF layout (Llama q/k rows permuted
in lora_b, gguf_names.py). llama.cpp scales every pair by alpha / r of that pair; where this adapter's own scale
differs (rank or alpha patterns, rsLoRA) the ratio is folded into lora_b, so ΔW is the same.
DoRA, AdaLoRA, modules_to_save and trained biases are refused: the merged export expresses them exactly.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import gguf
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loraforge.config import LoraConfig
from loraforge.lora.adapters import recorded_quantization
from loraforge.lora.layer import base_features
from loraforge.models import resolve_model
from loraforge.utils.files import OVERWRITE, atomic_file
from loraforge.utils.outputs import OutputError
from loraforge.export.factors import read_factors, unsupported
from loraforge.export.gguf import base_gguf, check_gguf_output, merge_first, tensor_data, write_file
from loraforge.export.gguf_names import ExportError, arch_name, arch_of, gguf_name, lora_b_layout

KINDS = ("f32", "f16", "q8_0")


def check_shapes(adapter: str | Path, factors: dict, hf_config) -> None:
    """ExportError unless every module exists in the base and A is (r, in), B (out, r) of its layer: the base is
    built on the meta device from its config (shapes only, no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    for module, f in sorted(factors.items()):
        try:
            in_f, out_f, _ = base_features(model.get_submodule(module))
        except (AttributeError, TypeError):
            raise ExportError(f"{adapter}: module {module} is not a linear layer of this base (an adapter made for "
                              f"another base? check --base)") from None
        if f.lora_A.shape[1] != in_f or f.lora_B.shape[0] != out_f:
            raise ExportError(f"{adapter}: {module} has lora_A {tuple(f.lora_A.shape)} and lora_B "
                              f"{tuple(f.lora_B.shape)}, this base's layer is {in_f} in, {out_f} out (an adapter made "
                              f"for another base? check --base)")


def lora_writer(path: Path, adapter: str | Path, hf_config, kind: str) -> gguf.GGUFWriter:
    config, factors = read_factors(adapter)
    why = unsupported(config)
    if not isinstance(config, LoraConfig):
        why.append("AdaLoRA: convert it exactly to plain LoRA first (loraforge export --to vllm)")
    if why:
        raise ExportError(f"{adapter}: llama.cpp's LoRA format cannot express {'; '.join(why)}. Export the merged "
                          f"model instead: loraforge export --to gguf --base BASE --adapter {adapter} --out FILE.gguf")
    arch = arch_of(hf_config)
    check_shapes(adapter, factors, hf_config)
    alpha = float(config.lora_alpha) or 1.0  # llama.cpp reads alpha 0 as scale 1: write 1, fold the 0 into lora_b
    writer = gguf.GGUFWriter(path, arch_name(arch))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module, f in sorted(factors.items()):
        name = gguf_name(module + ".weight", hf_config, arch, bool(getattr(hf_config, "tie_word_embeddings", False)))
        if name is None or name.startswith("token_embd"):
            raise ExportError(f"{adapter}: module {module} has no llama.cpp LoRA tensor (a tied output head or an "
                              f"embedding); export the merged model instead (--to gguf)")
        r = f.lora_A.shape[0]
        B = lora_b_layout(module, f.lora_B, hf_config, arch) * (f.scale / (alpha / r))  # llama.cpp: alpha / r
        for suffix, tensor in ((".lora_a", f.lora_A), (".lora_b", B)):
            array, raw = tensor_data(tensor, kind, name=f"{module}{suffix}")
            writer.add_tensor(name + suffix, array, raw_dtype=raw)
    return writer


def modelfile_path(out: Path) -> Path:
    """The Ollama Modelfile written beside adapter file `out`, named after it (dates.gguf: dates.Modelfile), so two
    adapters exported into one folder each keep their own."""
    return Path(out).with_suffix(".Modelfile")


def modelfile(base: str, adapter_file: Path) -> str:
    source = base_gguf(base)
    if source is not None:
        from_line = f"FROM {source.resolve()}"
    else:
        # Ollama reads FROM ./ from the Modelfile's folder: the command (run where this export ran) writes there
        from_line = (f"# the base as GGUF first: loraforge export --to gguf --base {base} --out "
                     f"{adapter_file.parent / 'base.gguf'}\nFROM ./base.gguf")
    return (f"# Ollama: ollama create NAME -f {modelfile_path(adapter_file)} && ollama run NAME\n"
            f"# The adapter applies on the exact base it was trained on.\n{from_line}\nADAPTER ./{adapter_file.name}\n")


def export_gguf_lora(base: str, adapter: str, out: str | Path, type: str = "f32",  # noqa: A002 (the CLI's name)
                     overwrite: bool = False) -> Path:
    """Write `adapter` as llama.cpp's LoRA GGUF file `out` and an Ollama Modelfile beside it (modelfile_path).
    An `out` without its Modelfile (an export stopped between the two) is finished without `overwrite` where it
    holds what this export writes: the .gguf is left as it is and the Modelfile written; else refused as before."""
    if type not in KINDS:
        raise OutputError(f"--type {type!r}: use one of {', '.join(KINDS)}")
    model_file = modelfile_path(Path(out))  # never `out` itself: that ends in .gguf (check_gguf_output)
    # soak: stopped after the .gguf, the rerun asked for --overwrite, and the Modelfile was never written
    finishing = not overwrite and Path(out).is_file() and not os.path.lexists(model_file)
    out = check_gguf_output(out, overwrite or finishing, base, adapter, beside=[model_file.name])
    if model_file.is_dir():  # found now, not after the .gguf is written
        raise OutputError(f"{model_file} is a folder; the Modelfile is written beside --out: remove or rename that "
                          f"folder, or choose another folder for --out")
    if model_file.exists() and not overwrite:
        raise OutputError(f"{model_file} exists; pass {OVERWRITE} to replace it, or choose another folder for --out")
    if (recorded := recorded_quantization(adapter)) not in (None, "none"):  # llama.cpp has no NF4, FP4 or int8 base
        warnings.warn(f"{adapter}: this adapter was trained over an {recorded.upper()} base, and llama.cpp applies it "
                      f"over a GGUF base (f32, f16 or a GGUF type, never {recorded.upper()}): its outputs differ from "
                      f"those it trained to give; {merge_first(base, adapter, recorded)}", stacklevel=2)
    # the base's shapes and names; no weights loaded (nor converted)
    hf_config = AutoConfig.from_pretrained(resolve_model(base, weights=False))
    differs = (f"--out {out} exists without its Modelfile {model_file.name} and holds another adapter file than this "
               f"export writes (another --adapter or --type?); pass {OVERWRITE} to replace it, or choose another file")
    write_file(lambda p: lora_writer(p, adapter, hf_config, type), out, overwrite, differs if finishing else None)
    with atomic_file(model_file) as tmp:  # a failed or concurrent write never leaves a cut Modelfile
        tmp.write_text(modelfile(base, out))
    return out
