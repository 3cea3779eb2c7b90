"""Serving: a batching engine that mixes LoRA adapters in one batch, and an OpenAI-compatible HTTP API over it."""

from .engine import Engine
from .errors import PromptTooLong, QueueFull, ServeError, UnknownAdapter
from .request import Completion, Event
from .sampling import SamplingParams

__all__ = ["Completion", "Engine", "Event", "PromptTooLong", "QueueFull", "SamplingParams", "ServeError",
           "UnknownAdapter"]
