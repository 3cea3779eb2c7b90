"""The command line's first seconds: a signal that comes while it is still importing ends it at once.

`python -m loraforge` and the `loraforge` script spend their first seconds importing (torch, transformers: 2-5 s on
2 busy cores). A signal there was not the CLI's to handle: before the CLI's handlers were installed, Ctrl-C ended the
process with a KeyboardInterrupt traceback (exit -2 to the caller) and SIGTERM killed it (-15); after, their
exceptions were raised inside whatever import ran, where libraries catch them round their optional imports (soak: a
SIGTERM inside numpy's import under torch's was taken for a missing package, and the merge ran on for 5 s to exit 2
with its own error; another left numpy half made, and its next use failed with a 49-line RecursionError, exit 1).
Nothing has been written yet, so nothing needs cleaning: the process exits at once with the line and the exit code
(128 + the signal's number) the rest of the CLI gives. The CLI gives the signals to its own handlers once the
command's imports are done (cli._terminated_cleanly).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stopped_line(signum: int) -> str:
    """The line the CLI ends with when `signum` stopped a command (ui.runs reads it back)."""
    if signum == signal.SIGINT:
        return "interrupted"
    return f"stopped by {signal.Signals(signum).name} before the command finished"


def exit_now(signum, frame) -> None:
    """The startup's handler: what was printed is flushed, then its line, then exit 128 + the signal's number."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a write the signal interrupted: "reentrant call"; a stream gone
            stream.flush()
    with contextlib.suppress(Exception):
        os.write(2, (stopped_line(signum) + "\n").encode())  # not through sys.stderr, which may be mid-write
    os._exit(128 + signum)


def untouched(signum: int) -> bool:
    """Whether `signum` is at Python's default (Ctrl-C's KeyboardInterrupt, the others' SIG_DFL) or at exit_now:
    neither the user (nohup's ignored SIGHUP) nor a caller of cli.main installed a handler of their own."""
    default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    return signal.getsignal(signum) in (default, exit_now)


def exit_on_signals() -> None:
    """Until the command's imports are done, SIGINT, SIGTERM and SIGHUP end the process at once (exit_now): in the
    main thread, for a signal left untouched (nohup's ignored SIGHUP stays ignored), and SIGTERM and SIGHUP not
    under torchrun, whose agent stops its processes itself. Call it first thing, before the CLI's imports.
    Idempotent."""
    if threading.current_thread() is not threading.main_thread():
        return
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    for s in SIGNALS:
        if untouched(s) and not (torchrun and s != signal.SIGINT):
            signal.signal(s, exit_now)
