"""Command-line value checkers: the `type=` of each --option, so a bad value is refused where the flag is declared,
before anything loads. A subcommand's signature names them as `Annotated` hints (PositiveInt, Probability, ...);
argparse reports a refusal as `error: argument --FLAG: 'VALUE': the fix` and exits 2.
"""

from __future__ import annotations

import argparse
import math
from typing import Annotated

SEED_MAX = 2**64 - 1  # what torch.manual_seed takes without overflow (the server's range too)
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


def nonempty(text: str) -> str:
    """A path or name that is not the empty string."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty: give a path")
    return text


def text(value: str) -> str:
    """Text for the tokenizer: UTF-8. A byte the terminal's encoding could not decode (a Latin-1 file read with
    $(cat ...)) reaches Python as a lone surrogate, which no tokenizer encodes (a traceback after the model loaded)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"half a character (U+{code:04X})"
        raise argparse.ArgumentTypeError(f"it holds {what} at position {e.start}, which is not UTF-8 text; "
                                         f"re-encode it (e.g. iconv -f latin1 -t utf-8) or use a UTF-8 "
                                         f"terminal") from None
    return value


PositiveInt = Annotated[int, positive_int]
Port = Annotated[int, port]
Seed = Annotated[int, seed]
FiniteFloat = Annotated[float, finite_float]
PositiveFloat = Annotated[float, positive_float]
Probability = Annotated[float, probability]
Temperature = Annotated[float, temperature]
NonEmpty = Annotated[str, nonempty]
Text = Annotated[str, text]
