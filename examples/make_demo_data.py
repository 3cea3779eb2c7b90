"""Generate the shipped demo dataset: rewrite a date written in words into ISO 8601 (YYYY-MM-DD).

    python examples/make_demo_data.py            # writes loraforge/assets/demo_{train,test}.jsonl

Deterministic (seeded). Every input format is unambiguous: the month is always a word, never a number, so
"03/05/2021"-style day/month confusions never appear. Train and test use disjoint dates, so a test input is
never a reworded training input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

INSTRUCTION = "Write this date as YYYY-MM-DD."
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def short(month: str) -> str:
    return month if month == "May" else month[:3] + ("t" if month == "September" else "")


# Each style renders (date, month name) -> text; all unambiguous.
STYLES = [
    lambda d, m: f"{m} {d.day}, {d.year}",                                   # March 5, 2021
    lambda d, m: f"{d.day} {m} {d.year}",                                    # 5 March 2021
    lambda d, m: f"{short(m)} {ordinal(d.day)} {d.year}",                    # Mar 5th 2021
    lambda d, m: f"the {ordinal(d.day)} of {m}, {d.year}",                   # the 5th of March, 2021
    lambda d, m: f"{d.year}, {m} {d.day}",                                   # 2021, March 5
    lambda d, m: f"{DAYS[d.weekday()]}, {m} {ordinal(d.day)}, {d.year}",     # Friday, March 5th, 2021
    lambda d, m: f"{d.day:02d}-{short(m)}-{d.year}",                         # 05-Mar-2021
    lambda d, m: f"{d.year} {short(m).upper()} {d.day:02d}",                 # 2021 MAR 05
    lambda d, m: f"{m} {ordinal(d.day)}, {d.year}",                          # March 5th, 2021
    lambda d, m: f"{ordinal(d.day)} {m} {d.year}",                           # 5th March 2021
]


def make(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    dates = sorted({start + dt.timedelta(days=rng.randrange(span + 1)) for _ in range(3 * (n_train + n_test))})
    rng.shuffle(dates)
    dates = dates[: n_train + n_test]

    def record(i: int, d: dt.date) -> dict:
        text = STYLES[i % len(STYLES)](d, MONTHS[d.month - 1])  # round-robin: every style equally often
        return {"instruction": INSTRUCTION, "input": text, "output": d.isoformat()}

    records = [record(i, d) for i, d in enumerate(dates)]
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
    write_jsonl(args.out / "demo_train.jsonl", train)
    write_jsonl(args.out / "demo_test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test records to {args.out}")


if __name__ == "__main__":
    main()
