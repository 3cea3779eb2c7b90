"""Reading the Hugging Face Hub without a network: whether its host resolves, and its offline mode for one load.

Without a network, huggingface_hub and datasets retry each request for about half a minute to a minute and a half
(soak: five "Name or service not known ... Retrying in 8s" blocks before the one-line error). Where the Hub's host
name does not resolve, a load is run as under HF_HUB_OFFLINE: a cached copy loads, a missing one fails at once.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import urllib.parse


def hub_unreachable(*configs) -> bool:
    """Whether a hub load must read the Hub as offline, the one place that decides it: HF_HUB_OFFLINE is not set
    (huggingface_hub's flag, nor the copy of it another library took at its import: `configs`, e.g. datasets.config)
    and the Hub's host name does not resolve. Where the flag is set, the libraries are offline already."""
    from huggingface_hub import constants

    if any(getattr(obj, "HF_HUB_OFFLINE", False) for obj in (constants, *configs)):
        return False
    return not hub_resolves()


@functools.cache
def hub_resolves() -> bool:
    """Whether the Hugging Face Hub's host name resolves, looked up once a process: a load reads a config, weights
    and a tokenizer, and without a network each lookup may wait the resolver's timeout."""
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443)
    except (OSError, UnicodeError):
        return False
    return True


@contextlib.contextmanager
def offline_hub(on: bool, *configs):
    """Inside, with `on`, huggingface_hub reads the Hub as under HF_HUB_OFFLINE (its flag is read at each request),
    and so does each of `configs`: another library's copy of the flag, taken when it was imported (datasets.config
    holds HF_HUB_OFFLINE and the older HF_DATASETS_OFFLINE). Everything is set back on the way out."""
    from huggingface_hub import constants

    if not on:
        yield
        return
    saved = [(obj, name, getattr(obj, name)) for obj in (constants, *configs)
             for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(obj, name)]
    try:
        for obj, name, _ in saved:
            setattr(obj, name, True)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
