"""training.activation_buffer: a CPU step's kept activations in one buffer for the run (and glibc's heap trimmed).

glibc's heap fragments under training's pattern: each layer's kept activations land in holes that its temporaries
left, the next temporaries grow the heap, and the holes stay resident (docs/PERFORMANCE.md, "Memory on CPU": 4.1-4.3
GB resident for 2.5 GB of live tensors on 4 packed 512-token rows). Copying every kept activation into a buffer that
lives for the whole run (chunks of 64 MiB, which the C library maps outside its heap) leaves the heap the
temporaries only, and handing the heap's free pages back to the system every 256 MiB of activations (malloc_trim)
keeps their holes from staying resident; the pages are faulted in again when used, which costs speed. bench/train.py
on 4 packed 512-token rows of the built-in model, 2 rounds (docs/PERFORMANCE.md, "Memory on CPU"): fp32 peak 0.41x
PEFT's against 0.59x, bf16 0.39x against 0.47x, at 8-10% less speed. The copies alone lowered the peak a little
(0.54x, 0.46x) at the same cost, and the trims alone further (2596 against 2973 MiB) at more (kernel time 22%
against 13%).

With training.reuse_memory holding glibc's heap for the run (packed rows), the copies alone (trim=False, what
activation_buffer=auto does there) cost nothing: the heap keeps what the temporaries freed for the next step, and
without the kept activations among them it stays smaller. bench/train.py, 4 packed 512-token rows, 2 rounds: fp32
3706 against 4178 MiB at 1.01x the speed (rounds 0.96-1.06), bf16 2457 against 2486 at 1.01x.

    slab = ActivationSlab(model)
    with slab.saving():                 # around the forward; the backward reads the copies
        loss = loss_fn(batch)
    loss.backward()

The copies are exact (same dtype, same values, and a dense tensor's strides, so the backward's kernels take the
paths they would have taken), so losses and gradients equal the plain path's bit for bit. A tensor saved again, or
any view inside a dense one copied (a norm's output and the next linear's reshaped input), shares its copy. A
forward that keeps more than the chunks hold adds one; every forward fills them from the first. So a forward must be
followed by its backward before the next forward under saving(): a graph kept with retain_graph across forwards
would read overwritten activations. Weights and buffers, tensors under 64 kB, and any tensor not a plain strided
CPU one are kept by reference, as autograd keeps them.
"""

from __future__ import annotations

import contextlib
import weakref
from itertools import chain

import torch
from torch import nn

from loraforge.utils import allocator

ALIGN = 64  # bytes: each copy starts on a cache line, as the allocator's own blocks do
CHUNK = 64 << 20  # bytes: over glibc's largest dynamic mmap threshold (32 MiB), so mapped apart from its heap;
# under training.reuse_memory (threshold 1 GiB) chunks come from the heap: mapping them apart there (mmap.mmap)
# changed neither the heap's free pages nor the peak (fp32, 4 packed 512-token rows: ~1 GB free heap either way)
SMALLEST = 1 << 16  # bytes: smaller tensors stay where they are (they fit the heap's holes; copying costs calls)
TRIM_EVERY = 256 << 20  # bytes packed or unpacked between two trims of the heap (about 6 a step of the built-in model)


def uses_buffer(setting: bool | str, device: torch.device, sharded: bool = False, compiled: bool = False,
                reuses: bool = False) -> bool:
    """training.activation_buffer resolved (auto: where the run reuses glibc's heap, `reuses`, as
    training.reuse_memory decided); never on a GPU (its caching allocator does not fragment so), under FSDP (its
    gathers take the heap's holes) or torch.compile (which traces the saved tensors itself). The buffer trims the
    heap only for true (ActivationSlab's trim)."""
    wanted = reuses if setting == "auto" else setting is True
    return wanted and device.type == "cpu" and not sharded and not compiled


def unused_settings(reuse: bool | str, buffer: bool | str, device: torch.device, packed: bool,
                    sharded: bool = False, compiled: bool = False) -> list[str]:
    """One line for each of training.reuse_memory and training.activation_buffer set to true that this run leaves
    off, with why (hold_memory resolves them silently: auto is off there by design, a true was asked for)."""
    lines = []
    if buffer is True and not uses_buffer(buffer, device, sharded, compiled):
        why = ("on a GPU (its caching allocator does not fragment so)" if device.type != "cpu" else
               "under FSDP (its gathers take the heap's holes)" if sharded else
               "under training.compile (which traces the saved tensors itself)")
        lines.append(f"training.activation_buffer: true is off {why}; set it to auto to drop this line")
    if reuse is True and not allocator.reuses_memory(reuse, device.type, packed, sharded, buffered=buffer is True):
        name = allocator.loaded()
        why = ("on a GPU" if device.type != "cpu" else "under FSDP (it holds the heap's threshold low)" if sharded
               else "with training.activation_buffer: true (which trims the heap)" if buffer is True else
               f"under {name}, which reuses freed memory itself" if name != "libc" else "without glibc")
        lines.append(f"training.reuse_memory: true is off {why}; set it to auto to drop this line")
    return lines


def hold_memory(held: contextlib.ExitStack, model: nn.Module, reuse: bool | str, buffer: bool | str,
                device: torch.device, packed: bool, sharded: bool = False,
                compiled: bool = False) -> ActivationSlab | None:
    """training.reuse_memory and training.activation_buffer as a run resolves them, for train() and the benches:
    glibc's heap held for the run in `held` where reuse_memory resolves on, and the buffer returned where
    activation_buffer does (None: the plain path)."""
    reuses = allocator.reuses_memory(reuse, device.type, packed, sharded, buffered=buffer is True)
    if reuses:
        held.enter_context(allocator.reuse_freed_memory())
    if uses_buffer(buffer, device, sharded, compiled, reuses):  # auto: the copies alone, where the heap is kept
        return ActivationSlab(model, trim=buffer is True)
    return None


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill [first, first + numel) of its storage once each: its strides, smallest first, are
    those of a contiguous tensor (a transpose is; a slice with gaps or an expanded dimension is not)."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The storage elements [first, last) that a strided tensor with at least one element reads."""
    first = t.storage_offset()
    return first, first + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


class ActivationSlab:
    """Copies of the tensors autograd saves (saved_tensors_hooks), in chunks of one buffer; see the module docstring."""

    def __init__(self, model: nn.Module, chunk: int = CHUNK, trim: bool = True):
        # weights and buffers are saved by reference, never copied (they outlive the step anyway)
        self._kept = {t.untyped_storage().data_ptr() for t in chain(model.parameters(), model.buffers())}
        self.chunk = chunk
        self.chunks: list[torch.Tensor] = []  # uint8; each is mmapped by the C library (over its mmap threshold)
        self._used: list[int] = []  # bytes taken in each chunk by this forward's copies
        self._copies: dict = {}  # storage pointer, offset, shape, stride, dtype -> (storage weakref, version, copy)
        # storage pointer, dtype -> (storage weakref, version, first element, flat copy of the elements from there)
        self._spans: dict = {}
        self.trim = trim  # hand the heap's free pages back every TRIM_EVERY bytes of activations
        self._moved = 0  # bytes packed or unpacked since the heap was last trimmed

    @property
    def nbytes(self) -> int:
        return sum(c.numel() for c in self.chunks)

    @contextlib.contextmanager
    def saving(self):
        """Pack the saved tensors of the forward run inside into the chunks, from the first one on."""
        self._used = [0] * len(self.chunks)
        self._copies.clear()
        self._spans.clear()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            self._copies.clear()  # the bookkeeping only; the copies live on in the graph
            self._spans.clear()

    @property
    def used(self) -> int:
        """Bytes the copies of the forward under saving() take (each rounded up to ALIGN)."""
        return sum(self._used)

    def _place(self, nbytes: int) -> torch.Tensor:
        """nbytes of the chunks: in the first chunk with room, so that a chunk's end that a large copy did not fit
        takes later small ones (SmolLM2, fp32, 4 packed 512-token rows: 1,302 MB of copies in 21 chunks instead of 23);
        a chunk is added when none has room."""
        i = next((i for i, c in enumerate(self.chunks) if self._used[i] + nbytes <= c.numel()), len(self.chunks))
        if i == len(self.chunks):
            self.chunks.append(torch.empty(max(self.chunk, nbytes), dtype=torch.uint8))
            self._used.append(0)
        offset = self._used[i]
        self._used[i] = offset + -(-nbytes // ALIGN) * ALIGN
        return self.chunks[i][offset:offset + nbytes]

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if (type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout != torch.strided or nbytes < SMALLEST
                or t.numel() == 0 or t.untyped_storage().data_ptr() in self._kept):
            return t
        storage = t.untyped_storage()
        first, last = _span(t)
        spans = self._spans.get((storage.data_ptr(), t.dtype))  # a dense tensor copied before, its layout kept
        if spans is not None and spans[0]() is storage and spans[1] == t._version and \
                spans[2] <= first and last <= spans[2] + spans[3].numel():
            # another view of those values (a norm's output (B, T, H) and the next linear's input (B·T, H), or the
            # same tensor saved by q, k and v): a view of the same copy, not a second one
            flat = spans[3]
            return flat.as_strided(t.shape, t.stride(), flat.storage_offset() + first - spans[2])
        key = (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        seen = self._copies.get(key)  # a tensor with gaps saved twice: one copy
        if seen is not None and seen[0]() is storage and seen[1] == t._version:
            return seen[2]
        flat = self._place(nbytes).view(t.dtype)
        if _dense(t):  # contiguous or a permutation of it: the copy keeps its strides, so
            # the backward's kernels see the layout they would have seen (a transposed operand given contiguous
            # takes another product path: other roundings), and its views can share the copy
            copy = flat.as_strided(t.shape, t.stride(), flat.storage_offset()).copy_(t)
            self._spans[(storage.data_ptr(), t.dtype)] = (weakref.ref(storage), t._version, first, flat)
        else:  # gaps between its elements (a slice): copied compactly
            copy = flat.view(t.shape).copy_(t)
            self._copies[key] = (weakref.ref(storage), t._version, copy)
        self._trim_now_and_then(nbytes)
        return copy

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        self._trim_now_and_then(packed.numel() * packed.element_size())  # the backward's temporaries: the same
        return packed

    def _trim_now_and_then(self, nbytes: int) -> None:
        """Every TRIM_EVERY bytes the layers keep (forward) or read back (backward): the heap's free holes go back
        to the system, so the temporaries of the layers since then are all the heap keeps resident."""
        self._moved += nbytes
        if self.trim and self._moved >= TRIM_EVERY:
            self._moved = 0
            allocator.trim_heap()
