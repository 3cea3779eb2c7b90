"""The dashboard's HTTP side: a FastAPI router under /ui mounted on the serve app (loraforge.serve.api).

Page: GET /ui/ (static index.html, app.js, style.css, vendored uPlot). JSON under /ui/api/, each needing
`Authorization: Bearer <key>` when the server has an API key:
  GET  info                      served model, models and dataset files the form offers
  GET  runs                      every run with its status and config
  GET  runs/{name}/metrics       metrics.jsonl rows from ?offset= on
  GET  runs/{name}/events        the same as server-sent events while the run is running, then `event: end`
  GET  runs/{name}/extras        AdaLoRA ranks, forgetting report, the tail of train.log
  POST runs                      start a run from the form (400 with the CLI's message for a bad value)
  POST runs/{name}/stop          SIGINT: the run stops, keeping its last complete checkpoint
  GET  runs/{name}/adapter.zip   the run's adapter directory as a zip
  GET  adapters                  adapter directories under the server's adapters_dir (for POST /v1/adapters)
The playground and adapter loading use the OpenAI-compatible /v1 endpoints themselves. Every name or path from
the browser is resolved inside its folder (runs.inside); nothing from it reaches a shell or eval.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import zipfile
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from loraforge.config import ConfigError
from loraforge.models import load_base
from loraforge.precision import choose
from loraforge.serve.api import create_app
from loraforge.serve.engine import Engine
from loraforge.ui import runs as R
from loraforge.ui.launch import METHODS, Launcher, form_config

STATIC = Path(__file__).parent / "static"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}},
                        status_code=status)


class _Denied(Exception):
    def __init__(self, status: int, message: str, code: str):
        self.args = (status, message, code)


def create_router(runs_dir: str | Path, data_dir: str | Path, models: dict[str, str], engine=None,
                  api_key: str | None = None) -> tuple[APIRouter, Launcher]:
    """The /ui routes over `runs_dir` (runs), `data_dir` (dataset files) and `models` (name offered -> model.name)."""
    runs_dir, data_dir = Path(runs_dir).resolve(), Path(data_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(runs_dir)

    def auth(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise _Denied(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                          "invalid_api_key")

    def run_path(name: str) -> Path:
        try:
            path = R.inside(runs_dir, name, must_exist=False)
        except R.PathError as e:
            raise _Denied(400, str(e), "bad_path") from None
        if name.split("/")[0] == R.UI_DIR or not (path.exists() or (R.meta_dir(runs_dir, name) / "launch.json").is_file()):
            raise _Denied(404, f"no run {name!r} in {runs_dir}", "not_found")
        return path

    api = APIRouter(prefix="/ui/api", dependencies=[Depends(auth)])

    @api.get("/info")
    def info():
        datasets = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")
                          if p.is_file() and p.suffix in DATA_SUFFIXES and R.UI_DIR not in p.parts
                          and not p.relative_to(data_dir).as_posix().startswith(runs_dir.name + "/"))[:500]
        return {"model": getattr(engine, "base_name", None), "models": list(models), "datasets": datasets,
                "methods": list(METHODS), "auth": api_key is not None}

    @api.get("/runs")
    def runs():
        return {"runs": R.list_runs(runs_dir, launcher.running())}

    def _status(path: Path) -> str:
        name = path.relative_to(runs_dir).as_posix()
        if name in launcher.running():
            return "running"
        return R.status(path, R._json(R.meta_dir(runs_dir, name) / "launch.json"))

    @api.get("/runs/{name:path}/metrics")
    def metrics(name: str, offset: int = 0):
        path = run_path(name)
        rows, end = R.read_metrics(path, max(0, offset))
        return {"rows": rows, "offset": end, "status": _status(path)}

    @api.get("/runs/{name:path}/events")
    async def events(name: str, offset: int = 0, interval: float = 0.5):
        path = run_path(name)
        interval = min(max(interval, 0.1), 5.0)

        async def stream():
            pos = max(0, offset)
            while True:
                state = _status(path)
                rows, pos = R.read_metrics(path, pos)
                if rows:
                    yield f"data: {json.dumps({'rows': rows, 'offset': pos, 'status': state})}\n\n"
                if state != "running":
                    rows, pos = R.read_metrics(path, pos)  # lines written just before the exit
                    yield f"event: end\ndata: {json.dumps({'rows': rows, 'offset': pos, 'status': state})}\n\n"
                    return
                yield ": keep-alive\n\n"
                await asyncio.sleep(interval)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/runs/{name:path}/extras")
    def extras(name: str):
        path = run_path(name)
        log = R.meta_dir(runs_dir, name) / "train.log"
        tail = log.read_bytes()[-4000:].decode(errors="replace") if log.is_file() else None
        return {"ranks": R.rank_pattern(path), "forgetting": R.forgetting(path), "log": tail}

    @api.post("/runs")
    async def start(request: Request):
        try:
            form = await request.json()
        except ValueError:
            return _error(400, "the request body is not valid JSON", "invalid_json")
        if not isinstance(form, dict):
            return _error(400, "send the form as a JSON object", "invalid_request")
        try:
            name, config = form_config(form, runs_dir, data_dir, models)
            record = await asyncio.to_thread(launcher.start, name, config)
        except ConfigError as e:  # the CLI prints exactly "error: {e}"
            return _error(400, str(e), "invalid_config")
        except R.PathError as e:
            return _error(400, str(e), "bad_path")
        except FileExistsError as e:
            return _error(409, str(e), "exists")
        return {"name": name, "pid": record["pid"], "status": "running"}

    @api.post("/runs/{name:path}/stop")
    def stop(name: str):
        run_path(name)
        if not launcher.stop(name):
            return _error(409, f"run {name!r} is not running", "not_running")
        return {"name": name, "stopping": True}

    @api.get("/runs/{name:path}/adapter.zip")
    def adapter_zip(name: str):
        adapter = run_path(name) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            return _error(404, f"run {name!r} has no adapter (yet)", "not_found")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(adapter.iterdir()):
                if f.is_file() and not f.is_symlink():
                    z.write(f, f"{Path(name).name}/{f.name}")
        filename = Path(name).name.replace('"', "") + "-adapter.zip"
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @api.get("/adapters")
    def adapters():
        root = getattr(engine, "adapters_dir", None)
        found = [] if root is None else sorted(
            p.parent.relative_to(root).as_posix() for p in Path(root).glob("**/adapter_config.json")
            if R.UI_DIR not in p.parts and len(p.relative_to(root).parts) <= 4)
        served = engine.adapter_names() if engine is not None else []
        return {"adapters_dir": str(root) if root else None, "available": found[:500], "served": served}

    router = APIRouter()
    router.include_router(api)

    @router.get("/ui", include_in_schema=False)
    def ui_root():
        return RedirectResponse("/ui/")

    @router.get("/ui/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    return router, launcher


def mount(app: FastAPI, runs_dir: str | Path, data_dir: str | Path, models: dict[str, str], engine=None,
          api_key: str | None = None) -> Launcher:
    """Add the dashboard to a serve app (loraforge.serve.api.create_app)."""
    router, launcher = create_router(runs_dir, data_dir, models, engine, api_key)

    @app.exception_handler(_Denied)
    async def _denied(request: Request, exc: _Denied):
        return _error(*exc.args)

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    return launcher


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_host(host: str, api_key: str | None) -> None:
    """Only a loopback address may go without a key: anyone who reaches the port could start runs otherwise."""
    if host not in LOOPBACK and not host.startswith("127.") and not api_key:
        raise ConfigError([f"--host {host}: the dashboard starts processes and reads files; listening beyond this "
                           f"machine needs --api-key KEY (or keep the default --host 127.0.0.1)"])


def training_models(model: str, models_dir: str | None) -> dict[str, str]:
    """What the form offers as base models: the served one, and each transformers directory in models_dir."""
    offered = {Path(model).name if Path(model).is_dir() else model: str(Path(model).resolve())
               if Path(model).is_dir() else model}
    if models_dir:
        for p in sorted(Path(models_dir).resolve().iterdir()):
            if (p / "config.json").is_file():
                offered.setdefault(p.name, str(p))
    return offered


def run_ui(model: str = "smollm2-135m", runs: str = "runs", data_dir: str = ".", adapters_dir: str | None = None,
           models_dir: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
           dtype: str = "auto", precision: str = "auto") -> None:
    """Serve the dashboard and the OpenAI-compatible API over one base model until interrupted."""
    import uvicorn

    check_host(host, api_key)
    Path(runs).mkdir(parents=True, exist_ok=True)
    chosen = choose(precision, dtype, device="cpu")
    print(chosen.line(), flush=True)
    base, tokenizer = load_base(model, dtype=chosen.storage)
    engine = Engine(base, tokenizer, base_name=model, adapters_dir=adapters_dir or runs)
    app = create_app(engine, api_key=api_key)
    mount(app, runs, data_dir, training_models(model, models_dir), engine, api_key)
    print(f"dashboard on http://{host}:{port}/ui/ (runs: {Path(runs).resolve()}, datasets: "
          f"{Path(data_dir).resolve()}); API on http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()
