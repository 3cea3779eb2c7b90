"""Generate the second shipped task: a time of day in words ("quarter past three in the afternoon") as 24-hour
HH:MM ("15:15"), the task the README's "Keep teaching it" teaches after the dates.

    python scripts/make_task.py            # writes loraforge/assets/times_{train,test}.jsonl

Deterministic (seeded). Every input is unambiguous: the part of the day ("in the morning", "in the evening",
"at night") or am/pm is always given, and noon/midnight are named. Train and test use disjoint times of day, so a
test input is never a reworded training input. Exact match on HH:MM is the score.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Write this time on the 24-hour clock as HH:MM."
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty"}


def words(n: int) -> str:
    """0-59 in words: 7 -> seven, 45 -> forty-five."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[10 * tens] + (f"-{ONES[ones]}" if ones else "")


def minutes(n: int) -> str:
    return "minute" if n == 1 else "minutes"


def part_of_day(h: int) -> str:
    if h < 12:
        return "in the morning"
    if h < 18:
        return "in the afternoon"
    return "in the evening" if h < 22 else "at night"


def hour_name(h: int) -> str:
    """The hour as said on a 12-hour clock; 0 and 12 are midnight and noon."""
    return {0: "midnight", 12: "noon"}.get(h, words(h % 12))


def spoken(h: int, m: int) -> str:
    """'quarter past three in the afternoon', 'twenty to eight in the evening', 'ten past midnight'."""
    if m <= 30:
        ref, phrase = h, {0: "", 15: "quarter past ", 30: "half past "}.get(m, f"{words(m)} past " if m % 5 == 0
                                                                          else f"{words(m)} {minutes(m)} past ")
    else:
        ref, phrase = (h + 1) % 24, ("quarter to " if m == 45 else f"{words(60 - m)} to " if m % 5 == 0
                                     else f"{words(60 - m)} {minutes(60 - m)} to ")
    name = hour_name(ref)
    if ref in (0, 12):  # noon and midnight need no part of the day
        return phrase + name
    return phrase + name + (" o'clock" if m == 0 else "") + " " + part_of_day(h)


def clock_words(h: int, m: int) -> str:
    """'seven forty-five in the evening', 'nine oh five in the morning'."""
    if h in (0, 12) and m == 0:
        return hour_name(h)
    minutes = "o'clock" if m == 0 else (f"oh {words(m)}" if m < 10 else words(m))
    return f"{words(h % 12 or 12)} {minutes} {part_of_day(h)}"


def am_pm(h: int, m: int) -> str:
    """'7:45 pm', '12:05 am'."""
    return f"{h % 12 or 12}:{m:02d} {'am' if h < 12 else 'pm'}"


STYLES = [spoken, clock_words, spoken, am_pm]  # the spoken form twice as often: the one furthest from digits


def make(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    minutes = list(range(24 * 60))
    rng.shuffle(minutes)
    chosen = minutes[: n_train + n_test]

    def record(i: int, t: int) -> dict:
        h, m = divmod(t, 60)
        return {"instruction": INSTRUCTION, "input": STYLES[i % len(STYLES)](h, m), "output": f"{h:02d}:{m:02d}"}

    records = [record(i, t) for i, t in enumerate(chosen)]
    return records[n_test:], records[:n_test]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "loraforge" / "assets")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train, test = make(args.n_train, args.n_test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "times_train.jsonl", train)
    write_jsonl(args.out / "times_test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test records to {args.out}")


if __name__ == "__main__":
    main()
