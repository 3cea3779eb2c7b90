"""The error line of a process under torchrun, handed to its agent: torchrun's failure summary ("Root Cause (first
observed failure)", the last lines of a multi-node job's log) prints the process's error file as its `traceback`,
or "error_file: <N/A> ... To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html" where
there is none, which is where a cluster user looks first. The file's format is torchrun's own (ErrorHandler)."""

from __future__ import annotations

import contextlib
import json
import os
import time


def report_to_agent(line: str) -> None:
    """Write `line` into TORCHELASTIC_ERROR_FILE, where torchrun set one (nothing otherwise; a file that cannot be
    written changes nothing about how the command ends)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
