"""A generation request as the engine tracks it, the events its consumer receives, and a finished completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from loraforge.serve.detokenize import TextStream
from loraforge.serve.sampling import SamplingParams

if TYPE_CHECKING:  # for annotations only: residency imports this module
    from loraforge.serve.residency import Adapter


@dataclass
class Event:
    """What a request's consumer receives, in order: an empty event once it is admitted (its adapter in place,
    before its prompt's prefill), text deltas, then one event with finish_reason set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500  # the HTTP status of an error: 4xx when the request (its adapter) is at fault
    code: str | None = None  # a refusal's code (BrokenAdapter, UnknownAdapter), as when submit itself refuses


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: Adapter | None
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
    text: TextStream | None = None  # the generated tokens' text, decoded as they come
    sent: int = 0  # characters of text already sent
    length: int = 0  # tokens of this row in the KV cache (its next position id)
    generator: torch.Generator | None = None
    cached: list = field(default_factory=list)  # the prefix.Block s of its prompt's longest cached prefix
    chunked_to: int = 0  # prompt tokens its passes have prefilled into the prefix cache (-1: no more passes)

    @property
    def owner(self) -> int | None:
        """Whose cached prefixes its prompt may use: 0 the base model, else its adapter's current load id (None
        while the adapter is off the model)."""
        if self.adapter is None:
            return 0
        return self.adapter.load_id or None

    @property
    def slot(self) -> int:
        """The row's slot in the stacked adapter weights: 0 is the base model."""
        return self.adapter.slot if self.adapter is not None else 0


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
