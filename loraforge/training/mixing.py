"""Several datasets in one run: read every source (all problems reported together), and draw an epoch from them.

    data.train: [{path, format, weight | epochs}, ...]      (a single path is one source, epochs 1)

    epochs  (no weights): each epoch holds every source `epochs` times (a fraction: a seeded subset), shuffled
            together. One source at epochs 1 is exactly the single-file order (a permutation by seed + epoch).
    weights: an epoch holds as many examples as the sources together; each draws its source with probability
            weight / sum(weights) (seeded, per epoch), and takes that source's next example in a seeded order
            (every example once before any repeats, reshuffled when the source runs out; the order goes on from
            one epoch into the next, so a source drawn less than its size an epoch is not restarted each epoch).

The examples of all sources are concatenated (source 0 first); the mixture returns indices into that list, so
micro-batching, packing (examples of a packed row stay isolated whatever their source) and the shared-prefix
forward (the prefix is what the rows of a batch really share) work on a mixed batch as on any other.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.config import DataConfig, DataSource
from loraforge.training import data as D


@dataclass(frozen=True)
class Mixture:
    """How one epoch is drawn from sources whose examples are concatenated in order (`sizes[i]` examples each)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...] | None  # sampling shares (normalised), or None: epochs
    epochs: tuple[float, ...]
    seed: int = 0

    @property
    def offsets(self) -> list[int]:
        return [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def expected_counts(self) -> list[float]:
        """Examples per epoch expected from each source (by epochs: exactly the number epoch_order draws)."""
        if self.weights is None:
            return [float(self._per_epoch(e, n)) for e, n in zip(self.epochs, self.sizes)]
        return [w * sum(self.sizes) for w in self.weights]

    def epoch_order(self, epoch: int) -> list[int]:
        """This epoch's example indices (into the concatenated examples), the same on every process."""
        if self.weights is None:
            shuffle = torch.Generator().manual_seed((self.seed + epoch) % 2**64)  # seed 2**64 - 1 is legal: wraps
            pool = []
            for i, (n, e, offset) in enumerate(zip(self.sizes, self.epochs, self.offsets)):
                whole, part = int(e), self._per_epoch(e, n) - int(e) * n
                pool += list(range(offset, offset + n)) * whole
                if part:  # a seeded subset for the fraction of a pass
                    pick = torch.randperm(n, generator=self._generator(epoch, i, -1))[:part]
                    pool += (pick + offset).tolist()
            return [pool[j] for j in torch.randperm(len(pool), generator=shuffle).tolist()]
        draws = self._draws(epoch)
        position = [sum(n) for n in zip(*(self._counts(k) for k in range(epoch)))] or [0] * len(self.sizes)
        streams: list[tuple[int, list[int]]] = [(-1, [])] * len(self.sizes)  # (pass, its order) per source
        order = []
        for i in draws:  # a source's stream goes on across epochs: every example once before any repeats
            n_pass, k = divmod(position[i], self.sizes[i])
            if streams[i][0] != n_pass:
                streams[i] = (n_pass, torch.randperm(self.sizes[i], generator=self._generator(0, i, n_pass)).tolist())
            order.append(self.offsets[i] + streams[i][1][k])
            position[i] += 1
        return order

    @staticmethod
    def _per_epoch(epochs: float, n: int) -> int:
        """Examples a source of n examples gives an epoch at `epochs` passes: the whole passes, then a share of one
        pass rounded to whole examples."""
        return int(epochs) * n + round((epochs - int(epochs)) * n)

    def _draws(self, epoch: int) -> list[int]:
        """The source of each example of a weighted epoch (seeded by seed + epoch)."""
        shuffle = torch.Generator().manual_seed((self.seed + epoch) % 2**64)  # seed 2**64 - 1 is legal: wraps
        return torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), sum(self.sizes),
                                 replacement=True, generator=shuffle).tolist()

    @functools.lru_cache(maxsize=None)  # epoch e needs the counts of every epoch before it (a few ints each)
    def _counts(self, epoch: int) -> tuple[int, ...]:
        """How many examples each source gave to weighted epoch `epoch`."""
        return tuple(torch.bincount(torch.tensor(self._draws(epoch)), minlength=len(self.sizes)).tolist())

    def _generator(self, epoch: int, source: int, n_pass: int) -> torch.Generator:
        """A seed per (epoch, source, pass), apart from the epoch's own shuffle (seed + epoch); a weighted source's
        passes are counted across epochs (epoch 0 for all)."""
        return torch.Generator().manual_seed((((self.seed * 7919 + epoch) * 7919 + source) * 7919 + n_pass + 1)
                                             % 2**62 + 2**40)

    def source_of(self, index: int) -> int:
        return max(i for i, offset in enumerate(self.offsets) if offset <= index)


MIN_TO_SPLIT = 20
"""Without data.eval, a training source holds out data.eval_fraction of its records only from this many on."""
MAX_PER_EPOCH = 100_000_000
"""Examples in one epoch of a mix by epochs: the epoch's order is a list of that many indices."""


def label(split: str, i: int, source: DataSource, n: int) -> str:
    """How a source is named in messages: its field (data.train[1]) and file, or just the file when alone."""
    return Path(source.path).name if n == 1 else f"data.{split}[{i}] {Path(source.path).name}"


def read_sources(c: DataConfig, seed: int) -> tuple[list[list[dict]], list[tuple[str, str, list[dict]]]]:
    """Records of every train source, and (name, format, records) of each held-out part; each failure is
    collected, then one DataError lists them all.

    Without data.eval, eval_fraction of each training source (with at least 20 records) is held out."""
    train_sources, eval_sources = c.sources("train"), c.sources("eval")
    problems, train, held = [], [], []
    for split, sources in (("train", train_sources), ("eval", eval_sources)):
        for i, source in enumerate(sources):
            try:
                records = D.read_records(source.path)
            except D.DataError as e:
                problems.append(f"data.{split}[{i}] ({source.path}): {e}" if len(sources) > 1 else str(e))
                continue
            if split == "train":
                train.append(records)
            else:
                held.append((label(split, i, source, len(sources)), source.format or c.format, records))
    if problems:
        raise D.DataError("\n".join(problems) if len(problems) == 1 else
                          f"{len(problems)} data sources cannot be read:\n  " + "\n  ".join(problems))
    if not eval_sources and c.eval_fraction > 0:
        for i, (source, records) in enumerate(zip(train_sources, train)):
            if len(records) >= MIN_TO_SPLIT:
                name = label("train", i, source, len(train_sources))
                try:
                    train[i], part = D.train_test_split(records, c.eval_fraction, seed=seed, field="data.eval_fraction")
                except D.DataError as e:
                    problems.append(f"{name}: {e}")
                    continue
                held.append((name, source.format or c.format, part))
    if problems:
        raise D.DataError("\n".join(problems) if len(problems) == 1 else
                          f"{len(problems)} data sources cannot be split:\n  " + "\n  ".join(problems))
    return train, held


def load_sources(c: DataConfig, tokenizer, seed: int,
                 progress: bool = False) -> tuple[list[D.Example], list[D.Example], dict, Mixture]:
    """Tokenized train and held-out examples of every source, the counts to report (per source under "sources"),
    and the mixture that draws epochs from them. Every source's problem is reported in one DataError. `progress`:
    a progress bar per source on stderr while one takes long to tokenize (D.build_dataset)."""
    train_records, eval_records = read_sources(c, seed)
    train_sources = c.sources("train")
    problems, examples, per_source, failed, alone = [], [], [], set(), None
    held_out, held_from_train = [], not c.sources("eval")  # without data.eval: parts of the train sources, by name
    split = {name for name, _, _ in eval_records}  # the train sources read_sources held a share of, by record
    for i, (source, records) in enumerate(zip(train_sources, train_records)):
        name = label("train", i, source, len(train_sources))
        try:
            built, stats = D.build_dataset(records, tokenizer, source.format or c.format, c.max_seq_len,
                                           c.train_on_prompt, c.overflow, f"tokenize {name}" if progress else None)
            if held_from_train and c.eval_fraction > 0 and name not in split and stats.n_split:
                built, part = hold_out_windows(built, stats, c.eval_fraction, seed)
                held_out += part
                split |= {name} if part else set()
        except D.DataError as e:
            problems.append(f"{name}: {e}")  # named beside other problems (soak: only the held-out file was)
            alone = str(e) if len(train_sources) == 1 else None
            failed.add(name)
            continue
        examples.append(built)
        per_source.append(stats)
    held_truncated = held_dropped = 0  # data.overflow applies to them too: counted and said as for training
    for name, fmt, records in eval_records:
        if held_from_train and name in failed:  # the source is reported already: one source, one problem
            continue
        try:
            built, stats = D.build_dataset(records, tokenizer, fmt, c.max_seq_len, c.train_on_prompt, c.overflow,
                                           f"tokenize {name} (held out)" if progress else None)
            held_out += built
            held_truncated, held_dropped = held_truncated + stats.n_truncated, held_dropped + stats.n_dropped
        except D.DataError as e:
            problems.append(f"{name} (held out): {e}")
    if problems:
        raise D.DataError((alone or problems[0]) if len(problems) == 1 else
                          f"{len(problems)} data sources cannot be used:\n  " + "\n  ".join(problems))
    for i, (source, built) in enumerate(zip(train_sources, examples)):
        if source.epochs is not None and round(source.epochs * len(built)) == 0:  # epoch_order would draw none
            problems.append(f"data.train[{i}].epochs: {source.epochs:g} of its {len(built)} examples is none; "
                            f"use at least {1 / len(built):.2g} (one example per epoch), or leave the source out")
        elif source.epochs is not None and source.epochs * len(built) > MAX_PER_EPOCH:  # held as a list of indices
            problems.append(f"data.train[{i}].epochs: {source.epochs:g} passes over its {len(built)} examples is "
                            f"{source.epochs * len(built):.3g} examples an epoch, more than {MAX_PER_EPOCH:,}; use "
                            f"at most {MAX_PER_EPOCH // len(built):,} (training.epochs repeats the whole mix)")
    if problems:
        raise D.DataError("\n".join(problems) if len(problems) == 1 else
                          f"{len(problems)} data sources cannot be used:\n  " + "\n  ".join(problems))
    weights = [s.weight for s in train_sources]
    mixture = Mixture(names=tuple(label("train", i, s, len(train_sources)) for i, s in enumerate(train_sources)),
                      sizes=tuple(len(e) for e in examples),
                      weights=shares(weights) if all(weights) else None,
                      epochs=tuple(1.0 if s.epochs is None else s.epochs for s in train_sources), seed=seed)
    total = D.DataStats()
    for stats in per_source:
        for f in dataclasses.fields(total):
            setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))
    report = dataclasses.asdict(total)
    if held_truncated or held_dropped:
        report["held_out_overflow"] = {"n_truncated": held_truncated, "n_dropped": held_dropped}
    if held_out:  # the same tokens in both (data.eval naming a train file, repeated records): said on the data line
        trained = {hash(tuple(ex.input_ids)) for built in examples for ex in built}
        if also := sum(hash(tuple(ex.input_ids)) in trained for ex in held_out):
            report["held_out_in_train"] = also
    if held_from_train and c.eval_fraction > 0:  # sources split neither by record nor by window
        if small := [name for name in mixture.names if name not in split]:  # said on the data line
            report["not_held_out"] = small
    if len(per_source) > 1:
        report["sources"] = [{"name": name, **dataclasses.asdict(s)} for name, s in zip(mixture.names, per_source)]
    return [ex for built in examples for ex in built], held_out, report, mixture


def hold_out_windows(built: list[D.Example], stats: D.DataStats, fraction: float,
                     seed: int) -> tuple[list[D.Example], list[D.Example]]:
    """(train, held out) of a source too small to split by record (one .txt is one record) whose texts were cut
    into windows: data.eval_fraction of its windows, seeded, when it has MIN_TO_SPLIT of them; its counts then
    cover the windows it trains on. Neighbouring windows share one token, a target in one and context in the
    other, so no held-out target is ever trained on."""
    if len(built) < MIN_TO_SPLIT:
        return built, []
    train, held = D.train_test_split(built, fraction, seed=seed, field="data.eval_fraction", unit="window")
    stats.n_examples -= len(held)
    stats.n_tokens -= sum(len(e.input_ids) for e in held)
    stats.n_supervised_tokens -= sum(map(D.targets, held))
    return train, held


def fingerprint(examples: list[D.Example], mixture: Mixture) -> list[dict]:
    """Per training source: its name, its number of examples and a SHA-256 of their tokens and labels. A checkpoint
    keeps it, so --resume onto data that changed under the same path (another place in another epoch) is caught."""
    found = []
    for name, size, offset in zip(mixture.names, mixture.sizes, mixture.offsets):
        digest = hashlib.sha256()
        for ex in examples[offset:offset + size]:
            digest.update(len(ex.input_ids).to_bytes(8, "little"))  # where one example ends and the next begins
            digest.update(array.array("q", ex.input_ids).tobytes())
            digest.update(array.array("q", ex.labels).tobytes())
        found.append({"name": name, "examples": size, "sha256": digest.hexdigest()})
    return found


def fingerprint_changes(saved: list[dict], now: list[dict], then_: str = "then", now_: str = "now") -> list[str]:
    """The sources whose examples differ between two fingerprints (a checkpoint's and this run's; `then_`, `now_`
    name them: rank 0's and another process's), each as a phrase."""
    if len(saved) != len(now):
        return [f"{len(saved)} training sources {then_}, {len(now)} {now_}"]
    return [f"{b['name']}: {a['examples']} examples {then_}, {b['examples']} {now_}" if a["examples"] != b["examples"]
            else f"{b['name']}: as many examples ({b['examples']}), other tokens" for a, b in zip(saved, now)
            if a["sha256"] != b["sha256"]]


def shares(weights: list[float]) -> tuple[float, ...]:
    """Weights as shares that sum to 1; scaled by the largest first, so two weights of 1e308 are 0.5 each (their
    plain sum is inf, every share 0)."""
    top = max(weights)
    scaled = [w / top for w in weights]
    return tuple(w / sum(scaled) for w in scaled)


def sources_report(mixture: Mixture, stats: dict) -> str:
    """One line per source: records, examples per epoch, share of the epoch's tokens, truncated and dropped."""
    rows = stats["sources"]
    counts = mixture.expected_counts()
    tokens = [count * row["n_tokens"] / max(row["n_examples"], 1) for count, row in zip(counts, rows)]
    how = "weights" if mixture.weights is not None else "epochs"
    lines = [f"data: {len(rows)} sources mixed by {how}, {round(sum(counts))} examples per epoch:"]
    for i, (row, count, tok) in enumerate(zip(rows, counts, tokens)):
        rule = (f"weight {mixture.weights[i]:.3g}" if mixture.weights is not None
                else f"epochs {mixture.epochs[i]:g}")
        none = " (not one per epoch: raise its weight, or remove the source)" if count < 0.5 else ""  # soak
        eos = f", {row['n_eos_stripped']} ending in the EOS text (learnt once)" if row["n_eos_stripped"] else ""
        split = f"{row['n_split']} cut into windows, " if row.get("n_split") else ""
        records = f"{row['n_records']} record" + "s" * (row["n_records"] != 1)
        lines.append(f"  {row['name']}: {records} ({split}{row['n_truncated']} truncated, "
                     f"{row['n_dropped']} dropped{eos}), {rule}: {count:.0f} examples{none}, "
                     f"{100 * tok / max(sum(tokens), 1e-9):.0f}% of the tokens per epoch")
    return "\n".join(lines)


def check_share(mixture: Mixture, order: list[int]) -> list[float]:
    """The share of `order`'s examples from each source (for reports and tests)."""
    counts = [0] * len(mixture.sizes)
    for index in order:
        counts[mixture.source_of(index)] += 1
    return [c / max(len(order), 1) for c in counts]
