"""The dashboard's HTTP side (loraforge.ui) without a browser: the key on every endpoint the page uses, paths
confined to their folders, the form's errors equal to the CLI's, and stop keeping the last checkpoint; other web
pages kept out (CSRF, DNS rebinding), Stop only for the process launched, files linked out of a run not read, odd
metrics rows, live following of runs started in a terminal, and Ctrl-C with a stream open.

The server is the real one: the serve app over a tiny random Llama (with SmolLM2's tokenizer) and the /ui router,
on uvicorn at 127.0.0.1 on a free port.
"""

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import default_recursion_limit, env_when_base_loads, output_held_elsewhere, save_adapters
from ports import listening_port
from loraforge import cli
from loraforge.config import ConfigError, LoraConfig, load_train_config
from loraforge.lora.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, write_adapter_dir
from loraforge.precision import ONEDNN_CACHES
from loraforge.serve.api import SHUTDOWN_GRACE_S
from loraforge.training.checkpoint import last_checkpoint, verify_checkpoint
from loraforge.training.loop import build_model
from loraforge.ui import app as ui_app
from loraforge.ui import launch
from loraforge.ui import runs as R
from loraforge.ui.launch import form_config

KEY = "sk-ui-test"


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_dir):
    """(url, root): runs in root/runs, datasets in root/data, a secret file beside them that must stay unreachable."""
    from loraforge.models import load_base
    from loraforge.serve import Engine
    from loraforge.serve.api import ServerThread, create_app
    from loraforge.ui.app import mount

    root = tmp_path_factory.mktemp("ui")
    (root / "runs").mkdir()
    (root / "data").mkdir()
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(8) for b in range(5)]
    (root / "data" / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "secret.jsonl").write_text(json.dumps({"text": "TOPSECRET-CONTENT"}) + "\n")
    base, tokenizer = load_base(str(tiny_dir), dtype="fp32")
    engine = Engine(base, tokenizer, base_name="tiny", adapters_dir=root / "runs")
    app = create_app(engine, api_key=KEY)
    launcher = mount(app, root / "runs", root / "data", {"tiny": str(tiny_dir)}, engine, KEY)
    with ServerThread(app) as url:
        yield url, root
    engine.stop()
    for proc in list(launcher.procs.values()):  # runs a failed test left going (one of 100000 steps would go on)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def call(ui, method, path, key=KEY, headers=None, **kw):
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.request(method, ui[0] + path, headers=headers, timeout=60, **kw)


def form(**changes):
    values = {"name": "r1", "model": "tiny", "dataset": "add.jsonl", "method": "lora", "r": "4", "lora_alpha": "8",
              "target_modules": "q_proj, v_proj", "lr": "1e-3", "max_steps": "4", "batch_size": "4",
              "save_every": "2"}
    values.update(changes)
    return values


def fake_run(root, name="done"):
    """A finished run as train leaves it: metrics and an adapter directory."""
    run = root / "runs" / name
    (run / "adapter").mkdir(parents=True, exist_ok=True)
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    return run


ENDPOINTS = [("GET", "/ui/api/info"), ("GET", "/ui/api/runs"), ("GET", "/ui/api/runs/done/metrics"),
             ("GET", "/ui/api/runs/done/events"), ("GET", "/ui/api/runs/done/extras"),
             ("POST", "/ui/api/runs"), ("POST", "/ui/api/runs/done/stop"), ("GET", "/ui/api/runs/done/adapter.zip"),
             ("GET", "/ui/api/adapters"), ("GET", "/v1/models"), ("POST", "/v1/adapters"),
             ("DELETE", "/v1/adapters/x"), ("POST", "/v1/chat/completions")]


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_every_endpoint_the_page_uses_needs_the_key(ui, method, path):
    fake_run(ui[1])
    body = {"json": {}} if method == "POST" else {}
    for key in (None, "wrong", KEY + "x"):
        r = call(ui, method, path, key=key, **body)
        assert r.status_code == 401, (path, key, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = call(ui, method, path, **body)
    assert r.status_code != 401, r.text


def test_the_page_itself_and_its_scripts_load_without_the_key(ui):
    page = httpx.get(ui[0] + "/ui/")
    assert page.status_code == 200 and "uPlot.iife.min.js" in page.text
    for asset in ("/ui/static/app.js", "/ui/static/style.css", "/ui/static/vendor/uplot/uPlot.iife.min.js"):
        assert httpx.get(ui[0] + asset).status_code == 200


RUN_NAMES = ["..", "../secret.jsonl", "..%2F..%2Fsecret.jsonl", "%2Fetc%2Fpasswd", "done/../../secret.jsonl",
             ".ui/done", "escape", "escape/adapter"]


@pytest.mark.parametrize("suffix", ["metrics", "events", "extras", "stop", "adapter.zip"])
def test_run_names_cannot_leave_the_runs_folder(ui, suffix):
    root = ui[1]
    fake_run(root)
    outside = root / "outside"
    fake_run(root, "../outside")  # a run-like directory outside the runs folder, reached by a link inside it
    if not (root / "runs" / "escape").exists():
        (root / "runs" / "escape").symlink_to(outside)
    for name in RUN_NAMES:
        method = "POST" if suffix == "stop" else "GET"
        r = call(ui, method, f"/ui/api/runs/{name}/{suffix}")
        assert r.status_code in (400, 404), (name, suffix, r.status_code, r.text)
        assert b"TOPSECRET" not in r.content and b"LORA" not in r.content and b"2.5" not in r.content
    assert call(ui, "GET", f"/ui/api/runs/done/{suffix}" if suffix != "stop" else "/ui/api/runs").status_code == 200


@pytest.mark.parametrize("field,value", [("dataset", "../secret.jsonl"), ("dataset", "/etc/passwd"),
                                         ("dataset", "sub/../../secret.jsonl"), ("model", "/etc"),
                                         ("model", "../tiny"), ("name", "../escape"), ("name", ".ui"),
                                         ("name", "a/b"), ("name", "nl\n"), ("name", None), ("name", 5),
                                         ("dataset", "\ud800.jsonl")])  # soak: the last four were runs, or a 500
def test_the_form_refuses_paths_outside_its_folders(ui, field, value):
    before = sorted(ui[1].rglob("*"))
    r = call(ui, "POST", "/ui/api/runs", content=json.dumps(form(**{field: value})).encode(),  # \ud800 escaped
             headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_path", r.text
    assert sorted(ui[1].rglob("*")) == before  # nothing written anywhere



@pytest.mark.parametrize("dataset", [".env", ".aws/credentials.json", "sub/../.hidden.jsonl", "notes.txt",
                                     "node_modules/x.jsonl", "pipe.jsonl", "linked.jsonl"])
def test_the_form_takes_only_the_kind_of_dataset_it_offers(ui, dataset):
    """Soak: the form's dataset could be any file under the data folder, hidden ones too (.env, .aws/...): the run's
    log showed the page their fields, and its adapter, which the page downloads, learnt them. It takes what the
    page lists: data files (.jsonl .json .csv .parquet), not hidden, not in a hidden folder (a link resolved);
    a FIFO, which would hold the run, is no file either."""
    data = ui[1] / "data"
    for name in (".env", ".aws/credentials.json", ".hidden.jsonl", "notes.txt", "node_modules/x.jsonl"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(json.dumps({"text": "TOPSECRET"}) + "\n")
    (data / "sub").mkdir(exist_ok=True)
    if not (data / "pipe.jsonl").exists():
        os.mkfifo(data / "pipe.jsonl")
        (data / "linked.jsonl").symlink_to(data / ".hidden.jsonl")
    before = sorted(ui[1].rglob("*"))
    r = call(ui, "POST", "/ui/api/runs", json=form(name="sneaky", dataset=dataset))
    assert r.status_code == 400 and r.json()["error"] == {
        "message": f"dataset {dataset!r}: not a dataset the form offers; give one of the .jsonl, .json, .csv, "
                   f".parquet files in {data}, outside hidden folders and the runs folder",
        "type": "invalid_request_error", "code": "bad_path"}
    assert sorted(ui[1].rglob("*")) == before  # nothing started
    assert dataset not in call(ui, "GET", "/ui/api/info").json()["datasets"]

def test_another_runs_folder_under_the_data_folder_offers_none_of_its_files(tmp_path):
    """Docs soak: with --data-dir holding runs (not the dashboard's --runs), the list offered their
    adapter_config.json, manifest.json and trainer_state.json as datasets."""
    from loraforge.ui.app import dataset_files
    from loraforge.ui.launch import dataset_path
    from loraforge.ui.runs import PathError

    data, runs = tmp_path / "data", tmp_path / "runs"
    runs.mkdir()
    run = fake_run(data, "old")  # data/runs/old: metrics.jsonl, adapter/
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    for name in ("manifest.json", "trainer_state.json"):
        (run / "checkpoints" / "step-1" / name).write_text("{}")
    (data / "add.jsonl").write_text('{"text": "a"}\n')
    (data / "sets").mkdir()
    (data / "sets" / "chat.json").write_text('[{"text": "b"}]')
    assert dataset_files(data, runs) == ["add.jsonl", "sets/chat.json"]
    for given in ("runs/old/adapter/adapter_config.json", "runs/old/checkpoints/step-1/manifest.json",
                  "runs/old/metrics.jsonl"):
        with pytest.raises(PathError, match="not a dataset the form offers"):
            dataset_path(data, runs, given)
    assert dataset_path(data, runs, "sets/chat.json") == (data / "sets" / "chat.json").resolve()

@pytest.mark.parametrize("path", ["../secret.jsonl", "/etc", "../../", "escape"])
def test_adapter_loading_is_confined_to_the_adapters_dir(ui, path):
    r = call(ui, "POST", "/v1/adapters", json={"name": "evil", "path": path})
    assert 400 <= r.status_code < 500, r.text
    assert "evil" not in [m["id"] for m in call(ui, "GET", "/v1/models").json()["data"]]


def test_a_metrics_line_nested_too_deep_is_skipped_like_a_damaged_one(ui):
    run = fake_run(ui[1], "deepline")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n' + "[" * 100_000 + "]" * 100_000 +
                                       '\n{"step": 2, "loss": 0.5}\n')
    r = call(ui, "GET", "/ui/api/runs/deepline/metrics")
    assert r.status_code == 200 and r.json()["rows"] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_metrics_come_in_bounded_pieces_and_a_giant_line_is_passed_over(ui, monkeypatch):
    """/metrics read the whole file at once (a 300 MB file: 300 MB and more of server memory per call), and the
    events re-read an unterminated giant last line whole at every poll. Now both read pieces of a bounded size."""
    monkeypatch.setattr(ui_app, "METRICS_BYTES", 1000)
    monkeypatch.setattr(ui_app, "EVENT_BYTES", 1000)
    monkeypatch.setattr(ui_app.R, "MAX_LINE", 20_000)
    run = fake_run(ui[1], "giant")
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(200)]
    giant = '{"step": 999, "pad": "' + "y" * 50_000 + '"}\n'
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:100]) + giant
                                       + "".join(json.dumps(r) + "\n" for r in rows[100:]))
    got, offset, calls = [], 0, 0
    while True:
        r = call(ui, "GET", f"/ui/api/runs/giant/metrics?offset={offset}").json()
        calls += 1
        if r["offset"] == offset:
            break
        got += r["rows"]
        offset = r["offset"]
    assert got == rows and offset == (run / "metrics.jsonl").stat().st_size and calls > 10
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 1000, "pad": "' + "z" * 50_000)  # a giant line still being written: left for later
    assert call(ui, "GET", f"/ui/api/runs/giant/metrics?offset={offset}").json()["offset"] == offset


def test_a_ui_api_body_past_the_forms_size_is_refused_before_it_is_read(ui):
    r = call(ui, "POST", "/ui/api/runs", json=form(name="x" * 100_000))
    assert r.status_code == 413 and r.json()["error"]["message"] == (
        f"the request body is {len(r.request.content)} bytes; this server takes at most 65536 bytes (a run's form); "
        f"the form's fields are short")


def test_metrics_rows_from_an_offset_leave_a_cut_off_line(ui):
    fake_run(ui[1])
    first = call(ui, "GET", "/ui/api/runs/done/metrics").json()
    assert [r["loss"] for r in first["rows"]] == [2.5, 2.0]
    assert first["status"] == "finished"
    again = call(ui, "GET", f"/ui/api/runs/done/metrics?offset={first['offset']}").json()
    assert again["rows"] == [] and again["offset"] == first["offset"]


def test_the_adapter_zip_holds_the_adapter_files(ui):
    run = fake_run(ui[1])
    r = call(ui, "GET", "/ui/api/runs/done/adapter.zip")
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert {n: z.read(n) for n in z.namelist()} == {f"done/{f.name}": f.read_bytes()
                                                    for f in (run / "adapter").iterdir()}


def test_the_adapter_zip_is_stored_and_sent_from_a_file_not_built_in_memory(ui, tmp_path, monkeypatch):
    """A 400 MB adapter was deflated into memory (RSS +1.2 GB, first byte after 22 s): now stored (safetensors
    barely compress) into a temporary file, sent with its length and deleted once sent."""
    run = fake_run(ui[1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the server (a thread here) writes the zip
    r = call(ui, "GET", "/ui/api/runs/done/adapter.zip")
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert {i.filename: i.compress_type for i in z.infolist()} == {
        f"done/{f.name}": zipfile.ZIP_STORED for f in (run / "adapter").iterdir()}
    assert int(r.headers["content-length"]) == len(r.content)  # a file response: its length known before sending
    wait_for(lambda: not any(tmp_path.iterdir()), timeout=10)  # the temporary zip is gone


@pytest.mark.parametrize("changes", [{"r": "0"}, {"lr": "fast"}, {"method": "lorax"}, {"max_steps": "-3"},
                                     {"r": "0", "lora_alpha": "[1]"}, {"max_seq_len": "4"}])
def test_a_bad_form_value_gets_the_clis_message(ui, tmp_path, capsys, changes):
    r = call(ui, "POST", "/ui/api/runs", json=form(name="bad", **changes))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_config", r.text
    # the same values in a YAML file given to `loraforge train`
    _, config = form_config(form(name="bad", **changes), ui[1] / "runs", ui[1] / "data", {"tiny": "tiny"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err == "error: " + r.json()["error"]["message"] + "\n"
    assert not (ui[1] / "runs" / "bad").exists() and not (ui[1] / "runs" / ".ui" / "bad").exists()


def test_the_forms_max_seq_len_sets_data_max_seq_len(ui):
    # the form could not set it: examples over 512 tokens were cut at 512, whatever the data
    _, config = form_config(form(name="long", max_seq_len="2048"), ui[1] / "runs", ui[1] / "data", {"tiny": "tiny"})
    assert config["data"]["max_seq_len"] == 2048
    _, config = form_config(form(name="default", max_seq_len=" "), ui[1] / "runs", ui[1] / "data", {"tiny": "tiny"})
    assert "max_seq_len" not in config["data"]


def wait_for(fn, timeout=90, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def test_stop_ends_the_run_and_keeps_its_last_checkpoint(ui):
    r = call(ui, "POST", "/ui/api/runs", json=form(name="long", max_steps="100000", save_every="3"))
    assert r.status_code == 200, r.text
    run = ui[1] / "runs" / "long"
    wait_for(lambda: last_checkpoint(run / "checkpoints"))
    assert call(ui, "POST", "/ui/api/runs/long/stop").json()["stopping"] is True
    status = wait_for(lambda: (s := call(ui, "GET", "/ui/api/runs/long/metrics").json()["status"]) != "running" and s)
    assert status == "stopped"
    launch = json.loads((ui[1] / "runs" / ".ui" / "long" / "launch.json").read_text())
    assert launch["exit_code"] == 130  # the CLI's exit on SIGINT (128 + 2): train stopped itself, not killed
    last = last_checkpoint(run / "checkpoints")
    assert last is not None and verify_checkpoint(last) is None
    said = (ui[1] / "runs" / ".ui" / "long" / "train.log").read_text().splitlines()[-1]
    assert said.startswith(f"stopped by SIGINT after step {int(last.name[5:])} of 100000: checkpoint ")
    assert said.endswith(f"/checkpoints/{last.name} saved; continue with --resume")  # the newest is the stop's
    assert call(ui, "POST", "/ui/api/runs/long/stop").status_code == 409  # not running any more
    again = call(ui, "POST", "/ui/api/runs", json=form(name="long"))
    assert again.status_code == 409  # a name is never reused over an earlier run; the message says how to go on
    assert again.json()["error"]["message"].endswith(
        f"stopped with a checkpoint; choose another name, or continue it with: loraforge train "
        f"{ui[1] / 'runs' / '.ui' / 'long' / 'config.yaml'} --resume")


@pytest.mark.parametrize("argv", [["ui", "--host", "0.0.0.0"], ["serve", "--ui", "--host", "0.0.0.0"],
                                  ["ui", "--host", "192.168.1.5", "--runs", "x"]])
def test_listening_beyond_loopback_needs_a_key(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAFORGE_API_KEY", raising=False)
    assert cli.main(argv) == 2  # refused before any model loads
    err = capsys.readouterr().err
    assert "needs a key: set LORAFORGE_API_KEY (or --api-key KEY" in err and "--host" in err


def test_status_from_the_files_a_run_leaves(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert R.status(run) == "unknown"  # started in a terminal, nothing says how it ended
    assert R.status(run, {"pid": os.getpid(), "exit_code": None}) == "failed"  # this process is not a loraforge run
    assert R.status(run, {"pid": 1, "exit_code": 0}) == "finished"
    for code in (130, 143, 138, 129, -2, -15, -10, -1):  # the CLI stopped by SIGINT, SIGTERM, SIGUSR1, SIGHUP (128 +
        assert R.status(run, {"pid": 1, "exit_code": code}) == "stopped"  # the signal's number), or killed by one
    assert R.status(run, {"pid": 1, "exit_code": 2}) == "failed"
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    assert R.status(run) == "finished"


@pytest.mark.parametrize("argv", [["ui"], ["serve", "--ui"]])
def test_ui_and_serve_ui_mount_the_dashboard(argv, tiny_dir, tmp_path, monkeypatch):
    apps = []
    def start(app, host, port, log_level, **limits):  # start-up only
        apps.append((app, {"host": host, "port": port}))

    monkeypatch.setattr(ui_app, "run_until_signal", start)
    monkeypatch.setattr("loraforge.serve.api.run_until_signal", start)
    monkeypatch.setattr(ui_app, "check_port", lambda *a: None)  # port 8000 may be another's here
    monkeypatch.setattr("loraforge.serve.api.check_port", lambda *a: None)
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, "--model", str(tiny_dir), "--runs", "myruns", "--api-key", KEY]) == 0
    (app, kw), = apps
    assert kw["host"] == "127.0.0.1"
    client = TestClient(app, base_url="http://127.0.0.1:8000")  # what a browser on this machine sends as Host
    assert client.get("/ui/api/runs").status_code == 401
    assert client.get("/ui/api/runs", headers={"Authorization": f"Bearer {KEY}"}).json() == {"runs": []}
    assert (tmp_path / "myruns").is_dir() and client.get("/ui/").status_code == 200
    # both know their --host (any other name in the Host header is refused)
    assert TestClient(app, base_url="http://attacker.example:8000").get("/ui/").status_code == 400


# --- other web pages (CSRF, DNS rebinding) -------------------------------------------------------------------------

def write_launch(root, name, **record):
    """A page run's launch record, as launch.py writes it."""
    meta = root / "runs" / ".ui" / name
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "launch.json").write_text(json.dumps({"exit_code": None, **record}))
    return meta


@pytest.fixture
def victim(ui):
    """A page run that is running: its launch record names this `sleep`, with its command line and start time."""
    proc = subprocess.Popen(["sleep", "60"])
    write_launch(ui[1], "victim", pid=proc.pid, argv=["sleep", "60"], started=time.time())
    yield proc
    proc.kill()
    proc.wait()


ORIGIN_MESSAGE = "a request that changes something must come from this server's own page ({}/ui/); other sites may not"
FOREIGN = [("Origin", "http://localhost:19400"), ("Origin", "null"), ("Origin", "http://127.0.0.1:1"),
           ("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Site", "same-site")]
CHANGES = [("POST", "/ui/api/runs", {"json": form(name="csrf")}), ("POST", "/ui/api/runs/victim/stop", {}),
           ("POST", "/v1/adapters", {"json": {"name": "evil", "path": "done/adapter"}}),
           ("DELETE", "/v1/adapters/x", {})]


@pytest.mark.parametrize("header,value", FOREIGN)
@pytest.mark.parametrize("method,path,body", CHANGES)
def test_another_site_cannot_start_stop_or_load_anything(ui, victim, header, value, method, path, body):
    fake_run(ui[1])
    r = call(ui, method, path, headers={header: value}, **body)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == {"message": f"{header} {value!r}: " + ORIGIN_MESSAGE.format(ui[0]),
                                 "type": "invalid_request_error", "code": "cross_origin"}
    time.sleep(0.2)
    assert victim.poll() is None and not (ui[1] / "runs" / ".ui" / "csrf").exists()
    assert "evil" not in [m["id"] for m in call(ui, "GET", "/v1/models").json()["data"]]


def test_the_pages_own_origin_may_stop_a_run(ui, victim):
    r = call(ui, "POST", "/ui/api/runs/victim/stop", headers={"Origin": ui[0], "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200 and r.json() == {"name": "victim", "stopping": True}
    assert victim.wait(10) == -signal.SIGINT


@pytest.mark.parametrize("kind,shown", [("text/plain", "'text/plain'"), (None, "missing"),
                                        ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'")])
@pytest.mark.parametrize("path", ["/ui/api/runs", "/v1/adapters", "/v1/chat/completions"])
def test_a_body_not_declared_json_is_refused(ui, kind, shown, path):
    body = json.dumps(form(name="plain") if path == "/ui/api/runs" else {"name": "plain", "path": "done/adapter"})
    r = call(ui, "POST", path, headers={"Content-Type": kind} if kind else {}, content=body.encode())
    assert r.status_code == 415, r.text
    assert r.json()["error"] == {"message": f"Content-Type {shown}: send the body as JSON, with the header "
                                            f"'Content-Type: application/json'",
                                 "type": "invalid_request_error", "code": "unsupported_media_type"}
    assert not (ui[1] / "runs" / ".ui" / "plain").exists()


@pytest.mark.parametrize("host", ["attacker.example:{port}", "attacker.example", "127.0.0.1.attacker.example",
                                  "localhost.attacker.example:{port}", "[::1", "", "10.0.0.1:{port}"])
def test_a_host_header_that_is_not_this_server_is_refused(ui, host):
    port = int(ui[0].rsplit(":", 1)[1])
    host = host.format(port=port)
    for method, path in (("GET", "/ui/api/runs"), ("GET", "/ui/"), ("GET", "/v1/models"), ("GET", "/health")):
        r = call(ui, method, path, headers={"Host": host})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"] == {"message": f"Host header {host!r}: not an address this server listens on; open "
                                                f"http://127.0.0.1:{port}/ui/ (localhost and [::1] work too), or start "
                                                f"the server with --host set to the name you use",
                                     "type": "invalid_request_error", "code": "bad_host"}
    for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "localhost:9000",
                 "127.0.0.2"):  # any port: `ssh -L 9000:127.0.0.1:PORT` makes the browser send localhost:9000
        assert call(ui, "GET", "/ui/api/runs", headers={"Host": good}).status_code == 200, good


@pytest.mark.parametrize("bound,allowed,refused", [
    ("0.0.0.0", ["attacker.example:8000", "box.lan:8000"], []),  # beyond loopback needs a key: any name then
    ("box.lan", ["box.lan:8000", "BOX.lan:80", "127.0.0.1:8000"], ["attacker.example:8000", "box.lan.evil:8000"]),
    ("127.0.0.1", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost:9"], ["box.lan:8000"])])
def test_the_host_check_follows_the_address_given_to_host(tmp_path, bound, allowed, refused):
    app = FastAPI()
    ui_app.mount(app, tmp_path / "runs", tmp_path, {"tiny": "tiny"}, host=bound)
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    for host in allowed:
        assert client.get("/ui/api/runs", headers={"Host": host}).status_code == 200, host
    for host in refused:
        assert client.get("/ui/api/runs", headers={"Host": host}).json()["error"]["code"] == "bad_host", host


# --- Stop, and the status of a run whose server was restarted ------------------------------------------------------

def test_stop_signals_only_the_process_launched_for_the_run(ui):
    proc = subprocess.Popen(["sleep", "60"])
    try:  # two ended runs whose process id now belongs to this `sleep`:
        write_launch(ui[1], "reused", pid=proc.pid, started=time.time(),  # another command line
                     argv=[sys.executable, "-m", "loraforge", "train", "config.yaml"])
        write_launch(ui[1], "reused-later", pid=proc.pid, argv=["sleep", "60"],  # the same one, started an hour later
                     started=time.time() - 3600)
        listed = {r["name"]: r["status"] for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}
        assert listed["reused"] == listed["reused-later"] == "failed"  # not running: it has no log saying more
        for name in ("reused", "reused-later"):
            r = call(ui, "POST", f"/ui/api/runs/{name}/stop")
            assert r.status_code == 409
            assert r.json()["error"]["message"] == f"run {name!r} has already ended (failed): there is nothing to stop"
        time.sleep(0.3)
        assert proc.poll() is None  # untouched
        write_launch(ui[1], "its-own", pid=proc.pid, argv=["sleep", "60"], started=time.time())
        listed = {r["name"]: r["status"] for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}
        assert listed["its-own"] == "running"
        assert call(ui, "POST", "/ui/api/runs/its-own/stop").status_code == 200
        assert proc.wait(10) == -signal.SIGINT
    finally:
        proc.kill()
        proc.wait()
    fake_run(ui[1])
    r = call(ui, "POST", "/ui/api/runs/done/stop")  # started in a terminal
    assert r.status_code == 409
    assert r.json()["error"]["message"] == ("run 'done' was not started from the dashboard: stop it where it runs "
                                            "(Ctrl-C, or kill its process)")


@pytest.mark.parametrize("force", [False, True])
def test_stopping_a_run_that_has_ended_says_so_with_its_status(ui, force):
    """Soak: "Stop now" (force) on a page run that had already finished answered "has not been asked to stop: stop
    it first"; a plain Stop said "not running". Both say it has ended, and how."""
    ended = subprocess.Popen(["true"])
    ended.wait()  # an id no process has now
    write_launch(ui[1], "ended-ok", pid=ended.pid, argv=["true"], started=time.time() - 9, exit_code=0, ended=0)
    write_launch(ui[1], "ended-stop", pid=ended.pid, argv=["true"], started=time.time() - 9, exit_code=130,
                 ended=0, stop_requested=time.time() - 5)
    for name, status in [("ended-ok", "finished"), ("ended-stop", "stopped")]:
        r = call(ui, "POST", f"/ui/api/runs/{name}/stop", params={"force": str(force).lower()})
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["message"]) == (
            409, "not_running", f"run {name!r} has already ended ({status}): there is nothing to stop")


@pytest.mark.parametrize("proc_dir", ["/proc", "/no/proc/here"])  # Linux; macOS has no /proc: ps tells
def test_a_process_is_the_launched_one_by_its_command_line_and_start_time(monkeypatch, proc_dir):
    monkeypatch.setattr(R, "PROC", Path(proc_dir))
    proc = subprocess.Popen(["sleep", "60"])
    try:
        record = {"pid": proc.pid, "argv": ["sleep", "60"], "started": time.time(), "exit_code": None}
        assert R.launched_alive(record)
        assert not R.launched_alive({**record, "argv": ["sleep", "61"]})
        assert not R.launched_alive({**record, "exit_code": 0})
        assert not R.launched_alive({**record, "pid": 2**40}) and not R.launched_alive({**record, "pid": -1})
        assert R.launched_alive({**record, "started": time.time() - 3600}) == (proc_dir != "/proc")  # /proc only
    finally:
        proc.kill()
        proc.wait()
    assert not R.launched_alive(record)  # ended



@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="Linux /proc")
def test_a_process_caught_in_exec_is_still_the_launched_one():
    """The kernel wakes the launching parent before the new program's arguments are mapped: /proc shows an empty
    command line for a moment (a third of the full-suite runs on 2 cores said a just-started `sleep 60` was not
    the launched process). Launched and checked at once, many times, every one is the launched process."""
    wrong = []
    for _ in range(100):
        proc = subprocess.Popen(["sleep", "60"])
        try:
            if not R.launched_alive({"pid": proc.pid, "argv": ["sleep", "60"], "started": time.time(),
                                     "exit_code": None}):
                wrong.append(Path(f"/proc/{proc.pid}/cmdline").read_bytes())
        finally:
            proc.kill()
            proc.wait()
    assert wrong == []

STOP_LINE = "stopped by {} after step 7 of 100: checkpoint /r/checkpoints/step-0000007 saved; continue with --resume"
INTERRUPTED_LINE = ("interrupted by SIGTERM after SIGINT, in the middle of a step; the last complete checkpoint is "
                    "kept; continue with --resume")  # StopRequest's second signal, as the CLI prints it


@pytest.mark.parametrize("last,adapter,code,listed", [
    (STOP_LINE.format("SIGINT"), False, 130, "stopped"), (STOP_LINE.format("SIGTERM"), False, 143, "stopped"),
    (STOP_LINE.format("SIGUSR1"), False, 138, "stopped"), (STOP_LINE.format("SIGHUP"), False, 129, "stopped"),
    ("interrupted", False, 130, "stopped"),
    (INTERRUPTED_LINE, False, 143, "stopped"),  # "Stop now" after Stop: SIGTERM interrupted the step
    ("error: training.lr: must be positive", False, 2, "failed"), ("RuntimeError: boom", False, 1, "failed"),
    ("step 100/100 loss 0.1", True, 0, "finished"), ("", False, 1, "failed")])
def test_a_run_that_ended_while_the_server_was_down_gets_its_exit_from_its_log(ui, last, adapter, code, listed):
    ended = subprocess.Popen(["true"])
    ended.wait()  # a launched process that exited while no server waited for it: its exit was never recorded
    name = f"lost-{code}-{listed}-{len(last)}"
    meta = write_launch(ui[1], name, pid=ended.pid, argv=["true"], started=time.time() - 60)
    (meta / "train.log").write_text("step 5/100 loss 1.0\n" + last + "\n")
    if adapter:
        fake_run(ui[1], name)
    statuses = {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}
    assert statuses[name]["status"] == listed and statuses[name]["exit_code"] == code
    record = json.loads((meta / "launch.json").read_text())
    assert record["exit_code"] == code and record["exit_code_from"] == "train.log"  # recorded: no null lingers
    if adapter:
        assert call(ui, "GET", f"/ui/api/runs/{name}/metrics").json()["status"] == listed


# --- files a run links out of the runs folder ----------------------------------------------------------------------

def test_files_a_run_links_out_of_the_runs_folder_are_not_read(ui):
    root = ui[1]
    outside = root / "secrets"
    (outside / "adapter").mkdir(parents=True, exist_ok=True)
    (outside / "adapter" / "adapter_config.json").write_text(
        '{"peft_type": "ADALORA", "rank_pattern": {"TOPSECRET": 1}}')
    (outside / "adapter" / "id_rsa").write_text("TOPSECRET-KEY")
    (outside / "secret.json").write_text(json.dumps({"rows": [{"secret": "TOPSECRET"}], "config": {"s": "TOPSECRET"}}))
    (outside / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "secret": "TOPSECRET"}\n')
    (outside / "train.log").write_text("TOPSECRET log\n")
    run = root / "runs" / "linked"
    shutil.rmtree(run, ignore_errors=True)
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    for link, target in [("adapter", "adapter"), ("forgetting.json", "secret.json"), ("metrics.jsonl", "metrics.jsonl"),
                         ("checkpoints/step-0000001/trainer_state.json", "secret.json")]:
        (run / link).symlink_to(outside / target)
    meta = root / "runs" / ".ui" / "linked-meta"
    meta.mkdir(parents=True, exist_ok=True)
    for link, target in [("train.log", "train.log"), ("config.yaml", "secret.json"), ("launch.json", "secret.json")]:
        if not (meta / link).is_symlink():
            (meta / link).symlink_to(outside / target)
    (root / "runs" / "linked-meta").mkdir(exist_ok=True)
    listed = call(ui, "GET", "/ui/api/runs")
    assert b"TOPSECRET" not in listed.content
    runs = {r["name"]: r for r in listed.json()["runs"]}
    assert {k: runs["linked"][k] for k in ("status", "config", "has_adapter", "has_forgetting")} == \
        {"status": "unknown", "config": None, "has_adapter": False, "has_forgetting": False}
    for name in ("linked", "linked-meta"):
        for suffix in ("metrics", "events", "extras", "adapter.zip"):
            r = call(ui, "GET", f"/ui/api/runs/{name}/{suffix}")
            assert b"TOPSECRET" not in r.content, (name, suffix, r.text)
        assert call(ui, "GET", f"/ui/api/runs/{name}/extras").json() == {"ranks": None, "forgetting": None,
                                                                           "log": None}
    assert call(ui, "GET", "/ui/api/runs/linked/metrics").json()["rows"] == []
    r = call(ui, "GET", "/ui/api/runs/linked/adapter.zip")
    assert r.status_code == 404 and r.json()["error"]["message"] == "run 'linked' has no adapter (yet)"


# --- metrics: odd rows, offsets, live following, long files --------------------------------------------------------

def strict_json(text):
    """JSON as a browser parses it: NaN and Infinity are errors."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON answer"))


def sse(text):
    """(event, data) of each server-sent event with data."""
    events = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if data:
            kind = next((line[7:] for line in lines if line.startswith("event: ")), "message")
            events.append((kind, strict_json("\n".join(data))))
    return events


ODD_LINES = ['{"step": 1, "loss": 2.5, "grad_norm": 1.0}', '{"step": 2, "loss": NaN, "grad_norm": Infinity}',
             '{"step": 3, "loss": 1e999, "grad_norm": -Infinity}', "null", "[1, 2]", '"str"', "7",
             '{"step": "4", "loss": 1.0}', '{"loss": 0.5}', '{"step": true, "loss": 1.0}', '{"step": NaN}',
             "{not json", '{"step": 5, "loss": {"a": Infinity}, "note": "x"}', "\udcff", '{"step": 6.5, "loss": 1.5}']
ODD_ROWS = [{"step": 1, "loss": 2.5, "grad_norm": 1.0}, {"step": 2, "loss": None, "grad_norm": None},
            {"step": 3, "loss": None, "grad_norm": None}, {"step": 5, "loss": {"a": None}, "note": "x"},
            {"step": 6.5, "loss": 1.5}]


def test_rows_the_charts_cannot_use_are_skipped_and_non_finite_numbers_become_null(ui):
    run = fake_run(ui[1], "odd")
    (run / "metrics.jsonl").write_bytes("\n".join(ODD_LINES).encode(errors="surrogateescape") + b"\n")
    r = call(ui, "GET", "/ui/api/runs/odd/metrics")
    assert r.status_code == 200 and strict_json(r.text)["rows"] == ODD_ROWS
    (kind, data), = sse(call(ui, "GET", "/ui/api/runs/odd/events").text)  # finished: one `end` event
    assert kind == "end" and data["rows"] == ODD_ROWS and data["offset"] == (run / "metrics.jsonl").stat().st_size


@pytest.mark.parametrize("offset", ["99999999999999999999", "-1", "1000000"])
@pytest.mark.parametrize("suffix", ["metrics", "events"])
def test_an_offset_out_of_range_is_refused(ui, offset, suffix):
    run = fake_run(ui[1])
    size = (run / "metrics.jsonl").stat().st_size
    r = call(ui, "GET", f"/ui/api/runs/done/{suffix}?offset={offset}")
    assert r.status_code == 400
    assert r.json()["error"] == {"message": f"offset {offset}: not a position in done/metrics.jsonl, which holds "
                                            f"{size} bytes; read it from offset=0",
                                 "type": "invalid_request_error", "code": "bad_offset"}


def test_a_run_started_in_a_terminal_is_followed_while_its_metrics_grow(ui, monkeypatch):
    """The run counts as resting (FOLLOW_IDLE_S, 1.5 s here) only once its last row is written: with 1.5 s from
    the start, a writer thread late by that much between two rows (a loaded machine) ended the stream early."""
    monkeypatch.setattr(ui_app, "FOLLOW_IDLE_S", 1e6)  # the server runs in this process
    run = ui[1] / "runs" / "term"
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")

    def train_in_a_terminal():
        for step in range(2, 21):
            time.sleep(0.1)
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": 3.0 / step}) + "\n")
        monkeypatch.setattr(ui_app, "FOLLOW_IDLE_S", 1.5)  # from the last row on

    writer = threading.Thread(target=train_in_a_terminal)
    writer.start()
    text = call(ui, "GET", "/ui/api/runs/term/events?interval=0.1").text
    ended = time.time()
    writer.join()
    events = sse(text)
    assert [row["step"] for _, data in events for row in data["rows"]] == list(range(1, 21))
    assert [kind for kind, _ in events][-1] == "end" and all(kind == "message" for kind, _ in events[:-1])
    assert {data["status"] for _, data in events} == {"unknown"}
    assert ended - os.stat(run / "metrics.jsonl").st_mtime >= 1.4  # it ended after the file had rested
    os.utime(run / "metrics.jsonl", (time.time() - 3600, time.time() - 3600))  # a terminal run that ended long ago
    (kind, data), = sse(call(ui, "GET", "/ui/api/runs/term/events").text)
    assert kind == "end" and len(data["rows"]) == 20


def test_a_name_that_is_not_utf8_is_left_out_and_the_rest_listed(ui, capfd):
    """One folder or file copied from a Latin-1 system (b'run\\xff') made /ui/api/runs, /info and /adapters answer
    500 UnicodeEncodeError: every other run and dataset hidden. Now it is left out, said once in the log."""
    bad_run = Path(os.fsdecode(bytes(ui[1] / "runs") + b"/latin\xff"))
    (bad_run / "adapter").mkdir(parents=True)
    (bad_run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (bad_run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    bad_data = Path(os.fsdecode(bytes(ui[1] / "data") + b"/caf\xe9.jsonl"))
    bad_data.write_text("")
    fake_run(ui[1], "fine")
    try:
        for _ in range(2):  # the log says it once
            runs, info, adapters = (call(ui, "GET", f"/ui/api/{p}") for p in ("runs", "info", "adapters"))
            assert [r.status_code for r in (runs, info, adapters)] == [200, 200, 200]
            assert "fine" in [run["name"] for run in runs.json()["runs"]]
            assert "add.jsonl" in info.json()["datasets"] and "fine/adapter" in adapters.json()["available"]
            assert not any("\ufffd" in r.text or "latin" in r.text or "caf" in r.text for r in (runs, info, adapters))
        log = capfd.readouterr().err
        assert log.count("ui: runs: b'") == 1 and "latin\\xff' is left out: its name is not UTF-8; rename it" in log
        assert log.count("ui: datasets: b'caf\\xe9.jsonl' is left out") == 1
    finally:
        shutil.rmtree(bad_run)
        bad_data.unlink()

def test_a_stream_with_a_budget_pauses_at_its_offset_and_goes_on_from_there(ui):
    """The page shares a few connections among its ticked runs: a stream asked for a budget closes after it with a
    `pause` event at the offset it reached; from there the next slice reads on, nothing lost or repeated."""
    run = ui[1] / "runs" / "sliced"
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    stop = threading.Event()

    def train_in_a_terminal():
        step = 1
        while not stop.wait(0.05):
            step += 1
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": 3.0 / step}) + "\n")

    writer = threading.Thread(target=train_in_a_terminal)
    writer.start()
    try:
        steps, offset, slices = [], 0, []
        for _ in range(3):
            started = time.monotonic()
            events = sse(call(ui, "GET", f"/ui/api/runs/sliced/events?interval=0.1&budget=0.5&offset={offset}").text)
            slices.append(time.monotonic() - started)
            assert [kind for kind, _ in events][-1] == "pause" and events[-1][1]["rows"] == []
            steps += [row["step"] for _, data in events for row in data["rows"]]
            offset = events[-1][1]["offset"]
    finally:
        stop.set()
        writer.join()
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 5  # in order, each once
    assert offset == len("".join(json.dumps({"step": s, "loss": 3.0 / s if s > 1 else 3.0}) + "\n"
                                 for s in steps).encode())
    # at least the budget (a sleep, so load only lengthens it); at most a generous "it paused" bound: a stream
    # with no budget never ends while the run writes, and the `pause` event checked above already says it did
    assert all(0.5 <= t < 30 for t in slices), slices

def test_a_followed_run_whose_metrics_are_replaced_is_read_again_from_the_start(ui, monkeypatch):
    """train --overwrite into a followed run's folder: the stream went on from the old offset in the new file (the
    new run's first rows lost, the old run's kept on one chart). Now a `reset` event, then the new file from 0; a
    reconnect naming the old file gets the reset too. The file is replaced once the stream has sent the old rows,
    and the run rests (FOLLOW_IDLE_S) only from then: a writer thread's 0.5 s sleep raced both the stream's first
    read and its end after 1 s of rest, for no fault."""
    monkeypatch.setattr(ui_app, "FOLLOW_IDLE_S", 1e6)
    run = ui[1] / "runs" / "replaced"
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 10.0 + i}) + "\n" for i in range(20)))
    old_id = f"{os.stat(run / 'metrics.jsonl').st_dev}:{os.stat(run / 'metrics.jsonl').st_ino}"

    def start_over():
        os.replace(run / "metrics.jsonl", run / "old.jsonl")  # the old file is kept: its inode is not reused
        with open(run / "metrics.jsonl", "w") as f:
            for i in range(30):  # grows past the old offset between two polls
                f.write(json.dumps({"step": i, "loss": 0.001 * i, "pad": "x" * 40}) + "\n")
        monkeypatch.setattr(ui_app, "FOLLOW_IDLE_S", 1.0)

    text = ""
    with httpx.stream("GET", ui[0] + "/ui/api/runs/replaced/events?interval=0.1", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for chunk in r.iter_text():
            if not sse(text) and sse(text + chunk):  # the old file's rows are sent
                start_over()
            text += chunk
    events = sse(text)
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["message", "reset"] and kinds[-1] == "end" and set(kinds[2:-1]) <= {"message"}
    assert [r["loss"] for r in events[0][1]["rows"]] == [10.0 + i for i in range(20)]
    assert events[1][1]["offset"] == 0 and events[1][1]["file"] != old_id
    assert [r["loss"] for _, data in events[2:] for r in data["rows"]] == [0.001 * i for i in range(30)]
    offset = events[0][1]["offset"]  # a page reconnecting with the old file's offset
    events = sse(call(ui, "GET", f"/ui/api/runs/replaced/events?offset={offset}&file={old_id}").text)
    assert events[0][0] == "reset" and [r["step"] for _, data in events for r in data["rows"]] == list(range(30))


def test_a_long_metrics_file_streams_in_pieces_that_add_up(ui, monkeypatch):
    monkeypatch.setattr(ui_app, "EVENT_BYTES", 4096)
    run = fake_run(ui[1], "long-file")
    lines = [json.dumps({"step": s, "loss": 1 / s, "tokens": s * 512}) for s in range(1, 2001)]
    lines[700] = json.dumps({"step": 701, "loss": 0.5, "note": "x" * 10000})  # one line longer than a piece
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    events = sse(call(ui, "GET", "/ui/api/runs/long-file/events").text)
    assert len(events) > 15 and all(len(json.dumps(data["rows"])) < 4096 + 10200 for _, data in events)
    assert [row for _, data in events for row in data["rows"]] == [json.loads(line) for line in lines]
    assert events[-1][0] == "end" and events[-1][1]["offset"] == (run / "metrics.jsonl").stat().st_size


def test_the_runs_list_shows_the_newest_checkpoint_config_rewritten_or_not(ui):
    run = ui[1] / "runs" / "ckpt"
    for step, lr in ((10, 0.1), (20, 0.2)):
        (run / "checkpoints" / f"step-{step:07d}").mkdir(parents=True, exist_ok=True)
        (run / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").write_text(
            json.dumps({"step": step, "config": {"training": {"lr": lr}}}))
    config = lambda: {r["name"]: r["config"] for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["ckpt"]  # noqa
    assert yaml.safe_load(config()) == {"training": {"lr": 0.2}}
    assert yaml.safe_load(config()) == {"training": {"lr": 0.2}}  # from the cache
    (run / "checkpoints" / "step-0000020" / "trainer_state.json").write_text(
        json.dumps({"step": 20, "config": {"training": {"lr": 0.25}}}))
    assert yaml.safe_load(config()) == {"training": {"lr": 0.25}}


# --- answers that were 500s ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("r", "[1"), ("r", "a: b: c"), ("lora_alpha", "'"),
                                         ("r", "!!python/name:os.system"), ("lr", "{a: 1"),
                                         ("max_steps", "9" * 5000), ("lr", "1" + "0" * 400),  # int()/float() limits
                                         ("batch_size", "[" * 3000)])  # past PyYAML's recursion: was RecursionError
def test_a_form_value_that_is_not_yaml_gets_the_clis_message(ui, tmp_path, capsys, field, value):
    r = call(ui, "POST", "/ui/api/runs", json=form(name="notyaml", **{field: value}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_config", r.text
    key = {"r": "lora.r", "lora_alpha": "lora.lora_alpha", "lr": "training.lr",
           "max_steps": "training.max_steps", "batch_size": "training.batch_size"}[field]
    _, config = form_config(form(name="notyaml"), ui[1] / "runs", ui[1] / "data", {"tiny": "tiny"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "c.yaml"), f"{key}={value}"]) == 2  # the same value as an override
    assert capsys.readouterr().err == "error: " + r.json()["error"]["message"] + "\n"
    assert not (ui[1] / "runs" / ".ui" / "notyaml").exists()


def test_a_form_body_nested_too_deeply_is_refused_not_a_500(ui):
    """A JSON body 3,000 levels deep is a RecursionError in json (not a ValueError): it was a 500."""
    body = '{"name": ' + "[" * 3000 + "]" * 3000 + "}"
    with default_recursion_limit():  # the server's thread parses it under the process's limit
        r = call(ui, "POST", "/ui/api/runs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "the request body is nested too deeply (hundreds of [ or { levels); send the form as a JSON "
                   "object of plain values", "type": "invalid_request_error", "code": "invalid_json"}
    r = call(ui, "POST", "/ui/api/runs", content='{"name": "a", "r": 1' + "0" * 5000 + "}",  # soak: "not valid JSON"
             headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "the request body has a number too long to read (over 4,300 digits); send the form's numbers as short "
        "numbers or strings")
    for raw in (b'{"name": ', b'{"name": "caf\xe9"}'):
        r = call(ui, "POST", "/ui/api/runs", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not valid JSON"


def test_the_forms_r_sets_adaloras_ranks_not_lora_r(ui):
    """With method adalora the form's r was written as lora.r, which AdaLoRA does not use (train.log warned): the run
    trained with init_r 12 / target_r 8 whatever r said. r is now the rank it prunes to (target_r), init_r the larger
    of AdaLoRA's default 12 and 1.5 r (r 8: PEFT's defaults)."""
    ranks = {}
    for r in ("4", "8", "9", "16"):
        _, config = form_config(form(method="adalora", r=r), ui[1] / "runs", ui[1] / "data", {"tiny": "tiny"})
        assert "r" not in config["lora"] and config["lora"]["lora_alpha"] == 8
        ranks[int(r)] = (config["adalora"]["init_r"], config["adalora"]["target_r"])
    assert ranks == {4: (12, 4), 8: (12, 8), 9: (13, 9), 16: (24, 16)}
    bad = call(ui, "POST", "/ui/api/runs", json=form(name="ada0", method="adalora", r="0"))
    assert bad.status_code == 400 and bad.json()["error"]["message"] == (
        "invalid config:\n  adalora.target_r: the form's r is the rank AdaLoRA prunes to with method adalora; use a "
        "whole number from 1 to 65536 (e.g. 8), got 0")
    r = call(ui, "POST", "/ui/api/runs", json=form(name="ada", method="adalora", r="16", max_steps="2"))
    assert r.status_code == 200, r.text
    status = wait_for(lambda: (s := call(ui, "GET", "/ui/api/runs/ada/metrics").json()["status"]) != "running" and s)
    log = (ui[1] / "runs" / ".ui" / "ada" / "train.log").read_text()
    assert status == "finished", log
    assert "lora.r" not in log  # no "lora.r: ... is not used with method: adalora" warning
    saved = json.loads((ui[1] / "runs" / "ada" / "adapter" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["init_r"], saved["target_r"]) == ("ADALORA", 24, 16)


def test_starts_of_one_name_at_once_get_the_usual_message(ui, monkeypatch):
    """Two POSTs of one name at the same moment: the losers got 409 "[Errno 17] File exists: '.../runs/.ui/same'"
    (both passed the check, one lost the mkdir); the check and the mkdir are now one step. The window is held open:
    each start's check of runs/.ui/same waits (up to 3 s) until all four have made it."""
    barrier = threading.Barrier(4)

    class Meeting(type(Path())):
        def exists(self, *args, **kwargs):
            found = super().exists(*args, **kwargs)
            try:
                barrier.wait(3)
            except threading.BrokenBarrierError:  # the starts come one at a time: no one else arrives
                pass
            return found

    monkeypatch.setattr(launch, "meta_dir", lambda root, name: Meeting(R.meta_dir(root, name)))
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(call(ui, "POST", "/ui/api/runs",
                                                                  json=form(name="same", max_steps="2"))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409], [a.text for a in answers]
    for a in answers:
        if a.status_code == 409:
            assert a.json()["error"]["message"] in (
                f"run 'same' exists already in {ui[1] / 'runs'} and is running; choose another name",
                f"run 'same' exists already in {ui[1] / 'runs'}; choose another name"), a.text
    wait_for(lambda: call(ui, "GET", "/ui/api/runs/same/metrics").json()["status"] != "running")


def test_a_taken_name_is_explained_by_what_holds_it(ui):
    """A page run that failed before writing runs/NAME is held by runs/.ui/NAME, which the message named as runs/;
    a stopped run can be continued, and the message now says how."""
    runs = ui[1] / "runs"
    failed = write_launch(ui[1], "early", pid=1, argv=["x"], started=time.time() - 60, exit_code=2)
    (failed / "train.log").write_text("error: data.train: no examples\n")
    r = call(ui, "POST", "/ui/api/runs", json=form(name="early"))
    assert r.status_code == 409 and r.json()["error"]["message"] == (
        f"run 'early': {failed} exists already, from a start on the page that ended before writing {runs / 'early'} "
        f"(see its train.log); choose another name, or delete {failed}")
    stopped = write_launch(ui[1], "halted", pid=1, argv=["x"], started=time.time() - 60, exit_code=130)
    (stopped / "train.log").write_text("step 7/100 loss 1.0\n" + STOP_LINE.format("SIGINT") + "\n")
    fake_run(ui[1], "halted")
    r = call(ui, "POST", "/ui/api/runs", json=form(name="halted"))
    assert r.status_code == 409 and r.json()["error"]["message"] == (
        f"run 'halted' exists already in {runs}, stopped with a checkpoint; choose another name, or continue it "
        f"with: loraforge train {stopped / 'config.yaml'} --resume")


def test_a_run_with_a_non_ascii_name_downloads_its_adapter(ui):
    run = fake_run(ui[1], "日本語 \"run\"")
    r = call(ui, "GET", "/ui/api/runs/日本語 \"run\"/adapter.zip")
    assert r.status_code == 200
    assert r.headers["content-disposition"] == ("attachment; filename=\"___ _run_-adapter.zip\"; filename*=UTF-8''"
                                                "%E6%97%A5%E6%9C%AC%E8%AA%9E%20%22run%22-adapter.zip")
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert {n: z.read(n) for n in z.namelist()} == {f"{run.name}/{f.name}": f.read_bytes()
                                                    for f in (run / "adapter").iterdir()}


def test_a_name_too_long_for_the_file_system_is_refused(ui):
    name = "A" * 300
    for suffix in ("metrics", "events", "extras", "adapter.zip"):
        r = call(ui, "GET", f"/ui/api/runs/{name}/{suffix}")
        assert r.status_code == 400
        assert r.json()["error"]["message"] == f'"{name[:199]}... (300 characters): file name too long in ' \
                                               f"{ui[1] / 'runs'}"
    r = call(ui, "POST", "/ui/api/runs", json=form(name="longdata", dataset=name))
    assert r.status_code == 400 and r.json()["error"] == {
        "message": f'"{name[:199]}... (300 characters): file name too long in {ui[1] / "data"}',
        "type": "invalid_request_error",
        "code": "bad_path"}


def test_a_10000_character_run_name_or_model_is_cut_in_the_error_as_the_servers_are(ui):
    """Soak (smalls): the form's run-name error repeated a 10,000-character name whole; it is cut to the server's
    200 characters (serve.errors.shown, as the `model` 404 does), its length said."""
    for field, said in (("name", "run name {}: use letters, digits, '.', '_' or '-' (up to 64, not starting "
                                 "with '.')"), ("model", "model {}: choose one of tiny")):
        r = call(ui, "POST", "/ui/api/runs", json=form(**{field: "n" * 10_000}))
        assert r.status_code == 400 and r.json()["error"]["message"] == said.format(
            '"' + "n" * 199 + "... (10,000 characters)")
    r = call(ui, "GET", f"/ui/api/runs/{'n' * 10_000}/metrics")
    assert r.status_code == 400 and r.json()["error"]["message"] == \
        f'"{"n" * 199}... (10,000 characters): file name too long in {ui[1] / "runs"}'


@pytest.mark.parametrize("file,text", [("forgetting.json", "[]"), ("forgetting.json", '"partial"'),
                                       ("forgetting.json", "null"), ("launch.json", "[1]"),
                                       ("launch.json", '{"pid": "x", "argv": 3, "started": "y", "exit_code": "z"}'),
                                       ("launch.json", '{"pid": true, "exit_code": null}'),
                                       ("adapter/adapter_config.json",
                                        '{"peft_type": "ADALORA", "rank_pattern": [1]}'),
                                       ("forgetting.json", '{"rows": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                                       ("launch.json", '{"pid": ' + "[" * 100_000 + "]" * 100_000 + "}")])
def test_one_damaged_run_is_listed_as_unknown_and_the_others_still_are(ui, file, text):
    """Nesting too deep (100,000 levels) is a RecursionError in json, not a ValueError: it was a 500 for the list."""
    fake_run(ui[1])
    run = ui[1] / "runs" / "damaged"
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(ui[1] / "runs" / ".ui" / "damaged", ignore_errors=True)
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    path = (ui[1] / "runs" / ".ui" / "damaged" / file) if file == "launch.json" else run / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    r = call(ui, "GET", "/ui/api/runs")
    assert r.status_code == 200, r.text
    statuses = {s["name"]: s["status"] for s in r.json()["runs"]}
    assert statuses["done"] == "finished"
    assert statuses["damaged"] == ("finished" if file.startswith("adapter") else "unknown")
    assert call(ui, "GET", "/ui/api/runs/damaged/extras").status_code == 200


# --- the dataset list ----------------------------------------------------------------------------------------------

def test_the_dataset_list_offers_what_train_reads_and_no_hidden_or_run_files(tmp_path):
    data = tmp_path / "data"
    files = {".cache/huggingface/hub/blob{:03d}.json": 600, ".venv/lib/entry_points.txt": 1, "notes.txt": 1,
             "node_modules/pkg/package.json": 1, "train.jsonl": 1, "sub/eval.CSV": 1, "sub/deep/x.parquet": 1,
             ".hidden.jsonl": 1, "runs/kept.jsonl": 1,  # a data folder that only shares the runs folder's name
             "out/runs/r1/metrics.jsonl": 1, "out/runs/r1/checkpoints/step-0000010/trainer_state.json": 1}
    for pattern, count in files.items():
        for i in range(count):
            (data / pattern.format(i)).parent.mkdir(parents=True, exist_ok=True)
            (data / pattern.format(i)).write_text("{}")
    (tmp_path / "elsewhere.jsonl").write_text("{}")
    (data / "link.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")  # refused by the form: not offered
    app = FastAPI()
    ui_app.mount(app, data / "out" / "runs", data, {"tiny": "tiny"})
    datasets = TestClient(app).get("/ui/api/info").json()["datasets"]
    assert datasets == ["runs/kept.jsonl", "sub/deep/x.parquet", "sub/eval.CSV", "train.jsonl"]
    for i in range(600):  # the cap counts what is offered
        (data / "many" / f"{i:03d}.jsonl").parent.mkdir(exist_ok=True)
        (data / "many" / f"{i:03d}.jsonl").write_text("{}")
    datasets = TestClient(app).get("/ui/api/info").json()["datasets"]
    assert datasets == sorted([f"many/{i:03d}.jsonl" for i in range(600)] + ["runs/kept.jsonl", "sub/deep/x.parquet",
                                                                           "sub/eval.CSV", "train.jsonl"])[:500]


# --- smaller ones: the .ui folder, runs linked from outside, the key ------------------------------------------------

@pytest.mark.parametrize("name", [".%2F.ui/guarded", "done%2F..%2F.ui%2Fguarded", "%2E/.ui/guarded",
                                  "done%2F..%2F.ui", ".ui%2F..%2F.ui%2Fguarded"])
def test_the_ui_folder_is_no_run_however_it_is_spelled(ui, name):
    fake_run(ui[1])
    write_launch(ui[1], "guarded", pid=1, argv=["x"], started=0, exit_code=0)
    given = name.replace("%2F", "/").replace("%2E", ".")
    for suffix in ("metrics", "extras", "adapter.zip"):
        r = call(ui, "GET", f"/ui/api/runs/{name}/{suffix}")
        assert r.status_code == 404, (name, r.text)
        assert r.json()["error"]["message"] == f"no run {json.dumps(given)} in {ui[1] / 'runs'}"


def test_a_run_linked_from_outside_the_runs_folder_is_not_listed(ui):
    root = ui[1]
    fake_run(root, "../outside")
    fake_run(root, "sweep/a")
    for link in ("escape", "sweep/escape"):
        if not (root / "runs" / link).is_symlink():
            (root / "runs" / link).symlink_to(root / "outside")
    names = [r["name"] for r in call(ui, "GET", "/ui/api/runs").json()["runs"]]
    assert "sweep/a" in names and "escape" not in names and "sweep/escape" not in names


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_the_key_scheme_is_case_insensitive(ui, scheme):
    for key, status in ((KEY, 200), (f"x{KEY}", 401), (f" {KEY}", 200)):
        assert call(ui, "GET", "/ui/api/runs", key=None, headers={"Authorization": f"{scheme} {key}"}).status_code \
            == status


def test_with_a_key_the_api_docs_need_it_and_health_does_not(ui):
    for path in ("/docs", "/openapi.json", "/redoc"):
        r = call(ui, "GET", path, key=None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["message"] == "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
        assert call(ui, "GET", path).status_code == 200
    assert httpx.get(ui[0] + "/health").status_code == 200  # open, for load balancers: says only ok and the load


# --- Ctrl-C with a page following a run ----------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])  # as train ends
def test_ctrl_c_or_sigterm_stops_the_dashboard_while_a_stream_is_open(tiny_dir, tmp_path, sig, code):
    run = tmp_path / "runs" / "term"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # just written: followed for a minute
    server = subprocess.Popen([sys.executable, "-m", "loraforge", "ui", "--model", str(tiny_dir), "--runs",
                               str(tmp_path / "runs"), "--data-dir", str(tmp_path), "--port", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a shell starts it
    try:
        url = f"http://127.0.0.1:{listening_port(server)}"  # the system's choice (ports.py)
        wait_for(lambda: server.poll() is not None or answers(url), timeout=120, every=0.5)
        assert server.poll() is None, server.stderr.read().decode()
        opened = threading.Event()

        def follow():
            try:
                with httpx.stream("GET", url + "/ui/api/runs/term/events", timeout=None) as r:
                    for _ in r.iter_raw():
                        opened.set()
            except httpx.RemoteProtocolError:  # cut by the shutdown, as expected
                pass

        threading.Thread(target=follow, daemon=True).start()
        assert opened.wait(30)
        began = time.monotonic()
        server.send_signal(sig)
        # did not wait for the stream (its run is followed for a minute): the grace, then a bound that a loaded
        # 2-core machine's exit fits (15 s failed there for no fault), still under the minute
        assert server.wait(SHUTDOWN_GRACE_S + 40) == code
        assert time.monotonic() - began < SHUTDOWN_GRACE_S + 40
    finally:
        server.kill()
        server.wait()


def answers(url) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


# --- Stop, Stop now, and a stopped run continued from the command line ---------------------------------------------

SLOW_STEP = """
import sys, time
from loraforge.training.loop import StopRequest, Stopped
try:
    with StopRequest() as stop:
        print("step 1/100", flush=True)
        while not stop.requested:
            time.sleep(0.05)
        print("finishing step 2/100", flush=True)
        time.sleep(60)  # a step (and its checkpoint) slower than any grace a server could give it
        raise Stopped(stop.signum, "stopped by SIGINT after step 2 of 100: checkpoint saved")
except Stopped as e:
    print(f"{e}; continue with --resume", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
"""


def test_stop_waits_for_a_slow_step_and_only_stop_now_interrupts_it(ui):
    """Stop used to send SIGTERM 10 s after its SIGINT, and train takes a second signal as "interrupt at once": a
    run whose step took longer lost it. Now Stop sends SIGINT once, a second Stop nothing, and only Stop now (force)
    sends SIGTERM. The process is the training loop's own StopRequest, with a step of a minute."""
    meta = ui[1] / "runs" / ".ui" / "slow"
    meta.mkdir(parents=True)
    argv = [sys.executable, "-c", SLOW_STEP]
    with open(meta / "train.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        write_launch(ui[1], "slow", pid=proc.pid, argv=argv, started=time.time())
        wait_for(lambda: "step 1/100" in (meta / "train.log").read_text())  # StopRequest is in place
        r = call(ui, "POST", "/ui/api/runs/slow/stop", params={"force": "true"})  # not asked to stop yet
        assert r.status_code == 409 and r.json()["error"]["message"] == (
            "run 'slow' has not been asked to stop: stop it first (it finishes its step and keeps a checkpoint of "
            "it); force is for a run whose stop takes too long")
        assert call(ui, "POST", "/ui/api/runs/slow/stop").json() == {"name": "slow", "stopping": True}
        listed = {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["slow"]
        assert (listed["status"], listed["stopping"]) == ("running", True)  # the page offers Stop now
        assert call(ui, "POST", "/ui/api/runs/slow/stop").status_code == 200  # again: no second SIGINT
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(11)  # past the old 10 s escalation: still finishing its step
        assert (meta / "train.log").read_text().splitlines()[-1] == "finishing step 2/100"
        assert call(ui, "POST", "/ui/api/runs/slow/stop", params={"force": "true"}).status_code == 200
        assert proc.wait(30) == 143  # SIGTERM after SIGINT: interrupted mid-step, 128 + 15
    finally:
        proc.kill()
        proc.wait()
    assert (meta / "train.log").read_text().splitlines()[-1] == INTERRUPTED_LINE
    listed = {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["slow"]  # settled from the log
    assert (listed["status"], listed["exit_code"], listed["stopping"]) == ("stopped", 143, False)
    record = json.loads((meta / "launch.json").read_text())
    assert record["exit_code_from"] == "train.log" and record["stop_requested"] > record["started"]


def test_a_stopped_run_continued_from_the_command_line_is_shown_by_its_files(ui):
    """The page suggests `loraforge train <config.yaml> --resume` for a stopped run; continued so, it read "stopped"
    for ever (launch.json's exit code) and its stream ended at once. Files changed after the recorded end say more."""
    run = ui[1] / "runs" / "resumed"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    ended = time.time() - 60
    meta = write_launch(ui[1], "resumed", pid=1, argv=["x"], started=ended - 60, exit_code=130, ended=ended,
                        stop_requested=ended - 1)
    (meta / "train.log").write_text(STOP_LINE.format("SIGINT") + "\n")
    os.utime(run / "metrics.jsonl", (ended - 1, ended - 1))  # written before the launched process ended

    def shown():
        listed = {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["resumed"]
        assert call(ui, "GET", "/ui/api/runs/resumed/metrics").json()["status"] == listed["status"]
        return listed["status"]

    assert shown() == "stopped"
    # resumed in a terminal: train holds output_dir/.lock, naming its process, and appends rows
    with output_held_elsewhere(run) as train:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 8, "loss": 0.5}) + "\n")
        assert shown() == "running"
        assert {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["resumed"]["stopping"] is False
        size = (run / "metrics.jsonl").stat().st_size
        events = sse(call(ui, "GET", f"/ui/api/runs/resumed/events?offset={size}&budget=1&interval=0.1").text)
        assert [e for e, _ in events] == ["pause"]  # followed, not ended at once
        r = call(ui, "POST", "/ui/api/runs/resumed/stop")  # not the page's process: say whose it is
        assert r.status_code == 409 and r.json()["error"]["message"] == (
            f"run 'resumed' was continued outside the dashboard (process {train.pid}): stop it where it runs "
            f"(Ctrl-C, or kill {train.pid})")
    assert shown() == "unknown"  # its process ended, and nothing says how: as a run from a terminal
    (run / ".lock").unlink()
    assert shown() == "unknown"
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    assert shown() == "finished"


def test_a_run_started_in_a_terminal_reads_running_while_its_process_holds_the_lock(ui):
    """A run started with `loraforge train` in a terminal read "unknown" for its whole training, then "finished":
    now "running" while a live loraforge process holds its output_dir lock (hold_output, as train does)."""
    run = ui[1] / "runs" / "termlock"
    hold = ("import sys, time; from loraforge.utils.outputs import hold_output\n"
            "with hold_output(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
    train = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(ui_app.__file__).parents[2])})
    try:
        assert train.stdout.readline() == "held\n"
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        listed = {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["termlock"]
        assert listed["status"] == "running"
        assert call(ui, "GET", "/ui/api/runs/termlock/metrics").json()["status"] == "running"
    finally:
        train.kill()
        train.wait()
    (run / ".lock").write_text(str(train.pid))  # killed: its lock file stays, naming a process that ended
    listed = {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["termlock"]
    assert listed["status"] == "unknown"


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: the process id alone tells")
def test_a_killed_runs_lock_naming_a_process_that_reused_its_id_reads_unknown(ui):
    """A run killed with SIGKILL leaves its output_dir/.lock, naming its ended process; ids come round again soon
    (pid_max 32768), and another loraforge process (here a stand-in for `loraforge serve`) that took the id made the
    run read "running" for ever, its Stop saying "kill <that process>". Only a process holding the lock counts."""
    run = ui[1] / "runs" / "idtaken"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "loraforge", "serve"])
    try:
        (run / ".lock").write_text(str(other.pid))  # the killed run's id, now the other process's
        listed = {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["idtaken"]
        assert (listed["status"], listed["stoppable"]) == ("unknown", False)
        assert call(ui, "GET", "/ui/api/runs/idtaken/metrics").json()["status"] == "unknown"
        r = call(ui, "POST", "/ui/api/runs/idtaken/stop")
        assert r.status_code == 409 and r.json()["error"]["message"] == (
            "run 'idtaken' was not started from the dashboard: stop it where it runs (Ctrl-C, or kill its process)")
    finally:
        other.kill()
        other.wait()


def test_a_run_whose_name_has_a_line_break_is_left_out_of_the_list(ui, capfd):
    """A folder named "new\\nline" was listed, but no route could serve it (their pattern stops at a line break):
    ticking it showed "error: new\\nline: Not Found". Now it is left out, said once in the log."""
    fake_run(ui[1], "new\nline")
    fake_run(ui[1], "fine2")
    try:
        names = [run["name"] for run in call(ui, "GET", "/ui/api/runs").json()["runs"]]
        assert "fine2" in names and not any("\n" in n for n in names)
        log = capfd.readouterr().err
        assert log.count("ui: runs: ") == 1 and (
            "line' is left out: its name has a line break, which the page's addresses cannot carry; rename it" in log)
    finally:
        shutil.rmtree(ui[1] / "runs" / "new\nline")


# --- a page run's folders deleted while it trains --------------------------------------------------------------------

@pytest.mark.parametrize("deleted", [[".ui/gone"], ["gone", ".ui/gone"]])
def test_a_run_whose_folders_are_deleted_while_it_trains_is_let_go_when_it_ends(tmp_path, deleted):
    """The wait thread died on the missing .ui/<name>/ (FileNotFoundError on launch.tmp) before it let the run go:
    listed "running" with no exit until a restart, its stream never ended, Stop said "not started from the
    dashboard"."""
    launcher = launch.Launcher(tmp_path)
    (tmp_path / "gone" / "adapter").mkdir(parents=True)
    (tmp_path / "gone" / "adapter" / "adapter_config.json").write_text("{}")
    launch.meta_dir(tmp_path, "gone").mkdir(parents=True)
    proc = subprocess.Popen(["true"])
    launcher.procs["gone"] = proc
    for folder in deleted:
        shutil.rmtree(tmp_path / folder)
    launcher._wait("gone", proc, {"pid": proc.pid, "argv": ["true"], "started": time.time(), "exit_code": None})
    assert launcher.running() == frozenset()
    if "gone" in deleted:  # the whole run: nothing is made again, nothing listed
        assert not (tmp_path / ".ui" / "gone").exists() and R.list_runs(tmp_path) == []
    else:  # the output folder remains: the exit is recorded, and the run reads finished
        assert R.read_launch(tmp_path, "gone")["exit_code"] == 0
        assert [(r["name"], r["status"], r["exit_code"]) for r in R.list_runs(tmp_path)] == [("gone", "finished", 0)]


def vanish_while_read(monkeypatch, folder):
    """os.scandir of `folder` fails as it does for a folder removed after its parent listed it (a run deleting a
    checkpoint, `train --overwrite` removing checkpoints/); every other folder is read as it is."""
    scandir, gone = os.scandir, str(folder)

    def deleted_meanwhile(path="."):
        if os.fspath(path) == gone:
            raise FileNotFoundError(2, "No such file or directory", gone)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", deleted_meanwhile)


def test_a_page_run_whose_ui_folder_is_deleted_while_it_trains_reads_finished(ui):
    r = call(ui, "POST", "/ui/api/runs", json=form(name="unmeta", max_steps="30", save_every="100"))
    assert r.status_code == 200, r.text
    wait_for(lambda: R.metrics_size(ui[1] / "runs" / "unmeta"))  # training: config.yaml was read
    shutil.rmtree(ui[1] / "runs" / ".ui" / "unmeta")
    status = wait_for(lambda: (s := call(ui, "GET", "/ui/api/runs/unmeta/metrics").json()["status"]) != "running" and s)
    assert status == "finished"
    listed = {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["unmeta"]
    assert (listed["status"], listed["exit_code"]) == ("finished", 0)
    assert sse(call(ui, "GET", "/ui/api/runs/unmeta/events?interval=0.1").text)[-1][0] == "end"
    r = call(ui, "POST", "/ui/api/runs/unmeta/stop")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_running"


# --- the playground's models ------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:adapters dir")  # the other tests' fake runs: adapters that do not load
def test_a_run_that_saves_its_adapter_while_serving_is_in_the_playgrounds_models(ui, tiny_dir, tmp_path):
    """A run trained from the page was missing from /v1/models (the playground's list) until a restart: the
    adapters_dir was read at start only. Now the list looks for adapters added since, once each."""
    def models():
        return {m["id"] for m in call(ui, "GET", "/v1/models").json()["data"]}

    run = ui[1] / "runs" / "late"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert "late" not in models()  # training: no adapter yet
    save_adapters(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path,
                  {"late": LoraConfig(r=4, target_modules=("q_proj", "v_proj"))}, seed=3)
    (tmp_path / "late").rename(run / "adapter")  # as train writes it: the folder with both files at once
    assert "late" in models()
    assert "late" in call(ui, "GET", "/ui/api/adapters").json()["served"]
    r = call(ui, "POST", "/v1/completions", json={"model": "late", "prompt": "Add 1 and 2.", "max_tokens": 2})
    assert r.status_code == 200, r.text



def qlora_runs(ui, tiny_dir, tmp_path, qlora: str, plain: str) -> str:
    """Two runs' adapters in the runs folder, written at once as train writes them: `qlora`'s as a QLoRA run saves
    it (its header records the NF4 base it trained over), `plain`'s of this full-precision base. Returns the warning
    the CLI gives loading the QLoRA one over this base (load_adapter's, as generate --adapter), its folder as the
    page names it (NAME/adapter)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    save_adapters(base, tmp_path, {"plain": LoraConfig(r=4, target_modules=("q_proj", "v_proj"))}, seed=5)
    write_adapter_dir(tmp_path / "qlora", load_file(tmp_path / "plain" / WEIGHTS_NAME),
                      json.loads((tmp_path / "plain" / CONFIG_NAME).read_text()), quantization="nf4")
    with pytest.warns(UserWarning, match="trained over") as said:
        load_adapter(base, tmp_path / "qlora")
    cli_warning = [str(w.message) for w in said if "trained over" in str(w.message)]
    assert len(cli_warning) == 1
    for folder, name in (("qlora", qlora), ("plain", plain)):
        (ui[1] / "runs" / name).mkdir()
        (tmp_path / folder).rename(ui[1] / "runs" / name / "adapter")
    return cli_warning[0].replace(str(tmp_path / "qlora"), f"{qlora}/adapter")


@pytest.mark.filterwarnings("ignore:adapters dir")  # the other tests' fake runs: adapters that do not load
@pytest.mark.filterwarnings("ignore:.*this adapter was trained over")  # the server's log line, kept
def test_a_qlora_adapter_over_the_full_base_shows_the_clis_warning_where_the_page_chooses_it(ui, tiny_dir, tmp_path):
    """A QLoRA adapter (trained over an NF4 base) in the dashboard, over its full-precision base: the warning went
    to the server's log only, and the page's playground and Adapters tab showed nothing. GET /ui/api/adapters now
    gives it for each served adapter (the page shows it under the adapter's name in both lists): the sentence
    load_adapter warns in the CLI, the folder named as the page knows it; none for an adapter of this base."""
    expected = qlora_runs(ui, tiny_dir, tmp_path, "qrun", "plainrun")
    listed = call(ui, "GET", "/ui/api/adapters").json()
    assert {"qrun", "plainrun"} <= set(listed["served"])
    assert {k: v for k, v in listed["warnings"].items() if k in ("qrun", "plainrun")} == {"qrun": expected}
    r = call(ui, "POST", "/v1/adapters", json={"name": "qloaded", "path": "qrun/adapter"})  # the Adapters tab's form
    assert r.status_code == 200, r.text
    assert call(ui, "GET", "/ui/api/adapters").json()["warnings"]["qloaded"] == expected
    r = call(ui, "POST", "/v1/completions", json={"model": "qrun", "prompt": "Add 1 and 2.", "max_tokens": 2})
    assert r.status_code == 200, r.text  # warned, still served
    assert call(ui, "DELETE", "/v1/adapters/qloaded").status_code == 200


@pytest.mark.filterwarnings("ignore:adapters dir")  # the fake runs: adapters that do not load
def test_the_adapter_list_passes_over_a_checkpoint_removed_while_it_is_read(ui, monkeypatch):
    """A training run keeps its newest checkpoints and deletes the older ones; one deleted while the adapter list
    walked the runs folder (Path.glob) made GET /ui/api/adapters a 500 with a traceback in the server's log (soak:
    the page's Adapters tab). The folder is passed over, and the list is the adapters found."""
    run = fake_run(ui[1], "rotating")
    (run / "checkpoints" / "step-0000060").mkdir(parents=True)
    deep = ui[1] / "runs" / "rotsweep" / "a" / "adapter"  # three levels down: listed; four: not looked for
    deep.mkdir(parents=True)
    (deep / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (deep / "x" / "adapter_config.json").parent.mkdir()
    (deep / "x" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    vanish_while_read(monkeypatch, run / "checkpoints" / "step-0000060")  # listed in checkpoints/, then removed
    r = call(ui, "GET", "/ui/api/adapters")
    monkeypatch.undo()
    assert r.status_code == 200, r.text
    available = r.json()["available"]
    assert {"rotating/adapter", "rotsweep/a/adapter"} <= set(available) and "rotsweep/a/adapter/x" not in available
    assert not any(".ui" in a or "checkpoints" in a for a in available)


def test_the_run_list_passes_over_checkpoints_removed_while_it_is_read(ui, monkeypatch):
    """`loraforge train --overwrite` into a run removes its checkpoints/ before it trains; removed between the
    listing of the run's folder and the look for its newest checkpoint, GET /ui/api/runs (the page's list, every
    few seconds) answered 500. The run is listed, as its other files say."""
    run = fake_run(ui[1], "overwritten")
    (run / "checkpoints" / "step-0000010").mkdir(parents=True)
    vanish_while_read(monkeypatch, run / "checkpoints")
    r = call(ui, "GET", "/ui/api/runs")
    monkeypatch.undo()
    assert r.status_code == 200, r.text
    listed = {x["name"]: x for x in r.json()["runs"]}["overwritten"]
    assert (listed["status"], listed["has_adapter"]) == ("finished", True)

# --- the form's target_modules --------------------------------------------------------------------------------------

@pytest.mark.parametrize("given,taken", [
    ("q_proj, v_proj", ["q_proj", "v_proj"]), ("q_proj", ["q_proj"]), ("self_attn.o_proj", ["self_attn.o_proj"]),
    ("all-linear", "all-linear"), (" all-linear ", "all-linear"), (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
    (r".*layers\.[0-9]{1,2}\.self_attn\.q_proj", r".*layers\.[0-9]{1,2}\.self_attn\.q_proj"), ("", None)])
def test_the_forms_target_modules_takes_names_all_linear_or_a_regex(ui, given, taken):
    """The form split every value on commas into a list: "all-linear" became ['all-linear'], a module name that
    matched no layer, and the run failed after its model loaded; a regex could not be said at all."""
    _, config = form_config(form(target_modules=given), ui[1] / "runs", ui[1] / "data", {"tiny": "tiny"})
    assert config["lora"].get("target_modules") == taken
    launch.validate(config)


def test_a_target_modules_regex_that_does_not_compile_is_refused_when_posted(ui):
    r = call(ui, "POST", "/ui/api/runs", json=form(name="badregex", target_modules="(q_proj"))
    assert r.status_code == 400 and "target_modules: '(q_proj' is not a valid regex" in r.json()["error"]["message"]


@pytest.mark.parametrize("method, targets", [("lora", "qkv"), ("dora", r".*\.attn\.q_proj"), ("adalora", "qkv")])
def test_target_modules_that_name_no_layer_are_refused_before_the_run_starts(ui, tiny_dir, method, targets):
    """Carried over: the page started the run, which found that target_modules named no layer only once its model
    had loaded (in its log, a 'failed' run left behind). The names are checked against the model built from its
    config on the meta device, before anything is written: a 400 with the run's own message."""
    name = f"notarget-{method}"
    r = call(ui, "POST", "/ui/api/runs", json=form(name=name, method=method, target_modules=targets))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_config", r.text
    _, config = form_config(form(name=name, method=method, target_modules=targets), ui[1] / "runs", ui[1] / "data",
                            {"tiny": str(tiny_dir)})
    with pytest.raises(ConfigError) as run_says:  # what the run itself says once the model has loaded
        build_model(load_train_config(None, [], base=config), torch.device("cpu"), total_steps=4)
    assert r.json()["error"]["message"] == str(run_says.value)
    assert "\n  lora.target_modules: " in str(run_says.value)  # the form's, in lora: (adalora takes it from there)
    assert not (ui[1] / "runs" / name).exists() and not (ui[1] / "runs" / ".ui" / name).exists()


def test_a_run_with_all_linear_from_the_form_trains_every_linear_layer(ui):
    r = call(ui, "POST", "/ui/api/runs", json=form(name="alllin", target_modules="all-linear", max_steps="2"))
    assert r.status_code == 200, r.text
    status = wait_for(lambda: (s := call(ui, "GET", "/ui/api/runs/alllin/metrics").json()["status"]) != "running" and s)
    assert status == "finished", (ui[1] / "runs" / ".ui" / "alllin" / "train.log").read_text()[-2000:]
    adapter = ui[1] / "runs" / "alllin" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == "all-linear"
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        adapted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in f.keys()}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# --- Stop where the server takes it ---------------------------------------------------------------------------------

def test_the_list_says_which_running_runs_stop_takes_and_a_terminal_runs_409_names_its_process(ui, victim):
    """The page offered Stop on every running row, and the server answered 409 for a run it did not launch; for a
    run started in a terminal without naming the process to stop, as it does for one continued there."""
    run = ui[1] / "runs" / "interm"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with output_held_elsewhere(run) as train:  # `loraforge train t.yaml` in a terminal: it holds the run's lock
        listed = {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}
        assert (listed["victim"]["status"], listed["victim"]["stoppable"]) == ("running", True)
        assert (listed["interm"]["status"], listed["interm"]["stoppable"]) == ("running", False)
        r = call(ui, "POST", "/ui/api/runs/interm/stop")
        assert r.status_code == 409 and r.json()["error"]["message"] == (
            f"run 'interm' was not started from the dashboard (process {train.pid}): stop it where it runs "
            f"(Ctrl-C, or kill {train.pid})")
    assert {r["name"]: r for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["interm"]["stoppable"] is False


# --- a page run whose folder was deleted ----------------------------------------------------------------------------

@pytest.mark.parametrize("record", [{"exit_code": 130, "output_written": True}, {"exit_code": 130},  # older record
                                    {"exit_code": 0}, {"exit_code": 1, "output_written": True}])
def test_a_page_run_whose_folder_was_deleted_is_not_listed_and_its_name_is_explained(ui, record):
    """`rm -rf runs/s1` of a stopped page run: it stayed listed with its old curve, and starting s1 again said
    ".ui/s1 exists already, from a start on the page that ended before writing runs/s1", which was not true."""
    ended = time.time() - 60
    meta = write_launch(ui[1], "wiped", pid=1, argv=["x"], started=ended - 60, ended=ended, **record)
    assert "wiped" not in {r["name"] for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}
    r = call(ui, "POST", "/ui/api/runs", json=form(name="wiped"))
    assert r.status_code == 409 and r.json()["error"]["message"] == (
        f"run 'wiped': {ui[1] / 'runs' / 'wiped'} was deleted, but its launch record {meta} remains; delete {meta} "
        f"to use the name again, or choose another name")
    shutil.rmtree(meta)


@pytest.mark.parametrize("record", [{"exit_code": 2, "output_written": False}, {"exit_code": 1}])  # 1: older record
def test_a_page_run_that_failed_before_writing_its_folder_stays_listed(ui, record):
    ended = time.time() - 60
    meta = write_launch(ui[1], "early", pid=1, argv=["x"], started=ended - 60, ended=ended, **record)
    assert {r["name"]: r["status"] for r in call(ui, "GET", "/ui/api/runs").json()["runs"]}["early"] == "failed"
    r = call(ui, "POST", "/ui/api/runs", json=form(name="early"))
    assert r.status_code == 409 and "from a start on the page that ended before writing" in r.json()["error"]["message"]
    shutil.rmtree(meta)


@pytest.mark.parametrize("wrote", [True, False])
def test_the_exit_record_says_whether_the_run_wrote_its_folder(tmp_path, wrote):
    launcher = launch.Launcher(tmp_path)
    launch.meta_dir(tmp_path, "w").mkdir(parents=True)
    if wrote:
        (tmp_path / "w").mkdir()
    proc = subprocess.Popen(["true"])
    launcher.procs["w"] = proc
    launcher._wait("w", proc, {"pid": proc.pid, "argv": ["true"], "started": time.time(), "exit_code": None})
    assert R.read_launch(tmp_path, "w")["output_written"] is wrote


def _fresh_runs(root):
    """list_runs' answer, each run read anew (summary), as the reference for a cached one."""
    root = root.resolve()
    paths = [p for p in sorted(root.iterdir()) if p.name != R.UI_DIR and R.is_run(p)]
    return sorted((R.summary(root, p) for p in paths), key=lambda s: -s["mtime"])


def test_listing_runs_again_stats_one_file_per_unchanged_run_and_rereads_a_changed_one(tmp_path, monkeypatch):
    """The page polls /ui/api/runs every 3 s; each run cost ~30 file checks a call (2,000 runs: 1-2 s of a core, the
    tab keeping the server busy). An unchanged run now costs one listing of its folder and one lstat (its adapter's
    config), no stat; a changed one is read anew (status, a new metrics row, a new or rewritten checkpoint, a link
    out), and the answer equals reading every run anew."""
    root = tmp_path / "runs"
    for i in range(20):
        run = fake_run(tmp_path, f"r{i:02}")
        if i % 4 == 0:
            (run / "checkpoints" / "step-2").mkdir(parents=True)
            (run / "checkpoints" / "step-2" / "trainer_state.json").write_text(json.dumps({"config": {"i": i}}))
    first = R.list_runs(root)
    assert first == _fresh_runs(root) and len(first) == 20

    def listing_calls():
        """os.stat, os.lstat and os.scandir calls of a second listing (the first fills the cache)."""
        R.list_runs(root)
        calls = {"stat": 0, "lstat": 0, "scandir": 0}
        with monkeypatch.context() as patch:
            for fn in calls:
                def counted(*a, _real=getattr(os, fn), _fn=fn, **k):
                    calls[_fn] += 1
                    return _real(*a, **k)
                patch.setattr(os, fn, counted)
            listed = R.list_runs(root)
        assert listed == _fresh_runs(root)
        return calls

    twenty = listing_calls()
    for i in range(20, 40):
        fake_run(tmp_path, f"r{i:02}")
    forty = listing_calls()
    # each unchanged run: one listing of its folder (its entries' lstat come with it) and one lstat, its adapter's
    # config; no stat (before: ~30 file checks a run)
    assert {fn: forty[fn] - twenty[fn] for fn in forty} == {"stat": 0, "lstat": 20, "scandir": 20}
    monkeypatch.undo()
    run = root / "r03"
    shutil.rmtree(run / "adapter")
    with open(run / "metrics.jsonl", "a") as f:  # a new row (the last line, cut off, completed)
        f.write('ss": 1.5}\n')
    (root / "r00" / "checkpoints" / "step-2" / "trainer_state.json").write_text(json.dumps({"config": {"i": 100}}))
    (root / "r04" / "checkpoints" / "step-3").mkdir()
    (root / "r04" / "checkpoints" / "step-3" / "trainer_state.json").write_text(json.dumps({"config": {"i": 4.5}}))
    secret = tmp_path / "secret.json"
    secret.write_text('{"complete": true}')
    (root / "r05" / "forgetting.json").symlink_to(secret)  # a link out of the run: treated as missing
    shutil.rmtree(root / "r06")
    again = {r["name"]: r for r in R.list_runs(root)}
    assert list(again) == [r["name"] for r in _fresh_runs(root)] and list(again.values()) == _fresh_runs(root)
    assert (again["r03"]["status"], again["r03"]["has_adapter"]) == ("unknown", False)
    assert again["r03"]["mtime"] == os.stat(run / "metrics.jsonl").st_mtime
    assert yaml.safe_load(again["r00"]["config"]) == {"i": 100} and yaml.safe_load(again["r04"]["config"]) == {"i": 4.5}
    assert again["r05"]["has_forgetting"] is False and "r06" not in again


# --- a runs folder that takes no new run -------------------------------------------------------------------------

@pytest.mark.parametrize("code, reason", [(errno.EACCES, "permission denied"),
                                          (errno.ENOSPC, "no space left on the device")])
def test_a_start_the_runs_folder_cannot_take_is_one_line_and_leaves_the_name_free(ui, monkeypatch, code, reason):
    """Soak: with --runs read-only (or its disk full) Start was a 500 "internal error: PermissionError" with a
    traceback in the server's log; a full disk left .ui/<name>/ with an empty config.yaml, and the name was then
    refused as a start "that ended before writing ... (see its train.log)", a log that did not exist."""
    name = f"nowrite{code}"
    meta = ui[1] / "runs" / ".ui" / name
    write_text, mkdir = Path.write_text, Path.mkdir

    def refuse_write(path, *args, **kwargs):
        if path.parent == meta:
            write_text(path, "")  # the file made, its bytes refused: what a full disk does
            raise OSError(code, os.strerror(code), str(path))
        return write_text(path, *args, **kwargs)

    def refuse_mkdir(path, *args, **kwargs):
        if path == meta:
            raise OSError(code, os.strerror(code), str(path))
        return mkdir(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text" if code == errno.ENOSPC else "mkdir",
                  refuse_write if code == errno.ENOSPC else refuse_mkdir)
        r = call(ui, "POST", "/ui/api/runs", json=form(name=name))
    assert r.status_code == 507, r.text
    message = r.json()["error"]["message"]
    fix = "fix that, or start the dashboard with --runs naming a folder it may write"
    if code == errno.ENOSPC:  # room is said only where the error is about room
        assert message.startswith(f"cannot write {meta}: {reason} (") and message.endswith(f" free there); {fix}")
    else:
        assert message == f"cannot write {meta}: {reason}; {fix}"
    assert r.json()["error"]["code"] == "cannot_write"
    assert not meta.exists() and not (ui[1] / "runs" / name).exists()
    r = call(ui, "POST", "/ui/api/runs", json=form(name=name, max_steps="1"))  # the name is free
    assert r.status_code == 200, r.text
    wait_for(lambda: call(ui, "GET", f"/ui/api/runs/{name}/metrics").json()["status"] != "running")


def test_the_dashboard_bounds_onednns_kernel_caches_before_the_model_loads(tmp_path, monkeypatch):
    """The dashboard serves the API as `serve` does: oneDNN's and ideep's caches of bf16 kernels (one per matmul
    shape, 1,024 by default) are set to 128 before its model loads, as serve's are (they grew without end)."""
    seen = env_when_base_loads(monkeypatch, ui_app, lambda: ui_app.run_ui("tiny", runs=str(tmp_path / "runs"), port=0),
                               ONEDNN_CACHES, RuntimeError)
    assert seen == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}
