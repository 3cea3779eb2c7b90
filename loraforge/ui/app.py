"""The dashboard's HTTP side: a FastAPI router under /ui mounted on the serve app (loraforge.serve.api).

Page: GET /ui/ (static index.html, app.js, style.css, vendored uPlot). JSON under /ui/api/, each needing
`Authorization: Bearer <key>` when the server has an API key:
  GET  info                      served model, models and dataset files the form offers
  GET  runs                      every run with its status, config and whether Stop applies (stoppable)
  GET  runs/{name}/metrics       metrics.jsonl rows from ?offset= on
  GET  runs/{name}/events        the same as server-sent events while the run may still write rows, then `event: end`
  GET  runs/{name}/extras        AdaLoRA ranks, forgetting report, the tail of train.log
  POST runs                      start a run from the form (400 with the CLI's message for a bad value)
  POST runs/{name}/stop          SIGINT: the run finishes its step, checkpoints it and stops; ?force=true, for a run
                                 already asked to stop: SIGTERM, which interrupts the step ("Stop now")
  GET  runs/{name}/adapter.zip   the run's adapter directory as a zip
  GET  adapters                  adapter directories under the server's adapters_dir (for POST /v1/adapters), the
                                 served ones, and what loading each warns (a QLoRA adapter over the full base)
The playground and adapter loading use the OpenAI-compatible /v1 endpoints themselves. Every name or path from
the browser is resolved inside its folder (runs.inside); nothing from it reaches a shell or eval. RequestGuard
keeps other web pages out (CSRF, DNS rebinding).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from loraforge.config import ConfigError
from loraforge.models import load_base
from loraforge.precision import choose
from loraforge.serve.api import (HEADER_TIMEOUT_S, MAX_CONNECTIONS, BodyLimit, check_port, create_app, key_ok,
                                 run_until_signal, url_host)
from loraforge.serve.engine import Engine
from loraforge.serve.errors import shown
from loraforge.serve.guard import RequestGuard, refused as _error
from loraforge.ui import runs as R
from loraforge.ui.launch import DATA_SUFFIXES, METHODS, SKIPPED_DIRS, Launcher, form_config, offered
from loraforge.utils.files import DiskError

STATIC = Path(__file__).parent / "static"
MAX_DATASETS = 500
MAX_WALKED_DIRS = 2000  # folders the dataset list looks into: a huge --data-dir does not stall each page load
EVENT_BYTES = 1 << 20  # metrics.jsonl per server-sent event: a 100k-row file goes in pieces, not in one 13 MB event
FOLLOW_IDLE_S = 60.0  # a run not launched from the page is followed until its metrics.jsonl has rested this long
LOG_TAIL = 4000  # bytes of train.log the extras show
FORM_BYTES = 1 << 16  # a request body on /ui/api (the start-run form: a few short fields)
METRICS_BYTES = 4 << 20  # metrics.jsonl per /metrics answer: a longer file is read in pieces, by offset
ADAPTER_DEPTH = 3  # folders below adapters_dir the adapter list looks into (sweep/NAME/adapter)

class _Denied(Exception):
    def __init__(self, status: int, message: str, code: str):
        self.args = (status, message, code)


def dataset_files(data_dir: Path, runs_dir: Path) -> list[str]:
    """What the form offers as datasets: the files under `data_dir` that `train` reads (by suffix), sorted, at most
    MAX_DATASETS. Hidden files and folders, the runs folder (wherever it lies), SKIPPED_DIRS, links out of
    `data_dir` and links to what the form would refuse (launch.offered: a hidden file, a FIFO) are left out; at most
    MAX_WALKED_DIRS folders are looked into."""
    found = []
    for walked, (folder, dirs, files) in enumerate(os.walk(data_dir)):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS
                         and Path(folder, d).resolve() != runs_dir and not R.is_run(Path(folder, d)))
        found += [Path(folder, f).relative_to(data_dir) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in DATA_SUFFIXES]
        if walked + 1 >= MAX_WALKED_DIRS:
            break
    kept = R.listable((p.as_posix() for p in found if (real := R.within(data_dir, p)) is not None
                       and offered(data_dir, runs_dir, real.resolve())), "datasets")
    return sorted(kept)[:MAX_DATASETS]


def adapter_folders(root: Path) -> list[str]:
    """The folders under `root` holding an adapter_config.json, at most ADAPTER_DEPTH below it (NAME, NAME/adapter,
    sweep/NAME/adapter), none in .ui, as paths relative to it. os.walk passes over a folder removed while it is
    walked, where Path.glob raised (soak: a run deleting its older checkpoint made the page's list a 500)."""
    found = []
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = [d for d in dirs if d != R.UI_DIR] if depth < ADAPTER_DEPTH else []
        if "adapter_config.json" in files:
            found.append(Path(folder).relative_to(root).as_posix())
    return found


def attachment(filename: str) -> str:
    """Content-Disposition of a download named `filename`, whatever its characters: an ASCII fallback, and the name
    itself in UTF-8 as filename* (RFC 6266 / RFC 5987)."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def create_router(runs_dir: str | Path, data_dir: str | Path, models: dict[str, str], engine=None,
                  api_key: str | None = None) -> tuple[APIRouter, Launcher]:
    """The /ui routes over `runs_dir` (runs), `data_dir` (dataset files) and `models` (name offered -> model.name)."""
    runs_dir, data_dir = Path(runs_dir).resolve(), Path(data_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(runs_dir)

    def auth(request: Request) -> None:
        if api_key is not None and not key_ok(request.headers.get("authorization", ""), api_key):
            raise _Denied(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                          "invalid_api_key")

    def run_path(given: str) -> tuple[Path, str]:
        """The run's directory and its name as the runs folder spells it ('a/../b' is 'b'); 400 or 404 else."""
        try:
            path = R.inside(runs_dir, given, must_exist=False)
        except R.PathError as e:
            raise _Denied(400, str(e), "bad_path") from None
        name = path.relative_to(runs_dir).as_posix()
        if R.UI_DIR in Path(name).parts or not (path.exists() or R.meta_file(runs_dir, name, "launch.json")):
            raise _Denied(404, f"no run {shown(given)} in {runs_dir}", "not_found")
        return path, name

    def status(path: Path, name: str) -> str:
        if name in launcher.running():
            return "running"
        launcher.settle(name)
        return R.status(path, R.read_launch(runs_dir, name))

    def check_offset(path: Path, name: str, offset: int) -> None:
        size = R.metrics_size(path)
        if not 0 <= offset <= size:
            raise _Denied(400, f"offset {offset}: not a position in {name}/metrics.jsonl, which holds {size} bytes; "
                               f"read it from offset=0", "bad_offset")

    api = APIRouter(prefix="/ui/api", dependencies=[Depends(auth)])

    @api.get("/info")
    def info():
        return {"model": getattr(engine, "base_name", None), "models": list(models),
                "datasets": dataset_files(data_dir, runs_dir), "methods": list(METHODS), "auth": api_key is not None}

    @api.get("/runs")
    def runs():
        launcher.settle_all()
        return JSONResponse({"runs": R.list_runs(runs_dir, launcher.running())})

    @api.get("/runs/{name:path}/metrics")
    def metrics(name: str, offset: int = 0):
        path, name = run_path(name)
        check_offset(path, name, offset)
        rows, end = R.read_metrics(path, offset, METRICS_BYTES)  # more: call again from `offset`
        return JSONResponse({"rows": rows, "offset": end, "status": status(path, name)})

    @api.get("/runs/{name:path}/events")
    async def events(name: str, offset: int = 0, interval: float = 0.5, file: str | None = None,
                     budget: float = 0.0):
        """budget > 0: after that many seconds an unfinished stream closes with a `pause` event (its offset) for
        the page to reconnect from. A browser holds 6 connections per host: the page shares a few among any
        number of ticked runs, each for a slice, and keeps the rest for its other requests."""
        path, name = await asyncio.to_thread(run_path, name)
        await asyncio.to_thread(check_offset, path, name, offset)
        interval = min(max(interval, 0.1), 5.0)
        following = file or await asyncio.to_thread(R.metrics_file_id, path)  # `file`: a reconnect's, from events

        def step(pos: int) -> tuple[str, int, bool, bool]:
            """In a worker thread (files, /proc, JSON): the event's text, the new offset, more to read at once, done.
            Done when nothing more will come: the run is not running, and, if nothing says how it ended (a run
            started in a terminal), its metrics.jsonl has not grown for FOLLOW_IDLE_S. When the file was replaced
            or cut shorter than `pos` (a run started over in the folder), a `reset` event: read it from 0 again."""
            nonlocal following
            state, now = status(path, name), R.metrics_file_id(path)
            if pos and (now != following or R.metrics_size(path) < pos):
                following = now
                data = json.dumps({"rows": [], "offset": 0, "file": now, "status": state})
                return f"event: reset\ndata: {data}\n\n", 0, True, False
            following = now
            rows, end = R.read_metrics(path, pos, EVENT_BYTES)
            more = end - pos >= EVENT_BYTES
            done = not more and state != "running" and (state != "unknown" or R.metrics_age(path) >= FOLLOW_IDLE_S)
            data = json.dumps({"rows": rows, "offset": end, "file": now, "status": state}, allow_nan=False)
            return f"event: end\ndata: {data}\n\n" if done else f"data: {data}\n\n" if rows else "", end, more, done

        async def stream():
            pos, until = offset, time.monotonic() + budget
            while True:
                text, pos, more, done = await asyncio.to_thread(step, pos)
                if text:
                    yield text
                if done:
                    return
                if budget > 0 and time.monotonic() >= until:
                    state = await asyncio.to_thread(status, path, name)
                    data = json.dumps({"rows": [], "offset": pos, "file": following, "status": state})
                    yield f"event: pause\ndata: {data}\n\n"
                    return
                if not more:
                    yield ": keep-alive\n\n"
                    await asyncio.sleep(interval)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/runs/{name:path}/extras")
    def extras(name: str):
        path, name = run_path(name)
        return {"ranks": R.rank_pattern(path), "forgetting": R.forgetting(path),
                "log": R.tail(R.meta_file(runs_dir, name, "train.log"), LOG_TAIL)}

    @api.post("/runs")
    async def start(request: Request):
        try:
            form = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON", "invalid_json")
        except ValueError:  # Python's int() limit: "Exceeds the limit (4300 digits) ..." (valid JSON)
            return _error(400, "the request body has a number too long to read (over 4,300 digits); send the form's "
                               "numbers as short numbers or strings", "invalid_json")
        except RecursionError:  # json parses [ and { recursively: ~1,000 levels reach Python's limit
            return _error(400, "the request body is nested too deeply (hundreds of [ or { levels); send the form as "
                               "a JSON object of plain values", "invalid_json")
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
        except DiskError as e:  # the runs folder takes no new run (read-only, full)
            return _error(507, str(e), "cannot_write")
        return {"name": name, "pid": record["pid"], "status": "running"}

    @api.post("/runs/{name:path}/stop")
    def stop(name: str, force: bool = False):
        path, name = run_path(name)
        launch = R.read_launch(runs_dir, name)
        if not launch:
            if (pid := R.writer_pid(path)) is not None:
                return _error(409, f"run {name!r} was not started from the dashboard (process {pid}): stop it where "
                                   f"it runs (Ctrl-C, or kill {pid})", "not_launched")
            return _error(409, f"run {name!r} was not started from the dashboard: stop it where it runs (Ctrl-C, "
                               f"or kill its process)", "not_launched")
        try:
            stopping = launcher.stop(name, force=force)
        except ValueError as e:
            return _error(409, str(e), "not_stopping")
        if not stopping:
            if R.continued(path, launch) and (pid := R.writer_pid(path)) is not None:
                return _error(409, f"run {name!r} was continued outside the dashboard (process {pid}): stop it where "
                                   f"it runs (Ctrl-C, or kill {pid})", "not_launched")
            ended = R.status(path, R.read_launch(runs_dir, name))  # finished, stopped or failed
            return _error(409, f"run {name!r} has already ended ({ended}): there is nothing to stop", "not_running")
        return {"name": name, "stopping": True}

    @api.get("/runs/{name:path}/adapter.zip")
    def adapter_zip(name: str):
        path, name = run_path(name)
        files = R.adapter_files(path)
        if not files:
            return _error(404, f"run {name!r} has no adapter (yet)", "not_found")
        # written to a temporary file, not memory (an adapter can be GBs), deleted once sent; stored, not deflated:
        # safetensors weights barely compress, and deflating 400 MB held the first byte back for 20 s
        fd, tmp = tempfile.mkstemp(prefix="loraforge-adapter-", suffix=".zip")
        try:
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
                for f in files:
                    z.write(f, f"{path.name}/{f.name}")
        except BaseException:
            os.unlink(tmp)
            raise
        return FileResponse(tmp, media_type="application/zip", background=BackgroundTask(os.unlink, tmp),
                            headers={"Content-Disposition": attachment(f"{path.name}-adapter.zip")})

    @api.get("/adapters")
    def adapters():
        root = getattr(engine, "adapters_dir", None)
        found = [] if root is None else sorted(R.listable(adapter_folders(Path(root)), "adapters"))
        served = engine.adapter_names() if engine is not None else []
        warned = engine.adapter_warnings() if engine is not None else {}
        return {"adapters_dir": str(root) if root else None, "available": found[:500], "served": served,
                "warnings": warned}

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
          api_key: str | None = None, host: str | None = None) -> Launcher:
    """Add the dashboard to a serve app (loraforge.serve.api.create_app), behind RequestGuard; `host`: the address
    the server listens on (--host), for the Host check."""
    router, launcher = create_router(runs_dir, data_dir, models, engine, api_key)

    @app.exception_handler(_Denied)
    async def _denied(request: Request, exc: _Denied):
        return _error(*exc.args)

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    app.add_middleware(BodyLimit, limit=FORM_BYTES, why="a run's form", prefix="/ui/api/",
                       fix="the form's fields are short")  # a body is read whole before a route sees it
    app.add_middleware(RequestGuard, host=host)
    return launcher


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_host(host: str, api_key: str | None) -> None:
    """Only a loopback address may go without a key: anyone who reaches the port could start runs otherwise."""
    if host not in LOOPBACK and not host.startswith("127.") and not api_key:
        raise ConfigError([f"--host {host}: the dashboard starts processes and reads files; listening beyond this "
                           f"machine needs a key: set LORAFORGE_API_KEY (or --api-key KEY, which the machine's other "
                           f"users can read in ps), or keep the default --host 127.0.0.1"])


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
           dtype: str = "auto", precision: str = "auto", header_timeout: float = HEADER_TIMEOUT_S,
           max_connections: int = MAX_CONNECTIONS, quantize: str | None = None) -> None:
    """Serve the dashboard and the OpenAI-compatible API over one base model until interrupted. header_timeout,
    max_connections, quantize: run_server's (a request's headers and each pause in its body; connections open at
    once; the base stored by bitsandbytes)."""
    check_host(host, api_key)
    check_port(host, port)  # a port already taken: one line, before the model loads
    Path(runs).mkdir(parents=True, exist_ok=True)
    chosen = choose(precision, dtype, device="cpu", names=("--precision", "--dtype"), training=False)
    print(chosen.line(training=False), flush=True)
    base, tokenizer = load_base(model, dtype=chosen.storage, quantize=quantize)
    engine = Engine(base, tokenizer, base_name=model, adapters_dir=adapters_dir or runs)
    app = create_app(engine, api_key=api_key)
    mount(app, runs, data_dir, training_models(model, models_dir), engine, api_key, host)

    def announce(listening: int) -> None:  # once it listens: the URL works, and port 0's real port is known
        where = f"http://{url_host(host)}:{listening}"
        print(f"dashboard on {where}/ui/ (runs: {Path(runs).resolve()}, datasets: {Path(data_dir).resolve()}); API "
              f"on {where}/v1", flush=True)
    try:
        run_until_signal(app, host, port, log_level="warning", header_timeout=header_timeout,
                         max_connections=max_connections, announce=announce)
    finally:
        engine.stop(timeout=0 if app.state.forced else 10)  # a second Ctrl-C waits for no step to end
