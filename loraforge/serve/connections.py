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
    client_header_timeout, 60 s there). The body is not timed here: the routes read it whole within BodyLimit's cap.
  - a connection cap: a connection opened while `max_connections` are open gets `refuse` (a JSON 503) as the answer
    to its request, then is closed; past twice the cap a new connection is closed at once, unanswered (it would hold
    a file descriptor until its deadline).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 30.0  # a request's headers arrive within this (a client on a slow link sends a few KB in far less)
MAX_CONNECTIONS = 512  # open connections served at once; half the usual 1,024 file descriptors of a process


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (module docstring). uvicorn makes one per
    connection with (config, server_state, app_state, _loop); the rest comes bound (functools.partial)."""

    def __init__(self, config, server_state, app_state, _loop=None, *, header_timeout: float = HEADER_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, refuse=None, too_slow: bytes = b""):
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.refuse, self.too_slow = refuse, too_slow
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > 2 * self.max_connections:
            transport.close()  # connection_lost follows and takes it out of the count
            return
        if len(self.connections) > self.max_connections and self.refuse is not None:
            self.app = self.refuse  # this connection's requests get the 503 (uvicorn runs self.app for each)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

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
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(self.too_slow),
                                                                                         self.too_slow))
        self.transport.close()
