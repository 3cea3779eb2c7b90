"""How an epoch's examples become micro-batches, and the micro-batches optimizer steps.

    micro_batches(examples, cfg, epoch)   one epoch's shuffled micro-batches (lists of example indices): rows of
                                          training.batch_size, or filled up to training.batch_tokens tokens
    EpochPlan                             the steps each epoch makes (its micro-batches // gradient_accumulation ×
                                          processes) and where step s finds its micro-batches. With batch_size
                                          every epoch makes as many; with batch_tokens the count follows each
                                          epoch's shuffle (short and long rows fill a batch differently), so
                                          every epoch is counted from its own micro-batches
    too_many_epochs                       the refusal of an epoch count too many to run, or (batch_tokens) to count
    left_out_line, too_few_examples       what a run says about examples no step takes, or too few for one step
"""

from __future__ import annotations

import bisect

import torch

from loraforge.config import MAX_STEPS, TrainConfig
from loraforge.training import data as D
from loraforge.training.checkpoint import TrainingError
from loraforge.training.mixing import Mixture

# batch_tokens: the run's steps are counted epoch by epoch before it starts (each shuffle packs its own number), about
# 1 µs an example and 20 µs an epoch on one core: these bounds keep that count under about a minute, silent
MAX_COUNTED_EXAMPLES = 10**8
MAX_COUNTED_EPOCHS = 10**6


def micro_batches(examples: list[D.Example], cfg: TrainConfig, epoch: int,
                  mixture: Mixture | None = None) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices), shuffled by (seed, epoch): the same on every rank.
    `mixture` draws the epoch from several sources (None: every example once)."""
    order = (torch.tensor(mixture.epoch_order(epoch)) if mixture is not None
             else torch.randperm(len(examples),
                                 generator=torch.Generator().manual_seed((cfg.training.seed + epoch) % 2**64)))
    t = cfg.training
    if t.batch_tokens is None:
        return [order[i:i + t.batch_size].tolist() for i in range(0, len(order) - t.batch_size + 1, t.batch_size)]
    batches, current, tokens = [], [], 0
    for i in order.tolist():
        n = len(examples[i].input_ids)
        if current and tokens + n > t.batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    return batches  # the last, partial batch is dropped like a partial batch_size batch


class EpochPlan:
    """Steps per epoch and, for a step (counted from 0 over the whole run), its epoch and its place in it. The
    same on every process: each epoch's micro-batches depend on (seed, epoch) alone. `group`: micro-batches per
    optimizer step, gradient_accumulation × processes."""

    def __init__(self, examples: list[D.Example], cfg: TrainConfig, mixture: Mixture | None, group: int):
        self.examples, self.cfg, self.mixture, self.group = examples, cfg, mixture, group
        self.world = group // cfg.training.gradient_accumulation
        self._cached: tuple[int, list[list[int]]] | None = None
        self._starts = [0]  # _starts[e]: the run's step at which epoch e begins
        self.first = self.batches(0)
        if len(self.first) < group:
            raise TrainingError(too_few_examples(cfg, examples, len(self.first), self.world))

    def batches(self, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s micro-batches (the last epoch asked for is kept)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, micro_batches(self.examples, self.cfg, epoch, self.mixture))
        return self._cached[1]

    def steps(self, epoch: int) -> int:
        """Optimizer steps epoch `epoch` makes; its micro-batches short of one more step are left out."""
        if epoch == 0 or self.cfg.training.batch_tokens is None:
            return len(self.first) // self.group
        return len(self.batches(epoch)) // self.group

    def _count_to(self, epoch: int) -> None:
        while len(self._starts) <= epoch:
            self._starts.append(self._starts[-1] + self.steps(len(self._starts) - 1))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, steps already taken in it) of run step `step`."""
        if self.cfg.training.batch_tokens is None:
            return divmod(step, self.steps(0))
        while self._starts[-1] <= step:  # an epoch of no step (fewer micro-batches than a step) is passed over
            self._count_to(len(self._starts))
            if len(self._starts) > 100 and self._starts[-1] == self._starts[-101]:
                raise TrainingError(too_few_examples(self.cfg, self.examples,
                                                     len(self.batches(len(self._starts) - 2)), self.world))
        epoch = bisect.bisect_right(self._starts, step) - 1
        return epoch, step - self._starts[epoch]

    def total(self, epochs: float) -> int:
        """The run's steps for training.epochs `epochs` (a fraction takes that share of the next epoch's steps)."""
        if self.cfg.training.batch_tokens is None:
            return max(1, int(self.steps(0) * epochs))
        whole = int(epochs)
        self._count_to(whole)
        return max(1, self._starts[whole] + int((epochs - whole) * self.steps(whole)))


def too_many_epochs(cfg: TrainConfig, per_epoch: int, n_examples: int) -> str | None:
    """The refusal of a training.epochs too many to run or to count, or None (max_steps set: epochs unused). The
    config bounds epochs alone; here `per_epoch` (the first epoch's steps) and `n_examples` (packed each epoch) are
    known: epochs × steps past max_steps' bound, or (soak: 1e13 epochs walked one by one, no output after 100 s) a
    batch_tokens run whose steps would be counted epoch by epoch for longer than a minute."""
    t = cfg.training
    if t.max_steps:
        return None
    if t.epochs * per_epoch > MAX_STEPS:
        return (f"training.epochs: {t.epochs:g} × {per_epoch} steps an epoch is {t.epochs * per_epoch:.3g} steps, "
                f"past {MAX_STEPS:.0e} (max_steps' bound: at a step a microsecond, 30 years); use at most "
                f"{MAX_STEPS // per_epoch:.3g} epochs, or set training.max_steps")
    fits = min(MAX_COUNTED_EPOCHS, MAX_COUNTED_EXAMPLES // max(1, n_examples))
    if t.batch_tokens is None or t.epochs <= fits:
        return None
    return (f"training.epochs: {t.epochs:g} epochs with training.batch_tokens {t.batch_tokens}: each epoch's shuffle "
            f"packs its own number of steps, so the run's steps are counted epoch by epoch before it starts "
            f"({n_examples} examples an epoch), past {MAX_COUNTED_EPOCHS:.0e} epochs or {MAX_COUNTED_EXAMPLES:.0e} "
            f"examples packed (a minute's counting); use at most {fits:.3g} epochs, or set training.max_steps")


def left_out_line(cfg: TrainConfig, batches: list[list[int]], n_epoch: int, per_epoch: int,
                  world: int) -> str | None:
    """The line saying how many of an epoch's `n_epoch` examples no step trains on, or None when every one is: an
    epoch is whole optimizer steps, so a last partial batch and the micro-batches short of a step are left out (a
    shuffled other set each epoch). `batches`: epoch 0's micro-batches."""
    t = cfg.training
    used = sum(len(b) for b in batches[:per_epoch * t.gradient_accumulation * world])
    if used >= n_epoch:
        return None
    share = (f"batch_size {t.batch_size}" if t.batch_tokens is None else f"batches of up to {t.batch_tokens} tokens")
    step = f"{share} × gradient_accumulation {t.gradient_accumulation}" + (f" × {world} processes" if world > 1
                                                                           else "")
    fix = (f"a training.batch_size × training.gradient_accumulation{' × processes' if world > 1 else ''} that "
           f"divides {n_epoch}" if t.batch_tokens is None else
           "another training.batch_tokens or training.gradient_accumulation")
    if t.batch_tokens is not None:  # another shuffle fills another number of batches
        return (f"data: the first epoch trains on {used} of its {n_epoch} examples: {per_epoch} whole steps of "
                f"{step}; the other {n_epoch - used} are left out (each epoch's shuffle makes its own number of "
                f"steps and leaves out others); to train on every one, use {fix}")
    return (f"data: each epoch trains on {used} of its {n_epoch} examples: {per_epoch} whole steps of {step}; the "
            f"other {n_epoch - used} (shuffled anew each epoch) are left out; to train on every one, use {fix}")


def too_few_examples(cfg: TrainConfig, examples: list[D.Example], n_batches: int, world: int) -> str:
    """The error when the data make less than one optimizer step, naming the batch setting in force and its value
    (`n_batches`: the micro-batches one epoch makes); with batch_tokens, how many tokens the examples hold."""
    n_examples = len(examples)
    t = cfg.training
    fixes = ([] if t.batch_tokens is not None else ["lower training.batch_size"] if t.batch_size > 1 else []) + (
        ["lower training.gradient_accumulation"] if t.gradient_accumulation > 1 else [])
    if world > 1:  # each process takes a share of every step: fewer of them need fewer examples
        fixes += [f"run fewer processes (torchrun --nproc_per_node; this run has {world})", "add training examples"]
    if t.batch_tokens is None:
        return (f"{n_examples} training examples are fewer than one optimizer step needs (batch_size {t.batch_size} "
                f"× gradient_accumulation {t.gradient_accumulation} × {world} processes); " + either(fixes))
    tokens = sum(len(e.input_ids) for e in examples)
    return (f"{n_examples} training examples ({tokens:,} tokens in all) fill {n_batches} batches of "
            f"training.batch_tokens {t.batch_tokens}, "
            f"fewer than one optimizer step needs (gradient_accumulation {t.gradient_accumulation} × {world} "
            f"processes); " + either([f"lower training.batch_tokens (it is {t.batch_tokens})", *fixes]))


def either(fixes: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return ", ".join(fixes[:-1]) + " or " + fixes[-1] if len(fixes) > 1 else fixes[0]
