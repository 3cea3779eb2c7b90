"""What a client cannot hold: a connection whose request's headers come a byte at a time (slowloris) or not at all
is closed after the header deadline, so is one whose body pauses that long, idle kept-alive connections make room
for a new one at the cap, and connections beyond it are answered a JSON 503 (serve/connections.py).

uvicorn closed only idle kept-alive connections: each slowloris connection stayed open for ever.
"""

import contextlib
import json
import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from loraforge.serve.api import BodyLimit, ServerThread, add_error_handlers, server_config

TIMEOUT = 1.5  # the test's header deadline (serve's default: 30 s): the client's pauses (TIMEOUT / 5) stay under it
# on a loaded 2-core machine (0.6 s with 0.2 s pauses: a late-scheduled client looked like a stalled one). Each
# deadline is timed from before what starts the server's clock (the connect, the request answered), so a cut is
# never seen sooner than TIMEOUT after it (timed from after, a client thread late by 0.5 s saw it sooner)
MARGIN = 15  # a cut seen within this past the deadline: only "it was cut" (never cut, read_all waits 30 s)


@pytest.fixture(scope="module", autouse=True)
def decode_path():
    """No engine here: once, not on both of conftest's decode paths."""


@pytest.fixture(scope="module")
def app():
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    return app


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body), however it is split across reads."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            data.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
        data += sock.recv(4096)
    return data


def read_all(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes, and when it closed (time.monotonic)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data, time.monotonic()


def test_a_request_whose_headers_trickle_in_is_cut_at_the_deadline_while_others_are_served(app):
    with ServerThread(app, header_timeout=TIMEOUT) as url, contextlib.ExitStack() as sockets:
        start = time.monotonic()  # before the server's clock starts: at its accept
        slow, idle = (sockets.enter_context(connect(url)) for _ in range(2))
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        slow.settimeout(0.05)
        answer, closed = b"", None
        for byte in request:  # a byte every 50 ms or so, never the headers' end
            try:
                slow.send(bytes([byte]))
                answer = slow.recv(4096)  # the 408, or b"" once closed; TimeoutError while open
            except TimeoutError:
                assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}  # others are served
                continue
            except OSError:  # the send after the server closed
                pass
            closed = time.monotonic()
            break
        slow.settimeout(30)
        answer += read_all(slow)[0]
        assert closed is not None and TIMEOUT <= closed - start < TIMEOUT + MARGIN, closed and closed - start
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head, answer
        assert httpx.Response(408, content=body).json()["error"] == {
            "message": f"the request's headers did not arrive within {TIMEOUT:g} s (--header-timeout); send the "
                       f"request again", "type": "invalid_request_error", "param": None, "code": "request_timeout"}
        idle_answer, idle_closed = read_all(idle)  # one that sent nothing: closed too, nothing said
        assert idle_answer == b"" and idle_closed - start < TIMEOUT + MARGIN
        # a kept-alive connection: the next request's headers have the same deadline from the previous answer
        kept = sockets.enter_context(connect(url))
        answered = time.monotonic()  # before the answer's end, from which the server times the next request
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_response(kept)
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b'{"status":"ok"}'), first
        kept.sendall(b"GET /health HTTP/1.1\r\n")  # stops uvicorn's keep-alive timer; ours goes on
        answer, closed = read_all(kept)
        assert answer.startswith(b"HTTP/1.1 408 ") and TIMEOUT <= closed - answered < TIMEOUT + MARGIN


def test_connections_beyond_the_cap_are_answered_503_then_served_again(app):
    server = ServerThread(app, max_connections=3)
    with server as url, contextlib.ExitStack() as sockets:
        held = [sockets.enter_context(connect(url)) for _ in range(3)]
        state = server.server.server_state
        deadline = time.monotonic() + 10
        while len(state.connections) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.get(url + "/health", timeout=5)
        assert (r.status_code, r.headers["connection"], r.headers["retry-after"]) == (503, "close", "1")
        assert r.json()["error"] == {"message": "the server has 3 connections open, the most it serves at once "
                                                "(--max-connections); retry later", "type": "server_error",
                                     "param": None, "code": "too_many_connections"}
        for sock in held:
            sock.close()
        while len(state.connections) > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}


def test_a_request_body_that_stalls_is_cut_after_a_pause_of_the_header_timeout(app):
    """Headers complete, then a byte of the body now and then: bytes closer than the deadline keep it going (the
    deadline is per pause, not for the whole body); a pause that long is a JSON 408 and the connection closed. It
    was held for ever, a slot of --max-connections with it (8 such sockets locked a server of 8 out)."""
    with ServerThread(app, header_timeout=TIMEOUT) as url, connect(url) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        sock.settimeout(TIMEOUT / 5)
        start = time.monotonic()
        while time.monotonic() - start < 3 * TIMEOUT:  # past the deadline, with pauses shorter than it
            with pytest.raises(TimeoutError):
                sock.recv(4096)  # nothing back: still open
            last = time.monotonic()  # before the byte the server times the pause from
            sock.send(b" ")
        sock.settimeout(30)
        answer, closed = read_all(sock)
        assert TIMEOUT <= closed - last < TIMEOUT + MARGIN, closed - last
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head, answer
        assert httpx.Response(408, content=body).json()["error"] == {
            "message": f"the request's body stopped: no byte of it for {TIMEOUT:g} s (--header-timeout); send the "
                       f"request again", "type": "invalid_request_error", "param": None, "code": "request_timeout"}
        # a body that keeps coming is read whole
        assert httpx.post(url + "/echo", content=b"x" * 1000, timeout=5).json() == {"bytes": 1000}


def test_idle_kept_alive_connections_make_room_for_a_new_one_at_the_cap(app):
    """Clients that keep their connection in a pool after an answer fill the cap: a new client got 503 until
    uvicorn's keep-alive (5 s) closed them. Now the longest idle ones are closed for it, and their clients
    reconnect without an error; a connection with a request under way is not closed."""
    server = ServerThread(app, max_connections=3)
    with server as url, contextlib.ExitStack() as stack:
        busy = stack.enter_context(connect(url))  # a request under way: its body not all sent
        busy.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        pooled = [stack.enter_context(httpx.Client(base_url=url, timeout=5)) for _ in range(2)]
        assert [c.get("/health").status_code for c in pooled] == [200, 200]  # 3 open now, 2 of them idle
        statuses = []
        for _ in range(3):  # each new client closes the longest idle one; each pooled one reconnects in turn
            fresh = stack.enter_context(httpx.Client(base_url=url, timeout=5))
            statuses.append(fresh.get("/health").status_code)
            statuses += [c.get("/health").status_code for c in pooled]
        assert statuses == [200] * 9
        busy.sendall(b"cd")
        assert read_response(busy).endswith(b'{"bytes":4}')


def test_a_request_whose_body_is_still_coming_at_shutdown_answers_503_not_a_plain_500():
    """Stopping (SIGTERM, Ctrl-C), uvicorn cancels the requests still open after its grace: one waiting for the rest
    of its body was cancelled in BodyLimit's receive, answered uvicorn's plain-text 500, and the log had an
    "Exception in ASGI application" traceback. It answers the JSON 503 a request cut at shutdown gets."""
    app = FastAPI()
    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=10**6, why="a test")

    @app.post("/v1/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, "warning", access_log=False,
                                          timeout_graceful_shutdown=0.3))
    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())
    logging.getLogger("uvicorn.error").addHandler(handler)
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        thread.start()
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.01)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        with connect(f"http://{host}:{port}") as sock:
            sock.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            deadline = time.monotonic() + 30  # the request under way (a sleep of 0.2 s could end before it was read:
            while not server.server_state.tasks and time.monotonic() < deadline:  # its connection closed unanswered)
                time.sleep(0.01)
            server.should_exit = True
            answer = read_all(sock)[0]
        thread.join(10)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert httpx.Response(503, content=body).json()["error"] == {
        "message": "the server is shutting down; retry the request", "type": "server_error", "param": None,
        "code": "shutting_down"}
    assert [e for e in errors if "Exception in ASGI application" in e] == [], errors


@pytest.mark.parametrize("env,colors", [({"NO_COLOR": "1"}, False), ({"TERM": "dumb"}, False),
                                        ({"NO_COLOR": ""}, None), ({}, None)])
def test_the_servers_log_has_no_colours_where_the_environment_asks_for_none(env, colors, monkeypatch):
    """Soak: `NO_COLOR=1 loraforge serve` (or TERM=dumb) on a terminal wrote uvicorn's `\\x1b[32mINFO\\x1b[0m:`; it
    now asks uvicorn for none there (use_colors=False); elsewhere uvicorn decides (None: colours on a terminal)."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert server_config(FastAPI(), "127.0.0.1", 0, "warning").use_colors is colors


def test_headers_past_h11s_limit_are_answered_a_json_431_the_client_receives(app):
    """Soak: a request with 40 KB of headers (a big cookie or token) arriving in network-sized pieces was answered
    a plain-text 400 "Invalid HTTP request received.", and one of 200 KB sent at once was "Connection reset by
    peer" at the client (the server closed while it was still sending): neither said what was wrong."""
    with ServerThread(app) as url:
        with connect(url) as sock:  # as a network delivers it: 4 KB pieces
            request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
            with contextlib.suppress(OSError):  # the server may answer, and stop reading, before the last piece
                for start in range(0, len(request), 4096):
                    sock.sendall(request[start:start + 4096])
                    time.sleep(0.002)
            head, _, body = read_response(sock).partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
        error = json.loads(body)["error"]
        assert (error["code"], error["message"]) == ("request_header_fields_too_large", (
            "the request's headers are larger than the server reads: more than 16 KiB before their end; send smaller "
            "headers (a cookie or token too long?)"))
        reply = httpx.get(url + "/health", headers={"X-Big": "a" * 200_000}, timeout=30)  # all at once
        assert (reply.status_code, reply.json()["error"]["code"]) == (431, "request_header_fields_too_large")
        assert httpx.get(url + "/health", headers={"X-Ok": "a" * 8_000}, timeout=30).json() == {"status": "ok"}
