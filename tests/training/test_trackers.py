"""W&B and MLflow runs continue across --resume (loraforge.training.trackers): the run id is kept in
<output_dir>/trackers.json, a resumed run logs into the same tracker run, a run started over gets a new one.

wandb and mlflow are optional extras and not installed for the tests: these fakes keep what their documented APIs
keep (wandb.init(id=..., resume="allow") continues a run and drops steps it already has; mlflow.start_run(run_id=...)
continues a run, and raises MlflowException for a run the store lacks).
"""

import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest
from helpers import stop_in_last_save

from loraforge.cli import main
from loraforge.config import ConfigError, load_train_config
from loraforge.training import loop
from loraforge.training.loop import train
from loraforge.training.trackers import RUN_IDS, check_tracker, open_tracker, saved_run_id


def fake_wandb() -> types.ModuleType:
    wandb = types.ModuleType("wandb")
    wandb.runs, wandb.inits = {}, []
    wandb.errors = types.SimpleNamespace(Error=type("Error", (Exception,), {}))

    class Run:
        def __init__(self, run_id):
            self.id, self.steps = run_id, wandb.runs.setdefault(run_id, [])

        def log(self, metrics, step):
            if not self.steps or step > self.steps[-1][0]:  # W&B keeps steps increasing: earlier ones are dropped
                self.steps.append((step, metrics["train/loss"]))

        def finish(self):
            pass

    def init(project, dir, name, config, id=None, resume=None):
        wandb.inits.append({"id": id, "resume": resume})
        assert id is None or resume == "allow"
        return Run(id or f"w{len(wandb.runs) + 1}")

    wandb.init = init
    return wandb


def fake_mlflow() -> types.ModuleType:
    mlflow = types.ModuleType("mlflow")
    mlflow.exceptions = types.SimpleNamespace(MlflowException=type("MlflowException", (Exception,), {}))
    mlflow.runs, mlflow.params, mlflow.active = {}, {}, None

    def start_run(run_id=None, run_name=None):
        if run_id is not None and run_id not in mlflow.runs:
            raise mlflow.exceptions.MlflowException(f"Run '{run_id}' not found")
        mlflow.active = run_id or f"m{len(mlflow.runs) + 1}"
        mlflow.runs.setdefault(mlflow.active, [])
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=mlflow.active))

    def log_params(params):
        assert mlflow.active not in mlflow.params, "MLflow refuses to log a run's parameters again"
        mlflow.params[mlflow.active] = params

    mlflow.start_run, mlflow.log_params = start_run, log_params
    mlflow.log_metrics = lambda metrics, step: mlflow.runs[mlflow.active].append((step, metrics["train/loss"]))
    mlflow.end_run = lambda: setattr(mlflow, "active", None)
    return mlflow


def run_args(tiny_dir, data_file, out, tracker) -> list[str]:
    return [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", f"output_dir={out}",
            "lora.r=4", "training.max_steps=3", "training.batch_size=4", "training.precision=fp32", "model.dtype=fp32",
            "training.save_every=1", "training.seed=3", f"training.report_to={tracker}"]


def metrics_losses(out) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_resumed_run_logs_into_the_same_tracker_run_and_a_new_run_into_a_new_one(tracker, tiny_dir, data_file,
                                                                                   tmp_path, monkeypatch):
    module = fake_wandb() if tracker == "wandb" else fake_mlflow()
    monkeypatch.setitem(__import__("sys").modules, tracker, module)
    out = tmp_path / "run"
    cfg = load_train_config(None, run_args(tiny_dir, data_file, out, tracker))
    stop_in_last_save(cfg)
    first = saved_run_id(out, tracker)
    assert first is not None and list(module.runs) == [first]

    train(cfg, resume=True, progress=False)  # from the checkpoint of step 2
    assert saved_run_id(out, tracker) == first and list(module.runs) == [first]
    logged = module.runs[first]
    if tracker == "wandb":  # step 3 again is dropped, as W&B does: each step once, as in metrics.jsonl
        assert module.inits[-1] == {"id": first, "resume": "allow"}
        assert logged == metrics_losses(out)
    else:  # MLflow appends step 3 again (the same loss: a resume recomputes exactly)
        assert [s for s, _ in logged] == [1, 2, 3, 3] and logged[2] == logged[3]
        assert list(module.params) == [first]  # logged once, by the first run
    assert [s for s, _ in metrics_losses(out)] == [1, 2, 3]

    train(cfg, overwrite=True, progress=False)  # started over: a tracker run of its own
    second = saved_run_id(out, tracker)
    assert second not in (None, first) and [s for s, _ in module.runs[second]] == [1, 2, 3]
    assert json.loads((out / RUN_IDS).read_text()) == {tracker: second}


def test_an_mlflow_run_the_store_lacks_is_named_and_a_new_one_started(tmp_path, monkeypatch, capsys):
    mlflow = fake_mlflow()
    monkeypatch.setitem(__import__("sys").modules, "mlflow", mlflow)
    (tmp_path / RUN_IDS).write_text(json.dumps({"mlflow": "gone", "wandb": "w7"}))
    tracker = open_tracker("mlflow", tmp_path, {"lora": {"r": 4}}, resume=True)
    tracker.log(3, {"train/loss": 1.5})
    assert "cannot continue run gone (Run 'gone' not found); logging to a new run" in capsys.readouterr().out
    assert mlflow.runs == {"m1": [(3, 1.5)]} and mlflow.params == {"m1": {"lora.r": "4"}}
    assert json.loads((tmp_path / RUN_IDS).read_text()) == {"mlflow": "m1", "wandb": "w7"}  # the other id kept


@pytest.mark.parametrize("content", ["", "{", "[1, 2]", '{"wandb": 5}', '{"wandb": ""}'])
def test_an_unreadable_trackers_file_means_a_new_tracker_run(content, tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", wandb)
    (tmp_path / RUN_IDS).write_text(content)
    open_tracker("wandb", tmp_path, {}, resume=True)
    assert wandb.inits == [{"id": None, "resume": None}]
    assert json.loads((tmp_path / RUN_IDS).read_text()) == {"wandb": "w1"}


@pytest.mark.parametrize("tracker,message,fix", [
    ("wandb", "No API key configured. Use `wandb login` to log in.", "run `wandb login`, or set WANDB_MODE=offline"),
    ("mlflow", "Model registry functionality is unavailable; got unsupported URI 'sqlite:///mlflow.db'",
     "set MLFLOW_TRACKING_URI to a store it can use")])
def test_a_tracker_that_cannot_start_a_run_stops_the_cli_with_one_line(tracker, message, fix, tiny_dir, data_file,
                                                                     tmp_path, monkeypatch, capsys):
    """wandb without a login, mlflow-skinny with its default sqlite store (both seen with the real packages): one
    error line naming training.report_to, the reason and the fix, exit 2, no traceback."""
    module = fake_wandb() if tracker == "wandb" else fake_mlflow()
    error = module.errors.Error if tracker == "wandb" else module.exceptions.MlflowException

    def refuse(*args, **kwargs):
        raise error(message + "\nmore detail")

    monkeypatch.setattr(module, "init" if tracker == "wandb" else "start_run", refuse)
    monkeypatch.setitem(__import__("sys").modules, tracker, module)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code = main(["train", str(cfg), *run_args(tiny_dir, data_file, tmp_path / "run", tracker)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"training.report_to: {tracker} cannot start a run ({message}); {fix}" in err
    assert "more detail" not in err and "training.report_to: none" in err


def tensorboard_steps(out) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def test_a_run_started_over_drops_the_earlier_runs_tensorboard_events_whatever_its_first_step(tiny_dir, data_file,
                                                                                              tmp_path):
    """--overwrite with training.log_every=2: the new run's first logged step is 2, and the earlier run's step 1
    (deleted only when the first step was 1) stayed beside it."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = [*run_args(tiny_dir, data_file, out, "tensorboard"), "training.save_every=0"]
    train(load_train_config(None, args), progress=False)
    assert tensorboard_steps(out) == [1, 2, 3]
    train(load_train_config(None, [*args, "training.log_every=2", "training.max_steps=4"]), overwrite=True,
          progress=False)
    assert tensorboard_steps(out) == [2, 4] == [s for s, _ in metrics_losses(out)]


def test_a_missing_tracker_package_is_refused_before_anything_loads_or_is_written(tiny_dir, data_file, tmp_path,
                                                                                  monkeypatch):
    """Found after the model and the data had loaded, it left an empty metrics.jsonl that refused the rerun."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed

    def load_tokenizer(*args, **kwargs):
        raise AssertionError("loaded before the refusal")

    monkeypatch.setattr(loop, "load_tokenizer", load_tokenizer)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(load_train_config(None, run_args(tiny_dir, data_file, out, "wandb")), progress=False)
    assert e.value.problems == ["training.report_to: wandb needs the wandb package: pip install 'loraforge[wandb]' "
                                "(or set training.report_to: none)"]
    assert not out.exists()


def test_a_tracker_that_cannot_start_leaves_no_metrics_file(tiny_dir, data_file, tmp_path, monkeypatch):
    """The empty metrics.jsonl it left made the rerun (with the tracker fixed) need --overwrite."""
    wandb = fake_wandb()

    def refuse(*args, **kwargs):
        raise wandb.errors.Error("No API key configured.")

    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = tmp_path / "run"
    with pytest.raises(ConfigError):
        train(load_train_config(None, run_args(tiny_dir, data_file, out, "wandb")), progress=False)
    assert not (out / "metrics.jsonl").exists()
    train(load_train_config(None, run_args(tiny_dir, data_file, out, "none")), progress=False)  # no --overwrite
    assert [s for s, _ in metrics_losses(out)] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["wandb", "mlflow", "tensorboard"])
def test_a_folder_named_like_the_tracker_is_not_taken_for_its_package(kind, tiny_dir, data_file, tmp_path,
                                                                      monkeypatch):
    """Under `python -m loraforge` (how the dashboard starts runs) the working directory is on sys.path: a ./wandb
    folder (wandb makes one in a project) imported as an empty namespace package, and the run failed after the model
    loaded with AttributeError: module 'wandb' has no attribute 'init'."""
    (tmp_path / "cwd" / kind).mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path / "cwd"))
    monkeypatch.delitem(sys.modules, kind, raising=False)
    real = importlib.util.find_spec(kind)
    if real is not None and not real.submodule_search_locations[0].startswith(str(tmp_path)):
        # the package is installed: it wins over the folder (a namespace package is the last resort); hide it
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: importlib.machinery.PathFinder.find_spec(name, [str(tmp_path / "cwd")]))
    with pytest.raises(ConfigError) as e:
        check_tracker(kind)
    assert e.value.problems == [f"training.report_to: {kind} needs the {kind} package: pip install "
                                f"'loraforge[{kind}]' (or set training.report_to: none)"]


def test_a_file_where_tensorboard_writes_its_events_is_refused_before_anything_loads(tiny_dir, data_file, tmp_path,
                                                                                     monkeypatch):
    """It failed after the first steps trained: [Errno 17] File exists: '<output_dir>/tensorboard'."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("notes")
    monkeypatch.setattr(loop, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before the refusal"))
    with pytest.raises(ConfigError, match=rf"training.report_to: tensorboard writes its event files in "
                                          rf"{out / 'tensorboard'}, which is a file: move that file away"):
        train(load_train_config(None, run_args(tiny_dir, data_file, out, "tensorboard")), overwrite=True,
              progress=False)
