"""Adapter residency: which adapters are registered, which sit on the model (at most `max_loaded`, least recently
used evicted), and the per-layer stacks of their weights that give each row of a batch its own adapter.

Per-row LoRA (Punica / S-LoRA's idea, in plain PyTorch): every LoRA layer of the engine's model keeps a stack of
the resident adapters' weights, padded to the largest rank, slot 0 all zeros (the base model):
    Aᵀ: (slots, in, r_max)   (sB)ᵀ: (slots, r_max, out), each adapter's B times its scaling (one multiply saved
    per row), both in bf16 for a bf16 base, else fp32 (computed in fp32)
and a forward with rows using adapters `idx` (B,) computes
    h = base(x) + x · Aᵀ[idx] · (sB)ᵀ[idx]           x: (B, T, in); Aᵀ[idx] (B, in, r), (sB)ᵀ[idx] (B, r, out)
so the base matmul is shared and each row gets its own low-rank delta. Zero padding of the rank adds exact zeros.
Beyond plain LoRA, in the same stacks and batches: rank/alpha patterns (each layer has its own r and scaling),
AdaLoRA (A ∘ E stacked as A, scaling/ranknum folded into B) and DoRA, whose per-slot magnitude factor
g = m / ‖W0 + sBA‖ (out,) — 1 for the base and plain LoRA slots — gives h = base(x) + (g − 1)·W0x + g·delta.
modules_to_save and bias adapters change weights the rows share: refused, with the reason. So is an AdaLoRA adapter
on a module a resident LoRA adapter targets (or the reverse): the two layer types cannot wrap one module.
On a CPU with the decode kernels, `cpu_kernels.lora_rows` adds every row's delta into base(x) in one call per layer
(Punica's SGMV): each row's Aᵀ and (sB)ᵀ read where they lie in the stack, no gathered copies, bf16 widened in
registers (r_max is padded to a multiple of 8 for it). Elsewhere (GPUs) the gathered Aᵀ[idx], (sB)ᵀ[idx] go through
bmm, kept while the batch's composition stays the same, and a batch whose rows all use one adapter takes two plain
matmuls.

The stack plugs into the layer through `LoraLayer.row_forward`, the layer's per-row hook.
Adapters are PEFT directories loaded with `loraforge.lora.adapters.load_adapter` (every key and shape checked,
safetensors only). Only paths given at start or inside `adapters_dir` load.
"""

from __future__ import annotations

import collections
import itertools
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from loraforge.config import LoraConfig
from loraforge.inference import cpu_kernels
from loraforge.lora.adalora import AdaLoraConfig, SVDLinear
from loraforge.lora.adapters import AdapterError, delete_adapter, load_adapter, read_adapter_config
from loraforge.lora.inject import lora_layers
from loraforge.lora.layer import LoraLinear
from loraforge.serve.errors import ServeError, UnknownAdapter

BASE_ALIASES = ("base",)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(eq=False)
class Adapter:
    name: str
    path: Path
    uid: str  # the name on the model: unique per registration, so a re-registered name never mixes weights
    registered: bool = True
    slot: int | None = None  # index into the stacks while resident
    queued: int = 0  # requests submitted and not finished (an unloaded adapter stays until they finish)
    running: int = 0  # rows in the running batch (a resident adapter in use is never evicted)
    load_id: int = 0  # unique per load onto the model (0 while not resident): what its cached prefixes belong to


class RowSlots:
    """The slot of each row of the current forward, shared by every stack; `version` changes with the rows."""

    def __init__(self, device: torch.device):
        self.device = device
        self.slots: list[int] = []
        self.index = torch.zeros(0, dtype=torch.long)
        self.uniform: int | None = 0  # the one slot every row uses, else None
        self.version = 0

    def set(self, slots: list[int]) -> None:
        if slots == self.slots:
            return  # the same composition: the stacks keep what they gathered
        self.slots = list(slots)
        self.index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.uniform = slots[0] if slots and all(s == slots[0] for s in slots) else None
        self.version += 1


class Stack:
    """One layer's resident adapters stacked by slot, rank zero-padded to r_max; slot 0 stays zero (base).

    Stored transposed, as the products read them: At (slots, in, r) and sBt (slots, r, out), so a row's delta is
    x·At·sBt, two row-major products with no transposed view and the result already in (B, T, out). In the base's
    dtype where that is bf16 (as vLLM holds LoRA weights; the rounding of A and sB, 2⁻⁹ of the delta, is below the
    bf16 output's own), else fp32; computed in fp32 either way.
    """

    def __init__(self, layer: LoraLinear | SVDLinear, slots: int, r: int, rows: RowSlots,
                 adapter_dtype: str = "auto"):
        w = layer.base_layer.weight
        r = _padded(r)
        # bf16 stacks for a bf16 base halve what a step reads: 32 rows on 32 adapters, r=8, 120 layers of SmolLM2,
        # the per-row LoRA of a decode step 3.2 ms with bf16 stacks, 7.0 ms with fp32 (lora_rows, this Xeon)
        dtype = stack_dtype(adapter_dtype, w.dtype)
        self.At = torch.zeros(slots, layer.in_features, r, dtype=dtype, device=w.device)
        self.Bt = torch.zeros(slots, r, layer.out_features, dtype=dtype, device=w.device)  # (scaling · B)ᵀ
        self.g: torch.Tensor | None = None  # (slots, out) fp32 DoRA's magnitude factor, once a DoRA adapter is in
        bias = getattr(layer.base_layer, "bias", None)
        self.bias = bias.detach() if bias is not None else None  # W0x = base_out - bias
        self.rows = rows
        self._gathered: tuple | None = None  # (version, At[idx], sBt[idx]) for the rows' composition (bmm path)

    def put(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float, g: torch.Tensor | None = None) -> None:
        """Slot `slot` takes A (r, in), B (out, r), its scaling and DoRA's factor g (out,) or None."""
        r = A.shape[0]
        if r > self.At.shape[2]:  # grow the padded rank; the zero padding adds nothing
            grow = _padded(r) - self.At.shape[2]
            self.At = torch.cat([self.At, self.At.new_zeros(self.At.shape[0], self.At.shape[1], grow)], 2)
            self.Bt = torch.cat([self.Bt, self.Bt.new_zeros(self.Bt.shape[0], grow, self.Bt.shape[2])], 1)
        self.clear(slot)
        self.At[slot, :, :r] = A.T
        self.Bt[slot, :r] = (B.float() * scale).T
        if g is not None:
            if self.g is None:
                self.g = torch.ones(self.At.shape[0], self.Bt.shape[2], device=self.At.device)
            self.g[slot] = g

    def clear(self, slot: int) -> None:
        self.At[slot].zero_()
        self.Bt[slot].zero_()
        if self.g is not None:
            self.g[slot] = 1
        self._gathered = None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out + each row's delta: the layer's `row_forward`. x: (B, T, in), base_out: (B, T, out)."""
        rows = self.rows
        if rows.uniform == 0:
            return base_out  # every row is the base model
        if self.g is None and cpu_kernels.fits_rows(x, self.At, self.Bt, base_out):
            # on a CPU, one adapter or many, any T: 32 rows, r=8, 120 layers of SmolLM2, bf16 stacks, a decode step's
            # per-row LoRA 3.2 ms (32 adapters) / 2.3 ms (one), against 12.8 ms for bmm on gathered copies / 3.9 ms
            # for plain matmuls; at 64 tokens a row 113 / 134 ms against 106 / 109 ms (scratch bench, this Xeon)
            cpu_kernels.lora_rows(x, self.At, self.Bt, rows.index, base_out)  # base_out is the layer's own: in place
            return base_out
        x = x.float()
        g = None if self.g is None else self.g.index_select(0, rows.index)[:, None, :]  # (B, 1, out)
        if rows.uniform is not None:  # one adapter for every row: plain matmuls on its (in, r), (r, out)
            s = rows.uniform
            return self._add(base_out, x @ self.At[s].float() @ self.Bt[s].float(), g)
        delta = x.new_zeros(*x.shape[:2], self.Bt.shape[2])
        if cpu_kernels.fits_rows(x, self.At, self.Bt, delta):  # DoRA rows on a CPU
            cpu_kernels.lora_rows(x, self.At, self.Bt, rows.index, delta)
            return self._add(base_out, delta, g)
        if self._gathered is None or self._gathered[0] != rows.version:  # GPUs, and CPUs without the kernels
            idx = rows.index
            self._gathered = (rows.version, self.At.index_select(0, idx).float(),  # (B, in, r)
                              self.Bt.index_select(0, idx).float())  # (B, r, out)
        _, At, Bt = self._gathered
        return self._add(base_out, torch.bmm(torch.bmm(x, At), Bt), g)

    def _add(self, base_out: torch.Tensor, delta: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        if g is None:
            return base_out + delta.to(base_out.dtype)
        w0x = (base_out if self.bias is None else base_out - self.bias).to(g.dtype)  # DoRA: W0x without bias
        return base_out + ((g - 1) * w0x + g * delta).to(base_out.dtype)


ADAPTER_DTYPES = ("auto", "fp32", "bf16")


def check_adapter_dtype(adapter_dtype: str) -> None:
    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {adapter_dtype!r}")


def stack_dtype(adapter_dtype: str, base_dtype: torch.dtype) -> torch.dtype:
    """The stacks' dtype: "auto" bf16 for a bf16 base, else fp32; or as asked ("bf16" halves the bytes a step with
    many adapters reads, at a rounding of A and s·B of 2⁻⁹)."""
    check_adapter_dtype(adapter_dtype)
    if adapter_dtype == "auto":
        return torch.bfloat16 if base_dtype == torch.bfloat16 else torch.float32
    return torch.bfloat16 if adapter_dtype == "bf16" else torch.float32


def _padded(r: int) -> int:
    """A stack's rank: r rounded up to a multiple of 8 (what `cpu_kernels.lora_rows` reads; the zeros add nothing)."""
    return -(-r // 8) * 8


def check_servable(entry: Adapter) -> None:
    """Refuse, before touching the model, an adapter the per-row batch cannot serve."""
    config = read_adapter_config(entry.path)
    if not isinstance(config, (LoraConfig, AdaLoraConfig)):
        raise AdapterError(f"{entry.path}: {type(config).__name__} adapters cannot be served")
    if getattr(config, "modules_to_save", None) or config.bias != "none":
        what = "modules_to_save" if getattr(config, "modules_to_save", None) else f"bias={config.bias!r}"
        raise AdapterError(f"{entry.path}: the server cannot batch an adapter with {what} (it replaces weights "
                           f"every row shares); merge it into the base (loraforge merge) and serve that instead")


def factors(layer: nn.Module, uid: str) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """What a stack holds for adapter `uid` of `layer`: A (r, in), B (out, r), scaling, DoRA's g (out,) or None."""
    if type(layer) is SVDLinear:  # AdaLoRA: ΔW = scaling · B @ (A ∘ E)
        return layer.lora_A[uid] * layer.lora_E[uid], layer.lora_B[uid], layer.scaling[uid], None
    A, B, scale = layer.lora_A[uid].weight, layer.lora_B[uid].weight, layer.scaling[uid]
    g = None
    if uid in layer.lora_magnitude_vector:  # DoRA, as LoraLinear._dora computes it at inference
        norm = layer._row_norm(layer._base_out_in().to(A.dtype), layer._scaled_BA(uid))
        g = layer.lora_magnitude_vector[uid] / norm
    return A, B, scale, g


class Residency:
    """The registry (any thread, under `lock`) and the model's resident adapters (engine thread only)."""

    def __init__(self, model: nn.Module, lock: threading.Condition, *, base_name: str, max_loaded: int,
                 allowed: list[Path], adapters_dir: Path | None, on_evict: Callable[[Adapter], None] | None = None,
                 adapter_dtype: str = "auto"):
        self.model, self.lock, self.base_name, self.max_loaded = model, lock, base_name, max_loaded
        self.adapter_dtype = adapter_dtype
        self.on_evict = on_evict  # called with an adapter leaving the model (its prefix cache goes with it)
        self.rows = RowSlots(next(model.parameters()).device)
        self.adapters: dict[str, Adapter] = {}  # registered, by name
        self.resident: collections.OrderedDict[str, Adapter] = collections.OrderedDict()  # uid -> adapter, LRU first
        self.stats = collections.Counter()
        self._uids = itertools.count(1)
        self._loads = itertools.count(1)
        self._free_slots = list(range(max_loaded, 0, -1))
        self._stacks: dict[LoraLinear, Stack] = {}
        self._allowed = {Path(p).expanduser().resolve() for p in allowed}
        self.adapters_dir = adapters_dir

    @property
    def layout(self) -> tuple[int, int]:
        """Changes whenever adapter layers are put on or taken off the model (loads, evictions): what a decoder
        holding the layers' `row_forward` hooks re-reads them on."""
        return self.stats["loads"], self.stats["evictions"]

    def lookup(self, name: str | None) -> Adapter | None:
        """The registered adapter a request names (under lock); None for the base model."""
        if name is None or name in (self.base_name, *BASE_ALIASES):
            return None
        entry = self.adapters.get(name)
        if entry is None:
            raise UnknownAdapter(f"model {name!r} does not exist; available: {[self.base_name, *self.adapters]}")
        return entry

    def register(self, name: str, path: str | Path) -> Adapter:
        """Add `name` to the registry (under lock): its path checked, its weights not yet read."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ServeError(f"adapter name {name!r} is not allowed: use letters, digits, '.', '_', '-' "
                             f"(at most 64, starting with a letter or digit)")
        if name in (self.base_name, *BASE_ALIASES):
            raise ServeError(f"adapter name {name!r} is the base model's name; pick another")
        if name in self.adapters:
            raise ServeError(f"an adapter named {name!r} is already loaded; "
                             f"unload it first (DELETE /v1/adapters/{name})")
        resolved = self.resolve(path)
        entry = Adapter(name, resolved, uid=f"serve{next(self._uids)}")
        self.adapters[name] = entry
        return entry

    def unregister(self, name: str) -> Adapter:
        """Drop `name` from the registry (under lock); the engine evicts it once no request uses it."""
        entry = self.adapters.pop(name, None)
        if entry is None:
            raise UnknownAdapter(f"adapter {name!r} is not loaded; loaded: {list(self.adapters)}")
        entry.registered = False
        return entry

    def register_dir(self) -> None:
        """Register every subdirectory of adapters_dir holding an adapter_config.json, by its directory name."""
        if not self.adapters_dir.is_dir():
            raise FileNotFoundError(f"adapters_dir {self.adapters_dir} is not a directory")
        for sub in sorted(self.adapters_dir.iterdir()):
            if (sub / "adapter_config.json").is_file() and NAME_RE.fullmatch(sub.name) \
                    and sub.name not in self.adapters and sub.name not in (self.base_name, *BASE_ALIASES):
                self.register(sub.name, sub)

    def resolve(self, path: str | Path) -> Path:
        """The real adapter directory, refused unless it is a start path or inside adapters_dir (no traversal)."""
        if not isinstance(path, (str, Path)):
            raise ServeError(f"adapter path {path!r} must be a string")
        p = Path(path).expanduser()
        if not p.is_absolute() and self.adapters_dir is not None:
            p = self.adapters_dir / p
        resolved = p.resolve()  # follows symlinks and '..': a link out of adapters_dir is refused too
        inside = self.adapters_dir is not None and resolved != self.adapters_dir \
            and resolved.is_relative_to(self.adapters_dir)
        if resolved not in self._allowed and not inside:
            where = f"inside the adapters directory {self.adapters_dir}" if self.adapters_dir else \
                "one of the adapter paths given at start (start the server with --adapters-dir to load others)"
            raise ServeError(f"adapter path {str(path)!r} is not allowed: it must be {where}")
        if not (resolved / "adapter_config.json").is_file():
            raise ServeError(f"adapter path {str(path)!r} is not an adapter directory (no adapter_config.json)")
        return resolved

    # ---- engine thread only ----

    def check(self, entry: Adapter) -> None:
        """Load `entry` onto the model and take it off again: its files are readable and fit the base (engine
        thread; used when no slot is free to keep it resident)."""
        check_servable(entry)
        probe = f"{entry.uid}-check"
        self._load(entry, probe)
        try:
            self._servable_layers(entry, probe)
        finally:
            delete_adapter(self.model, probe)

    def _load(self, entry: Adapter, uid: str) -> None:
        """load_adapter (every key and shape checked; safetensors only), the model left as it was on any failure."""
        try:
            load_adapter(self.model, entry.path, uid)
        except TypeError as e:  # inject met a layer of the other kind (LoRA vs AdaLoRA) already on this module
            delete_adapter(self.model, uid)
            raise AdapterError(f"{entry.path}: cannot share a layer with the adapters now resident ({e}); an AdaLoRA "
                               f"adapter and a LoRA adapter cannot target the same module in one server") from None
        except BaseException:
            delete_adapter(self.model, uid)
            raise

    def _servable_layers(self, entry: Adapter, uid: str) -> list[LoraLinear | SVDLinear]:
        layers = [layer for _, layer in lora_layers(self.model) if uid in layer.r]
        for layer in layers:
            if type(layer) not in (LoraLinear, SVDLinear):
                raise AdapterError(f"{entry.path}: layer type {type(layer).__name__} cannot be batched per row")
        return layers

    def ensure_resident(self, entry: Adapter) -> bool:
        """Put `entry` on the model, evicting the least recently used idle adapter if needed.

        False when every slot holds an adapter in use (a request then waits for a row to finish).
        """
        if entry.slot is not None:
            self.resident.move_to_end(entry.uid)
            return True
        if not self._free_slots:
            victim = next((a for a in self.resident.values() if a.running == 0), None)
            if victim is None:
                return False
            self.evict(victim)
        check_servable(entry)
        self._load(entry, entry.uid)
        try:
            layers = self._servable_layers(entry, entry.uid)
        except AdapterError:
            delete_adapter(self.model, entry.uid)
            raise
        slot = self._free_slots.pop()
        for layer in layers:
            A, B, scale, g = factors(layer, entry.uid)
            stack = self._stacks.get(layer)
            if stack is None:
                stack = self._stacks[layer] = Stack(layer, self.max_loaded + 1, A.shape[0], self.rows,
                                                    self.adapter_dtype)
                layer.row_forward = stack.forward
            stack.put(slot, A, B, scale, g)
        entry.slot, entry.load_id = slot, next(self._loads)
        with self.lock:
            self.resident[entry.uid] = entry
        self.stats["loads"] += 1
        return True

    def evict(self, entry: Adapter) -> None:
        if self.on_evict is not None:
            self.on_evict(entry)
        for stack in self._stacks.values():
            stack.clear(entry.slot)
        delete_adapter(self.model, entry.uid)  # layers left without adapters go back to plain linears
        alive = {layer for _, layer in lora_layers(self.model)}
        for layer in set(self._stacks) - alive:
            layer.row_forward = None
        self._stacks = {layer: s for layer, s in self._stacks.items() if layer in alive}
        self._free_slots.append(entry.slot)
        entry.slot, entry.load_id = None, 0
        with self.lock:
            self.resident.pop(entry.uid, None)
        self.stats["evictions"] += 1

    def evict_unregistered(self) -> None:
        """Evict the unloaded adapters no request uses any more."""
        for entry in [a for a in self.resident.values() if not a.registered and a.queued == 0]:
            self.evict(entry)

    def has_unregistered_idle(self) -> bool:
        return any(not a.registered and a.queued == 0 for a in self.resident.values())
