"""OpenAI-compatible HTTP API over the engine: FastAPI app factory and `run_server` (what `loraforge serve` calls).

Endpoints: POST /v1/completions, POST /v1/chat/completions (SSE streaming or not), GET /v1/models,
POST /v1/adapters {"name", "path"}, DELETE /v1/adapters/{name}, GET /health. The request's `model` names an
adapter or the base model. Errors use OpenAI's shape {"error": {"message", "type", "code"}}: malformed JSON or
bad parameters 400, wrong API key 401, unknown model 404 (naming the available ones), queue full 429.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.models import load_base
from loraforge.precision import choose
from loraforge.serve.engine import Engine, Event, SamplingParams, ServeError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 429: "rate_limit_error", 500: "server_error"}


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                                   "param": None, "code": code}}, status_code=status)


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we don't use (user, logprobs=None, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension, for benchmarks

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        if self.n != 1:
            raise ServeError(f"n: {self.n} is not supported; send n=1 (several requests batch together anyway)")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=stop,
                              seed=self.seed, ignore_eos=self.ignore_eos)


class CompletionRequest(_Params):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterLoadRequest(BaseModel):
    name: str
    path: str


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if any(t < 0 or t >= len(tokenizer) for t in prompt):
            raise ServeError(f"prompt: token ids must be in [0, {len(tokenizer)})")
        return prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ServeError(f"prompt: a list of {len(prompt)} prompts is not supported; send one per request")
        prompt = prompt[0]
    return tokenizer(prompt)["input_ids"]


def _chat_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError("this model's tokenizer has no chat template; use /v1/completions")
    plain = []
    for m in messages:
        content = m.content or ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if any(part.get("type") != "text" for part in content):
                raise ServeError("messages: only text content parts are supported")
            content = "".join(part.get("text", "") for part in content)
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def create_app(engine: Engine, api_key: str | None = None, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. With `api_key`, /v1/* needs `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="loraforge serve")
    base = model_name or engine.base_name
    tokenizer = engine.tokenizer
    encode_lock = threading.Lock()  # one encode at a time: requests tokenize in worker threads

    def encode(fn, *args):
        with encode_lock:
            return fn(tokenizer, *args)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "the request body is not valid JSON", "invalid_json")
        shown = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                          for e in errors[:5])
        return _error(400, f"invalid request: {shown}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return _error(exc.status, str(exc), type(exc).__name__)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                              "invalid_api_key")
        return await call_next(request)

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

    async def _run(request: Request, body: _Params, ids: list[int], params: SamplingParams, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        model = None if body.model == base else body.model
        req = engine.submit(ids, model, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage(ev: Event) -> dict:
            return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                    "total_tokens": ev.prompt_tokens + ev.completion_tokens}

        if not body.stream:
            parts = []
            try:
                while True:
                    ev = await events.get()
                    parts.append(ev.text)
                    if ev.finish_reason is not None:
                        break
            finally:
                if not req.finished:
                    engine.abort(req)  # the client went away
            if ev.error:
                return _error(500, f"generation failed: {ev.error}", "generation_error")
            text = "".join(parts)
            choice = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice],
                    "usage": usage(ev)}

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            obj = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": body.model,
                   "choices": [choice]}
            return f"data: {json.dumps(obj)}\n\n"

        async def stream():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    ev = await events.get()
                    if ev.error:
                        err = {"error": {"message": f"generation failed: {ev.error}", "type": "server_error"}}
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                    if ev.text:
                        yield chunk(ev.text, None)
                    if ev.finish_reason is not None:
                        yield chunk(None, ev.finish_reason)
                        if include_usage:
                            obj = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                                   "model": body.model, "choices": [], "usage": usage(ev)}
                            yield f"data: {json.dumps(obj)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not req.finished:
                    engine.abort(req)  # the client disconnected mid-stream

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        ids = await asyncio.to_thread(encode, _prompt_ids, body.prompt)
        return await _run(request, body, ids, body.sampling(body.max_tokens), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        ids = await asyncio.to_thread(encode, _chat_ids, body.messages)
        return await _run(request, body, ids, body.sampling(body.max_completion_tokens or body.max_tokens), chat=True)

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
               extend=None) -> None:
    """Serve `model` with LoRA adapters over an OpenAI-compatible HTTP API until interrupted.

    model: base model (built-in name, transformers directory, hub id or .gguf); requests name it in `model`
        to get the base alone.
    adapters: name -> adapter directory (PEFT format), loaded and checked at start; `model` names them.
    adapters_dir: a directory whose subdirectories are adapters (registered by directory name, loaded on first
        use); POST /v1/adapters loads only from here or from the start paths.
    host, port: where to listen. api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`.
    max_loaded: adapters resident at once (least recently used evicted, reloaded from disk on demand).
    max_batch: sequences decoded together. max_queue: waiting requests before answering 429.
    precision, dtype: resolved by the one rule (loraforge.precision.choose; auto: fp32 on a CPU without native
        bf16, bf16 where it is native); the base is stored in the chosen dtype and the engine decodes in it.
    extend: called as extend(app, engine) before serving, to add routes (`serve --ui` mounts the dashboard).
    """
    import uvicorn


    chosen = choose(precision, dtype, device="cpu")  # the engine runs where load_base puts the model
    print(chosen.line(), flush=True)
    base, tokenizer = load_base(model, dtype=chosen.storage)
    engine = Engine(base, tokenizer, base_name=model, adapters=adapters or {}, adapters_dir=adapters_dir,
                    max_loaded=max_loaded, max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, api_key=api_key)
    if extend is not None:
        extend(app, engine)
    names = ", ".join(engine.adapter_names()) or "none"
    print(f"serving {model} with adapters: {names} on http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.stop()
