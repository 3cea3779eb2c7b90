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

from loraforge.serve.api import url_host
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
def test_the_startup_line_names_the_port_the_server_listens_on(tiny_dir, tmp_path, command):
    """Soak: `serve --port 0` printed "serving ... on http://127.0.0.1:0/v1" and `ui --port 0` its dashboard's
    ":0" URLs, before the server listened: the line now comes once it does, with the port the system gave it."""
    argv = [command, "--model", str(tiny_dir)] + (["--runs", str(tmp_path / "runs")] if command == "ui" else [])
    proc = start(argv)
    port = listening_port(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    url = f"http://127.0.0.1:{port}"
    line = next(x for x in out.splitlines() if x.startswith(("serving ", "dashboard on ")))
    if command == "serve":
        assert line == f"serving {tiny_dir} with adapters: none on {url}/v1", out
    else:
        assert line.startswith(f"dashboard on {url}/ui/ (runs: ") and line.endswith(f"); API on {url}/v1"), out


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


def test_an_ipv6_host_is_bracketed_in_the_printed_url():
    """`--host ::1` printed http://::1:8000/v1, which no browser or client reads as a host and a port."""
    assert [url_host(h) for h in ("::1", "::", "127.0.0.1", "localhost")] == ["[::1]", "[::]", "127.0.0.1", "localhost"]
