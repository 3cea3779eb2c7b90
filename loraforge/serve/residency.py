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
AdaLoRA, loaded as the equal plain LoRA (`adalora_as_lora`: A ∘ E as A, per layer the kept rank and
lora_alpha / (init_r + 1e-5) as scaling, so it shares modules with LoRA adapters), and DoRA, whose per-slot magnitude
factor g = m / ‖W0 + sBA‖ (out,) — 1 for the base and plain LoRA slots — gives h = base(x) + (g − 1)·W0x + g·delta.
modules_to_save and bias adapters change weights the rows share: refused, with the reason.
On a CPU with the decode kernels, `cpu_kernels.lora_rows` adds every row's delta into base(x) in one call per layer
(Punica's SGMV): each row's Aᵀ and (sB)ᵀ read where they lie in the stack, no gathered copies, bf16 widened in
registers (r_max is padded to a multiple of 8 for it). Elsewhere (GPUs) the gathered Aᵀ[idx], (sB)ᵀ[idx] go through
bmm, kept while the batch's composition stays the same, and a batch whose rows all use one adapter takes two plain
matmuls.

The stack plugs into the layer through `LoraLayer.row_forward`, the layer's per-row hook.
Adapters are PEFT directories loaded with `loraforge.lora.adapters.load_adapter` (every key and shape checked,
safetensors only). Only paths given at start or inside `adapters_dir` load, and an adapter inside `adapters_dir`
reads no file outside it (a symlinked folder or file leading out is refused, and skipped with a warning at start).
`adapters_dir`'s adapters are its direct subfolders NAME holding an adapter_config.json and the NAME/adapter/
folders training runs write, each served as NAME. Each one found there gets the cheap checks at start (`precheck`:
config, files, the weights' shapes from the safetensors header against the base); one added while serving gets
them when a request names it or the list of models is read (`discover`). Any adapter that fails a
load is marked broken: it is not listed, and a request naming it gets the reason (a 400) without its files being
read again until they change.
Messages name an adapter's folder as the client sent it or relative to `adapters_dir`, never by a server path.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from loraforge.config import ConfigError, LoraConfig
from loraforge.inference import cpu_kernels
from loraforge.lora.adalora import AdaLoraConfig
from loraforge.lora.adapters import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterError, base_name_or_path,
                                     delete_adapter, header_shapes, load_adapter, other_quantization,
                                     read_adapter_config, read_adapter_weights)
from loraforge.lora.inject import REGEX_TIMEOUT_S, lora_layers, pattern_value, regex_budget
from loraforge.lora.layer import LoraLinear
from loraforge.quant.checks import base_quantization
from loraforge.serve.errors import SURROGATE, BrokenAdapter, NameTaken, ServeError, UnknownAdapter, shown
from loraforge.utils.files import expand_user

BASE_ALIASES = ("base",)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)"  # what NAME_RE takes
RUN_ADAPTER = "adapter"  # where a training run's folder holds its adapter (train and demo write runs/NAME/adapter)
LISTED = 20  # adapter names an error message lists (GET /v1/models lists them all)
# seconds an adapter's regexes (target_modules, rank_pattern, ...) may take in all, per check and per load: they
# run on the engine thread, holding every request (soak: a rank_pattern of slow keys, minutes). Twice
# REGEX_TIMEOUT_S: one endless regex is still named as such
ADAPTER_REGEX_S = 2 * REGEX_TIMEOUT_S
# an mtime this close to the listing that read it may hide a change a clock tick later (FAT's mtime ticks in 2 s)
RACY_NS = 2 * 10**9
# the file keys whose shapes the header check compares with the base's linear layers: (suffix, dim, 0 in / 1 out)
FACTOR_KEYS = ((".lora_A.weight", -1, 0), (".lora_B.weight", 0, 1), (".lora_A", -1, 0), (".lora_B", 0, 1))


def name_refusal(name, base_name: str) -> str | None:
    """Why `name` cannot name an adapter over the base served as `base_name` (the words after the name), or None:
    Residency.register's rule, which `serve --adapter` checks before the base loads."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return f"is not allowed: use {NAME_RULE}"
    if name in (base_name, *BASE_ALIASES):
        return "is the base model's name; pick another"
    return None


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
    given: Path | None = None  # the path as registered, made absolute, before symlinks are followed
    label: str = ""  # how messages name its folder: as the client sent it, or relative to adapters_dir
    discovered: bool = False  # found in adapters_dir (a failed load marks it broken, where an upload's is a 400)
    verified: bool = False  # loaded or checked once
    problem: str | None = None  # why it cannot be served, once a check or load failed (it is then in `broken`)
    warning: str | None = None  # load_adapter's warning of its files as the last check read them (the dashboard's)
    stamp: tuple = ()  # its files' stat when `problem` was found: a request after they change tries again
    loaded_stamp: tuple = ()  # its files' stat when loaded: once they change, new rows wait till it reloads


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

    def __init__(self, layer: LoraLinear, slots: int, r: int, rows: RowSlots,
                 adapter_dtype: str = "auto", first: int = 1):
        """`slots`: the most it may hold (max_loaded + 1); it holds the slots up to `first` (at least the 9 of
        the default --max-loaded 8) and grows as higher ones are put: the whole (slots, in, r) at once made a large
        --max-loaded (100,000 on SmolLM2: 1.8 GB a layer) a MemoryError at the first adapter."""
        w = layer.base_layer.weight
        r = _padded(r)
        self.max_slots = slots
        slots = min(slots, max(first + 1, 9))
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
        if slot >= self.At.shape[0]:  # grow the slots held (doubling), up to max_slots
            grow = min(self.max_slots, max(slot + 1, 2 * self.At.shape[0])) - self.At.shape[0]
            self.At = torch.cat([self.At, self.At.new_zeros(grow, *self.At.shape[1:])])
            self.Bt = torch.cat([self.Bt, self.Bt.new_zeros(grow, *self.Bt.shape[1:])])
            if self.g is not None:
                self.g = torch.cat([self.g, self.g.new_ones(grow, self.g.shape[1])])
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
        """base_out + each row's delta: the layer's `row_forward`. x: (B, T, in), base_out: (B, T, out); or both
        flattened to (B·T, ...), as OPT's MLP takes them (a mixed batch's bmm failed on them: every row of it a 500)."""
        rows = self.rows
        if rows.uniform == 0:
            return base_out  # every row is the base model
        if x.dim() == 2:
            n = len(rows.slots)
            return self.forward(x.view(n, -1, x.shape[-1]), base_out.view(n, -1, base_out.shape[-1])).view(
                base_out.shape)
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


def check_servable(entry: Adapter) -> LoraConfig | AdaLoraConfig:
    """Refuse, before touching the model, an adapter the per-row batch cannot serve; its config, read."""
    config = read_adapter_config(entry.path)
    if not isinstance(config, (LoraConfig, AdaLoraConfig)):
        raise AdapterError(f"{entry.path}: {type(config).__name__} adapters cannot be served")
    if getattr(config, "modules_to_save", None) or config.bias != "none":
        what = "modules_to_save" if getattr(config, "modules_to_save", None) else f"bias={config.bias!r}"
        raise AdapterError(f"{entry.path}: the server cannot batch an adapter with {what} (it replaces weights "
                           f"every row shares); merge it into the base (loraforge merge) and serve that instead")
    return config


def _rank(config: LoraConfig | AdaLoraConfig, module: str) -> int:
    """The rank adapter_config.json gives `module`'s layer: LoRA's rank_pattern or r, AdaLoRA's kept triplets
    (rank_pattern's flags) or init_r."""
    if isinstance(config, AdaLoraConfig):
        kept = (config.rank_pattern or {}).get(f"{module}.lora_E")
        return config.init_r if kept is None else sum(kept)
    return int(pattern_value(config.rank_pattern, module, config.r, "rank_pattern"))


def factors(layer: nn.Module, uid: str) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """What a stack holds for adapter `uid` of `layer`: A (r, in), B (out, r), scaling, DoRA's g (out,) or None."""
    A, B, scale = layer.lora_A[uid].weight, layer.lora_B[uid].weight, layer.scaling[uid]
    g = None
    if uid in layer.lora_magnitude_vector:  # DoRA, as LoraLinear._dora computes it at inference
        norm = layer._row_norm(layer._base_out_in().to(A.dtype), layer._scaled_BA(uid))
        g = layer.lora_magnitude_vector[uid] / norm
    if uid in layer.initial_factors:  # PiSSA/OLoRA: W0 back for every row, this adapter as [A; A0], [B, −B0] on it
        A, B = layer.original_base_factors(uid)
        layer.restore_base(uid)
    return A, B, scale, g


def _stamp(entry: Adapter) -> tuple:
    """What changes when an adapter's files do: inode, size, mtime and ctime of its path as given, its folder and
    files, each as a link and as what it points to."""
    files = [entry.path / name for name in (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin")]
    stamp = []
    for path in [entry.given or entry.path, entry.path, *files]:
        for stat in (os.lstat, os.stat):
            try:
                st = stat(path)
                stamp.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            except (OSError, ValueError):
                stamp.append(None)
    return tuple(stamp)


def _folder_stamp(sub: Path) -> tuple:
    """What changes when an adapter appears in a folder of adapters_dir: its mtime and its adapter/'s (a run's
    adapter folder is renamed in whole, both files at once)."""
    stamp = []
    for path in (sub, sub / RUN_ADAPTER):
        try:
            stamp.append(os.stat(path).st_mtime_ns)
        except (OSError, ValueError):
            stamp.append(None)
    return tuple(stamp)


def _found_in(sub: Path) -> Path | None:
    """Where a folder of adapters_dir holds its adapter: itself (NAME/adapter_config.json), else a training run's
    NAME/adapter/, else None."""
    for folder in (sub, sub / RUN_ADAPTER):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return None


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
    return f"{names[:LISTED]!r}{more}"


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
        self.broken: dict[str, Adapter] = {}  # registered but not servable (their `problem`), by name
        self.resident: collections.OrderedDict[str, Adapter] = collections.OrderedDict()  # uid -> adapter, LRU first
        self.stats = collections.Counter()
        self._uids = itertools.count(1)
        self._loads = itertools.count(1)
        # slots handed back by evictions (taken again first), then the never-used ones from _next_slot up to
        # max_loaded: a list of every slot made --max-loaded 1e12 a MemoryError at start (soak)
        self._free_slots: list[int] = []
        self._next_slot = 1
        self._stacks: dict[LoraLinear, Stack] = {}
        self._allowed = {expand_user(p).resolve() for p in allowed}
        self.adapters_dir = adapters_dir
        self.unloaded: set[str] = set()  # names DELETE /v1/adapters took out: not found in adapters_dir again
        self._looked: dict[str, tuple] = {}  # folders of adapters_dir discover() found no adapter in: their stamp
        self._listing: tuple[int, int, list[str]] | None = None  # adapters_dir's (mtime, when read, sorted names)
        self._discovering = threading.Lock()  # one discover() at a time, its scan outside `lock`
        # the bare base's modules and linear layers (in, out), for the header check of adapters' shapes
        self._modules = {name for name, _ in model.named_modules()}
        self._linears = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
                         if isinstance(m, nn.Linear)}
        self._quantization = base_quantization(model)  # how the base is stored: what an adapter recorded is met with

    @property
    def layout(self) -> tuple[int, int]:
        """Changes whenever adapter layers are put on or taken off the model (loads, evictions): what a decoder
        holding the layers' `row_forward` hooks re-reads them on."""
        return self.stats["loads"], self.stats["evictions"]

    def lookup(self, name: str | None) -> Adapter | None:
        """The registered adapter a request names (under lock); None for the base model. A broken adapter raises
        its problem, unless its files changed since: then it is checked again and served if they pass."""
        if name is None or name in (self.base_name, *BASE_ALIASES):
            return None
        entry = self.adapters.get(name) or self.broken.get(name)
        if entry is not None and self._moved(entry):
            self._forget(entry)  # soak: a removed folder stayed listed, and then was a 400, not unknown
            entry = None
        if entry is not None and entry.problem is None:
            return entry
        if entry is None and self.adapters_dir is not None and NAME_RE.fullmatch(name) and name not in self.unloaded:
            entry = self._register_found(self.adapters_dir / name)  # a folder added since the server started
            if entry is not None and entry.name in self.adapters:
                return entry
        if entry is None:
            raise UnknownAdapter(f"model {shown(name)} does not exist; available: "
                                 f"{_listed([self.base_name, *self.adapters])}")
        if _stamp(entry) == entry.stamp:
            raise BrokenAdapter(entry.problem)
        return self._retry(entry)

    def _retry(self, entry: Adapter) -> Adapter:
        """A broken adapter whose files changed: registered again if the cheap checks pass (under lock)."""
        stamp = _stamp(entry)
        try:
            entry.path, _ = self.resolve(entry.given, entry.label)
            self.precheck(entry)
        except ServeError as e:
            entry.problem, entry.stamp = str(e), stamp
            raise BrokenAdapter(entry.problem) from None
        del self.broken[entry.name]
        self.adapters[entry.name] = entry
        entry.problem, entry.stamp, entry.registered = None, (), True
        return entry

    def _moved(self, entry: Adapter) -> bool:
        """Whether a discovered adapter's folder no longer holds it where it was found: removed, renamed, or its
        adapter moved between NAME/ and NAME/adapter/."""
        return entry.discovered and _found_in(self.adapters_dir / entry.name) != entry.given

    def _forget(self, entry: Adapter) -> None:
        """Take a discovered adapter whose folder moved out of the registry (under lock): requests naming it get
        what the folder holds now, those in flight finish, and the engine evicts it once idle."""
        if self.adapters.get(entry.name) is entry:
            del self.adapters[entry.name]
        if self.broken.get(entry.name) is entry:
            del self.broken[entry.name]
        entry.registered = False
        self._looked.pop(entry.name, None)
        self.lock.notify_all()  # the engine loop evicts unregistered idle adapters

    def register(self, name: str, path: str | Path, label: str | None = None, discovered: bool = False) -> Adapter:
        """Add `name` to the registry (under lock): its path checked, its weights not yet read. `label`: how
        messages name its folder (default: the path as given when relative, else relative to adapters_dir)."""
        if why := name_refusal(name, self.base_name):
            raise ServeError(f"adapter name {shown(name)} {why}")
        if name in self.adapters:
            # said without HTTP's words: the dashboard shows it as it is
            raise NameTaken(f"an adapter named {shown(name)} is already loaded; unload it first, or choose another "
                            "name")
        resolved, given = self.resolve(path, label)
        entry = Adapter(name, resolved, uid=f"serve{next(self._uids)}", given=given, discovered=discovered,
                        label=label or self._label(path, resolved))
        self.broken.pop(name, None)  # a new registration replaces a broken one
        self.unloaded.discard(name)
        self.adapters[name] = entry
        return entry

    def unregister(self, name: str) -> Adapter:
        """Drop `name` from the registry (under lock); the engine evicts it once no request uses it."""
        entry = self.adapters.pop(name, None) or self.broken.pop(name, None)
        if entry is None:
            raise UnknownAdapter(f"adapter {shown(name)} is not loaded; loaded: {_listed(list(self.adapters))}")
        entry.registered = False
        self.unloaded.add(name)
        return entry

    def register_dir(self) -> None:
        """Register the adapters of adapters_dir by folder name, after the cheap checks (`precheck`): each direct
        subfolder NAME holding an adapter_config.json, and each NAME whose NAME/adapter/ holds one (a training
        run's folder, as train and demo write it), under NAME. A broken one is kept out of the list with its
        problem, a symlink leading out of adapters_dir or a folder whose name cannot be a model name (hidden ones
        silently) is skipped; each with a warning saying why. A folder that
        holds an adapter itself and one in its adapter/ is served as itself, with a warning."""
        if not self.adapters_dir.is_dir():
            raise FileNotFoundError(f"adapters_dir {self.adapters_dir} is not a directory")
        for name in self._names():
            stamp = _folder_stamp(self.adapters_dir / name)
            if self._register_found(self.adapters_dir / name) is None:
                self._looked[name] = stamp  # discover looks at it again once it changes, not before: one warning

    def _names(self) -> list[str]:
        """adapters_dir's entries, sorted as strings (as Paths, sorting 400 of them took most of a listing's 0.26 s),
        read again only when its mtime changes or was too close to the last read to tell (RACY_NS)."""
        mtime = os.stat(self.adapters_dir).st_mtime_ns
        if self._listing is None or self._listing[0] != mtime or self._listing[1] - mtime < RACY_NS:
            now = time.time_ns()
            self._listing = (mtime, now, sorted(os.listdir(self.adapters_dir)))
        return self._listing[2]

    def discover(self) -> None:
        """Register the adapters that appeared in adapters_dir since the start, as register_dir does, so that
        listing shows them (a run trained while serving); check a broken one again whose files changed; and
        drop one whose folder was removed, renamed, or moved its adapter between NAME/ and NAME/adapter/ (then
        found again as it is now). Cheap, and the folder is read outside `lock` (taken only to register), so that
        listings do not hold up decoding: adapters_dir is listed again only when its mtime changes, a folder holding
        no adapter is looked into again only when it changes (its mtime or its adapter/'s), and an adapter's files
        are read once (precheck) when it is found."""
        if self.adapters_dir is None:
            return
        with self._discovering:
            try:
                names = self._names()
            except OSError:  # adapters_dir removed while serving: nothing new to list
                return
            with self.lock:
                known = [e for e in (*self.adapters.values(), *self.broken.values()) if e.discovered]
                registered = set(self.adapters) | set(self.broken) | self.unloaded
            moved = [e for e in known if self._moved(e)]
            changed = [e for e in known if e.problem is not None and e not in moved and _stamp(e) != e.stamp]
            registered -= {e.name for e in moved}
            new = [(name, stamp) for name in names if name not in registered
                   and self._looked.get(name) != (stamp := _folder_stamp(self.adapters_dir / name))]
            with self.lock:
                for entry in moved:
                    self._forget(entry)
                for entry in changed:
                    if self.broken.get(entry.name) is entry:
                        with contextlib.suppress(BrokenAdapter):
                            self._retry(entry)
                for name, stamp in new:
                    if name not in self.adapters and self._register_found(self.adapters_dir / name) is None:
                        self._looked[name] = stamp

    def _register_found(self, sub: Path) -> Adapter | None:
        """register_dir's work for one folder of adapters_dir: its adapter registered (or kept out as broken, with
        a warning), or None where it holds none or is not to be served."""
        if sub.name in self.adapters:
            return None
        direct, run = (sub / CONFIG_NAME).is_file(), (sub / RUN_ADAPTER / CONFIG_NAME).is_file()
        if not direct and not run:
            return None
        if sub.name in (self.base_name, *BASE_ALIASES) or not NAME_RE.fullmatch(sub.name):
            if not sub.name.startswith("."):  # soak: skipped silently; a hidden folder (the dashboard's .ui) may be
                why = "the base model's name" if NAME_RE.fullmatch(sub.name) else \
                    f"not a model name: {NAME_RULE}"
                warnings.warn(f"adapters dir {self.adapters_dir}: skipping {sub.name!r}: its folder's name is {why}; "
                              f"rename the folder to serve it", stacklevel=3)
            return None
        if direct and run:
            warnings.warn(f"adapters dir {self.adapters_dir}: {sub.name!r} holds an adapter and so does "
                          f"{sub.name}/{RUN_ADAPTER}; serving {sub.name!r} itself under that name (load the "
                          f"other with POST /v1/adapters, path {sub.name}/{RUN_ADAPTER})", stacklevel=3)
        folder, label = (sub, sub.name) if direct else (sub / RUN_ADAPTER, f"{sub.name}/{RUN_ADAPTER}")
        try:
            real = folder.resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            warnings.warn(f"adapters dir {self.adapters_dir}: skipping {label!r}: {e}", stacklevel=3)
            return None
        if not real.is_relative_to(self.adapters_dir):
            warnings.warn(f"adapters dir {self.adapters_dir}: skipping {label!r}: it is a symlink to {real}, "
                          f"outside the adapters dir (only adapters inside it are served); move or copy the "
                          f"adapter into {self.adapters_dir} to serve it", stacklevel=3)
            return None
        try:
            entry = self.register(sub.name, folder, label=label, discovered=True)
        except ServeError as e:  # changed since the listing
            warnings.warn(f"adapters dir {self.adapters_dir}: skipping {label!r}: {e}", stacklevel=3)
            return None
        stamp = _stamp(entry)
        try:
            self.precheck(entry)
        except BrokenAdapter as e:
            self._mark_broken(entry, str(e), stamp)
            warnings.warn(f"adapters dir {self.adapters_dir}: not serving {sub.name!r}: {e} (requests naming it "
                          f"get this answer until its files change)", stacklevel=3)
        return entry

    def resolve(self, path: str | Path, label: str | None = None) -> tuple[Path, Path]:
        """(the real adapter directory, the path made absolute): refused unless it is a start path or inside
        adapters_dir (no traversal, no symlink leading out)."""
        if not isinstance(path, (str, Path)):
            raise ServeError(f"adapter path {shown(path)} must be a string")
        said = shown(label or str(path))
        if "\x00" in str(path) or SURROGATE.search(str(path)):
            raise ServeError(f"adapter path {said} contains a NUL character or a lone surrogate; send a plain path")
        p = expand_user(path)
        try:
            if not p.is_absolute() and self.adapters_dir is not None:
                # read from the adapters directory; one typed from the server's folder (runs/NAME/adapter with
                # --adapters-dir runs, as the refusal without it suggests) is taken there, and must lie inside it
                # too. Inside the try: a name too long was a 500 naming the server's path (soak)
                p = self.adapters_dir / p if (self.adapters_dir / p).exists() or not p.exists() else p.absolute()
            resolved = p.resolve()  # follows symlinks and '..': a link out of adapters_dir is refused too
            is_adapter = (resolved / CONFIG_NAME).is_file()
        except (OSError, RuntimeError) as e:  # a name too long, a symlink loop (the message would name server paths)
            why = getattr(e, "strerror", None) or "a symlink loop"
            raise ServeError(f"adapter path {said} cannot be read: {why}") from None
        inside = self.adapters_dir is not None and resolved != self.adapters_dir \
            and resolved.is_relative_to(self.adapters_dir)
        if resolved not in self._allowed and not inside:
            if self.adapters_dir is None:
                where = ("one of the adapter paths given at start; to load others, start the server with "
                         "--adapters-dir DIR, where DIR is a folder that holds them")
            else:
                linked = os.path.normpath(p).startswith(str(self.adapters_dir) + os.sep)
                where = "inside the adapters directory" + (" (it is a symlink leading out of it)" if linked else "")
            raise ServeError(f"adapter path {said} is not allowed: it must be {where}")
        if not is_adapter:
            run = (resolved / RUN_ADAPTER / CONFIG_NAME).is_file()  # a training run's folder: its adapter is below
            below = shown(str(label or path).rstrip("/") + "/" + RUN_ADAPTER)
            hint = f"; a training run's adapter is in its {RUN_ADAPTER} folder: send {below}" if run else ""
            raise ServeError(f"adapter path {said} is not an adapter directory (no {CONFIG_NAME}){hint}")
        return resolved, p

    def _label(self, path: str | Path, resolved: Path) -> str:
        if not Path(path).is_absolute():
            return str(path)
        if self.adapters_dir is not None and resolved.is_relative_to(self.adapters_dir):
            return str(resolved.relative_to(self.adapters_dir))
        return resolved.name

    # ---- any thread: files only, the model not touched ----

    def precheck(self, entry: Adapter) -> None:
        """The cheap checks, before any load: an adapter inside adapters_dir reads no file outside it, its config
        is one the per-row batch serves, and its weights are a readable safetensors file whose LoRA factors fit the
        base's layers (their shapes read from the header). Raises BrokenAdapter naming the problem."""
        try:
            if entry.path not in self._allowed and self.adapters_dir is not None:
                for name in (CONFIG_NAME, WEIGHTS_NAME):
                    if not (entry.path / name).resolve().is_relative_to(self.adapters_dir):
                        raise AdapterError(f"{entry.path / name} is a symlink to a file outside the adapters "
                                           f"directory, which the server does not read; copy the file in its place")
            with regex_budget(ADAPTER_REGEX_S):
                self._check_header(entry, check_servable(entry))
        except (ValueError, OSError, RuntimeError) as e:
            raise self._broken(entry, e) from None
        # the sentence the server's log gets as it loads (a QLoRA adapter over the full-precision base), for the
        # dashboard, which shows it where the adapter is chosen: the log alone left the page's user unaware
        warning = other_quantization(entry.path, self._quantization)
        entry.warning = warning and self._public(entry, warning)

    def _check_header(self, entry: Adapter, config: LoraConfig | AdaLoraConfig) -> None:
        weights = entry.path / WEIGHTS_NAME
        if not weights.is_file():
            read_adapter_weights(entry.path)  # raises the reason: missing, or a pickle (adapter_model.bin) only
        shapes = header_shapes(weights)  # plain reads, a header over 16 MB refused: never mapped (SIGBUS)
        problems: dict[str, str] = {}  # module -> its first problem
        for key, shape in shapes.items():
            path = key.removeprefix(PREFIX)
            for suffix, dim, side in FACTOR_KEYS:
                if path.endswith(suffix) and len(shape) == 2:
                    module = path[:-len(suffix)]
                    if module not in self._modules:
                        problems.setdefault(module, f"{module}: in the file but not in this model")
                    elif module in self._linears and shape[dim] != self._linears[module][side]:
                        fan_in, fan_out = self._linears[module]
                        factor = suffix.split(".")[1]  # lora_A or lora_B
                        problems.setdefault(module, f"{module}: {factor} {shape} in the file, but the layer is "
                                                    f"{fan_in} -> {fan_out} here")
                    # soak: listed, then refused as "another base?" (AdaLoRA: refused at the first request)
                    elif shape[-1 - dim] != (r := _rank(config, module)):
                        factor = suffix.split(".")[1]
                        raise AdapterError(f"{weights.name}: {module}.{factor} {shape} has rank {shape[-1 - dim]}, "
                                           f"but {CONFIG_NAME} gives that layer r={r}: the two files are not of "
                                           f"one adapter")
                    break
        if problems:
            shown_problems = list(problems.values())
            more = f"; and {len(shown_problems) - 3} more layers" if len(shown_problems) > 3 else ""
            raise AdapterError(f"{weights.name} does not fit this base (an adapter made for another base?): "
                               f"{'; '.join(shown_problems[:3])}{more}")

    def _broken(self, entry: Adapter, e: Exception) -> BrokenAdapter:
        """`e` as a BrokenAdapter naming the adapter, the server's paths replaced by the adapter's label."""
        if isinstance(e, BrokenAdapter):
            return e
        # a ConfigError names its field already (soak: 'cannot be served: ConfigError: invalid config: rank_pattern')
        message = str(e) if isinstance(e, (AdapterError, ConfigError, OSError)) else f"{type(e).__name__}: {e}"
        message = re.sub(r"\s*\n\s*", " ", self._public(entry, message))  # one line (config errors list lines)
        return BrokenAdapter(f"adapter {shown(entry.name)} cannot be served: {message}")

    def _public(self, entry: Adapter, message: str) -> str:
        message = message.replace(str(entry.path), entry.label)
        local = base_name_or_path(self.model) or ""  # as load_adapter's misfit message names the model given
        if os.sep in local:  # the base's folder on this machine (e.g. its cache): clients know it by its served name
            message = message.replace(local, self.base_name)
        if self.adapters_dir is not None:
            message = message.replace(str(self.adapters_dir) + os.sep, "")
        return message

    def _mark_broken(self, entry: Adapter, problem: str, stamp: tuple) -> None:
        """Take a registered adapter off the list: requests naming it get `problem` until its files change."""
        entry.problem, entry.stamp = problem, stamp
        with self.lock:
            if self.adapters.get(entry.name) is entry:
                del self.adapters[entry.name]
                self.broken[entry.name] = entry
                entry.registered = False

    # ---- engine thread only ----

    def check(self, entry: Adapter) -> None:
        """Load `entry` onto the model and take it off again: its files are readable and fit the base (engine
        thread; used when no slot is free to keep it resident)."""
        self.precheck(entry)
        probe = f"{entry.uid}-check"
        self._load(entry, probe)
        try:
            self._servable_layers(entry, probe)
        finally:
            delete_adapter(self.model, probe)
        entry.verified = True

    def _load(self, entry: Adapter, uid: str) -> None:
        """load_adapter (every key and shape checked; safetensors only), the model left as it was on any failure;
        a problem of the files raises BrokenAdapter. An AdaLoRA adapter loads as the equal LoRA (adalora_as_lora):
        on a module that holds LoRA adapters, an AdaLoRA layer could not go (soak: a 409 while any LoRA was resident,
        and a server given both kinds with --adapter did not start)."""
        try:
            with regex_budget(ADAPTER_REGEX_S):
                load_adapter(self.model, entry.path, uid, as_lora=True)  # AdaLoRA as the equal LoRA
        except (ValueError, OSError) as e:
            delete_adapter(self.model, uid)
            raise self._broken(entry, e) from None
        except BaseException:
            delete_adapter(self.model, uid)
            raise

    def _servable_layers(self, entry: Adapter, uid: str) -> list[LoraLinear]:
        layers = [layer for _, layer in lora_layers(self.model) if uid in layer.r]
        for layer in layers:
            if type(layer) is not LoraLinear:
                raise self._broken(entry, AdapterError(f"layer type {type(layer).__name__} cannot be batched per "
                                                       f"row"))
        return layers

    def ensure_resident(self, entry: Adapter) -> bool:
        """Put `entry` on the model, evicting the least recently used idle adapter if needed.

        False when every slot holds an adapter in use, or when its files changed while rows still use the old
        weights: a request then waits for rows to finish (one arriving after a change is answered from the new
        files). An adapter whose files fail (BrokenAdapter) is marked broken unless it is an upload's first check
        (that is a 400).
        """
        if entry.slot is not None:
            if _stamp(entry) == entry.loaded_stamp:
                self.resident.move_to_end(entry.uid)
                return True
            if entry.running:  # soak: steady overlapping traffic kept a retrained run on its old weights for ever
                return False  # files changed: new rows wait until the rows on the old weights end, then it reloads
            self.evict(entry)  # soak: files rewritten since (a run retrained into it) were served or not by LRU luck
        if self._moved(entry):  # its folder was removed or moved while the request waited
            with self.lock:
                self._forget(entry)
            raise UnknownAdapter(f"model {shown(entry.name)} does not exist any more: its folder in the adapters "
                                 f"directory was removed or moved while the request waited; send it again")
        if entry.problem is not None:
            raise BrokenAdapter(entry.problem)  # known broken: its files are not read again
        victim = None
        if not self._free_slots and self._next_slot > self.max_loaded:
            victim = next((a for a in self.resident.values() if a.running == 0), None)
            if victim is None:
                return False
        stamp = _stamp(entry)
        try:
            self.precheck(entry)  # before an eviction: a broken adapter costs the resident ones nothing
            if victim is not None:
                self.evict(victim)
            self._load(entry, entry.uid)
            try:
                layers = self._servable_layers(entry, entry.uid)
            except AdapterError:
                delete_adapter(self.model, entry.uid)
                raise
        except BrokenAdapter as e:
            if entry.discovered or entry.verified:
                self._mark_broken(entry, str(e), stamp)
            raise
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
        for layer in layers:
            A, B, scale, g = factors(layer, entry.uid)
            stack = self._stacks.get(layer)
            if stack is None:
                stack = self._stacks[layer] = Stack(layer, self.max_loaded + 1, A.shape[0], self.rows,
                                                    self.adapter_dtype, first=slot)
                layer.row_forward = stack.forward
            stack.put(slot, A, B, scale, g)
        entry.slot, entry.load_id, entry.verified, entry.loaded_stamp = slot, next(self._loads), True, stamp
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
