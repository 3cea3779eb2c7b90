"""The dashboard's HTTP side (loraforge.ui) without a browser: the key on every endpoint the page uses, paths
confined to their folders, the form's errors equal to the CLI's, and stop keeping the last checkpoint.

The server is the real one: the serve app over a tiny random Llama (with SmolLM2's tokenizer) and the /ui router,
on uvicorn at 127.0.0.1 on a free port.
"""

import io
import json
import os
import time
import zipfile

import httpx
import pytest

from loraforge import cli
from loraforge.training.checkpoint import last_checkpoint, verify_checkpoint

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
    mount(app, root / "runs", root / "data", {"tiny": str(tiny_dir)}, engine, KEY)
    with ServerThread(app) as url:
        yield url, root
    engine.stop()


def call(ui, method, path, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
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
                                         ("name", "a/b")])
def test_the_form_refuses_paths_outside_its_folders(ui, field, value):
    before = sorted(ui[1].rglob("*"))
    r = call(ui, "POST", "/ui/api/runs", json=form(**{field: value}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_path", r.text
    assert sorted(ui[1].rglob("*")) == before  # nothing written anywhere


@pytest.mark.parametrize("path", ["../secret.jsonl", "/etc", "../../", "escape"])
def test_adapter_loading_is_confined_to_the_adapters_dir(ui, path):
    r = call(ui, "POST", "/v1/adapters", json={"name": "evil", "path": path})
    assert 400 <= r.status_code < 500, r.text
    assert "evil" not in [m["id"] for m in call(ui, "GET", "/v1/models").json()["data"]]


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


@pytest.mark.parametrize("changes", [{"r": "0"}, {"lr": "fast"}, {"method": "lorax"}, {"max_steps": "-3"},
                                     {"r": "0", "lora_alpha": "[1]"}])
def test_a_bad_form_value_gets_the_clis_message(ui, tmp_path, capsys, changes):
    from loraforge.ui.launch import form_config

    r = call(ui, "POST", "/ui/api/runs", json=form(name="bad", **changes))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_config", r.text
    # the same values in a YAML file given to `loraforge train`
    import yaml

    _, config = form_config(form(name="bad", **changes), ui[1] / "runs", ui[1] / "data", {"tiny": "tiny"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err == "error: " + r.json()["error"]["message"] + "\n"
    assert not (ui[1] / "runs" / "bad").exists() and not (ui[1] / "runs" / ".ui" / "bad").exists()


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
    assert launch["exit_code"] == 130  # the CLI's KeyboardInterrupt exit: train was interrupted, not killed
    last = last_checkpoint(run / "checkpoints")
    assert last is not None and verify_checkpoint(last) is None
    assert "interrupted" in (ui[1] / "runs" / ".ui" / "long" / "train.log").read_text()
    assert call(ui, "POST", "/ui/api/runs/long/stop").status_code == 409  # not running any more
    again = call(ui, "POST", "/ui/api/runs", json=form(name="long"))
    assert again.status_code == 409  # a name is never reused over an earlier run


@pytest.mark.parametrize("argv", [["ui", "--host", "0.0.0.0"], ["serve", "--ui", "--host", "0.0.0.0"],
                                  ["ui", "--host", "192.168.1.5", "--runs", "x"]])
def test_listening_beyond_loopback_needs_a_key(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2  # refused before any model loads
    err = capsys.readouterr().err
    assert "needs --api-key" in err and "--host" in err


def test_status_from_the_files_a_run_leaves(tmp_path):
    from loraforge.ui import runs as R

    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert R.status(run) == "unknown"  # started in a terminal, nothing says how it ended
    assert R.status(run, {"pid": os.getpid(), "exit_code": None}) == "failed"  # this process is not a loraforge run
    assert R.status(run, {"pid": 1, "exit_code": 0}) == "finished"
    assert R.status(run, {"pid": 1, "exit_code": 130}) == "stopped"
    assert R.status(run, {"pid": 1, "exit_code": 2}) == "failed"
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    assert R.status(run) == "finished"


@pytest.mark.parametrize("argv", [["ui"], ["serve", "--ui"]])
def test_ui_and_serve_ui_mount_the_dashboard(argv, tiny_dir, tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append((app, kw)))  # start-up only
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, "--model", str(tiny_dir), "--runs", "myruns", "--api-key", KEY]) == 0
    (app, kw), = apps
    assert kw["host"] == "127.0.0.1"
    client = TestClient(app)
    assert client.get("/ui/api/runs").status_code == 401
    assert client.get("/ui/api/runs", headers={"Authorization": f"Bearer {KEY}"}).json() == {"runs": []}
    assert (tmp_path / "myruns").is_dir() and client.get("/ui/").status_code == 200
