"""The command line's standard output and error, made so that what becomes of them cannot end a command.

A reader that goes away (`loraforge train ... | head -3`, a `less` quit early, a closed ssh session) or a log file's
disk that fills (`> train.log` on a full disk) makes a write raise BrokenPipeError or OSError: the first print of a
training run ended it with a traceback before it trained or saved anything. A guarded stream that a write fails on
is pointed at /dev/null (its descriptor too, so what C code and the interpreter's last flush write goes there): the
command goes on and ends as it would have (a training run saves its adapter), and says once on the other stream
why its output stopped (not for a closed pipe: its reader left on purpose); a command whose stdout was lost so
exits 1 (output_failed), as coreutils' programs do.

A character the stream's encoding cannot write (PYTHONIOENCODING=ascii, a C locale without Python's UTF-8 mode, a
Latin-1 terminal) was a UnicodeEncodeError: the '×' of train's data line, a Japanese answer of `generate`. It is
written as a backslash escape (`\\xd7`), as Python's own stderr does; a file name's byte that is not UTF-8 (read by
Python as a lone surrogate) as the byte itself, as `ls` would show it.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import sys

from loraforge.utils.files import REASONS

ESCAPE = "loraforge-escape"
"""The error handler guarded streams encode with: a file name's undecodable byte as itself, anything else the
encoding lacks as a backslash escape."""


def _escape(error: UnicodeError) -> tuple[str | bytes, int]:
    try:
        return codecs.lookup_error("surrogateescape")(error)
    except UnicodeError:  # not (only) bytes a file name carried: text the encoding has no character for
        return codecs.backslashreplace_errors(error)


codecs.register_error(ESCAPE, _escape)


class GuardedStream:
    """`stream` (a text stream of the process: stdout or stderr) whose writes and flushes never raise OSError; the
    first that fails points its descriptor at /dev/null and, unless the reader closed a pipe, says so on `other`.
    Everything else (fileno, isatty, encoding, buffer) is the stream's own."""

    def __init__(self, stream, name: str):
        self._stream, self._name, self._lost = stream, name, False
        self.other: GuardedStream | None = None  # where the note goes when this stream is lost
        self.failed = False  # lost to anything but a closed pipe: a full disk, an I/O error

    def write(self, text: str) -> int:
        if not self._lost:
            try:
                return self._stream.write(text)
            except OSError as e:
                self._lose(e)
        return len(text)

    @property
    def lost(self) -> bool:
        """Whether a write or flush failed (a reader that left, a full disk): what comes now goes to /dev/null."""
        return self._lost

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._lost:
            try:
                self._stream.flush()
            except OSError as e:
                self._lose(e)

    def _lose(self, error: OSError) -> None:
        self._lost = True
        with contextlib.suppress(OSError, ValueError):  # a stream without a descriptor: its writes just stop
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
            self._stream.flush()  # what the failed write left buffered goes to /dev/null: no error at exit
        self.failed = error.errno != errno.EPIPE
        if self.failed and self.other is not None:
            reason = REASONS.get(error.errno) or error.strerror or str(error)
            code = ", and it ends with exit code 1" if self._name == "stdout" else ""
            print(f"warning: cannot write to {self._name} ({reason}); the command goes on without its output there"
                  f"{code}", file=self.other, flush=True)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def output_failed() -> bool:
    """Whether the guarded stdout, flushed now, was lost to anything but a closed pipe: the command's output (an
    eval's scores, `> results.txt` on a full disk) did not all arrive, which its exit code must say (1, as a
    coreutils program's), though the command went on. A reader that left (`| head`) is no failure."""
    if not isinstance(sys.stdout, GuardedStream):
        return False
    sys.stdout.flush()
    return sys.stdout.failed


def stdout_lost() -> bool:
    """Whether the guarded stdout has lost its output (`generate ... | head -c 10` once head has left): a command
    producing only that output (generate's tokens) may stop there; one with other work (train) goes on."""
    return isinstance(sys.stdout, GuardedStream) and sys.stdout.lost


LOG_INTERVAL_S = 30.0
"""Seconds between two redraws of a progress bar whose stderr is no terminal (a log file, a pipe): every redraw
is kept there, where a terminal overwrites it."""


def _throttle_progress_bars() -> None:
    """Where stderr is no terminal, every tqdm bar of the process (transformers' "Loading weights" and "Writing model
    shards", a download's) is redrawn at most every LOG_INTERVAL_S, as training.report's own bars are: soak, `merge
    ... 2> merge.log` kept a `\r` redraw of each every 0.1 s. tqdm reads its defaults from TQDM_* variables when it
    is imported (after this); a value the user set stays, and a child process (a dashboard's run) inherits them."""
    try:
        terminal = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError, OSError):  # no such method, or closed
        terminal = False
    if not terminal:
        for name in ("TQDM_MININTERVAL", "TQDM_MAXINTERVAL"):
            os.environ.setdefault(name, str(LOG_INTERVAL_S))


STANDARD = ((0, "stdin"), (1, "stdout"), (2, "stderr"))


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
        return False
    except OSError:
        return True


def _fill_closed() -> list[str]:
    """The standard descriptors the process was started without (`1>&-`, `0<&-`), each opened on /dev/null: else
    the next file the command opens takes the number, and what C code or a later stream writes to 1 or 2 lands in
    it. Their names; Python's stream for each is None."""
    closed = [(fd, name) for fd, name in STANDARD if _closed(fd)]
    for fd, _ in closed:
        devnull = os.open(os.devnull, os.O_RDWR)
        if devnull != fd:
            os.dup2(devnull, fd)
            os.close(devnull)
    return [name for _, name in closed]


def guard_streams() -> None:
    """Guard sys.stdout and sys.stderr (those that are open) for the rest of the process: see the module's
    docstring. Called once, by the command line for the process's own arguments. A stdout the process was started
    without (`1>&-`) is lost from the start, so said and in the exit code (the command's output went nowhere; it
    exited 0, silent); a closed stderr or stdin is the caller's choice: /dev/null."""
    closed = _fill_closed()
    _throttle_progress_bars()
    for name in closed:
        if name != "stdin" and getattr(sys, name) is None:
            setattr(sys, name, open(1 if name == "stdout" else 2, "w", closefd=False))  # onto /dev/null now
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, GuardedStream):
            continue
        with contextlib.suppress(AttributeError, ValueError, OSError):  # not a TextIOWrapper: its own errors stay
            stream.reconfigure(errors=ESCAPE)
    for name in ("stdout", "stderr"):
        if (stream := getattr(sys, name)) is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream, name))
    if isinstance(sys.stdout, GuardedStream) and isinstance(sys.stderr, GuardedStream):
        sys.stdout.other, sys.stderr.other = sys.stderr, sys.stdout
    for name in closed:
        if isinstance(stream := getattr(sys, name, None), GuardedStream):
            if name == "stderr":
                stream.other = None  # closed by the caller: nothing to say, and not on stdout
            stream._lose(OSError(errno.EBADF, "it was closed"))


__all__ = ["ESCAPE", "LOG_INTERVAL_S", "GuardedStream", "guard_streams", "output_failed", "stdout_lost"]
