"""OpenAI-compatible HTTP API over the engine: FastAPI app factory and `run_server` (what `loraforge serve` calls).

Endpoints: POST /v1/completions, POST /v1/chat/completions (SSE streaming or not), GET /v1/models,
POST /v1/adapters {"name", "path"}, DELETE /v1/adapters/{name}, GET /health. The request's `model` names an
adapter or the base model. Errors use OpenAI's shape {"error": {"message", "type", "code"}}: malformed JSON or
bad parameters 400, wrong API key 401, unknown model 404 (naming the available ones), queue full 429.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.models import load_base
from loraforge.precision import choose
from loraforge.serve.engine import Engine
from loraforge.serve.errors import ServeError
from loraforge.serve.request import Event
from loraforge.serve.sampling import SamplingParams
from loraforge.serve.schemas import AdapterLoadRequest, ChatRequest, CompletionRequest, _Params, chat_ids, prompt_ids

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 429: "rate_limit_error", 500: "server_error"}
log = logging.getLogger("loraforge.serve")


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status)


def _field(loc) -> str:
    return ".".join(str(x) for x in loc[1:]) or "body"


def add_error_handlers(app: FastAPI) -> None:
    """Every 4xx and 5xx answers OpenAI's JSON error shape, unexpected errors included (never plain text)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "the request body is not valid JSON", "invalid_json")
        shown = "; ".join(f"{_field(e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5])
        return _error(400, f"invalid request: {shown}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return _error(exc.status, str(exc), type(exc).__name__)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: logged, answered as JSON
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def add_auth(app: FastAPI, api_key: str | None) -> None:
    """With `api_key`, /v1/* needs `Authorization: Bearer <api_key>`."""
    if api_key is None:
        return

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                              "invalid_api_key")
        return await call_next(request)


class _Generation:
    """One request's answer: the whole completion, or its server-sent events as they are generated."""

    def __init__(self, engine: Engine, body: _Params, ids: list[int], params: SamplingParams, model: str | None,
                 chat: bool):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.engine, self.body, self.chat = engine, body, chat
        self.req = engine.submit(ids, model, params, lambda ev: loop.call_soon_threadsafe(self.events.put_nowait, ev))
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"

    @staticmethod
    def usage(ev: Event) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}

    async def whole(self):
        parts = []
        try:
            while True:
                ev = await self.events.get()
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    break
        finally:
            if not self.req.finished:
                self.engine.abort(self.req)  # the client went away
        if ev.error:
            return _error(500, f"generation failed: {ev.error}", "generation_error")
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

    async def stream(self):
        include_usage = bool((self.body.stream_options or {}).get("include_usage"))
        try:
            if self.chat:
                yield self._chunk(None, None, first=True)
            while True:
                ev = await self.events.get()
                if ev.error:
                    err = {"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                     "param": None, "code": "generation_error"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if ev.text:
                    yield self._chunk(ev.text, None)
                if ev.finish_reason is not None:
                    yield self._chunk(None, ev.finish_reason)
                    if include_usage:
                        yield self._data({"choices": [], "usage": self.usage(ev)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not self.req.finished:
                self.engine.abort(self.req)  # the client disconnected mid-stream

    async def response(self):
        if not self.body.stream:
            return await self.whole()
        return StreamingResponse(self.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(engine: Engine, api_key: str | None = None, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. With `api_key`, /v1/* needs `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="loraforge serve")
    base = model_name or engine.base_name
    tokenizer = engine.tokenizer
    encode_lock = threading.Lock()  # one encode at a time: requests tokenize in worker threads
    add_error_handlers(app)
    add_auth(app, api_key)

    def encode(fn, *args):
        with encode_lock:
            return fn(tokenizer, *args)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": base, "object": "model", "created": created, "owned_by": "loraforge", "root": base,
                 "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "loraforge", "root": base,
                  "parent": base} for name in engine.adapter_names()]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load(body: AdapterLoadRequest):
        await asyncio.to_thread(engine.add_adapter, body.name, body.path)
        return {"id": body.name, "object": "model", "parent": base, "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        engine.remove_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    def adapter(body: _Params) -> str | None:
        return None if body.model == base else body.model

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = await asyncio.to_thread(encode, prompt_ids, body.prompt)
        params = body.sampling(body.max_tokens)
        return await _Generation(engine, body, ids, params, adapter(body), chat=False).response()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        ids = await asyncio.to_thread(encode, chat_ids, body.messages)
        params = body.sampling(body.max_completion_tokens or body.max_tokens)
        return await _Generation(engine, body, ids, params, adapter(body), chat=True).response()

    return app


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, benchmarks): `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
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


def run_server(model: str = "smollm2-135m", adapters: dict[str, str] | None = None, adapters_dir: str | None = None,
               host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_loaded: int = 8,
               max_batch: int = 32, max_queue: int = 256, dtype: str = "auto", precision: str = "auto",
               extend=None, prefix_cache_mb: float = 256, adapter_dtype: str = "auto") -> None:
    """Serve `model` with LoRA adapters over an OpenAI-compatible HTTP API until interrupted.

    model: base model (built-in name, transformers directory, hub id or .gguf); requests name it in `model`
        to get the base alone.
    adapters: name -> adapter directory (PEFT format), loaded and checked at start; `model` names them.
    adapters_dir: a directory whose subdirectories are adapters (registered by directory name, loaded on first
        use); POST /v1/adapters loads only from here or from the start paths.
    host, port: where to listen. api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`.
    max_loaded: adapters resident at once (least recently used evicted, reloaded from disk on demand).
    max_batch: sequences decoded together. max_queue: waiting requests before answering 429.
    prefix_cache_mb: memory for cached keys/values of shared prompt prefixes (per adapter); 0 turns it off.
    adapter_dtype: the resident adapters' weights: auto (the base's dtype when bf16, else fp32), fp32 or bf16.
    precision, dtype: resolved by the one rule (loraforge.precision.choose; auto: fp32 on a CPU without native
        bf16, bf16 where it is native); the base is stored in the chosen dtype and the engine decodes in it.
    """
    import uvicorn


    chosen = choose(precision, dtype, device="cpu")  # the engine runs where load_base puts the model
    print(chosen.line(), flush=True)
    base, tokenizer = load_base(model, dtype=chosen.storage)
    engine = Engine(base, tokenizer, base_name=model, adapters=adapters or {}, adapters_dir=adapters_dir,
                    max_loaded=max_loaded, max_batch=max_batch, max_queue=max_queue, prefix_cache_mb=prefix_cache_mb,
                    adapter_dtype=adapter_dtype)
    app = create_app(engine, api_key=api_key)
    if extend is not None:
        extend(app, engine)
    names = ", ".join(engine.adapter_names()) or "none"
    print(f"serving {model} with adapters: {names} on http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.stop()
