"""The runs folder as the dashboard sees it: each run directory, its status from the files it writes, its metrics.

A run is a directory under the runs folder holding metrics.jsonl, forgetting.json or checkpoints/, or a name
that launch.py started from the page: its own files (config.yaml, launch.json, train.log) live apart, in
<runs>/.ui/<name>/, because `train` refuses a non-empty output_dir. Status, from the files alone:
- running: launch.json names a process that is alive (and no exit has been recorded);
- finished: the run wrote its adapter (adapter/adapter_config.json) or its full model (model/), or a complete
  forgetting.json, or the launched process exited 0;
- stopped: the launched process exited on SIGINT/SIGTERM (exit 130 / -2 / -15), i.e. the page's stop button;
- failed: the launched process exited otherwise, or it is gone without an exit record or a finished output;
- unknown: only metrics, nothing says how it ended (e.g. a run started in a terminal that is still going).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STOP_CODES = (130, -2, -15, 143)  # KeyboardInterrupt in the CLI, killed by SIGINT / SIGTERM


class PathError(ValueError):
    """A name from the browser that would leave its folder (traversal, absolute path, link out) or is missing."""


def inside(root: Path, name: str, must_exist: bool = True) -> Path:
    """`root/name`, resolved, refused unless it lies strictly inside `root` (no '..', no absolute path, no link out)."""
    root = Path(root).resolve()
    if not name or "\x00" in name or Path(name).is_absolute():
        raise PathError(f"{name!r}: give a path relative to {root}")
    path = (root / name).resolve()
    if path == root or not path.is_relative_to(root):
        raise PathError(f"{name!r}: outside {root}")
    if must_exist and not path.exists():
        raise PathError(f"{name!r}: not found in {root}")
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _is_train(pid: int) -> bool:
    """The process is a loraforge run (not another one that reused a dead run's id)."""
    try:
        return b"loraforge" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the id


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


UI_DIR = ".ui"


def meta_dir(root: Path, name: str) -> Path:
    """Where the page keeps a run's config.yaml, launch.json and train.log."""
    return Path(root).resolve() / UI_DIR / name


def is_run(path: Path) -> bool:
    return path.is_dir() and path.name != UI_DIR and (
        any((path / f).is_file() for f in ("metrics.jsonl", "forgetting.json")) or (path / "checkpoints").is_dir())


def status(path: Path, launch: dict | None = None) -> str:
    """running / finished / stopped / failed / unknown, from the run's files (see the module docstring)."""
    launch = launch or {}
    exit_code = launch.get("exit_code")
    if launch.get("pid") and exit_code is None and pid_alive(int(launch["pid"])) and _is_train(int(launch["pid"])):
        return "running"
    if exit_code is not None:
        return "finished" if exit_code == 0 else "stopped" if exit_code in STOP_CODES else "failed"
    if (path / "adapter" / "adapter_config.json").is_file() or (path / "model" / "config.json").is_file():
        return "finished"
    forgetting = _json(path / "forgetting.json")
    if forgetting is not None:
        return "finished" if forgetting.get("complete", True) else "unknown"
    return "failed" if launch else "unknown"


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The complete JSON lines of metrics.jsonl from byte `offset` on, and the offset after the last complete one
    (a line being written, without its newline yet, is left for the next call)."""
    try:
        with open(path / "metrics.jsonl", "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows, offset + end


def rank_pattern(path: Path) -> dict | None:
    """AdaLoRA's kept rank per module, from the saved adapter's config (None for other runs)."""
    cfg = _json(path / "adapter" / "adapter_config.json") or {}
    if cfg.get("peft_type") != "ADALORA" or not cfg.get("rank_pattern"):
        return None
    return {"init_r": cfg.get("init_r"), "target_r": cfg.get("target_r"),
            "ranks": {k: (sum(v) if isinstance(v, list) else v) for k, v in cfg["rank_pattern"].items()}}


def run_config(root: Path, path: Path) -> str | None:
    """The YAML the page launched the run with, or the config the newest checkpoint records."""
    meta = meta_dir(root, path.relative_to(root).as_posix())
    if (meta / "config.yaml").is_file():
        return (meta / "config.yaml").read_text()[:20000]
    steps = sorted((path / "checkpoints").glob("step-*/trainer_state.json"))
    if steps and (state := _json(steps[-1])) and "config" in state:
        import yaml

        return yaml.safe_dump(state["config"], sort_keys=False)
    return None


def summary(root: Path, path: Path, running: frozenset = frozenset()) -> dict:
    """`running`: names whose process this server is still waiting for (their exit is being recorded)."""
    name = path.relative_to(root).as_posix()
    launch = _json(meta_dir(root, name) / "launch.json") or {}
    files = [p for p in (path.iterdir() if path.is_dir() else ()) if p.exists()]
    return {"name": name, "status": "running" if name in running else status(path, launch), "config": run_config(root, path),
            "started": launch.get("started"), "exit_code": launch.get("exit_code"),
            "has_adapter": (path / "adapter" / "adapter_config.json").is_file(),
            "has_forgetting": (path / "forgetting.json").is_file(),
            "mtime": max((p.stat().st_mtime for p in files), default=launch.get("started") or 0)}


def list_runs(root: Path, running: frozenset = frozenset()) -> list[dict]:
    """Every run directly under `root` (and one level deeper, e.g. runs/sweep/a), newest first."""
    root = Path(root).resolve()
    if not root.is_dir():
        return []
    found = [root / p.name for p in sorted((root / UI_DIR).glob("*")) if (p / "launch.json").is_file()]
    for p in sorted(root.iterdir()):
        if is_run(p):
            found.append(p)
        elif p.is_dir() and not p.is_symlink() and p.name != UI_DIR:
            found += [q for q in sorted(p.iterdir()) if is_run(q)]
    return sorted((summary(root, p, running) for p in dict.fromkeys(found)), key=lambda s: -s["mtime"])


def forgetting(path: Path) -> dict | None:
    return _json(path / "forgetting.json")
