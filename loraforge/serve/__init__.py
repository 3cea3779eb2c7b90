"""Serving: a batching engine that mixes LoRA adapters in one batch, and an OpenAI-compatible HTTP API over it."""

from loraforge.serve.engine import Completion, Engine, Event, PromptTooLong, QueueFull, SamplingParams, ServeError, UnknownAdapter

__all__ = ["Completion", "Engine", "Event", "PromptTooLong", "QueueFull", "SamplingParams", "ServeError",
           "UnknownAdapter"]
