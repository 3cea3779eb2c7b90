"""Prefix caching: the keys/values of prompt prefixes many requests share (a system prompt, the chat template's
header), computed once and reused by later requests, bounded by a byte budget, least recently used evicted.

A prompt is cut into blocks of `block` tokens. A block is keyed by (owner, its parent block, its tokens), so a key
names the whole prefix up to the block's end (a chain, like vLLM's block hashes, without hash collisions).
`owner` is what the keys/values depend on besides the tokens: 0 for the base model, else the adapter's load id,
unique per load (a LoRA on any layer changes the keys/values of the layers above it, so prefixes are cached per
adapter; an adapter unloaded, reloaded or re-uploaded under the same name gets a new load id and its old blocks
are dropped). A block holds its tokens' keys and values of every layer stacked: (2 · layers, kv heads, block, head
dim), keys at even rows, values at odd ones.

LRU keeps a parent more recently used than its children (a chain is touched leaf first), so eviction always takes
a leaf and a cached chain never has a hole.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class Block:
    id: int
    key: tuple  # (owner, parent block id, tokens)
    kv: torch.Tensor  # (2 · layers, kv heads, block, head dim)


class PrefixCache:
    """Longest cached prefix of a prompt, per owner (engine thread only). `budget` bytes; 0 turns it off."""

    def __init__(self, budget: int, block: int = 16):
        if budget < 0 or block < 1:
            raise ValueError(f"prefix cache budget ({budget} bytes) must be >= 0 and block ({block}) >= 1")
        self.budget, self.block = budget, block
        self.blocks: collections.OrderedDict[tuple, Block] = collections.OrderedDict()  # LRU first
        self.bytes = 0
        self.off_reason: str | None = None
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self.blocks)

    def match(self, owner: int, ids: list[int]) -> list[Block]:
        """The cached blocks of the longest cached prefix of `ids`, leaving at least one token to prefill."""
        if not self.budget:
            return []
        chain, parent, n = [], 0, self.block
        for start in range(0, len(ids) - n, n):  # the last token is always computed: its logits are needed
            block = self.blocks.get((owner, parent, tuple(ids[start:start + n])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        self._touch(chain)
        return chain

    def store(self, owner: int, ids: list[int], chain: list[Block], kv: torch.Tensor) -> None:
        """Cache the full blocks of `ids` after the matched `chain`; kv (2 · layers, heads, ≥ new tokens, dim) holds
        the keys/values of ids[len(chain) · block:] in order."""
        n, first = self.block, len(chain)
        if not self.budget or any(self.blocks.get(b.key) is not b for b in chain):
            return  # off, or the matched chain was evicted meanwhile (by another row's blocks): cache nothing
        chain = list(chain)
        parent = chain[-1].id if chain else 0
        for b in range(first, len(ids) // n):
            key = (owner, parent, tuple(ids[b * n:(b + 1) * n]))
            block = self.blocks.get(key)
            if block is None:
                data = kv[:, :, (b - first) * n:(b - first + 1) * n].clone()
                size = data.numel() * data.element_size()
                if size > self.budget:
                    break
                self._evict(self.budget - size, keep=chain)
                if self.bytes + size > self.budget:
                    break  # the rest of the budget is this chain itself
                block = Block(next(self._ids), key, data)
                self.blocks[key] = block
                self.bytes += size
            chain.append(block)
            parent = block.id
        self._touch(chain)

    def forget(self, owner: int) -> None:
        """Drop every block of `owner` (its adapter left the model)."""
        for key in [k for k in self.blocks if k[0] == owner]:
            self._drop(key)

    def turn_off(self, reason: str) -> None:
        """Stop caching (a model whose keys/values do not fit the block layout), keeping why."""
        self.blocks.clear()
        self.bytes, self.budget, self.off_reason = 0, 0, reason

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # leaf first: a parent stays more recent than its children
            self.blocks.move_to_end(block.key)

    def _evict(self, limit: int, keep: list[Block]) -> None:
        """Drop least recently used blocks until at most `limit` bytes are held, never one of `keep`."""
        keep_keys = {b.key for b in keep}
        for key in list(self.blocks):
            if self.bytes <= limit:
                return
            if key not in keep_keys:
                self._drop(key)

    def _drop(self, key: tuple) -> None:
        block = self.blocks.pop(key)
        self.bytes -= block.kv.numel() * block.kv.element_size()
