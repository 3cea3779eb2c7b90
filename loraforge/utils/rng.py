"""The caller's random state, kept around a block that seeds the process's generators.

train() seeds torch's and Python's global generators with training.seed (LoRA's A and dropout draw from them), and
left them so: in a notebook, every draw after train() was the seed's, whatever the user had seeded before (soak:
torch.rand after two runs gave the same numbers; a library must not change global state behind the user's back).
"""

from __future__ import annotations

import contextlib
import random

import torch


@contextlib.contextmanager
def kept_random_state():
    """Inside the block, seed and draw as you like; after it (returned or raised) torch's CPU generator, CUDA's and
    Python's `random` are where they were before it. CUDA's: restored where CUDA was in use before the block; where
    it was not, the block's seeds are replaced by the seed torch gives it lazily (torch.initial_seed()), as if the
    block had never run."""
    cpu, python, seed = torch.get_rng_state(), random.getstate(), torch.initial_seed()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        random.setstate(python)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        elif torch.cuda.is_initialized():  # first used inside the block: as it would have started
            torch.cuda.manual_seed_all(seed)
