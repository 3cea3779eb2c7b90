"""The serving engine: one base model, many LoRA adapters, one batch (continuous batching across adapters).

A background thread owns the model. Each scheduler iteration
  1. runs queued commands (load / unload an adapter) on the model,
  2. admits waiting requests: makes each one's adapter resident, prefills the new prompts in one forward
     (left-padded, rows mixing adapters too) and appends their KV caches to the running batch's,
  3. runs ONE decode step for every running sequence together.
So new requests join between decode steps, and a batch mixes adapters freely.

Per-row LoRA (Punica / S-LoRA's idea, in plain PyTorch): every LoRA layer of the engine's model keeps a stack of
the resident adapters' weights, padded to the largest rank, slot 0 all zeros (the base model):
    A: (slots, r_max, in)   B: (slots, out, r_max)   scale: (slots,)
and a decode step with rows using adapters `idx` (B,) computes
    h = base(x) + scale[idx] · bmm(bmm(x, A[idx]ᵀ), B[idx]ᵀ)       x: (B, T, in)
so the base matmul is shared and each row gets its own low-rank delta. Zero padding of the rank adds exact zeros.

The batch's KV cache is one transformers DynamicCache, left-padded: row i's real tokens sit at the right end of
its row, `attention_mask` zeroes the padding, `position_ids` carry each row's real position. Padded key/values
are zeros (never NaN), and decode queries are always real tokens, so no attention row is fully masked.

Adapters are PEFT directories loaded with `loraforge.lora.adapters.load_adapter` (every key and shape checked,
safetensors only). At most `max_loaded` are resident; the least recently used idle one is evicted and loaded
again from its directory when a request names it. Only paths given at start or inside `adapters_dir` load.
"""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from loraforge.lora.adapters import AdapterError, delete_adapter, load_adapter, read_adapter_config
from loraforge.config import LoraConfig
from loraforge.decoding import left_pad, select_rows
from loraforge.lora.inject import lora_layers
from loraforge.lora.layer import LoraLinear

BASE_ALIASES = ("base",)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ServeError(Exception):
    """A request or command the engine refuses; `status` is the HTTP status the API answers with."""

    status = 400


class UnknownAdapter(ServeError):
    status = 404


class QueueFull(ServeError):
    status = 429


class PromptTooLong(ServeError):
    status = 400


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. temperature 0 is greedy (deterministic)."""

    max_tokens: int | None = None  # None: the engine's default_max_tokens, cut to the context left
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    seed: int | None = None  # for sampling (temperature > 0)
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks: fixed lengths)

    def __post_init__(self):
        problems = []
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or self.max_tokens < 1):
            problems.append(f"max_tokens: {self.max_tokens!r} must be a positive integer")
        if not 0 <= self.temperature <= 100:
            problems.append(f"temperature: {self.temperature!r} must be between 0 and 100 (0: greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: {self.top_p!r} must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 8:
            problems.append(f"stop: {list(self.stop)!r} must be at most 8 non-empty strings")
        if problems:
            raise ServeError("; ".join(problems))


@dataclass
class Event:
    """What a request's consumer receives, in order: text deltas, then one event with finish_reason set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class _Adapter:
    name: str
    path: Path
    uid: str  # the name on the model: unique per registration, so a re-registered name never mixes weights
    registered: bool = True
    slot: int | None = None  # index into the stacks while resident
    queued: int = 0  # requests submitted and not finished (an unloaded adapter stays until they finish)
    running: int = 0  # rows in the running batch (a resident adapter in use is never evicted)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: _Adapter | None
    params: SamplingParams
    max_tokens: int
    on_event: Callable[[Event], None]
    id: int = 0
    arrival: float = 0.0
    aborted: bool = False
    admitted: bool = False
    finished: bool = False
    # decoding state (engine thread only)
    out_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already sent
    length: int = 0  # tokens of this row in the KV cache (its next position id)
    generator: torch.Generator | None = None


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _RowIndex:
    """The slot of each row of the current forward, shared by every LoRA layer of the engine's model."""

    index: torch.Tensor = torch.zeros(1, dtype=torch.long)
    any_adapter: bool = False


class _Stack:
    """One layer's resident adapters stacked by slot, rank zero-padded to r_max; slot 0 stays zero (base)."""

    def __init__(self, layer: LoraLinear, slots: int, r: int):
        w = layer.base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.A = torch.zeros(slots, r, layer.in_features, dtype=dtype, device=w.device)
        self.B = torch.zeros(slots, layer.out_features, r, dtype=dtype, device=w.device)
        self.scale = torch.zeros(slots, dtype=dtype, device=w.device)

    def put(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        r = A.shape[0]
        if r > self.A.shape[1]:  # grow the padded rank; the zero padding adds nothing
            grow = r - self.A.shape[1]
            self.A = torch.cat([self.A, self.A.new_zeros(self.A.shape[0], grow, self.A.shape[2])], 1)
            self.B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], self.B.shape[1], grow)], 2)
        self.clear(slot)
        self.A[slot, :r] = A
        self.B[slot, :, :r] = B
        self.scale[slot] = scale

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.scale[slot] = 0


def _rowwise_forward(layer: LoraLinear, stack: _Stack, rows: _RowIndex, x: torch.Tensor, *args, **kwargs):
    """LoraLinear.forward for the engine's model: each row of x gets the adapter in its slot."""
    result = layer.base_layer(x, *args, **kwargs)  # the shared base matmul, (B, T, out)
    if not rows.any_adapter:
        return result
    idx = rows.index
    A = stack.A.index_select(0, idx)  # (B, r, in)
    B = stack.B.index_select(0, idx)  # (B, out, r)
    h = torch.bmm(x.to(A.dtype), A.transpose(1, 2))  # (B, T, r)
    delta = torch.bmm(h, B.transpose(1, 2)) * stack.scale.index_select(0, idx)[:, None, None]  # (B, T, out)
    return result + delta.to(result.dtype)


class Engine:
    """Continuous batching of generation requests across LoRA adapters on one base model.

    The engine owns `model` from now on (it loads and evicts adapters on it): give it a base without adapters.
    `adapters` maps names to adapter directories, loaded (and so checked) at start; every subdirectory of
    `adapters_dir` holding an adapter_config.json is registered under its directory name and loaded on first use.
    """

    def __init__(self, model: nn.Module, tokenizer, *, base_name: str = "base",
                 adapters: dict[str, str | Path] | None = None, adapters_dir: str | Path | None = None,
                 max_loaded: int = 8, max_batch: int = 32, max_queue: int = 256, default_max_tokens: int = 256,
                 max_prefill_tokens: int = 4096):
        if lora_layers(model):
            raise ValueError("the engine needs a base model without adapters; it loads them itself")
        if max_loaded < 1 or max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_loaded ({max_loaded}), max_batch ({max_batch}) and max_queue ({max_queue}) "
                             f"must be at least 1")
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer  # callers encode with it
        # the engine thread decodes with its own copy: a Rust tokenizer used by two threads may raise "Already borrowed"
        self._decoder = copy.deepcopy(tokenizer)
        self.base_name = base_name
        self.max_loaded, self.max_batch, self.max_queue = max_loaded, max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.default_max_tokens = default_max_tokens
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self.device = next(model.parameters()).device
        self.stats = collections.Counter()  # steps, decoded tokens, prefills, loads, evictions, max_running

        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: list[tuple[Callable, Future]] = []
        self._stopping = False
        self._ids = itertools.count(1)
        self._uids = itertools.count(1)
        self._adapters: dict[str, _Adapter] = {}  # registered, by name
        self._resident: collections.OrderedDict[str, _Adapter] = collections.OrderedDict()  # uid -> adapter, LRU first
        self._free_slots = list(range(max_loaded, 0, -1))
        self._stacks: dict[LoraLinear, _Stack] = {}
        self._rows_index = _RowIndex()
        self._allowed = {Path(p).expanduser().resolve() for p in (adapters or {}).values()}
        self.adapters_dir = Path(adapters_dir).expanduser().resolve() if adapters_dir else None
        # the batch: one row per running request, a left-padded KV cache and its attention mask
        self._rows: list[Request] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, L) 1 = real token

        for name, path in (adapters or {}).items():  # checked now, so a bad adapter stops the start
            entry = self._register(name, path)
            self._ensure_resident(entry)
        if self.adapters_dir is not None:
            if not self.adapters_dir.is_dir():
                raise FileNotFoundError(f"adapters_dir {self.adapters_dir} is not a directory")
            for sub in sorted(self.adapters_dir.iterdir()):
                if (sub / "adapter_config.json").is_file() and NAME_RE.fullmatch(sub.name) \
                        and sub.name not in self._adapters and sub.name not in (base_name, *BASE_ALIASES):
                    self._register(sub.name, sub)
        self._thread = threading.Thread(target=self._loop, name="loraforge-engine", daemon=True)
        self._thread.start()

    # ---- public API (any thread) ----

    def adapter_names(self) -> list[str]:
        with self._cv:
            return list(self._adapters)

    def resident_adapters(self) -> list[str]:
        """Names of the adapters now on the model, least recently used first."""
        with self._cv:
            return [a.name for a in self._resident.values()]

    def load(self) -> dict[str, int]:
        """Requests waiting and running now, and adapters resident."""
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._rows), "resident": len(self._resident)}

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
               on_event: Callable[[Event], None]) -> Request:
        """Queue a request; `on_event` is called from the engine thread. Raises a ServeError if refused."""
        n = len(prompt_ids)
        if n == 0:
            raise ServeError("the prompt is empty")
        if n >= self.context_length:
            raise PromptTooLong(f"the prompt is {n} tokens; the model's context is {self.context_length} tokens "
                                f"(prompt + output); shorten the prompt")
        room = self.context_length - n
        if params.max_tokens is not None and params.max_tokens > room:
            raise PromptTooLong(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                                f"context of {self.context_length} tokens; lower max_tokens to {room} or less")
        max_tokens = params.max_tokens or min(self.default_max_tokens, room)
        with self._cv:
            if self._stopping:
                raise ServeError("the engine is shutting down")
            entry = None
            if adapter is not None and adapter not in (self.base_name, *BASE_ALIASES):
                entry = self._adapters.get(adapter)
                if entry is None:
                    raise UnknownAdapter(f"model {adapter!r} does not exist; available: "
                                         f"{[self.base_name, *self._adapters]}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            req = Request(list(prompt_ids), entry, params, max_tokens, on_event, id=next(self._ids),
                          arrival=time.perf_counter())
            if params.temperature > 0:
                req.generator = torch.Generator(device="cpu")
                req.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
            if entry is not None:
                entry.queued += 1
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def abort(self, req: Request) -> None:
        """Stop a request (its client went away); it gets a final event with finish_reason "abort"."""
        with self._cv:
            req.aborted = True
            self._cv.notify_all()

    def generate(self, prompt_ids: list[int], adapter: str | None = None, params: SamplingParams | None = None,
                 timeout: float | None = None) -> Completion:
        """Submit one request and wait for it: the blocking form of `submit`."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(prompt_ids, adapter, params or SamplingParams(), events.put)
        text, ids = [], []
        while True:
            ev = events.get(timeout=timeout)
            text.append(ev.text)
            ids += ev.token_ids
            if ev.finish_reason is not None:
                if ev.error:
                    raise RuntimeError(ev.error)
                return Completion("".join(text), ids, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the engine thread between two steps (the only thread that touches the model)."""
        fut: Future = Future()
        with self._cv:
            if self._stopping:
                raise ServeError("the engine is shutting down")
            self._commands.append((fn, fut))
            self._cv.notify_all()
        return fut

    def add_adapter(self, name: str, path: str | Path, timeout: float | None = 60) -> None:
        """Register adapter `name` at run time and load it once to check it.

        `path` is relative to `adapters_dir` (or absolute); it must lie inside `adapters_dir` or be a path given
        at start. Raises ServeError naming the problem.
        """
        with self._cv:
            entry = self._register(name, path)
        try:
            self.call(lambda: self._ensure_resident(entry)).result(timeout)
        except AdapterError as e:
            with self._cv:
                if self._adapters.get(name) is entry:
                    del self._adapters[name]
                entry.registered = False
            raise ServeError(str(e)) from None

    def remove_adapter(self, name: str) -> None:
        """Unregister adapter `name`: new requests for it get 404; requests already in flight finish with it."""
        with self._cv:
            entry = self._adapters.pop(name, None)
            if entry is None:
                raise UnknownAdapter(f"adapter {name!r} is not loaded; loaded: {list(self._adapters)}")
            entry.registered = False
            self._cv.notify_all()  # the loop evicts it once idle

    def stop(self, timeout: float | None = 10) -> None:
        """Finish nothing more: pending requests get an "abort" event, adapters leave the model, the thread exits."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---- adapter registry and residency ----

    def _register(self, name: str, path: str | Path) -> _Adapter:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ServeError(f"adapter name {name!r} is not allowed: use letters, digits, '.', '_', '-' "
                             f"(at most 64, starting with a letter or digit)")
        if name in (self.base_name, *BASE_ALIASES):
            raise ServeError(f"adapter name {name!r} is the base model's name; pick another")
        if name in self._adapters:
            raise ServeError(f"an adapter named {name!r} is already loaded; "
                             f"unload it first (DELETE /v1/adapters/{name})")
        resolved = self._resolve(path)
        entry = _Adapter(name, resolved, uid=f"serve{next(self._uids)}")
        self._adapters[name] = entry
        return entry

    def _resolve(self, path: str | Path) -> Path:
        """The real adapter directory, refused unless it is a start path or inside adapters_dir (no traversal)."""
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

    def _ensure_resident(self, entry: _Adapter) -> bool:
        """Put `entry` on the model (engine thread), evicting the least recently used idle adapter if needed.

        False when every slot holds an adapter in use (a request then waits for a row to finish).
        """
        if entry.slot is not None:
            self._resident.move_to_end(entry.uid)
            return True
        if not self._free_slots:
            victim = next((a for a in self._resident.values() if a.running == 0), None)
            if victim is None:
                return False
            self._evict(victim)
        config = read_adapter_config(entry.path)
        if not isinstance(config, LoraConfig) or config.use_dora or config.modules_to_save or config.bias != "none":
            raise AdapterError(f"{entry.path}: the server batches plain LoRA adapters only (no DoRA, AdaLoRA, "
                               f"modules_to_save or bias); merge this one into the base (loraforge merge) instead")
        load_adapter(self.model, entry.path, entry.uid)  # checks every key and shape; safetensors only
        slot = self._free_slots.pop()
        for _, layer in lora_layers(self.model):
            if entry.uid not in layer.r:
                continue
            if type(layer) is not LoraLinear or entry.uid in getattr(layer, "lora_magnitude_vector", {}):
                delete_adapter(self.model, entry.uid)
                self._free_slots.append(slot)
                raise AdapterError(f"{entry.path}: layer type {type(layer).__name__} cannot be batched per row")
            stack = self._stacks.get(layer)
            if stack is None:
                stack = self._stacks[layer] = _Stack(layer, self.max_loaded + 1, layer.r[entry.uid])
                layer.forward = functools.partial(_rowwise_forward, layer, stack, self._rows_index)
            stack.put(slot, layer.lora_A[entry.uid].weight, layer.lora_B[entry.uid].weight, layer.scaling[entry.uid])
        entry.slot = slot
        with self._cv:
            self._resident[entry.uid] = entry
        self.stats["loads"] += 1
        return True

    def _evict(self, entry: _Adapter) -> None:
        for stack in self._stacks.values():
            stack.clear(entry.slot)
        delete_adapter(self.model, entry.uid)  # layers left without adapters go back to plain linears
        alive = {layer for _, layer in lora_layers(self.model)}
        self._stacks = {layer: s for layer, s in self._stacks.items() if layer in alive}
        self._free_slots.append(entry.slot)
        entry.slot = None
        with self._cv:
            self._resident.pop(entry.uid, None)
        self.stats["evictions"] += 1

    # ---- the scheduler loop (engine thread) ----

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._commands or self._rows
                           or any(not a.registered and a.queued == 0 for a in self._resident.values())):
                    self._cv.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the caller; the server goes on
                    fut.set_exception(e)
            for entry in [a for a in self._resident.values() if not a.registered and a.queued == 0]:
                self._evict(entry)
            try:
                self._admit()
                self._drop_aborted()
                if self._rows:
                    self._decode_step()
            except Exception as e:  # a bug or OOM: fail the batch, keep serving
                for req in self._rows:
                    self._finish(req, "error", error=f"{type(e).__name__}: {e}")
                self._rows, self._cache, self._mask = [], None, None
        with self._cv:
            pending, self._waiting = list(self._waiting) + self._rows, collections.deque()
            commands, self._commands = self._commands, []
        for req in pending:
            self._finish(req, "abort")
        for _, fut in commands:
            fut.cancel()
        for entry in list(self._resident.values()):  # give the model back as it came: no adapters
            self._evict(entry)

    def _select(self, waiting: list[Request]) -> list[Request]:
        """Which waiting requests to admit now, in order (room permitting). Every one: adapters mix freely."""
        return waiting

    def _admit(self) -> None:
        with self._cv:
            aborted = [r for r in self._waiting if r.aborted]
            for req in aborted:
                self._waiting.remove(req)
            candidates = self._select(list(self._waiting))
        for req in aborted:
            self._finish(req, "abort")
        admitted = []
        for req in candidates:
            if len(self._rows) + len(admitted) >= self.max_batch:
                break
            if req.adapter is not None:
                try:
                    if not self._ensure_resident(req.adapter):
                        continue  # every slot is in use: it waits for a row to finish
                except (AdapterError, OSError) as e:
                    with self._cv:
                        self._waiting.remove(req)
                    self._finish(req, "error", error=str(e))
                    continue
            with self._cv:
                self._waiting.remove(req)
            req.admitted = True
            if req.adapter is not None:
                req.adapter.running += 1
            admitted.append(req)
        group: list[Request] = []  # prefill together, up to max_prefill_tokens padded tokens at a time
        for req in admitted + [None]:
            width = max([len(r.prompt_ids) for r in group] + [len(req.prompt_ids) if req else 0])
            if group and (req is None or width * (len(group) + 1) > self.max_prefill_tokens):
                try:
                    self._prefill(group)
                except Exception as e:
                    for r in group:
                        self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                group = []
            if req is not None:
                group.append(req)

    def _slot(self, req: Request) -> int:
        return req.adapter.slot if req.adapter is not None else 0

    def _set_rows(self, slots: list[int]) -> None:
        self._rows_index.index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self._rows_index.any_adapter = any(slots)

    @torch.inference_mode()
    def _prefill(self, reqs: list[Request]) -> None:
        """New prompts in one forward, left-padded; then their caches join the running batch's."""
        from transformers import DynamicCache

        n, T = len(reqs), max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.long)
        for i, req in enumerate(reqs):
            ids[i, T - len(req.prompt_ids):] = torch.tensor(req.prompt_ids)
            mask[i, T - len(req.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        self._set_rows([self._slot(r) for r in reqs])
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask if padded else None, past_key_values=cache,
                         position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
        self.stats["prefills"] += 1
        if padded:  # the padding's key/values are never attended; make them zeros, never NaN
            pad = (mask == 0)[:, None, :, None]
            for layer in cache.layers:
                layer.keys.masked_fill_(pad, 0)
                layer.values.masked_fill_(pad, 0)
        keep = []
        for i, (req, token) in enumerate(zip(reqs, self._choose(out.logits[:, -1, :], reqs))):
            req.length = len(req.prompt_ids)
            if not self._append(req, token):
                keep.append(i)
        if keep:
            if len(keep) < n:
                mask = select_rows(cache, mask, torch.tensor(keep, dtype=torch.long, device=self.device))
            self._join([reqs[i] for i in keep], cache, mask)

    def _join(self, reqs: list[Request], cache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding whichever cache is shorter."""
        for layer in cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise NotImplementedError(f"the server batches full-attention caches only, not {type(layer).__name__}")
        if not self._rows:
            self._rows, self._cache, self._mask = reqs, cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for mine, new in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([left_pad(mine.keys, width), left_pad(new.keys, width)], 0)
                mine.values = torch.cat([left_pad(mine.values, width), left_pad(new.values, width)], 0)
            self._mask = torch.cat([left_pad(self._mask, width, dim=1), left_pad(mask, width, dim=1)], 0)
            self._rows = self._rows + reqs
        self.stats["max_running"] = max(self.stats["max_running"], len(self._rows))

    @torch.inference_mode()
    def _decode_step(self) -> None:
        rows = self._rows
        self._set_rows([self._slot(r) for r in rows])
        ids = torch.tensor([[r.out_ids[-1]] for r in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], 1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=pos, past_key_values=self._cache,
                         use_cache=True)
        self.stats["steps"] += 1
        self.stats["decoded"] += len(rows)
        tokens = self._choose(out.logits[:, -1, :], rows)
        keep = []
        for i, (req, token) in enumerate(zip(rows, tokens)):
            req.length += 1
            if not self._append(req, token):
                keep.append(i)
        if len(keep) < len(rows):
            self._keep_rows(keep)

    def _drop_aborted(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.aborted]
        if len(keep) < len(self._rows):
            for r in self._rows:
                if r.aborted:
                    self._finish(r, "abort")
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Drop finished rows from the batch."""
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._rows = [self._rows[i] for i in keep]
        self._mask = select_rows(self._cache, self._mask, torch.tensor(keep, dtype=torch.long, device=self.device))

    def _choose(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        """Next token per row: argmax for greedy rows, temperature / top-p sampling for the others."""
        logits = logits.float()
        tokens = logits.argmax(-1).tolist()
        for i, req in enumerate(rows):
            p = req.params
            if p.temperature > 0:
                probs = torch.softmax(logits[i] / p.temperature, -1).cpu()
                if p.top_p < 1:
                    sorted_p, order = probs.sort(descending=True)
                    cut = (sorted_p.cumsum(0) - sorted_p) >= p.top_p  # keep the smallest set reaching top_p
                    sorted_p[cut] = 0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                tokens[i] = int(torch.multinomial(probs, 1, generator=req.generator))
        return tokens

    def _append(self, req: Request, token: int) -> bool:
        """Add a generated token, send the new text; True when the request is finished."""
        req.out_ids.append(token)
        reason = None
        if token in self.eos_ids and not req.params.ignore_eos:
            reason = "stop"
        elif len(req.out_ids) >= req.max_tokens:
            reason = "length"
        text = self._decoder.decode(req.out_ids, skip_special_tokens=True)
        stops = req.params.stop
        if stops:
            start = max(0, req.sent - max(map(len, stops)))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                text, reason = text[:min(hits)], "stop"
        if reason is not None:
            self._finish(req, reason, text=text)
            return True
        hold = max(map(len, stops)) - 1 if stops else 0  # a stop string may be starting
        upto = len(text) - hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            upto = min(upto, len(text) - 1)
        if upto > req.sent:
            req.on_event(Event(text[req.sent:upto], [token]))
            req.sent = upto
        else:
            req.on_event(Event("", [token]))
        return False

    def _finish(self, req: Request, reason: str, text: str | None = None, error: str | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        if text is None:
            text = self._decoder.decode(req.out_ids, skip_special_tokens=True) if req.out_ids else ""
        last = [req.out_ids[-1]] if req.out_ids and reason in ("stop", "length") else []
        with self._cv:
            if req.adapter is not None:
                req.adapter.queued -= 1
                if req.admitted:
                    req.adapter.running -= 1
        try:
            req.on_event(Event(text[req.sent:], last, reason, len(req.prompt_ids), len(req.out_ids), error))
        except Exception:  # a consumer that went away must not stop the engine
            pass
