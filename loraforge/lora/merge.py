"""Merge adapters into the base weights (explicit, idempotent), unload, combine adapters, export a checkpoint.

All merge math goes through each layer's `delta_weight()`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from numbers import Integral
from pathlib import Path

import torch
from torch import nn

from loraforge.config import ConfigError, LoraConfig
from loraforge.lora.adapters import (AdapterError, delete_adapter, load_adapter, read_adapter_config, require_adapter,
                                     set_adapter)
from loraforge.lora.inject import inject, lora_layers
from loraforge.lora.layer import LoraLayer, MergeError, ModulesToSave, dequantized_weight, is_quantized
from loraforge.models import DTYPES, conversion_paths, load_base, model_skeleton, stored_dtype
from loraforge.quant.bnb import QUANT_TYPES, check_model_widths
from loraforge.utils.files import atomic_dir, expand_user
from loraforge.utils.hf import set_submodule
from loraforge.utils.outputs import check_output, check_replaceable, check_writable, published_room

# Weight files of a transformers checkpoint: an older export's ones left beside a new one would be loaded instead.
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model.bin.index.json")
# An adapter's files: left beside merged weights, transformers' from_pretrained would attach the adapter again.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
LONGEST_FILE = "model-00001-of-00002.safetensors"  # the longest name save_pretrained writes (a shard's; 32 bytes)
COMBINATIONS = ("cat", "svd", "linear")


def merge(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Add ΔW of the named adapters (default: the active ones) into the base weights. Calling it twice is a no-op."""
    require_adapter(model, *(adapter_names or []))
    for _, layer in lora_layers(model):
        names = layer.active_adapters if adapter_names is None else [n for n in adapter_names if n in layer.r]
        layer.merge(names)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged ΔW out of the base weights again. Idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge the adapters and put plain base layers back: the result is an ordinary transformers model.

    A 4-bit/8-bit base layer is de-quantized into an fp32 nn.Linear, merged like an unquantized one (several
    adapters in order, each DoRA one rescaling the running weight), then cast to the compute dtype: re-quantizing
    would change the outputs again (see loraforge.quant.bnb for that, as a choice).
    """
    require_adapter(model, *(adapter_names or []))
    for path, layer in lora_layers(model):
        names = layer.active_adapters if adapter_names is None else [n for n in adapter_names if n in layer.r]
        base = layer.base_layer
        if is_quantized(base):  # the one merge path, on the de-quantized weight in fp32
            dtype = _compute_dtype(model, base)
            layer.base_layer = _dequantized_linear(base)
            layer.merge(names)
            base = _cast_merged(layer.base_layer, dtype, names, path)  # fp16: int8's ±127·scale + ΔW may pass 65504
        elif base.weight.dtype in (torch.bfloat16, torch.float16):  # this layer alone in fp32: rounded once
            dtype = base.weight.dtype
            layer.base_layer = base.float()
            layer.merge(names)
            base = _cast_merged(layer.base_layer, dtype, names, path)
        else:
            layer.merge(names)
        set_submodule(model, path, base)
    for path, module in list(model.named_modules()):  # layers no adapter covers: plain too (a loadable checkpoint)
        if is_quantized(module):
            set_submodule(model, path, _dequantized_linear(module).to(_compute_dtype(model, module)))
    for path, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave):
            chosen = module.modules_to_save[module.active_adapter] if module.active_adapter else module.original_module
            set_submodule(model, path, chosen)
    config = getattr(model, "config", None)  # a transformers model; a bare nn.Module has nothing to untie
    if getattr(config, "tie_word_embeddings", False) and not embeddings_tied(model):
        config.tie_word_embeddings = False  # a saved lm_head or embedding: loaders must read both matrices
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


def _cast_merged(base: nn.Module, dtype: torch.dtype, names: list[str], path: str) -> nn.Module:
    """`base`, merged in fp32, cast back to `dtype`; MergeError naming the adapters when that passes its range."""
    largest = base.weight.abs().max().item()
    base.to(dtype)
    if not torch.isfinite(base.weight).all():
        named = ", ".join(map(repr, names))
        raise MergeError(f"adapter {named}: the merged weight {path}.weight passes {str(dtype).removeprefix('torch.')}"
                         f"'s range (|W| up to {largest:.4g}); merge in fp32 or bf16")
    return base


def _check_base_range(model: nn.Module, base: str, dtype: str) -> None:
    """FloatingPointError naming the first weight of `base` (loaded in fp32) that `dtype` cannot hold, before any
    adapter is added: soak, `merge --dtype fp16` of a base holding a weight past ±65504 (one no adapter touches
    too) blamed "adapter X: the merged weight ...". As models.check_fp16_range says of a base loaded in fp16."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param.data.to(DTYPES[dtype])).all()):
            largest = param.data.abs().max().item()
            raise FloatingPointError(f"cannot merge into --dtype {dtype}: the base {base}'s own weight {name} "
                                     f"passes {str(DTYPES[dtype]).removeprefix('torch.')}'s range (|W| up to "
                                     f"{largest:.4g}) before any adapter is added; merge in fp32 or bf16")


def _compute_dtype(model: nn.Module, base: nn.Module) -> torch.dtype:
    """The dtype a de-quantized layer is cast to: a 4-bit layer's compute dtype; for an 8-bit one (it has none),
    that of the model's other floating-point weights (the embedding's), as a plain layer there would hold."""
    dtype = getattr(base, "compute_dtype", None)
    if dtype is not None:
        return dtype
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embedding.weight.dtype if embedding is not None else torch.float32


@torch.no_grad()
def _dequantized_linear(base: nn.Module) -> nn.Linear:
    """A bitsandbytes 4-bit/8-bit layer as an fp32 nn.Linear holding its de-quantized weight (out, in)."""
    weight = dequantized_weight(base).float()
    plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device,
                      dtype=torch.float32)
    plain.weight.copy_(weight)
    if base.bias is not None:
        plain.bias.copy_(base.bias)
    return plain


def embeddings_tied(model: nn.Module) -> bool:
    """Whether the output head is the input embedding itself (one tensor), as a tied checkpoint stores it."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def as_weights(weights, n_adapters: int) -> list[float]:
    """`weights` as a list of floats (a tuple, a tensor or a numpy array too); None: 1 for each adapter."""
    if weights is None:
        return [1.0] * n_adapters
    try:
        return [float(w) for w in weights]
    except (TypeError, ValueError, RuntimeError):  # not iterable, not a number, a tensor of more than one value
        shown = weights.tolist() if hasattr(weights, "tolist") else weights  # a tensor's values, on one line
        raise ConfigError([f"weights {shown!r}: give one number per adapter, e.g. [0.7, 0.3]"]) from None


def check_combination(n_adapters: int, weights: list[float] | None, combination_type: str) -> list[str]:
    """What is wrong with `weights` and `combination_type` for combining `n_adapters` adapters (empty: nothing)."""
    problems = []
    if weights is not None and len(weights) != n_adapters:
        problems.append(f"weights {list(weights)}: give one weight per adapter ({n_adapters}), or none for 1 each")
    bad = [w for w in weights or () if not math.isfinite(w)]
    if bad:
        problems.append(f"weights {list(weights)}: {bad[0]} is not a finite number")
    if combination_type not in COMBINATIONS:
        problems.append(f"combination_type {combination_type!r}: use one of {', '.join(COMBINATIONS)}")
    return problems


def _refuse_uncombinable(configs: dict) -> None:
    """AdapterError naming every adapter ({name or directory: config}) whose A and B say only part of what it does."""
    why = [reason for name, config in configs.items() for reason in _uncombinable(name, config)]
    if why:
        raise AdapterError(f"cannot combine adapters into one LoRA adapter: {'; '.join(why)}. Merge such an adapter "
                           f"into the base alone (merge_and_unload, or `loraforge merge` with that one --adapter), "
                           f"then combine or merge the others on the merged model (as --base)")


def _warn_other_bases(configs: dict) -> None:
    """A warning where the adapters to combine name different bases (base_model_name_or_path): their sum is
    neither's model when they were trained on different ones (soak: a Llama and a Qwen3 adapter summed silently);
    one base under two paths (a hub id and its local copy) is told apart by the user, not here."""
    bases = {name: config.base_model_name_or_path for name, config in configs.items() if config.base_model_name_or_path}
    if len(set(bases.values())) > 1:
        named = "; ".join(f"{name}: {base}" for name, base in bases.items())
        warnings.warn(f"the adapters to combine name different bases ({named}): adapters trained on different bases "
                      f"do not add up to a model; combine adapters of one base", stacklevel=3)


def _warn_given_twice(adapters: list, weights: list[float]) -> None:
    """A warning where one adapter folder is given more than once (soak: `--adapter a a` merged 2 × a's ΔW without
    a word, as PEFT's add_weighted_adapter does): each mention adds its weighted ΔW, which --weights says plainly."""
    mentions: dict[Path, list[int]] = {}
    for i, adapter in enumerate(adapters):
        mentions.setdefault(expand_user(adapter).resolve(), []).append(i)
    for where in mentions.values():
        if len(where) > 1:
            given = " and ".join(str(adapters[i]) for i in where)
            total = sum(weights[i] for i in where)
            warnings.warn(f"--adapter {given}: one folder given {len(where)} times, so its ΔW is added {len(where)} "
                          f"times (weight {total:g} in all); give it once, with --weights {total:g} if that is what "
                          f"you mean", stacklevel=3)


def _refuse_unscalable(name: str, config, weights: list[float]) -> None:
    """AdapterError for one adapter given a weight (scaled as a combination of one) that A and B cannot carry."""
    why = _uncombinable(name, config)
    if why:
        raise AdapterError(f"--weights {' '.join(f'{w:g}' for w in weights)}: cannot scale the adapter: "
                           f"{'; '.join(why)}. Leave --weights out to merge it as trained")


def _uncombinable(name: str, config) -> list[str]:
    """Why adapter `name` cannot go into a combined LoRA adapter (its A and B say only part of what it does)."""
    if not isinstance(config, LoraConfig):
        return [f"{name!r} is AdaLoRA (its E scales are not in A and B; `loraforge export --to vllm` writes it as "
                f"plain LoRA)"]
    why = []
    if config.use_dora:
        why.append(f"{name!r} uses DoRA (use_dora): its magnitude vector is not a low-rank update")
    if config.modules_to_save:
        why.append(f"{name!r} has modules_to_save {list(config.modules_to_save)}: whole trained modules")
    if config.bias != "none":
        why.append(f"{name!r} trains biases (bias {config.bias!r})")
    init = config.init_lora_weights
    if isinstance(init, str) and init.startswith(("pissa", "olora")):
        why.append(f"{name!r} is a {init} adapter (init_lora_weights): its A and B fit the residual base its init "
                   f"made, not the base (loraforge.lora.adapters.save_converted writes it as plain LoRA for the base)")
    return why


def _delta_out_in(layer: LoraLayer, name: str) -> torch.Tensor:
    delta = layer.delta_weight(name).float()
    return delta.T if layer.fan_in_fan_out else delta  # (out, in)


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float] | None, new_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    """Make a new adapter from a weighted combination of loaded ones.

    weights: one number per adapter (a list, tuple or 1-D tensor); None: 1 each.
    combination_type:
      "cat":    exact: ΔW_new = Σ w_i ΔW_i, with rank Σ r_i (A and B stacked).
      "svd":    ΔW_new = the best rank-`svd_rank` approximation of Σ w_i ΔW_i (default: the largest r_i);
                works for adapters of different ranks; exact when svd_rank ≥ the rank of the sum. A layer keeps at
                most the rank its sum can have (min(out, in), Σ r_i), in rank_pattern where that is below r (a
                warning when an svd_rank given is above it), never zero rows.
      "linear": PEFT's "linear": with c_i = sqrt(|w_i·s_i|), A_new = Σ sign(w_i·s_i)·c_i·A_i, B_new = Σ c_i·B_i
                (the adapters in a layer need one rank there; equal to the weighted sum of ΔW only for a single
                adapter).
    Only plain LoRA adapters combine: DoRA, modules_to_save, trained biases, PiSSA/OLoRA (A and B fit a residual
    base) and AdaLoRA are refused with an AdapterError (A and B do not hold them); merge such an adapter alone, then
    combine the others on that model.
    A name given more than once adds its weighted ΔW once per mention, as PEFT's add_weighted_adapter does
    (["a", "a"], [1, 1] is a with weight 2), with a warning that names the one weight that means it.
    """
    configs = model.lora_configs
    if not adapters:
        raise ConfigError([f"adapters []: give the names of the loaded adapters to combine (loaded: {list(configs)})"])
    missing = [a for a in adapters if a not in configs]
    if missing:
        raise KeyError(f"adapters {missing} are not loaded; loaded: {list(configs)}")
    weights = as_weights(weights, len(adapters))
    problems = check_combination(len(adapters), weights, combination_type)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, Integral) or svd_rank < 1):
        problems.append(f"svd_rank {svd_rank!r}: give a positive whole number, or None for the largest adapter rank")
    elif svd_rank is not None and combination_type != "svd":  # it was dropped without a word (export_merged refused)
        problems.append(f"svd_rank {svd_rank}: only with combination_type 'svd' (the rank it truncates to; "
                        f"{combination_type!r} keeps every rank): pass combination_type='svd' or leave svd_rank out")
    if problems:
        raise ConfigError(problems)
    _refuse_uncombinable({a: configs[a] for a in adapters})
    for name in dict.fromkeys(a for a in adapters if adapters.count(a) > 1):  # set_adapter refuses; PEFT adds here
        total = sum(w for a, w in zip(adapters, weights) if a == name)
        warnings.warn(f"add_weighted_adapter: {name!r} given {adapters.count(name)} times in {list(adapters)}, so its "
                      f"ΔW is added {adapters.count(name)} times (weight {total:g} in all), as PEFT's "
                      f"add_weighted_adapter does; give it once, with weight {total:g}, if that is what you mean",
                      stacklevel=3)  # past torch.no_grad's wrapper: the caller's line
    layers = [(p, m) for p, m in lora_layers(model) if any(a in m.r for a in adapters)]
    ranks = {m.r[a] for _, m in layers for a in adapters if a in m.r}
    if combination_type == "linear":
        _check_linear_ranks(layers, adapters)
    layer_r = {}  # svd, linear: per layer, the rank it gets (rank_pattern where it differs from r)
    if combination_type == "cat":
        new_r = sum(max(m.r.get(a, 0) for _, m in layers) for a in adapters)
    elif combination_type == "svd":
        new_r = int(svd_rank) if svd_rank is not None else max(ranks)
        layer_r = {p: min(new_r, _svd_rank_cap(m, adapters)) for p, m in layers}
        capped = [p for p, k in layer_r.items() if k < new_r]
        new_r = max(layer_r.values())  # no layer holds zero rows past what its ΔW can have
        if svd_rank is not None and capped:
            used = sorted({layer_r[p] for p in capped})
            shown = str(used[0]) if len(used) == 1 else f"{used[0]} to {used[-1]}"
            layers_text = "1 layer" if len(capped) == 1 else f"{len(capped)} layers"
            warnings.warn(f"svd_rank {svd_rank} is above the rank the combined ΔW can have in {layers_text} "
                          f"(min(out, in) of the layer, or the sum of the adapters' ranks there; e.g. {capped[0]}): "
                          f"rank {shown} is used there (adapter r {new_r}"
                          + (", the others in rank_pattern)" if len(set(layer_r.values())) > 1 else ")"),
                          stacklevel=3)  # past torch.no_grad's wrapper: the caller's line
    else:  # linear: each layer the one rank of its adapters (a rank_pattern's rank where they have one there)
        layer_r = {p: next(m.r[a] for a in adapters if a in m.r) for p, m in layers}
        new_r = max(layer_r.values())
    pattern = {p: k for p, k in layer_r.items() if k != new_r}  # exact paths; alpha = r keeps every scaling 1
    first = configs[adapters[0]]
    config = dataclasses.replace(first, r=new_r, lora_alpha=new_r, use_rslora=False, rank_pattern=pattern,
                                 alpha_pattern=dict(pattern), target_modules=tuple(sorted(p for p, _ in layers)),
                                 exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                                 modules_to_save=None, lora_dropout=0.0,  # exact paths: no other filter applies
                                 init_lora_weights=True)  # never PiSSA/OLoRA's: that init would change the base
    inject(model, config, new_name, advise=False)  # scaling = alpha / r = 1: the weights below carry all the scale
    truncated = []  # (layer path, fraction of ΔW's energy the svd rank left out)
    try:
        for path, layer in layers:
            truncated += _combine_layer(path, layer, adapters, weights, new_name, combination_type, layers)
    except BaseException:  # a refused combination leaves no half-written adapter behind
        delete_adapter(model, new_name)
        raise
    if truncated:
        worst = max(truncated, key=lambda t: t[1])
        layers_text = "1 layer" if len(truncated) == 1 else f"{len(truncated)} layers"
        warnings.warn(f"svd_rank {new_r} is below the rank of the combined ΔW in {layers_text}: up to "
                      f"{worst[1]:.2%} of its energy is dropped ({worst[0]}); use the exact combination 'cat' "
                      f"(loraforge merge --combination cat), or raise svd_rank (loraforge merge --svd-rank)",
                      stacklevel=3)  # past torch.no_grad's wrapper: the caller's line


def _combine_layer(path: str, layer: LoraLayer, adapters: list[str], weights: list[float], new_name: str,
                   combination_type: str, layers: list) -> list[tuple[str, float]]:
    """Write adapter `new_name`'s A and B of `layer` (at `path`) as `combination_type` combines `adapters`; the
    fraction of ΔW's energy an svd rank left out, [(path, fraction)] where it is over fp32's noise. MergeError
    naming `weights` where the weighted ΔW or the factors pass float32's range (SVD of inf fails with a
    LinAlgError; cat and linear wrote inf into the adapter)."""
    A, B = layer.lora_A[new_name].weight, layer.lora_B[new_name].weight  # (r, in), (out, r)
    truncated = []
    if combination_type == "svd":
        total = sum(w * _delta_out_in(layer, a) for a, w in zip(adapters, weights) if a in layer.r)  # (out, in)
        _check_combined(path, weights, total)
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        k = A.shape[0]  # this layer's rank: min(svd_rank, what its ΔW can have)
        dropped = _dropped_energy(S, k)
        if dropped > 1e-6:  # σ² is ΔW's energy: fp32 SVD noise of an exact rank-k sum stays far below this
            truncated.append((path, dropped))
        new_A = torch.zeros_like(A, dtype=torch.float32)
        new_B = torch.zeros_like(B, dtype=torch.float32)
        new_B[:, :k] = U[:, :k] * S[:k]
        new_A[:k] = Vh[:k]
    elif combination_type == "cat":
        blocks_A, blocks_B = [], []
        for a, w in zip(adapters, weights):
            width = max(m.r.get(a, 0) for _, m in layers)
            if a in layer.r:
                a_w = layer.lora_A[a].weight.float() * (w * layer.scaling[a])
                b_w = layer.lora_B[a].weight.float()
                pad = width - a_w.shape[0]  # this layer may hold a smaller rank (rank_pattern): pad with 0
                a_w = torch.cat([a_w, a_w.new_zeros(pad, a_w.shape[1])])
                b_w = torch.cat([b_w, b_w.new_zeros(b_w.shape[0], pad)], dim=1)
            else:
                a_w, b_w = A.new_zeros(width, A.shape[1]).float(), B.new_zeros(B.shape[0], width).float()
            blocks_A.append(a_w)
            blocks_B.append(b_w)
        new_A, new_B = torch.cat(blocks_A), torch.cat(blocks_B, dim=1)
    else:  # PEFT's split: sqrt(|w·s|) on both factors, the sign on A
        ws = [(a, w * layer.scaling[a]) for a, w in zip(adapters, weights) if a in layer.r]
        new_A = sum(layer.lora_A[a].weight.float() * math.copysign(abs(c) ** 0.5, c) for a, c in ws)
        new_B = sum(layer.lora_B[a].weight.float() * abs(c) ** 0.5 for a, c in ws)
    _check_combined(path, weights, new_A, new_B)
    A.copy_(new_A)
    B.copy_(new_B)
    return truncated


def _check_combined(path: str, weights: list[float], *tensors: torch.Tensor) -> None:
    """MergeError naming `weights` and the layer at `path` where the weighted ΔW (or the factors of it) holds inf
    or NaN in float32: the adapters' own tensors are finite (load_adapter checks), so the weights scaled them past
    float32's range."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        shown = "[" + ", ".join(f"{w:g}" for w in weights) + "]"
        raise MergeError(f"weights {shown}: the weighted ΔW of {path} passes float32's range (inf); use smaller "
                         f"weights")


def _check_linear_ranks(layers: list, adapters: list[str]) -> None:
    """ConfigError naming the first layer where `adapters` have different ranks: linear sums A's and B's, so the
    adapters meeting in a layer need one rank there. Checked per layer, as the layers hold them: adapters of one r
    with a rank_pattern where only one of them is (PEFT takes these) or of two r on separate layers combine; one
    whole-model rank set refused the first."""
    for path, layer in layers:
        here = {a: layer.r[a] for a in dict.fromkeys(adapters) if a in layer.r}
        if len(set(here.values())) > 1:
            named = ", ".join(f"{a}: {k}" for a, k in here.items())
            raise ConfigError([f"combination_type 'linear' needs adapters of one rank, got ranks "
                               f"{sorted(set(here.values()))} in {path} ({named}); use 'cat' (exact) or 'svd'"])


def _svd_rank_cap(layer: LoraLayer, adapters: list[str]) -> int:
    """The largest rank Σ w_i ΔW_i can have in `layer`: min(out, in), and at most the sum of the adapters' ranks."""
    out_features, in_features = _delta_shape(layer)
    return min(out_features, in_features, sum(layer.r[a] for a in adapters if a in layer.r))


def _delta_shape(layer: LoraLayer) -> tuple[int, int]:
    """ΔW's (out, in) of `layer`: B's rows by A's columns, whatever the base layer's weight layout."""
    name = next(iter(layer.r))
    return layer.lora_B[name].weight.shape[0], layer.lora_A[name].weight.shape[1]


def _dropped_energy(S: torch.Tensor, k: int) -> float:
    """The fraction of Σσ² (ΔW's energy) in the singular values `S` (descending) past the first `k`. S is divided
    by its largest value first: squared as they are, σ of 1e20 overflow fp32 and σ of 1e-20 underflow to 0."""
    if S.numel() == 0 or S[0] == 0:
        return 0.0
    energy = (S / S[0]).square()
    return (energy[k:].sum() / energy.sum()).item()


PROBE_TOKENS = 8
LOGIT_GROWTH = 1e3  # merged logits beyond this × the base's (at least 1): weights no adapter was trained for


@dataclasses.dataclass(frozen=True)
class Probe:
    """What one forward of the probe tokens showed: the largest |logit|, and per normalization layer (its path)
    the largest |value| entering it and whether the mean of squares it takes of a row stays finite in float32."""
    logits: float
    finite: bool
    norms: dict[str, tuple[float, bool]]


@torch.no_grad()
def _probe(model: nn.Module) -> Probe:
    """One forward of tokens 0..7, watching each normalization layer's input (RMSNorm, LayerNorm: any module whose
    class name ends in Norm): an input whose x² overflows float32 makes RMSNorm divide by inf, so the hidden state
    becomes 0 and the logits finite garbage (--weights 1e30)."""
    norms = {}

    def watch(path):
        def hook(module, args):
            x = args[0].float()
            largest, finite = norms.get(path, (0.0, True))
            norms[path] = (max(largest, x.abs().max().item()), finite and bool(x.square().mean(-1).isfinite().all()))
        return hook

    handles = [m.register_forward_pre_hook(watch(p)) for p, m in model.named_modules()
               if type(m).__name__.endswith("Norm")]
    try:
        vocab = model.get_input_embeddings().num_embeddings
        probe = torch.arange(PROBE_TOKENS, device=model.device).remainder(vocab).unsqueeze(0)  # (1, 8) token ids
        logits = model(probe).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    finite = bool(torch.isfinite(logits).all())
    return Probe(logits.abs().max().item() if finite else math.inf, finite, norms)


def _check_forward(model: nn.Module, base: Probe, what: str) -> None:
    """AdapterError starting with `what` (it names --weights) when the merged model's forward on the probe tokens is
    broken: NaN/inf logits (the weights are finite, yet scaled this far the activations pass float32's range), a
    hidden state whose square a normalization layer cannot take in float32 (it zeroes the state: finite, meaningless
    logits), or logits beyond LOGIT_GROWTH × the base's. A trained adapter at weights 1 or 2 is far from each."""
    merged = _probe(model)
    if not merged.finite:
        name, param = max(model.named_parameters(), key=lambda item: item[1].abs().max().item())
        raise AdapterError(f"{what}: the merged model's logits are NaN/inf (its largest weight: "
                           f"{param.abs().max().item():.3g} in {name}); use smaller --weights")
    overflowed = [(path, largest) for path, (largest, finite) in merged.norms.items() if not finite]
    if overflowed:
        path, largest = overflowed[0]
        was = base.norms.get(path, (math.nan, True))[0]
        raise AdapterError(f"{what}: the merged model's hidden state entering {path} reaches |h| {largest:.3g} (the "
                           f"base's: {was:.3g}), too large to square in float32: the layer zeroes it and the logits "
                           f"mean nothing; use smaller --weights")
    bound = LOGIT_GROWTH * max(base.logits, 1.0)
    if merged.logits > bound:
        raise AdapterError(f"{what}: the merged model's largest |logit| is {merged.logits:.3g}, over "
                           f"{LOGIT_GROWTH:g} × the base's ({base.logits:.3g}, counted as at least 1); use smaller "
                           f"--weights")


def _load_dtype(base: str, dtype: str, quantize: str | None) -> str:
    """The dtype to load the base in for an export in `dtype`, so the export is round(W0 + ΔW), rounded once: a
    base stored in `dtype` (bf16, fp16: what its safetensors hold, models.stored_dtype, not what its config says)
    in it, each layer merged in fp32 and cast back (merge_and_unload), with fp32 adapters (layer.adapter_dtype:
    factors cast to bf16 built ΔW from rounded values, half the elements of a bf16 merge off), so the whole model is
    never held in fp32; any other base in fp32, cast to `dtype` after the merge. A quantized base is de-quantized in
    `dtype` as its training ran."""
    if quantize is not None:
        return dtype
    return dtype if dtype != "fp32" and stored_dtype(base) == DTYPES[dtype] else "fp32"


def export_merged(base: str, adapters: list[str], out_dir: str | Path, dtype: str = "fp32",
                  weights: list[float] | None = None, combination_type: str = "cat",
                  quantize: str | None = None, overwrite: bool = False, svd_rank: int | None = None) -> Path:
    """Load `base`, load each adapter directory, merge, and write a standard transformers checkpoint.

    Several adapters are combined first with `add_weighted_adapter` (weights default to 1 each); the default
    "cat" is exact (Σ w_i ΔW_i): the checkpoint is full rank anyway, so nothing is gained by truncating with "svd".
    `svd_rank` (only with combination_type "svd", one adapter too): the rank "svd" truncates to, as in
    add_weighted_adapter (default: the largest adapter's r).
    The options are checked before anything loads (ConfigError names each bad one as the CLI spells it).
    `quantize` ("nf4", ...): merge into the same 4-bit base the adapter was trained on (QLoRA), de-quantized,
    so the export reproduces 4-bit base + adapter; without it the adapter is added to the full-precision base.
    The directory appears complete or not at all, and an overwritten one is the old set or the new one, never a
    mix (utils.files.atomic_dir); a full disk is a DiskError. A non-empty `out_dir` needs `overwrite`; then only
    the files the export writes are replaced there (plus an older export's weight files, which transformers would
    load instead of the new ones, and an adapter's files, which it would attach to them); the other files stay.
    Without `overwrite`, an `out_dir` another command filled meanwhile is left to it (FileExistsError).
    The merge runs in fp32 (unless `quantize`) and is rounded once to `dtype`: round(W0 + Σ w_i ΔW_i); a base
    stored in `dtype` (bf16, fp16) is loaded in it and merged a layer at a time (the model never whole in fp32).
    An `out_dir` that is, holds or lies inside the base or an adapter is refused (loraforge.utils.outputs).
    """
    if not adapters:
        raise ConfigError(["adapters []: give at least one adapter directory to merge (the command's --adapter)"])
    if weights is not None:
        weights = as_weights(weights, len(adapters))
    problems = [f"--{p.replace('combination_type', 'combination')}"
                for p in check_combination(len(adapters), weights, combination_type)]
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, Integral) or svd_rank < 1):
        problems.append(f"--svd-rank {svd_rank!r}: give a whole number ≥ 1, or leave it out for the largest adapter "
                        f"rank")
    elif svd_rank is not None and combination_type != "svd":
        problems.append(f"--svd-rank {svd_rank}: only with --combination svd (the rank it truncates to; "
                        f"--combination {combination_type} keeps every rank): add --combination svd or leave "
                        f"--svd-rank out")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANT_TYPES:
        problems.append(f"--quantize {quantize!r}: use one of {', '.join(QUANT_TYPES)}, or leave it out")
    if problems:
        raise ConfigError(problems)
    if quantize in ("nf4", "fp4"):  # merge quantizes on the CPU: a width it gets wrong, before the base loads
        check_model_widths(model_skeleton(base), quantize, "cpu", words="flag")
    # one adapter with another weight (or truncated by --svd-rank): combined alone, the same way
    combine = len(adapters) > 1 or (weights or [1.0]) != [1.0] or svd_rank is not None
    if combine and len(adapters) == 1 and svd_rank is None:
        _refuse_unscalable(str(adapters[0]), read_adapter_config(adapters[0], adapters), weights)
    elif combine:
        configs = {str(a): read_adapter_config(a, adapters) for a in adapters}  # DIR DIR/other: other not "unused"
        _refuse_uncombinable(configs)
        _warn_other_bases(configs)
        _warn_given_twice(adapters, weights or [1.0] * len(adapters))
    # before loading anything; a built-in or .gguf base's cached conversion is an input too (the name is no path)
    check_output(out_dir, overwrite=overwrite, inputs=[base, *conversion_paths(base), *adapters],
                 room=published_room(out_dir, LONGEST_FILE))
    check_replaceable(out_dir)
    check_writable(out_dir)
    loaded = _load_dtype(base, dtype, quantize)
    model, tokenizer = load_base(base, dtype=loaded, quantize=quantize)
    if loaded != dtype:
        _check_base_range(model, base, dtype)
    probed = _probe(model) if weights is not None else None  # the base's forward, for _check_forward to compare
    names = []
    for i, adapter_dir in enumerate(adapters):
        name = f"adapter{i}"
        # fp32 on any base (layer.adapter_dtype): ΔW from the file's values
        load_adapter(model, adapter_dir, name, given=adapters)
        names.append(name)
    given = ", ".join(map(str, adapters)) + (f" with --weights {' '.join(f'{w:g}' for w in weights)}" if weights
                                               else "")
    if combine:
        try:
            add_weighted_adapter(model, names, weights or [1.0] * len(names), "combined", combination_type,
                                 svd_rank=svd_rank)
        except ConfigError as e:  # the library's argument as the command's flag
            raise ConfigError([p.replace(f"combination_type {combination_type!r}", f"--combination {combination_type}")
                               .replace("use 'cat' (exact) or 'svd'", "use --combination cat (exact) or svd")
                               for p in e.problems]) from None
        except MergeError:  # svd of that ΔW failed in torch (LinAlgError); as when the merge finds the inf
            raise AdapterError(f"cannot merge into --dtype {dtype}: adapter {given}: the weighted ΔW passes float32's "
                               f"range (inf); use smaller --weights") from None
        names = ["combined"]
    set_adapter(model, names[0])
    try:
        merge_and_unload(model)
    except MergeError as e:  # adapter0, ... as the user gave them; "combined": all of them, as weighted
        message = str(e).replace(repr("combined"), given)
        for name, adapter_dir in zip(names, adapters):
            message = message.replace(repr(name), str(adapter_dir))
        if weights is not None and "NaN/inf weights" in message:  # the files held finite weights (load checked)
            message = f"adapter {given}: the weighted ΔW passes float32's range (inf); use smaller --weights"
        elif weights is not None:  # past fp16's range, merged a layer at a time (a base stored in fp16)
            message += ", or with smaller --weights"
        raise AdapterError(f"cannot merge into --dtype {dtype}: {message}") from None
    if weights is not None:  # finite weights of 1e35 still overflow the forward (gate·up of 1e37 each: inf)
        _check_forward(model, probed, f"cannot merge into --dtype {dtype}: adapter {given}")
    if loaded != dtype:  # merged in fp32: one rounding to --dtype, of W0 + ΔW
        for pname, param in model.named_parameters():
            cast = param.data.to(DTYPES[dtype])
            if not torch.isfinite(cast).all() and torch.isfinite(param.data).all():
                raise AdapterError(f"cannot merge into --dtype {dtype}: adapter {given}: the merged weight {pname} "
                                   f"passes {str(DTYPES[dtype]).removeprefix('torch.')}'s range (|W| up to "
                                   f"{param.data.abs().max().item():.4g}); merge in fp32 or bf16"
                                   + (", or with smaller --weights" if weights else ""))
            param.data = cast
    for pname, param in model.named_parameters():  # whichever path merged and cast it: no NaN/inf is written
        bad = (~torch.isfinite(param.data)).sum().item()
        if bad:
            raise AdapterError(f"cannot merge into --dtype {dtype}: adapter {given}: the merged weight {pname} holds "
                               f"{bad} NaN/inf of {param.numel()} values in {str(param.dtype).removeprefix('torch.')}; "
                               f"merge in fp32" + (", or with smaller --weights" if weights else ""))
    out = Path(out_dir)
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    # --overwrite into a used folder replaces our files only (and an older export's weight files, which
    # transformers would load instead of the new ones, and an adapter's, which it would attach to them); the
    # folder is the old set or the new one, never a mix
    with atomic_dir(out, need_bytes=need, drop=WEIGHT_FILES + ADAPTER_FILES, replace=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


__all__ = ["merge", "unmerge", "merge_and_unload", "add_weighted_adapter", "export_merged", "embeddings_tied",
           "LoraConfig"]
