"""AdaLoRA (Zhang et al., ICLR 2023): an SVD-shaped update whose rank is allocated by importance during training.

Each target layer holds ΔW = P Λ Q in PEFT's names: lora_B = P (out, r), lora_E = diag(Λ) (r, 1), lora_A = Q (r, in):

    h = base(x) + lora_alpha / (init_r + 1e-5) · x (A ∘ E)ᵀ Bᵀ

The training loop calls `RankAllocator.step(model, global_step)` after each optimizer step (before zero_grad:
it reads the gradients) and adds `orth_regularization(model)` to the loss. The allocator keeps EMA-smoothed
sensitivity |w·∇w| and its uncertainty per weight, scores each triplet (E_i, row A_i, column B_i), and zeroes E_i of
the least important ones to meet a total budget that falls from init_r·n to target_r·n on a cubic schedule.
Saving writes the kept triplets only, with PEFT's `rank_pattern` (module.lora_E -> list of kept flags), and the
scale stays lora_alpha / (init_r + 1e-5) after pruning, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from loraforge.config import (MAX_RANK, PEFT_INERT_FIELDS, PEFT_TASK_TYPE, ConfigError, LoraConfig,
                              adalora_lora_problems, from_dict, integer_problems, layer_selection_problems,
                              module_list_problems, normalize_module_fields, peft_list, scale_warning,
                              unsupported_peft_fields, validate)
from loraforge.lora.inject import (LAYER_INDEX, LayerKindConflict, keep_base_biases, lora_layers, mark_trainable,
                                   resolve_targets, undone_on_failure, untie_shared)
from loraforge.lora.layer import LoraLayer, adapter_dtype
from loraforge.utils.hf import set_submodule

PREFIX = "base_model.model."


FROM_LORA = ("lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
             "bias", "base_model_name_or_path")
"""The fields a training config's adalora: section takes from its lora: section unless it sets them itself."""


@dataclass(frozen=True)
class AdaLoraConfig:
    """AdaLoRA adapter settings. Names, meanings and defaults as in Hugging Face PEFT's AdaLoraConfig."""

    total_step: int | None = None
    """Total optimizer steps of the run (required): the budget schedule ends at total_step - tfinal."""
    init_r: int = 12
    """Initial rank of every adapted layer."""
    target_r: int = 8
    """Average final rank per layer: the final total budget is target_r × number of adapted layers."""
    tinit: int = 0
    """Warm-up steps at the full budget before any pruning."""
    tfinal: int = 0
    """Final steps at the target budget with the rank pattern fixed."""
    deltaT: int = 1
    """Re-allocate (mask) every deltaT steps during the budget phase."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity |w·∇w|."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty |sensitivity − its EMA|."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty ‖AAᵀ−I‖ + ‖BᵀB−I‖ added to the loss."""
    rank_pattern: dict | None = None
    """Kept triplets per layer, as PEFT saves it: {"<module path>.lora_E": [true, false, ...] (init_r flags)}.
    Written when saving; on load, each layer gets only its kept triplets."""
    lora_alpha: float = 8
    """Scale numerator: ΔW is multiplied by lora_alpha / (init_r + 1e-5) (0: the layer's rank is used: init_r, or
    the kept rank of a layer loaded pruned, as PEFT does; loaded only: training refuses it)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input x."""
    target_modules: str | tuple[str, ...] | None = None
    """Which linear layers get adapters, as in LoraConfig (None: the attention projections)."""
    exclude_modules: str | tuple[str, ...] | None = None
    """Layers that never get an adapter, as in LoraConfig."""
    layers_to_transform: tuple[int, ...] | None = None
    """Only these decoder-layer indices get adapters (None: all), as in LoraConfig."""
    layers_pattern: str | tuple[str, ...] | None = None
    """With layers_to_transform: the module list whose index counts, as in LoraConfig."""
    bias: str = "none"
    """Which biases train: none, all, or lora_only."""
    init_lora_weights: bool = True
    """True: E zeros, A and B ~ N(0, 0.02) (a fresh adapter is a no-op). False: all N(0, 1) (tests only)."""
    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out) (GPT-2's Conv1D). Detected automatically."""
    base_model_name_or_path: str | None = None
    """The base the adapter was trained on (informational)."""

    def __post_init__(self):
        validate(integer_problems(self, {"total_step": "the run's number of optimizer steps (a positive integer)",
                                         "init_r": "a positive integer", "target_r": "a positive integer",
                                         "tinit": "an integer ≥ 0 (steps)", "tfinal": "an integer ≥ 0 (steps)",
                                         "deltaT": "a positive integer (steps)"}, optional=("total_step",)))
        p = []
        for name in ("tinit", "tfinal"):
            if getattr(self, name) < 0:
                p.append(f"{name}: must be ≥ 0 (steps), got {getattr(self, name)}")
        if self.total_step is None or self.total_step <= 0:
            p.append(f"total_step: AdaLoRA needs the run's number of optimizer steps (> 0), got {self.total_step}")
        elif self.tinit >= self.total_step - self.tfinal and min(self.tinit, self.tfinal) >= 0:
            name = "tinit" if self.tinit >= self.total_step or not self.tfinal else "tfinal"  # the one that overreaches
            p.append(f"{name}: {getattr(self, name)} leaves no budget phase (tinit {self.tinit} + tfinal "
                     f"{self.tfinal} ≥ total_step {self.total_step}); lower tinit/tfinal or raise total_step (in a "
                     f"training run: training.max_steps, or training.epochs)")
        if not 0 < self.init_r <= MAX_RANK:
            p.append(f"init_r: must be a positive integer (at most {MAX_RANK}), got {self.init_r} (try 12)")
        if not 0 < self.target_r <= self.init_r:
            p.append(f"target_r: must be in 1..init_r ({self.init_r}), got {self.target_r}")
        if self.deltaT < 1:
            p.append(f"deltaT: must be at least 1, got {self.deltaT}")
        if not 0.0 < self.beta1 < 1.0:  # 0: the smoothed sensitivity is the last one, every uncertainty 0: no scores
            p.append(f"beta1: must be in (0, 1), got {self.beta1} (try 0.85)")
        if not 0.0 <= self.beta2 < 1.0:  # 0 (as PEFT takes it): the uncertainty is the last step's alone
            p.append(f"beta2: must be in [0, 1), got {self.beta2} (try 0.85)")
        if not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            p.append(f"orth_reg_weight: must be a finite number >= 0, got {self.orth_reg_weight} (try 0.5)")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha >= 0):
            p.append(f"lora_alpha: must be a finite number >= 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            p.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            p.append(f"bias: {self.bias!r} is not one of ['none', 'all', 'lora_only']")
        for key, flags in (self.rank_pattern or {}).items():
            if not isinstance(flags, (list, tuple)) or not all(isinstance(f, bool) for f in flags) \
                    or len(flags) != self.init_r:
                p.append(f"rank_pattern.{key}: expected {self.init_r} true/false flags (PEFT's format), got {flags!r}")
        p += module_list_problems("target_modules", self.target_modules)
        p += module_list_problems("exclude_modules", self.exclude_modules)
        p += layer_selection_problems(self)
        validate(p)

    def to_peft_dict(self) -> dict:
        targets = self.target_modules
        return {
            "peft_type": "ADALORA",
            "task_type": PEFT_TASK_TYPE,
            "base_model_name_or_path": self.base_model_name_or_path,
            "init_r": self.init_r,
            "target_r": self.target_r,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.deltaT,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": self.total_step,
            "rank_pattern": {k: list(v) for k, v in self.rank_pattern.items()} if self.rank_pattern else None,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": sorted(targets) if isinstance(targets, tuple) else targets,
            "exclude_modules": peft_list(self.exclude_modules),
            "layers_to_transform": list(self.layers_to_transform) if self.layers_to_transform else None,
            "layers_pattern": peft_list(self.layers_pattern),
            "bias": self.bias,
            "init_lora_weights": self.init_lora_weights,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": None,
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_train_config(cls, lora: LoraConfig, adalora: dict) -> "AdaLoraConfig":
        """A training config's `adalora:` section; targets, lora_alpha, dropout and bias come from its `lora:`
        section unless the `adalora:` section sets them. `lora:` settings AdaLoRA has no use for (use_dora,
        use_rslora, init_lora_weights, modules_to_save, rank/alpha patterns) are refused, not ignored."""
        validate(adalora_lora_problems(lora))
        shared = {name: getattr(lora, name) for name in FROM_LORA}
        return from_dict(cls, {**shared, **adalora}, prefix="adalora.")

    @classmethod
    def from_peft_dict(cls, data: dict, source: str = "adapter_config.json") -> "AdaLoraConfig":
        """Read PEFT's JSON. LoRA fields that AdaLoRA does not use (r, use_rslora, alpha_pattern...) are ignored,
        as PEFT ignores them; other unknown fields with a value set give a warning."""
        if data.get("peft_type") != "ADALORA":
            raise ConfigError([f"{source}: peft_type is {data.get('peft_type')!r}; this loader reads 'ADALORA'"])
        if data.get("modules_to_save"):
            raise ConfigError([f"{source}: modules_to_save is not supported with AdaLoRA in loraforge"])
        if data.get("use_dora"):  # soak: loaded as plain AdaLoRA, unsaid
            raise ConfigError([f"{source}: use_dora: {data['use_dora']!r} with peft_type ADALORA: AdaLoRA has no DoRA "
                               f"(PEFT refuses to load it too); set use_dora to false, or give a LORA adapter"])
        validate(unsupported_peft_fields(data, source))
        known = {f.name for f in dataclasses.fields(cls)}
        unused_lora = {f.name for f in dataclasses.fields(LoraConfig)} | {"modules_to_save"}
        ignored = sorted(k for k in set(data) - known - unused_lora - PEFT_INERT_FIELDS
                         if data[k] not in (None, False, {}, [], ""))
        if ignored:
            warnings.warn(f"{source}: ignoring fields this version does not use: {ignored}", stacklevel=2)
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if "target_r" not in values and isinstance(values.get("init_r"), int):
            # PEFT's default target_r (8) is not checked against init_r there; it only sets a training budget, so a
            # file without it and an init_r below 8 loads (soak: refused, "target_r: must be in 1..init_r")
            values["target_r"] = min(cls.target_r, values["init_r"])
        normalize_module_fields(values)
        if isinstance(values.get("layers_to_transform"), int):
            values["layers_to_transform"] = [values["layers_to_transform"]]
        if not isinstance(values.get("init_lora_weights", True), bool):
            values["init_lora_weights"] = True  # an init recipe: irrelevant once the weights load
        return from_dict(cls, values, prefix=f"{source}: ")


def adalora_scaling(lora_alpha: float, r: int, init_r: int) -> float:
    """PEFT's scaling of an AdaLoRA layer of rank r: lora_alpha (or, if alpha is 0, the layer's rank: init_r, or the
    kept rank of a layer loaded pruned, as PEFT's resize_modules_by_rank_pattern builds it) divided by ranknum + 1e-5,
    and ranknum = init_r, also after pruning (it is not saved; the pruned layer copies it back)."""
    return (lora_alpha if lora_alpha > 0 else float(r)) / (init_r + 1e-5)


class SVDLinear(LoraLayer):
    """AdaLoRA on a linear layer: ΔW = B (A ∘ E) · lora_alpha / (init_r + 1e-5)."""

    adapter_modules = ("lora_A", "lora_E", "lora_B", "lora_dropout")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()  # name -> (r, in): right singular vectors Q
        self.lora_E = nn.ParameterDict()  # name -> (r, 1): singular values Λ
        self.lora_B = nn.ParameterDict()  # name -> (out, r): left singular vectors P
        self.lora_dropout = nn.ModuleDict()
        self.rank_mask: dict[str, list[bool]] = {}  # name -> init_r flags: triplets the allocator keeps

    def add_adapter(self, name: str, init_r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    kept: list[bool] | None = None, init_lora_weights: bool = True) -> None:
        """`kept`: init_r flags of a pruned adapter (PEFT's rank_pattern entry); the layer holds only those."""
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first or pick another name")
        kept = list(kept) if kept is not None else [True] * init_r
        r = sum(kept)
        weight = self.base_layer.weight
        kw = dict(device=weight.device, dtype=adapter_dtype(weight))
        self.lora_A[name] = nn.Parameter(torch.randn(r, self.in_features, **kw))
        self.lora_E[name] = nn.Parameter(torch.randn(r, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, r, **kw))
        if init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[name])  # E = 0: a fresh adapter leaves the model unchanged
                nn.init.normal_(self.lora_A[name], std=0.02)
                nn.init.normal_(self.lora_B[name], std=0.02)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = adalora_scaling(lora_alpha, r, init_r)
        self.rank_mask[name] = kept
        self.train(self.training)  # the new Dropout takes the layer's mode (LoraLinear.add_adapter)
        self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.rank_mask.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scaling · B @ (A ∘ E), shaped like the base weight."""
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        delta = (B @ (A * E)) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(A.dtype))
        return (x @ (A * E).T @ B.T) * self.scaling[name]  # (..., in) -> (..., r) -> (..., out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged_adapters and self.training and torch.is_grad_enabled():
            self.refuse_training_merged()
        result = self.base_layer(x, *args, **kwargs)
        if self.row_forward is not None:  # a batch with one adapter per row (mixed_rows, or a server's stacks)
            return self.row_forward(x, result)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = (result + self._lora(name, x)).to(result.dtype)  # one rounding, as PEFT's in-place +=
        return result

    def _row_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self._lora(name, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"


def inject_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default",
                   advise: bool = True) -> nn.Module:
    """Add AdaLoRA adapter `adapter_name` to `model` in place (only it trains); layers pruned per config.rank_pattern.
    advise: warn about a lora_alpha scale (lora_alpha / init_r) outside config.USUAL_SCALE, and all-linear without a
    mixture of experts' experts (loading passes False)."""
    configs, config, targets = resolve_targets(model, config, adapter_name, advise)
    if advise and config.lora_alpha != 0:  # 0 means the layer's rank: scale 1 (SVDLinear.add_adapter)
        scale_warning(config.lora_alpha, config.init_r, rank="init_r")
    pattern = config.rank_pattern or {}
    with undone_on_failure(model, adapter_name):  # Ctrl-C midway: the model as it was
        untied = untie_shared(model, [p for p in targets if not isinstance(model.get_submodule(p), LoraLayer)])
        for path in targets:
            module = model.get_submodule(path)
            if isinstance(module, LoraLayer) and not isinstance(module, SVDLinear):
                raise LayerKindConflict([f"target_modules: {path} already holds a LoRA adapter; AdaLoRA and LoRA "
                                         f"adapters cannot share a layer (delete the other adapter first)"])
            if not isinstance(module, SVDLinear):
                module = SVDLinear(module)
                module.untied_from = untied.get(path)  # a tied lm_head: its own weight (delete_adapter ties it)
                set_submodule(model, path, module)
            module.add_adapter(adapter_name, config.init_r, config.lora_alpha, config.lora_dropout,
                               kept=pattern.get(f"{path}.lora_E"), init_lora_weights=config.init_lora_weights)
        configs[adapter_name] = config
        keep_base_biases(model, config, adapter_name)
        mark_trainable(model, adapter_name)
    return model


def svd_layers(model: nn.Module, name: str = "default") -> list[tuple[str, SVDLinear]]:
    model = getattr(model, "module", model)  # DDP
    return [(p, m) for p, m in lora_layers(model) if isinstance(m, SVDLinear) and name in m.r]


class RankAllocator:
    """Budget schedule and importance-based masking of AdaLoRA triplets (PEFT's RankAllocator, explicit step)."""

    def __init__(self, model: nn.Module, adapter_name: str = "default", total_step: int | None = None):
        """`total_step`: replaces the config's total_step (which AdaLoraConfig requires) with the run's real number
        of optimizer steps, e.g. where epochs decide it; it is stored in the model's adapter config too, so the saved
        adapter_config.json says it."""
        self.name = adapter_name
        configs = getattr(model, "module", model).lora_configs
        if total_step is not None and total_step != configs[adapter_name].total_step:
            configs[adapter_name] = dataclasses.replace(configs[adapter_name], total_step=total_step)
        self.config: AdaLoraConfig = configs[adapter_name]
        self.finalized = False  # the final allocation to target_r · n layers was made
        self.model = model  # for state() / load_state(); step() takes the model explicitly
        layers = svd_layers(model, adapter_name)
        if not layers:
            raise ValueError(f"no AdaLoRA layers for adapter {adapter_name!r}; inject_adalora() first")
        pruned = [p for p, m in layers if m.r[adapter_name] != len(m.rank_mask[adapter_name])]
        if pruned:
            raise ValueError(f"adapter {adapter_name!r} was loaded already pruned ({pruned[0]}, ...); the allocator "
                             f"needs full init_r layers: train a fresh adapter")
        if not self.config.lora_alpha > 0:  # PEFT: the rank while training, the kept rank once saved and loaded
            raise ValueError(f"lora_alpha: {self.config.lora_alpha} scales each layer by init_r while training but by "
                             f"its kept rank once the pruned adapter is saved and loaded, so the adapter saved would "
                             f"not be the model trained; inject with lora_alpha={self.config.init_r} (init_r), the "
                             f"same scale")
        self.init_budget = sum(m.r[adapter_name] for _, m in layers)
        self.target_budget = self.config.target_r * len(layers)
        self.reset_importance()

    def reset_importance(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}  # "<path>.lora_A" -> EMA of |w·∇w|
        self.exp_avg_unc: dict[str, torch.Tensor] = {}  # EMA of |(|w·∇w|) − its EMA|

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank budget at `step`, whether to mask at this step): PEFT's cubic schedule."""
        _check_step(step)
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * progress ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self, model: nn.Module) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for path, layer in svd_layers(model, self.name):
            for attr in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, attr)[self.name]
                if p.grad is None:
                    raise RuntimeError(f"{path}.{attr} has no gradient: call allocator.step(model, step) after "
                                       f"loss.backward() and optimizer.step(), before optimizer.zero_grad()")
                key = f"{path}.{attr}"
                ipt = (p * p.grad).abs()
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt  # sensitivity, smoothed
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()  # uncertainty

    def _triplet_scores(self, path: str) -> torch.Tensor:
        """Score of each triplet i: s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), s = sensitivity · uncertainty. (r,)"""
        s = {a: self.exp_avg_ipt[f"{path}.{a}"] * self.exp_avg_unc[f"{path}.{a}"]
             for a in ("lora_A", "lora_E", "lora_B")}
        return s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> None:
        """Zero E of the lowest-scoring triplets so that about `budget` stay (ties at the threshold all go)."""
        layers = svd_layers(model, self.name)
        scores = {path: self._triplet_scores(path) for path, _ in layers}
        k = self.init_budget - budget
        if k <= 0:
            return
        threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores.values()]), k).values.item()
        for path, layer in layers:
            keep = scores[path] > threshold
            layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)
            layer.rank_mask[self.name] = keep.tolist()

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        for _, layer in svd_layers(model, self.name):
            keep = torch.tensor(layer.rank_mask[self.name], device=layer.lora_E[self.name].device)
            layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)

    def step(self, model: nn.Module, global_step: int) -> int:
        """Call after each optimizer step, before zero_grad. Returns the budget at `global_step`.

        Budget phase (step < total_step − tfinal): update the scores, mask every deltaT steps. At total_step −
        tfinal, or the first step past it where that one never came: the final allocation to target_r·n. After it,
        whatever step comes (a later one, or an earlier one given again): re-apply that pattern, so masked E stay
        zero. A negative step is refused.
        """
        _check_step(global_step)
        end = self.config.total_step - self.config.tfinal
        if self.finalized:  # soak: step 1 after the final allocation reopened the schedule (kept rank 16 -> 25)
            self.apply_masks(model)
            return self.target_budget
        if global_step < end:
            self.update_importance(model)
            budget, mask_now = self.budget(global_step)
            if mask_now:
                self.mask_to_budget(model, budget)
            return budget
        # at end, or past it without the final allocation: fp16's loss scaler skipped the update of step `end`, so
        # the loop never called it (the allocation then came only with the save, after the tfinal steps meant to
        # train the kept triplets)
        if not self.exp_avg_ipt:  # a schedule whose first step is its last: rank by this step's gradients
            self.update_importance(model)
        self.finalize(model)
        return self.target_budget

    def finalize(self, model: nn.Module) -> None:
        """The final allocation to the target budget, once (call before saving if the loop's last step index
        never reached total_step − tfinal, e.g. 0-based steps with tfinal = 0). Idempotent."""
        if self.finalized:
            return
        if self.exp_avg_ipt:  # no scores (no step taken): nothing to rank by, keep every triplet
            self.mask_to_budget(model, self.target_budget)
        self.reset_importance()
        self.finalized = True

    def kept_rank(self) -> int:
        """Triplets kept now, summed over the layers: what the masks so far left (`budget()` is what the schedule
        asks of the next mask; ties at a threshold can leave fewer)."""
        return sum(sum(layer.rank_mask[self.name]) for _, layer in svd_layers(self.model, self.name))

    def orth_penalty(self, model: nn.Module) -> torch.Tensor:
        return orth_regularization(model, self.name)

    def state(self, tensors: bool = False) -> dict:
        """State for an exact resume: the kept-triplet flags and the EMAs, JSON-ready (float32 values survive JSON
        exactly), or with `tensors` the EMAs as CPU tensors, for a checkpoint's safetensors: they are 2× the
        adapter's size (soak: SmolLM2-135M's 1.3M adapter values made 71 MB of JSON, dumped in 29 s at every save)."""
        def ema(v: torch.Tensor):
            return v.detach().cpu().contiguous() if tensors else v.tolist()

        return {"finalized": self.finalized,
                "rank_mask": {p: list(layer.rank_mask[self.name]) for p, layer in svd_layers(self.model, self.name)},
                "exp_avg_ipt": {k: ema(v) for k, v in self.exp_avg_ipt.items()},
                "exp_avg_unc": {k: ema(v) for k, v in self.exp_avg_unc.items()}}

    def load_state(self, state: dict) -> None:
        self.reset_importance()
        self.finalized = bool(state.get("finalized", False))
        for path, layer in svd_layers(self.model, self.name):
            if path in state.get("rank_mask", {}):
                layer.rank_mask[self.name] = list(state["rank_mask"][path])
            for attr in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, attr)[self.name]
                for kind in ("exp_avg_ipt", "exp_avg_unc"):
                    if f"{path}.{attr}" in state.get(kind, {}):
                        value = torch.as_tensor(state[kind][f"{path}.{attr}"]).to(p.device, p.dtype)  # tensor or list
                        getattr(self, kind)[f"{path}.{attr}"] = value


def _check_step(step: int) -> None:
    """Steps count from 0 (soak: a negative step answered with the full budget)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"global_step: must be an integer ≥ 0 (the optimizer steps taken so far), got {step!r}")


def orth_regularization(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """orth_reg_weight · mean over the adapter's matrices of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (PEFT: unsquared norms).

    Add it to the loss once per optimizer step (with gradient accumulation: divide by the number of micro-batches).
    """
    weight = getattr(model, "module", model).lora_configs[adapter_name].orth_reg_weight
    terms = []
    for _, layer in svd_layers(model, adapter_name):
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        for cov in (A @ A.T, B.T @ B):  # (r, r)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms:
        return torch.zeros(())
    return weight * torch.stack(terms).mean()


def final_rank_pattern(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """{module path: kept rank} of an AdaLoRA adapter."""
    return {path: sum(layer.rank_mask[adapter_name]) for path, layer in svd_layers(model, adapter_name)}


def export_pruned(model: nn.Module, name: str, config: AdaLoraConfig,
                  tensors: dict[str, torch.Tensor]) -> tuple[AdaLoraConfig, dict[str, torch.Tensor]]:
    """The config with `rank_pattern` and the tensors sliced to the kept triplets, as PEFT saves AdaLoRA."""
    pattern = {}
    for path, layer in svd_layers(model, name):
        kept = layer.rank_mask[name]
        pattern[f"{path}.lora_E"] = kept
        if layer.r[name] == len(kept) and not all(kept):  # a live, pruned layer: drop the masked triplets
            idx = torch.tensor([i for i, k in enumerate(kept) if k], dtype=torch.long)
            for attr, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                key = f"{PREFIX}{path}.{attr}"
                tensors[key] = tensors[key].index_select(dim, idx).contiguous()
    if all(all(v) for v in pattern.values()) and not config.rank_pattern:
        return config, tensors  # nothing pruned yet: PEFT writes no rank_pattern either
    return dataclasses.replace(config, rank_pattern=pattern), tensors


def plot_rank_heatmap(model: nn.Module, path: str, adapter_name: str = "default") -> str:
    """A PNG of the final rank by decoder layer (rows) × module (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = final_rank_pattern(model, adapter_name)
    cells: dict[tuple[int, str], int] = {}
    for module_path, rank in ranks.items():
        m = LAYER_INDEX.match(module_path)
        layer = int(m.group(1)) if m else -1
        column = module_path[m.end():] if m else module_path
        cells[(layer, column)] = rank
    rows = sorted({r for r, _ in cells})
    cols = sorted({c for _, c in cells})
    grid = torch.full((len(rows), len(cols)), float("nan"))
    for (r, c), rank in cells.items():
        grid[rows.index(r), cols.index(c)] = rank
    init_r = getattr(model, "module", model).lora_configs[adapter_name].init_r
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(cols), 2.2 + 0.35 * len(rows)))
    image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not torch.isnan(grid[i, j]):
                ax.text(j, i, int(grid[i, j]), ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) if r >= 0 else "-" for r in rows], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(f"AdaLoRA rank per module (init_r {init_r})", fontsize=9)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
