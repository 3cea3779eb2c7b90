"""The running batch: its rows, one left-padded KV cache, prefill of new prompts and one decode step for all.

The batch's KV cache is one transformers DynamicCache, left-padded: row i's real tokens sit at the right end of
its row, contiguous, `attention_mask` zeroes the padding, `position_ids` carry each row's real position. Padded
key/values are zeros (never NaN), and decode queries are always real tokens, so no attention row is fully masked.
Which adapter each row uses is set on the residency's RowSlots before every forward.

Sliding-window layers (Gemma 2 and 3, Mistral, Qwen 2/3 with use_sliding_window) keep every key/value here, as full
ones do: transformers' sliding mask then drops those a window back. It measures that window in cache columns, so
the columns of a row's real tokens must be contiguous (one column a position, no padding between them): a prompt
runs its last T tokens (T: the longest uncached rest of the batch), recomputing the end of its cached prefix where
its own rest is shorter, in place of the padding that would otherwise sit between them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from loraforge.decoding import left_pad, select_rows
from loraforge.serve.errors import ServeError
from loraforge.serve.request import Request
from loraforge.serve.residency import RowSlots
from loraforge.utils.hf import cache_argument

BATCHED_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")
"""The transformers cache layers whose keys/values this batch can hold (as full layers: module docstring)."""


class Batch:
    """Rows decoding together (engine thread only)."""

    def __init__(self, model: nn.Module, rows_slots: RowSlots):
        self.model = model
        self.slots = rows_slots
        self.device = next(model.parameters()).device
        self.kv = cache_argument(type(model)) or "past_key_values"  # "cache" on transformers 5
        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers} - set(BATCHED_LAYERS)
        if kinds:  # at start: found at a request's join, it was lost there and its client waited for ever
            raise ServeError(f"the server cannot batch {model.config.model_type}: its {', '.join(sorted(kinds))} "
                             f"cache layers hold no keys/values per token; `loraforge generate` runs it, one prompt "
                             f"at a time")
        self.rows: list[Request] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def prefill(self, reqs: list[Request]):
        """New prompts in one forward: (last-position logits (n, V), their cache, their mask).

        A request's cached prefix (`req.cached`, prefix.Block s) is not recomputed where the batch's width allows:
        row i runs the last T of its tokens (T: the longest uncached rest), left-padded, and reads the keys/values
        of the prompt before them from its cached blocks, left-padded to the longest such part (P): row i's columns
        are [pad][its cached part][its last T tokens], no padding between its tokens (module docstring).
        """
        lengths = [len(r.prompt_ids) for r in reqs]
        T = max(length - sum(b.kv.shape[2] for b in r.cached) for r, length in zip(reqs, lengths))
        cached = [max(0, length - T) for length in lengths]  # (at most what each row has cached) read from its blocks
        n, P = len(reqs), max(cached)
        ids = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, P + T, dtype=torch.long)
        for i, (req, length) in enumerate(zip(reqs, lengths)):
            run = req.prompt_ids[cached[i]:]
            ids[i, T - len(run):] = torch.tensor(run)
            mask[i, P + T - length:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        self.slots.set([r.slot for r in reqs])
        cache = DynamicCache()  # full layers, sliding ones too: the mask drops what lies outside a window
        if P:  # each distinct (blocks, part read) once, left-padded with zeros: (parts, 2 · layers, heads, P, dim)
            parts = {(tuple(b.id for b in r.cached), m): (r.cached, m) for r, m in zip(reqs, cached)}
            first = next(c for c, m in parts.values() if m)[0].kv
            kv = torch.stack([left_pad(torch.cat([b.kv for b in c], 2)[:, :, :m], P) if m else
                              first.new_zeros(first.shape[0], first.shape[1], P, first.shape[3])
                              for c, m in parts.values()])
            row = torch.tensor([list(parts).index((tuple(b.id for b in r.cached), m)) for r, m in zip(reqs, cached)],
                               device=self.device)
            for layer in range(kv.shape[1] // 2):  # rows sharing a system prompt share one copy until here
                k, v = kv[:, 2 * layer], kv[:, 2 * layer + 1]
                k, v = (k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) if len(parts) == 1 else (k[row], v[row])
                cache.update(k, v, layer)
        # the last position by an index tensor, not logits_to_keep=1: that slice (n, 1, hidden) is not contiguous, so
        # the lm_head's matmul goes to bmm over the weight expanded per row (in bf16 a copy of it per row)
        last = torch.tensor([T - 1], device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask if padded else None, use_cache=True, logits_to_keep=last,
                         position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, P:], **{self.kv: cache})
        if padded:  # the padding's key/values are never attended; make them zeros, never NaN (the prefix's are)
            pad = (mask[:, P:] == 0)[:, None, :, None]
            for layer in cache.layers:
                layer.keys[:, :, P:].masked_fill_(pad, 0)
                layer.values[:, :, P:].masked_fill_(pad, 0)
        for req in reqs:
            req.length = len(req.prompt_ids)
        return out.logits[:, -1, :], cache, mask

    @staticmethod
    def row_kv(cache, row: int, start: int, n: int) -> torch.Tensor:
        """Columns start .. start + n of row `row` of a cache, every layer stacked: (2 · layers, heads, n, dim),
        keys at even rows, values at odd ones (prefix.Block's layout). `start` may count from the end (< 0)."""
        stop = start + n if start + n != 0 else None
        return torch.stack([t[row, :, start:stop] for layer in cache.layers for t in (layer.keys, layer.values)])

    def join(self, reqs: list[Request], keep: list[int], cache, mask: torch.Tensor) -> None:
        """Append rows `keep` of the prefilled `reqs` (their cache and mask) to the batch, left-padding the shorter."""
        if len(keep) < len(reqs):
            mask = select_rows(cache, mask, torch.tensor(keep, dtype=torch.long, device=self.device))
        reqs = [reqs[i] for i in keep]
        if not self.rows:
            self.rows, self.cache, self.mask = list(reqs), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width), left_pad(new.keys, width)], 0)
            mine.values = torch.cat([left_pad(mine.values, width), left_pad(new.values, width)], 0)
        self.mask = torch.cat([left_pad(self.mask, width, dim=1), left_pad(mask, width, dim=1)], 0)
        self.rows = self.rows + list(reqs)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One decode step for every row (each feeds its last token): the logits (B, V)."""
        rows = self.rows
        self.slots.set([r.slot for r in rows])
        ids = torch.tensor([[r.out_ids[-1]] for r in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], 1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                         **{self.kv: self.cache})
        for r in rows:
            r.length += 1
        return out.logits[:, -1, :]

    def keep(self, keep: list[int]) -> None:
        """Keep rows `keep` (indices into rows), dropping the others and the columns only they used."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        self.rows = [self.rows[i] for i in keep]
        self.mask = select_rows(self.cache, self.mask, torch.tensor(keep, dtype=torch.long, device=self.device))

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None
