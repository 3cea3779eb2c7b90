"""The built-in demo config (demo, forgetting and continual start from it) at any --max-steps, and what demo refuses
before the base model loads."""

import json
import sys
import warnings

import pytest

from helpers import forbid_loading
from loraforge.config import ConfigError
from loraforge.studies import demo
from loraforge.studies.demo import check_demo_out, demo_config, run_demo
from loraforge.utils.outputs import OutputError


@pytest.mark.parametrize("max_steps,overrides,steps,warmup", [
    (None, [], 24, 5), (6, [], 6, 5), (3, [], 3, 2), (1, [], 1, 0),
    (30, ["training.max_steps=2"], 2, 1),  # forgetting/continual: --max-steps as an override
    (None, ["training.max_steps=4", "training.warmup_steps=0"], 4, 0),  # the user's own warmup wins
])
def test_a_short_run_shortens_the_built_in_warmup(max_steps, overrides, steps, warmup):
    """`loraforge demo --max-steps 2` was refused for warmup_steps 5, a value the user never set."""
    cfg = demo_config("runs/x", max_steps, overrides)
    assert (cfg.training.max_steps, cfg.training.warmup_steps) == (steps, warmup)


@pytest.fixture
def no_loading(monkeypatch):
    """The demo's refusals come before the base model loads: loading it fails the test."""
    forbid_loading(monkeypatch, demo)


def test_an_output_dir_other_than_out_is_refused(tmp_path, no_loading):
    """`demo --out a output_dir=b` trained into b, then scored and reported a's adapter (an earlier run's)."""
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(ConfigError) as e:
        run_demo(str(a), max_steps=2, overrides=[f"output_dir={b}"])
    assert e.value.problems == [f"output_dir: demo writes to --out ({a}); use --out {b} instead of output_dir={b}"]
    assert not a.exists() and not b.exists()
    check_demo_out(str(a), demo_config(str(a), 2, [f"output_dir={tmp_path / 'x' / '..' / 'a'}"]))  # the same folder


def test_an_unfinished_run_is_refused_without_advising_resume(tmp_path, no_loading):
    """demo takes no --resume: its refusal of an unfinished run named it anyway."""
    step = tmp_path / "d" / "checkpoints" / "step-00000003"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 3, "total_steps": 40}))
    with pytest.raises(OutputError) as e:
        run_demo(str(tmp_path / "d"), max_steps=40)
    assert str(e.value) == (f"--out {tmp_path / 'd'} holds an unfinished run (checkpoint step-00000003, step 3 of 40); "
                            f"start it over with --overwrite (overwrite=True), or choose another --out")


def test_a_missing_tracker_package_is_refused_before_the_base_loads(tmp_path, no_loading, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError) as e:
        run_demo(str(tmp_path / "d"), max_steps=2, overrides=["training.report_to=wandb"])
    assert e.value.problems == ["training.report_to: wandb needs the wandb package: pip install 'loraforge[wandb]' "
                                "(or set training.report_to: none)"]


def test_a_study_s_data_files_are_the_demo_s_defaults_and_the_user_s_data_eval_override_wins(tmp_path):
    """forgetting/continual set their held-out file as the demo's data section, not as a command-line key before the
    user's: a key given twice on the command line is warned about (config.duplicate_overrides)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = demo_config(str(tmp_path / "o"), overrides=["data.eval=mine.jsonl"], data={"eval": "study.jsonl"})
    assert cfg.data.eval == "mine.jsonl"
    assert demo_config(str(tmp_path / "o"), data={"eval": "study.jsonl"}).data.eval == "study.jsonl"
