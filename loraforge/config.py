"""Configuration: frozen dataclasses, validated when built, errors naming the field as the user types it.

`from_dict(cls, data, prefix)` is the one loader: it rejects unknown keys, coerces YAML/JSON values to the
annotated types, and collects every problem before raising, so a user fixes a config in one go.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loraforge.argtypes import FlagOverride, locale_problem, name_problem
from loraforge.utils.files import expand_user, missing_note

PEFT_TASK_TYPE = "CAUSAL_LM"
# adapter_config.json fields that PEFT writes and that do not change a LoRA adapter's math.
PEFT_INERT_FIELDS = {"peft_type", "task_type", "inference_mode", "revision", "library",
                     "auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
                     "ensure_weight_tying"}  # refused where it has an effect (adapters.peft_as_loaded)
# adapter_config.json fields of PEFT LoRA variants that change the math and that loraforge does not implement: an
# adapter that sets one is refused by name (loading it as plain LoRA would give other outputs).
PEFT_UNSUPPORTED_FIELDS = {
    "alora_invocation_tokens": "aLoRA (the adapter applies only after its invocation tokens)",
    "lora_bias": "a trained bias on lora_B",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated decoder layers",
    "target_parameters": "LoRA on nn.Parameter targets (e.g. MoE experts)",
    "use_qalora": "QALoRA (pooled adapter input)",
    "arrow_config": "Arrow routing over several LoRA experts",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA (an SVD-modified base weight)",
}
# PEFT's LoraConfig defaults that differ from ours: what a PEFT adapter_config.json without the field means (soak: a
# file without lora_alpha loaded at 16, PEFT's 8, so every update was doubled, unsaid).
PEFT_LORA_DEFAULTS = {"lora_alpha": 8}
# The largest rank accepted: far above any layer width that LoRA is used on; a bigger value is a typo.
MAX_RANK = 1 << 16
MAX_PISSA_NITER = 1000  # pissa_niter_N: PEFT's examples use 4-16; 1e14 ran for ever (two matmuls a layer each)
MAX_STEPS = 10**15  # training.max_steps: more than could ever run, and within a float (the progress bar's)
MAX_COLLECTIVE_TIMEOUT = 1e9  # seconds: datetime.timedelta, which the process group takes, overflows from ~8.6e13
FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the trainable weights' dtype
MAX_UNKNOWN_SHOWN = 20  # unknown fields named one by one in a section; the rest are counted
USUAL_SCALE = (1e-4, 1e3)  # lora_alpha / r (or / sqrt(r)) outside this is legal but almost surely a typo: warned about


class ConfigError(ValueError):
    """One or more invalid config fields; `problems` lists each as 'field: what is wrong (fix)'."""

    def __init__(self, problems: list[str], arguments: bool | None = None):
        """arguments: head the message `invalid arguments:` (a command's flags and arguments, not config fields);
        None: where every problem names a --flag."""
        self.problems = problems
        if arguments is None:
            arguments = bool(problems) and all(p.startswith("--") for p in problems)
        super().__init__(f"invalid {'arguments' if arguments else 'config'}:\n  " + "\n  ".join(problems))


def _check_type(value: Any, tp: Any, name: str, problems: list[str]) -> Any:
    """Coerce `value` to annotation `tp` (YAML gives lists for tuples, ints for floats); record a problem if it
    can't."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        trials = []
        for option in options:  # first option that accepts the value without a problem
            trial: list[str] = []
            out = _check_type(value, option, name, trial)
            if not trial:
                return out
            trials.append((option, trial))
        # a list or mapping meant for the one option of that shape: its own problems, by field
        shaped = [trial for option, trial in trials if _same_shape(value, option)]
        problems.extend(shaped[0] if len(shaped) == 1 else [f"{name}: expected {_type_name(tp)}, got {clipped(value)}"])
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{name}: {clipped(value)} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            problems.append(f"{name}: expected a list, got {clipped(value)}")
            return value
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_check_type(v, item_tp, f"{name}[{i}]", problems) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a mapping, got {clipped(value)}")
        return dict(value) if isinstance(value, dict) else value
    if tp is type(None):
        if value is not None:
            problems.append(f"{name}: expected null, got {clipped(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{name}: expected true or false, got {clipped(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name}: expected an integer, got {clipped(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name}: expected a number, got {clipped(value)}")
            return value
        try:
            return float(value)
        except OverflowError:  # an integer past float's range (~1.8e308), e.g. 1 followed by 400 zeros
            problems.append(f"{name}: {len(str(value))}-digit number is too large (a float ends near 1.8e308)")
            return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{name}: expected a string, got {clipped(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a mapping of {tp.__name__} fields, got {clipped(value)}")
            return value
        try:
            return from_dict(tp, value, prefix=name + ".")
        except ConfigError as e:
            problems.extend(e.problems)
            return None
    return value


def _same_shape(value: Any, tp: Any) -> bool:
    """A list for a tuple annotation, a mapping for a dataclass: the option a union's value was written for."""
    if isinstance(value, (list, tuple)):
        return typing.get_origin(tp) is tuple
    return isinstance(value, dict) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    """How a user writes values of this annotation: "true, false or 'auto'", "an integer or null", ..."""
    words = {bool: "true, false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        names = [_type_name(option) for option in typing.get_args(tp)]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if typing.get_origin(tp) is Literal:
        return ", ".join(repr(v) for v in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return words.get(tp, str(tp).replace("typing.", ""))


def digits_shown(n: int) -> str:
    """An integer in a message: as given, or its length where it is a wall of digits (10**400)."""
    return str(n) if len(str(n)) <= 30 else f"a number of {len(str(n))} digits"


def clipped(value: Any, limit: int = 100, *, as_json: bool = False) -> str:
    """`value` for a message, cut to `limit` characters with the full length said (a 5,000-character target_modules
    is not echoed back whole): a string's own length, not its form's with the quotes (a 300-character path was
    "(302 characters)"). One form per purpose: repr, as a config file's or the command line's value reads in
    Python; `as_json`, JSON (serve.errors.shown: what an HTTP client sent, not a Python repr), a value JSON has no
    form for as its repr, lone surrogates escaped (the answer must encode as UTF-8)."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr) if as_json else repr(value)
    except (ValueError, RecursionError):  # an int past Python's 4,300-digit str limit, a list nested too deep
        return f"<a {type(value).__name__} too large to show>"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    length = len(value) if isinstance(value, str) else len(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({length:,} characters)"


# Names users bring from transformers' TrainingArguments, PEFT and other trainers' configs, and the field they mean here
KNOWN_AS = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
            "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
            "gradient_accumulation_steps": "gradient_accumulation", "lr_scheduler_type": "schedule",
            "lr_scheduler": "schedule", "optim": "optimizer", "warmup": "warmup_steps",
            "max_length": "max_seq_len", "sequence_len": "max_seq_len", "max_seq_length": "max_seq_len",
            "rank": "r", "lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
            "target_layers": "target_modules", "model_name_or_path": "name", "base_model": "name"}


def _close_field(key: str, names: set[str]) -> list[str]:
    """The field a misspelt or borrowed key most likely means: the same letters without underscores, a close spelling
    of a field, or a close spelling of a name another trainer uses for it (`lerning_rate` -> learning_rate -> lr)."""
    close = [n for n in names if n.replace("_", "") == key.replace("_", "").lower()]
    if close:
        return close
    known = {alias: ours for alias, ours in KNOWN_AS.items() if ours in names}
    close = difflib.get_close_matches(key.lower(), sorted(names | known.keys()), n=1, cutoff=0.75)
    return [known.get(name, name) for name in close]


def from_dict(cls, data: dict, prefix: str = "", ignore_unknown: bool = False):
    """Build dataclass `cls` from a plain dict; every problem is collected, fields named `prefix + key`."""
    problems: list[str] = []
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs, rejected, unknown, listed = {}, set(), 0, False
    for key, value in data.items():
        if key not in names:
            if not ignore_unknown:
                unknown += 1
                if unknown > MAX_UNKNOWN_SHOWN:  # soak: 10,000 unknown keys made a 4.4 MB message
                    continue
                close = _close_field(str(key), names)
                # the known fields once per section: with its first unknown key that has no close spelling
                hint = (f" (did you mean {close[0]!r}?)" if close else
                        "" if listed else f" (known: {', '.join(sorted(names))})")
                listed = listed or not close
                problems.append(f"{prefix}{key}: unknown field{hint}")
            continue
        before = len(problems)
        checked = _check_type(value, hints[key], prefix + key, problems)
        if len(problems) == before:
            kwargs[key] = checked
        else:
            rejected.add(key)
    if unknown > MAX_UNKNOWN_SHOWN:
        problems.append(f"{prefix.rstrip('.') or 'top level'}: {unknown - MAX_UNKNOWN_SHOWN:,} more unknown fields, "
                        f"not named here ({unknown:,} in all)")
    try:
        obj = cls(**kwargs)  # the values that passed: their own checks (ranges, ...) report too
    except ConfigError as e:  # (not again about a field rejected above, whose default stood in for it)
        problems.extend(prefix + p for p in e.problems if re.match(r"\w*", p).group() not in rejected)
    except TypeError:  # a required field is missing because its value was rejected above
        if not problems:
            raise
    if problems:
        raise ConfigError(problems)
    return obj


def validate(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def integer_problems(config, fields: dict[str, str], optional: tuple[str, ...] = ()) -> list[str]:
    """Whole-number fields of a config built in Python (a YAML's values are checked by from_dict first): a float,
    string or bool is named with what the field takes (soak: LoraConfig(r=2.5) built rank-2 layers and saved
    r 2.5, which PEFT cannot load; r=True gave rank 1). Other integers (numpy's) become int. `fields`: name ->
    what it must be ("a positive integer"); `optional`: those that may be None. Checked before the ranges."""
    p = []
    for name, what in fields.items():
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            p.append(f"{name}: must be {what}, got {clipped(value)}")
        else:
            object.__setattr__(config, name, int(value))
    return p


def not_finite(name: str, value: float | None, example: str) -> list[str]:
    """A NaN or infinite number, which passes every `<= 0` test: the problem naming `name`, else none."""
    if value is None or math.isfinite(value):
        return []
    return [f"{name}: must be a finite number, got {value} (e.g. {example})"]


def to_dict(obj) -> dict:
    """Plain dict of a (nested) config dataclass, tuples as lists: JSON/YAML ready."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(obj)


def is_init_option(value) -> bool:
    """A valid init_lora_weights: true, false, gaussian, pissa, pissa_niter_N or olora (PEFT's spellings)."""
    return value in (True, False, "gaussian", "pissa", "olora") or (
        isinstance(value, str) and re.fullmatch(r"pissa_niter_\d+", value) is not None)


PEFT_INITS_OF_A_B = ("eva", "orthogonal", "mica")  # set the starting A and B only: the file holds the trained ones
PEFT_INITS_OF_W0 = ("corda", "loftq", "lora_ga")  # also change the base's weights, which PEFT redoes at every load


def too_many_iterations(digits: str) -> bool:
    """pissa_niter_N's N past MAX_PISSA_NITER (read by length first: int() refuses over 4,300 digits)."""
    digits = digits.lstrip("0")
    return len(digits) > len(str(MAX_PISSA_NITER)) or int(digits or 0) > MAX_PISSA_NITER


def peft_init(value, source: str):
    """The init_lora_weights a PEFT adapter file loads with. pissa and olora change W0 and run here as in PEFT;
    PEFT's recipes that only start A and B load as true; those that change W0 and unknown strings are refused (an
    unknown string PEFT refuses too; loading them as plain LoRA gave other outputs than PEFT's, unsaid)."""
    if not isinstance(value, str) or is_init_option(value):
        return value
    if value.lower() in ("olora", "gaussian", "mica"):  # PEFT compares these three case-insensitively
        value = value.lower()
    if is_init_option(value) or value in PEFT_INITS_OF_A_B:
        return value if is_init_option(value) else True
    if value.startswith(PEFT_INITS_OF_W0):
        raise ConfigError([f"{source}: init_lora_weights: {value!r} changes the base model's weights as the adapter "
                           f"loads, which loraforge does not implement; load it with PEFT, or save it from PEFT as a "
                           f"plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))"])
    raise ConfigError([f"{source}: init_lora_weights: {clipped(value)} is not an initialisation PEFT knows (it "
                       f"refuses to load it too); use true, or one of gaussian, pissa, olora, "
                       f"{', '.join(PEFT_INITS_OF_A_B + PEFT_INITS_OF_W0)}"])


def unsupported_peft_fields(data: dict, source: str) -> list[str]:
    """Problems for each set PEFT field that changes an adapter's math and that loraforge does not implement."""
    fields = PEFT_UNSUPPORTED_FIELDS  # (ensure_weight_tying depends on the model: adapters.peft_as_loaded)
    return [f"{source}: {key}: this adapter uses {what}, which loraforge does not implement (its outputs would "
            f"differ from PEFT's); load it with PEFT, or train an adapter without {key}"
            for key, what in fields.items() if data.get(key) not in (None, False, {}, [], "")]


def pattern_problems(name: str, pattern, integer: bool) -> list[str]:
    """rank_pattern / alpha_pattern: a mapping of regex keys to positive integers (ranks) or finite numbers
    (alphas: 0 or negative too, as PEFT reads them; training refuses those, TrainConfig)."""
    if not isinstance(pattern, dict):
        return [f"{name}: expected a mapping of module regex to value, e.g. {{'q_proj': 16}}, got {pattern!r}"]
    p = []
    for key, v in pattern.items():
        if v is None and isinstance(key, str) and re.fullmatch(r"[^:]+:[-+.\w]+", key):  # YAML's {q_proj:64}
            left, right = key.rsplit(":", 1)
            p.append(f"{name}: {{{key}}} reads as the key {key!r} with no value (YAML needs a space after the "
                     f"colon): write {{{left}: {right}}} (in quotes on a command line)")
            continue
        try:
            re.compile(key)
            re.compile(rf"(.*\.)?({key})$")  # how inject.pattern_matches uses it
        except (re.error, TypeError) as e:
            p.append(f"{name}.{key}: the key is not a valid regex ({e}); escape special characters, e.g. "
                     f"{re.escape(str(key))!r}")
        if integer and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_RANK):
            p.append(f"{name}.{key}: must be a positive integer (at most {MAX_RANK}), got {v!r}")
        elif not integer and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            p.append(f"{name}.{key}: must be a finite number, got {v!r}")
    return p


def module_list_problems(name: str, value) -> list[str]:
    """target_modules-like fields: a regex string must compile; a list must not be empty; no control character (a
    newline pasted into a YAML string: module names never hold one, so the field would match nothing)."""
    names = value if isinstance(value, tuple) else (value,) if isinstance(value, str) else ()
    if bad := next((n for n in names if isinstance(n, str) and any(ord(c) < 32 or ord(c) == 127 for c in n)), None):
        return [f"{name}: {clipped(bad)} holds a control character (a line break or tab?); module names never do, "
                f"so it would match no layer: remove it"]
    if isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as e:
            return [f"{name}: {clipped(value)} is not a valid regex ({e})"]
    if isinstance(value, tuple) and not value:
        other = "'all-linear'" if name == "target_modules" else "null"
        return [f"{name}: the list is empty; give module names, a regex or {other}"]
    return []


def index_list_problems(name: str, value) -> list[str]:
    """layers_to_transform built in Python: layer indices are integers (a YAML's are checked by from_dict)."""
    if value is None or (isinstance(value, tuple) and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in value)):
        return []
    return [f"{name}: must be a list of layer indices (integers), e.g. [0, 1], got {clipped(value)}"]


def layer_selection_problems(config) -> list[str]:
    """PEFT's rules for layers_to_transform / layers_pattern (LoraConfig.__post_init__ there)."""
    p = []
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        p.append("layers_to_transform: cannot be used when target_modules is a string (a regex or 'all-linear'); "
                 "give target_modules as a list of names, or select the layers in the regex")
    if isinstance(config.target_modules, str) and config.layers_pattern:
        p.append("layers_pattern: cannot be used when target_modules is a string; give target_modules as a list")
    return p  # (a layers_pattern without layers_to_transform, which PEFT refuses when built, selects nothing)


def normalize_module_fields(values: dict) -> None:
    """A PEFT adapter_config's module fields as our configs hold them, in place: an empty exclude_modules or
    layers_pattern means none (PEFT), and lists become tuples."""
    for key in ("exclude_modules", "layers_pattern"):
        if values.get(key) in ([], ""):
            del values[key]
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])


def peft_list(value):
    """A str-or-list config value as PEFT's JSON holds it."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter settings. Names and meanings as in Hugging Face PEFT's LoraConfig."""

    r: int = 8
    """Rank of the update ΔW = B·A (A: r×in, B: out×r). 8 is the usual start (Hu et al. 2021, §7.2). Above a
    targeted layer's min(in, out) a new adapter is warned about: its update cannot reach that rank."""
    lora_alpha: float = 16
    """Scale: ΔW is multiplied by lora_alpha / r (or lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input x (the base path is not dropped)."""
    target_modules: str | tuple[str, ...] | None = None
    """Which linear layers get adapters: a list of names (a module path equal to or ending in '.'+name), a
    regex that must match the whole module path, or "all-linear" (every linear layer but the output head).
    None: the attention projections of the architecture (q, k, v, o)."""
    exclude_modules: str | tuple[str, ...] | None = None
    """Layers that never get an adapter, even when target_modules names them: a regex that must match the whole
    module path, or a list of names (a module path equal to or ending in '.'+name), as in PEFT."""
    layers_to_transform: tuple[int, ...] | None = None
    """Only these decoder-layer indices get adapters (None: all); needs target_modules as a list (PEFT's rule). The
    index is the first number segment of the module path (model.layers.3.mlp -> 3), or the one after a
    `layers_pattern` name."""
    layers_pattern: str | tuple[str, ...] | None = None
    """With layers_to_transform: the name(s) of the module list whose index counts (e.g. 'layers', 'h', 'block')."""
    modules_to_save: tuple[str, ...] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head). As in PEFT, every module whose
    name ends with one of these is one: `norm` also takes each layer's `input_layernorm`."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, all biases of the model, or only those of adapted layers."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r) (Kalajdzievski 2023)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024): a trained magnitude per output row times the row-normalised
    W0 + ΔW. Costs a weight-norm per forward; merging is supported."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zeros (the adapter starts as a no-op). "gaussian": A ~ N(0, 1/r), B zeros.
    "pissa" (or "pissa_niter_N", randomized SVD with N iterations, N at most 1000): A, B from the top-r singular
    triplets of W0 and W0 replaced by the residual; "olora": A, B from a QR of W0, W0 replaced likewise. Both leave
    the model's output unchanged at start; see loraforge.lora.adapters.save_converted to use the adapter on the
    original base. False: both random (tests only)."""
    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out), like GPT-2's Conv1D. Detected automatically."""
    rank_pattern: dict = field(default_factory=dict)
    """Per-module r: {regex key: r}; the first key that matches (.*\\.)?key$ wins."""
    alpha_pattern: dict = field(default_factory=dict)
    """Per-module lora_alpha, like rank_pattern."""
    base_model_name_or_path: str | None = None
    """The base the adapter was trained on (informational, saved in adapter_config.json)."""

    def __post_init__(self):
        layers = self.layers_to_transform  # PEFT takes one index or a list (the Python API, not the YAML's checks)
        if isinstance(layers, int) and not isinstance(layers, bool):
            object.__setattr__(self, "layers_to_transform", (layers,))
        elif isinstance(layers, list):
            object.__setattr__(self, "layers_to_transform", tuple(layers))
        p = integer_problems(self, {"r": f"a positive integer (at most {MAX_RANK})"})
        if not p and not 0 < self.r <= MAX_RANK:
            p.append(f"r: must be a positive integer (at most {MAX_RANK}), got {self.r} (try 8)")
        p += index_list_problems("layers_to_transform", self.layers_to_transform)
        if not math.isfinite(self.lora_alpha):  # 0 or negative: PEFT saves and loads them (a negated adapter)
            p.append(f"lora_alpha: must be a finite number, got {self.lora_alpha} (try 2*r)")
        if not 0.0 <= self.lora_dropout < 1.0:
            p.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            p.append(f"bias: {self.bias!r} is not one of ['none', 'all', 'lora_only']")
        if not is_init_option(self.init_lora_weights):
            p.append(f"init_lora_weights: {self.init_lora_weights!r} is not one of [true, false, 'gaussian', "
                     f"'pissa', 'pissa_niter_N' (N an integer), 'olora']")
        elif isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith("pissa_niter_") \
                and too_many_iterations(self.init_lora_weights[len("pissa_niter_"):]):
            p.append(f"init_lora_weights: {clipped(self.init_lora_weights)} asks for more than {MAX_PISSA_NITER} "
                     f"subspace iterations of the randomized SVD, each two passes over every targeted weight (far "
                     f"more than it needs to converge); use pissa_niter_4 to pissa_niter_16 (PEFT's), or 'pissa' "
                     f"for the exact SVD they converge to")
        p += module_list_problems("target_modules", self.target_modules)
        p += module_list_problems("exclude_modules", self.exclude_modules)
        if "" in (self.modules_to_save or ()):  # soak: refused later as "modules_to_save takes all 120", no reason
            p.append("modules_to_save: '' ends every module's name (as in PEFT, each module whose name ends with an "
                     "entry is saved), so it would train the whole model in full and save it; give module names, "
                     "e.g. ['lm_head'], or leave modules_to_save out")
        p += layer_selection_problems(self)
        p += pattern_problems("rank_pattern", self.rank_pattern, integer=True)
        p += pattern_problems("alpha_pattern", self.alpha_pattern, integer=False)
        if not p:
            p += self._scale_problems()
        validate(p)

    def _scale_problems(self) -> list[str]:
        """An alpha whose scale (alpha / r, or / sqrt(r) with use_rslora; the smallest r of rank_pattern too) fp32
        cannot hold: every update in training, every output when loaded, inf or NaN (soak: a loaded adapter with
        lora_alpha 1e300 answered NaN without a word, and its exports held inf)."""
        r = min([self.r, *self.rank_pattern.values()])
        r, rule = (math.sqrt(r), "sqrt(r)") if self.use_rslora else (r, "r")
        alphas = {"lora_alpha": self.lora_alpha, **{f"alpha_pattern.{k}": v for k, v in self.alpha_pattern.items()}}
        return [f"{name}: {v} makes the scale lora_alpha / {rule} ({v / r:.3g}) overflow fp32, so every update and "
                f"every output of the adapter is inf (try 2*r)" for name, v in alphas.items() if abs(v) / r > FP32_MAX]

    # --- PEFT's adapter_config.json -------------------------------------------------------------------------
    def to_peft_dict(self) -> dict:
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": PEFT_TASK_TYPE,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": sorted(targets) if isinstance(targets, tuple) else targets,
            "exclude_modules": peft_list(self.exclude_modules),
            "layers_to_transform": list(self.layers_to_transform) if self.layers_to_transform else None,
            "layers_pattern": peft_list(self.layers_pattern),
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": self.init_lora_weights,
            "fan_in_fan_out": self.fan_in_fan_out,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, data: dict, source: str = "adapter_config.json") -> "LoraConfig":
        """Read PEFT's JSON: only peft_type is required; unknown keys (newer PEFT) are ignored with a warning,
        unless they change the math (PEFT_UNSUPPORTED_FIELDS): those are refused by name."""
        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            raise ConfigError([f"{source}: peft_type is {peft_type!r}; loraforge reads PEFT's 'LORA' and 'ADALORA' "
                               f"adapters"])
        validate(unsupported_peft_fields(data, source))
        # soak: lora_alpha null loaded at our default (16) without a word; PEFT cannot compute a scale from null
        validate([f"{source}: {key}: null is not a number (PEFT cannot load it either); write the value the adapter "
                  f"was trained with" for key in ("r", "lora_alpha") if key in data and data[key] is None])
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = set(data) - known - PEFT_INERT_FIELDS
        values = {**PEFT_LORA_DEFAULTS, **{k: v for k, v in data.items() if k in known and v is not None}}
        if ignored and any(data[k] not in (None, False, {}, [], "") for k in ignored):
            set_ignored = sorted(k for k in ignored if data[k] not in (None, False, {}, [], ""))
            warnings.warn(f"{source}: ignoring fields this version does not use: {set_ignored}", stacklevel=2)
        normalize_module_fields(values)
        values["init_lora_weights"] = peft_init(values.get("init_lora_weights", True), source)
        if isinstance(values.get("layers_to_transform"), int):
            values["layers_to_transform"] = [values["layers_to_transform"]]
        return from_dict(cls, values, prefix=f"{source}: ")


# --- training --------------------------------------------------------------------------------------------------
METHODS = ("lora", "qlora", "dora", "adalora", "full")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"
    """A transformers directory, a hub id, a .gguf file, or a built-in name (smollm2-135m)."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Storage dtype of the frozen base weights (and QLoRA's compute dtype). auto: the compute precision that
    training.precision resolves to (loraforge.precision). bf16/fp16 halve memory; adapters always train in fp32."""
    quantization: Literal["nf4", "fp4", "int8"] | None = None
    """Store the base's linear layers with bitsandbytes (QLoRA). method: qlora implies nf4."""


@dataclass(frozen=True)
class DataSource:
    """One dataset of a list in data.train or data.eval: {path, format, weight | epochs}."""

    path: str = ""
    """A .jsonl/.json/.csv/.parquet file, a .txt file (its whole text one text record), or a hub dataset name where
    a network exists."""
    format: Literal["auto", "instruction", "chat", "text"] | None = None
    """This source's record format (null: data.format)."""
    weight: float | None = None
    """Sampling share: each drawn example comes from this source with probability weight / (sum of weights).
    Give a weight to every source of the list or to none."""
    epochs: float | None = None
    """Passes over this source per pass over the mix (default 1; 0.5: a seeded half of it; 2: every example
    twice). For lists without weights."""

    def __post_init__(self):
        p = []
        if not self.path:
            p.append("path: missing (a dataset file or hub name)")
        if self.weight is not None and self.epochs is not None:
            p.append(f"weight: give weight ({self.weight:g}) or epochs ({self.epochs:g}), not both")
        p += not_finite("weight", self.weight, "1") + not_finite("epochs", self.epochs, "1")
        if self.weight is not None and self.weight <= 0:
            p.append(f"weight: must be positive, got {self.weight:g} (leave the source out to skip it)")
        if self.epochs is not None and self.epochs <= 0:
            p.append(f"epochs: must be positive, got {self.epochs:g} (leave the source out to skip it)")
        validate(p)


def records_problem(name: str, value) -> list[str]:
    """data.train / data.eval given the records themselves (a list of dicts without a path, built in Python): one
    line saying to write them to a file, not a problem per record and key (soak: 121 lines for 40 records)."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, dict) for v in value):
        return []
    fields = {f.name for f in dataclasses.fields(DataSource)}
    if any("path" in v for v in value) or all(set(v) <= fields for v in value):
        return []  # sources, each checked on its own
    keys = sorted({str(k) for v in value for k in v if k not in fields})
    shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    return [f"{name}: a list of {len(value)} record{'s' if len(value) != 1 else ''} ({shown}); it takes dataset "
            f"files: write the records to a .jsonl file (one JSON object per line) and give its path"]


@dataclass(frozen=True)
class DataConfig:
    train: str | tuple[DataSource | str, ...] = ""
    """Training data: a .jsonl/.json/.csv/.parquet file, a .txt file (its whole text one text record), or a hub
    dataset name where a network exists; or a list of sources, each a path or {path, format, weight | epochs}
    (loraforge.training.mixing draws from them)."""
    eval: str | tuple[DataSource | str, ...] | None = None
    """Held-out data (a path or a list of sources, used in full); when empty, `eval_fraction` of each training
    source is held out."""
    eval_fraction: float = 0.05
    """Share of `train` held out for evaluation when `eval` is not given (0 disables evaluation): of each source's
    records, or, for a source under 20 records whose texts were cut into windows (a .txt), of its windows."""
    format: Literal["auto", "instruction", "chat", "text"] = "auto"
    """instruction (instruction/input/output), chat (messages), text; auto detects from the first record."""
    max_seq_len: int = 512
    """Longest example in tokens; longer ones are handled per `overflow`."""
    overflow: Literal["auto", "truncate", "drop", "split"] = "auto"
    """What happens to examples longer than max_seq_len (counted and reported either way): truncate keeps their
    first max_seq_len tokens, drop leaves them out, split (text records only) cuts a text into windows of
    max_seq_len tokens, each window's first token the previous one's last, so every token is trained. auto: split
    for text records, truncate for instruction and chat records."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: only on the response)."""
    packing: bool | Literal["auto"] = "auto"
    """Pack the examples of a micro-batch into shared rows of max_seq_len (examples stay isolated). auto: pack when
    plain padded micro-batches would be at least 20% padding (below that, padded rows train faster than packed ones:
    bench/train.py measures both), counted net of the prefix their rows share where training.share_prefix computes
    it once (packed rows share none). Where the lean attention runs (training.attention auto on CPU, or lean) and
    max_seq_len is at most 512, a micro-batch's packed rows are then joined into rows of about 2,048 tokens, padded
    to a multiple of 16 only: no padding between them (bf16 on a CPU: 1.06x the speed of padded rows on packed text,
    1.22x on chat rows; bench/train.py's lf-padded). A model that does not keep packed examples apart (its attention
    mask ignores position_ids: OPT, BLOOM) is never packed: auto pads its rows, true is refused."""

    def __post_init__(self):
        validate(self._sources_given())
        p = []
        if not self.train:
            p.append("train: no training data given (a file path or hub dataset name)")
        weighted = [s.weight is not None for s in self.sources("train")]
        if any(weighted) and not all(weighted):
            unweighted = [i for i, w in enumerate(weighted) if not w]
            p.append(f"train[{unweighted[0]}].weight: missing; give a weight to every source or to none "
                     f"(sources {[i for i, w in enumerate(weighted) if w]} have one)")
        for i, source in enumerate(self.sources("eval")):
            for name in ("weight", "epochs"):
                if getattr(source, name) is not None:
                    p.append(f"eval[{i}].{name}: held-out sources are used in full; remove it")
        if not 0 <= self.eval_fraction < 1:
            p.append(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if bad := integer_problems(self, {"max_seq_len": "an integer (tokens, at least 8)"}):
            p += bad
        elif self.max_seq_len < 8:
            p.append(f"max_seq_len: must be at least 8, got {self.max_seq_len}")
        if self.overflow == "split":
            formats = [("format", self.format)] + [(f"{split}[{i}].format", s.format) for split in ("train", "eval")
                                                   for i, s in enumerate(self.sources(split))]
            for name, fmt in formats:
                if fmt in ("instruction", "chat"):
                    p.append(f"overflow: split cuts text records into windows; {name} is {fmt}, whose prompt must "
                             f"come before its answer: use overflow: truncate or drop, or format: text")
                    break
        validate(p)

    def _sources_given(self) -> list[str]:
        """train / eval built in Python: a list becomes a tuple, a mapping in it a DataSource (from_dict, as a
        YAML's); records given in place of files, or items of another kind, are refused by name."""
        p = []
        for split in ("train", "eval"):
            value = getattr(self, split)
            if not isinstance(value, (list, tuple)):
                continue
            if problem := records_problem(split, value):
                p += problem
                continue
            items = []
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    try:
                        item = from_dict(DataSource, item, prefix=f"{split}[{i}].")
                    except ConfigError as e:
                        p += e.problems
                elif not isinstance(item, (str, DataSource)):
                    p.append(f"{split}[{i}]: expected a path or a mapping of DataSource fields, got {clipped(item)}")
                items.append(item)
            object.__setattr__(self, split, tuple(items))
        return p

    def sources(self, split: Literal["train", "eval"] = "train") -> tuple[DataSource, ...]:
        """data.train or data.eval as a tuple of sources (a single path is one source; none: empty)."""
        given = getattr(self, split)
        if not given:
            return ()
        items = (given,) if isinstance(given, str) else given
        return tuple(DataSource(path=s) if isinstance(s, str) else s for s in items)

    def paths(self) -> list[str]:
        """Every data path of the run (train and eval), e.g. for the output-folder check."""
        return [s.path for split in ("train", "eval") for s in self.sources(split)]


@dataclass(frozen=True)
class TrainingConfig:
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup: to 0 (linear), along a half cosine to 0, or none."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps: step k (from 0) uses lr·(k+1)/(warmup_steps+1), so no update is
    spent at a learning rate of 0; the full lr from step warmup_steps on."""
    epochs: float = 1
    """Passes over the training data (ignored when max_steps is set); its steps at most max_steps' 1e15; with
    batch_tokens at most 1e6 epochs and 1e8 examples in all, since its steps are counted epoch by epoch first."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch per process."""
    batch_tokens: int | None = None
    """Instead of batch_size: fill each micro-batch with examples up to this many tokens."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step; the global batch is batch_size × this × processes."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the trainable parameters but biases and norms (0: none). lr × weight_decay
    (× loraplus_lr_ratio, lora_B's rate) must stay below 1: each step multiplies a weight by 1 − their product."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    """torch's AdamW (fused where the device allows), or bitsandbytes' 8-bit and paged AdamW (QLoRA's memory-spike
    guard; they need bitsandbytes and a device it supports) (loraforge.training.optim)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: learning rate of lora_B = lr × this ratio (e.g. 16); null: off. Not with method full (no lora_B)."""
    seed: int = 0
    """Seeds the adapter's initialisation, the data's shuffle and held-out split, and dropout: the same config and
    seed train the same adapter."""
    init_adapter: str | None = None
    """Start from this adapter directory (ours or PEFT's LoRA: rsLoRA, DoRA, rank/alpha patterns) instead of a fresh
    adapter; its adapter_config.json gives the lora: settings (a lora: field written with another value, even the
    default, is an error).
    Only the weights carry over: the optimizer starts fresh (loraforge.training.continual)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision of matmuls (autocast); trainable weights stay fp32 master weights. auto, from what the
    hardware reports (loraforge.precision): bf16 on GPUs with compute capability ≥ 8.0 and on CPUs with native
    bf16 (AVX-512 BF16 or AMX); fp16 with loss scaling (GradScaler; overflowing steps skipped and counted, and
    one that overflows with the loss scaled by 1 stops the run) on older GPUs (T4, V100); fp32 on CPUs without
    native bf16 (AVX2), where bf16 matmuls are emulated and run many times slower (README, "What runs where")."""
    gradient_checkpointing: bool | int | None = None
    """Recompute activations in the backward pass: less memory, more compute. true: every decoder layer; an
    integer N: only N decoder layers, evenly spread (a point between speed and memory; N above the model's layer
    count: all of them, with a warning); null: on for a quantized (QLoRA) base, off otherwise. Trades speed for
    memory: bench/train.py measures both."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk."""
    keep_best: bool = True
    """Also keep, beside the keep_checkpoints newest, the checkpoint of the lowest held-out loss: a checkpoint of a
    step that was evaluated (eval_every a multiple of save_every, or the last step) records its eval loss, and the
    run's last line names the best one (a run whose eval loss rose at the end keeps where it was lowest), and a lower
    one that fell on a step without a checkpoint, which it could not keep. A run that holds no data out (no data.eval,
    data.eval_fraction 0) evaluates nothing, so it keeps nothing more: a config that writes keep_best: true there is
    warned (the default says nothing)."""
    log_every: int = 1
    """Write a metrics.jsonl row (and the tracker's point) every N optimizer steps; the last step, and a step the
    fp16 loss scaler skipped, are always written."""
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"
    """Also send every logged metric (loss, learning rate, grad norm, tokens/s, eval loss, AdaLoRA's rank budget) to
    TensorBoard (<output_dir>/tensorboard), Weights & Biases or MLflow, as transformers' Trainer names them;
    metrics.jsonl and the loss plot are written either way. Each needs its optional extra, e.g.
    pip install 'loraforge[tensorboard]' (loraforge.training.trackers)."""
    attention: Literal["auto", "sdpa", "eager", "lean"] = "auto"
    """The attention kernel while training. auto: lean on CPU, SDPA otherwise. lean: loraforge.kernels.attention,
    eager attention's math keeping q, k, v (keys and values not repeated per query head) and, for unpacked rows up
    to 256 positions, the probabilities in the compute dtype; longer rows recompute them in the backward; packed
    rows sequence by sequence (a sequence over 256 positions with its queries in blocks of 128, each against the
    keys up to the block's end: the scores above the diagonal skipped), recomputing too; rows over 512 tokens go
    to SDPA unless packed of sequences up to 512. PyTorch's CPU flash-attention backward is slow on short rows
    (bench/train.py compares them); on long rows the T² scores of eager and lean cost memory."""
    compile: bool = False
    """torch.compile the model and loss (inductor). Lean attention runs eagerly, outside the compiled graph; the
    loss shares no prompt prefix.
    On CPU it did not pay (0.44-0.96x of the eager step's speed in bench/train.py; README, performance); worth
    trying on GPUs and long runs."""
    fused_blocks: bool = True
    """Run RMSNorm and the SwiGLU MLP of Llama-family models as loraforge.kernels nodes
    (loraforge.training.fastpath): the same math, keeping less for the backward (RMSNorm no fp32 copy of its input;
    the MLP only its gate and up projections' outputs, recomputing the rest). Other architectures keep their modules."""
    fused_lora: bool = True
    """Run plain LoRA layers (no dropout, not DoRA, unquantized base) as one autograd node (loraforge.kernels):
    the same math, saving only x and A·x for the backward (faster and leaner than the plain path: bench/train.py)."""
    activation_buffer: bool | Literal["auto"] = "auto"
    """CPU: copy the activations a step keeps for its backward into a buffer that lives for the whole run
    (loraforge.training.slab), so that glibc's heap holds the step's temporaries only. The same loss and gradients
    bit for bit. true: also hand the heap's free pages back to the system every 256 MiB of activations: the lowest
    peak (packed 512-token rows of the built-in model: fp32 0.41x PEFT's against 0.59x, bf16 0.39x against 0.47x) at
    8-10% less speed (bench/train.py's lf-buffer), without training.reuse_memory. auto: the copies alone where
    training.reuse_memory keeps the heap for the run (packed rows): the same speed at a lower peak (fp32 0.79x, bf16
    0.93x of the peak without; lf-nobuffer); elsewhere off. docs/PERFORMANCE.md, "Memory on CPU". Not on GPUs, under
    FSDP or training.compile (a true there is off, and the run says so in one line); under jemalloc (which reuses
    its holes itself) true only copies."""
    reuse_memory: bool | Literal["auto"] = "auto"
    """CPU on glibc: for the run, large blocks come from the C library's heap and the heap is not trimmed, so the
    memory a step frees is reused by the next step instead of being handed back to the system and faulted in again
    (loraforge.utils.allocator.reuse_freed_memory). The same math. auto: when the run packs its rows (every step's
    tensors the same sizes): on 4 packed 512-token rows of the built-in model bf16 ran 1.16x as fast at the same
    peak, fp32 1.02x; rows of varying width gained nothing (docs/PERFORMANCE.md, "Memory on CPU"; bench/train.py's
    lf-noreuse). Handed back when the run ends. Not under FSDP, with training.activation_buffer=true, on GPUs or
    another allocator (a true there is off, and the run says so in one line)."""
    share_prefix: bool | Literal["auto"] = "auto"
    """Compute the prefix that every row of a padded micro-batch shares once, the rows attending to its keys and
    values (loraforge.training.loss; e.g. a chat template's system prompt and user header). The same loss and
    gradients in fewer FLOPs; skipped where it would change the math (dropout), for packed rows and under
    torch.compile. auto: on CPU, where a step is bound by its FLOPs; elsewhere off, as its second pass adds kernel
    launches that a small GPU step is bound by (bench/train.py's lf and lf-noprefix variants compare them)."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: weights, gradients and optimizer
    state split across the processes; for a base too big for one device). auto: fsdp when the base's weights take
    more than half of one process's memory, ddp otherwise (loraforge.training.distributed)."""
    collective_timeout: float = 600.0
    """Seconds a process waits in a collective (all-reduce, all-gather) before it fails: a crashed or hung peer
    stops the others with an error instead of a hang."""

    def __post_init__(self):
        validate(integer_problems(self, {
            **{name: "an integer" for name in ("warmup_steps", "max_steps", "batch_tokens", "eval_every",
                                                  "save_every")},
            **{name: "a positive integer" for name in ("batch_size", "gradient_accumulation", "keep_checkpoints",
                                                        "log_every")},
            "seed": "a whole number from 0 to 2**64 - 1"}, optional=("max_steps", "batch_tokens")))
        p = []
        for name, example in (("lr", "2e-4"), ("epochs", "1"), ("weight_decay", "0.01"), ("max_grad_norm", "1.0"),
                              ("loraplus_lr_ratio", "16"), ("collective_timeout", "600")):
            p += not_finite(name, getattr(self, name), example)
        if self.lr <= 0:
            p.append(f"lr: must be positive, got {self.lr}")
        for name in ("batch_size", "gradient_accumulation", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.batch_tokens is not None and self.batch_tokens < 8:
            p.append(f"batch_tokens: must be at least 8, got {self.batch_tokens}")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"max_steps: must be at least 1, got {self.max_steps}")
        elif self.max_steps is not None and self.max_steps > MAX_STEPS:  # soak: 10**400 crashed the progress bar
            p.append(f"max_steps: at most {MAX_STEPS:.0e} (at a step a microsecond, 30 years), got "
                     f"{digits_shown(self.max_steps)}")
        if self.max_steps is None and self.epochs <= 0:
            p.append(f"epochs: must be positive, got {self.epochs} (or set max_steps)")
        elif self.max_steps is None and self.epochs > MAX_STEPS:  # soak: 1e300 ran a 301-digit step count
            p.append(f"epochs: at most {MAX_STEPS:.0e} (every epoch is at least one step; max_steps' bound), got "
                     f"{self.epochs:g} (e.g. 3, or set max_steps)")
        if self.warmup_steps < 0:
            p.append(f"warmup_steps: must be ≥ 0, got {self.warmup_steps}")
        elif self.max_steps is not None and self.warmup_steps >= self.max_steps > 0:
            # step k (from 0) runs at lr·(k+1)/(warmup_steps+1) below warmup_steps: the last, max_steps - 1, reaches
            # the peak only if warmup_steps <= max_steps - 1
            p.append(f"warmup_steps: {self.warmup_steps} is not less than max_steps ({self.max_steps}), so the "
                     f"learning rate would still be rising when training stops; use at most {self.max_steps - 1} "
                     f"(typically 3-10% of the steps, e.g. {min(self.max_steps - 1, max(1, self.max_steps // 20))})")
        if self.weight_decay < 0:
            p.append(f"weight_decay: must be ≥ 0, got {self.weight_decay} (0 for none; e.g. 0.01)")
        ratio = self.loraplus_lr_ratio if self.loraplus_lr_ratio and self.loraplus_lr_ratio > 1 else 1
        fastest = self.lr * ratio  # the largest rate a decayed weight trains at (lora_B's under LoRA+)
        if math.isfinite(fastest * self.weight_decay) and fastest * self.weight_decay >= 1:
            rate = f"lr × loraplus_lr_ratio = {fastest:g}" if ratio > 1 else f"lr {fastest:g}"
            p.append(f"weight_decay: {self.weight_decay:g} at {rate} is too large: AdamW multiplies each decayed "
                     f"weight by 1 − rate × weight_decay = {1 - fastest * self.weight_decay:g} every step, so each "
                     f"step would zero the weights or flip their sign; use a weight_decay below {1 / fastest:g} "
                     f"(typically 0 to 0.1)")
        if not 0 <= self.seed < 2 ** 64:  # torch.manual_seed's range
            p.append(f"seed: must be a whole number from 0 to 2**64 - 1, got {self.seed}")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            p.append(f"loraplus_lr_ratio: must be positive or null (off), got {self.loraplus_lr_ratio}: lora_B "
                     f"trains at lr × this ratio, so 0 freezes it and a negative value ascends the loss (e.g. 16)")
        ckpt = self.gradient_checkpointing
        if isinstance(ckpt, int) and not isinstance(ckpt, bool) and ckpt < 0:
            p.append(f"gradient_checkpointing: a number of layers must be ≥ 0, got {ckpt} (or use true/false)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            p.append(f"max_grad_norm: must be positive or null, got {self.max_grad_norm}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                p.append(f"{name}: must be ≥ 0, got {getattr(self, name)}")
        if self.collective_timeout <= 0 or self.collective_timeout > MAX_COLLECTIVE_TIMEOUT:  # nan: named above
            p.append(f"collective_timeout: must be positive (seconds) and at most {MAX_COLLECTIVE_TIMEOUT:.0e} (31 "
                     f"years), got {self.collective_timeout}")
        validate(p)


@dataclass(frozen=True)
class TrainConfig:
    """A whole fine-tuning run, as written in YAML: model, method, lora, data, training, output_dir."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Literal["lora", "qlora", "dora", "adalora", "full"] = "lora"
    """lora; qlora (4-bit NF4 base); dora (use_dora); adalora (adaptive ranks); full (every weight trains)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    adalora: dict = field(default_factory=dict)
    """AdaLoRA settings (init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight) for method: adalora."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output_dir: str = "runs/latest"

    def __post_init__(self):
        self._check_fields()
        if isinstance(self.output_dir, str) and self.output_dir.startswith("~"):  # soak: a folder named ~ was made
            object.__setattr__(self, "output_dir", str(expand_user(self.output_dir)))
        if isinstance(self.output_dir, str) and "$" in self.output_dir:
            validate([f"output_dir: {clipped(self.output_dir)} holds a '$': a config expands ~ but no environment "
                      f"variable; write the path itself"])
        # soak: '' passed and was refused later as '.' (a folder without config.json; output_dir . holds the data)
        validate([f"{name}: {value!r} names no {what} ('' reads as the current folder, '.'); give {fix}"
                  for name, value, what, fix in [
                      ("model.name", self.model.name, "model",
                       "a transformers directory, a hub id, a .gguf file or a built-in name, e.g. smollm2-135m"),
                      ("output_dir", self.output_dir, "folder", "a folder path, e.g. runs/latest")]
                  if value == ""])
        paths = [("output_dir", self.output_dir), ("model.name", self.model.name),
                 ("training.init_adapter", self.training.init_adapter), *(("data", p) for p in self.data.paths())]
        validate([f"{name}: {clipped(value)}: {problem}" for name, value in paths
                  if isinstance(value, str) and (problem := locale_problem(value))])
        validate(adalora_lora_problems(self.lora) if self.method == "adalora" else [])
        if self.method == "adalora":  # adalora.lora_alpha, where set, replaces lora.lora_alpha
            name = "adalora.lora_alpha" if "lora_alpha" in self.adalora else "lora.lora_alpha"
            alpha = self.adalora.get("lora_alpha", self.lora.lora_alpha)
            init_r = f" ({self.adalora['init_r']})" if "init_r" in self.adalora else ""
            if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and not alpha > 0:
                validate([f"{name}: must be positive to train with method: adalora, got {alpha} (PEFT reads 0 or less "
                          f"as the layer's rank: init_r while training, but the kept rank once the pruned adapter is "
                          f"saved and loaded, so the adapter saved would not be the model trained); set {name} to "
                          f"adalora.init_r{init_r} for the same scale"])
        elif self.method != "full":  # a file may hold a negated adapter; a run that trains one learns nothing new
            alphas = {"lora.lora_alpha": self.lora.lora_alpha,
                      **{f"lora.alpha_pattern.{k}": v for k, v in self.lora.alpha_pattern.items()}}
            validate([f"{name}: must be positive to train, got {v} (try 2*r; 0 trains nothing, a negative alpha "
                      f"only flips the sign B learns)" for name, v in alphas.items() if not v > 0])
        if self.method == "full" and self.model.quantization:  # bitsandbytes' traceback: "only Tensors of floating…"
            validate([f"model.quantization: {self.model.quantization} stores the base in a few bits, which method: "
                      f"full cannot train (every weight trains); remove model.quantization, or train an adapter on "
                      f"the quantized base (method: qlora or lora)"])
        ratio = self.training.loraplus_lr_ratio
        if self.method == "full" and ratio is not None:  # soak: the norms and biases trained at lr × ratio instead
            validate([f"training.loraplus_lr_ratio: {ratio:g} is LoRA+ (lora_B trains at lr × this ratio), but method: "
                      f"full has no adapter and no lora_B: its norms and biases would train at {ratio:g} × "
                      f"training.lr and every other weight at training.lr; remove training.loraplus_lr_ratio, or use "
                      f"method: lora"])
        init = self.lora.init_lora_weights
        if self.quantization and isinstance(init, str) and init.startswith(("pissa", "olora")):
            validate([f"lora.init_lora_weights: {init} starts from the base's own weights, which the "
                      f"{self.quantization} base (method {self.method}) holds quantized; use the default init (true), "
                      f"or train without quantization"])

    def _check_fields(self) -> None:
        """A TrainConfig built in Python (load_train_config checks a YAML's types before it gets here): a section
        given as a mapping becomes its dataclass (from_dict, its fields checked as a YAML's are), and a method or
        section of another kind is refused by name (soak: method="qlora2" trained plain LoRA without a word, and
        model={...} died later of AttributeError)."""
        p = []
        for name, cls in (("data", DataConfig), ("model", ModelConfig), ("lora", LoraConfig),
                          ("training", TrainingConfig)):
            value = getattr(self, name)
            if isinstance(value, dict) and name == "data" and (records := records_problem("data.train", value.get(
                    "train")) + records_problem("data.eval", value.get("eval"))):
                p += records
            elif isinstance(value, dict):
                try:
                    object.__setattr__(self, name, from_dict(cls, value, prefix=f"{name}."))
                except ConfigError as e:
                    p += e.problems
            elif not isinstance(value, cls):
                p.append(f"{name}: expected a {cls.__name__} or a mapping of its fields, got {clipped(value)}")
        if self.method not in METHODS:
            p.append(f"method: {clipped(self.method)} is not one of {list(METHODS)}")
        if not isinstance(self.adalora, dict):
            p.append(f"adalora: expected a mapping of AdaLoRA settings (e.g. {{'init_r': 12}}), got "
                     f"{clipped(self.adalora)}")
        if isinstance(self.output_dir, os.PathLike):
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        if not isinstance(self.output_dir, str):
            p.append(f"output_dir: expected a folder path, got {clipped(self.output_dir)}")
        validate(p)

    @property
    def quantization(self) -> str | None:
        """How the frozen base is stored: model.quantization, else nf4 for method qlora, else None (unquantized)."""
        return self.model.quantization or ("nf4" if self.method == "qlora" else None)


def scale_warning(lora_alpha: float, r: int, use_rslora: bool = False, rank: str = "r") -> None:
    """Warn about a new adapter's legal lora_alpha whose scale (lora_alpha / r, or / sqrt(r) with use_rslora; AdaLoRA:
    / init_r, named by `rank`) is far outside USUAL_SCALE: with lora_alpha 1e6 a run trained without a word, each
    update a million times too large. Called where adapters are made (inject, inject_adalora), so a run and a
    Python caller are told once; the warning points at the caller of that function (stacklevel 3)."""
    root, rule = (math.sqrt(r), f"sqrt({rank})") if use_rslora else (r, rank)
    scale = lora_alpha / root
    low, high = USUAL_SCALE
    if low <= abs(scale) <= high:  # a negative alpha (a negated adapter) is as usual as its size
        return
    effect = "updates that large usually diverge" if abs(scale) > high else "updates that small barely train"
    warnings.warn(f"lora_alpha: {lora_alpha:g} makes the adapter's scale lora_alpha / {rule} = {lora_alpha:g} / "
                  f"{root:g} = {scale:.3g}, outside the usual {low:g} to {high:g} (most runs use 1 to 2); {effect}: "
                  f"try lora_alpha {round(2 * root)} (2*{rule})", stacklevel=3)


class DuplicateKey(Exception):
    """A key written twice in one YAML mapping, which PyYAML would read as the last one alone."""

    def __init__(self, key, line: int, first: int):
        super().__init__(f"{key} is written twice (first on line {first}); YAML keeps only the last, so the first "
                         f"one's settings would be dropped without a word: write it once")
        self.line = line


def read_yaml(text: str | bytes):
    """`text` read by yaml_loader(): with libyaml's parser where PyYAML has it (the pure-Python one took nearly all
    of a large config's load time; see the README). A document libyaml refuses is read again by the pure-Python
    parser, whose errors are the ones the messages use (the line shown, a tab named; a nesting past libyaml's 1,000
    levels, which it refuses, reads as before)."""
    try:
        return yaml.load(text, Loader=yaml_loader())
    except yaml.YAMLError:
        if not yaml.__with_libyaml__:
            raise
        return yaml.load(text, Loader=yaml_loader(libyaml=False))


@functools.cache
def yaml_loader(libyaml: bool = True):
    """yaml.SafeLoader (yaml.CSafeLoader: the same constructors over libyaml's parser, where PyYAML has it and
    `libyaml`) that refuses a key written twice in one mapping (DuplicateKey)."""
    base = yaml.CSafeLoader if libyaml and yaml.__with_libyaml__ else yaml.SafeLoader

    class UniqueKeyLoader(base):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may appear more than once
                        continue
                    key = self.construct_object(key_node, deep=True)
                    if not isinstance(key, typing.Hashable):
                        continue  # SafeLoader's own error names it
                    if key in first:
                        raise DuplicateKey(key, key_node.start_mark.line + 1, first[key])
                    first[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

        def construct_yaml_int(self, node):
            """YAML 1.2's integers (soak: YAML 1.1 read r: 010 as 8, and r: 1:30 as 90, without a word)."""
            text = self.construct_scalar(node).replace("_", "")
            if ":" in text:
                return self.construct_scalar(node)  # YAML 1.1's base 60: a string, as YAML 1.2 reads it
            if re.fullmatch(r"[-+]?0[0-7]+", text):
                return int(text, 10)  # YAML 1.1's octal: 010 is ten in YAML 1.2, as people read it
            return super().construct_yaml_int(node)

    UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)
    return UniqueKeyLoader


MAX_CONFIG_VALUES = 1_000_000


def expanded_size(value, memo: dict | None = None) -> int:
    """How many values `value` holds as a reader walks it: an object YAML aliases n times counts n times (counted
    once per object, so an alias bomb is measured without being expanded); a self-reference counts once."""
    memo = {} if memo is None else memo
    if id(value) in memo:
        return memo[id(value)]
    memo[id(value)] = 1
    children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    memo[id(value)] = size = 1 + sum(expanded_size(child, memo) for child in children)
    return size


def _refuse_alias_bomb(value, where: str) -> None:
    """Soak: nine nested aliases (a "billion laughs") reaching a checked field hung `train` in the first message's
    repr, or died of MemoryError."""
    try:
        n = expanded_size(value)
    except RecursionError:
        n = MAX_CONFIG_VALUES + 1
    if n > MAX_CONFIG_VALUES:
        raise ConfigError([f"{where}: its YAML aliases expand to {n:,} values (more than {MAX_CONFIG_VALUES:,}: "
                           f"aliases nested inside aliases?); write the values out, or nest fewer aliases"])


def load_train_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Read a YAML config, apply `key.sub=value` overrides (values parsed as YAML), validate everything."""
    data: dict = dict(base or {})
    if path is not None:
        if Path(path).is_dir():  # every command that reads a run's YAML (train, forgetting, ...)
            raise ConfigError([f"{path}: is a directory; give the training YAML file in it, e.g. "
                               f"{Path(path) / 'config.yaml'}"])
        if not Path(path).exists():
            raise ConfigError([f"{path}: no such config file{missing_note(path)}; give the path of a training YAML "
                               f"file"])
        # read once: a pipe is a config too (`train <(sed ... base.yaml)`, `... | train /dev/stdin`), and was "no such
        # config file" (not a regular file)
        raw = Path(path).read_bytes()
        try:  # bytes: PyYAML reads UTF-8 and, by their byte-order mark, UTF-16 files (Windows editors write them)
            loaded = read_yaml(raw) or {}
        except DuplicateKey as e:
            raise ConfigError([f"{path}:{e.line}: {e}"]) from None
        except yaml.reader.ReaderError as e:  # a byte that is not UTF-8, e.g. a Latin-1 "café" in a comment
            line = raw.count(b"\n", 0, e.position) + 1
            raise ConfigError([f"{path}:{line}: byte 0x{e.character:02x} is not UTF-8; save the file as UTF-8 "
                               f"(iconv -f latin1 -t utf-8 {path} > fixed.yaml)"]) from None
        except yaml.YAMLError as e:
            tabs = " (indent with spaces: YAML does not allow tabs there)" if "'\\t'" in str(e) else ""
            raise ConfigError([f"{path}: not valid YAML{tabs}: {str(e).replace('<byte string>', path)}"]) from None
        except ValueError as e:  # PyYAML converts an integer of more than 4,300 digits with int(): Python refuses
            raise ConfigError([f"{path}: a number in it is too long to read ({e})"]) from None
        except RecursionError:  # PyYAML composes a node per [ or { level, recursively: ~1,000 levels reach the limit
            raise ConfigError([f"{path}: a value in it is nested too deeply to read (hundreds of [ or {{ levels); "
                               f"write it with fewer levels of brackets"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections (model, lora, data, training)"])
        _refuse_alias_bomb(loaded, path)
        data = _deep_merge(data, loaded)
    for line in duplicate_overrides(overrides):
        warnings.warn(line, stacklevel=2)
    empty = []  # fields given an empty value that takes no null: named once the config's other problems are known
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()  # soak: 'lora.r = 8' was "lora.r : unknown field"
        if not sep or not key or "" in key.split("."):
            raise ConfigError([f"override {item!r}: write it as section.field=value, e.g. training.lr=1e-4"])
        if not value.strip() and (problem := empty_value_problem(key)) is not None:
            empty.append(problem)  # soak: lora.r= was "expected an integer, got None"
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {part} is not a section"])
        if (problem := name_problem(value)) is not None:  # YAML's "unacceptable character #xdce9" named no fix
            raise ConfigError([f"override {key}: {problem}"])
        try:
            parsed = read_yaml(value)
            if not parents and isinstance(parsed, dict) and isinstance(node.get(leaf), dict):
                parsed = {**node[leaf], **parsed}  # lora={r: 2} sets r: the file's and earlier lora fields stay
            node[leaf] = parsed
        except DuplicateKey as e:
            raise ConfigError([f"override {item!r}: {e}"]) from None
        except yaml.constructor.ConstructorError as e:  # a tag: !!python/object:..., !!binary of bad base64
            problem = str(e).splitlines()[0]
            raise ConfigError([f"override {item!r}: the value's YAML tag cannot be read ({problem}); write a plain "
                               f"number, string, list or mapping, or quote a string that starts with !"]) from None
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ConfigError([f"override {item!r}: the value is not valid YAML ({problem}); close every [ and {{ "
                               f"(e.g. {key}=[a, b] or {key}={{k: v}}), or quote a string that holds them"]) from None
        except ValueError:  # an integer of more than 4,300 digits (Python's int() limit)
            raise ConfigError([f"override {key}={value[:20]}...: a {len(value)}-character number is too long to "
                               f"read"]) from None
        except RecursionError:  # PyYAML composes a node per [ or { level, recursively: ~1,000 levels reach the limit
            raise ConfigError([f"override {key}={value[:20]}...: the value is nested too deeply to read (hundreds "
                               f"of [ or {{ levels); write it with fewer levels of brackets"]) from None
        _refuse_alias_bomb(node[leaf], f"override {key}")
    if "data" not in data:
        raise ConfigError(empty if any(p.startswith("data.") for p in empty) else
                          [*empty, "data: missing; give at least data.train (a dataset file)"])
    section = data["data"] if isinstance(data["data"], dict) else {}
    validate(records_problem("data.train", section.get("train")) + records_problem("data.eval", section.get("eval")))
    problems = empty + method_problems(data)
    try:
        cfg = from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(problems[:len(empty)] + [_section_hint(p) for p in e.problems] + problems[len(empty):]) \
            from None
    validate(problems)
    lora, training = data.get("lora"), data.get("training")
    typed = {item.partition("=")[0].strip() for item in overrides}
    if isinstance(training, dict) and "batch_size" in training and cfg.training.batch_tokens is not None:
        # soak (docs): "remove one of the two" could not be followed where the file sets batch_size and the command
        # line batch_tokens (training.batch_size=null is refused): that override says what it means, no warning
        if "training.batch_size" in typed and "training.batch_tokens" not in typed:
            fix = "add training.batch_tokens=null to batch by training.batch_size"
        elif "training.batch_tokens" not in typed or "training.batch_size" in typed:
            fix = "remove one of the two"
        else:
            fix = None
        if fix is not None:
            warnings.warn(f"training.batch_size {cfg.training.batch_size} is not used: training.batch_tokens "
                          f"{cfg.training.batch_tokens} fills each micro-batch with examples up to that many tokens "
                          f"({fix})", stacklevel=2)
    if isinstance(training, dict) and "keep_best" in training and (said := keep_best_unused(cfg)):
        warnings.warn(said, stacklevel=2)  # written (the default is on either way): the user expects a best kept
    object.__setattr__(cfg, "_lora_written", frozenset(lora) if isinstance(lora, dict) else frozenset())
    return cfg


def keep_best_unused(cfg: TrainConfig) -> str | None:
    """Why training.keep_best: true can keep nothing of its own, where the run holds no data out (no data.eval,
    data.eval_fraction 0): nothing is evaluated, so no checkpoint records a held-out loss. A warning, for a config
    that writes keep_best (load_train_config: the default is on, and says nothing): the run trains and keeps its
    checkpoints as it would, so refusing it would stop a template that spells out every default, or a sweep that
    sets data.eval_fraction=0 over a config that writes keep_best, for a field that changes nothing here."""
    if not cfg.training.keep_best or cfg.data.eval or cfg.data.eval_fraction:
        return None
    return ("training.keep_best: true keeps the checkpoint of the lowest held-out loss, but this run holds no data "
            "out (no data.eval, and data.eval_fraction is 0): nothing is evaluated, so it keeps only the "
            f"training.keep_checkpoints ({cfg.training.keep_checkpoints}) newest; give data.eval (or "
            "data.eval_fraction above 0, e.g. 0.05), or remove training.keep_best")


def duplicate_overrides(overrides: list[str]) -> list[str]:
    """Each key given more than once on the command line: a line naming its values and the one used (soak:
    `lora.r=2 lora.r=3` trained rank 3, unsaid). The last is used, not refused: override lists are composed (a
    script's or alias's fixed keys, then the user's; --max-steps and --quantize are appended as overrides, each a
    FlagOverride named as typed: `--max-steps 5`, not a second training.max_steps=5)."""
    given: dict[str, list[str]] = {}
    flag_last: dict[str, bool] = {}  # whether the value used (the last) came from a flag
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip():
            key, value = key.strip(), value.strip()
            shown = value if len(value) <= 40 else value[:40] + "..."
            given.setdefault(key, []).append(item.typed if isinstance(item, FlagOverride) else f"{key}={shown}")
            flag_last[key] = isinstance(item, FlagOverride)
    times = {2: "twice"}
    return [f"{key} given {times.get(len(shown), f'{len(shown)} times')} on the command line ({', '.join(shown)}): "
            f"the {'flag' if flag_last[key] else 'last'}, {shown[-1]}, is used"
            for key, shown in given.items() if len(shown) > 1]


def empty_value_problem(key: str) -> str | None:
    """`lora.r=` (nothing after the =) for a field that takes no null: the problem naming the empty value and what to
    give; None where the key is no field (from_dict names it) or the field takes null (an empty value is null)."""
    cls, tp, default = TrainConfig, None, None
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return None
        tp, default = typing.get_type_hints(cls)[part], fields[part].default
        cls = tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        return None
    what = {bool: "true or false", dict: "a mapping"}.get(tp) or (
        f"one of {_type_name(tp)}" if typing.get_origin(tp) is Literal else _type_name(tp))
    example = ""
    if isinstance(default, (bool, int, float, str)) and default != "":
        shown = str(default).lower() if isinstance(default, bool) else default
        example = f", e.g. {key}={shown}"
    return f"{key}: empty value; give {what}{example}"


def _section_hint(problem: str) -> str:
    """An unknown field that another section of a run has (training.r for lora.r): the problem points there."""
    found = re.match(r"(?:(\w+)\.)?(\w+): unknown field", problem)
    if not found:
        return problem
    section, key = found.groups()
    homes = [name for name, tp in typing.get_type_hints(TrainConfig).items() if name != section
             and dataclasses.is_dataclass(tp) and key in {f.name for f in dataclasses.fields(tp) if f.init}]
    if not homes:
        return problem
    written = f"{section}.{key}" if section else key
    return f"{written}: unknown field; {key} belongs in the {homes[0]}: section (write {homes[0]}.{key})"


def replace_run(cfg: TrainConfig, **changes) -> TrainConfig:
    """dataclasses.replace for a run's config that keeps lora_written (which lora: fields the user wrote)."""
    new = dataclasses.replace(cfg, **changes)
    if (written := lora_written(cfg)) is not None:
        object.__setattr__(new, "_lora_written", written)
    return new


def lora_written(cfg: TrainConfig) -> frozenset[str] | None:
    """The lora: fields the user wrote (in the YAML or as lora.* overrides), whatever their values, for a config
    load_train_config read; None for one built in code or by dataclasses.replace, where a field set to its default
    cannot be told from one left out."""
    return getattr(cfg, "_lora_written", None)


def adalora_lora_problems(lora: LoraConfig) -> list[str]:
    """The lora: settings that would change what trains but that AdaLoRA (its own update, ranks, scale and init)
    has no use for: each refused by name rather than silently ignored. lora.r is only warned about
    (method_problems): it changes nothing but the user's expectation."""
    why = {
        "use_dora": "AdaLoRA trains its own SVD-shaped update, with no DoRA magnitude",
        "use_rslora": "AdaLoRA scales every layer by lora_alpha / adalora.init_r",
        "init_lora_weights": "AdaLoRA starts E at zero and A, B ~ N(0, 0.02)",
        "modules_to_save": "an AdaLoRA adapter trains and saves no whole modules",
        "rank_pattern": "AdaLoRA allocates every layer's rank itself, from adalora.init_r down to adalora.target_r",
        "alpha_pattern": "AdaLoRA scales every layer by lora_alpha / adalora.init_r",
    }
    defaults = LoraConfig()
    problems = []
    for name, reason in why.items():
        value = getattr(lora, name)
        if value != getattr(defaults, name):
            shown = str(value).lower() if isinstance(value, bool) else repr(
                list(value) if isinstance(value, tuple) else value)  # as written in YAML: true, 'pissa', ['lm_head']
            fix = "method: dora" if name == "use_dora" else "method: lora"
            problems.append(f"lora.{name}: {shown} is not supported with method: adalora ({reason}); remove "
                            f"lora.{name}, or use {fix}")
    return problems


def method_problems(data: dict) -> list[str]:
    """Contradictions between `method` and the lora: fields the user wrote (the raw dict: a field written with its
    default value counts); method full ignoring lora: fields is a warning."""
    method, lora = data.get("method", "lora"), data.get("lora")
    written = sorted(lora) if isinstance(lora, dict) else []
    if method == "dora" and isinstance(lora, dict) and lora.get("use_dora") is False:
        return ["lora.use_dora: false contradicts method: dora (which trains DoRA); remove lora.use_dora, or use "
                "method: lora for plain LoRA"]
    if method == "full" and written:
        names = ", ".join(f"lora.{k}" for k in written)
        warnings.warn(f"{names}: ignored with method: full, which trains every weight and has no adapter; remove "
                      f"them, or use method: lora", stacklevel=3)
    if method == "adalora" and "r" in written and lora["r"] != LoraConfig.r:
        warnings.warn(f"lora.r: {lora['r']} is not used with method: adalora, whose ranks are adalora.init_r (every "
                      f"layer's at the start) and adalora.target_r (the average it prunes to); remove lora.r, or set "
                      f"those", stacklevel=3)
    return []


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
