"""What a run shows the user: a progress bar, metrics as JSON lines, a loss-curve PNG, peak memory."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch

from loraforge.utils.files import atomic_file, disk_error
from loraforge.utils.streams import LOG_INTERVAL_S


def finite_or_none(value):
    """`value` with every float that is not finite (inf, nan) replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, **kwargs) -> str:
    """json.dumps of `value` as strict JSON, which every reader takes: an inf or nan (a perplexity past exp(709),
    fp16's grad_norm on a skipped step) is written as null, not Python's `Infinity`/`NaN`. kwargs: json.dumps's."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a crash loses at most the line being written (and
    appending drops such a cut-off line first). A line the disk refuses raises files.DiskError, and the part of it
    the disk took is cut off again. Strict JSON: a value that is not a finite number (fp16's grad_norm on a skipped
    step is inf) is written as null, which every JSON reader (the dashboard's browser, jq, pandas) takes, where
    Python's `Infinity` is refused.

    `until_step` (appending after a resume from that step): rows of later steps, logged before the crash by the run
    that is resumed, are dropped, so the steps it does again are not in the file twice."""

    def __init__(self, path: Path, append: bool = False, until_step: int | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        if append and path.is_file():
            _drop_partial_line(path)
            if until_step is not None:
                _drop_rows_after(path, until_step)
        self.path = path
        # unbuffered: a line the disk refuses is not held for close() to write again (soak: a second traceback
        # after the one-line DiskError of a full disk)
        self.file = open(path, "ab" if append else "wb", buffering=0)

    def write(self, **record) -> None:
        line, end = (strict_json(record) + "\n").encode(), self.file.tell()
        try:
            done = 0
            while done < len(line):  # a raw write may take part of the line
                done += self.file.write(line[done:])
        except OSError as e:
            self.file.truncate(end)  # the part the disk took goes: the file stays whole lines, as readers need
            error = disk_error(self.path, e)
            if error is None:
                raise
            raise error from None

    def close(self) -> None:
        self.file.close()


TAIL_BLOCK = 1 << 16  # bytes read at a time from the end of metrics.jsonl when a resume cuts its tail


def _lines_backward(f, end: int):
    """(offset, line) of each line of the binary file `f` before byte `end`, the last first (no newline): read a
    block at a time from the end, so a caller that stops early never reads the rest."""
    pos, rest = end, b""
    while pos > 0:
        start = max(0, pos - TAIL_BLOCK)
        f.seek(start)
        chunk = f.read(pos - start) + rest
        pieces = chunk.split(b"\n")
        begin = start + len(chunk)
        for i in range(len(pieces) - 1, 0 if start > 0 else -1, -1):  # pieces[0]: a line's end, unless at 0
            begin -= len(pieces[i]) + (1 if i < len(pieces) - 1 else 0)
            yield begin, pieces[i]
        pos, rest = start, pieces[0]


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a crash left without its newline (only the file's end is read)."""
    with open(path, "rb+") as f:
        end = f.seek(0, 2)
        f.seek(max(0, end - 1))
        if end and f.read(1) != b"\n":
            f.truncate(next(_lines_backward(f, end))[0])


def _drop_rows_after(path: Path, step: int) -> None:
    """Cut from `path` the rows whose "step" is past `step`, in place (one truncate, which leaves the earlier rows
    whatever stops the process); untouched when there are none. Rows are in step order, so only the rows past
    `step` and one more are read: soak, every resume parsed the whole file (a 200,000-step run's 38 MB: 9 s on a
    busy 2-core machine) and wrote it again whole, which a disk short of its size refused."""
    with open(path, "rb+") as f:
        end = keep = f.seek(0, 2)
        for begin, line in _lines_backward(f, end):
            if line.strip() and json.loads(line).get("step", 0) <= step:
                break
            keep = begin
        if keep < end:
            f.truncate(keep)


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train", unit: str = "step",
                 delay: float = 0.0):
    """tqdm on stderr. Redrawn at most every 0.1 s on a terminal or in a notebook (Jupyter's kernel shows a `\r`
    redraw in place); elsewhere every LOG_INTERVAL_S (and at its end): soak, `train ... 2> train.log` kept a `\r`
    redraw of every step (metrics.jsonl keeps each step's numbers).
    Callers set the postfix with refresh=False, or each step would redraw past the interval. `delay`: shown only
    once that many seconds have passed (a quick task prints nothing)."""
    from tqdm.auto import tqdm

    live = _isatty(sys.stderr) or _in_notebook(sys.stderr)
    interval = {} if live else {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S}
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit, dynamic_ncols=True,
                file=sys.stderr, delay=delay, **interval)


def _in_notebook(stream) -> bool:
    """A Jupyter kernel's output stream (ipykernel's OutStream, no terminal): the notebook redraws a bar in place, so
    it is drawn as on a terminal (soak: every LOG_INTERVAL_S, a notebook's bar stood still for 30 s at a time)."""
    return type(stream).__module__.startswith("ipykernel.")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no such method, or closed
        return False


def peak_memory_name(device_type: str) -> str:
    """What peak_memory_mb measures on this kind of device, for a line that prints it."""
    return "peak GPU memory (max allocated)" if device_type == "cuda" else "peak memory (RSS)"


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Count peak_memory_mb from now on: a run's own peak, not the process's. In a notebook the kernel lives on, and
    a train() after a cell that held a bigger model reported that cell's peak (test_train: 1,017 MB for a run that
    peaked at 455). CUDA: the allocator's peak statistics; a CPU: the resident set's high-water mark, VmHWM
    (Linux 4.0+; elsewhere the process's peak stays)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        PROC_CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory since reset_peak_memory (else since the process started): max allocated on CUDA, the resident
    set's high-water mark on a CPU (VmHWM; where /proc is missing, getrusage's max RSS, which no reset lowers)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        line = next(x for x in PROC_STATUS.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def logged_losses(path: Path) -> tuple[float, float | None]:
    """The last training loss and held-out loss a run's metrics.jsonl logged (nan, None where it logged none or
    cannot be read): what a run that had already finished measured, for a --resume that trains no step."""
    try:
        rows = read_metrics(path)
    except (OSError, ValueError):
        return float("nan"), None
    losses = [row["loss"] for row in rows if isinstance(row.get("loss"), (int, float))]
    evals = [row["eval_loss"] for row in rows if isinstance(row.get("eval_loss"), (int, float))]
    return (float(losses[-1]) if losses else float("nan")), (float(evals[-1]) if evals else None)


def logged_evals(path: Path) -> list[tuple[int, float | None]]:
    """(step, held-out loss) of each evaluation a run's metrics.jsonl logged, in order: None where the loss was not
    finite (written as null); [] where it logged none or cannot be read."""
    try:
        rows = read_metrics(path)
    except (OSError, ValueError):
        return []
    return [(row["step"], float(row["eval_loss"]) if isinstance(row["eval_loss"], (int, float)) else None)
            for row in rows if "eval_loss" in row]


def lowest_logged_eval(evals: list[tuple[int, float | None]]) -> tuple[int, float] | None:
    """(step, held-out loss) of the lowest finite one of logged_evals' `evals` (the earliest of equal ones), None
    where there is none: what training.keep_best compares its kept checkpoint with."""
    finite = [(step, loss) for step, loss in evals if loss is not None and math.isfinite(loss)]
    return min(finite, key=lambda e: e[1]) if finite else None


def nonfinite_logged_evals(evals: list[tuple[int, float | None]]) -> dict | None:
    """{"count", "of", "step"}: how many of logged_evals' `evals` were not finite (null in metrics.jsonl), of how
    many, and the first one's step; None where every one was finite (or none was logged)."""
    bad = [step for step, loss in evals if loss is None or not math.isfinite(loss)]
    return {"count": len(bad), "of": len(evals), "step": bad[0]} if bad else None


def plot_loss(metrics: Path, out: Path) -> Path | None:
    """Training loss per step (and held-out loss where measured) as a PNG, written atomically (files.atomic_file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics) if Path(metrics).is_file() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*train), label="train loss", lw=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss", ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, format=Path(out).suffix[1:] or "png")
    finally:
        plt.close(fig)
    return out
