"""The dashboard in a real browser: Playwright driving Debian's headless Chromium (/usr/bin/chromium; never a
browser Playwright downloads). Skipped, with the reason, where Playwright or Chromium is missing.

One walk through the page as a user would, against the real server (test_ui_api.py's fixture): a bad form value
answered with the CLI's message, a run of a tiny model started from the form whose loss curve gets new points while
it trains, a second run, both compared on one chart, an adapter loaded, base and adapter side by side in the
playground with the same text the API gives, the adapter unloaded. Screenshots go to $LORAFORGE_SCREENSHOTS
(default: the test's tmp directory).
"""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import yaml

from loraforge import cli
from test_ui_api import KEY, call, form, ui  # noqa: F401 (the shared server fixture)

CHROMIUM = os.environ.get("LORAFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install -y chromium")


@pytest.fixture(scope="module")
def page(ui):  # noqa: F811
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(ui[0] + "/ui/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        yield page
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    path = Path(os.environ.get("LORAFORGE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_run(page, **values):
    page.click("nav button[data-tab=start]")
    for field, value in values.items():
        if field in ("model", "dataset", "method"):
            page.select_option(f"#start-form [name={field}]", value)
        else:
            page.fill(f"#start-form [name={field}]", value)
    page.click("#start-form button[type=submit]")


def points(page) -> int:
    return int(page.get_attribute("#chart-loss", "data-points"))


def test_walk_through_the_dashboard(ui, page, shots, tmp_path, capsys):  # noqa: F811
    from loraforge.ui.launch import form_config

    # 1. a bad value: the page shows exactly what `loraforge train` prints for it
    bad = dict(name="bad", r="0", lr="1e-3", max_steps="4", batch_size="4", save_every="2", target_modules="q_proj")
    start_run(page, **bad)
    page.wait_for_selector("#form-error:not([hidden])")
    shown = page.inner_text("#form-error")
    _, config = form_config(form(**bad), ui[1] / "runs", ui[1] / "data", {"tiny": "tiny"})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert shown.strip() == capsys.readouterr().err.strip()
    assert "lora.r" in shown
    page.screenshot(path=shots / "start-form-error.png")

    # 2. two runs from the form, the second started while the first trains (both ticked: one chart overlays them);
    # the loss curve gets new points while they train, then both finish
    start_run(page, name="first", r="4", lr="1e-3", max_steps="60", batch_size="4", save_every="30",
              target_modules="q_proj, v_proj")
    page.wait_for_selector("#runs tr[data-run=first]")
    start_run(page, name="second", r="8", lr="3e-3", max_steps="30", batch_size="4", save_every="30")
    page.wait_for_selector("#runs tr[data-run=second]")
    total = 61 + 31  # log_every 1: one point per step, and each run's held-out loss at its end
    seen, deadline = [], time.monotonic() + 300  # they finish in about a minute on 2 idle cores
    while time.monotonic() < deadline:
        statuses = {r: page.get_attribute(f"#runs tr[data-run={r}]", "data-status") for r in ("first", "second")}
        n = points(page)
        if "running" in statuses.values() and n and (not seen or n != seen[-1]):
            seen.append(n)
        if set(statuses.values()) == {"finished"} and n == total:
            break
        time.sleep(0.1)
        if len(seen) == 3:
            page.screenshot(path=shots / "run-live.png")
    assert {page.get_attribute(f"#runs tr[data-run={r}]", "data-status") for r in ("first", "second")} == {"finished"}
    assert points(page) == total
    partial = [n for n in seen if n < total]  # (the list's status can lag the curve by its 3 s refresh)
    assert len(partial) >= 2 and seen == sorted(seen), seen  # new points arrived while they were training
    assert page.locator("#chart-loss .u-legend .u-series").count() == 5  # step axis; each run's train, held-out
    page.screenshot(path=shots / "compare-runs.png")

    # 4. load the first run's adapter
    page.click("nav button[data-tab=adapters]")
    page.select_option("#load-form select", "first/adapter")
    page.fill("#load-form [name=name]", "first")
    page.click("#load-form button[type=submit]")
    page.wait_for_selector("#served tr[data-adapter=first]")

    # 5. base and adapter side by side, streamed; the same text as the API gives
    page.click("nav button[data-tab=play]")
    page.wait_for_selector("#play-models input[data-model=first]")
    page.check("#play-models input[data-model=first]")
    page.fill("#max-tokens", "12")
    page.fill("#prompt", "What is 3 plus 4?")
    page.click("#play-form button[type=submit]")
    for model in ("tiny", "first"):
        page.wait_for_selector(f".play-col[data-model={model}] .msg.assistant[data-done=true]", timeout=60_000)
    texts = {m: page.eval_on_selector(f".play-col[data-model={m}] .msg.assistant", "e => e.textContent")
             for m in ("tiny", "first")}
    for model, text in texts.items():
        r = call(ui, "POST", "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "What is 3 plus 4?"}], "temperature": 0,
            "max_tokens": 12})
        assert r.json()["choices"][0]["message"]["content"] == text, model  # exactly, whitespace included
        assert "12 tokens" in page.inner_text(f".play-col[data-model={model}] .stats")
    assert texts["tiny"] != texts["first"]  # the adapter changes the answer (trained at lr 1e-3 for 60 steps)
    page.screenshot(path=shots / "playground.png")

    # 6. unload it
    page.click("nav button[data-tab=adapters]")
    page.click("#served tr[data-adapter=first] button.unload")
    page.wait_for_selector("#served tr[data-adapter=first]", state="detached")
    assert "first" not in [m["id"] for m in call(ui, "GET", "/v1/models").json()["data"]]
    page.screenshot(path=shots / "adapters.png")
