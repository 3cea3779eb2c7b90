"""Ctrl-C held back for the few statements that must happen together.

In a notebook the stop button sends SIGINT, and Python raises KeyboardInterrupt between any two bytecodes of the main
thread. Where two changes must both happen or neither (a layer's base weight written and its `merged_adapters`
updated), an interrupt between them left the model half changed for good (soak: a merge() stopped while it copied a
merged weight kept the weight and not the name, so unmerge() left ΔW in the base; the next merge() added it twice).
Inside `held_interrupts()` a SIGINT is kept and raised as the block ends, for the handler that was in place.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """SIGINT arriving inside the block is delivered when it ends (its handler then raises KeyboardInterrupt, or
    stops a training run as it would have). The block should be short: a few assignments after the work is done.
    Outside the main thread, or where SIGINT's handler was not installed from Python, the block runs as is."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:  # another thread (signals go to the main one), or a handler set outside Python
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # to the handler in place again: raised at the next bytecode
