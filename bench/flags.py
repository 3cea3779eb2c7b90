"""The bench scripts' check of their numeric flags: a value under its least is refused by name (argparse's error,
exit 2) before a model loads or a worker starts, where it used to end in a traceback or a run of nothing."""

from __future__ import annotations

import argparse


def at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, **least: float) -> None:
    """parser.error naming the first flag whose value is under its least: name=least pairs, with the attribute's
    name (`max_tokens` for --max-tokens); a value of None (not given, a default to come) passes."""
    for name, low in least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def whole_numbers(parser: argparse.ArgumentParser, flag: str, text: str, what: str) -> list[int]:
    """The comma-separated whole numbers of at least 1 in `text` (the value of --flag); parser.error naming the first
    that is not one, as "every <what> must be ..."."""
    numbers = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            parser.error(f"--{flag}: every {what} must be a whole number of at least 1, got {item!r}")
        numbers.append(int(item))
    return numbers
