"""Injection: choose target layers, wrap them with LoRA layers, freeze everything else, report parameters.

Matching follows PEFT exactly, so an adapter config means the same modules in both libraries:
a string `target_modules` must `re.fullmatch` the module path; a list entry matches when the path equals it or
ends with "." + entry; "all-linear" takes every linear layer but the output head. `exclude_modules` (same two forms)
removes paths first. `layers_to_transform` filters only paths that a list entry matched by suffix (not an exact
path): the layer index is the first numbered segment, or the one after a `layers_pattern` name.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import time
import warnings
from typing import Callable

import regex
import torch
from torch import nn

from loraforge.config import ConfigError, LoraConfig, clipped, scale_warning
from loraforge.quant.checks import is_4bit_param, is_quantized_linear
from loraforge.utils.hf import set_submodule
from loraforge.lora.layer import LoraLayer, LoraLinear, ModulesToSave

# The attention projections (q, k, v, o) per architecture: the default targets.
ATTENTION_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "gpt_neox": ("query_key_value", "attention.dense"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "falcon": ("query_key_value", "self_attention.dense"),
}
REGEX_TIMEOUT_S = 1.0  # a user's regex against one module path (~50 characters): longer is endless backtracking
# [seconds left, seconds] that every user_match inside a regex_budget spends from; None: no budget
_BUDGET: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("regex_budget", default=None)
# The decoder-layer index of a module path, for display (plot_rank_heatmap); target selection uses layer_index().
LAYER_INDEX = re.compile(r".*?\.(?:layers|h|block|blocks|layer)\.(\d+)\.")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" or is_quantized_linear(module)


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_linear(m) and not _inside_lora(name)]


def _inside_lora(path: str) -> bool:
    return any(part in ("lora_A", "lora_B", "lora_E", "base_layer", "modules_to_save", "original_module")
               for part in path.split("."))


def default_targets(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ATTENTION_TARGETS:
        return ATTENTION_TARGETS[model_type]
    names = {n.rsplit(".", 1)[-1] for n in linear_module_names(model)}
    found = tuple(t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if t in names)
    if found:
        return found
    raise ConfigError([f"target_modules: no default for model type {model_type!r}; name the layers, e.g. "
                       f"target_modules: {sorted(names)[:6]} or 'all-linear'"])


def user_match(pattern: str, path: str, field: str, full: bool = True, given: str | None = None) -> regex.Match | None:
    """The regex `pattern` from the config field `field` (`given`: as the user wrote it, when `pattern` wraps it)
    against a module path (fullmatch, else match), under REGEX_TIMEOUT_S. With the regex module, which reads re's
    syntax: Python's re backtracks without end on a repetition inside a repetition ((.*.*)*Z took over a minute on
    a 16-character path) and holds the GIL all the while (soak: one dashboard form froze the server, its API and its
    Ctrl-C; so did an adapter's target_modules in the serve engine). A pattern that runs out of time raises
    ConfigError naming the field."""
    budget = _BUDGET.get()
    timeout = REGEX_TIMEOUT_S if budget is None else min(REGEX_TIMEOUT_S, budget[0])
    started = time.monotonic()
    try:
        if timeout <= 0:
            raise TimeoutError
        return (regex.fullmatch if full else regex.match)(pattern, path, timeout=timeout)
    except TimeoutError:
        if timeout < REGEX_TIMEOUT_S:  # the budget ran out: many keys, each under REGEX_TIMEOUT_S on each path
            raise ConfigError([f"{field}: the config's regexes take over {budget[1]:g} s in all to test against "
                               f"this model's module paths (the last: {clipped(given or pattern)} on {path!r}); "
                               f"write fewer of them, or ones without a repetition inside a repetition, such as "
                               f"(.*)*, e.g. .*\\.(q_proj|v_proj)"]) from None
        raise ConfigError([f"{field}: the regex {clipped(given or pattern)} takes over {REGEX_TIMEOUT_S:g} s to test "
                           f"against the module path {path!r} (a repetition inside a repetition, such as (.*)*, "
                           f"backtracks without end); write it without one, e.g. .*\\.(q_proj|v_proj)"]) from None
    finally:
        if budget is not None:
            budget[0] -= time.monotonic() - started


@contextlib.contextmanager
def regex_budget(seconds: float):
    """Every user_match inside shares `seconds` (the server, loading an adapter on its engine thread: a rank_pattern
    of many keys, each under REGEX_TIMEOUT_S on each module path, held every request for minutes; soak). The time
    spent in the regexes counts, not the time between them (soak: the budget was a deadline, and a LoRA adapter
    with a 2-key rank_pattern on a 120-layer base, its layers built between the lookups, was refused as "regexes
    take over 2 s in all"). Nested budgets: the one with less left."""
    outer = _BUDGET.get()
    token = _BUDGET.set([seconds, seconds] if outer is None or seconds < outer[0] else outer)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def tails(path: str) -> list[str]:
    """`path` and each of its dotted tails (a.b.c: a.b.c, b.c, c): the list entries that match it (matcher)."""
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def matcher(target_modules, field: str = "target_modules") -> Callable[[str], bool]:
    """Whether a module path is targeted, by PEFT's rule: a string is a regex the path fullmatches (user_match;
    `field`: the config field it comes from, target_modules or exclude_modules, for one that runs out of time); a
    list names paths equal to an entry or ending with '.' + entry. The list is made a set once and each path's tails
    looked up in it (soak: an adapter's 1.4 million entries, each compared with every module path, held the server
    for over 10 minutes)."""
    if isinstance(target_modules, str):
        return lambda path: user_match(target_modules, path, field) is not None
    entries = set(target_modules)
    return lambda path: not entries.isdisjoint(tails(path))


def layer_index(path: str, layers_pattern=None) -> int | None:
    """PEFT's layer index of a module path: the first numbered segment after a dot (encoder.block.1.layer.0.x -> 1),
    or the one after a `layers_pattern` name; None when there is none."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            found = user_match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path, "layers_pattern", False, pattern)
            if found is not None:
                break
    return int(found.group("idx")) if found else None


def pattern_matches(key: str, path: str, field: str) -> bool:
    """A rank_pattern / alpha_pattern (`field`) key names the layer at `path`: (.*\\.)?key$ matches it (PEFT's
    rule)."""
    return user_match(rf"(.*\.)?({key})$", path, field, full=False, given=key) is not None


def pattern_value(pattern: dict, path: str, default, field: str):
    """rank_pattern / alpha_pattern (`field`) lookup: the first key (in order) that pattern_matches wins."""
    for key, value in pattern.items():
        if pattern_matches(key, path, field):
            return value
    return default


def _warn_unmatched_patterns(config: LoraConfig, targets: list[str]) -> None:
    """A rank_pattern / alpha_pattern key that matches none of the layers getting an adapter changes nothing (PEFT
    ignores it silently): one warning names the keys and a few of the layers they could have named."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, field_name)
        unmatched = [key for key in pattern if not any(pattern_matches(key, path, field_name) for path in targets)]
        if unmatched:
            shown = ", ".join(clipped(k, 60) for k in unmatched[:5])
            warnings.warn(f"{field_name}: {shown} match{'es' if len(unmatched) == 1 else ''} none of the "
                          f"{len(targets)} layers that get an adapter (e.g. {', '.join(targets[:2])}), so "
                          f"{'r' if field_name == 'rank_pattern' else 'lora_alpha'} applies there; a key matches "
                          f"the end of a layer's path, e.g. q_proj or layers.0.self_attn.q_proj", stacklevel=3)


def find_targets(model: nn.Module, config: LoraConfig, advise: bool = True) -> list[str]:
    """Module paths that get an adapter; raises naming the model's linear layers when nothing matches. `advise`:
    say that all-linear leaves a mixture-of-experts model's experts out, and name the target_modules entries that
    match nothing (a new adapter's; loading passes False: the warnings came again on every merge, eval, serve)."""
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # PEFT's rule: a module saved whole, or one inside it, gets no adapter (they would conflict); AdaLoraConfig has none
    saved = saved_paths(model, getattr(config, "modules_to_save", None) or ())
    inside = tuple(p + "." for p in saved)
    matched, found = [], []  # matched: before the layers_to_transform filter
    dropped = {"exclude_modules": [], "modules_to_save": []}  # matched targets these fields take away (soak)
    targeted = matcher(targets)
    excluded = matcher(config.exclude_modules or (), "exclude_modules")
    for path, module in model.named_modules():
        if _inside_lora(path) or not (is_linear(module) or isinstance(module, LoraLayer)):
            continue
        if targets == "all-linear":
            if module is output or path.endswith("lm_head"):
                continue
        elif not targeted(path):
            continue
        if config.exclude_modules and excluded(path):
            dropped["exclude_modules"].append(path)
            continue
        if path in saved or path.startswith(inside):
            dropped["modules_to_save"].append(path)
            continue
        matched.append(path)
        if config.layers_to_transform and not isinstance(targets, str) and path not in targets:
            if layer_index(path, config.layers_pattern) not in config.layers_to_transform:
                continue
        found.append(path)
    if not isinstance(targets, str) and config.target_modules is not None:
        _refuse_non_linear(model, targets, found)
    if not found and matched:  # the targets match, the layer selection drops them all: name the layer field
        _refuse_layer_selection(model, config, matched)
    if not found and (taken := [f"{field} takes all {len(paths)} ({_saved_why(field)})"
                                for field, paths in dropped.items() if paths]):
        raise ConfigError([f"target_modules: {clipped(targets)} matches {sum(map(len, dropped.values()))} layer(s) "
                           f"of this model, but {' and '.join(taken)}, so no layer is left for an adapter: remove "
                           f"them from {' / '.join(f for f, p in dropped.items() if p)}, or target other layers"])
    experts = _expert_weights(model)
    if not found:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
        chosen = [f"layers_to_transform {list(config.layers_to_transform)}"] if config.layers_to_transform else []
        also = f" with {' and '.join(chosen)}" if chosen else ""
        moe = f" ({_experts_note(experts)})" if experts else ""
        raise ConfigError([f"target_modules: {clipped(targets)}{also} matches no linear layer of this model "
                           f"({type(model).__name__}); its linear layers are named {suffixes}{moe}"])
    if advise and targets == "all-linear" and experts:  # soak: all-linear on Mixtral/Qwen2-MoE was attention-only
        warnings.warn(f"target_modules: all-linear takes the {len(found)} linear layers of this model "
                      f"({type(model).__name__}), not its experts: {_experts_note(experts)}", stacklevel=3)
    taken_away = matched + dropped["exclude_modules"] + dropped["modules_to_save"]
    taken_tails = {tail for path in taken_away for tail in tails(path)}
    unused = [] if isinstance(targets, str) else [t for t in targets if t not in taken_tails]
    if advise and unused:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})  # soak: a typo went unsaid
        warnings.warn(f"target_modules: {', '.join(clipped(t, 60) for t in unused[:5])} match"
                      f"{'es' if len(unused) == 1 else ''} no layer of this model that gets an adapter "
                      f"({type(model).__name__}; its linear layers are named {suffixes}): check the spelling",
                      stacklevel=3)
    return found


def _expert_weights(model: nn.Module) -> list[str]:
    """Parameters that hold a mixture-of-experts layer's experts stacked (transformers 5: experts.gate_up_proj of
    shape experts x out x in): linear maps, but not linear layers, so no adapter wraps them."""
    return [path for path, p in model.named_parameters() if p.ndim == 3 and "expert" in path and not _inside_lora(path)]


def _experts_note(experts: list[str]) -> str:
    return (f"its {len(experts)} mixture-of-experts weights, e.g. {experts[0]}, are 3-D parameters that loraforge "
            f"does not adapt (PEFT's target_parameters does)")


def _saved_why(field: str) -> str:
    return ("it trains them in full; a layer cannot be both saved whole and adapted" if field == "modules_to_save"
            else "it removes them from target_modules")


def _refuse_layer_selection(model: nn.Module, config, matched: list[str]) -> None:
    """Targets that match layers which layers_to_transform then drops, every one: a layers_pattern that names no
    layer list of the model, or indices outside its layers, is refused naming that field and what the model has."""
    ltt, pattern = list(config.layers_to_transform), config.layers_pattern
    lists = sorted({m["name"] for p in matched if (m := re.match(r".*?\.(?P<name>[^.]*)\.\d+\.", p))})
    indices = [i for p in matched if (i := layer_index(p, pattern)) is not None]
    model_name = type(model).__name__
    if pattern and not indices:
        where = f"whose targeted layers sit in {lists}; use layers_pattern: {lists[0]!r}, or" if lists else \
            "whose targeted layers sit in no numbered list;"
        raise ConfigError([f"layers_pattern: {pattern!r} names no layer list of this model ({model_name}), {where} "
                           f"remove layers_pattern"])
    if indices:
        under = f" in {pattern!r}" if pattern else (f" in {lists[0]!r}" if len(lists) == 1 else "")
        raise ConfigError([f"layers_to_transform: {ltt} selects no layer: this model ({model_name}) has layers "
                           f"0..{max(indices)}{under} (counted from 0; a negative index does not count from the end); "
                           f"use indices from 0 to {max(indices)}"])


def _refuse_non_linear(model: nn.Module, targets, found: list[str]) -> None:
    """A target_modules entry that names only modules other than linear layers (an embedding, an attention block)
    is refused by name: it was dropped silently, while PEFT puts LoRA on an embedding and refuses the rest."""
    found_tails = {tail for path in found for tail in tails(path)}
    others = {}  # each tail of a module other than a linear layer: the first such module (named_modules' order)
    for path, module in model.named_modules():
        # a LoraLayer is a linear layer another adapter wraps (soak: an entry exclude_modules takes away was refused
        # as "not a linear layer" once another adapter held that layer)
        if path and not _inside_lora(path) and not (is_linear(module) or isinstance(module, LoraLayer)):
            for tail in tails(path):
                others.setdefault(tail, (path, module))
    for entry in targets:
        if entry in found_tails:
            continue
        other = others.get(entry)
        if other is not None:
            path, module = other
            raise ConfigError([f"target_modules: {entry!r} names {path} ({type(module).__name__}), not a linear "
                               f"layer; loraforge puts LoRA on linear layers only (not on embeddings or whole "
                               f"blocks): remove it, or name the linear layers inside it"])


def refuse_peft_model(model: nn.Module) -> None:
    """TypeError for a model PEFT already wrapped (a PeftModel) or put its own adapter layers into (get_base_model()
    of one, transformers' load_adapter): loraforge's layers would wrap PEFT's, or its matching fail with an error
    that contradicts itself (soak: "q_proj names ...q_proj (Linear), not a linear layer")."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):  # PeftModel, PeftMixedModel
        raise TypeError(f"the model is already a PEFT model ({type(model).__name__}): call merge_and_unload() (its "
                        f"adapters merged into the weights) or unload() (the base without them) first and pass the "
                        f"model that returns; get_base_model() keeps PEFT's layers in it")
    layer = next(((path, m) for path, m in model.named_modules() if type(m).__module__.startswith("peft.")), None)
    if layer is not None:
        path, module = layer
        raise TypeError(f"the model holds PEFT's own adapter layers ({path}: {type(module).__module__}."
                        f"{type(module).__name__}): remove them with PEFT first (merge_and_unload() or unload() of "
                        f"the PeftModel), or load the base afresh")


def resolve_targets(model: nn.Module, config, adapter_name: str, advise: bool = True):
    """(model.lora_configs, config with explicit targets and fan_in_fan_out, the module paths to wrap).

    Refuses a name already loaded; `target_modules=None` becomes the architecture's default list, saved as such
    so PEFT (whose defaults differ) reads the same; GPT-2's Conv1D targets turn on fan_in_fan_out. A model PEFT
    already wrapped is refused (refuse_peft_model). `advise`: find_targets'.
    """
    refuse_peft_model(model)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:  # torch's bare KeyError before
        shown = adapter_name.replace(".", "_") if isinstance(adapter_name, str) and adapter_name else "default"
        raise ValueError(f"adapter name {adapter_name!r}: give a non-empty string without '.' (torch's module names "
                         f"cannot hold one), e.g. {shown!r}")
    configs = getattr(model, "lora_configs", None)
    if configs is None:
        configs = model.lora_configs = {}
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} is already loaded; delete it or choose another name")
    if merged := merged_adapters(model):  # the new one would run on top of them (load_adapter refuses it too)
        raise merged_error(merged, "adding another one")
    with_bias = [n for n, c in configs.items() if c.bias != "none"]
    if with_bias and config.bias != "none":  # PEFT's rule: the biases are the base's own, shared by every adapter
        raise ConfigError([f"bias: only 1 adapter with bias is supported; {with_bias[0]!r} already trains biases "
                           f"(bias={configs[with_bias[0]].bias!r}). When using multiple adapters, set bias to "
                           f"'none' for all adapters but one (this one has bias={config.bias!r})"])
    if config.target_modules is None:
        config = dataclasses.replace(config, target_modules=default_targets(model))
    targets = find_targets(model, config, advise)
    if any(type(model.get_submodule(p)).__name__ == "Conv1D" for p in targets) and not config.fan_in_fan_out:
        config = dataclasses.replace(config, fan_in_fan_out=True)
    return configs, config, targets


class LayerKindConflict(ConfigError):
    """A LoRA adapter for a layer that holds an AdaLoRA one, or the other way round: one module holds one kind."""


def _warn_rank_over_layers(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """r above min(in, out) of a layer buys nothing (B·A cannot have a higher rank than that) and trains more
    parameters than the frozen layer holds: one warning names the first such layer, how many there are, and the
    largest r that all targeted layers can use in full."""
    ranks = {path: int(pattern_value(config.rank_pattern, path, config.r, "rank_pattern")) for path in targets}
    sizes = {path: (model.get_submodule(path).in_features, model.get_submodule(path).out_features) for path in targets}
    over = [path for path in targets if ranks[path] > min(sizes[path])]
    if over:
        path, (i, o) = over[0], sizes[over[0]]
        fits = min(min(size) for size in sizes.values())
        warnings.warn(f"r={ranks[path]} on {path} ({i} → {o}) is more than the rank its update can have "
                      f"({min(i, o)}): the adapter trains {ranks[path] * (i + o):,} parameters there, the frozen layer "
                      f"holds {i * o:,}; {len(over)} of the {len(targets)} targeted layers are so (use r ≤ {fits}; "
                      f"8 is the usual start)", stacklevel=3)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default", advise: bool = True) -> nn.Module:
    """Add adapter `adapter_name` to `model` in place, make only it trainable, and remember its config.

    The model keeps its class (a transformers model stays one); `model.lora_configs[name]` holds the config.
    advise: warn about what is legal but unusual in a new adapter: r above a targeted layer's min(in, out), a bias
    setting that trains no bias, a lora_alpha scale outside config.USUAL_SCALE, all-linear without a mixture of
    experts' experts (loading a trained adapter, or building a merge's combined one, passes False: soak, the experts
    warning came again on every merge, eval, generate and serve of an all-linear Qwen3-MoE adapter).
    """
    configs, config, targets = resolve_targets(model, config, adapter_name, advise)
    if advise:
        scale_warning(config.lora_alpha, config.r, config.use_rslora)
        _warn_unmatched_patterns(config, targets)
    with undone_on_failure(model, adapter_name):  # a refusal midway (modules_to_save) or Ctrl-C: as it was
        untied = untie_shared(model, [p for p in targets if not isinstance(model.get_submodule(p), LoraLayer)])
        for path in targets:
            module = model.get_submodule(path)
            if not isinstance(module, LoraLayer):
                module = LoraLinear(module)
                module.untied_from = untied.get(path)
                set_submodule(model, path, module)
            elif not isinstance(module, LoraLinear):  # AdaLoRA's SVDLinear
                raise LayerKindConflict([f"target_modules: {path} already holds an AdaLoRA adapter; AdaLoRA and "
                                         f"LoRA adapters cannot share a layer (delete the other adapter first)"])
            module.add_adapter(
                adapter_name,
                r=int(pattern_value(config.rank_pattern, path, config.r, "rank_pattern")),
                lora_alpha=float(pattern_value(config.alpha_pattern, path, config.lora_alpha, "alpha_pattern")),
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                init_lora_weights=config.init_lora_weights,
                use_dora=config.use_dora,
                path=path,
            )
        if advise:
            _warn_rank_over_layers(model, config, targets)
        for path in _modules_to_save_paths(model, config):
            module = model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                set_submodule(model, path, module)
            module.add_adapter(adapter_name)
        configs[adapter_name] = config
        keep_base_biases(model, config, adapter_name)
        if advise and config.bias != "none" and not model.lora_base_biases[adapter_name]:  # soak: said nothing
            which = "the targeted layers have" if config.bias == "lora_only" else "this model has"
            warnings.warn(f"bias: {config.bias!r} trains no bias: {which} none ({type(model).__name__}), so it trains "
                          f"as bias: 'none' does", stacklevel=2)
        mark_trainable(model, adapter_name)
    return model


@contextlib.contextmanager
def undone_on_failure(model: nn.Module, name: str):
    """The block adds adapter `name` to `model`. Should it raise (a refusal found midway, such as modules_to_save
    naming no module; Ctrl-C, a notebook's stop button, while PiSSA's SVDs run), what it added goes again and every
    parameter holds and trains as before: run again, the call is not refused as "already exists on this layer" (soak).
    PiSSA/OLoRA injection replaces W0 by its residual, a new tensor assigned to .data (init_from_base_weight): the old
    tensors stay intact, so keeping them costs no memory and W0 comes back bit for bit. A weight untie_shared copied
    is tied again, with tie_word_embeddings as it was; every module's train/eval mode and the other adapters' active
    ones are as they were (load_adapter switches to the new adapter and puts the model in eval() last)."""
    modes = [(module, module.training) for module in model.modules()]
    active = [(module, list(module.active_adapters)) for module in model.modules() if isinstance(module, LoraLayer)]
    saved = [(module, module.active_adapter) for module in model.modules() if isinstance(module, ModulesToSave)]
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    tensors = {p: p.data for p in model.parameters()}
    owners = [(module, key, p) for module in model.modules() for key, p in module.named_parameters(recurse=False)]
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", None)
    try:
        yield
    except BaseException:
        remove_adapter(model, name)
        for module, key, p in owners:
            if getattr(module, key) is not p:  # untie_shared's copy, the wrapper gone before it kept the tie
                setattr(module, key, p)
        for p, flag in requires_grad.items():
            p.data = tensors[p]
            p.requires_grad_(flag)
        if tied is not None:
            config.tie_word_embeddings = tied
        for module, training in modes:
            module.training = training  # each module's own flag: train(mode) would set its children's too
        for module, names in active:
            module.active_adapters = [n for n in names if n in module.r]
        for module, saved_name in saved:
            module.active_adapter = saved_name if saved_name in module.modules_to_save else None
        raise


def remove_adapter(model: nn.Module, name: str) -> None:
    """Take adapter `name` out of every layer that holds it, or holds part of it; layers left without adapters are
    unwrapped back to their base layer (re-tied where untie_shared copied their weight), modules_to_save copies go,
    and a bias adapter's base biases get their values back. adapters.delete_adapter, once it refused a merged one."""
    retied = []
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if module.holds(name):
                module.delete_adapter(name)
            if not module.r:  # (also a wrapper that a failed injection left empty)
                untied = module.untied_from
                if untied is not None and _retie(model, module):
                    retied.append(untied[2])
                set_submodule(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            del module.modules_to_save[name]
            if module.active_adapter == name:
                module.active_adapter = None
            if not len(module.modules_to_save):
                set_submodule(model, path, module.original_module)
    getattr(model, "lora_configs", {}).pop(name, None)
    with torch.no_grad():  # the base's biases a bias adapter trained or loaded: their values before it came
        for p, before in (getattr(model, "lora_base_biases", None) or {}).pop(name, []):
            p.copy_(before)
    config = getattr(model, "config", None)
    if retied and retied[0] and not any(m.untied_from is not None for _, m in lora_layers(model)):
        config.tie_word_embeddings = retied[0]  # the last untied layer is tied again: the flag as it was


def _retie(model: nn.Module, layer: LoraLayer) -> bool:
    """Give `layer`'s base back the weight it shared before untie_shared copied it, if another module still holds
    that Parameter (True then)."""
    _, shared, _ = layer.untied_from
    if not any(p is shared for p in model.parameters()):  # the other module is gone or holds another weight now
        return False
    layer.base_layer.weight = shared
    layer.untied_from = None
    return True


def is_base_bias(key: str) -> bool:
    """A parameter name of a base bias, which bias="all" trains (not a modules_to_save copy's, nor its original's)."""
    return key.endswith(".bias") and ".modules_to_save." not in key and ".original_module." not in key


def keep_base_biases(model: nn.Module, config, name: str) -> None:
    """An adapter with bias lora_only (its layers' biases) or all (every bias) trains the base's own bias tensors:
    training and loading change them in place (PEFT's rule, one such adapter at a time). Their values before are
    kept, model.lora_base_biases[name], so adapters.delete_adapter and disable_adapters give the base back."""
    if getattr(config, "bias", "none") == "none":
        return
    if config.bias == "lora_only":
        params = [m.base_layer.bias for _, m in lora_layers(model)
                  if name in m.r and getattr(m.base_layer, "bias", None) is not None]
    else:
        params = [p for key, p in model.named_parameters() if is_base_bias(key)]
    kept = getattr(model, "lora_base_biases", None) or {}
    model.lora_base_biases = {**kept, name: [(p, p.detach().clone()) for p in params]}


def untie_shared(model: nn.Module, paths: list[str]) -> dict[str, tuple[list[str], nn.Parameter, bool | None]]:
    """Give each layer at `paths` whose weight is also another module's parameter (an lm_head tied to the input
    embedding) its own copy, so a merge or a PiSSA/OLoRA residual changes that layer alone; one warning names the
    layers, what they were tied to and the memory it costs. `config.tie_word_embeddings` becomes False (a saved
    merged model keeps both matrices). Returns {path: (the other parameters' names, the shared Parameter, the
    flag before)}: the LoraLayer keeps it (untied_from) and adapters.delete_adapter ties the weight again."""
    owners: dict[tuple, list[str]] = {}  # storage address (or id for a tensor without one) -> parameter names
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(_storage_key(p), []).append(name)
    config = getattr(model, "config", None)
    flag = getattr(config, "tie_word_embeddings", None)
    untied, lines = {}, []
    for path in paths:
        weight = getattr(model.get_submodule(path), "weight", None)
        if not isinstance(weight, nn.Parameter) or is_4bit_param(weight):
            continue
        others = [n for n in owners.get(_storage_key(weight), []) if n != f"{path}.weight"]
        if not others:
            continue
        model.get_submodule(path).weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        untied[path] = (others, weight, flag)
        tied_to = ", ".join(n.removesuffix(".weight") for n in others)
        lines.append(f"{path} (tied to {tied_to}, +{weight.numel() * weight.element_size() / 2**20:.1f} MiB)")
    if untied:
        if flag:
            config.tie_word_embeddings = False
        warnings.warn(f"LoRA on a weight shared with another module: {'; '.join(lines)}. Each gets its own copy of "
                      f"the weight, so merging the adapter (or a PiSSA/OLoRA init) leaves the other module unchanged; "
                      f"the model stays untied (tie_word_embeddings False) until the adapter is deleted",
                      stacklevel=3)
    return untied


def _storage_key(p) -> tuple:
    """What two tied parameters share: the address of their storage (the object for a tensor without one: meta)."""
    ptr = p.untyped_storage().data_ptr() if p.device.type != "meta" else 0
    return (p.device, ptr) if ptr else ("id", id(p))


def saved_paths(model: nn.Module, names) -> list[str]:
    """The modules that modules_to_save `names` take. PEFT's rule (peft.utils.other._set_trainable): a bare suffix
    match, so that its files and ours name the same modules ("norm" takes "model.norm" and every "input_layernorm"
    alike)."""
    return [p for p, _ in model.named_modules() if not _inside_lora(p) and any(p.endswith(t) for t in names)]


def _modules_to_save_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    paths = saved_paths(model, config.modules_to_save)
    missing = [t for t in config.modules_to_save if not any(p.endswith(t) for p in paths)]
    if missing:
        raise ConfigError([f"modules_to_save: {missing} match no module of this model"])
    return paths


def mark_trainable(model: nn.Module, adapter_name: str) -> None:
    """Freeze everything, then unfreeze adapter `adapter_name` (and biases per its config's `bias`)."""
    config = model.lora_configs[adapter_name]
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            for attr in module.adapter_modules:
                container = getattr(module, attr)
                if adapter_name in container:
                    container[adapter_name].requires_grad_(True)
            if config.bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # PEFT: every bias of the model trains
                p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all). 4-bit weights count as their number of values, not of packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if is_4bit_param(p):
            n = n * 2  # two 4-bit values per stored uint8
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def parameter_report(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def lora_layers(model: nn.Module):
    """(path, layer) of every adapter layer, found by type."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merged_adapters(model: nn.Module) -> list[str]:
    """The adapters merged into the base weights (merge()), sorted."""
    return sorted({n for _, layer in lora_layers(model) for n in layer.merged_adapters})


def merged_error(merged: list[str], doing: str) -> RuntimeError:
    """The refusal of something the merged adapters would spoil: add, load, switch, disable."""
    return RuntimeError(f"adapters {merged} are merged into the base weights; call loraforge.lora.merge.unmerge(model) "
                        f"before {doing}")
