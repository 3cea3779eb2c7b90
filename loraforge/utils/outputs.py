"""Where a command may write: the one rule every writer (merge, train, demo, forgetting) calls before any work.

- A missing or empty output folder is fine.
- A non-empty one is refused unless the user passes --overwrite; with it, the command replaces only the files
  it writes itself (merge: the checkpoint's files; train: adapter/, model/, metrics.jsonl, loss.png,
  checkpoints/step-*) and leaves every other file there alone.
- Never, not even with --overwrite: an output that is, contains or lies inside one of the command's inputs
  (merge --out = its --adapter, train output_dir = the folder of its data file, ...).
- A training output_dir holding an earlier run of its own is continued with --resume (one that finished its steps
  but not the writing of its adapter or model too: it writes it without training), or started over with
  --overwrite (its results and checkpoints are removed before the new run trains, so one stopped or killed
  leaves none of the earlier run's beside its own); without either it is refused.
- One training per output_dir at a time: the run holds a lock on `output_dir/.lock` (hold_output) from before
  these checks until it ends; a second one is refused, naming the first one's process id, and so is a merge or
  export into it (check_output), which would swap the folder under the run.
- Files a command writes into a folder before its first result (a study's task split, its partial report) are
  recorded first in WRITTEN (write_own), with the folders it trains into and the settings it runs with: a rerun of
  that command after a kill knows them as its own while they are unchanged (check_output's `command`), and a
  user's file of such a name, or one changed since, is still refused (a study compares the settings itself).

Atomic writes (temp + rename) protect against crashes, not against a wrong --out: this module is for that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from loraforge.utils.files import (OVERWRITE, SUFFIX, DiskError, atomic_file, disk_error, expand_user, holds_cwd,
                                   real_path, refused, sha256_file, temporary_prefix)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; nothing stops a second run there
    fcntl = None

LOCK = ".lock"  # output_dir/.lock, held by the run training there: not counted as content by check_output
# what a training run writes into output_dir, and whether each is a folder: one of the other kind there (a file
# named adapter) is refused before any work, not met as a traceback when the run writes it after its last step
RUN_ENTRIES = {"adapter": True, "model": True, "checkpoints": True, "metrics.jsonl": False, "loss.png": False}


RESUME = "--resume (resume=True)"  # as utils.files.OVERWRITE names --overwrite: the flag and the Python argument


class OutputError(ValueError):
    """An output location the command must not write to; the message names it and the way out."""


def _as_paths(inputs: Iterable[str | Path | None]) -> list[Path]:
    """The inputs that are paths: a string that exists on disk (a hub id or a built-in model name is not a path),
    and a Path even before it exists (the cache folder a model's conversion is about to be written to)."""
    return [expand_user(p) for p in inputs if p and (isinstance(p, Path) or expand_user(p).exists())]


def check_not_input(path: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` (existing paths only)."""
    out = expand_user(path).resolve()
    for given in _as_paths(inputs):
        src = given.resolve()
        if out == src:
            how = "is"
        elif out in src.parents:
            how = "contains"
        elif src in out.parents:
            how = "is inside"
        else:
            continue
        raise OutputError(f"{flag} {path} {how} this command's input {given}: writing there would replace it "
                          f"(--overwrite never allows that); choose another {flag}")


def check_links(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output that is, or lies below, a link to nothing (soak: "cannot write runs/a: File exists (the file
    system's answer)", where runs links to a folder on another disk that is not mounted): the link's target named,
    never created (on an unmounted disk it would be made on the disk the mount point is on)."""
    for p in (expand_user(path), *expand_user(path).parents):
        if p.is_symlink() and not p.exists():
            raise OutputError(f"{flag} {path}: {p} is a link to {os.readlink(p)}, which does not exist (a disk that "
                              f"is not mounted, or a folder moved or deleted); mount the disk or point the link at a "
                              f"folder that exists, or choose another {flag}")


def check_parents(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output below a file (`mkdir` would say only "File exists", naming the file, not the flag), or one
    that is or lies below a link to nothing (check_links)."""
    check_links(path, flag)
    for parent in expand_user(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
            return


def make_output(path: str | Path, flag: str = "--out") -> Path:
    """Create a command's output folder (and its parents); a refusal (the disk's, or a file system that takes no
    new folders there, as /proc) is one DiskError line naming `flag`."""
    out = expand_user(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = disk_error(out, e) or refused(out, e, f"choose another {flag}")
        if error is None:
            raise
        raise DiskError(f"{flag}: {error}") from None
    return out


PATH_MAX = 4096
"""The most bytes a path may have on Linux (the final NUL included), where pathconf cannot say."""
ROOM = 100
"""Bytes that the longest path a training run writes below its output folder adds to it, with room to spare:
/checkpoints/.tmp-step-0000001-abcdefgh/optimizer.safetensors is 61 (a tracker's event files are longer)."""


def published_room(path: str | Path, longest: str) -> int:
    """Bytes that the longest path a command publishing the folder `path` as a whole (files.atomic_dir: merge,
    export --to vllm) writes adds to `path`: its temporary folder beside it (`.tmp-<name>-<8 characters>`, the name
    cut to NAME_MAX) and, inside that, `longest`, the longest file name it writes there. ROOM's 100 refused a merge
    into an --out of 3,996 bytes or more, which writes up to 4,048 (soak)."""
    name = real_path(path).name
    return len(os.fsencode(temporary_prefix("tmp", name))) + SUFFIX - len(os.fsencode(name)) + len(f"/{longest}")


def beside_room(path: str | Path, names: Iterable[str]) -> int:
    """Bytes that the longest path a command writing the files `names` into the folder of the file `path` (each
    atomically: files.atomic_file's temporary `.tmp-<name>-<8 characters>` beside it first) adds to `path` (export
    --to gguf: the .gguf; gguf-lora: the .gguf and its Modelfile). Negative where all of them are shorter."""
    longest = max(max(len(os.fsencode(name)), len(os.fsencode(temporary_prefix("tmp", name))) + SUFFIX)
                  for name in names)
    return longest - len(os.fsencode(real_path(path).name))


def check_length(path: str | Path, flag: str = "--out", room: int = ROOM,
                 written: str = "the files written below it") -> None:
    """Refuse, before any work, an output folder whose path leaves no room for the paths of the files written below
    it (soak: an output_dir of 4,000 bytes was made, then the first checkpoint's file was a safetensors traceback
    "File name too long", leaving a run that blocked the next one). The path a write takes is the folder's real one
    (files.real_path: absolute, links followed). `room`: the bytes the longest of them adds (ROOM: a training
    run's; published_room: merge's, export --to vllm's; beside_room: export --to gguf's, gguf-lora's); `written`:
    what those paths are, for the message."""
    real = real_path(path)
    try:
        limit = os.pathconf(next(p for p in (real, *real.parents) if p.is_dir()), "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no answer for this file system
        limit = PATH_MAX
    size = len(os.fsencode(real))
    if limit - room <= size < limit:  # a path past the limit itself: refused where it is first used (cli.too_long)
        shown = str(path) if len(str(path)) <= 80 else f"{str(path)[:40]}...{str(path)[-30:]}"
        raise OutputError(f"{flag} {shown}: its full path is {size:,} bytes, too long for {written} "
                          f"(this system takes paths of at most {limit - 1:,} bytes); choose a shorter {flag}")


def check_output(path: str | Path, *, overwrite: bool, inputs: Iterable[str | Path | None] = (),
                 flag: str = "--out", command: str | None = None, room: int = ROOM) -> None:
    """Raise OutputError unless the command may write into `path` (a folder); call it before any loading.

    `flag` is how the user named the path (--out, output_dir) so the message points at it. `command`: the files
    this command recorded in `path` (write_own) and that are unchanged are its own, not content that needs
    --overwrite (a study killed before its first result: its rerun goes on without it). `room`: check_length's.
    """
    check_length(path, flag, room)
    check_not_input(path, inputs, flag)
    check_parents(path, flag)
    out = expand_user(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    if out.is_dir() and (pid := _training_into(out)) is not None:  # soak: merge --overwrite swapped the folder
        raise OutputError(f"another loraforge process (pid {pid}) is training into {flag} {path}; wait for it to "
                          f"end, or choose another {flag}")
    if not overwrite and out.is_dir():
        own = own_files(out, command) if command else set()
        entries = sorted(p.name for p in out.iterdir() if p.name != LOCK and p.name not in own)
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(f"{flag} {path} exists and is not empty ({shown}); pass {OVERWRITE} to write "
                              f"into it (only the files this command writes are replaced), or choose another {flag}")


WRITTEN = ".loraforge-written.json"
"""A command's record of what it writes into an output folder, made before the first of it is written:
{"command": ..., "files": {name: {"bytes": ..., "sha256": ...}}, "folders": [name, ...], "settings": {...}}; the
files' entries are those of a checkpoint's manifest.json, the folders are the runs it trains (each one's content
is train's to judge: --resume continues it), the settings what the command was run with (a study's rerun with
others is refused)."""


def _plain_name(name) -> bool:
    return isinstance(name, str) and name == Path(name).name and name not in (WRITTEN, LOCK, "", ".", "..")


def _record(out: Path, command: str) -> dict | None:
    """`command`'s record in out/WRITTEN, or None where there is none of this command's (none, another command's,
    a link, unreadable: not known to be this command's)."""
    record_file = out / WRITTEN
    if record_file.is_symlink() or not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("command") != command or not isinstance(record.get("files"), dict):
        return None
    return record


def _files_of(record: dict | None) -> dict[str, dict]:
    """The files a record (_record) holds ({name: {"bytes", "sha256"}}); {} where there is no record."""
    files = (record or {"files": {}})["files"]
    return {name: entry for name, entry in files.items() if isinstance(entry, dict) and _plain_name(name)}


def _folders_of(record: dict | None) -> list[str]:
    """The folders a record (_record) holds (the runs its command trains there)."""
    folders = (record or {}).get("folders")
    return [name for name in folders if _plain_name(name)] if isinstance(folders, list) else []


def _settings_of(record: dict | None) -> dict | None:
    settings = (record or {}).get("settings")
    return settings if isinstance(settings, dict) else None


def recorded_settings(out: str | Path, command: str) -> dict | None:
    """The settings `command` recorded in `out` (write_own's `settings`), or None where it recorded none."""
    return _settings_of(_record(expand_user(out), command))


def _unchanged(file: Path, entry: dict) -> bool:
    """Whether `file` is a plain file (not a link) with the size and SHA-256 `entry` recorded."""
    try:
        if file.is_symlink() or not file.is_file() or file.stat().st_size != entry.get("bytes"):
            return False
        return sha256_file(file) == entry.get("sha256")
    except OSError:
        return False


def own_files(out: Path, command: str) -> set[str]:
    """The names in `out` that are `command`'s own: the files it recorded in WRITTEN that are unchanged since, the
    temporaries of its atomic writes of them that a kill left (`.tmp-<name>-<8 characters>`), and WRITTEN itself
    where it is `command`'s record, and the folders it recorded (a folder, not a link: its runs, which train
    judges). A file of a recorded name that differs from the record is not (the user's now)."""
    return _own_of(out, _record(out, command))


def _own_of(out: Path, record: dict | None) -> set[str]:
    """own_files of `record`, the command's record already read from `out` (_record): write_own reads it once."""
    if record is None:
        return set()
    recorded = _files_of(record)
    own = {WRITTEN} | {name for name, entry in recorded.items() if _unchanged(out / name, entry)}
    own |= {name for name in _folders_of(record) if (out / name).is_dir() and not (out / name).is_symlink()}
    temporaries = [temporary_prefix("tmp", name) for name in (*recorded, WRITTEN)]
    for entry in out.iterdir():
        if (any(entry.name.startswith(p) and len(entry.name) == len(p) + SUFFIX for p in temporaries)
                and entry.is_file() and not entry.is_symlink()):
            own.add(entry.name)
    return own


def refuse_foreign(out: Path, names: Iterable[str], own: set[str], *, overwrite: bool, flag: str = "--out") -> None:
    """OutputError naming the files of `names` in `out` that are not in `own` (own_files: a user's file of that
    name, or one changed since the command wrote it), unless `overwrite`."""
    foreign = sorted(name for name in names if os.path.lexists(out / name) and name not in own)
    if foreign and not overwrite:
        raise OutputError(f"{flag} {out}: {', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not this "
                          f"command's own (another file of that name, or one changed since it wrote it); pass "
                          f"{OVERWRITE} to replace {'it' if len(foreign) == 1 else 'them'}, or choose another {flag}")


def write_own(out: str | Path, command: str, files: dict[str, str | bytes], *, overwrite: bool, flag: str = "--out",
              folders: Iterable[str] = (), settings: dict | None = None) -> None:
    """Write `files` ({name: text or bytes}) into the folder `out` as `command`'s own, so that a rerun of `command`
    after a kill takes them for its own (own_files, check_output's `command`): each is recorded in WRITTEN (its size
    and SHA-256) before it is written, atomically, and an earlier own file it replaces is removed first, so at every
    moment each of them is either missing or what WRITTEN says. A file of one of these names that is not
    `command`'s unchanged own (a user's) is refused unless `overwrite`: OutputError naming it, nothing written.
    `folders`: the folders the command is about to train runs into, recorded with those it recorded before;
    `settings` (JSON): what it runs with, replacing the recorded ones (None: those stay)."""
    out = expand_user(out)
    make_output(out, flag)
    data = {name: text if isinstance(text, bytes) else text.encode() for name, text in files.items()}
    new = {name: {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()} for name, raw in data.items()}
    earlier = _record(out, command)
    own = _own_of(out, earlier)
    refuse_foreign(out, (*data, WRITTEN), own, overwrite=overwrite, flag=flag)
    recorded = _files_of(earlier)
    kept = {name: entry for name, entry in recorded.items() if name in own and name not in data}
    for name in data:
        if name in own and name in recorded and recorded[name] != new[name]:
            (out / name).unlink()  # the earlier own content, about to be recorded as another: missing meanwhile
    record = {"command": command, "files": {**kept, **new},
              "folders": list(dict.fromkeys([*_folders_of(earlier), *folders]))}
    if (settings := _settings_of(earlier) if settings is None else settings) is not None:
        record["settings"] = settings
    with atomic_file(out / WRITTEN) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    for name, raw in data.items():
        if not (name in own and recorded.get(name) == new[name]):  # an unchanged own file stays as it is
            with atomic_file(out / name) as tmp:
                tmp.write_bytes(raw)


def _training_into(out: Path) -> str | None:
    """The process id a training run holding `out`'s lock (hold_output) wrote there, or None where none (or this
    process) holds it: a merge or export publishing `out` as a whole (files.atomic_dir) under a live run would swap
    the folder its next checkpoint is written into."""
    if not lock_held(out / LOCK):
        return None
    try:
        pid = (out / LOCK).read_text().strip() or "unknown"
    except OSError:  # removed as its run ended
        return None
    return None if pid == str(os.getpid()) else pid  # a run's own check (check_run_output) under its lock


def lock_held(file: Path) -> bool | None:
    """Whether a process holds the lock hold_output takes on `file` (an output_dir's .lock): tried with a shared
    lock, let go at once. A process that holds it may be this one. False where none does (the file of a killed run,
    or none); None where nothing tells (no flock: Windows, or a file system without it)."""
    if fcntl is None:
        return None
    try:
        lock = open(file)
    except OSError:  # no run has held it, or it is gone: none holds it now
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without flock: as hold_output, nothing to go by
            return None
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def check_replaceable(path: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that a command publishes as a whole (files.atomic_dir: merge,
    export --to vllm) where the current directory is it or lies inside it ('.', 'x/..'): the rename at the end fails,
    or leaves the shell in a deleted folder. Train and the studies write into theirs: '.' is fine there."""
    if how := holds_cwd(path):
        raise OutputError(f"{flag} {path} {how} the current directory, which the finished write replaces as a "
                          f"whole; give a folder inside it, e.g. {flag} {Path(path) / 'out'}")


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output (a folder or a file) whose folder takes no new file: read-only, no
    permission, a full disk. A byte is written into a temporary file where the write's own temporary goes (beside
    the output, or in the nearest folder that exists) and removed; a refusal is one DiskError line naming `flag`.
    Merge and export found out only after loading and merging the model (train's hold_output checks its own)."""
    real = real_path(path)
    where = next(p for p in real.parents if p.is_dir())  # check_parents refused a file on the way
    try:
        with tempfile.TemporaryFile(dir=where, prefix=".tmp-probe-") as probe:
            probe.write(b"\0")
            probe.flush()  # a full disk refuses the write itself
    except OSError as e:
        if error := disk_error(expand_user(path), e):
            raise DiskError(f"{flag}: {error}; fix that, or choose another {flag}") from None
        if error := refused(expand_user(path), e, f"choose another {flag}"):
            raise DiskError(f"{flag}: {error}") from None
        raise


def _last_checkpoint(root: Path) -> tuple[Path, dict] | None:
    done = sorted(d for d in root.glob("step-*") if (d / "trainer_state.json").is_file())
    return (done[-1], json.loads((done[-1] / "trainer_state.json").read_text())) if done else None


def check_run_output(path: str | Path, *, overwrite: bool, resume: bool,
                     inputs: Iterable[str | Path | None] = (), flag: str = "output_dir",
                     resume_hint: str | None = f"continue it with {RESUME}") -> list[Path]:
    """The rule for a training output_dir; returns what of an earlier run a new run started with --overwrite
    replaces: its results (adapter/, model/, metrics.jsonl, loss.png), then its checkpoints. The caller deletes
    them, in that order, before training; nothing else is deleted.

    --resume needs no permission (train itself says when there is nothing to resume). `resume_hint`: how the
    refusal of an unfinished run says to continue it; None for a command that cannot (demo takes no --resume).
    """
    if resume and overwrite:  # soak: the pair resumed, --overwrite silently ignored
        raise OutputError(f"--resume and --overwrite together: --resume continues the run in {flag} {path}, "
                          f"--overwrite starts it over; give one of them")
    check_not_input(path, inputs, flag)
    for name, folder in RUN_ENTRIES.items():
        entry = expand_user(path) / name
        if entry.exists() and entry.is_dir() != folder:
            what = "a folder" if entry.is_dir() else "a file"
            raise OutputError(f"{flag} {path}: {name} is {what}, where a run writes its {name} "
                              f"{'folder' if folder else 'file'} (--overwrite replaces only what a run wrote); "
                              f"move or delete it, or choose another {flag}")
    if resume or overwrite:
        check_run_writable(path, RESUME if resume else OVERWRITE, flag)
    if resume:
        return []
    root = expand_user(path) / "checkpoints"
    found = _last_checkpoint(root)
    if found is None:
        check_output(path, overwrite=overwrite, flag=flag)
    elif not overwrite:
        ckpt, state = found
        step, total = state.get("step"), state.get("total_steps")
        finished = step is not None and total is not None and step >= total
        result = "model" if (state.get("config") or {}).get("method") == "full" else "adapter"
        if finished and not (expand_user(path) / result).is_dir():
            # stopped or killed after its last checkpoint, before its result was written: --resume writes it
            # without training, as the uninterrupted run would have (soak: told to --overwrite, training again)
            ways = ", ".join([*(["write it with --resume (resume=True; it trains no more)"] if resume_hint else []),
                              f"start it over with {OVERWRITE}"])
            raise OutputError(f"{flag} {path} holds a run that finished its {step} steps but not the writing of its "
                              f"{result} (it was stopped after its last checkpoint); {ways}, or choose another "
                              f"{flag}")
        if finished:
            raise OutputError(f"{flag} {path} holds a finished run ({step} steps); pass {OVERWRITE} to "
                              f"train there again (replaces its {result}, metrics and checkpoints), or choose another "
                              f"{flag}")
        where = f"checkpoint {ckpt.name}" + (f", step {step} of {total}" if total is not None else "")
        ways = ", ".join([*([resume_hint] if resume_hint else []), f"start it over with {OVERWRITE}"])
        raise OutputError(f"{flag} {path} holds an unfinished run ({where}); {ways}, or choose another {flag}")
    if not overwrite:
        return []
    # results first: a kill between the two leaves a run that --resume finishes again, not a result without its run
    # (soak: a stopped --overwrite left the earlier adapter/ beside its own metrics, taken for its result)
    results = [expand_user(path) / name for name in RUN_ENTRIES if name != "checkpoints"]
    return ([p for p in results if p.exists()] + sorted(d for d in root.glob("step-*") if d.is_dir())
            + sorted(root.glob(".tmp-step-*")))  # damaged too


def check_run_writable(path: str | Path, how: str, flag: str = "output_dir") -> None:
    """Refuse, before anything loads, a run in `path` that --resume or --overwrite (`how`) would fail to write on
    after loading or training: a folder of it (checkpoints/, adapter/, a checkpoint: new files in it, old ones
    removed) or its metrics.jsonl (appended to) read-only, as a copy from a read-only share (cp -r) keeps them.
    Soak: the resume trained from the checkpoint, then ended with a PermissionError traceback on metrics.jsonl;
    with checkpoints/ read-only it would at the first checkpoint. One DiskError line naming the first and the fix."""
    out = expand_user(path)
    entries = [out / "metrics.jsonl"]
    for name, folder in RUN_ENTRIES.items():
        if folder and (out / name).is_dir():
            entries += [Path(root) for root, _, _ in os.walk(out / name)]
    locked = [p for p in entries if p.exists() and not os.access(p, os.W_OK)]
    if locked:
        more = f" (and {len(locked) - 1} more)" if len(locked) > 1 else ""
        raise DiskError(f"{flag} {path}: {locked[0].relative_to(out)} is read-only{more}, and {how} writes there (a "
                        f"copy from a read-only share keeps its modes); make the run writable (chmod -R u+w "
                        f"{path}), or choose another {flag}")


@contextlib.contextmanager
def hold_output(path: str | Path, flag: str = "output_dir") -> Iterator[None]:
    """Create `path` (a folder) if needed, check that it takes files, and hold an exclusive lock on `path/.lock`
    for the block (the file holds this process's id and is removed when the block ends, and so is the folder if
    this call made it and nothing was written into it). Another process holding it: OutputError naming its
    process id. A folder that cannot be created or written (read-only, a part of the path is a file):
    files.DiskError, one line naming it. Both before anything in `path` is read or written."""
    check_length(path, flag)
    check_links(path, flag)
    out = expand_user(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    created = not out.exists()  # a run that ends before writing anything leaves no empty folder behind
    retries = 2  # for the race below
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out, prefix=".tmp-probe-"):  # the folder takes new files
                pass
            lock = open(out / LOCK, "a+")
        except OSError as e:
            if isinstance(e, FileNotFoundError) and retries > 0:
                retries -= 1
                continue  # the run before removed its empty folder as we made it: make it again
            if error := disk_error(out, e):
                raise DiskError(f"{flag}: {error}; fix that, or choose another {flag}") from None
            if error := refused(out, e, f"choose another {flag}"):  # /proc, a name the file system does not take
                raise DiskError(f"{flag}: {error}") from None
            raise  # a path too long: the command's own line names it
        if fcntl is None:
            break
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip() or "unknown"
            lock.close()
            raise OutputError(f"another loraforge process (pid {pid}) is training into {flag} {path}; wait for it "
                              f"to end, or choose another {flag}") from None
        with contextlib.suppress(OSError):
            if os.stat(out / LOCK).st_ino == os.fstat(lock.fileno()).st_ino:
                break  # else the run before removed the file as we opened it: lock the new one
        lock.close()
    with lock:
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(out / LOCK)  # while still held: the next run locks a file of its own
                if created:
                    out.rmdir()  # only if still empty (an OSError otherwise)


__all__ = ["LOCK", "WRITTEN", "OutputError", "beside_room", "check_length", "check_links", "check_output",
           "check_not_input", "check_replaceable", "check_run_output", "check_run_writable", "check_writable",
           "hold_output", "lock_held", "own_files", "published_room", "recorded_settings", "refuse_foreign",
           "write_own"]
