"""One result per live object, kept only while the object lives.

`functools.cache` on a function of a tokenizer keeps every tokenizer it was ever given, and all it holds, for the
life of the process: a notebook that loaded the tokenizer again before each `generate` grew by 8.5 MB a call (soak:
100 calls, 1.2 GB), and each `train` kept its tokenizer (8 of them, 130 MB, behind `data._longest_token`'s
`lru_cache(maxsize=8)`). `per_object` keys its results by weak reference: an object's result goes with it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any


def per_object(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`fn(obj)` computed once per live `obj` (by identity: the objects it serves compare by identity); an object
    that takes no weak reference, or no hash, is computed at each call. `.cache_clear()` forgets every result."""
    results: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @functools.wraps(fn)
    def cached(obj):
        try:
            return results[obj]
        except KeyError:
            pass
        except TypeError:  # no weak reference (or no hash) to it: nothing to key by
            return fn(obj)
        results[obj] = value = fn(obj)
        return value

    cached.cache_clear = results.clear
    return cached
