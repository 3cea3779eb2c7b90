"""How to generate (SamplingParams) and the batch sampler: argmax for greedy rows, temperature / top-k / top-p for
the others, numerically safe for every value SamplingParams accepts (temperature and top_p down to 5e-324).

Safe: the logits are shifted so the largest is 0 and divided by the temperature in float64, so a tiny temperature
gives 0 for the best token(s) and -inf for the rest, never inf - inf = NaN; top-p always keeps the most likely
token, so the distribution handed to multinomial has a positive total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraforge.inference.greedy import OVERFLOWED, argmax_rows, finite_choice
from loraforge.serve.errors import ServeError, shown

SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes without wrapping or overflow
# OpenAI documents up to 4 stop sequences; vLLM takes any number. 8 covers chat templates' several end markers.
# A stop string's length is what a stream holds back (it may be starting), so it is bounded too.
MAX_STOPS, MAX_STOP_CHARS = 8, 1000


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. temperature 0 is greedy (deterministic)."""

    max_tokens: int | None = None  # None: the engine's default_max_tokens, cut to the context left
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, vLLM's spelling): every token
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    seed: int | None = None  # for sampling (temperature > 0): 0 .. 2**64 - 1
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks: fixed lengths)

    def __post_init__(self):
        problems = []
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            problems.append(f"max_tokens: {shown(self.max_tokens)} must be a positive integer")
        if not _is_real(self.temperature) or not 0 <= self.temperature <= 100:
            problems.append(f"temperature: {shown(self.temperature)} must be between 0 and 100 (0: greedy)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p: {shown(self.top_p)} must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            problems.append(f"top_k: {shown(self.top_k)} must be a positive integer, or 0 or -1 for every token")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            problems.append(f"seed: {shown(self.seed)} must be an integer from 0 to 2**64 - 1 ({SEED_RANGE[1]})")
        problems += _stop_problems(self.stop)
        if not isinstance(self.ignore_eos, bool):
            problems.append(f"ignore_eos: {shown(self.ignore_eos)} must be true or false")
        if problems:
            raise ServeError("; ".join(problems))


def _stop_problems(stop) -> list[str]:
    if not isinstance(stop, (tuple, list)) or any(not isinstance(s, str) for s in stop):
        return [f"stop: {shown(stop)} must be a string or a list of strings"]
    problems = []
    if len(stop) > MAX_STOPS:
        problems.append(f"stop: {len(stop)} strings; send at most {MAX_STOPS}")
    if any(not s for s in stop):
        problems.append("stop: an empty string would end every answer at once; remove it")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        problems.append(f"stop: a string of {longest:,} characters; each may have at most {MAX_STOP_CHARS:,}")
    return problems


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own random stream (sampling rows only): seeded, or from fresh entropy."""
    if params.temperature == 0:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(params.seed if params.seed is not None else torch.seed())
    return g


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None, fix: str = OVERFLOWED) -> int:
    """The next token for one row from its logits (V,). `fix`: why logits without a finite value, and what to
    change (the engine's precision: precision.overflow_fix in fp16)."""
    logits = logits.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(logits).any()):
        raise FloatingPointError(f"the model's logits have no finite value: {fix}")
    if params.temperature == 0:
        return int(logits.argmax())
    z = (logits - logits.max()) / params.temperature  # (V,), <= 0; the best token(s) exactly 0
    z = torch.nan_to_num(z, nan=-math.inf)  # a -inf logit stays -inf
    if 0 < params.top_k < z.numel():
        kth = z.topk(params.top_k).values[-1]
        z = z.masked_fill(z < kth, -math.inf)
    probs = torch.softmax(z, -1)  # the max is exp(0) = 1 before normalising: never all zero
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        cut = (sorted_p.cumsum(0) - sorted_p) >= params.top_p  # keep the smallest set reaching top_p; never the first
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """argmax per row of (B, V): what greedy rows take, computed for the batch at once (`greedy_token` checks each)."""
    return argmax_rows(logits)


def greedy_token(logits: torch.Tensor, token: int, fix: str = OVERFLOWED) -> int:
    """`token`, row (V,)'s argmax from `greedy_tokens`, if its logit is finite (`finite_choice`); else
    FloatingPointError, as `sample` raises."""
    return finite_choice(logits, token, fix=fix)
