"""What uvicorn does not bound for a server others can reach: how long a request's headers may take, and how many
connections are open at once.

uvicorn (h11; httptools is the same) closes a kept-alive connection that sits idle after a response, and nothing
else: a connection that sends nothing, or a request's headers a byte at a time (slowloris), stays open for ever, and
enough of them take every file descriptor the process has. Its `limit_concurrency` answers a plain-text 503 once
the cap is reached, counting those same stuck connections, so it adds no bound of its own.

GuardedH11Protocol, uvicorn's h11 protocol with:
  - a header deadline: from a connection's start, and from the end of each response on a kept-alive one, a request's
    headers must be complete within `header_timeout` seconds. Past it, a connection holding part of a request is
    answered 408 (`too_slow`, a JSON error) and closed, one that sent nothing is closed (nginx's
    client_header_timeout, 60 s there).
  - a body deadline: while a request's body comes in, each pause in it (no byte for `header_timeout` seconds) ends
    it: 408 (`body_too_slow`) if its response has not begun, and the connection closed (nginx's client_body_timeout).
    A body held one byte a minute kept its connection, and a slot of the cap, for ever. A pause of ours (uvicorn
    stops reading while the app has not taken what came) is not counted.
  - a connection cap: a connection opened while `max_connections` are open first closes kept-alive connections
    that wait idle after a response, the longest idle first, as many as it takes (closing an idle kept-alive
    connection is ordinary HTTP: a client sees it closed before reusing it, or retries a request that got no byte
    back, as httpx and openai do; uvicorn closes them after its keep-alive time anyway); a pool of idle clients
    locked new ones out until then. Connections that never sent a request are not closed for it (their request may
    be on its way; the header deadline ends the silent ones). Short of idle ones, the new connection gets `refuse`
    (a JSON 503 with Retry-After) as the answer to its request, then is closed; past twice the cap it is closed at
    once, unanswered (it would hold a file descriptor until its deadline).
"""

from __future__ import annotations

import asyncio

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # uvicorn's default too (h11_impl)
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 30.0  # a request's headers arrive within this (a client on a slow link sends a few KB in far less)
MAX_CONNECTIONS = 512  # open connections served at once; half the usual 1,024 file descriptors of a process
LINGER_S = 2.0  # after a 431, how long the rest of the request is read and dropped before the connection closes


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (module docstring). uvicorn makes one per
    connection with (config, server_state, app_state, _loop); the rest comes bound (functools.partial)."""

    def __init__(self, config, server_state, app_state, _loop=None, *, header_timeout: float = HEADER_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, refuse=None, too_slow: bytes = b"",
                 body_too_slow: bytes = b"", too_large: bytes = b""):
        super().__init__(config, server_state, app_state, _loop)
        self.too_large = too_large
        self.header_limit = config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self._lingering = False  # answered 431: what the client still sends is read and dropped
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.refuse, self.too_slow, self.body_too_slow = refuse, too_slow, body_too_slow
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_byte = 0.0  # loop time of the last data received
        self._answered_at: float | None = None  # loop time the last response ended (None: no response yet)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        open_now = len(self.connections)
        if open_now > self.max_connections:  # those closed but not yet lost do not count
            open_now = sum(not c.transport.is_closing() for c in self.connections)
            open_now -= self._close_idle(open_now - self.max_connections)
        if open_now > 2 * self.max_connections:
            transport.close()  # connection_lost follows and takes it out of the count
            return
        if open_now > self.max_connections and self.refuse is not None:
            self.app = self.refuse  # this connection's requests get the 503 (uvicorn runs self.app for each)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._last_byte = self.loop.time()
        super().data_received(data)
        self._watch_headers()
        self._watch_body()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot read: a plain-text 400 "Invalid HTTP request received.". Where
        the request line and headers passed h11's limit (header_limit bytes) before their end, `too_large` instead
        (a JSON 431 that names the limit), and the rest of the request is read and dropped for LINGER_S before the
        connection closes: closed at once, a client still sending (httpx, openai) got "Connection reset by peer"
        and never the answer."""
        buffered, _ = self.conn.trailing_data
        if not self.too_large or len(buffered) <= self.header_limit:
            super().send_400_response(msg)
            return
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(self.too_large),
                                                                                    self.too_large))
        self._lingering = True
        self._cancel_header_timer()
        self.loop.call_later(LINGER_S, self.transport.close)

    def on_response_complete(self) -> None:
        self._answered_at = self.loop.time()
        super().on_response_complete()
        self._watch_headers()
        self._watch_body()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        """Kept alive after a response, waiting for the next request with no byte of it yet."""
        return (self._answered_at is not None and self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE
                and not self.conn.trailing_data[0] and not self.transport.is_closing())

    def _close_idle(self, count: int) -> int:
        """Close up to `count` other idle kept-alive connections, the longest idle first; how many it closed."""
        idle = sorted((c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
                       and c._idle()), key=lambda c: c._answered_at)
        for other in idle[:count]:
            other.timeout_keep_alive_handler()  # uvicorn's own close of an idle kept-alive connection
        return len(idle[:count])

    def _watch_headers(self) -> None:
        """The deadline runs while the connection waits for a request's headers (h11: the client's state IDLE, a
        request not yet complete), from when that wait began; it stops once the headers are in."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)
        elif not waiting:
            self._cancel_header_timer()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0] and self.too_slow:  # part of a request came: say why it is closed
            self._write_408(self.too_slow)
        self.transport.close()

    def _write_408(self, body: bytes) -> None:
        """A 408 with a JSON `body`, written past h11 (nothing of a response has gone; the connection closes next)."""
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close"
                             b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    def _watch_body(self) -> None:
        """The body deadline runs while the client sends a request's body (h11: their state SEND_BODY)."""
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.header_timeout, self._body_too_slow)
        else:
            self._cancel_body_timer()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        quiet = self.loop.time() - self._last_byte
        if self.flow.read_paused or quiet < self.header_timeout:  # our pause, or a byte came since: wait on
            wait = self.header_timeout if self.flow.read_paused else self.header_timeout - quiet
            self._body_timer = self.loop.call_later(wait, self._body_too_slow)
            return
        if self.cycle is not None and not self.cycle.response_started and self.body_too_slow:
            self._write_408(self.body_too_slow)
        self.transport.close()
