"""Writing results so that a failed write leaves nothing half-written where a later command would read it.

atomic_dir(final) yields an empty temporary directory beside `final` to write into. When the block ends, the
result takes `final`'s place: the whole directory is renamed when `final` does not exist yet, otherwise each new
file replaces its namesake (other files in `final` stay). On any error the temporary directory is removed, and an
error that means the disk refused the write (full, quota, file-size limit, permission, read-only, I/O error)
comes out as DiskError: one line naming the directory, about how much it needed and how much is free.
atomic_file(path) does the same for one file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file would pass the largest file size allowed (`ulimit -f`, or the file system's limit)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EIO: "an I/O error (a failing disk or a lost network mount)",
}


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


def _free(path: Path) -> int | None:
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
    if code not in REASONS:
        return None
    sizes = [f"about {_size(need_bytes)} needed"] if need_bytes is not None else []
    if (free := _free(target)) is not None:
        sizes.append(f"{_size(free)} free there")
    text = f"cannot write {target}: {REASONS[code]}" + (f" ({', '.join(sizes)})" if sizes else "")
    if left is not None and left.exists():
        text += f"; the partial {left} could not be removed: delete it"
    error = DiskError(text)
    error.errno = code
    return error


@contextlib.contextmanager
def atomic_dir(final: str | Path, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory (`.tmp-<name>` beside `final`) that becomes `final` when the block ends.

    `need_bytes`: about how much the block writes, for the message when the disk refuses.
    """
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing
        tmp.mkdir(parents=True)
        yield tmp
        if not final.exists():
            os.replace(tmp, final)
        else:
            for entry in sorted(tmp.iterdir()):
                if entry.is_dir() and (final / entry.name).is_dir():
                    shutil.rmtree(final / entry.name)
                os.replace(entry, final / entry.name)
            tmp.rmdir()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = disk_error(final, e, need_bytes, left=tmp)
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def atomic_file(path: str | Path, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path (`.tmp-<name>` beside `path`) that replaces `path` when the block ends."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        error = disk_error(path, e, need_bytes, left=tmp)
        if error is None:
            raise
        raise error from None


__all__ = ["DiskError", "atomic_dir", "atomic_file", "disk_error"]
