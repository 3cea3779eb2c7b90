"""`python -m loraforge ...` (and `torchrun -m loraforge train ...`); the `loraforge` script runs `main` here too."""

import contextlib
import os
import sys

from loraforge.utils.startup import exit_on_signals

exit_on_signals()  # first, before the CLI's own imports: a signal during them exits 128 + its number with one line

from loraforge.cli import main as run_cli  # noqa: E402  (after exit_on_signals, on purpose)


def main() -> None:
    """Run the command line and exit with its code."""
    code = run_cli()
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


if __name__ == "__main__":
    main()
