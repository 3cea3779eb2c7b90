"""The port a server process listens on. Started with --port 0, it takes the one the system gives it at its bind. A
port found free beforehand (a socket bound to port 0, closed, its number passed on) can be taken by any other
process on the machine in the seconds before the server, once its model has loaded, binds it: CI's machine runs
other jobs beside the suite."""

import subprocess
import time

import psutil  # the test extra (6.0: net_connections)


def listening_port(proc: subprocess.Popen, timeout: float = 120) -> int:
    """The TCP port `proc` listens on, from the kernel's table of its sockets, once it listens (uvicorn binds after
    the app's start-up: the server then answers). AssertionError when `proc` ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server ended (exit {proc.returncode}) before it listened: {proc.communicate()}")
        ports = [c.laddr.port for c in psutil.Process(proc.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
        if ports:
            return ports[0]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server did not listen within {timeout} s: {proc.communicate()}")
