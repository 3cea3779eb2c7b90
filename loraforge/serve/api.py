"""OpenAI-compatible HTTP API over the engine: FastAPI app factory and `run_server` (what `loraforge serve` calls).

Endpoints: POST /v1/completions, POST /v1/chat/completions (SSE streaming or not), GET /v1/models,
POST /v1/adapters {"name", "path"}, DELETE /v1/adapters/{name}, GET /health (GET and HEAD on both GETs). The
request's `model` names an adapter or the base model. Errors use OpenAI's shape {"error": {"message", "type",
"code"}}: malformed JSON or bad parameters 400, wrong API key 401, unknown model 404 (naming the available ones),
body too large 413, queue full 429, the server stopping 503, and so its engine's thread having ended on an error
(every request then, and GET /health, says why: engine.Engine._die). With an API key, /v1/* and the API docs
(/docs, /redoc, /openapi.json) need it.

What a client cannot do to the others: a prompt whose text cannot fit the context (more characters than the context
times the most characters one token covers) is refused before it is tokenized, and a body over the size that such
a prompt needs is refused before it is read, so neither holds a tokenizer; prompts are tokenized on up to
TOKENIZER_COPIES copies at once, so a long one does not hold up a short one; a request whose client disconnects is
aborted, waiting or decoding, streamed or not. A stream's 200 waits for its first event (the request admitted,
before its prefill; a chat stream's role chunk goes with it), up to STREAM_IDLE_S: a request refused before that
(its adapter removed or broken when its turn came) answers the status and JSON error a non-streamed one gets; a
later failure is the stream's last event, the 200 having gone. A stream with nothing to
send for STREAM_IDLE_S sends an SSE comment line, so that a proxy's read timeout does not cut a request that waits
for its turn. A connection whose request's headers do not arrive within the header timeout, or whose body pauses that
long, is closed, and one beyond the connection cap closes idle kept-alive ones or is answered 503 (connections.py;
uvicorn bounds neither).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.models import load_base
from loraforge.precision import choose
from loraforge.serve.connections import (DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, HEADER_TIMEOUT_S, MAX_CONNECTIONS,
                                         GuardedH11Protocol)
from loraforge.serve.engine import Engine
from loraforge.serve.errors import PromptTooLong, ServeError, shown
from loraforge.serve.guard import RequestGuard, open_to_network
from loraforge.serve.request import Event
from loraforge.serve.sampling import SamplingParams
from loraforge.serve.schemas import (AdapterLoadRequest, ChatMessage, ChatRequest, CompletionRequest, _Params,
                                     chat_ids, prompt_ids)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
MIN_CHARS_PER_TOKEN = 64  # the text bound's characters per token, at least (normalizers may merge characters)
BODY_BYTES_PER_CHAR = 12  # a character of text takes at most 12 bytes of JSON: an escaped surrogate pair
BODY_OVERHEAD = 2**20  # bytes of a body beyond its prompt text: the other fields, a chat's per-message JSON
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this (uvicorn's default, named here)
STREAM_IDLE_S = 10.0  # a stream with nothing to send for this long (its request waits in the queue or for an
# adapter slot) sends an SSE comment line, which clients skip, so that proxies and read timeouts see it alive
log = logging.getLogger("loraforge.serve")


def _kind(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": _kind(status), "param": None, "code": code}},
                        status_code=status)


def _field(loc) -> str:
    return ".".join(str(x) for x in loc[1:]) or "body"


def chars_per_token(tokenizer) -> int:
    """The most characters of text one token covers: its longest vocabulary entry (a byte-level BPE entry has a
    character per byte, so at least as many as the text it decodes to; SentencePiece's byte pieces count more),
    and at least MIN_CHARS_PER_TOKEN."""
    return max(MIN_CHARS_PER_TOKEN, max(map(len, tokenizer.get_vocab()), default=0))


def prompt_chars(prompt: str | list[str] | list[int]) -> int:
    """Characters of text in a completion prompt (token ids count none)."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) for p in prompt if isinstance(p, str))


def chat_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in a chat's messages (the template's own text not counted)."""
    total = 0
    for m in messages:
        content = m.content or ""
        total += len(content) if isinstance(content, str) else sum(len(part.text) for part in content)
    return total


def add_error_handlers(app: FastAPI) -> None:
    """Every 4xx and 5xx answers OpenAI's JSON error shape, unexpected errors included (never plain text), and says
    what to fix: FastAPI's own words for a body it could not read ("There was an error parsing the body", "body:
    Input should be a valid dictionary") do not."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "the request body is not valid JSON", "invalid_json")
        if isinstance(exc.body, bytes):  # FastAPI reads a body as JSON only under a JSON Content-Type
            given = request.headers.get("content-type")
            sent = f"Content-Type {shown(given)} is not JSON" if given else "no Content-Type was sent"
            return _error(400, f"{sent}; send Content-Type: application/json", "invalid_content_type")
        listed = "; ".join(f"{_field(e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5])
        return _error(400, f"invalid request: {listed}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, UnicodeError):  # FastAPI's "error parsing the body" over bytes json cannot read
            return _error(400, "the request body is not valid UTF-8 JSON", "invalid_json")
        if isinstance(exc.__cause__, RecursionError):  # the same over arrays or objects nested thousands deep
            return _error(400, "the request body's JSON is nested too deeply to read", "invalid_json")
        if isinstance(exc.__cause__, ValueError):  # Python's int() limit: "Exceeds the limit (4300 digits) ..."
            return _error(400, "the request body's JSON has a number too long to read (over 4,300 digits); no field "
                          "takes one that long", "invalid_json")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return _error(exc.status, str(exc), type(exc).__name__)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: logged, answered as JSON
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def add_auth(app: FastAPI, api_key: str | None) -> None:
    """With `api_key`, /v1/* and the API docs (/docs, /redoc, /openapi.json) need `Authorization: Bearer <api_key>`."""
    if api_key is not None:
        docs = {app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url} - {None}
        app.add_middleware(KeyCheck, api_key=api_key, docs=docs)


SHUTDOWN_GRACE_S = 3  # Ctrl-C / SIGTERM: open streams (event streams, generations) are cut after this many seconds
SHUTDOWN_MARGIN_S = 2  # then uvicorn cancels the handlers still open: time for the cut ones to answer
FORCED_S = 1  # a second Ctrl-C: the open requests are cut at once, and those not answered after this are cancelled
SHUTTING_DOWN = "the server is shutting down; retry the request"


def key_ok(header: str, api_key: str) -> bool:
    """`Authorization: Bearer <api_key>`, the scheme in any case (RFC 7235)."""
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


class KeyCheck:
    """ASGI middleware: a request to /v1/* or to a path in `docs` without `Authorization: Bearer <api_key>` is
    answered 401. Plain ASGI (not BaseHTTPMiddleware, under which a route never sees its client disconnect)."""

    def __init__(self, app, api_key: str, docs: set[str]):
        self.app, self.api_key, self.docs = app, api_key, docs

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] in self.docs):
            given = Headers(scope=scope).get("authorization", "")
            if not key_ok(given, self.api_key):
                response = _error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                  "invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body under `prefix` over `limit` bytes is answered 413, by its Content-Length
    before a byte of it is read, else as soon as the bytes read pass `limit`; a body within it is read whole, then
    handed on. `why` says in the message what the limit leaves room for, `fix` what to send instead. A body still
    coming when the server stops answers 503 shutting_down."""

    def __init__(self, app, limit: int, why: str, prefix: str = "/v1/", fix: str = "send a shorter prompt"):
        self.app, self.limit, self.why, self.prefix, self.fix = app, limit, why, prefix, fix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(f"{int(declared)} bytes", scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await receive()
            except asyncio.CancelledError:  # uvicorn's stop cancels a request whose body has not all come by then:
                # the 503 a request cut at shutdown gets, not uvicorn's plain-text 500 and a logged traceback
                return await _error(503, SHUTTING_DOWN, "shutting_down")(scope, receive, send)
            if message["type"] != "http.request":  # the client left while sending: no one to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(f"over {self.limit} bytes", scope, receive, send)
            more = message.get("more_body", False)
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():  # the body once, then the connection's own messages (a disconnect)
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, size: str, scope, receive, send) -> None:
        response = _error(413, f"the request body is {size}; this server takes at most {self.limit} bytes "
                               f"({self.why}); {self.fix}", "body_too_large")
        await response(scope, receive, send)


class _Generation:
    """One request's answer: the whole completion, or its server-sent events as they are generated.

    `http` is the HTTP request: while a non-streaming answer is made, a watcher checks every DISCONNECT_POLL_S that
    its client is still there and aborts the request once it has gone (uvicorn does not cancel the handler); a
    streamed answer is aborted when Starlette cancels its stream on the disconnect.
    """

    def __init__(self, engine: Engine, body: _Params, ids: list[int], params: SamplingParams, model: str | None,
                 chat: bool, http: Request):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.engine, self.body, self.chat, self.http = engine, body, chat, http
        self.req = engine.submit(ids, model, params, lambda ev: loop.call_soon_threadsafe(self.events.put_nowait, ev))
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"

    @staticmethod
    def usage(ev: Event) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}

    async def _abort_on_disconnect(self) -> None:
        """Abort the request, waiting or decoding, once its client has gone (checked every DISCONNECT_POLL_S)."""
        while not await self.http.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.engine.abort(self.req)

    @staticmethod
    def failure(ev: Event) -> tuple[int, str, str] | None:
        """(status, message, code) of a final event that is no answer, else None; streamed or not, the same. An
        abort reaches a client only when the server stops (one that left reads nothing): 503, which clients retry.
        A 4xx (its adapter cannot be served) reads as the refusal it is, not as a failed generation."""
        if ev.error:
            return ev.status, ev.error if ev.status < 500 else f"generation failed: {ev.error}", \
                ev.code or "generation_error"
        if ev.finish_reason == "abort":
            return 503, SHUTTING_DOWN, "shutting_down"
        return None

    async def whole(self):
        watcher = asyncio.create_task(self._abort_on_disconnect())
        parts = []
        try:
            while True:
                ev = await self.events.get()
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    break
        except asyncio.CancelledError:  # uvicorn's stop cancels what the engine's stop did not end in time
            return _error(503, SHUTTING_DOWN, "shutting_down")  # not a plain-text 500
        finally:
            watcher.cancel()
            if not self.req.finished:
                self.engine.abort(self.req)  # the handler itself was cancelled
        failed = self.failure(ev)
        if failed is not None:
            return _error(*failed)
        text = "".join(parts)
        choice = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {"id": self.rid, "object": self.kind, "created": self.created, "model": self.body.model,
                "choices": [choice], "usage": self.usage(ev)}

    def _chunk(self, delta: str | None, finish: str | None, first: bool = False) -> str:
        if self.chat:
            d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return self._data({"choices": [choice]})

    def _data(self, fields: dict) -> str:
        obj = {"id": self.rid, "object": self.kind + ".chunk" if self.chat else self.kind, "created": self.created,
               "model": self.body.model, **fields}
        return f"data: {json.dumps(obj)}\n\n"

    async def first_event(self) -> tuple[Event | None, asyncio.Future]:
        """A stream's first event, waited for up to STREAM_IDLE_S before the 200 goes out, so that a request refused
        before it starts (its adapter removed or broken when its turn came, the server stopping) answers the status
        a non-streamed one gets, not a 200 with an error event. (None, the pending get) if none came in time (the
        request waits its turn): the 200 goes then, with comment lines while it waits (STREAM_IDLE_S)."""
        getter = asyncio.ensure_future(self.events.get())
        watcher = asyncio.create_task(self._abort_on_disconnect())
        try:
            done, _ = await asyncio.wait({getter}, timeout=STREAM_IDLE_S)
        except asyncio.CancelledError:  # uvicorn's stop cancels what the engine's stop did not end in time
            getter.cancel()
            if not self.req.finished:
                self.engine.abort(self.req)
            raise
        finally:
            watcher.cancel()
        return (getter.result(), getter) if done else (None, getter)

    async def stream(self, first: Event | None = None, getter: asyncio.Future | None = None):
        """The events as SSE lines: `first` (taken by `first_event`) first, or `getter`'s event, then the rest."""
        include_usage = bool((self.body.stream_options or {}).get("include_usage"))
        # getter: the pending get of the next event, kept across idle comments so that none is lost
        try:
            if self.chat:
                yield self._chunk(None, None, first=True)
            elif getter is not None:
                yield ": waiting\n\n"  # nothing sent for STREAM_IDLE_S already (first_event)
            while True:
                if first is not None:
                    ev, first = first, None
                elif getter is not None or self.events.empty():  # waiting (in the queue, for an adapter slot, a
                    getter = getter or asyncio.ensure_future(self.events.get())  # slow step): say so
                    while not (await asyncio.wait({getter}, timeout=STREAM_IDLE_S))[0]:
                        yield ": waiting\n\n"  # an SSE comment: clients skip it, proxies see bytes
                    ev, getter = getter.result(), None
                else:
                    ev = self.events.get_nowait()
                failed = self.failure(ev)
                if failed is not None:  # the 200 has gone: the error is the stream's last event
                    status, message, code = failed
                    err = {"error": {"message": message, "type": _kind(status), "param": None, "code": code}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if ev.text:
                    yield self._chunk(ev.text, None)
                if ev.finish_reason is not None:
                    yield self._chunk(None, ev.finish_reason)
                    if include_usage:
                        yield self._data({"choices": [], "usage": self.usage(ev)})
                    break
        except asyncio.CancelledError:  # uvicorn's stop cancels what the engine's stop did not end in time (a long
            # prefill holds the engine): the stream still ends as the README says, with the error event and [DONE]
            # (it used to be cut mid-body); after a disconnect the cancelled send drops these two lines
            err = {"error": {"message": SHUTTING_DOWN, "type": _kind(503), "param": None, "code": "shutting_down"}}
            yield f"data: {json.dumps(err)}\n\n"
        finally:
            if getter is not None:
                getter.cancel()
            if not self.req.finished:
                self.engine.abort(self.req)  # the client disconnected mid-stream
        yield "data: [DONE]\n\n"

    async def response(self):
        if not self.body.stream:
            return await self.whole()
        try:
            first, getter = await self.first_event()
        except asyncio.CancelledError:
            return _error(503, SHUTTING_DOWN, "shutting_down")  # not a plain-text 500
        failed = self.failure(first) if first is not None else None
        if failed is not None:  # nothing sent yet: the status a non-streamed request gets
            return _error(*failed)
        return StreamingResponse(self.stream(first, None if first is not None else getter),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


TOKENIZER_COPIES = min(4, os.cpu_count() or 1)  # prompts tokenized at once (one core each: encoding frees the GIL)


class TokenizerPool:
    """Copies of one tokenizer lent to request threads, at most `size` at once. A Rust tokenizer used by two threads
    at once may raise "Already borrowed"; one copy under a lock made a short prompt wait behind a long one (1.4 s
    for a prompt at SmolLM2's bound). Copies are made when first needed, from the original, which is never lent."""

    def __init__(self, tokenizer, size: int = TOKENIZER_COPIES):
        self._original, self._free, self._lock = tokenizer, [], threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    @contextlib.contextmanager
    def borrow(self):
        with self._slots:
            with self._lock:
                tok = self._free.pop() if self._free else copy.deepcopy(self._original)
            try:
                yield tok
            finally:
                with self._lock:
                    self._free.append(tok)


def create_app(engine: Engine, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. With `api_key`, /v1/* and the docs need `Authorization: Bearer <api_key>`.

    A prompt of more characters than the context's tokens times `chars_per_token` cannot fit: refused before it is
    tokenized. `max_body_bytes` (default: room for such a prompt, BODY_BYTES_PER_CHAR a character, plus
    BODY_OVERHEAD) bounds a request body on /v1/.
    """
    app = FastAPI(title="loraforge serve")
    base = model_name or engine.base_name
    tokenizer = engine.tokenizer
    tokenizers = TokenizerPool(tokenizer)  # requests tokenize in worker threads, each with a copy of its own
    per_token = chars_per_token(tokenizer)
    max_chars = engine.context_length * per_token
    if max_body_bytes is None:
        max_body_bytes = BODY_OVERHEAD + BODY_BYTES_PER_CHAR * max_chars
    app.state.cut = lambda: engine.stop(timeout=0)  # what run_until_signal ends the open requests with
    app.state.forced = False  # set by run_until_signal after a second Ctrl-C: nothing more is waited for
    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=max_body_bytes,  # inside the auth: a request without the key is not read
                       why=f"room for a prompt of the model's {engine.context_length}-token context")
    add_auth(app, api_key)

    def encode(fn, *args):
        with tokenizers.borrow() as tok:
            return fn(tok, *args)

    def check_fits(field: str, chars: int) -> None:
        """Refuse, before it is tokenized, text that cannot fit the context whatever its tokens."""
        if chars > max_chars:
            raise PromptTooLong(f"{field}: {chars} characters cannot fit the model's context of "
                                f"{engine.context_length} tokens (a token covers at most {per_token} characters "
                                f"here, so at most {max_chars} characters fit); shorten the prompt")

    @app.get("/health")
    @app.head("/health", include_in_schema=False)  # health checkers that send HEAD: the GET's headers, no body
    async def health():
        if engine.died:  # a load balancer takes it out of service, and the reason is read here too
            return JSONResponse({"status": "stopped", "error": engine.died, **engine.load()}, status_code=503)
        if engine.stopping:  # stop() was called (the server is shutting down): every request is refused
            return JSONResponse({"status": "shutting_down", **engine.load()}, status_code=503)
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models")
    @app.head("/v1/models", include_in_schema=False)
    async def models():
        created = int(time.time())
        names = await asyncio.to_thread(engine.adapter_names)  # it reads adapters_dir: off the event loop
        data = [{"id": base, "object": "model", "created": created, "owned_by": "loraforge", "root": base,
                 "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "loraforge", "root": base,
                  "parent": base} for name in names]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load(body: AdapterLoadRequest):
        await asyncio.to_thread(engine.add_adapter, body.name, body.path)
        return {"id": body.name, "object": "model", "parent": base, "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        engine.remove_adapter(name)  # an unknown name: 404, the name cut in the message (errors.shown)
        return {"id": name, "object": "model", "deleted": True}

    def adapter(body: _Params) -> str | None:
        return None if body.model == base else body.model

    def check_count(field: str, n: int, what: str) -> None:
        """Refuse more token ids, or chat messages (each adds a token of the template at least), than the context
        holds: their text may be short or none, but they are tokens all the same."""
        if n > engine.context_length:
            raise PromptTooLong(f"{field}: {n} {what} cannot fit the model's context of {engine.context_length} "
                                f"tokens; send fewer")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_fits("prompt", prompt_chars(body.prompt))
        check_count("prompt", sum(isinstance(t, int) for t in body.prompt) if isinstance(body.prompt, list) else 0,
                    "token ids")
        ids = await asyncio.to_thread(encode, prompt_ids, body.prompt)
        params = body.sampling(body.max_tokens)
        return await _Generation(engine, body, ids, params, adapter(body), chat=False, http=request).response()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_fits("messages", chat_chars(body.messages))
        check_count("messages", len(body.messages), "messages (each at least one token of the chat template)")
        ids = await asyncio.to_thread(encode, chat_ids, body.messages)
        params = body.sampling(body.max_completion_tokens or body.max_tokens)
        return await _Generation(engine, body, ids, params, adapter(body), chat=True, http=request).response()

    return app


def check_port(host: str, port: int) -> None:
    """ServeError now, before a model loads for seconds, when host:port cannot be listened on (taken, a privileged
    port, an address not of this machine); uvicorn's own failure stays caught in run_until_signal (a race)."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
            probe.bind(address)
    except OSError as e:
        raise ServeError(f"could not listen on {host}:{port}: {e.strerror or e} (another server on that port? "
                         f"choose another with --port)") from None


class _GracefulServer(uvicorn.Server):
    """uvicorn's server that, SHUTDOWN_GRACE_S after it begins to stop, calls `cut` (create_app's: the engine
    stops, every request still open gets its abort), so each handler answers (a JSON 503; a stream, its error
    event and [DONE]) before uvicorn cancels what is left. Cancelled waiting, a non-streamed request answered a
    plain-text 500: its handler never woke, the engine stopping only once uvicorn had returned."""

    def __init__(self, config: uvicorn.Config, cut=None, announce=None):
        super().__init__(config)
        self.cut = cut
        self.announce = announce  # called with the port it listens on, once it does (--port 0: the system's)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.announce is not None:
            self.announce(self.servers[0].sockets[0].getsockname()[1])

    async def shutdown(self, sockets=None) -> None:
        if self.cut is not None:  # not called if every connection closes first: the loop ends before it
            asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S, self.cut)
        await super().shutdown(sockets)
        if self.force_exit:
            await self.end_forced()

    async def end_forced(self) -> None:
        """After a second Ctrl-C uvicorn returns at once, skipping the app's lifespan shutdown and leaving requests
        open; asyncio.run then cancelled them all, and starlette and uvicorn logged each CancelledError as a
        traceback. Here the engine stops now (each open request gets its abort and answers), the lifespan ends, and
        a request still open after FORCED_S (a step that long) is cancelled without its traceback."""
        if self.cut is not None:
            self.cut()
        await self.lifespan.shutdown()
        late = set(self.server_state.tasks)
        if late:
            _, late = await asyncio.wait(late, timeout=FORCED_S)
        if late:
            quiet = _DropCancelled()
            logging.getLogger("uvicorn.error").addFilter(quiet)  # run_asgi logs a cancelled handler as an error
            try:
                for task in late:
                    task.cancel()
                await asyncio.wait(late)
            finally:
                logging.getLogger("uvicorn.error").removeFilter(quiet)


class _DropCancelled(logging.Filter):
    """Drops the log records of a cancelled handler (uvicorn's "Exception in ASGI application" for its CancelledError):
    after a second Ctrl-C that cancel is the stop asked for, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def server_config(app, host: str, port: int, log_level: str, header_timeout: float = HEADER_TIMEOUT_S,
                  max_connections: int = MAX_CONNECTIONS, **kwargs) -> uvicorn.Config:
    """uvicorn's config for `app`, on GuardedH11Protocol (connections.py): a request's headers must come within
    `header_timeout` seconds, and its body without a pause that long (else 408, or closed); a connection beyond
    `max_connections` open first closes idle kept-alive ones, else is answered a JSON 503 (Retry-After: 1); an idle
    kept-alive connection is closed after KEEP_ALIVE_S."""
    refuse = _error(503, f"the server has {max_connections} connections open, the most it serves at once "
                         f"(--max-connections); retry later", "too_many_connections")
    refuse.headers.update({"connection": "close", "retry-after": "1"})
    too_slow = _error(408, f"the request's headers did not arrive within {header_timeout:g} s (--header-timeout); "
                           f"send the request again", "request_timeout").body
    body_too_slow = _error(408, f"the request's body stopped: no byte of it for {header_timeout:g} s "
                                f"(--header-timeout); send the request again", "request_timeout").body
    too_large = _error(431, f"the request's headers are larger than the server reads: more than "
                            f"{DEFAULT_MAX_INCOMPLETE_EVENT_SIZE // 1024} KiB before their end; send smaller "
                            f"headers (a cookie or token too long?)", "request_header_fields_too_large").body
    http = functools.partial(GuardedH11Protocol, header_timeout=header_timeout, max_connections=max_connections,
                             refuse=refuse, too_slow=too_slow, body_too_slow=body_too_slow, too_large=too_large)
    kwargs.setdefault("use_colors", False if no_color() else None)  # None: uvicorn's own choice (a terminal)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=http, timeout_keep_alive=KEEP_ALIVE_S,
                          **kwargs)


def no_color() -> bool:
    """Whether the environment asks for text without colours: NO_COLOR set and not empty (no-color.org), or
    TERM=dumb. uvicorn coloured its log lines on any terminal (soak: `NO_COLOR=1 loraforge serve` wrote
    `\x1b[32mINFO\x1b[0m:`)."""
    return bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"


def run_until_signal(app, host: str, port: int, log_level: str, header_timeout: float = HEADER_TIMEOUT_S,
                     max_connections: int = MAX_CONNECTIONS, announce=None) -> None:
    """Serve `app` with uvicorn until Ctrl-C or SIGTERM, then let the signal through: Ctrl-C raises KeyboardInterrupt
    (the CLI exits 130), SIGTERM ends the process as SIGTERM does (143). uvicorn.run would swallow the Ctrl-C, so a
    stopped server exited 0. Open requests are cut after SHUTDOWN_GRACE_S (create_app's `app.state.cut`): a
    non-streamed one answers a JSON 503, a stream ends with an error event. ServeError when it cannot listen.
    header_timeout, max_connections: server_config's. `announce(port)` is called once it listens, with the port
    (port 0: the one the system gave it; soak: `serve --port 0` printed "on http://127.0.0.1:0/v1")."""
    config = server_config(app, host, port, log_level, header_timeout, max_connections,
                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S + SHUTDOWN_MARGIN_S)
    state = getattr(app, "state", None)
    server = _GracefulServer(config, cut=getattr(state, "cut", None), announce=announce)
    try:
        server.run()  # re-raises a signal it caught: Ctrl-C ends in KeyboardInterrupt, SIGTERM ends the process
    except SystemExit:  # uvicorn exits when it cannot listen
        if server.started:
            raise
    finally:
        if server.force_exit and state is not None:
            state.forced = True
    caught = getattr(server, "_captured_signals", [])  # re-raised, but a no-op where the signal was ignored
    if signal.SIGINT in caught:  # started with SIGINT ignored (a background job, nohup): still a stop, not an end
        raise KeyboardInterrupt
    if signal.SIGTERM in caught:
        raise SystemExit(128 + signal.SIGTERM)
    if not server.started:
        raise ServeError(f"could not listen on {host}:{port} (the line above says why; another server on that port? "
                         f"choose another with --port)")


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, benchmarks): `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, header_timeout: float = HEADER_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS):
        self.server = uvicorn.Server(server_config(app, host, port, "warning", header_timeout, max_connections,
                                                   access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="loraforge-http", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (port in use?)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def url_host(host: str) -> str:
    """`host` as a URL writes it: an IPv6 address in brackets (`--host ::1` printed http://::1:8000/v1)."""
    return f"[{host}]" if ":" in host else host


ADAPTERS_NAMED = 10  # adapters the startup line names; GET /v1/models lists them all


def adapters_named(names: list[str]) -> str:
    """The startup line's adapters: the first ADAPTERS_NAMED and how many more (a soak's --adapters-dir of 2,000
    adapters printed one 14 KB line of names)."""
    if len(names) <= ADAPTERS_NAMED:
        return ", ".join(names) or "none"
    return f"{', '.join(names[:ADAPTERS_NAMED])} and {len(names) - ADAPTERS_NAMED} more (GET /v1/models lists them)"


def run_server(model: str = "smollm2-135m", adapters: dict[str, str] | None = None, adapters_dir: str | None = None,
               host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_loaded: int = 8,
               max_batch: int = 32, max_queue: int = 256, dtype: str = "auto", precision: str = "auto",
               extend=None, prefix_cache_mb: float = 256, adapter_dtype: str = "auto",
               header_timeout: float = HEADER_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
               quantize: str | None = None) -> None:
    """Serve `model` with LoRA adapters over an OpenAI-compatible HTTP API until interrupted.

    model: base model (built-in name, transformers directory, hub id or .gguf); requests name it in `model`
        to get the base alone.
    adapters: name -> adapter directory (PEFT format), loaded and checked at start; `model` names them.
    adapters_dir: a directory of adapters: each subfolder NAME holding adapter_config.json, and each run folder
        NAME/adapter/ (as train writes it), registered as NAME and loaded on first use; POST /v1/adapters loads only
        from here or from the start paths.
    host, port: where to listen. api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`.
    max_loaded: adapters resident at once (least recently used evicted, reloaded from disk on demand).
    max_batch: sequences decoded together. max_queue: waiting requests before answering 429.
    prefix_cache_mb: memory for cached keys/values of shared prompt prefixes (per adapter); 0 turns it off.
    adapter_dtype: the resident adapters' weights: auto (the base's dtype when bf16, else fp32), fp32 or bf16.
    header_timeout: seconds a request's headers may take to arrive (from the connection's start, or the end of the
        previous response on a kept-alive one), and each pause in its body may last; then 408 and the connection
        closed (a slowloris client holds none).
    max_connections: connections open at once; one beyond them closes idle kept-alive ones, else its request is
        answered 503 (retry later).
    precision, dtype: resolved by the one rule (loraforge.precision.choose; auto: fp32 on a CPU without native
        bf16, bf16 where it is native); the base is stored in the chosen dtype and the engine decodes in it.
    quantize: "nf4", "fp4" or "int8": the base's linear layers stored by bitsandbytes (load_model's, as train,
        eval and generate load it), computing in the chosen dtype; such a base decodes on transformers' forward.
    """
    chosen = choose(precision, dtype, device="cpu", names=("--precision", "--dtype"),
                    training=False)  # where load_base puts the model
    check_port(host, port)  # a port already taken: one line, before the model loads
    if (warning := open_to_network(host, port, api_key)) is not None:
        print(warning, file=sys.stderr, flush=True)
    print(chosen.line(training=False), flush=True)
    base, tokenizer = load_base(model, dtype=chosen.storage, quantize=quantize)
    engine = Engine(base, tokenizer, base_name=model, adapters=adapters or {}, adapters_dir=adapters_dir,
                    max_loaded=max_loaded, max_batch=max_batch, max_queue=max_queue, prefix_cache_mb=prefix_cache_mb,
                    adapter_dtype=adapter_dtype, precision=chosen)
    app = create_app(engine, api_key=api_key)
    if extend is not None:  # the dashboard: its own RequestGuard, with the cross-site checks
        extend(app, engine)
    else:
        app.add_middleware(RequestGuard, host=host, cross_site=False)  # a page rebinding its name to this machine
    stored = f" ({quantize} base)" if quantize else ""

    def announce(listening: int) -> None:  # once it listens: the URL works, and port 0's real port is known
        print(f"serving {model}{stored} with adapters: {adapters_named(engine.adapter_names())} on "
              f"http://{url_host(host)}:{listening}/v1", flush=True)
    try:
        run_until_signal(app, host, port, log_level="info", header_timeout=header_timeout,
                         max_connections=max_connections, announce=announce)
    finally:
        engine.stop(timeout=0 if app.state.forced else 10)  # a second Ctrl-C waits for no step to end
