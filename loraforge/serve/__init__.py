"""Serving: a batching engine that mixes LoRA adapters in one batch, and an OpenAI-compatible HTTP API over it."""

from loraforge.serve.engine import Engine
from loraforge.serve.errors import PromptTooLong, QueueFull, ServeError, UnknownAdapter
from loraforge.serve.request import Completion, Event
from loraforge.serve.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Event", "PromptTooLong", "QueueFull", "SamplingParams", "ServeError",
           "UnknownAdapter"]
