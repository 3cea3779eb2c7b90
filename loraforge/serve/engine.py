"""The serving engine: one base model, many LoRA adapters, one batch (continuous batching across adapters).

A background thread owns the model. Each scheduler iteration
  1. runs queued commands (load / unload an adapter) on the model,
  2. admits waiting requests in arrival order: makes each one's adapter resident (residency.py), takes the
     keys/values of each prompt's longest cached prefix (prefix.py, per adapter load), prefills the rest of the new
     prompts in one forward (left-padded, rows mixing adapters too), caches their prompts' new full blocks and
     appends their KV caches to the running batch's (batch.py). A request whose adapter finds every slot in use
     waits, and until it gets one, the resident adapter whose rows end soonest takes no new rows (`_drain_target`),
     so steady traffic to the resident adapters cannot keep it waiting for ever,
  3. runs ONE decode step for every running sequence together, then samples each row's token (sampling.py).
So new requests join between decode steps, and a batch mixes adapters freely.

A request's own failure (its sampling, its text, its consumer) ends that request with an error event; the rest of
the batch goes on. A prefill that fails is retried one request at a time, so only the request that breaks it fails.
"""

from __future__ import annotations

import atexit
import collections
import copy
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from loraforge.decoding import stop_ids
from loraforge.inference.greedy import OVERFLOWED
from loraforge.inference.llama import unsupported
from loraforge.lora.adapters import AdapterError
from loraforge.lora.inject import lora_layers
from loraforge.models import context_length
from loraforge.precision import TORCH_DTYPES, Precision, overflow_fix
from loraforge.serve.batch import Batch
from loraforge.serve.detokenize import TextStream
from loraforge.serve.errors import EngineStopped, PromptTooLong, QueueFull, ServeError, ShuttingDown
from loraforge.serve.prefix import PrefixCache
from loraforge.serve.request import Completion, Event, Request
from loraforge.serve.residency import Adapter, Residency, check_adapter_dtype
from loraforge.serve.sampling import SamplingParams, generator, greedy_token, greedy_tokens, sample
from loraforge.serve.static_batch import StaticBatch
from loraforge.utils.allocator import return_large_frees
from loraforge.utils.files import expand_user

IDLE_CHECK_S = 1.0  # how often an idle engine thread looks whether its Engine is still referenced (_run)
EXIT_WAIT_S = 10.0  # at interpreter exit, how long each engine thread is given to end its step and give the model back
UNKNOWN_CONTEXT = 2048  # the context served for a config that names none (models.context_length None)
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's: a threshold the user gives wins (Engine)

log = logging.getLogger("loraforge.serve")


class Engine:
    """Continuous batching of generation requests across LoRA adapters on one base model.

    The engine owns `model` from now on (it loads and evicts adapters on it): give it a base without adapters.
    `adapters` maps names to adapter directories, loaded (and so checked) at start; every subdirectory NAME of
    `adapters_dir` holding an adapter_config.json, or whose NAME/adapter/ holds one (a training run's folder), is
    registered as NAME and loaded on first use.
    `prefix_cache_mb` bounds the keys/values of shared prompt prefixes kept for reuse (prefix.py; 0 turns it off),
    matched in blocks of `prefix_block` tokens.
    A prompt with more than `prefill_chunk` tokens to compute is prefilled `prefill_chunk` tokens a pass, into the
    prefix cache (`_chunk`), the running rows decoding a step between passes, and a client that leaves stops it
    after the pass: in one pass, a soak's 3,000-token prompt held every stream for 30 s, after its client had gone.
    `precision`: what the server chose (serve's --precision and --dtype; default: the model's dtype for both), so
    a forward that overflows fp16 says so and names the fix (precision.overflow_fix) in its request's error.
    stop() ends it; an Engine dropped without it finishes the requests it has, then gives the model back (a new
    Engine on that model waits for that), and one still running at interpreter exit is stopped then (_stop_at_exit).
    """

    def __init__(self, model: nn.Module, tokenizer, *, base_name: str = "base",
                 adapters: dict[str, str | Path] | None = None, adapters_dir: str | Path | None = None,
                 max_loaded: int = 8, max_batch: int = 32, max_queue: int = 256, default_max_tokens: int = 256,
                 max_prefill_tokens: int = 4096, prefix_cache_mb: float = 256, prefix_block: int = 16,
                 adapter_dtype: str = "auto", static: bool | None = None, prefill_chunk: int = 512,
                 precision: Precision | None = None):
        _release(model)
        if lora_layers(model):
            raise ValueError("the engine needs a base model without adapters; it loads them itself (a model another "
                             "Engine serves: call that engine's stop() first)")
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0 turns the prefix cache off), got {prefix_cache_mb}")
        check_adapter_dtype(adapter_dtype)
        if prefill_chunk < prefix_block:
            raise ValueError(f"prefill_chunk ({prefill_chunk}) must be at least prefix_block ({prefix_block})")
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
        self.max_prefill_tokens, self.prefill_chunk = max_prefill_tokens, prefill_chunk
        self.default_max_tokens = default_max_tokens
        self.context_length = context_length(model.config) or UNKNOWN_CONTEXT  # yarn/llama3 scalings included
        self.eos_ids = set(stop_ids(tokenizer, model))  # generate's and eval's: the chat template's end of turn too
        self.device = next(model.parameters()).device
        if self.device.type == "cpu" and MMAP_THRESHOLD_ENV not in os.environ:
            # glibc raises its mmap threshold each time a large block is freed, after which the prefix cache's blocks
            # (SmolLM2 fp32: 720 KB each) and the prefills' temporaries come from the heap, and what eviction frees
            # there stays resident: SmolLM2 fp32, past a full 256 MB cache, RSS +127 MB over 50 more varied requests
            # with the same tensors held (642, 814 MB), all of it given back by malloc_trim. Held at 128 KB, each
            # large block is mapped and unmapped: +3 MB (MALLOC_MMAP_THRESHOLD_ in the environment is kept)
            return_large_frees()
        if precision is None:
            stored = next((k for k, v in TORCH_DTYPES.items() if v == next(model.parameters()).dtype), "fp32")
            precision = Precision(stored, stored, "the model's dtype")
        # soak: fp16's overflow answered a bare "the model's logits have no finite value"
        self._overflow = overflow_fix(precision) if "fp16" in (precision.compute, precision.storage) else OVERFLOWED

        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: list[tuple[Callable, Future]] = []
        self._stopping = False
        self.died: str | None = None  # why the thread ended on an error of its own (_die); None while it serves
        self._held: Engine | None = None  # itself while it has work (submit, call): _run drops it once idle
        self._ids = itertools.count(1)
        self.adapters_dir = expand_user(adapters_dir).resolve() if adapters_dir else None
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20), prefix_block)
        self._residency = Residency(model, self._cv, base_name=base_name, max_loaded=max_loaded,
                                    allowed=list((adapters or {}).values()), adapters_dir=self.adapters_dir,
                                    on_evict=lambda entry, cache=self.prefix_cache: cache.forget(entry.load_id),
                                    adapter_dtype=adapter_dtype)
        # steps, decoded tokens, prefills, max_running, loads, evictions; prompt tokens prefilled and reused (cached)
        self.stats = self._residency.stats
        # Llama-family bases decode on the static decoder (generate's and eval's path); others on transformers' forward
        why = unsupported(model)
        self.static = static if static is not None else why is None
        if self.static and why is not None:
            raise ValueError(f"static=True: the static decoder does not run {why}")
        self._batch = StaticBatch(model, self._residency, max_batch, self.context_length) if self.static \
            else Batch(model, self._residency.rows)

        for name, path in (adapters or {}).items():  # checked now, so a bad adapter stops the start
            # a relative start path is the working directory's, as `allowed` reads it (not adapters_dir's)
            entry = self._residency.register(name, expand_user(path).absolute(), label=str(path))
            self._residency.ensure_resident(entry)
        if self.adapters_dir is not None:
            self._residency.register_dir()
        # the thread holds the engine weakly (_run): the residency and its callback must not hold it either
        self._thread = threading.Thread(target=_run, args=(weakref.ref(self), self._cv, self._residency),
                                        name="loraforge-engine", daemon=True)
        _THREADS[self._thread] = self._cv
        _OWNERS[model] = (weakref.ref(self), self._thread, self._cv)
        self._thread.start()

    # ---- public API (any thread) ----

    def adapter_names(self) -> list[str]:
        """The adapters served, those added to adapters_dir since the start included (Residency.discover, which
        reads the folder outside the engine's lock: 8 threads listing 410 folders under it slowed decoding 2.4x)."""
        self._residency.discover()
        with self._cv:
            return list(self._residency.adapters)

    def adapter_warnings(self) -> dict[str, str]:
        """What loading each served adapter warns (its name -> the sentence, server paths named as the client
        knows them): a QLoRA adapter over the full-precision base. The dashboard shows it where the adapter is
        chosen; the server's log alone left the page's user unaware."""
        with self._cv:
            return {name: entry.warning for name, entry in self._residency.adapters.items() if entry.warning}

    def resident_adapters(self) -> list[str]:
        """Names of the adapters now on the model, least recently used first."""
        with self._cv:
            return [a.name for a in self._residency.resident.values()]

    @property
    def stopping(self) -> bool:
        """Whether stop() was called: every later request is refused (ShuttingDown)."""
        return self._stopping

    def load(self) -> dict[str, int | float]:
        """Requests waiting and running now, adapters resident, and what the prefix cache holds of its budget (it
        fills up to it and stays there: a soak read its growth as a leak, with nothing that said otherwise)."""
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._batch),
                    "resident": len(self._residency.resident),
                    "prefix_cache_mb": round(self.prefix_cache.bytes / 2**20, 2),
                    "prefix_cache_budget_mb": round(self.prefix_cache.budget / 2**20, 2)}

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
        gen = generator(params)
        with self._cv:
            if self.died:
                raise EngineStopped(self.died)
            if self._stopping:
                raise ShuttingDown("the engine is shutting down")
            entry = self._residency.lookup(adapter)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            req = Request(list(prompt_ids), entry, params, max_tokens, on_event, id=next(self._ids),
                          arrival=time.perf_counter(), generator=gen)
            if entry is not None:
                entry.queued += 1
            self._waiting.append(req)
            self._held = self  # a caller that drops the engine now still gets its request's events
            self._cv.notify_all()
        return req

    def abort(self, req: Request) -> None:
        """Stop a request (its consumer went away): it gets a final "abort" event unless already finished."""
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
            if self.died:
                raise EngineStopped(self.died)
            if self._stopping:
                raise ShuttingDown("the engine is shutting down")
            self._commands.append((fn, fut))
            self._held = self
            self._cv.notify_all()
        return fut

    def add_adapter(self, name: str, path: str | Path, timeout: float | None = 60) -> None:
        """Register adapter `name` at run time and load it once to check it.

        `path` is relative to `adapters_dir` (or absolute); it must lie inside `adapters_dir` or be a path given
        at start. The files are checked (readable safetensors, every key and shape fits the base) before this
        returns, whether or not a slot is free. Raises ServeError naming the problem.
        """
        with self._cv:
            entry = self._residency.register(name, path)

        def load_or_check():
            if not self._residency.ensure_resident(entry):
                self._residency.check(entry)  # every slot is busy: check the files now, load on first use

        try:
            self.call(load_or_check).result(timeout)
        except Exception as e:
            with self._cv:
                if self._residency.adapters.get(name) is entry:
                    del self._residency.adapters[name]
                entry.registered = False
            if isinstance(e, ServeError):
                raise
            raise ServeError(str(e) if isinstance(e, AdapterError) else
                             f"cannot load adapter {name!r}: {type(e).__name__}: {e}") from None

    def remove_adapter(self, name: str) -> None:
        """Unregister adapter `name`: new requests for it get 404; requests already in flight finish with it."""
        with self._cv:
            self._residency.unregister(name)
            self._cv.notify_all()  # the loop evicts it once idle

    def stop(self, timeout: float | None = 10) -> None:
        """Finish nothing more: pending requests get an "abort" event, adapters leave the model, the thread exits.
        Waits up to `timeout` seconds for that; 0 returns at once (the HTTP server's stop calls it from its event
        loop, which must go on to deliver the abort events)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---- the scheduler loop (engine thread) ----

    def _busy(self) -> bool:
        """Work for the loop (under self._cv): a stop, requests, commands, rows decoding, an adapter to evict."""
        return bool(self._stopping or self._waiting or self._commands or self._batch.rows
                    or self._residency.has_unregistered_idle())

    def _turn(self) -> bool:
        """One pass of the scheduler loop: commands, admissions, a decode step; False once stopping."""
        res = self._residency
        with self._cv:
            if self._stopping:
                return False
            commands, self._commands = self._commands, []
        for fn, fut in commands:
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller; the server goes on
                fut.set_exception(e)
        res.evict_unregistered()
        try:
            self._admit()
            self._drop_aborted()
            if self._batch.rows:
                self._decode_step()
        except Exception as e:  # a bug or OOM in a batch forward: fail the batch, keep serving
            for req in self._batch.rows:
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            self._batch.clear()
        return True

    def _end(self) -> None:
        """After stop(): pending requests aborted, commands cancelled (the adapters leave the model in _run)."""
        with self._cv:
            pending, self._waiting = list(self._waiting) + self._batch.rows, collections.deque()
            commands, self._commands = self._commands, []
            self._held = None
        for req in pending:
            self._finish(req, "abort")
        for _, fut in commands:
            fut.cancel()

    def _die(self, e: BaseException) -> None:
        """The thread ends on `e`, raised outside a step's own try (the scheduling code, a KeyboardInterrupt sent
        to the thread): every request pending fails now and every later one is refused (submit, call), each with
        the reason, a 503. It used to end silently: their callers (generate without a timeout, the HTTP requests on
        it, streamed or not) waited for ever, and new requests were queued to the dead thread."""
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        log.error("the serving engine's thread ended on %s; every request is refused from now on", why, exc_info=e)
        with self._cv:
            self.died = f"the engine stopped: its thread ended on {why} (the server's log has the traceback); " \
                        f"restart the server"
            pending, self._waiting = list(self._waiting) + self._batch.rows, collections.deque()
            commands, self._commands = self._commands, []
            self._held = None
        for req in pending:
            try:
                self._finish(req, "error", error=self.died, status=EngineStopped.status, code=EngineStopped.__name__)
            except BaseException:  # the state _finish reads may be what broke: the event all the same
                _tell(req, Event(finish_reason="error", error=self.died, status=EngineStopped.status,
                                 code=EngineStopped.__name__))
        for _, fut in commands:
            if not fut.cancelled():
                fut.set_exception(EngineStopped(self.died))
        try:
            self._batch.clear()  # its KV cache is freed while the server stays up to answer 503
        except BaseException:  # the thread ends all the same; what broke it is logged above
            pass

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
        admitted: list[Request] = []
        draining = None  # once a request waits for a slot: the resident adapter that takes no new rows until idle
        chunked = False  # one pass of one long prompt per call: the running rows take a step between passes
        for req in candidates:
            if len(self._batch) + len(admitted) >= self.max_batch:
                break
            if req.adapter is not None:
                if req.adapter is draining:
                    continue  # an older request waits for its slot
                try:
                    if not self._residency.ensure_resident(req.adapter):
                        if req.adapter.slot is None:  # every slot holds an adapter in use
                            draining = draining or self._drain_target(admitted)
                        continue  # else its files changed: it reloads once its rows on the old weights end
                except Exception as e:  # a broken adapter fails its own requests only
                    with self._cv:
                        self._waiting.remove(req)
                    self._finish(req, "error", error=str(e) if isinstance(e, (AdapterError, OSError, ServeError))
                                 else f"{type(e).__name__}: {e}", status=getattr(e, "status", 500),
                                 code=type(e).__name__ if isinstance(e, ServeError) else None)
                    continue
            if not chunked and self._chunk(req):  # it waits on, its prompt's next pass cached
                chunked = True
                continue
            with self._cv:
                self._waiting.remove(req)
            req.admitted = True
            if req.adapter is not None:
                req.adapter.running += 1
            admitted.append(req)
            req.on_event(Event())  # started: a stream's 200 and its role chunk go now, before the prefill
        group: list[Request] = []  # prefill together, up to max_prefill_tokens padded tokens at a time
        try:
            for req in admitted + [None]:
                if req is not None:  # matched now: the groups before it have cached their blocks
                    req.cached = self.prefix_cache.match(req.owner, req.prompt_ids) if req.owner is not None else []
                width = max([self._uncached(r) for r in group] + [self._uncached(req) if req else 0])
                if group and (req is None or width * (len(group) + 1) > self.max_prefill_tokens):
                    self._prefill(group)
                    group = []
                if req is not None:
                    group.append(req)
        except Exception as e:  # out of the queue, maybe not in the batch: ended here, or none would end them (a
            for req in admitted:  # Gemma 2 join's error lost its requests, and their clients waited for ever)
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            raise  # the loop fails the batch

    def _drain_target(self, admitted: list[Request]) -> Adapter | None:
        """The resident adapter whose rows (running and `admitted`) end soonest: while a request waits for a slot,
        that adapter takes no new rows, so it goes idle and its slot frees within that many steps. The soonest end
        among the busy adapters then drops every step, so a waiting request gets a slot in bounded time however
        steady the other adapters' traffic is; the other resident adapters keep batching meanwhile."""
        left: dict[Adapter, int] = {}
        for req in self._batch.rows + admitted:
            if req.adapter is not None and req.adapter.slot is not None:
                left[req.adapter] = max(left.get(req.adapter, 0), req.max_tokens - len(req.out_ids))
        return min(left, key=left.get, default=None)

    def _chunk(self, req: Request) -> bool:
        """One pass of a long prompt: where more than `prefill_chunk` of its tokens are not cached, the next
        `prefill_chunk` (whole blocks) are prefilled alone and their keys/values kept in the prefix cache, as any
        prompt's are; the request itself is admitted once the rest fits one pass, its prefix matched then. False
        (prefilled whole, as before) where the cache cannot hold the passes: off, the adapter off the model, or a
        pass's blocks evicted before the next (a budget smaller than the prompt), so every request progresses."""
        cache, owner = self.prefix_cache, req.owner
        if not cache.budget or owner is None or req.chunked_to < 0:
            return False
        cached = cache.match(owner, req.prompt_ids)
        done = len(cached) * cache.block
        if done < req.chunked_to:  # its earlier passes were evicted: one pass then
            req.chunked_to = -1
            return False
        end = done + self.prefill_chunk // cache.block * cache.block
        if len(req.prompt_ids) - done <= self.prefill_chunk or end >= len(req.prompt_ids):
            return False
        part = Request(req.prompt_ids[:end], req.adapter, req.params, 1, lambda ev: None, cached=cached)
        try:
            _, prefilled, _ = self._batch.prefill([part])
        except Exception:  # the request's own prefill says what fails, as for any other
            req.chunked_to = -1
            return False
        self._cache_prompt(part, prefilled, 0)
        self.stats["prefill_passes"] += 1
        req.chunked_to = end
        return True

    def _uncached(self, req: Request) -> int:
        return len(req.prompt_ids) - len(req.cached) * self.prefix_cache.block

    def _prefill(self, reqs: list[Request]) -> None:
        """Prefill `reqs` together; if that forward fails, each alone, so only the request that breaks it fails."""
        try:
            logits, cache, mask = self._batch.prefill(reqs)
        except Exception as e:
            if len(reqs) > 1:
                for req in reqs:
                    self._prefill([req])
                return
            self._finish(reqs[0], "error", error=f"{type(e).__name__}: {e}")
            return
        self.stats["prefills"] += 1
        for i, req in enumerate(reqs):
            self._cache_prompt(req, cache, i)
        keep = self._advance(reqs, logits)
        if keep:
            self._batch.join(reqs, keep, cache, mask)
            self.stats["max_running"] = max(self.stats["max_running"], len(self._batch))

    def _cache_prompt(self, req: Request, cache, row: int) -> None:
        """Keep the new full blocks of a prefilled prompt (row `row` of `cache`) for the requests to come."""
        rest = self._uncached(req)
        self.stats["prefilled_tokens"] += rest
        self.stats["cached_tokens"] += len(req.prompt_ids) - rest
        new = len(req.prompt_ids) // self.prefix_cache.block - len(req.cached)
        if self.prefix_cache.budget and new > 0 and req.owner is not None:
            try:
                kv = self._batch.row_kv(cache, row, -rest, new * self.prefix_cache.block)
                self.prefix_cache.store(req.owner, req.prompt_ids, req.cached, kv)
            except RuntimeError as e:  # layers of different shapes cannot stack: serve on without the cache
                self.prefix_cache.turn_off(f"{type(e).__name__}: {e}")
        req.cached = []  # its blocks are in the batch's cache now

    def _decode_step(self) -> None:
        rows = self._batch.rows
        logits = self._batch.step()
        self.stats["steps"] += 1
        self.stats["decoded"] += len(rows)
        self._batch.keep(self._advance(rows, logits))

    def _advance(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        """Each row takes its next token from logits (B, V); the indices of the rows still running.

        A row whose own sampling or text fails ends with an error; the others are not touched by it.
        """
        greedy = greedy_tokens(logits) if any(r.params.temperature == 0 for r in rows) else None
        keep = []
        for i, req in enumerate(rows):
            try:
                token = greedy_token(logits[i], greedy[i], self._overflow) if req.params.temperature == 0 else \
                    sample(logits[i], req.params, req.generator, self._overflow)
                done = self._append(req, token)
            except Exception as e:
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
                continue
            if not done:
                keep.append(i)
        return keep

    def _drop_aborted(self) -> None:
        rows = self._batch.rows
        keep = [i for i, r in enumerate(rows) if not r.aborted]
        if len(keep) < len(rows):
            for r in rows:
                if r.aborted:
                    self._finish(r, "abort")
            self._batch.keep(keep)

    # ---- text (engine thread) ----

    def _append(self, req: Request, token: int) -> bool:
        """Add a generated token, send the new text; True when the request is finished."""
        req.out_ids.append(token)
        if req.text is None:
            req.text = TextStream(self._decoder)
        req.text.add(token)
        reason = None
        if token in self.eos_ids and not req.params.ignore_eos:
            reason = "stop"
        elif len(req.out_ids) >= req.max_tokens:
            reason = "length"
        text = req.text.text()
        stops = req.params.stop
        if stops:
            start = max(0, req.sent - max(map(len, stops)))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                text, reason = text[:min(hits)], "stop"
        if reason is not None:  # a character cut off at the end (max_tokens inside it) is dropped, not a U+FFFD
            self._finish(req, reason, text=text[:len(req.text.complete())])
            return True
        hold = max(map(len, stops)) - 1 if stops else 0  # a stop string may be starting
        upto = min(len(text) - hold, len(text) - req.text.incomplete)  # an incomplete character: wait for the rest
        if upto > req.sent:
            req.on_event(Event(text[req.sent:upto], [token]))
            req.sent = upto
        else:
            req.on_event(Event("", [token]))
        return False

    def _finish(self, req: Request, reason: str, text: str | None = None, error: str | None = None,
                status: int = 500, code: str | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        if text is None:
            text = req.text.complete() if req.text is not None else ""
        last = [req.out_ids[-1]] if req.out_ids and reason in ("stop", "length") else []
        with self._cv:
            if req.adapter is not None:
                req.adapter.queued -= 1
                if req.admitted:
                    req.adapter.running -= 1
        try:
            req.on_event(Event(text[req.sent:], last, reason, len(req.prompt_ids), len(req.out_ids), error, status,
                               code))
        except Exception:  # a consumer that went away must not stop the engine
            pass
        req.generator = None  # the request may be kept by its consumer; its random state need not be


def _run(engine_ref: weakref.ref, cv: threading.Condition, res: Residency) -> None:
    """The engine thread: Engine._turn while there is work, until stop(). Idle, it holds its Engine only by weak
    reference, so an Engine dropped without stop() (a notebook cell run again) is collected, KV cache and all, and
    its thread ends within IDLE_CHECK_S (soak: ten dropped engines kept ten threads and 8.5 MB each). Either way
    the adapters leave the model: it is given back as it came. While it has work, the engine holds itself
    (Engine._held, set by submit and call, dropped here once idle): an Engine dropped with requests in flight was
    collected between two steps, and its requests' consumers waited for ever for their last event. An error that
    ends the loop fails what is pending and refuses the rest (Engine._die)."""
    try:
        _loop(engine_ref, cv)
    except BaseException as e:  # outside a step's own try: a bug in the scheduling code, a KeyboardInterrupt
        engine = engine_ref()
        if engine is not None:
            engine._die(e)
        else:
            log.error("the serving engine's thread ended on %s: %s", type(e).__name__, e, exc_info=e)
        del engine
    for entry in list(res.resident.values()):  # give the model back as it came: no adapters
        res.evict(entry)


def _loop(engine_ref: weakref.ref, cv: threading.Condition) -> None:
    """_run's loop: until stop(), or its Engine is collected."""
    while True:
        with cv:
            engine = engine_ref()
            if engine is None:
                break
            if _EXITING.is_set():
                engine._stopping = True  # as stop(): pending requests aborted, then the adapters leave
            if not engine._busy():
                engine._held = None  # idle: only its callers keep it now
                del engine  # not held while waiting
                cv.wait(IDLE_CHECK_S)
                continue
        if not engine._turn():
            engine._end()
            break
        del engine


def _tell(req: Request, event: Event) -> None:
    """Send a request its last event, whatever its consumer does with it (Engine._die)."""
    try:
        req.on_event(event)
    except BaseException:
        pass


def _release(model: nn.Module) -> None:
    """Wait for the thread of the model's last Engine to give the model back, where that Engine was dropped (it
    would, within IDLE_CHECK_S): a script that made its engines in a loop on one model (`del engine`, then
    Engine(model, ...) again) was refused "the engine needs a base model without adapters" for up to a second."""
    ref, thread, cv = _OWNERS.get(model, (None, None, None))
    deadline = time.monotonic() + IDLE_CHECK_S  # its thread may still hold it, ending the step of its last request
    while ref is not None and thread.is_alive() and time.monotonic() < deadline:
        with cv:
            engine = ref()
            if engine is not None and engine._busy():
                return  # in use: refused below
            if engine is not None:
                engine._held = None  # idle: only its callers keep it, as _run would make it
            del engine
            if ref() is None:
                cv.notify_all()  # its thread finds its engine gone now, not at its next idle check
                break
        time.sleep(0.01)
    if thread is not None:
        thread.join(EXIT_WAIT_S if ref() is None else 0)


_OWNERS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()  # the model's last Engine: _release
_EXITING = threading.Event()
_THREADS: weakref.WeakKeyDictionary[threading.Thread, threading.Condition] = weakref.WeakKeyDictionary()


@atexit.register
def _stop_at_exit() -> None:
    """At interpreter exit, each engine thread still running stops (as stop()) and ends while Python can still run
    it. Left to the interpreter's end, a thread inside a torch op (giving the model back once its Engine was
    collected) was killed there: a script that ended without stop() aborted about every other run, "terminate
    called without an active exception", exit status 134."""
    _EXITING.set()
    for thread, cv in list(_THREADS.items()):
        with cv:
            cv.notify_all()
        thread.join(EXIT_WAIT_S)
