"""Command-line value checkers: the `type=` of each --option, so a bad value is refused where the flag is declared,
before anything loads. A subcommand's signature names them as `Annotated` hints (PositiveInt, Probability, ...);
argparse reports a refusal as `error: argument --FLAG: 'VALUE': the fix` and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Annotated

SEED_MAX = 2**64 - 1  # what torch.manual_seed takes without overflow (the server's range too)
# forgetting --seeds: each seed trains every arm (3 runs by default: ~7 min on 2 CPU cores for the demo task), and
# a mean's 95% interval narrows as 1/sqrt(seeds): 100 cut it to a tenth of one seed's; 1e9 started 3e9 runs
MAX_SEEDS = 100
TEMPERATURE_RANGE = (0.01, 100.0)  # below 0.01, logits / T overflows the sampler; 0 means greedy


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a {'whole number' if kind is int else 'number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def positive_int(text: str) -> int:
    """A count or size: a whole number ≥ 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number ≥ 1")
    return value


def seed_count(text: str) -> int:
    """How many seeds a study repeats each arm for: 1 .. MAX_SEEDS."""
    value = _number(text, int)
    if not 1 <= value <= MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from 1 to {MAX_SEEDS} (each seed trains "
                                         f"every arm again; {MAX_SEEDS} narrow the intervals to a tenth of one "
                                         f"seed's)")
    return value


def port(text: str) -> int:
    """A TCP port: 0 .. 65535 (0: any free port)."""
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: give a port from 0 to 65535")
    return value


def seed(text: str) -> int:
    """A random seed: 0 .. 2**64 - 1."""
    value = _number(text, int)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from 0 to 2**64 - 1 ({SEED_MAX})")
    return value


def finite_float(text: str) -> float:
    """Any finite number (the command checks its range and says why)."""
    return _number(text, float)


def positive_float(text: str) -> float:
    """A finite number > 0, e.g. a learning rate."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number > 0, e.g. 1e-4")
    return value


def probability(text: str) -> float:
    """A probability mass in (0, 1], e.g. top-p."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number in (0, 1]; 1 keeps every token")
    return value


def temperature(text: str) -> float:
    """0 (greedy) or a sampling temperature from 0.01 to 100."""
    value = _number(text, float)
    low, high = TEMPERATURE_RANGE
    if value != 0 and not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 for greedy decoding, or from {low:g} to {high:g} "
                                         f"to sample")
    return value


def not_utf8(value: str) -> str | None:
    """Where `value` holds what is not UTF-8 text, e.g. "the byte 0xe9 at position 3"; None where it is all text.
    A byte the locale's encoding could not decode (a Latin-1 name or file) reaches Python as a lone surrogate."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"half a character (U+{code:04X})"
        return f"{what} at position {e.start}"


def as_typed(value: str) -> str | None:
    """The UTF-8 text the user typed, where Python decoded the command line with an ASCII locale (LC_ALL=C with
    PYTHONUTF8=0): every byte past ASCII reached it as a lone surrogate. None where the bytes are not UTF-8."""
    with contextlib.suppress(UnicodeError):
        return os.fsencode(value).decode("utf-8")
    return None


def locale_problem(path: str) -> str | None:
    """Why `path` cannot be opened in this locale: under an ASCII one (LC_ALL=C with PYTHONUTF8=0) Python cannot
    name a file with other characters (a config's `output_dir: runs/出力` was a UnicodeEncodeError traceback, a data
    file there "no such file"); None where it can."""
    encoding = sys.getfilesystemencoding()
    try:
        path.encode(encoding, "surrogateescape")  # as os.fsencode does
        return None
    except UnicodeEncodeError:
        return (f"the locale's encoding ({encoding}: LC_ALL=C or LANG=C with PYTHONUTF8=0) cannot read its "
                f"non-ASCII characters; run with PYTHONUTF8=1 or LC_ALL=C.UTF-8")


def name_problem(value: str) -> str | None:
    """Why a path or name cannot be used as typed, where it is not UTF-8 text (the model and tokenizer libraries
    open only UTF-8 paths: a Latin-1 folder name was a tokenizers traceback, or 'no such adapter folder' for one that
    is there), with the fix; None where it is."""
    if (where := not_utf8(value)) is None:
        return None
    if (typed := as_typed(value)) is not None:
        return locale_problem(typed)
    return (f"it holds {where}, which is not UTF-8; use a UTF-8 name (rename a Latin-1 one: convmv -f latin1 -t "
            f"utf-8 --notest NAME)")


def nonempty(text: str) -> str:
    """A path or name that is not the empty string, and UTF-8 text (name_problem)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty: give a path")
    if (problem := name_problem(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def text(value: str) -> str:
    """Text for the tokenizer: UTF-8. A byte the terminal's encoding could not decode (a Latin-1 file read with
    $(cat ...)) reaches Python as a lone surrogate, which no tokenizer encodes (a traceback after the model loaded).
    UTF-8 typed under an ASCII locale (LC_ALL=C with PYTHONUTF8=0) is read as the text it is (it was refused as
    'not UTF-8 text')."""
    if (where := not_utf8(value)) is None:
        return value
    if (typed := as_typed(value)) is not None:
        return typed
    raise argparse.ArgumentTypeError(f"it holds {where}, which is not UTF-8 text; re-encode it (e.g. iconv -f latin1 "
                                     f"-t utf-8) or use a UTF-8 terminal")


class FlagOverride(str):
    """The KEY=VALUE override a --flag stands for (`--max-steps 5`: training.max_steps=5); `typed` is the flag as the
    user typed it, which config.duplicate_overrides names where the same key is also given as KEY=VALUE."""

    typed: str

    def __new__(cls, key: str, value: object, flag: str) -> FlagOverride:
        item = super().__new__(cls, f"{key}={value}")
        item.typed = f"{flag} {value}"
        item._args = (key, value, flag)
        return item

    def __getnewargs__(self) -> tuple:  # copy and pickle (a config's overrides may be copied) build it again
        return self._args


PositiveInt = Annotated[int, positive_int]
Port = Annotated[int, port]
Seed = Annotated[int, seed]
SeedCount = Annotated[int, seed_count]
FiniteFloat = Annotated[float, finite_float]
PositiveFloat = Annotated[float, positive_float]
Probability = Annotated[float, probability]
Temperature = Annotated[float, temperature]
NonEmpty = Annotated[str, nonempty]
Text = Annotated[str, text]
