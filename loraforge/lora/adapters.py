"""Adapters on disk in PEFT's format, and several named adapters on one base.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. File keys are our module
state-dict keys with the adapter name removed and `base_model.model.` in front, exactly as PEFT writes them:
    model.layers.0.self_attn.q_proj.lora_A.default.weight
        -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
Only safetensors and JSON are read from a user's files: never pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from loraforge.config import ConfigError, LoraConfig
from loraforge.lora.adalora import AdaLoraConfig, adalora_scaling, export_pruned, inject_adalora
from loraforge.lora.inject import (LayerKindConflict, find_targets, inject, is_base_bias, lora_layers,
                                   mark_trainable, merged_adapters, merged_error, remove_adapter, saved_paths,
                                   undone_on_failure)
from loraforge.lora.layer import LoraLayer, ModulesToSave
from loraforge.quant.checks import base_quantization
from loraforge.utils.files import atomic_dir, byte_order_mark, expand_user, missing_note
from loraforge.utils.hf import named_model_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# An adapter_config.json is a few KB (a rank_pattern naming every layer of a 70B model: ~0.2 MB); one far larger
# is not read whole (soak: a 1 GB one held every request of `serve` for 29 s while its registry read it)
MAX_CONFIG_BYTES = 16 << 20
# A safetensors header names each tensor in ~100 bytes: an adapter of every linear layer of a 64-expert MoE (~20,000
# tensors) has ~2 MB. Past this the file is refused before its header is parsed (soak: a 57 MB header, 400,000
# names, took serve's registry 9 s, every request waiting)
MAX_HEADER_BYTES = 16 << 20
# Who wrote the file: in the safetensors header, which PEFT ignores (an unknown adapter_config.json key makes PEFT
# warn).
PROVENANCE = {"format": "pt", "library": "loraforge"}
# The base's quantization an adapter trained over (none, nf4, fp4, int8), in the same header: over another base its
# outputs differ (SmolLM2: a QLoRA adapter's logits over the full-precision base were up to 13 apart), so a load
# over another one warns. PEFT's adapter_config.json has no such field, and an unknown key there makes PEFT warn.
BASE_QUANTIZATION = "base_quantization"
# The base's model_type (llama, qwen2, ...), in the same header: shapes fit across architectures (a Qwen2 adapter on a
# Llama of the same sizes loads, in PEFT without a word), so a load over another model_type warns.
BASE_MODEL_TYPE = "base_model_type"
# What PEFT adds to modules_to_save of a task_type SEQ_CLS adapter (PeftModelForSequenceClassification, peft_model.py;
# pre_classifier since PEFT 0.22)
SEQ_CLS_HEADS = ("classifier", "score", "pre_classifier")
EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES: the layers ensure_weight_tying ties


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded onto this model; the message names the file or module."""


class UnknownAdapterError(AdapterError, KeyError):
    """No adapter of that name is loaded: an AdapterError (the CLI prints it) that `except KeyError` also catches."""

    __str__ = Exception.__str__  # the message as written, not KeyError's quoted repr


def adapter_configs(model: nn.Module) -> dict:
    return getattr(model, "lora_configs", {})


def require_adapter(model: nn.Module, *names: str) -> None:
    """UnknownAdapterError naming the loaded ones unless every adapter in `names` is loaded on `model`."""
    for name in names:
        if name not in adapter_configs(model):
            raise UnknownAdapterError(f"no adapter named {name!r}; loaded adapters: {list(adapter_configs(model))}")


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` under PEFT's file keys."""
    require_adapter(model, name)
    config = adapter_configs(model)[name]
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.r:
            for attr in module.adapter_modules:
                if name not in getattr(module, attr):  # e.g. lora_magnitude_vector: DoRA adapters only
                    continue
                item = getattr(module, attr)[name]
                if isinstance(item, nn.Parameter):  # ParameterDict entries: bare key, no ".weight" (PEFT)
                    out[f"{PREFIX}{path}.{attr}"] = item
                else:
                    for key, tensor in item.state_dict().items():
                        out[f"{PREFIX}{path}.{attr}.{key}"] = tensor
            bias = getattr(module.base_layer, "bias", None)
            if config.bias == "lora_only" and bias is not None:
                out[f"{PREFIX}{path}.base_layer.bias"] = bias
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for key, tensor in module.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = tensor
    if config.bias == "all":
        for key, p in model.named_parameters():
            if is_base_bias(key):
                out[f"{PREFIX}{key}"] = p
    return out


def write_adapter_dir(out: str | Path, tensors: dict[str, torch.Tensor], peft_dict: dict,
                      replace: bool = True, quantization: str | None = None, model_type: str | None = None) -> Path:
    """Write an adapter directory's two files; they appear together or not at all, and a write the disk refuses
    raises files.DiskError naming the directory (other files already in `out` stay). `replace=False`: an `out`
    another command filled meanwhile is left to it (FileExistsError; files.atomic_dir). `quantization`: the base's
    (quant.checks.base_quantization), recorded in the weights file's header (BASE_QUANTIZATION); `model_type`: the
    base's config.model_type, recorded there too (BASE_MODEL_TYPE)."""
    if not str(out):  # Path("") is ".": the files would land in the working directory unasked
        raise ValueError("the adapter's output directory is empty; give a directory path, e.g. runs/my-adapter")
    out = Path(out)
    text = json.dumps(peft_dict, indent=2) + "\n"
    metadata = {**PROVENANCE, **({BASE_QUANTIZATION: quantization} if quantization else {}),
                **({BASE_MODEL_TYPE: model_type} if model_type else {})}
    with atomic_dir(out, sum(v.nbytes for v in tensors.values()) + len(text), replace=replace) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata=metadata)
        _metadata_in_order(tmp / WEIGHTS_NAME, metadata)
        (tmp / CONFIG_NAME).write_text(text)
    return out


def _metadata_in_order(path: Path, metadata: dict[str, str]) -> None:
    """`metadata`'s keys in the file in one order: safetensors writes metadata in hash order, which varies between
    saves, so the same tensors gave files of different bytes (a soak compared checksums). Every order has the
    same length: the header is rewritten in place."""
    def text(items) -> bytes:
        return json.dumps({"__metadata__": dict(items)}, separators=(",", ":"))[1:-1].encode()

    with open(path, "r+b") as f:
        header = f.read(_header_length(f, path))  # the raw bytes after the 8-byte length: rewritten in place below
        for items in itertools.permutations(metadata.items()):  # at most 24 orders of 4 keys
            if (at := header.find(text(items))) >= 0:
                f.seek(8 + at)
                f.write(text(metadata.items()))
                return


def base_name_or_path(model: nn.Module) -> str | None:
    """The name the base was loaded by, from where PEFT reads it for an adapter's base_model_name_or_path (the
    model's own `name_or_path`, not its config's: transformers copies config.name_or_path into it as it builds the
    model, and a script may set either later). None where the model has none (built from a config: '')."""
    value = getattr(model, "name_or_path", None)
    return str(value) if value else None


def save_adapter(model: nn.Module, out_dir: str | Path, name: str = "default",
                 config: LoraConfig | None = None) -> Path:
    """Write adapter `name` as a PEFT adapter directory (both files appear together or not at all)."""
    require_adapter(model, name)
    config = config or adapter_configs(model)[name]
    if config.base_model_name_or_path is None and (base := base_name_or_path(model)):
        # soak: the README's Python API wrote null (train names its model.name), and AutoPeftModelForCausalLM, which
        # reads the base from the file, found none; the folder the base was loaded from says where it is
        config = dataclasses.replace(config, base_model_name_or_path=base)
    _warn_residual_on_tied(model, name, config)
    state = adapter_state_dict(model, name)
    # soak: torch's "NotImplementedError: Cannot copy out of meta tensor; no data!"
    if meta := next((k for k, v in state.items() if v.device.type == "meta"), None):
        raise ValueError(f"adapter {name!r} is on the meta device ({meta.removeprefix(PREFIX)}): meta tensors have "
                         f"shapes but no values, so there is nothing to save; give the model real weights first "
                         f"(model.to_empty(device='cpu') and load its weights, or load it without device='meta')")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if not isinstance(config, LoraConfig):  # AdaLoRA: final ranks go in rank_pattern, tensors keep those triplets

        config, tensors = export_pruned(model, name, config, tensors)
    return write_adapter_dir(out_dir, tensors, config.to_peft_dict(), quantization=base_quantization(model),
                             model_type=model_type(model))


def _warn_residual_on_tied(model: nn.Module, name: str, config) -> None:
    """PiSSA/OLoRA on a layer tied to the input embedding (a tied lm_head): loraforge unties it before writing the
    residual; PEFT writes the residual into the shared weight, so the embedding changes too and PEFT's logits for
    this adapter differ (1.7 on a tiny model). Said when it is saved, with the form both load alike."""
    init = getattr(config, "init_lora_weights", True)
    if not (isinstance(init, str) and init.startswith(("pissa", "olora"))):
        return
    tied = [path for path, m in lora_layers(model) if name in m.r and m.untied_from is not None]
    if tied:
        warnings.warn(f"{init} on {tied[0]}, whose weight is tied to the input embedding: PEFT loads this adapter "
                      f"with other logits (it writes the residual into the shared weight, changing the embedding "
                      f"too); loraforge.lora.adapters.save_converted writes a plain LoRA both load alike",
                      stacklevel=3)
    conv1d = [path for path, m in lora_layers(model) if name in m.r and m.fan_in_fan_out]
    if init == "olora" and conv1d:  # PEFT < 0.22's olora_init ignores fan_in_fan_out: A and B come out transposed
        warnings.warn(f"olora on {conv1d[0]}, a Conv1D layer (GPT-2 style, fan_in_fan_out): PEFT before 0.22 cannot "
                      f"load this adapter (its OLoRA init re-draws A and B with the layer's dimensions swapped: a "
                      f"size mismatch; 0.22 loads it equal); loraforge.lora.adapters.save_converted writes a plain "
                      f"LoRA every version loads alike", stacklevel=3)


def read_adapter_config(adapter_dir: str | Path, given: Iterable[str | Path] = ()):
    """Parse adapter_config.json into our config class for its peft_type. `~` is expanded as in a shell (an
    --adapter=~/x or a quoted path keeps it). What depends on the model is read by load_adapter (peft_as_loaded).
    `given`: every adapter folder the command takes (read_adapter_json)."""
    return parse_adapter_config(*read_adapter_json(adapter_dir, given))


def read_adapter_json(adapter_dir: str | Path, given: Iterable[str | Path] = ()) -> tuple[Path, dict]:
    """adapter_config.json's path and its JSON object; a folder that is not an adapter's is told what it is. A
    folder with adapters in subfolders (PEFT's save of several) is warned about, naming those not in `given` (the
    adapter folders the command takes: `merge --adapter DIR DIR/other` uses `other` too)."""
    folder = expand_user(adapter_dir)
    if not folder.exists():
        raise AdapterError(f"no such adapter folder: {adapter_dir}{missing_note(str(adapter_dir))}")
    path = folder / CONFIG_NAME
    if folder.is_file():  # soak: --adapter x/adapter_config.json read "adapter_config.json is missing"
        raise AdapterError(f"{adapter_dir} is a file, not an adapter directory; give the folder that holds it "
                           f"({Path(adapter_dir).parent}) if that is the adapter's")
    if not path.is_file():
        if (folder / "adapter" / CONFIG_NAME).is_file():  # a training run's folder: its adapter is in adapter/
            hint = f"; a training run's adapter is in its adapter folder: give {Path(adapter_dir) / 'adapter'}"
        elif (folder / "checkpoints").is_dir() or (folder / "trainer_state.json").is_file():  # soak: no hint
            run = Path(adapter_dir) if (folder / "checkpoints").is_dir() else Path(adapter_dir).parent.parent
            hint = (f"; it is a training run's checkpoint: its adapter is {run / 'adapter'}"
                    if (expand_user(run) / "adapter" / CONFIG_NAME).is_file() else
                    f"; it is {'a checkpoint of ' if run != Path(adapter_dir) else ''}a training run that has not "
                    f"written its adapter yet (stopped or still running): `loraforge train CONFIG --resume` with "
                    f"output_dir {run} finishes it and writes {run / 'adapter'}")
        elif (folder / "config.json").is_file():  # a whole model: merge's output, method: full's model/
            hint = "; it holds a whole model (config.json): give it as the base model (--model, --base, model.name)"
        elif subfolders := _adapter_subfolders(folder):
            # soak: PEFT's save_pretrained of several adapters, none named "default", writes one folder each
            named = ", ".join(str(Path(adapter_dir) / d) for d in subfolders[:SHOWN])
            hint = f"; it holds {len(subfolders)} adapters in folders named after them (PEFT's): give one: {named}"
        elif (folder / "model" / "config.json").is_file():  # a method: full run's folder
            hint = (f"; a full fine-tuning run writes a whole model, not an adapter: give {Path(adapter_dir) / 'model'}"
                    f" as the base model (--model, --base, model.name)")
        else:
            hint = ""
        raise AdapterError(f"{adapter_dir} is not an adapter directory: {CONFIG_NAME} is missing{hint}")
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path} is over {MAX_CONFIG_BYTES >> 20} MB, where an adapter's config is a few KB; give "
                           f"the {CONFIG_NAME} that was saved with the adapter")
    if encoding := byte_order_mark(raw):  # soak: "Unexpected UTF-8 BOM (decode using utf-8-sig)"
        raise AdapterError(f"{path} starts with a {encoding} byte-order mark (as Windows editors write), which PEFT "
                           f"does not read either; save it as UTF-8 without one")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterError(f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                           f"save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise AdapterError(f"{path}: a number in it is too long to read ({e})") from None
    except RecursionError:  # soak: a traceback from generate, eval, merge and export
        raise AdapterError(f"{path}: nested too deeply to read (arrays or objects thousands of levels deep)") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(data).__name__}")
    taken = {expand_user(g).resolve() for g in given}
    if others := [d for d in _adapter_subfolders(folder) if (folder / d).resolve() not in taken]:
        # soak: merge --adapter DIR of PEFT's save_pretrained of several adapters (`default` at the top, each other
        # one in a folder named after it) merged `default` alone, unsaid; eval, generate, export read it here too
        more = f" and {len(others) - SHOWN} more" if len(others) > SHOWN else ""
        # (stacklevel 1: merge reads a folder's config, then loads it; the same line twice is said once)
        warnings.warn(f"{adapter_dir}: only its top adapter (PEFT's 'default') is used, not the {len(others)} in its "
                      f"subfolders ({', '.join(others[:SHOWN])}{more}: PEFT's save of several adapters); to use one, "
                      f"give its folder, e.g. --adapter {Path(adapter_dir) / others[0]}", stacklevel=1)
    return path, data


def parse_adapter_config(path: Path, data: dict):
    """A PEFT adapter_config.json's object as our config class for its peft_type."""
    try:
        if data.get("peft_type") == "ADALORA":
            return AdaLoraConfig.from_peft_dict(data, source=str(path))
        return LoraConfig.from_peft_dict(data, source=str(path))
    except ConfigError as e:
        raise AdapterError(str(e)) from None


def _header_length(f: BinaryIO, path: Path) -> int:
    """The length of the header of the safetensors file `path`, open as `f` at its start, that its first 8 bytes
    give, read from `f` (-1 where the file is shorter than 8 bytes); AdapterError where it is over
    MAX_HEADER_BYTES. The one reader of that length: read_header, check_header_size, _metadata_in_order."""
    head = f.read(8)
    if len(head) < 8:
        return -1
    if (size := int.from_bytes(head, "little")) > MAX_HEADER_BYTES:
        raise AdapterError(f"{path}: its safetensors header says it is {size:,} bytes, where an adapter's is at most "
                           f"a few MB ({MAX_HEADER_BYTES >> 20} MB are read); the file is damaged, or not an adapter's")
    return size


def check_header_size(path: Path) -> None:
    """AdapterError when the safetensors file's header (its first 8 bytes give its length) is over MAX_HEADER_BYTES."""
    with open(path, "rb") as f:
        _header_length(f, path)


# bytes per element of the dtypes a safetensors header names (safetensors' Dtype)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header, its JSON object (each tensor's entry, and "__metadata__" where the writer put
    one), and the number of bytes after it, read with plain reads: safetensors' safe_open maps the file into memory
    and reads the header from the mapping, and a file another tool truncates meanwhile (rewritten in place) kills
    the process with SIGBUS (soak: `serve` died while an adapter's file was rewritten in place, its requests
    re-checking it). AdapterError where the header is over MAX_HEADER_BYTES, the file ends inside it, or it is not
    a JSON object."""
    with open(path, "rb") as f:
        size = _header_length(f, path)
        raw = f.read(max(size, 0))
        total = os.fstat(f.fileno()).st_size
    data = total - 8 - size  # the bytes after the header
    try:
        if size < 0 or len(raw) < size:
            raise ValueError(f"the file ends inside its header ({total} of {8 + max(size, 0)} bytes)")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unreadable(path, e) from None
    return header, data


def _unreadable(path: Path, e: Exception) -> AdapterError:
    why = f"{type(e).__name__}: {e}" if isinstance(e, (KeyError, TypeError)) else str(e)
    return AdapterError(f"{path} is not a readable safetensors file (corrupted or truncated?): {why}")


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, as a safetensors file's header gives it (read_header: plain reads, never a mapping).
    AdapterError where read_header refuses the header, or it names a dtype, shape or bytes the file does not
    hold."""
    header, data = read_header(path)
    try:
        shapes = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in DTYPE_BYTES or not all(type(n) is int and n >= 0 for n in (*shape, begin, end)):
                raise ValueError(f"tensor {key}: dtype {dtype!r}, shape {shape}, offsets {begin}, {end}")
            if end - begin != math.prod(shape) * DTYPE_BYTES[dtype] or end > data:
                raise ValueError(f"tensor {key} needs bytes {begin}-{end} of {data} after the header")
            shapes[key] = tuple(shape)
    except (ValueError, KeyError, TypeError) as e:
        raise _unreadable(path, e) from None
    return shapes


def _adapter_subfolders(folder: Path) -> list[str]:
    """The names of `folder`'s subfolders that hold an adapter_config.json, sorted ([] where it cannot be listed)."""
    try:
        return sorted(d.name for d in folder.iterdir() if (d / CONFIG_NAME).is_file())
    except OSError:  # a file, not a folder, or no permission to list it
        return []


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    path = expand_user(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        if (path.parent / "adapter_model.bin").is_file():
            raise AdapterError(f"{adapter_dir} holds adapter_model.bin (a pickle), which loraforge never loads; "
                               f"re-save it as safetensors (PEFT: model.save_pretrained(dir, safe_serialization=True))")
        if path.exists():  # soak: a FIFO or /dev/zero in its place was said to be missing
            raise AdapterError(f"{adapter_dir}: {WEIGHTS_NAME} is not a regular file (a FIFO, a device or a folder); "
                               f"put the adapter's saved weights file there")
        raise AdapterError(f"{adapter_dir}: {WEIGHTS_NAME} is missing")
    check_header_size(path)
    try:  # read into memory first: tensors mapped from a file that another tool rewrites in place die of SIGBUS
        tensors = dict(sorted(load(path.read_bytes()).items()))  # by name, as load_file gives them
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file (corrupted or truncated?): {e}") from None
    for key, tensor in tensors.items():  # adapter weights are floating point; an integer or bool one is damage
        if not tensor.dtype.is_floating_point:
            raise AdapterError(f"{path}: tensor {key} is {_name(tensor.dtype)}, not floating "
                               f"point; the adapter is corrupted (or not one)")
        if tensor.dtype not in COMPUTE_DTYPES:  # float8: stored small, computed (and checked) in fp32
            tensors[key] = tensor = tensor.float()
        _check_finite(tensor, f"{path}: tensor {key}")
    if embedding := next((k for k in tensors if ".lora_embedding_" in k), None):  # PEFT's LoRA on nn.Embedding
        raise AdapterError(f"{path}: {embedding} is LoRA on an embedding layer ({_module_of(embedding)}); loraforge "
                           f"reads LoRA on linear layers only (merge it with PEFT's merge_and_unload, then use the "
                           f"merged model)")
    return tensors


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_finite(tensor: torch.Tensor, what: str, cast: str = "") -> None:
    """AdapterError naming `what` where `tensor` holds NaN or inf (a NaN/inf weight turns every output into NaN)."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise AdapterError(f"{what} holds NaN or inf values{cast} ({int(bad.sum())} of {tensor.numel()}); the "
                           f"adapter is corrupted or its training diverged")


def _module_of(key: str) -> str:
    """The module path a file key belongs to, for error messages."""
    path = key.removeprefix(PREFIX)
    for marker in (".lora_", ".base_layer.", ".modules_to_save."):
        if marker in path:
            return path.split(marker)[0]
    return path.rsplit(".", 1)[0]


def _factored_modules(tensors: dict) -> tuple[str, ...]:
    """The module paths that hold an adapter's lora_A in a weights file (LoRA's `.lora_A.weight`, AdaLoRA's bare)."""
    return tuple(sorted({_module_of(key) for key in tensors if key.endswith((".lora_A.weight", ".lora_A"))}))


def _tensor_of(key: str) -> str:
    """Which of its module's tensors a file key is (lora_A, lora_B, lora_magnitude_vector, ...), for messages."""
    rest = key.removeprefix(PREFIX)[len(_module_of(key)) + 1:]
    return rest.removesuffix(".weight").removesuffix(".default") or key


SHOWN = 5
"""Tensors named when an adapter does not fit (an adapter for another base misfits in hundreds)."""


def _other_base(config, model: nn.Module) -> str | None:
    """'it was trained on BASE (...) and the model given is NAME' where the adapter names another base than the
    model's; None where it names none or the same. Said only once the tensors misfit: an adapter made on a local
    copy of a hub model names the hub id, and loads on that copy."""
    trained_on = getattr(config, "base_model_name_or_path", None)
    given = base_name_or_path(model)  # where save_adapter (and PEFT) take the name it writes
    if not trained_on or not given or trained_on == given:
        return None
    return (f"it was trained on {trained_on} (adapter_config.json's base_model_name_or_path) and the model given "
            f"is {given}")


def model_type(model: nn.Module) -> str | None:
    """The model's config.model_type (llama, qwen2, ...), None for a model without a transformers config."""
    value = getattr(getattr(getattr(model, "module", model), "config", None), "model_type", None)
    return value if isinstance(value, str) and value else None


def _warn_other_class(adapter_dir, config, model: nn.Module) -> None:
    """A warning where the adapter was made for another architecture than the model's, its shapes fitting (Mistral-7B
    and Llama-3-8B; a Qwen2 and a Llama of the same sizes: loaded without a word, in PEFT too). The architecture is
    PEFT's auto_mapping class (written for a task_type of null), else the model_type our weights file records
    (BASE_MODEL_TYPE), else that of the config.json of the base the adapter names, where that is a local folder or
    in the hub cache."""
    try:
        mapping = json.loads((expand_user(adapter_dir) / CONFIG_NAME).read_text(encoding="utf-8")).get("auto_mapping")
    except (OSError, ValueError):
        mapping = None  # read_adapter_config read it already: gone since, nothing to compare
    trained_on = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    given = type(getattr(model, "module", model)).__name__
    if isinstance(trained_on, str) and trained_on != given:
        warnings.warn(f"{adapter_dir}: this adapter was trained on a {trained_on} (adapter_config.json's "
                      f"auto_mapping) and the model given is a {given}: its shapes fit, but it was not made for this "
                      f"model; give the base it was trained on", stacklevel=3)
        return
    here, base = model_type(model), getattr(config, "base_model_name_or_path", None)
    recorded, where = recorded_model_type(adapter_dir), "its weights file's header"
    if recorded is None and isinstance(base, str) and base:
        recorded, where = named_model_type(base), f"the config.json of {base}, the base_model_name_or_path it names"
    if here is not None and recorded is not None and recorded != here:
        named = f" ({base})" if base else ""
        warnings.warn(f"{adapter_dir}: this adapter was trained on a {recorded} model{named} ({where}) and the model "
                      f"given is a {here} ({given}): its shapes fit, but it was not made for this model; give the "
                      f"base it was trained on", stacklevel=3)


def _recorded(adapter_dir: str | Path, key: str) -> str | None:
    """A string the adapter's weights file's header records under `key`, or None (none recorded, unreadable)."""
    try:
        header, _ = read_header(expand_user(adapter_dir) / WEIGHTS_NAME)
    except (OSError, AdapterError):
        return None  # read_adapter_weights read it already: gone or rewritten since, nothing to compare
    metadata = header.get("__metadata__")
    value = metadata.get(key) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


def recorded_quantization(adapter_dir: str | Path) -> str | None:
    """The base's quantization the adapter's weights file records (BASE_QUANTIZATION: none, nf4, fp4, int8), or
    None where it records none (an older loraforge's, PEFT's) or cannot be read."""
    return _recorded(adapter_dir, BASE_QUANTIZATION)


def recorded_model_type(adapter_dir: str | Path) -> str | None:
    """The base's model_type the adapter's weights file records (BASE_MODEL_TYPE), or None where it records none."""
    return _recorded(adapter_dir, BASE_MODEL_TYPE)


def give_quantize(recorded: str) -> str:
    """How a command taking --quantize (or a config's model.quantization) loads the base an adapter records."""
    return (f"give --quantize {recorded} (model.quantization: {recorded})" if recorded != "none" else
            "leave --quantize (model.quantization) off")


def other_quantization(adapter_dir, here: str, fix: Callable[[str], str] = give_quantize) -> str | None:
    """The sentence where the adapter records the base's quantization it trained over and the base it goes on is
    stored as `here` (quant.checks.base_quantization) otherwise: another model (SmolLM2: a QLoRA adapter's logits
    over the full-precision base up to 13 apart); None where they agree or it records none. `fix(recorded)`: how the
    command showing it gets that base (give_quantize: a command taking --quantize). load_adapter warns it; the
    server keeps it for the dashboard (serve.residency)."""
    recorded = recorded_quantization(adapter_dir)
    if recorded is None or recorded == here:
        return None
    return (f"{adapter_dir}: this adapter was trained over {_stored(recorded)} base and this base is "
            f"{_stored(here)} one: its outputs differ from those it trained to give; {fix(recorded)}")


def _warn_other_quantization(adapter_dir, model: nn.Module, fix: Callable[[str], str]) -> None:
    if sentence := other_quantization(adapter_dir, base_quantization(model), fix):
        warnings.warn(sentence, stacklevel=3)


def _stored(quantization: str) -> str:
    return "a full-precision" if quantization == "none" else f"an {quantization.upper()}"


def _misfit(adapter_dir, config, model: nn.Module, problems: list[str], shapes: int, missing: int,
            unexpected: int) -> str:
    """The error for an adapter whose tensors do not fit the model: the base it names where that differs from
    the model's, how many tensors misfit and how, and the first SHOWN of them."""
    other = _other_base(config, model)
    if len(problems) <= SHOWN and other is None:
        return f"cannot load adapter {adapter_dir}:\n  " + "\n  ".join(problems)
    kinds = [f"{n} {what}" for n, what in ((shapes, "of another shape"), (missing, "missing from the file"),
                                           (unexpected, "not in this model")) if n]
    return (f"cannot load adapter {adapter_dir}: {other + '; ' if other else ''}{len(problems)} of its tensors do "
            f"not fit ({', '.join(kinds)}), the first {min(SHOWN, len(problems))}:\n  "
            + "\n  ".join(problems[:SHOWN]))


BASE_COPY = ".base_layer.weight"
"""PEFT saves the whole base weight of an embedding or head that it targets (save_embedding_layers, "auto": when
target_modules names embed_tokens or lm_head) under `<module>.base_layer.weight`."""


TRAINING_STATE = (".lora_velora_", ".lora_monteclora_sampler.")
"""Tensors PEFT saves for VeLoRA (velora_config: its backward pass's compression) and MonteCLoRA (monteclora_config:
its sampler, which perturbs A in training only): in eval mode PEFT computes plain LoRA, so these are not loaded
(from_peft_dict's warning names the field). They were refused as tensors "not in this model", naming neither."""


def _ties_embeddings(model: nn.Module) -> bool:
    """Whether the model's output head shares its weight with the input embedding (tie_word_embeddings; an
    adapter on the head unties it, inject.untie_shared, as PEFT then reads the flag false)."""
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return False
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return embedding is not None and weight is not None and weight is getattr(embedding, "weight", None)


def _names_an_embedding(config) -> bool:
    """PEFT's test for ensure_weight_tying (BaseTuner._check_tied_modules): an embedding layer's name among
    modules_to_save, or among target_modules (a regex: one that matches such a name)."""
    saved = getattr(config, "modules_to_save", None) or ()
    targets = config.target_modules
    if isinstance(targets, str):
        return any(name.split(".")[-1] in EMBEDDING_NAMES for name in saved) or any(
            re.fullmatch(targets, name) for name in EMBEDDING_NAMES)
    return any(name.split(".")[-1] in EMBEDDING_NAMES for name in (*saved, *(targets or ())))


def peft_as_loaded(model: nn.Module, config, data: dict, tensors: dict, path: Path):
    """`config` as PEFT loads the file onto this model, where a field's meaning depends on the model.
    ensure_weight_tying acts only where the head is tied to the input embedding and an embedding is saved or
    adapted (else PEFT warns and loads the adapter as it is): refused there, as loraforge does not implement it.
    task_type SEQ_CLS: PEFT (PeftModelForSequenceClassification) adds classifier and score to modules_to_save and
    goes on without those that match no module (a causal LM has neither); so does this, unless the file holds
    tensors for them, which then stay refused by name (inject: they match no module of this model)."""
    if data.get("ensure_weight_tying") and _ties_embeddings(model) and _names_an_embedding(config):
        raise AdapterError(f"invalid config:\n  {path}: ensure_weight_tying: this adapter uses one trained copy for "
                           f"a tied input embedding and output head, which loraforge does not implement (its outputs "
                           f"would differ from PEFT's); load it with PEFT, or train an adapter without "
                           f"ensure_weight_tying")
    if isinstance(config, LoraConfig) and config.modules_to_save:
        config = _saved_as_held(model, config, {_module_of(key) for key in tensors})
    if data.get("task_type") == "SEQ_CLS" and isinstance(config, LoraConfig) and config.modules_to_save:
        held = {_module_of(key) for key in tensors}
        absent = {name for name in SEQ_CLS_HEADS if not saved_paths(model, (name,))
                  and not any(module.endswith(name) for module in held)}
        kept = tuple(name for name in config.modules_to_save if name not in absent)
        config = dataclasses.replace(config, modules_to_save=kept or None)
    return config


def _saved_as_held(model: nn.Module, config: LoraConfig, held: set[str]) -> LoraConfig:
    """`config` with modules_to_save as the modules the file holds, where it was saved by PEFT 0.22 or later: those
    match an entry on module-name boundaries ("norm" takes model.norm; peft.utils.other._is_valid_match), where PEFT
    0.21 and loraforge match a bare suffix ("norm" also takes every input_layernorm). A 0.22 file holds the fewer,
    and was refused as missing the others; it now loads as PEFT 0.22 loads it, its entries the modules' full paths
    (which both rules read alike). A file holding the suffix rule's modules, or neither set, is left to the checks."""
    by_suffix = saved_paths(model, config.modules_to_save)
    by_name = [p for p in by_suffix if any(p == t or p.endswith("." + t) for t in config.modules_to_save)]
    if len(by_name) == len(by_suffix) or not by_name or set(by_suffix) <= held:
        return config
    if set(by_name) <= held and not (set(by_suffix) - set(by_name)) & held:
        return dataclasses.replace(config, modules_to_save=tuple(by_name))
    return config


def _lora_layer_at(model: nn.Module, path: str) -> LoraLayer | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, LoraLayer) else None


def _without_copies_of_the_base(model: nn.Module, tensors: dict, expected: dict, adapter_dir) -> dict:
    """`tensors` less the base weights PEFT saved beside the adapter (BASE_COPY) that equal this model's (compared
    in the lower precision of the two); one that differs (a resized or retrained vocabulary) is refused, since
    loraforge loads adapters onto the base as it is. Any other key is left for load_adapter's checks."""
    kept = {}
    for key, tensor in tensors.items():
        path = key.removeprefix(PREFIX).removesuffix(BASE_COPY)
        layer = _lora_layer_at(model, path) if key.endswith(BASE_COPY) and key not in expected else None
        base = getattr(layer.base_layer, "weight", None) if layer is not None else None
        if base is None or not base.dtype.is_floating_point:
            kept[key] = tensor
            continue
        low = min(tensor.dtype, base.dtype, key=lambda d: torch.finfo(d).bits)
        if tuple(tensor.shape) != tuple(base.shape) or not torch.equal(tensor.to(low), base.detach().to(low)):
            raise AdapterError(f"cannot load adapter {adapter_dir}: it holds its own copy of {path}'s base weight "
                               f"({key.removeprefix(PREFIX)}, shape {tuple(tensor.shape)}: PEFT's "
                               f"save_embedding_layers) and it differs from this model's {tuple(base.shape)}; load "
                               f"the base it was trained on (a resized vocabulary?)")
    return kept


def adalora_as_lora(model: nn.Module, config: AdaLoraConfig, tensors: dict[str, torch.Tensor], source: str | Path
                    ) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """An AdaLoRA adapter as the plain LoRA with the same ΔW = scaling · B (A ∘ E), for `model`: (its config, its
    tensors, each layer's (r, scaling)). Per layer, r = the triplets rank_pattern keeps (init_r where it has none),
    lora_A = A ∘ E (in fp32), lora_B = B, and AdaLoRA's scaling (adalora_scaling). The config has one r (the
    largest): each layer's own r and scaling are set once it is injected (`_fit_layer`), not said with rank_pattern
    and alpha_pattern, whose regexes, one per layer, took over the server's 2 s regex budget on a 160-layer base
    (and LoRA's lora_alpha / r cannot say AdaLoRA's scaling exactly). A layer whose triplets are all pruned (r 0,
    ΔW 0) is left out.
    Keys the conversion does not take stay as they are, for load_adapter's checks to name. The server serves
    AdaLoRA this way: a module holds the LoRA layers of many adapters, never a LoRA and an AdaLoRA layer."""
    pattern = config.rank_pattern or {}
    converted = dict(tensors)
    layers: dict[str, tuple[int, float]] = {}
    for path in find_targets(model, config, advise=False):
        kept = pattern.get(f"{path}.lora_E")
        r = sum(kept) if kept is not None else config.init_r
        keys = [f"{PREFIX}{path}.{factor}" for factor in ("lora_A", "lora_E", "lora_B")]
        if r == 0:
            for key in keys:
                converted.pop(key, None)
            continue
        layers[path] = r, adalora_scaling(config.lora_alpha, r, config.init_r)
        if not all(key in tensors for key in keys):
            missing = next(key for key in keys if key not in tensors)
            raise AdapterError(f"{source}: {path}: {missing.removeprefix(PREFIX)} is missing from the file")
        A, E, B = (tensors[key] for key in keys)
        if A.dim() != 2 or tuple(E.shape) != (A.shape[0], 1) or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise AdapterError(f"{source}: {path}: lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)} and lora_B "
                               f"{tuple(B.shape)} in the file are not one AdaLoRA triplet (r × in, r × 1, out × r)")
        if A.shape[0] != r:  # the kept rank decides the scaling where lora_alpha is 0: never guessed from the file
            raise AdapterError(f"{source}: {path}: lora_A {tuple(A.shape)} has rank {A.shape[0]}, but {CONFIG_NAME} "
                               f"keeps {r} of that layer's init_r {config.init_r} triplets (rank_pattern): the two "
                               f"files are not of one adapter")
        for key in keys:
            del converted[key]
        converted[f"{PREFIX}{path}.lora_A.weight"] = A.float() * E.float()
        converted[f"{PREFIX}{path}.lora_B.weight"] = B
    if not layers:
        raise AdapterError(f"{source}: every layer's rank is 0 (rank_pattern keeps no triplet): the adapter changes "
                           f"nothing; use the base model instead")
    r = max(rank for rank, _ in layers.values())
    lora = LoraConfig(r=r, lora_alpha=r, target_modules=tuple(layers), fan_in_fan_out=config.fan_in_fan_out,
                      init_lora_weights=False,  # the file's factors replace them
                      base_model_name_or_path=config.base_model_name_or_path)
    return lora, converted, layers


def _fit_layer(layer: LoraLayer, name: str, r: int, scaling: float) -> None:
    """Give adapter `name` of `layer` rank r (new factors, which the load fills) and `scaling`."""
    if layer.r[name] != r:
        weight = layer.lora_A[name].weight
        kw = dict(bias=False, dtype=weight.dtype, device=weight.device)
        layer.lora_A[name] = nn.Linear(layer.in_features, r, **kw).requires_grad_(weight.requires_grad)
        layer.lora_B[name] = nn.Linear(r, layer.out_features, **kw).requires_grad_(weight.requires_grad)
        layer.r[name] = r
    layer.scaling[name] = scaling


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str = "default",
                 is_trainable: bool = False, as_lora: bool = False, given: Iterable[str | Path] = (),
                 quantization_fix: Callable[[str], str] = give_quantize) -> nn.Module:
    """Load a PEFT-format adapter onto `model` under `name` and make it the active one; its tensors in fp32 on a
    bf16, fp16 or quantized base (layer.adapter_dtype, as PEFT), else in the base's dtype. `as_lora`: an AdaLoRA
    adapter goes on as the equal plain LoRA (adalora_as_lora), beside LoRA adapters on the same layers.

    Every key and shape is checked before anything is kept: a missing key, an unexpected key or a shape
    made for another base raises AdapterError naming the module, and the model is left as it was.
    is_trainable=False (inference, PEFT's default) freezes every parameter and puts the model in eval() (PEFT's
    from_pretrained does both: no adapter dropout); True makes the adapter trainable and leaves the mode as it is.
    `given`: every adapter folder the command takes (read_adapter_json's warning leaves them out).
    `quantization_fix`: the warning's fix where the adapter records another base quantization than `model`'s (the
    base it trained over), for the quantization recorded; give_quantize names --quantize, which export lacks.
    """
    path, data = read_adapter_json(adapter_dir, given)
    tensors = read_adapter_weights(adapter_dir)
    config = peft_as_loaded(model, parse_adapter_config(path, data), data, tensors, path)
    if config.target_modules is None and (held := _factored_modules(tensors)):
        # a PEFT file without target_modules (our own name them): PEFT takes its default for the architecture,
        # ours differs (q, k, v, o: the file's k_proj and o_proj "missing"); the layers the file holds are the ones
        config = dataclasses.replace(config, target_modules=held)
    fitted: dict[str, tuple[int, float]] = {}
    if as_lora and isinstance(config, AdaLoraConfig):
        config, tensors, fitted = adalora_as_lora(model, config, tensors, adapter_dir)
    if name in adapter_configs(model):  # before the try: its cleanup would delete the loaded one
        raise ValueError(f"adapter {name!r} is already loaded; delete it or choose another name")
    if merged := merged_adapters(model):  # the new one becomes the active one: the merged ones would run on under it
        raise merged_error(merged, "loading another one")
    with undone_on_failure(model, name):  # a misfit or Ctrl-C: the model as it was before the load
        try:
            if isinstance(config, LoraConfig):
                inject(model, config, name, advise=False)
            else:  # AdaLoRA: its own layer type
                inject_adalora(model, config, name, advise=False)
        except LayerKindConflict:
            raise  # the model's other adapters are in the way, not the adapter
        except ConfigError as e:
            other = _other_base(config, model)
            raise AdapterError(f"{adapter_dir}: this adapter does not fit the model{f' ({other})' if other else ''}: "
                               f"{e}") from None
        for path, (r, scaling) in fitted.items():  # an AdaLoRA adapter as LoRA: each layer's own rank and scaling
            _fit_layer(model.get_submodule(path), name, r, scaling)
        expected = adapter_state_dict(model, name)
        tensors = _without_copies_of_the_base(model, tensors, expected, adapter_dir)
        tensors = {key: t for key, t in tensors.items() if not any(m in key for m in TRAINING_STATE)}
        missing = [f"{_module_of(key)}: missing from the file ({key.removeprefix(PREFIX)})"
                   for key in sorted(set(expected) - set(tensors))]
        unexpected = [f"{_module_of(key)}: in the file but not in this model ({key.removeprefix(PREFIX)})"
                      for key in sorted(set(tensors) - set(expected))]
        shapes = [f"{_module_of(key)}: {_tensor_of(key)} of shape {tuple(tensors[key].shape)} in the file, "
                  f"{tuple(expected[key].shape)} in this model (an adapter made for another base?)"
                  for key in sorted(set(tensors) & set(expected))
                  if tuple(tensors[key].shape) != tuple(expected[key].shape)]
        if problems := shapes + missing + unexpected:  # a shape says most about which base the adapter is for
            raise AdapterError(_misfit(adapter_dir, config, model, problems, len(shapes), len(missing),
                                       len(unexpected)))
        with torch.no_grad():
            for key, target in expected.items():
                value = tensors[key].to(target.dtype)
                if value.dtype != tensors[key].dtype:  # finite in the file's dtype, maybe not in the model's
                    _check_finite(value, f"{Path(adapter_dir) / WEIGHTS_NAME}: tensor {key}",
                                  f" once cast from {_name(tensors[key].dtype)} to the model's {_name(target.dtype)}")
                target.copy_(value)
        _warn_other_class(adapter_dir, config, model)
        _warn_other_quantization(adapter_dir, model, quantization_fix)
        set_adapter(model, name)  # stopped from here on, the load was left half done: "already loaded" on a rerun
        if is_trainable:
            mark_trainable(model, name)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
    return model


def list_adapters(model: nn.Module) -> list[str]:
    return list(adapter_configs(model))


def set_adapter(model: nn.Module, name: str | list[str]) -> None:
    """Make `name` (or several names, summed) the active adapter(s) of every layer."""
    names = [name] if isinstance(name, str) else list(name)
    require_adapter(model, *names)
    if twice := sorted({n for n in names if names.count(n) > 1}):  # each layer would add its ΔW once per mention
        raise ValueError(f"set_adapter: {', '.join(map(repr, twice))} given more than once in {names}; each "
                         f"active adapter counts once (to weigh one adapter more, combine adapters with "
                         f"add_weighted_adapter and its weights)")
    if (merged := merged_adapters(model)) and sorted(set(names)) != merged:  # the merged ones would run on, summed in
        raise merged_error(merged, f"switching to {names}")
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.active_adapters = [n for n in names if n in module.r]
        elif isinstance(module, ModulesToSave):
            module.active_adapter = next((n for n in names if n in module.modules_to_save), None)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block (the biases a bias adapter trains as they were before it came).
    Refuses while adapters are merged (unmerge() first)."""
    if merged := merged_adapters(model):
        raise merged_error(merged, "disabling them")
    modules = [m for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSave))]
    biases = [pair for pairs in (getattr(model, "lora_base_biases", None) or {}).values() for pair in pairs]
    trained = [p.detach().clone() for p, _ in biases]  # a bias adapter's biases are the base's: swapped out
    for m in modules:
        m.disabled = True
    with torch.no_grad():
        for p, before in biases:
            p.copy_(before)
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False
        with torch.no_grad():
            for (p, _), value in zip(biases, trained):
                p.copy_(value)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str | None]):
    """Inside the block, row i of every batch uses adapter `adapter_names[i]` (None or "base": no adapter), its
    modules_to_save copies included. An adapter that trains biases changes the base's own, which every row shares:
    while one is loaded, only a batch of its rows alone is taken (AdapterError)."""
    names = [None if n in (None, "base") else n for n in adapter_names]
    require_adapter(model, *(set(names) - {None}))
    if merged_adapters(model):
        raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call loraforge.lora.merge.unmerge(model)")
    for name, pairs in (getattr(model, "lora_base_biases", None) or {}).items():
        if pairs and set(names) != {name}:  # soak: the base rows got the biases adapter `name` trained
            raise AdapterError(f"a mixed-adapter batch cannot hold rows without adapter {name!r} while it is loaded: "
                               f"it trains biases (bias {adapter_configs(model)[name].bias!r}), which are the base's "
                               f"own and so every row's; run its rows alone (set_adapter), or delete_adapter({name!r}) "
                               f"first")
    layers = [m for _, m in lora_layers(model)]
    saved = [m for m in model.modules() if isinstance(m, ModulesToSave)]
    for layer in layers:  # one hook for every per-row forward: the layer's own loop here, a server's stacks there
        layer.row_adapters, layer.row_forward = names, layer.mixed_rows
    for module in saved:  # each row through its adapter's copy, or the original (PEFT's _mixed_batch_forward)
        module.row_adapters = names
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters, layer.row_forward = None, None
        for module in saved:
            module.row_adapters = None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; layers left without adapters are unwrapped back to their base layer.

    The base is left as it was before the adapter came: a PiSSA/OLoRA adapter puts back the W0 its init replaced
    by the residual, and a layer untied for it (inject.untie_shared) is tied again once it holds no adapter."""
    if name in merged_adapters(model):  # before anything goes: a refusal leaves the model as it was
        raise RuntimeError(f"adapter {name!r} is merged; call loraforge.lora.merge.unmerge(model) before deleting it")
    remove_adapter(model, name)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` with zero rows appended up to `n` rows."""
    return t if t.shape[0] >= n else torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])


def save_converted(model: nn.Module, out_dir: str | Path, initial_adapter_dir: str | Path,
                   name: str = "default") -> Path:
    """Save a PiSSA/OLoRA adapter as a plain LoRA for the *original* base W0 (before the residual replaced it).

    `initial_adapter_dir`: the adapter saved with save_adapter() right after injection, before training (A0, B0).
    With W_res = W0 − s·B0 A0: W_res + s·B A = W0 + s·[B, −B0] [A; A0], a rank-2r adapter with the same scale
    (lora_alpha doubled; ×√2 with use_rslora), so PEFT and loraforge load it on the original base with equal logits.
    """
    config = adapter_configs(model)[name]
    if config.use_dora:
        raise ValueError("converting a PiSSA/OLoRA adapter trained with DoRA is not supported (the magnitude "
                         "depends on the residual base); merge it instead")
    initial = read_adapter_weights(initial_adapter_dir)
    tensors = {k: v.detach().cpu() for k, v in adapter_state_dict(model, name).items()}
    ranks = {f"{PREFIX}{path}.lora_A.weight": module.r[name] for path, module in model.named_modules()
             if isinstance(module, LoraLayer) and name in module.r}  # as declared: what a loader builds
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        key_b = key.replace(".lora_A.weight", ".lora_B.weight")
        if key not in initial or key_b not in initial:
            raise ValueError(f"{initial_adapter_dir} has no {key}: is it the initial save of this adapter?")
        # A layer narrower than r got only min(out, in) singular directions: zero rows / columns make up the rank
        a, a0 = (_rows(t.to(tensors[key].dtype), ranks[key]) for t in (tensors[key], initial[key]))
        b, b0 = (_rows(t.to(tensors[key_b].dtype).T, ranks[key]).T for t in (tensors[key_b], initial[key_b]))
        tensors[key] = torch.cat([a, a0], dim=0)  # (2r, in)
        tensors[key_b] = torch.cat([b, -b0], dim=1)  # (out, 2r)
    alpha_factor = 2 ** 0.5 if config.use_rslora else 2.0  # alpha/r or alpha/sqrt(r) unchanged at 2r
    converted = dataclasses.replace(
        config, r=2 * config.r, lora_alpha=config.lora_alpha * alpha_factor, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * alpha_factor for k, v in config.alpha_pattern.items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return write_adapter_dir(Path(out_dir), tensors, converted.to_peft_dict(), quantization=base_quantization(model),
                             model_type=model_type(model))
