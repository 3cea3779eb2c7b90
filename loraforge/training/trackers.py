"""Experiment trackers (training.report_to): every record the run writes to metrics.jsonl also goes to
TensorBoard, Weights & Biases or MLflow, under the names transformers' Trainer uses (train/loss, eval/loss, ...).

metrics.jsonl and the loss plot stay the run's own record; a tracker is a copy for the user's dashboards. Each
tracker's library is an optional extra, imported only when asked for:
    pip install 'loraforge[tensorboard]'   (or wandb, mlflow)

A run continued with --resume goes on in the same tracker run: TensorBoard's event files are in the output_dir;
the W&B and MLflow run ids are kept in `<output_dir>/trackers.json` (a run started over gets new ones).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Protocol

from loraforge.config import ConfigError
from loraforge.utils.files import atomic_file

RUN_IDS = "trackers.json"  # {"wandb": run id, "mlflow": run id} of this output_dir's run

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
# metrics.jsonl field -> tracker name
NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
         "tokens_per_s": "train/tokens_per_second", "rank_budget": "train/rank_budget", "eval_loss": "eval/loss",
         "eval_ppl": "eval/perplexity"}


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _missing(extra: str) -> ConfigError:
    return ConfigError([f"training.report_to: {extra} needs the {extra} package: pip install "
                        f"'loraforge[{extra}]' (or set training.report_to: none)"])


def _require(module: str, extra: str):
    try:
        found = importlib.import_module(module)
    except ImportError:
        raise _missing(extra) from None
    if _namespace(found.__spec__):  # a folder of that name, e.g. the working directory's ./wandb (_installed)
        raise _missing(extra)
    return found


def _namespace(spec) -> bool:
    return spec is not None and spec.origin is None and spec.submodule_search_locations is not None


def _installed(package: str) -> bool:
    """Whether `package` is importable as a package, not as a namespace package: under `python -m` the working
    directory is on sys.path, and a folder there named like the tracker (./wandb, which wandb itself makes in a
    project) imports as an empty module (soak: AttributeError "module 'wandb' has no attribute 'init'")."""
    if package in sys.modules:  # imported already (or None: blocked)
        return sys.modules[package] is not None and not _namespace(sys.modules[package].__spec__)
    spec = importlib.util.find_spec(package)
    return spec is not None and not _namespace(spec)


def check_tracker(kind: str, out_dir: str | Path | None = None) -> None:
    """ConfigError when the package of tracker `kind` is not installed, or TensorBoard's folder in `out_dir` is a
    file. Called before the model and data load (open_tracker would find either only when the first step is logged,
    minutes later); nothing is imported."""
    if kind not in TRACKERS[1:]:  # "none"; an unknown name is the config's to refuse
        return
    if not _installed(kind):  # each one's package: its name
        raise _missing(kind)
    events = Path(out_dir) / "tensorboard" if out_dir is not None and kind == "tensorboard" else None
    if events is not None and events.exists() and not events.is_dir():
        raise ConfigError([f"training.report_to: tensorboard writes its event files in {events}, which is a file: "
                           f"move that file away, or set training.report_to: none"])


class TensorBoardTracker:
    """Event files under `<output_dir>/tensorboard` (tensorboard --logdir <output_dir>/tensorboard).

    The writer opens at the first step logged. A run that is not resumed (a new one, or one started over with
    --overwrite, whatever step it logs first: training.log_every may skip step 1) first removes the event files an
    earlier run left there; a resumed one purges what was logged after its checkpoint (SummaryWriter's
    purge_step): every step shows once, as in metrics.jsonl."""

    def __init__(self, out_dir: Path, config: dict, resume: bool = False):
        _require("tensorboard", "tensorboard")
        self.dir, self.config, self.resume, self.writer = Path(out_dir) / "tensorboard", config, resume, None

    def _open(self, step: int):
        from torch.utils.tensorboard import SummaryWriter

        if not self.resume:  # a run from the start: an earlier run's events are not this run's
            for old in self.dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=step)
        self.writer.add_text("config", f"```\n{self.config}\n```", global_step=step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            self._open(step)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _run_ids(out_dir: Path) -> dict:
    try:
        ids = json.loads((Path(out_dir) / RUN_IDS).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def saved_run_id(out_dir: Path, kind: str) -> str | None:
    """The run id that trackers.json keeps for `kind` ("wandb", "mlflow"), or None (no file, unreadable, none)."""
    found = _run_ids(out_dir).get(kind)
    return found if isinstance(found, str) and found else None


def save_run_id(out_dir: Path, kind: str, run_id: str) -> None:
    """Keep `run_id` for `kind` in trackers.json (written whole or not at all), beside the other trackers' ids."""
    ids = {**_run_ids(out_dir), kind: run_id}
    with atomic_file(Path(out_dir) / RUN_IDS) as tmp:
        tmp.write_text(json.dumps(ids, indent=1) + "\n")


class WandbTracker:
    """A Weights & Biases run (project from WANDB_PROJECT, else "loraforge"), files under the output_dir. After
    --resume, the run that trackers.json names goes on (W&B's resume="allow"; steps W&B already has are dropped)."""

    def __init__(self, out_dir: Path, config: dict, resume: bool = False):
        self.wandb = _require("wandb", "wandb")
        run_id = saved_run_id(out_dir, "wandb") if resume else None
        try:
            self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "loraforge"), dir=str(out_dir),
                                       name=Path(out_dir).name, config=config, id=run_id,
                                       resume="allow" if run_id else None)
        except self.wandb.errors.Error as e:  # not logged in, no network, a bad WANDB_* setting
            raise _cannot_start("wandb", e, "run `wandb login`, or set WANDB_MODE=offline") from None
        if run_id is None:
            save_run_id(out_dir, "wandb", self.run.id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in the tracking store MLFLOW_TRACKING_URI names (else MLflow's default store). After --resume,
    the run that trackers.json names goes on; where that store has no such run, a new one starts."""

    def __init__(self, out_dir: Path, config: dict, resume: bool = False):
        self.mlflow = _require("mlflow", "mlflow")
        run_id = saved_run_id(out_dir, "mlflow") if resume else None
        if run_id is not None:
            try:
                self.mlflow.start_run(run_id=run_id)
                return  # its parameters are logged (MLflow refuses to change one)
            except self.mlflow.exceptions.MlflowException as e:
                print(f"training.report_to: mlflow: cannot continue run {run_id} ({str(e).splitlines()[0]}); "
                      f"logging to a new run")
        try:
            run = self.mlflow.start_run(run_name=Path(out_dir).name)
        except self.mlflow.exceptions.MlflowException as e:  # a store it cannot use or reach
            raise _cannot_start("mlflow", e, "set MLFLOW_TRACKING_URI to a store it can use (MLflow's docs, "
                                "Backend stores)") from None
        save_run_id(out_dir, "mlflow", run.info.run_id)
        self.mlflow.log_params({k: str(v)[:500] for k, v in _flatten(config).items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _cannot_start(kind: str, e: Exception, fix: str) -> ConfigError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ConfigError([f"training.report_to: {kind} cannot start a run ({reason}); {fix}, or set "
                        f"training.report_to: none"])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_tracker(kind: str, out_dir: Path, config: dict, resume: bool = False) -> Tracker | None:
    """The tracker `kind` names (None for "none"); ConfigError when its package is missing. resume: the run
    continues from a checkpoint, so W&B and MLflow continue the tracker run it logged to."""
    if kind == "none":
        return None
    if kind == "tensorboard":
        return TensorBoardTracker(out_dir, config, resume)  # its event files carry the run on (purge_step)
    return {"wandb": WandbTracker, "mlflow": MlflowTracker}[kind](out_dir, config, resume)


class TrackedLog:
    """metrics.jsonl (loraforge.training.report.MetricsLog) and a tracker together: every record goes to both; the
    tracker gets the numeric fields but `step`, renamed by NAMES (others as train/<field>)."""

    def __init__(self, log, tracker: Tracker | None):
        self.log, self.tracker = log, tracker

    def write(self, **record) -> None:
        self.log.write(**record)
        if self.tracker is not None:
            metrics = {NAMES.get(k, f"train/{k}"): float(v) for k, v in record.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.tracker.log(int(record["step"]), metrics)

    def close(self) -> None:
        self.log.close()
        if self.tracker is not None:
            self.tracker.close()
