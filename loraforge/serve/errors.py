"""What the engine refuses, each with the HTTP status the API answers with, and how a refusal shows a bad value."""

import re

from loraforge.config import clipped
from loraforge.lora.adapters import AdapterError

SHOWN_CHARS = 200  # an echoed value is cut here: a 900 KB stop list must not come back as a 900 KB error
SURROGATE = re.compile("[\ud800-\udfff]")  # a lone one (JSON's "\\ud800"; a valid pair decodes to one character)


class ServeError(Exception):
    """A request or command the engine refuses; `status` is the HTTP status the API answers with."""

    status = 400


class UnknownAdapter(ServeError):
    status = 404


class QueueFull(ServeError):
    status = 429


class PromptTooLong(ServeError):
    status = 400


class ShuttingDown(ServeError):
    """The engine has stopped taking work (the server is stopping): a 503, which clients retry."""

    status = 503


class EngineStopped(ServeError):
    """The engine's thread ended on an error of its own (not stop()): every request then pending failed with this,
    and every later one is refused with it, until the server is restarted (it is not restarted silently)."""

    status = 503


class BrokenAdapter(ServeError, AdapterError):
    """An adapter whose files cannot be served (bad config, missing or unreadable weights, another base's shapes,
    a file outside the adapters directory); the message names the adapter, never a server path."""

    status = 400


class NameTaken(ServeError):
    """A name already in use (an adapter loaded under it): HTTP's conflict, not a bad request."""

    status = 409


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """`value` for an error message the API answers with: config.clipped's JSON form, cut at SHOWN_CHARS."""
    return clipped(value, limit, as_json=True)
