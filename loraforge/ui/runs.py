"""The runs folder as the dashboard sees it: each run directory, its status from the files it writes, its metrics.

A run is a directory under the runs folder holding metrics.jsonl, forgetting.json or checkpoints/, or a name
that launch.py started from the page: its own files (config.yaml, launch.json, train.log) live apart, in
<runs>/.ui/<name>/, because `train` refuses a non-empty output_dir. Status, from the files alone:
- running: launch.json names a process that is alive and is the one launched (its command line is the recorded
  argv and it started when the record says: a process that reused the id of an ended run is not), no exit recorded;
  or, with no exit recorded, a live loraforge process holds the run's output_dir lock (a run started in a terminal);
- finished: the run wrote its adapter (adapter/adapter_config.json) or its full model (model/), or a complete
  forgetting.json, or the launched process exited 0;
- stopped: the launched process exited on SIGINT/SIGTERM/SIGUSR1/SIGHUP (the CLI's 128 + signal: 130 / 143 / 138 /
  129, or killed by one before the loop caught it: -2 / -15 / -10 / -1), e.g. the page's stop button;
- failed: the launched process exited otherwise, or it is gone without an exit record or a finished output;
- unknown: only metrics, nothing says how it ended (e.g. a run started in a terminal that was killed), or its
  launch.json is damaged.
A launched run whose process ended while no server waited for it gets its exit from what it left (exit_from_log).
A launched run whose folder was deleted after it wrote it (output_deleted) is no longer listed.
A launched run whose metrics.jsonl, adapter or model changed after launch.json's recorded end was continued
elsewhere (the `loraforge train <config.yaml> --resume` the page suggests for a stopped run): the record no longer
says how it stands, the files do (continued): finished when its adapter or model is newer than that end, running
while a process holds its output_dir (the lock `train` keeps there), else unknown, as a run started in a terminal.

Every file is read only where it resolves inside its run's directory (the .ui/<name>/ files: inside the runs
folder): a link out of it, e.g. a forgetting.json pointing at a secret elsewhere, is treated as missing. list_runs
keeps each run's summary while the lstat of every file it reads is unchanged (_fingerprint), except for a run with a
link among them (checked anew each time) or whose status hangs on a process.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from loraforge.serve.errors import shown
from loraforge.training.loop import StopRequest
from loraforge.utils.outputs import LOCK, lock_held

STOP_SIGNALS = StopRequest.SIGNALS  # those the training loop stops on
STOP_CODES = tuple(code for s in STOP_SIGNALS for code in (128 + s, -s))  # the CLI's 128 + signal, or killed by it
UI_DIR = ".ui"
PROC = Path("/proc")
START_SLACK_S = 5.0  # launch.json's `started` is read just after the process started; /proc's boot time is in seconds
EXEC_WAIT_S = 1.0  # how long a just-launched process may show an empty command line (caught in exec)
MAX_LINE = 1 << 20  # a metrics.jsonl line longer than this is no row (rows are a few hundred bytes): passed over
STOPPED_LINE = re.compile(r"stopped by (SIG[A-Z0-9]+) ")  # the CLI's last line after a signal stopped train
# ... and after a second signal interrupted the step the first one asked to finish (StopRequest): 128 + the second's
INTERRUPTED_LINE = re.compile(r"interrupted by (SIG[A-Z0-9]+) after SIG[A-Z0-9]+,")


class PathError(ValueError):
    """A name from the browser that would leave its folder (traversal, absolute path, link out) or is missing."""


def inside(root: Path, name: str, must_exist: bool = True) -> Path:
    """`root/name`, resolved, refused unless it lies strictly inside `root` (no '..', no absolute path, no link out):
    `within` for a name a user typed, with errors."""
    root = Path(root).resolve()
    if not name or "\x00" in name or Path(name).is_absolute():
        raise PathError(f"{shown(name)}: give a path relative to {root}")
    try:
        found = within(root, name)
        path = None if found is None else found.resolve()
        exists = path is not None and path.exists()
    except OSError as e:  # e.g. a name too long for the file system
        raise PathError(f"{shown(name)}: {(e.strerror or str(e)).lower()} in {root}") from None
    except UnicodeError:  # soak: a lone surrogate (valid JSON as \ud800) was a 500 with two tracebacks
        raise PathError(f"{shown(name)}: contains an unpaired surrogate, which no file name holds") from None
    if path is None or path == root:
        raise PathError(f"{shown(name)}: outside {root}")
    if must_exist and not exists:
        raise PathError(f"{shown(name)}: not found in {root}")
    return path


def within(base: Path, name: str | Path) -> Path | None:
    """`base/name` if it stays inside `base`, links followed; None for a link (or '..') out of it. Cheap when
    nothing below `base` is a link, as in a run written by train: one lstat per part of `name`."""
    path = os.fspath(base)
    for piece in os.fspath(name).split(os.sep):
        path = os.path.join(path, piece)
        if piece == ".." or os.path.islink(path):
            try:
                real = Path(base, name).resolve()
            except (OSError, RuntimeError):  # a loop of links
                return None
            return real if real.is_relative_to(Path(base).resolve()) else None
    return Path(path)


def _file(base: Path, name: str | Path) -> Path | None:
    """The regular file `base/name` inside `base` (see within), or None."""
    path = within(base, name)
    try:
        return path if path is not None and path.is_file() else None
    except OSError:
        return None


def _finite(text: str) -> float | None:
    """A JSON number as a float; None for one too large for a float (1e999), as for NaN and Infinity (JSON has none)."""
    value = float(text)
    return value if math.isfinite(value) else None


def _json(path: Path | None) -> dict | None:
    """The JSON object in `path` (NaN and Infinity read as None); None when it is missing, unreadable, not JSON or
    not an object."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(), parse_constant=lambda _: None, parse_float=_finite)
    except (OSError, ValueError, RecursionError):  # RecursionError: nesting too deep for the parser
        return None
    return data if isinstance(data, dict) else None


def tail(path: Path | None, size: int) -> str | None:
    """The last `size` bytes of a file, decoded (None when it is missing), without reading the rest."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return None


def meta_dir(root: Path, name: str) -> Path:
    """Where the page keeps a run's config.yaml, launch.json and train.log."""
    return Path(root).resolve() / UI_DIR / name


def meta_file(root: Path, name: str, filename: str) -> Path | None:
    """The file <root>/.ui/<name>/<filename> (config.yaml, launch.json, train.log), if it resolves inside `root`."""
    return _file(root, Path(UI_DIR, name, filename))


def read_launch(root: Path, name: str) -> dict:
    """The run's launch.json ({} when there is none, or it is damaged); a field of the wrong type is left out."""
    record = _json(meta_file(root, name, "launch.json")) or {}
    kinds = {"pid": int, "argv": list, "started": (int, float), "exit_code": int, "ended": (int, float),
             "stop_requested": (int, float)}
    return {k: v for k, v in record.items()
            if k not in kinds or (isinstance(v, kinds[k]) and not isinstance(v, bool))}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return (PROC / str(pid) / "stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


@functools.lru_cache(maxsize=1)
def _boot_time() -> float:
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("/proc/stat has no btime")


def _start_time(pid: int) -> float:
    """When process `pid` started (seconds since the epoch): /proc/<pid>/stat's 22nd field is clock ticks after boot."""
    ticks = int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> list[bytes]:
    """Process `pid`'s command line from /proc. A process caught in exec shows an empty one: the kernel wakes the
    launching parent (and closes its close-on-exec pipes) before the new program's arguments are mapped. So an
    empty command line is read again, for up to EXEC_WAIT_S: a launched process is never a kernel thread."""
    deadline = time.monotonic() + EXEC_WAIT_S
    while True:
        args = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")[:-1]
        if args or time.monotonic() > deadline:
            return args
        time.sleep(0.005)


def launched_alive(launch: dict) -> bool:
    """The process launch.json names still runs and is the one launched: its command line is the recorded argv and
    (where /proc tells) it started at the recorded time. A process that reused the id of an ended run is not."""
    pid, argv, started = launch.get("pid"), launch.get("argv"), launch.get("started")
    if not (isinstance(pid, int) and 0 < pid < 2**31 and isinstance(argv, list) and argv):
        return False
    if launch.get("exit_code") is not None or not pid_alive(pid):
        return False
    if not PROC.is_dir():  # no /proc (macOS): ps shows the command line, space-separated
        try:
            shown = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True,
                                   timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        return shown.strip() == " ".join(map(str, argv))
    try:
        cmdline = _cmdline(pid)
        began = _start_time(pid)
    except (OSError, ValueError, IndexError):
        return False
    return (cmdline == [os.fsencode(str(a)) for a in argv] and isinstance(started, (int, float))
            and abs(began - started) < START_SLACK_S)


def output_deleted(path: Path, launch: dict) -> bool:
    """A launched run that ended after writing its folder, which is gone now (deleted): its launch record is all
    that remains. `output_written` is recorded at its exit; an older record without it counts a run that finished or
    was stopped (it wrote its folder before either), not one that failed (it may have ended before writing it)."""
    code = launch.get("exit_code")
    if code is None or path.exists():
        return False
    written = launch.get("output_written")
    return written is True or (written is None and (code == 0 or code in STOP_CODES))


def is_run(path: Path) -> bool:
    return path.is_dir() and path.name != UI_DIR and (
        any((path / f).is_file() for f in ("metrics.jsonl", "forgetting.json")) or (path / "checkpoints").is_dir())


def finished_output(path: Path) -> bool:
    """The run wrote its adapter or its full model."""
    return _file(path, "adapter/adapter_config.json") is not None or _file(path, "model/config.json") is not None


def _mtime(path: Path, name: str) -> float:
    file = _file(path, name)
    try:
        return file.stat().st_mtime if file is not None else -math.inf
    except OSError:
        return -math.inf


def continued(path: Path, launch: dict) -> bool:
    """The launched process ended, and the run's metrics.jsonl, adapter or model changed after that end was
    recorded: the run went on without the page (a `--resume` from the command line), so launch.json's exit code no
    longer says how it stands. The launched process writes its last row before it exits, and `ended` is taken after."""
    ended = launch.get("ended")
    if launch.get("exit_code") is None or not isinstance(ended, (int, float)):
        return False
    newest = max(_mtime(path, f) for f in ("metrics.jsonl", "adapter/adapter_config.json", "model/config.json"))
    return newest > ended


def writer_pid(path: Path) -> int | None:
    """The process training into the run's folder now: the one `train` names in output_dir/.lock, which it holds
    while it runs and removes when it ends (None when there is none, it has ended, or its id is another program's).
    A killed run leaves its .lock behind, and its id is soon another process's (pid_max is 32768 on many machines):
    the lock must still be held (soak: a loraforge serve that took the id of a SIGKILLed run read "running" for
    ever, and Stop said "kill <the server's id>")."""
    lock = _file(path, LOCK)
    try:
        pid = int(lock.read_text().strip()) if lock is not None else 0
    except (OSError, ValueError):
        return None
    if not 0 < pid < 2**31 or not pid_alive(pid):
        return None
    if PROC.is_dir():  # the process must be loraforge
        try:
            if b"loraforge" not in (PROC / str(pid) / "cmdline").read_bytes():
                return None
        except OSError:
            return None
    return None if lock_held(lock) is False else pid  # None: no flock to ask (Windows), the id alone tells


def status(path: Path, launch: dict | None = None) -> str:
    """running / finished / stopped / failed / unknown, from the run's files (see the module docstring)."""
    launch = launch or {}
    exit_code = launch.get("exit_code")
    if launch.get("pid") and exit_code is None and launched_alive(launch):
        return "running"
    if continued(path, launch):  # resumed elsewhere: the files say, not the page's ended process
        if max(_mtime(path, "adapter/adapter_config.json"), _mtime(path, "model/config.json")) > launch["ended"]:
            return "finished"
        return "running" if writer_pid(path) is not None else "unknown"
    if exit_code is not None:
        return "finished" if exit_code == 0 else "stopped" if exit_code in STOP_CODES else "failed"
    if writer_pid(path) is not None:  # started in a terminal: `train` holds output_dir/.lock while it runs
        return "running"
    if finished_output(path):
        return "finished"
    forgetting = _json(_file(path, "forgetting.json"))
    if forgetting is not None:
        return "finished" if forgetting.get("complete", True) else "unknown"
    return "failed" if launch.get("pid") else "unknown"


def exit_from_log(path: Path, log: Path | None) -> int:
    """The exit code `loraforge train` had, from what it left, for a run whose exit nobody recorded: its log's last
    line "stopped by SIGINT ..." or "interrupted by SIGTERM after SIGINT, ..." (128 + the number of the signal that
    ended it), "interrupted" (130) or "error: ..." (2), else its adapter or model (0), else 1 (a traceback, or killed
    outright: failed either way)."""
    lines = (tail(log, 4000) or "").strip().splitlines()
    last = lines[-1].strip() if lines else ""
    if (m := STOPPED_LINE.match(last) or INTERRUPTED_LINE.match(last)) and m[1] in signal.Signals.__members__:
        return 128 + signal.Signals[m[1]]
    if last == "interrupted":
        return 130
    if last.startswith("error: "):
        return 2
    return 0 if finished_output(path) else 1


def _usable(row) -> bool:
    """A row the charts can use: an object with a numeric step."""
    step = row.get("step") if isinstance(row, dict) else None
    return isinstance(step, (int, float)) and not isinstance(step, bool)


def _rows(lines: list[bytes]) -> list[dict]:
    """The usable rows of metrics.jsonl lines, non-finite numbers as None (an fp16 overflow logs grad_norm=inf), so
    each row is valid JSON again. The lines are parsed at once, as one array; if one of them is damaged, one by one."""
    lines = [line for line in lines if line.strip()]
    decoder = json.JSONDecoder(parse_constant=lambda _: None, parse_float=_finite)  # one per call: threads share none
    try:
        parsed = decoder.decode("[" + b",".join(lines).decode() + "]")
    except (ValueError, RecursionError):
        parsed = None
    if parsed is None or len(parsed) != len(lines):  # a damaged line (bad JSON, bad UTF-8): skip it, keep the others
        parsed = []
        for line in lines:
            try:
                parsed.append(decoder.decode(line.decode()))
            except (ValueError, RecursionError):
                continue
    return [row for row in parsed if _usable(row)]


def metrics_size(path: Path) -> int:
    """The size of the run's metrics.jsonl in bytes (0 when there is none)."""
    file = _file(path, "metrics.jsonl")
    try:
        return file.stat().st_size if file is not None else 0
    except OSError:
        return 0


def metrics_file_id(path: Path) -> str | None:
    """Which file the run's metrics.jsonl is ("device:inode"; None when there is none): a run started over in the
    same folder may delete and write it anew, and a follower's offset then points into another file."""
    file = _file(path, "metrics.jsonl")
    try:
        st = file.stat() if file is not None else None
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}" if st is not None else None


def metrics_age(path: Path) -> float:
    """Seconds since the run's metrics.jsonl last changed (infinite when there is none)."""
    file = _file(path, "metrics.jsonl")
    try:
        return max(0.0, time.time() - file.stat().st_mtime) if file is not None else math.inf
    except OSError:
        return math.inf


def read_metrics(path: Path, offset: int, limit: int) -> tuple[list[dict], int]:
    """The rows of metrics.jsonl from byte `offset` on, and the offset after the last complete line (a line being
    written, without its newline yet, is left for the next call). About `limit` bytes are read, in whole lines; a
    line longer than MAX_LINE is no row (a row is a few hundred bytes): it is passed over in pieces, never held.
    Lines that are not rows the charts can use (see _rows) are skipped; the others are all kept."""
    file = _file(path, "metrics.jsonl")
    if file is None:
        return [], offset
    try:
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
            data += f.readline(MAX_LINE) if data and not data.endswith(b"\n") else b""  # the line the limit cut
            end = data.rfind(b"\n") + 1
            if end == 0 and len(data) >= limit + MAX_LINE:  # a line longer than MAX_LINE: damage, passed over
                while chunk := f.readline(MAX_LINE):
                    if chunk.endswith(b"\n"):
                        return [], f.tell()
                return [], offset  # no newline yet: a line still being written (or cut off for good)
    except OSError:
        return [], offset
    return _rows(data[:end].splitlines()), offset + end


def rank_pattern(path: Path) -> dict | None:
    """AdaLoRA's kept rank per module, from the saved adapter's config (None for other runs)."""
    cfg = _json(_file(path, "adapter/adapter_config.json")) or {}
    pattern = cfg.get("rank_pattern")
    if cfg.get("peft_type") != "ADALORA" or not isinstance(pattern, dict) or not pattern:
        return None
    return {"init_r": cfg.get("init_r"), "target_r": cfg.get("target_r"),
            "ranks": {k: (sum(bool(x) for x in v) if isinstance(v, list) else v) for k, v in pattern.items()}}


@functools.lru_cache(maxsize=4096)
def _state_config(file: Path, mtime_ns: int, size: int) -> str | None:
    """A checkpoint's recorded config as YAML; `mtime_ns` and `size` make the cache forget a rewritten file."""
    state = _json(file)
    config = state.get("config") if state else None
    return yaml.safe_dump(config, sort_keys=False) if isinstance(config, dict) else None


def _newest_step(path: Path) -> str | None:
    """The name of the run's newest checkpoint folder that holds a trainer_state.json (None: none does, or its
    checkpoints/ was removed as it was read: `train --overwrite` starting over, where Path.glob raised and the run
    list answered 500)."""
    try:
        steps = sorted((path / "checkpoints").glob("step-*/trainer_state.json"))
    except OSError:
        return None
    return steps[-1].parent.name if steps else None


def run_config(root: Path, path: Path) -> str | None:
    """The YAML the page launched the run with, or the config the newest checkpoint records."""
    launched = meta_file(root, path.relative_to(root).as_posix(), "config.yaml")
    if launched is not None:
        return launched.read_text(errors="replace")[:20000]
    step = _newest_step(path)
    state = _file(path, f"checkpoints/{step}/trainer_state.json") if step else None
    if state is None:
        return None
    st = state.stat()
    return _state_config(state, st.st_mtime_ns, st.st_size)


def summary(root: Path, path: Path, running: frozenset = frozenset(), entries: dict | None = None) -> dict:
    """`running`: names whose process this server is still waiting for (their exit is being recorded). `entries`:
    the lstat of each entry of the run's folder (_entries), when the caller has them."""
    name = path.relative_to(root).as_posix()
    launch = read_launch(root, name)
    try:
        if entries is None:
            entries = _entries(path) if path.is_dir() else {}
            if entries is None:
                raise OSError(f"cannot list {path}")
        mtimes = [st.st_mtime for st in entries.values()]
        state = "running" if name in running else status(path, launch)
        # Stop is for the process launched from the page, alive: not a run from a terminal, nor one continued there
        ours = state == "running" and (name in running or launched_alive(launch))
        return {"name": name, "status": state, "config": run_config(root, path), "started": launch.get("started"),
                "stoppable": ours,
                # asked to stop (SIGINT), still finishing its step: the page offers "Stop now" (SIGTERM) instead
                "stopping": ours and "stop_requested" in launch,
                "exit_code": launch.get("exit_code"),
                "has_adapter": _file(path, "adapter/adapter_config.json") is not None,
                "has_forgetting": _file(path, "forgetting.json") is not None,
                "mtime": max(mtimes, default=launch.get("started") or 0)}
    except OSError:  # a run this user cannot read, or one that is being removed: listed, the others too
        return {"name": name, "status": "unknown", "config": None, "started": None, "exit_code": None,
                "stoppable": False, "stopping": False, "has_adapter": False, "has_forgetting": False, "mtime": 0}


def _entries(folder: Path) -> dict[str, os.stat_result] | None:
    """The lstat of each entry of `folder` by name (None when it is no folder or cannot be read): one listing and a
    stat per entry, where Path.is_file and within cost a stat or two per file asked about."""
    try:
        with os.scandir(folder) as listing:
            return {entry.name: entry.stat(follow_symlinks=False) for entry in listing}
    except (OSError, ValueError):
        return None


def _holds_run(path: Path, entries: dict) -> bool:
    """is_run from the folder's entries (a link among them followed, as is_run follows it)."""
    def holds(name: str, is_kind, test) -> bool:
        st = entries.get(name)
        return st is not None and (test(path / name) if stat.S_ISLNK(st.st_mode) else is_kind(st.st_mode))
    return (holds("metrics.jsonl", stat.S_ISREG, Path.is_file) or holds("forgetting.json", stat.S_ISREG, Path.is_file)
            or holds("checkpoints", stat.S_ISDIR, Path.is_dir))


def _runs_in(root: Path, folder: Path, entries: dict) -> dict[Path, dict | None]:
    """The runs directly in `folder` (whose entries are given), each with its own entries (None for a link); a link
    to a directory outside `root` is left out."""
    runs = {}
    for name in sorted(entries):
        path = folder / name
        st = entries[name]
        if name == UI_DIR or not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            continue
        if stat.S_ISLNK(st.st_mode) and within(root, path.relative_to(root)) is None:
            continue
        held = _entries(path)
        if held is not None and _holds_run(path, held):
            runs[path] = None if stat.S_ISLNK(st.st_mode) else held  # a linked run: read anew every time
    return runs


def _ids(folder: Path, stats) -> tuple | None:
    """(name, inode, mode, size, mtime) of each (name, lstat or None: stat it now) in `folder`, a missing file left
    out; None when one of them is a link."""
    out = []
    for name, st in stats:
        if st is None:
            try:
                st = os.lstat(folder / name)
            except OSError:
                continue
        if stat.S_ISLNK(st.st_mode):
            return None
        out.append((name, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _fingerprint(root: Path, path: Path, entries: dict, meta: os.stat_result | None, step: str | None) -> tuple | None:
    """What a run's summary reads: its folder's entries, its .ui/<name>/ folder (`meta`: that folder's lstat) and
    files, the adapter's and model's config and the newest checkpoint's trainer_state.json (`step`; a new step
    changes checkpoints/, an entry). A file written, replaced, removed or appended to changes it. None where a link
    is among them: `within` follows a link, so such a run is read anew every time, as before."""
    deep = [name for name, top in (("adapter/adapter_config.json", "adapter"), ("model/config.json", "model"),
                                   (f"checkpoints/{step}", "checkpoints"),
                                   (f"checkpoints/{step}/trainer_state.json", "checkpoints"))
            if top in entries and (top != "checkpoints" or step)]
    parts = [_ids(path, entries.items()), _ids(path, ((name, None) for name in deep))]
    if meta is not None:
        folder = root / UI_DIR / path.relative_to(root).as_posix()
        parts += [_ids(folder.parent, [(folder.name, meta)]), _ids(folder, (_entries(folder) or {}).items())]
    return None if None in parts else tuple(parts)


_SUMMARIES: dict[Path, tuple] = {}  # run path -> (fingerprint, newest step, summary): list_runs's last answer
_SUMMARIES_LOCK = threading.Lock()


def _cached_summary(root: Path, path: Path, running: frozenset, entries: dict, meta: os.stat_result | None,
                    cache: dict) -> dict:
    """summary(), kept in `cache` while its fingerprint holds: the page asks for every run every few seconds, and
    reading each anew costs a dozen file checks. A run whose status hangs on a process is read anew every time: one
    this server waits for, one holding its output_dir lock, one launched from the page with no exit recorded."""
    name = path.relative_to(root).as_posix()
    with _SUMMARIES_LOCK:
        known = _SUMMARIES.get(path)
    if known is not None and name not in running and _fingerprint(root, path, entries, meta, known[1]) == known[0]:
        cache[path] = known
        return known[2]
    step = _newest_step(path) if "checkpoints" in entries else None
    fingerprint = _fingerprint(root, path, entries, meta, step)
    result = summary(root, path, running, entries)
    live = name in running or LOCK in entries or (meta is not None and result["exit_code"] is None)
    if fingerprint is not None and not live:
        cache[path] = (fingerprint, step, result)
    return result


_PASSED_OVER: set[str] = set()  # names already reported by listable()


def listable(names, where: str, addressed: bool = False) -> list:
    """The names (str or Path) that JSON can carry: one whose bytes are not UTF-8 (a folder copied from a Latin-1
    system) is read by Python with lone surrogates, which no answer can encode; it is left out, said once in the
    server's log, instead of failing the whole list. `addressed`: names that go into the page's addresses
    (runs/NAME/events), whose route pattern stops at a line break: a name holding one is left out too."""
    kept = []
    for name in names:
        text = str(name)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            why = "its name is not UTF-8"
        else:
            breaks = addressed and "\n" in text
            why = "its name has a line break, which the page's addresses cannot carry" if breaks else None
        if why is None:
            kept.append(name)
        elif text not in _PASSED_OVER:
            _PASSED_OVER.add(text)
            print(f"ui: {where}: {os.fsencode(text)!r} is left out: {why}; rename it", file=sys.stderr, flush=True)
    return kept


def list_runs(root: Path, running: frozenset = frozenset()) -> list[dict]:
    """Every run directly under `root` (and one level deeper, e.g. runs/sweep/a), newest first; a run whose path is
    not UTF-8 or holds a line break is left out (listable). Each folder is listed once (os.scandir) and a run's
    summary is kept while the files it reads are unchanged (_cached_summary)."""
    global _SUMMARIES
    root = Path(root).resolve()
    top = _entries(root)
    if top is None:
        return []
    metas = _entries(root / UI_DIR) or {}
    found = {root / name: None for name in sorted(metas) if not name.startswith(".")  # page runs that failed
             # before their folder (a glob's "*": no hidden names)
             if meta_file(root, name, "launch.json") is not None and within(root, name) is not None
             and not output_deleted(root / name, read_launch(root, name))}
    runs = _runs_in(root, root, top)
    found.update(runs)
    for name in sorted(top):
        path = root / name
        if stat.S_ISDIR(top[name].st_mode) and name != UI_DIR and path not in runs:
            found.update(_runs_in(root, path, _entries(path) or {}))
    cache: dict[Path, tuple] = {}
    summaries = []
    for path in listable(found, "runs", addressed=True):
        entries = found[path]
        if entries is None:
            summaries.append(summary(root, path, running))
            continue
        name = path.relative_to(root).as_posix()
        first = metas.get(name.split("/")[0])  # .ui/<name>, or .ui/<sweep> of .ui/<sweep>/<name>
        # .ui or .ui/<sweep> a link: within follows it, so the run's files are checked anew every time
        linked = stat.S_ISLNK(top[UI_DIR].st_mode) if UI_DIR in top else False
        linked = linked or ("/" in name and first is not None and stat.S_ISLNK(first.st_mode))
        meta = first if "/" not in name else _lstat(root / UI_DIR / name) if first is not None else None
        summaries.append(summary(root, path, running, entries) if linked else
                         _cached_summary(root, path, running, entries, meta, cache))
    with _SUMMARIES_LOCK:
        _SUMMARIES = cache  # only the runs listed now: a deleted run's summary goes
    return sorted(summaries, key=lambda s: -s["mtime"])


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def adapter_files(path: Path) -> list[Path]:
    """The files of the run's adapter directory ([] when it has none, or it lies outside the run); links left out."""
    adapter = within(path, "adapter")
    if adapter is None or _file(path, "adapter/adapter_config.json") is None:
        return []
    return [f for f in sorted(adapter.iterdir()) if f.is_file() and not f.is_symlink()]


def forgetting(path: Path) -> dict | None:
    return _json(_file(path, "forgetting.json"))
