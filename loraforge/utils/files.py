"""Writing results so that a failed write leaves nothing half-written where a later command would read it.

atomic_dir(final) yields an empty temporary directory beside `final` to write into, its own for each writer. When
the block ends, the result takes `final`'s place: the whole directory is renamed when `final` does not exist yet;
otherwise the files of `final` it does not replace are linked into it and the two directories are swapped in one
step (renameat2; elsewhere two renames, `final` moved aside to `.old-<name>-*` first), so a reader sees the old
set or the new one, never a mix. The writer holds a lock on its temporary directory (flock) while it works, so
one killed meanwhile (its lock gone with it) leaves a folder the next atomic_dir of the same `final` removes. On
any error the temporary directory is removed, and an
error that means the disk refused the write (full, quota, file-size limit, permission, read-only, I/O error)
comes out as DiskError: one line naming the directory, about how much it needed and how much is free.
atomic_file(path) does the same for one file. What either publishes gets the modes a plain open() or mkdir would
give (files 0o666 & ~umask, folders 0o777 & ~umask), not the temporary files' private 0600 / 0700. Both write
through a link (to its target, the link stays) and resolve '.' and '..' first (real_path): a rename onto a link
replaces the link, and '.' has no name to rename onto.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from loraforge.utils.interrupts import held_interrupts

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a killed writer's temporary folder is left to the user
    fcntl = None

REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file would pass the largest file size allowed (`ulimit -f`, or the file system's limit)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EIO: "an I/O error (a failing disk or a lost network mount)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}

ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # the reasons about space: their message says what is needed and free
SHORT_WRITE = ("the disk took only part of a write (it is full, over a quota, or the file passed the largest size "
               "allowed: `ulimit -f`)")
# numpy's tofile: "N requested and M written", an OSError with no errno; torch.save's zip writer (DCP writes
# non-tensor items with it) loses the OSError and raises RuntimeError "... unexpected pos N vs M"
SHORT_WRITES = [(OSError, re.compile(r"\d+ requested and \d+ written")),
                (RuntimeError, re.compile(r"inline_container\.cc:\d+\]? *\. unexpected pos \d+ vs \d+"))]


UNICODE_BOMS = [(codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # UTF-32 LE before UTF-16 LE:
                (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),  # FF FE starts both
                (codecs.BOM_UTF8, "UTF-8")]


def byte_order_mark(raw: bytes) -> str | None:
    """The encoding whose byte-order mark `raw` starts with (UTF-8, UTF-16, UTF-32: what Windows editors write), or
    None."""
    return next((encoding for mark, encoding in UNICODE_BOMS if raw.startswith(mark)), None)


def unexpanded_note(path: str) -> str:
    """What a missing path's message adds when it holds a '$': expand_user expands ~, never a variable."""
    return " (a config expands ~ but no environment variable)" if "$" in path else ""


def missing_note(path: str) -> str:
    """What a missing path's message adds: unexpanded_note's, or the entry on disk the user most likely meant, when
    one part of the path is there under a name that differs in its Unicode form only (NFD, as macOS writes names:
    a folder copied from a Mac, beside an "é" typed as one character) or in case only, or when the path is written
    with backslashes (Windows) and is there with '/'; "" where none is."""
    if note := unexpanded_note(path):
        return note
    if "\\" in path and (slashed := path.replace("\\", "/")) != path and expand_user(slashed).exists():
        return f" (write paths with '/': {slashed} is there; '\\' is a character of a name here, not a separator)"
    if re.match(r"[A-Za-z]:[\\/]", path):
        return " (a Windows path; give the path of the file on this machine, with '/')"
    given = expand_user(path)
    found, kinds = Path(given.anchor or "."), []
    for part in given.parts[1:] if given.anchor else given.parts:
        if part == ".." or os.path.lexists(found / part):
            found = found / part
            continue
        try:
            names = os.listdir(found)
        except OSError:
            return ""
        wanted = unicodedata.normalize("NFC", part)
        for kind, key in (("in its Unicode form (NFD, as macOS writes names: an accent stored as a character of its "
                           "own)", lambda n: n), ("in case", str.casefold)):
            if len(same := [n for n in names if key(unicodedata.normalize("NFC", n)) == key(wanted)]) == 1:
                found = found / same[0]
                kinds.append(kind)
                break
        else:
            return ""
    if not kinds:
        return ""
    fix = "give its name as it is there, or rename it"
    if any(kind.startswith("in its Unicode") for kind in kinds):
        fix += " to the composed form typed here (convmv -f utf8 -t utf8 --nfc --notest -r NAME)"
    return f" ({os.path.normpath(found)} is there: a name that differs {' and '.join(sorted(set(kinds)))} only; {fix})"


def expand_user(path: str | Path) -> Path:
    """`path` with a leading ~ or ~user expanded as a shell would; where that fails (no such user, no home
    directory) the path stays as typed, so the caller's 'no such file' names it instead of a RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


class DiskError(OSError):
    """The disk refused a write; the message names the directory, what was needed and what is free."""


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e))  # safetensors' (Rust) I/O errors carry the code in the text
    return int(found.group(1)) if found else None


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the file system that holds `path` (or its nearest existing parent); None where
    that cannot be read."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def disk_error(target: Path, e: BaseException, need_bytes: int | None = None,
               left: Path | None = None) -> DiskError | None:
    """The DiskError for `e`, raised while writing `target`; None when `e` is not the disk refusing a write.

    `left`: a temporary path of the write that could not be removed; the message names it.
    """
    code = _errno(e)
    short = code is None and any(isinstance(e, kind) and text.search(str(e)) for kind, text in SHORT_WRITES)
    reason = REASONS.get(code) or (SHORT_WRITE if short else None)
    if reason is None:
        return None
    sizes = []
    if short or code in ROOM:  # soak: "permission denied (83.6 GB free there)": room is beside the point there
        sizes = [f"about {_size(need_bytes)} needed"] if need_bytes is not None else []
        if (free := free_bytes(target)) is not None:
            sizes.append(f"{_size(free)} free there")
    text = f"cannot write {target}: {reason}" + (f" ({', '.join(sizes)})" if sizes else "")
    if left is not None and left.exists():
        text += f"; the partial {left} could not be removed: delete it"
    error = DiskError(text)
    error.errno = code
    return error


def refused(target: Path, e: BaseException, fix: str = "choose another path") -> DiskError | None:
    """The DiskError for a file system that will not create `target` (or its temporary beside it) for a reason other
    than the disk's (/proc, a path it does not take), ending with `fix`; None for other errors and for a path too
    long, which the command line names itself."""
    if not isinstance(e, OSError) or not e.strerror or e.errno == errno.ENAMETOOLONG:
        return None
    error = DiskError(f"cannot write {target}: {e.strerror} (the file system's answer); {fix}")
    error.errno = e.errno
    return error


def umask() -> int:
    """The process's file-mode creation mask: read from /proc/self/status where Linux shows it (setting it to read
    it would leave a moment in which another thread creates files under mask 0), else by setting it and putting it
    back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_modes(path: str | Path) -> None:
    """Give `path`, and everything under it when it is a folder, the mode a plain open() or mkdir would: files
    0o666 & ~umask (0o777 & ~umask for one with an execute bit), folders 0o777 & ~umask.

    What mkstemp, mkdtemp and safetensors' writer create is private (0600 / 0700) whatever the umask, so weights
    written through them could not be read by another user, or a container under another uid, while the JSON
    beside them could. Symlinks are left as they are, and so is an entry another user owns (not ours to change).
    """
    mask = umask()
    path = Path(path)
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            entries += [Path(root, name) for name in (*dirs, *files)]
    for entry in entries:
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
            continue
        full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
        if stat.S_IMODE(st.st_mode) != full & ~mask:
            with contextlib.suppress(PermissionError):
                os.chmod(entry, full & ~mask)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (a file or a folder) and the folders themselves to the disk, so a rename that
    follows never publishes data still in the page cache only (a power cut would leave it cut short)."""
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a MiB at a time (a checkpoint's manifest, outputs.WRITTEN's record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)  # the same bytes, no copy: the old set's file is only renamed away afterwards
    except OSError:
        shutil.copy2(src, dst)


def _renameat2(a: Path, b: Path, flag: int) -> bool:
    """Linux renameat2 with `flag`; False where the system or the file system has no such call."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):  # an old kernel, or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (RENAME_EXCHANGE); False where the system has no such call."""
    return _renameat2(a, b, RENAME_EXCHANGE)


AT_FDCWD, RENAME_NOREPLACE, RENAME_EXCHANGE = -100, 1, 2
# How a refusal names the permission to replace an output: the flag and the Python argument of the same function
# (train, merge, demo, the studies are called both ways; soak: train(cfg) from Python was told to "pass --overwrite")
OVERWRITE = "--overwrite (overwrite=True)"


def _another_wrote(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} was written by another command while this one worked; nothing of this one was "
                           f"kept: pass {OVERWRITE} to replace it, or choose another output")


def _replace_dir(tmp: Path, final: Path, drop: tuple[str, ...] = ()) -> None:
    """Make the complete set in `tmp` (plus the files of `final` it does not replace, but for those matching a
    pattern in `drop`) `final`, all at once."""
    for entry in final.iterdir():  # files of the old set that this write does not replace stay
        if not os.path.lexists(tmp / entry.name) and not any(entry.match(pattern) for pattern in drop):
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, tmp / entry.name)
    if _exchange(tmp, final):  # `final` is the new set, `tmp` the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # a crash here keeps it: the old set
    old = Path(tempfile.mkdtemp(prefix=temporary_prefix("old", final.name), dir=final.parent))
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


NAME_MAX = 255
"""The longest file name most file systems take, in bytes (ext4, xfs, btrfs, tmpfs; NAME_MAX on Linux)."""
SUFFIX = 8
"""Characters mkdtemp and mkstemp add after the prefix."""


def temporary_prefix(kind: str, name: str) -> str:
    """`.<kind>-<name>-`: the prefix of a temporary name beside `name`, `name` cut (at a character) so that the
    temporary name, suffix included, is no longer than NAME_MAX bytes: a name the file system takes (up to 255
    bytes) was refused for its temporary's 14 more, after the whole merge or export had run. Two names alike in
    their first 241 bytes share the prefix: a sweep for one may take the other's killed writer's leftovers."""
    room = NAME_MAX - len(f".{kind}--".encode()) - SUFFIX
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{kind}-{name}-"


# How long an empty temporary (file or folder) that no one holds must have been left before a sweep takes it for a
# killed writer's: a live writer holds none between its mkstemp/mkdtemp and its lock.
STALE_AFTER_S = 60.0


def _lock(path: Path, fd: int | None = None, wait: bool = False) -> int | None:
    """An open descriptor of `path` (a folder or a file; `fd` if given) holding an exclusive flock on it, None where
    the lock is taken or the file system has none (a given `fd` is closed then); the lock goes when the descriptor
    closes, or the process dies. `wait`: for a lock that is taken, wait for it (a writer's own new file, which
    another writer's sweep holds for a look only)."""
    if fcntl is None:
        if fd is not None:
            os.close(fd)
        return None
    try:
        fd = os.open(path, os.O_RDONLY) if fd is None else fd
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return fd
    except OSError:  # held by a live writer (EWOULDBLOCK), or no flock on this file system
        os.close(fd)
        return None


def _quiet_for(path: Path, seconds: float) -> bool:
    """Whether nothing in `path` (it, or any entry under it when a folder) changed in the last `seconds`."""
    entries = (path, *path.rglob("*")) if path.is_dir() else (path,)
    newest = max((os.lstat(p).st_mtime for p in entries), default=0.0)
    return time.time() - newest > seconds


def remove_stale_temporaries(final: Path, keep: Path | None = None) -> None:
    """Remove the temporary folders and files (`.tmp-<name>-<8 characters>`: atomic_dir's, atomic_file's) that
    killed writers of `final` left beside it: those whose lock can be taken (no live writer holds it) and that hold
    something, at once; empty ones once nothing changed in them for STALE_AFTER_S. atomic_dir's and atomic_file's
    writers lock their folder or file before they write a byte (a lock the kernel drops at their death), so a
    written one no one holds is a dead writer's (soak: a SIGKILLed merge's `.tmp-<out>-*` folder, or export --to
    gguf's partial file, stayed beside the rerun's result for a minute, up to the size of the model); an empty one
    may be a live writer's between its mkstemp/mkdtemp and its lock."""
    # mkdtemp's suffix: not `.tmp-<name>-2-...`
    own = re.compile(re.escape(temporary_prefix("tmp", final.name)) + rf"[a-z0-9_]{{{SUFFIX}}}")
    try:
        entries = list(final.parent.iterdir()) if fcntl is not None else []
    except OSError:  # a folder we may write into but not list: nothing to sweep, the write goes on
        return
    for entry in entries:
        if not own.fullmatch(entry.name) or entry == keep:
            continue
        if entry.is_symlink():  # a link to `final`'s old target that an exchange with a link left (before real_path)
            with contextlib.suppress(OSError):
                entry.unlink()
            continue
        if not entry.is_dir() and not entry.is_file():
            continue
        fd = _lock(entry)
        if fd is None:
            continue
        try:
            if entry.is_file():
                written = os.fstat(fd).st_size > 0
            else:
                with os.scandir(entry) as inside:
                    written = any(True for _ in inside)
            if written or _quiet_for(entry, STALE_AFTER_S):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        except OSError:  # gone meanwhile, or unreadable: not ours to judge
            pass
        finally:
            os.close(fd)


def real_path(path: str | Path) -> Path:
    """`path` as a rename must name it: absolute, its links followed ('.', 'x/..' and a link to a folder become the
    folder itself: a link's target is written, the link stays), ~ expanded."""
    return Path(os.path.realpath(expand_user(path)))


def holds_cwd(path: str | Path) -> str | None:
    """"is" or "holds" where the folder `path` names is, or holds, the current directory, else None: a finished
    atomic_dir renames its set onto the folder, which would leave this process, and a shell in it, in a deleted one
    ('.' itself cannot be renamed onto)."""
    try:
        cwd = Path.cwd()
    except OSError:  # the current directory is gone already
        return None
    real = real_path(path)
    return "is" if real == cwd else "holds" if real in cwd.parents else None


@contextlib.contextmanager
def atomic_dir(final: str | Path, need_bytes: int | None = None, drop: tuple[str, ...] = (),
               replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory (`.tmp-<name>-<random>` beside `final`, its own for each writer) that
    becomes `final` when the block ends: the new files and those of an existing `final` they do not replace, as
    one set (a crash leaves the old set or the new one, never a mix).

    `need_bytes`: about how much the block writes, for the message when the disk refuses. `drop`: name patterns of
    files of the old set not to keep (an older export's weight files). `replace=False`: a `final` that another
    writer filled meanwhile is not replaced: FileExistsError (the rename of a directory onto one that is not empty
    fails, so two writers racing to a new `final` cannot both win). Temporary folders of `final` that killed
    writers left are removed first (remove_stale_temporaries).
    """
    given, final = Path(final), real_path(final)  # the messages name the path as given
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"cannot write into {given}: it is a file, not a directory; give a directory path "
                                 f"(or remove the file)")
    if how := holds_cwd(final):
        raise DiskError(f"cannot write {given}: it {how} the current directory, which the finished write replaces as "
                        f"a whole; give a folder inside it, e.g. {given / 'out'}")
    tmp = lock = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with held_interrupts():  # as atomic_file's: the folder made and named together
            tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix("tmp", final.name), dir=final.parent))
        # held until the end, taken before a byte is written (waiting out another writer's sweep that looks at it):
        # a sweep by another writer of `final` leaves this folder alone, and removes it at once once written and no
        # longer held (its writer killed)
        lock = _lock(tmp, wait=True)
        for name in {final, Path(os.path.abspath(expand_user(given)))}:  # a link's own name: what it left before
            remove_stale_temporaries(name, keep=tmp)
        yield tmp
        plain_modes(tmp)  # mkdtemp's 0700, mkstemp's and safetensors' 0600 would make `final` private
        if final.exists() and replace:
            _replace_dir(tmp, final, drop)
        else:
            try:
                os.replace(tmp, final)  # onto an empty folder too
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise _another_wrote(given) from None
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        error = disk_error(given, e, need_bytes, left=tmp) or (refused(given, e) if tmp is None else None)
        if error is None:
            raise
        raise error from None
    finally:
        if lock is not None:
            os.close(lock)


@contextlib.contextmanager
def atomic_file(path: str | Path, need_bytes: int | None = None, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path (`.tmp-<name>-<random>` beside `path`, its own for each writer) that replaces `path`
    when the block ends. `replace=False`: a `path` another writer made meanwhile is left to it (FileExistsError), as
    atomic_dir's."""
    path, real = Path(path), real_path(path)  # a link is written through, as open() would: the link stays
    tmp = lock = None
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        with held_interrupts():  # Ctrl-C between mkstemp and the assignment left the file, named nowhere (soak)
            fd, name = tempfile.mkstemp(prefix=temporary_prefix("tmp", real.name), dir=real.parent)
            tmp = Path(name)
        # held until the end, taken before a byte is written: a sweep by another writer of `path` leaves this file
        # alone, and removes it at once once written and no longer held (its writer killed)
        lock = _lock(tmp, fd, wait=True)
        remove_stale_temporaries(real, keep=tmp)  # a killed export's partial .gguf, as atomic_dir's folders
        yield tmp
        plain_modes(tmp)  # mkstemp's 0600 (or a writer's own), as for a file opened for writing
        if replace:
            os.replace(tmp, real)
        else:
            try:  # in one step where renameat2 has it; elsewhere a moment remains between the look and the rename
                if not _renameat2(tmp, real, RENAME_NOREPLACE):
                    if os.path.lexists(real):
                        raise FileExistsError(errno.EEXIST, "exists")
                    os.replace(tmp, real)
            except FileExistsError:
                raise _another_wrote(path) from None
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if lock is not None:  # the partial file's space is freed when its last descriptor closes: before the message
            os.close(lock)    # measures what is free (a full disk read "0 B free there" after an export)
            lock = None
        error = disk_error(path, e, need_bytes, left=tmp) or (refused(path, e) if tmp is None else None)
        if error is None:
            raise
        raise error from None
    finally:
        if lock is not None:
            os.close(lock)


__all__ = ["DiskError", "atomic_dir", "atomic_file", "disk_error", "fsync_tree", "holds_cwd", "plain_modes",
           "real_path", "sha256_file", "umask"]
