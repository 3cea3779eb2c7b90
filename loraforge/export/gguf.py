"""`loraforge export --to gguf`: base + adapter merged into one GGUF file that llama.cpp, Ollama and LM Studio load.

Writing and Q8_0 quantization are gguf-py's (llama.cpp's own Python package); the names and layouts are
gguf_names.py's, the tokenizer gguf_vocab.py's. Tensor types follow llama.cpp's converter: 1-D tensors (norms,
biases) and GPT-2's position embeddings stay F32; 2-D weights take the asked type (Q8_0 needs rows that are a
multiple of 32 values and falls back to F16 otherwise, as llama.cpp's converter does).
"""

from __future__ import annotations

import errno
import filecmp
import re
from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
import torch

from loraforge.export.gguf_names import (ExportError, add_hparams, arch_name, arch_of, check_exportable, gguf_name,
                                         to_gguf_layout)
from loraforge.export.gguf_vocab import check_tokenizer, copy_vocab, write_vocab
from loraforge.lora.adapters import load_adapter
from loraforge.lora.merge import embeddings_tied, merge_and_unload
from loraforge.models import BUILTIN_MODELS, builtin_gguf_path, conversion_paths, load_base, load_config, resolve_model
from loraforge.utils.files import OVERWRITE, DiskError, atomic_file, disk_error, expand_user, free_bytes, fsync_tree
from loraforge.utils.outputs import (OutputError, beside_room, check_length, check_not_input, check_parents,
                                     check_writable)

TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
KEEP_F32 = (gguf.MODEL_TENSOR.POS_EMBD,)


def base_gguf(base: str) -> Path | None:
    """The GGUF file a base comes from (a built-in name or a .gguf path), else None."""
    if base in BUILTIN_MODELS:
        return builtin_gguf_path(base)
    return expand_user(base) if base.endswith(".gguf") else None


QUANT_SUFFIX = re.compile(r"[.-](?:[IB]?Q\d\w*|B?F16|F32)$", re.IGNORECASE)  # a GGUF file name's type: .Q4_1, -f16


def merge_first(base: str, adapter: str | Path, recorded: str) -> str:
    """What export (no --quantize: it writes the full-precision base) tells the user of an adapter trained over a
    `recorded` (nf4, fp4, int8) base: merge it into that base first, then export the merged model alone."""
    return (f"to export what it trained to give, merge it into the {recorded.upper()} base first, then export the "
            f"merged model: loraforge merge --base {base} --adapter {adapter} --quantize {recorded} --out MERGED && "
            f"loraforge export --to gguf --base MERGED --out FILE.gguf")


def check_gguf_output(out: str | Path, overwrite: bool, base: str, adapter: str | None,
                      beside: Iterable[str] = ()) -> Path:
    """An output file that may be written: a new one, or an existing file with `overwrite`; never an input (the
    base, its GGUF file when it is a built-in name, its cached conversion, the adapter). Its path leaves room for
    the paths written (the .gguf's temporary, and those of `beside`: the names of other files written beside it),
    checked before any work (a path too long was found by the write, after the loading and conversion)."""
    out = Path(out)
    beside = list(beside)
    check_length(out, room=beside_room(out, [out.name, *beside]),
                 written=f"the temporary file{'s' if beside else ''} written beside it" + "".join(
                     f" and {name}" for name in beside))
    try:
        source = base_gguf(base)
    except FileNotFoundError:  # a built-in model whose package is missing: loading it says so
        source = None
    check_not_input(out, [base, source, *conversion_paths(base), adapter])
    check_parents(out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a directory; give a file name ending in .gguf")
    if out.suffix.lower() != ".gguf":  # soak: written as given; llama.cpp, Ollama and LM Studio look for .gguf
        raise OutputError(f"--out {out}: a GGUF file's name ends in .gguf (the tools that read it look for that); "
                          f"use --out {out.with_name(out.name + '.gguf') if out.suffix else out.with_suffix('.gguf')}")
    if out.exists() and not overwrite:
        raise OutputError(f"--out {out} exists; pass {OVERWRITE} to replace it, or choose another file")
    check_writable(out)
    return out


class _Same(Exception):
    """write_file's `differs`: the file written holds the bytes `out` holds already."""


def write_file(writer_for, out: Path, overwrite: bool, differs: str | None = None) -> Path:
    """Build a GGUFWriter on a temporary file of this export's own beside `out` (`writer_for(path)` adds keys and
    tensors), write it, flush it to the disk, then rename it into place: `out` appears whole or not at all, two
    exports to one path never write into the same file, and a failed one leaves the previous `out` as it was and
    no temporary file. Without `overwrite`, an `out` another export wrote meanwhile is left to it (FileExistsError).
    Where the disk has less room left than the tensors take, it is refused before they are written, and the
    DiskError says how large the file would be: a full disk said only "(3.1 MB free there)".
    `differs`: an existing `out` that holds the very bytes written is left as it is (nothing to replace), and one
    that holds others is an OutputError saying `differs` (gguf-lora's rerun after a stop before its Modelfile)."""
    need = None
    try:
        with atomic_file(out, replace=overwrite) as tmp:
            writer = writer_for(tmp)
            try:
                writer.write_header_to_file()
                writer.write_kv_data_to_file()  # the vocabulary: megabytes, known once written
                tensors = sum(info.nbytes for shard in writer.tensors for info in shard.values())
                need = sum(f.tell() for f in writer.fout or []) + tensors
                if (free := free_bytes(tmp)) is not None and free < tensors:
                    raise OSError(errno.ENOSPC, "No space left on device")
                writer.write_tensors_to_file()
            finally:
                writer.close()
            fsync_tree(tmp)
            if differs is not None:
                if filecmp.cmp(tmp, out, shallow=False):
                    raise _Same
                raise OutputError(differs)
    except _Same:
        pass
    except DiskError as e:
        if need is None or e.errno != errno.ENOSPC:
            raise
        raise disk_error(out, e, need) from None  # what is free now, with the partial file gone
    return out


F16_MAX = float(np.finfo(np.float16).max)  # 65504: q8_0 keeps each block's scale in f16 too


def tensor_data(tensor: torch.Tensor, kind: str, keep_f32: bool = False, name: str = "a tensor"):
    """(array, raw_dtype) of a tensor in GGUF type `kind` ("f32", "f16", "q8_0"); 1-D tensors stay F32. A value
    past f16's range is an ExportError naming `name` (it would be written as inf)."""
    array = tensor.detach().float().contiguous().numpy()
    if kind == "f32" or array.ndim == 1 or keep_f32:
        return array, None
    if (top := float(np.abs(array).max(initial=0))) > F16_MAX:
        raise ExportError(f"{name} holds {top:.4g}, past {kind}'s range (±{F16_MAX:g}): it would be written as inf; "
                          f"export with --type f32")
    if kind == "q8_0":
        try:
            return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.quants.QuantError:  # a row length not divisible by 32: F16, as llama.cpp's converter does
            pass
    return array.astype(np.float16), None


def model_writer(model, path: Path, kind: str, name: str, vocab_from: Path | None, tokenizer_dir: Path | None,
                 tokenizer) -> gguf.GGUFWriter:
    """A GGUFWriter holding `model` (a plain transformers model) with its metadata, tokenizer and tensors."""
    config = model.config
    arch = arch_of(config)
    writer = gguf.GGUFWriter(path, arch_name(arch))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_hparams(writer, config, arch)
    writer.add_file_type(TYPES[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if vocab_from is not None:
        copy_vocab(writer, vocab_from)
    else:
        write_vocab(writer, tokenizer_dir, tokenizer, config.vocab_size)
    pos_embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD]
    tied = embeddings_tied(model)
    for key, tensor in model.state_dict().items():
        target = gguf_name(key, config, arch, tied)
        if target is None:
            continue
        array, raw = tensor_data(to_gguf_layout(key, tensor, config, arch), kind, keep_f32=target.startswith(pos_embd),
                                 name=key)
        writer.add_tensor(target, array, raw_dtype=raw)
    return writer


def export_gguf(base: str, adapter: str | None, out: str | Path, type: str = "f16",  # noqa: A002 (the CLI's name)
                overwrite: bool = False) -> Path:
    """Merge `adapter` into `base` (fp32) and write one GGUF file; without an adapter, the base alone."""
    if type not in TYPES:
        raise OutputError(f"--type {type!r}: use one of {', '.join(TYPES)}")
    out = check_gguf_output(out, overwrite, base, adapter)
    source = base_gguf(base)
    if source is not None and not source.is_file():
        raise FileNotFoundError(f"GGUF file {source} does not exist")
    tokenizer_dir = None if source is not None else Path(resolve_model(base, weights=False))
    if tokenizer_dir is not None:
        check_tokenizer(tokenizer_dir)  # before loading and merging the model
    check_exportable(load_config(base))  # an architecture or rope scaling it cannot write: before loading too
    model, tokenizer = load_base(base, dtype="fp32")
    if adapter is not None:
        load_adapter(model, adapter, quantization_fix=lambda recorded: merge_first(base, adapter, recorded))
        merge_and_unload(model)
    name = Path(base).stem if source is None else re.sub(QUANT_SUFFIX, "", source.stem)  # not "….Q4_1 + lora"
    name += f" + {Path(adapter).name}" if adapter else ""
    return write_file(lambda p: model_writer(model, p, type, name, source, tokenizer_dir, tokenizer), out, overwrite)
