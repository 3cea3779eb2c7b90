"""Start and stop `python -m loraforge train` from the page, as a separate process that outlives the page.

The form's fields become a config dict that goes through the same validation as the CLI
(`load_train_config`), so a bad value is refused with the CLI's own message, and so are target_modules that name no
layer of the model (check_targets: the model built on the meta device), before anything starts; the dict is written as
<runs>/.ui/<name>/config.yaml and the run is `python -m loraforge train that.yaml` (an argv list, never a shell),
in its own session so that closing the page, or Ctrl-C on the server, does not stop it.

Stop sends SIGINT, once: train finishes the step it is in, saves a checkpoint of it and the CLI exits 130 (128 + the
signal's number), however long that step and its checkpoint take; a second Stop sends nothing, because train takes a
second signal as "interrupt at once". Only "Stop now" (stop with force, for a run already asked to stop) sends
SIGTERM, which interrupts the step: the CLI exits 143 and the last complete checkpoint is kept (checkpoints are
written to a temporary directory and renamed). Either way the run continues with `loraforge train <config.yaml>
--resume`; launch.json records the first request ("stop_requested"), so a restarted server knows it too. Only the
process launched for the run is signalled: one this launcher holds, or, after a server restart, the process
launch.json names if its command line and start time are still the recorded ones (runs.launched_alive); never a
process that reused the id. A launched run whose process ended while no launcher waited for it gets its exit
recorded from what it left (settle), so it reads stopped or finished, not failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from loraforge.config import MAX_RANK, ConfigError, TrainConfig, load_train_config
from loraforge.lora.adalora import AdaLoraConfig
from loraforge.lora.inject import find_targets
from loraforge.models import model_skeleton
from loraforge.serve.errors import shown
from loraforge.training.loop import adapter_section, in_section
from loraforge.ui.runs import (UI_DIR, PathError, exit_from_log, inside, is_run, launched_alive, meta_dir,
                               meta_file, output_deleted, read_launch, tail)
from loraforge.utils.files import DiskError, disk_error, refused

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
METHODS = ("lora", "qlora", "dora", "adalora", "full")
REGEX_CHARS = frozenset("*+?()[]{}|^$\\")  # a target_modules value holding one is a regex, not names
# the record files `loraforge train` reads (training.data.read_records); not .txt, which it also reads, since a data
# folder's .txt files are mostly notes, licences and requirements, not training text
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SKIPPED_DIRS = ("node_modules", "__pycache__")  # never datasets; hidden folders and the runs folder are skipped too


def _scalar(key: str, value):
    """A form value as the CLI reads `key=value`: parsed as YAML (so '8' is 8, '2e-4' a float, '' None); a value
    that is not YAML raises the CLI's own ConfigError for the override `key=value`."""
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # an integer of more than 4,300 digits; [ nested 1,000 deep
        load_train_config(None, [f"{key}={value}"])  # the CLI's override parser: raises its message for this value
        raise
    return parsed if isinstance(parsed, (int, float, str, bool)) or parsed is None else value


def form_targets(value) -> str | list[str] | None:
    """The form's target_modules as lora.target_modules takes it (docs/REFERENCE.md): "all-linear", or a regex
    that must match the whole module path (a value holding one of * + ? ( ) [ ] { } | ^ $ \\, kept whole, commas
    included), as a string; otherwise module names separated by commas, as a list; None when empty (the
    architecture's default)."""
    text = str(value or "").strip()
    if not text:
        return None
    if text == "all-linear" or REGEX_CHARS.intersection(text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def adalora_ranks(r) -> dict:
    """The adalora: section for the form's r with method adalora: target_r r, init_r the larger of AdaLoRA's
    default 12 and 1.5 r. r 8 gives PEFT's defaults (init_r 12, target_r 8); a larger r keeps their ratio, each
    layer starting with half as many ranks again as the average it is pruned to."""
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= MAX_RANK:
        raise ConfigError([f"adalora.target_r: the form's r is the rank AdaLoRA prunes to with method adalora; use a "
                           f"whole number from 1 to {MAX_RANK} (e.g. 8), got {r!r}"])
    return {"init_r": max(AdaLoraConfig.init_r, min(MAX_RANK, r * 3 // 2)), "target_r": r}


def offered(data_dir: Path, runs_dir: Path, path: Path) -> bool:
    """Whether `path` (resolved, under `data_dir`; both folders resolved) is a dataset the form offers: a
    DATA_SUFFIXES file, neither it nor a folder it lies in hidden or one of SKIPPED_DIRS, not in the runs folder nor
    in a run's folder of another runs folder (its adapter_config.json, manifest.json, trainer_state.json)."""
    return (not any(p.startswith(".") or p in SKIPPED_DIRS for p in path.relative_to(data_dir).parts)
            and path.suffix.lower() in DATA_SUFFIXES and not path.is_relative_to(runs_dir) and path.is_file()
            and not any(is_run(folder) for folder in path.parents if folder.is_relative_to(data_dir)
                        and folder != data_dir))  # docs soak: another runs folder's JSON files were offered


def dataset_path(data_dir: Path, runs_dir: Path, given: str) -> Path:
    """The form's dataset, resolved, if `offered` (what app.dataset_files lists); PathError else. Soak: any file
    under data_dir was taken (.env, .aws/credentials.txt): the run's log showed the page their fields, and a run on
    one learnt it into an adapter the page downloads."""
    data_dir, runs_dir = Path(data_dir).resolve(), Path(runs_dir).resolve()
    path = inside(data_dir, given)
    if not offered(data_dir, runs_dir, path):
        raise PathError(f"dataset {given!r}: not a dataset the form offers; give one of the {', '.join(DATA_SUFFIXES)} "
                        f"files in {data_dir}, outside hidden folders and the runs folder")
    return path


def form_config(form: dict, runs_dir: Path, data_dir: Path, models: dict[str, str]) -> tuple[str, dict]:
    """The run name and the config dict for a form; raises PathError for a name or path outside its folder.

    `models` maps the names the page offers to what model.name gets (a directory or built-in name). The method
    `dora` is LoRA with lora.use_dora, as in the CLI's configs; with `adalora` the form's r sets adalora.target_r
    and adalora.init_r (adalora_ranks), not lora.r.
    """
    name = form.get("name", "")
    if not isinstance(name, str) or not NAME.fullmatch(name):  # soak: "nl\n" and null (as "None") were runs
        # soak: a 10,000-character name came back whole; cut as the server's errors cut what a client sent
        raise PathError(f"run name {shown(name)}: use letters, digits, '.', '_' or '-' (up to 64, not starting with "
                        f"'.')")
    model = str(form.get("model", ""))
    if model not in models:
        raise PathError(f"model {shown(model)}: choose one of {', '.join(models)}")
    dataset = dataset_path(data_dir, runs_dir, str(form.get("dataset", "")))
    method = str(form.get("method", "lora"))
    targets = form_targets(form.get("target_modules"))  # soak: "all-linear" became ['all-linear'], a name
    # AdaLoRA has no use for lora.r (warned about, unused): the form's r sets its ranks instead
    ranks = {"adalora": adalora_ranks(_scalar("adalora.target_r", form.get("r", "8")))} if method == "adalora" else {}
    lora = {} if ranks else {"r": _scalar("lora.r", form.get("r", "8"))}
    lora["lora_alpha"] = _scalar("lora.lora_alpha", form.get("lora_alpha", "16"))
    if targets:
        lora["target_modules"] = targets
    if method == "dora":
        method, lora["use_dora"] = "lora", True
    training = {key: _scalar(f"training.{key}", form.get(key, default))
                for key, default in (("lr", "2e-4"), ("max_steps", "100"), ("save_every", "10"))}
    for key in ("batch_size", "log_every"):
        if str(form.get(key, "")).strip():
            training[key] = _scalar(f"training.{key}", form[key])
    data = {"train": str(dataset)}
    if str(form.get("max_seq_len", "")).strip():  # soak: long examples could only be truncated at 512 tokens
        data["max_seq_len"] = _scalar("data.max_seq_len", form["max_seq_len"])
    config = {"model": {"name": models[model]}, "method": method, "lora": lora, **ranks,
              "data": data, "training": training,
              "output_dir": str(inside(runs_dir, name, must_exist=False))}
    return name, config


def validate(config: dict) -> None:
    """The CLI's validation of this config, then its target_modules against the model's layers (check_targets);
    raises ConfigError with the CLI's message."""
    check_targets(load_train_config(None, [], base=config))


def check_targets(cfg: TrainConfig) -> None:
    """The run's target_modules (with exclude_modules, layers_to_transform, modules_to_save) against the model's
    layers before the run starts: the model built from its config on the meta device (no weights read), as
    `estimate` does, refused with the message the run gives once its model has loaded (soak: the page started the
    run, which said so in its log only then). A model that cannot be built from its config alone (not downloaded,
    an unknown model_type) is left to the run."""
    if cfg.method == "full":
        return
    try:
        skeleton = model_skeleton(cfg.model.name)
    except Exception:  # noqa: BLE001 -- the run names what is wrong with the model as it loads
        return
    # adalora: the run's own total_step comes with its step count; any will do for the targets
    config = (AdaLoraConfig.from_train_config(cfg.lora, {**cfg.adalora, "total_step": 10**9})
              if cfg.method == "adalora" else cfg.lora)
    with in_section(*adapter_section(cfg)):
        find_targets(skeleton, config, advise=False)


class Launcher:
    """Runs started from the page: start(), stop(); a thread per run records its exit code in launch.json."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir).resolve()
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.starting = threading.Lock()  # one start at a time: a name is checked and taken at once
        self.stopping = threading.Lock()  # one stop at a time: a run asked once is never sent a second SIGINT

    def start(self, name: str, config: dict) -> dict:
        validate(config)
        out, meta = Path(config["output_dir"]), meta_dir(self.runs_dir, name)
        with self.starting:
            if out.exists() or meta.exists():
                raise FileExistsError(self._taken(name, out, meta))
            try:
                meta.mkdir(parents=True)
            except FileExistsError:  # taken meanwhile by another process (a second dashboard on these runs)
                raise FileExistsError(f"run {name!r} exists already in {self.runs_dir}; choose another name") from None
            except OSError as e:
                raise self._unwritable(meta, e) from None
            argv = [sys.executable, "-m", "loraforge", "train", str(meta / "config.yaml")]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                (meta / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                with open(meta / "train.log", "wb") as log:
                    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, cwd=self.runs_dir, start_new_session=True)  # outlives the page
            except OSError as e:  # nothing started: the record goes, so the name stays free (soak: an empty
                shutil.rmtree(meta, ignore_errors=True)  # config.yaml of a full disk held it, "see its train.log")
                raise self._unwritable(meta, e) from None
            record = {"pid": proc.pid, "argv": argv, "started": time.time(), "exit_code": None}
            with self.lock:  # settle() sees the run as this launcher's from its first record on
                self._write(name, record)
                self.procs[name] = proc
        threading.Thread(target=self._wait, args=(name, proc, record), daemon=True).start()
        return record

    def _unwritable(self, meta: Path, e: OSError) -> OSError:
        """The DiskError for a run's record that the runs folder did not take (read-only, full: it was an internal
        error, a traceback in the server's log), naming the fix; `e` itself where it is not the disk's refusal."""
        fix = "fix that, or start the dashboard with --runs naming a folder it may write"
        if error := disk_error(meta, e):
            return DiskError(f"{error}; {fix}")
        return refused(meta, e, fix) or e

    def _taken(self, name: str, out: Path, meta: Path) -> str:
        """Why a run name cannot be started again, naming what holds it and what to do instead."""
        if self.alive(name):
            return f"run {name!r} exists already in {self.runs_dir} and is running; choose another name"
        if out.exists():
            last = ((tail(meta_file(self.runs_dir, name, "train.log"), 4000) or "").strip().splitlines() or [""])[-1]
            if last.endswith("continue with --resume"):  # the CLI's last line after a stop that kept a checkpoint
                return (f"run {name!r} exists already in {self.runs_dir}, stopped with a checkpoint; choose another "
                        f"name, or continue it with: loraforge train {meta / 'config.yaml'} --resume")
            return f"run {name!r} exists already in {self.runs_dir}; choose another name"
        if output_deleted(out, read_launch(self.runs_dir, name)):  # soak: said "ended before writing" of it
            return (f"run {name!r}: {out} was deleted, but its launch record {meta} remains; delete {meta} to use "
                    f"the name again, or choose another name")
        return (f"run {name!r}: {meta} exists already, from a start on the page that ended before writing {out} "
                f"(see its train.log); choose another name, or delete {meta}")

    def running(self) -> frozenset:
        """Runs this launcher started whose exit is not recorded yet (a process that just ended counts until its
        exit code is in launch.json, so the status never reads 'failed' in between)."""
        with self.lock:
            return frozenset(self.procs)

    def _write(self, name: str, record: dict) -> None:
        path = meta_dir(self.runs_dir, name) / "launch.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def _wait(self, name: str, proc: subprocess.Popen, record: dict) -> None:
        """Record the run's exit, then let it go (procs): always, or the run would read "running" until the server
        restarts. Its .ui/<name>/ folder deleted meanwhile is made again while the run's output folder exists (the
        exit record says how it ended); deleted with the run, nothing is written."""
        try:
            record["exit_code"] = proc.wait()
            record["ended"] = time.time()
            with self.lock:
                asked = read_launch(self.runs_dir, name).get("stop_requested")  # written by stop() meanwhile: kept
                if (self.runs_dir / name).is_dir():
                    meta_dir(self.runs_dir, name).mkdir(parents=True, exist_ok=True)
                if meta_dir(self.runs_dir, name).is_dir():  # output_written: see runs.output_deleted
                    self._write(name, {**record, "output_written": (self.runs_dir / name).is_dir(),
                                       **({"stop_requested": asked} if asked is not None else {})})
        except OSError as e:  # e.g. the folder deleted again between the check and the write
            print(f"ui: run {name!r} ended with exit code {record.get('exit_code')}, unrecorded: {e}",
                  file=sys.stderr, flush=True)
        finally:
            with self.lock:
                self.procs.pop(name, None)

    def settle(self, name: str) -> None:
        """Record the exit of a launched run whose process ended while no launcher waited for it (the server was
        restarted meanwhile), as its log and outputs tell (runs.exit_from_log), marked "exit_code_from": "train.log"."""
        with self.lock:
            if name in self.procs:
                return
            record = read_launch(self.runs_dir, name)
            if not record.get("pid") or record.get("exit_code") is not None or launched_alive(record):
                return
            code = exit_from_log(self.runs_dir / name, meta_file(self.runs_dir, name, "train.log"))
            self._write(name, {**record, "exit_code": code, "ended": time.time(), "exit_code_from": "train.log",
                               "output_written": (self.runs_dir / name).is_dir()})

    def settle_all(self) -> None:
        for meta in sorted((self.runs_dir / UI_DIR).glob("*/launch.json")):
            self.settle(meta.parent.name)

    def alive(self, name: str) -> bool:
        """The process launched for the run still runs (never a process that reused its id)."""
        with self.lock:
            proc = self.procs.get(name)
        if proc is not None:  # ours: not reaped while it runs, so its id cannot be reused
            return proc.poll() is None
        return launched_alive(read_launch(self.runs_dir, name))

    def _signal(self, name: str, sig: int) -> bool:
        with self.lock:
            proc = self.procs.get(name)
        if proc is not None:
            if proc.poll() is not None:
                return False
            proc.send_signal(sig)
            return True
        record = read_launch(self.runs_dir, name)
        if not launched_alive(record):
            return False
        try:
            os.kill(record["pid"], sig)
        except ProcessLookupError:
            return False
        return True

    def stop_requested(self, name: str) -> bool:
        """The run was asked to stop (SIGINT sent) by this launcher or an earlier server's."""
        return "stop_requested" in read_launch(self.runs_dir, name)

    def stop(self, name: str, force: bool = False) -> bool:
        """SIGINT to a running run, the first time: it finishes its step, checkpoints it and exits 130, however long
        that takes. Never a timed SIGTERM: train takes a second signal as "interrupt at once", which loses the step.
        Asked again, it sends nothing, unless `force`: then SIGTERM, which interrupts the step (the last complete
        checkpoint stays). False when the run's process is not running (ended, or its id now belongs to another
        process), `force` or not; ValueError for `force` on a running run not asked to stop yet (the page offers
        "Stop now" only then)."""
        with self.stopping:  # two Stops at once send one SIGINT, not two (which would interrupt the step)
            if not self.stop_requested(name):
                if force and not self.alive(name):  # soak: an ended run's "Stop now" said "stop it first"
                    return False
                if force:
                    raise ValueError(f"run {name!r} has not been asked to stop: stop it first (it finishes its step "
                                     f"and keeps a checkpoint of it); force is for a run whose stop takes too long")
                if not self._signal(name, signal.SIGINT):
                    return False
                with self.lock:
                    self._write(name, {**read_launch(self.runs_dir, name), "stop_requested": time.time()})
                return True
            return self._signal(name, signal.SIGTERM) if force else self.alive(name)

    def shutdown(self) -> None:
        """Nothing to do: the runs go on without the server (the next server records their exit: settle)."""
