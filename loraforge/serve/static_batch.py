"""The running batch on the static decoder (`loraforge.inference.llama.Decoder`): the decode path `generate`,
`eval` and the demo take, for Llama-family bases.

The decoder's KV cache holds rows × slots per layer, each doubled when the batch needs more (up to the engine's
max_batch and the model's context length) and given back when the batch empties: memory follows the high-water mark
of one burst, not max_batch × context. Row i of the batch is cache row i, its tokens at slots 0.. (no left padding,
no masks of padding, no concatenation per step). New requests are prefilled into the rows behind the running ones (a
cached prompt prefix copied into their first slots, only the rest computed); a finished row's place is taken by the
last running row (one row copied, not the batch). Each row's adapter comes through the layers' `row_forward` hooks:
the residency's stacks, as in `Batch`. Same interface as `serve.batch.Batch` (the engine takes either).
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.inference.llama import Decoder
from loraforge.serve.request import Request
from loraforge.serve.residency import Residency

FIRST_LEN = 256
"""Cache slots per row at start (doubled as rows grow, up to the model's context length)."""
FIRST_ROWS = 4
"""Cache rows at start (doubled as the batch grows, up to max_batch)."""


class Prefilled:
    """What `StaticBatch.prefill` hands back: its rows start at cache row `row0`; each row's prompt length."""

    def __init__(self, row0: int, lengths: list[int]):
        self.row0, self.lengths = row0, lengths


class StaticBatch:
    """Rows decoding together on the static decoder (engine thread only)."""

    def __init__(self, model: nn.Module, residency: Residency, max_batch: int, context_length: int):
        self.context_length, self.max_batch = context_length, max_batch
        self.decoder = Decoder(model, min(FIRST_ROWS, max_batch), min(FIRST_LEN, context_length), hooks=True)
        self.residency, self.slots = residency, residency.rows
        self._layout = residency.layout  # the adapter layers the decoder's hooks were read from
        self.device = self.decoder.device
        self.rows: list[Request] = []
        self._written: dict[int, int] = {}  # cache row -> slots written there since it was last found finite

    def __len__(self) -> int:
        return len(self.rows)

    def _room(self, rows: int, positions: int) -> None:
        """Cache room for `rows` rows of `positions` slots: each doubled until it fits (never past max_batch rows
        or the context length)."""
        dec = self.decoder
        n, size = dec.max_batch, dec.max_len
        while n < rows:
            n *= 2
        while size < positions:
            size *= 2
        old = dec.keys
        dec.resize(min(n, max(self.max_batch, rows)), min(size, max(self.context_length, positions)),
                   rows=len(self.rows), used=max((r.length for r in self.rows), default=0))
        self._reallocated(old, len(self.rows))

    def _hooks(self) -> None:
        """The decoder's hooks re-read only when adapters went on or off the model (reading them costs ~1.4 ms
        for SmolLM2's 210 projections: too much for every step)."""
        if self._layout != self.residency.layout:
            self.decoder.attach_hooks()
            self._layout = self.residency.layout

    def _release(self) -> None:
        """The batch is empty: the cache back to its first size."""
        old = self.decoder.keys
        self.decoder.resize(min(FIRST_ROWS, self.max_batch), min(FIRST_LEN, self.context_length), rows=0)
        self._reallocated(old, 0)

    def _reallocated(self, old: torch.Tensor, rows: int) -> None:
        """After a resize: if the cache is new, rows past the first `rows` are zeros (nothing written there)."""
        if self.decoder.keys is not old:
            self._written = {row: n for row, n in self._written.items() if row < rows}

    def _wrote(self, row: int, upto: int) -> None:
        self._written[row] = max(self._written.get(row, 0), upto)

    def _take(self, row: int) -> None:
        """Cache row `row` takes a new request: the slots earlier requests wrote there zeroed if any of them is not
        finite. Slots past a row's length are masked, not skipped: attention still multiplies them (by a
        probability of 0, or a score plus -inf), and 0 · NaN is NaN, so a request whose adapter overflowed would
        hand NaN to the next request in its row (found by a soak: a base-model request answered '' after one).
        The check is one sum per cache (a NaN or infinity anywhere makes it non-finite; a finite sum that
        overflows only zeroes a row that needed none)."""
        n = self._written.pop(row, 0)
        dec = self.decoder
        if n and not all(bool(torch.isfinite(c[:, row, :, :n].sum())) for c in (dec.keys, dec.values)):
            dec.keys[:, row, :, :n] = 0
            dec.values[:, row, :, :n] = 0

    def _move(self, src: int, dst: int, length: int) -> None:
        """A running request's first `length` slots from cache row `src` into row `dst` (whose request ended)."""
        self._take(dst)
        self.decoder.copy_row(src, dst, length)
        self._wrote(dst, length)

    @torch.inference_mode()
    def prefill(self, reqs: list[Request]):
        """New prompts into the cache rows behind the running ones, in one forward: (last-position logits (n, V),
        a `Prefilled`, None). A request's cached prefix (`req.cached`, prefix.Block s) is copied into its first
        slots and only the rest of its prompt runs: its products on its real tokens (packed), its attention
        right-padded to the longest rest."""
        dec, row0 = self.decoder, len(self.rows)
        starts = [sum(b.kv.shape[2] for b in r.cached) for r in reqs]
        own = [r.prompt_ids[s:] for r, s in zip(reqs, starts)]
        self._room(row0 + len(reqs), max(len(r.prompt_ids) for r in reqs) + 1)
        T = max(len(o) for o in own)
        for i, req in enumerate(reqs):
            self._take(row0 + i)
            self._wrote(row0 + i, starts[i] + T)  # right padding included (and noted before a forward that may fail)
            if req.cached:  # (2 · layers, heads, P, dim): keys at even rows, values at odd ones
                kv = torch.cat([b.kv for b in req.cached], 2).to(dec.keys.dtype)
                dec.keys[:, row0 + i, :, :starts[i]] = kv[0::2]
                dec.values[:, row0 + i, :, :starts[i]] = kv[1::2]
        ids = torch.zeros(len(reqs), T, dtype=torch.long)
        for i, o in enumerate(own):
            ids[i, :len(o)] = torch.tensor(o)
        self._hooks()
        # the products run on the real tokens only (the decoder packs them; its hooks see tokens as rows)
        packed = dec.packs(T)
        self.slots.set([r.slot for r, o in zip(reqs, own) for _ in o] if packed else [r.slot for r in reqs])
        lengths = torch.tensor([len(o) for o in own], device=self.device)
        logits = dec.forward(ids.to(self.device), torch.tensor(starts, device=self.device), keep=lengths - 1,
                             row0=row0, lengths=lengths if packed else None)
        for req in reqs:
            req.length = len(req.prompt_ids)
        return logits, Prefilled(row0, [len(r.prompt_ids) for r in reqs]), None

    def row_kv(self, prefilled: Prefilled, row: int, start: int, n: int) -> torch.Tensor:
        """Slots start .. start + n of prefilled row `row`, every layer stacked: (2 · layers, heads, n, dim), keys
        at even rows, values at odd ones (prefix.Block's layout). `start` may count from the prompt's end (< 0)."""
        dec = self.decoder
        at = prefilled.row0 + row
        start = start + prefilled.lengths[row] if start < 0 else start
        keys, values = dec.keys[:, at, :, start:start + n], dec.values[:, at, :, start:start + n]
        return torch.stack([keys, values], 1).flatten(0, 1).clone()

    @torch.inference_mode()  # the cache is an inference tensor once grown or written
    def join(self, reqs: list[Request], keep: list[int], prefilled: Prefilled, mask=None) -> None:
        """Rows `keep` of the prefilled `reqs` join the batch (moved up to close the gaps of those that ended)."""
        for j, i in enumerate(keep):
            at = len(self.rows) + j
            if prefilled.row0 + i != at:
                self._move(prefilled.row0 + i, at, reqs[i].length)
        self.rows = self.rows + [reqs[i] for i in keep]

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One decode step for every row (each feeds its last token): the logits (B, V)."""
        rows = self.rows
        self._room(len(rows), max(r.length for r in rows) + 1)
        self.slots.set([r.slot for r in rows])
        self._hooks()
        ids = torch.tensor([[r.out_ids[-1]] for r in rows], dtype=torch.long, device=self.device)
        start = torch.tensor([r.length for r in rows], dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            self._wrote(i, r.length + 1)
        logits = self.decoder.forward(ids, start)
        for r in rows:
            r.length += 1
        return logits

    @torch.inference_mode()
    def keep(self, keep: list[int]) -> None:
        """Keep rows `keep` (indices into rows): each gap below the kept count takes a kept row from above it
        (one cache row copied per gap; the batch's order changes, which nothing relies on)."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        k, kept = len(keep), set(keep)
        gaps = [i for i in range(k) if i not in kept]
        movers = [i for i in keep if i >= k]
        rows = list(self.rows)
        for gap, mover in zip(gaps, movers):
            self._move(mover, gap, rows[mover].length)
            rows[gap] = rows[mover]
        self.rows = rows[:k]

    @torch.inference_mode()
    def clear(self) -> None:
        self.rows = []
        self._release()
