"""`loraforge serve` and `loraforge ui` as processes: how they end. A supervisor (systemd, a shell script, the
dashboard) reads the exit status: Ctrl-C is 130 and SIGTERM is SIGTERM, as for train, never 0; a port that is taken
is one error line and 2."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from ports import listening_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(argv: list[str]) -> subprocess.Popen:
    """The CLI as a shell starts it (SIGINT not ignored, as it is for a background job), on the port the system gives
    it (ports.py: one found free and passed on could be taken first); returns once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", *argv, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    port = listening_port(proc)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.communicate()}")


@pytest.mark.parametrize("command,sig,code", [("serve", signal.SIGINT, 130), ("serve", signal.SIGTERM, -signal.SIGTERM),
                                              ("ui", signal.SIGINT, 130)])
def test_a_stopped_server_exits_with_the_signal(tiny_dir, tmp_path, command, sig, code):
    """uvicorn.run swallowed the KeyboardInterrupt, so a stopped server exited 0, like one that finished."""
    argv = [command, "--model", str(tiny_dir)] + (["--runs", str(tmp_path / "runs")] if command == "ui" else [])
    proc = start(argv)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    if sig == signal.SIGINT:
        assert err.splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("command", ["serve", "ui"])
def test_a_port_in_use_is_one_error_line(tiny_dir, tmp_path, command):
    """Said before the model loads (it loaded first, uvicorn's log lines and 'serving ... on' the port came before
    the error)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "loraforge", command, "--model", str(tiny_dir), "--port",
                               str(port), *(["--runs", str(tmp_path / "runs")] if command == "ui" else [])],
                              capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"error: could not listen on 127.0.0.1:{port}: Address already in use (another server on "
                           f"that port? choose another with --port)\n")
    assert done.stdout == ""
