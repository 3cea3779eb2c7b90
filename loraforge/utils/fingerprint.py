"""A cheap identity of a local model (a transformers folder or a .gguf file): what tells a base whose files changed
from the same base, without reading gigabytes of weights.

    each model file (by name): its name and size, and
        *.safetensors        its header (every tensor's name, dtype, shape and offsets) and, of each tensor,
                             SAMPLE bytes at the start and in the middle of its data
        small files          every byte (config.json, the tokenizer's files, an index)
        other large files    BLOCKS blocks of SAMPLE bytes spread evenly over it (a .bin, a .gguf)

Weights trained on, merged into or replaced change every byte of the tensors they touch, so the sample of each
tensor changes with them; a SmolLM2-135M folder takes about a millisecond and a 7B one reads about 200 KB. Files of
other kinds (README.md, .gitattributes) are not the model's and are left out.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from loraforge.utils.files import expand_user

SAMPLE = 64  # bytes read at each place sampled
BLOCKS = 64  # places sampled in a large file that is not safetensors
WHOLE = 16 << 20  # files up to this size are hashed whole
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".tiktoken", ".jinja", ".gguf",
                  ".py")


def model_files(path: Path) -> list[Path]:
    """The files that make the model at `path`: itself (a file), or the model files directly inside a folder."""
    if path.is_file():
        return [path]
    return sorted(f for f in path.iterdir()
                  if f.suffix in MODEL_SUFFIXES and f.is_file() and not f.name.startswith("."))


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _safetensors_sample(f, size: int) -> bytes | None:
    """A safetensors file's header and a sample of each tensor's data; None where the header is not one (the file is
    then sampled as any other)."""
    if size < 8:
        return None
    (length,) = struct.unpack("<Q", _read(f, 0, 8))
    if length > size - 8:
        return None
    header = _read(f, 8, length)
    try:
        tensors = json.loads(header)
    except ValueError:
        return None
    parts = [header]
    start = 8 + length
    for name, entry in sorted(tensors.items()) if isinstance(tensors, dict) else ():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) and name != "__metadata__" else None
        if (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            begin, end = offsets
            parts += [_read(f, start + begin, min(SAMPLE, end - begin)),
                      _read(f, start + (begin + end) // 2, min(SAMPLE, end - (begin + end) // 2))]
    return b"".join(parts)


def file_fingerprint(file: Path) -> str:
    """The SHA-256 of `file`'s size and the bytes sampled from it (the module's docstring says which)."""
    size = file.stat().st_size
    digest = hashlib.sha256(f"{size};".encode())
    with open(file, "rb") as f:
        if size <= WHOLE:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        elif file.suffix == ".safetensors" and (sample := _safetensors_sample(f, size)) is not None:
            digest.update(sample)
        else:
            for i in range(BLOCKS):
                digest.update(_read(f, (size - SAMPLE) * i // (BLOCKS - 1), SAMPLE))
    return digest.hexdigest()


def model_fingerprint(name_or_path: str) -> str | None:
    """One SHA-256 of the model files at `name_or_path` (their names and file_fingerprint's), or None where it is no
    local file or folder (a hub id, a built-in name)."""
    path = expand_user(name_or_path)
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for file in model_files(path):
        digest.update(f"{file.name};{file_fingerprint(file)};".encode())
    return digest.hexdigest()


__all__ = ["file_fingerprint", "model_files", "model_fingerprint"]
