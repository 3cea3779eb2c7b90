"""The running batch: its rows, one left-padded KV cache, prefill of new prompts and one decode step for all.

The batch's KV cache is one transformers DynamicCache, left-padded: row i's real tokens sit at the right end of
its row, `attention_mask` zeroes the padding, `position_ids` carry each row's real position. Padded key/values
are zeros (never NaN), and decode queries are always real tokens, so no attention row is fully masked.
Which adapter each row uses is set on the residency's RowSlots before every forward.
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.decoding import left_pad, select_rows
from loraforge.utils.hf import cache_argument
from loraforge.serve.request import Request
from loraforge.serve.residency import RowSlots


class Batch:
    """Rows decoding together (engine thread only)."""

    def __init__(self, model: nn.Module, rows_slots: RowSlots):
        self.model = model
        self.slots = rows_slots
        self.device = next(model.parameters()).device
        self.kv = cache_argument(type(model)) or "past_key_values"  # "cache" on transformers 5
        self.rows: list[Request] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def prefill(self, reqs: list[Request]):
        """New prompts in one forward, left-padded: (last-position logits (n, V), their cache, their mask)."""
        from transformers import DynamicCache

        n, T = len(reqs), max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.long)
        for i, req in enumerate(reqs):
            ids[i, T - len(req.prompt_ids):] = torch.tensor(req.prompt_ids)
            mask[i, T - len(req.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        self.slots.set([r.slot for r in reqs])
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask if padded else None, use_cache=True, logits_to_keep=1,
                         position_ids=(mask.cumsum(1) - 1).clamp(min=0), **{self.kv: cache})
        if padded:  # the padding's key/values are never attended; make them zeros, never NaN
            pad = (mask == 0)[:, None, :, None]
            for layer in cache.layers:
                layer.keys.masked_fill_(pad, 0)
                layer.values.masked_fill_(pad, 0)
        for req in reqs:
            req.length = len(req.prompt_ids)
        return out.logits[:, -1, :], cache, mask

    def join(self, reqs: list[Request], cache, mask: torch.Tensor) -> None:
        """Append prefilled rows (only the rows `reqs` of cache and mask) to the batch, left-padding the shorter."""
        for layer in cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise NotImplementedError(f"the server batches full-attention caches only, not {type(layer).__name__}")
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
