"""`python -m loraforge ...` (and `torchrun -m loraforge train ...`)."""

import contextlib
import os
import sys

from loraforge.cli import main

code = main()
distributed = sys.modules.get("loraforge.training.distributed")
if distributed is not None and distributed.left_a_group:
    # A torchrun worker whose process group cli.run_command destroyed: leave without the interpreter's teardown,
    # where FSDP's references can keep gloo's threads alive until C++ destructors run; one 2-process FSDP run in
    # ~16 ended with a rank killed by SIGABRT ("terminate called without an active exception") after writing its
    # adapter. Every file is closed by now (adapter, checkpoints, trackers); only the standard streams may hold
    # buffered text.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed stream, a terminal gone (SIGHUP)
            stream.flush()
    os._exit(code)
sys.exit(code)
