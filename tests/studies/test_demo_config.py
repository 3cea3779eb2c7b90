"""The built-in demo config (demo, forgetting and continual start from it) at any --max-steps."""

import pytest

from loraforge.studies.demo import demo_config


@pytest.mark.parametrize("max_steps,overrides,steps,warmup", [
    (None, [], 24, 5), (6, [], 6, 5), (3, [], 3, 2), (1, [], 1, 0),
    (30, ["training.max_steps=2"], 2, 1),  # forgetting/continual: --max-steps as an override
    (None, ["training.max_steps=4", "training.warmup_steps=0"], 4, 0),  # the user's own warmup wins
])
def test_a_short_run_shortens_the_built_in_warmup(max_steps, overrides, steps, warmup):
    """`loraforge demo --max-steps 2` was refused for warmup_steps 5, a value the user never set."""
    cfg = demo_config("runs/x", max_steps, overrides)
    assert (cfg.training.max_steps, cfg.training.warmup_steps) == (steps, warmup)
