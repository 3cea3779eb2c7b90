"""A process started by torchrun's agent follows it: SIGTERM when the agent dies.

torchrun starts each process in a session of its own, so an agent killed outright (`kill -9`, the OOM killer) would
leave its processes training on, unseen, holding output_dir, or waiting for the agent's rendezvous store for ever.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def follow_agent() -> None:
    """Under torchrun's agent (it sets TORCHELASTIC_RUN_ID) on Linux: ask the kernel for SIGTERM when the agent dies.
    The training loop stops on it after the step it is in, with a checkpoint (StopRequest); before the loop the
    process simply ends. Call it first thing (the CLI does, before importing torch): an agent that dies before it
    is not seen. Idempotent."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    agent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the agent's own forwarding of signals still works
    if os.getppid() != agent:  # it died between the two lines: no signal would come
        os.kill(os.getpid(), signal.SIGTERM)


def agent_started() -> float | None:
    """When this process's torchrun agent (its parent) started, in seconds since the epoch (Linux's /proc), or None
    elsewhere or where it cannot be read. The agent outlives the processes it restarts (--max-restarts)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return None
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")
