// loraforge dashboard: plain JavaScript, no build step. Talks to /ui/api (runs) and /v1 (OpenAI-compatible API).
"use strict";
const $ = (sel, el = document) => el.querySelector(sel);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const METRICS = ["loss", "lr", "grad_norm", "tokens_per_s"];
const state = { runs: [], selected: [], data: {}, streams: {}, notes: {}, charts: {}, info: null, base: null,
                convo: {} };

// A new key reloads the page's data and restarts the streams of the runs already ticked (they failed, or used the
// old key).
const keyInput = $("#key");
keyInput.value = localStorage.getItem("loraforge-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("loraforge-key", keyInput.value);
  runsError("");
  init();
  for (const name of state.selected) follow(name);
});
function headers(extra = {}) {
  return keyInput.value ? { Authorization: "Bearer " + keyInput.value, ...extra } : extra;
}
// The server's one-line message of a failed response ({"error": {"message": ...}}), else the HTTP status.
async function failure(r) {
  const body = r.headers.get("content-type")?.includes("json") ? await r.json().catch(() => null) : null;
  return body?.error?.message || `${r.status} ${r.statusText}`.trim();
}
async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: headers(opts.headers || {}) });
  if (!r.ok) throw new Error(await failure(r));
  return r.headers.get("content-type")?.includes("json") ? await r.json() : null;
}
// Python's json writes NaN and Infinity as bare words, which JSON.parse refuses: read them (outside strings) as null.
function parseJSON(text) {
  try {
    return JSON.parse(text);
  } catch {
    return JSON.parse(text.replace(/"(?:[^"\\]|\\.)*"|-?\b(?:NaN|Infinity)\b/g, m => m[0] === '"' ? m : "null"));
  }
}
const sleep = (ms, signal) => new Promise(done => {
  const t = setTimeout(done, ms);
  signal.addEventListener("abort", () => { clearTimeout(t); done(); }, { once: true });
});
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

// --- tabs ---
for (const b of document.querySelectorAll("nav button")) {
  b.addEventListener("click", () => showTab(b.dataset.tab));
}
function showTab(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== "tab-" + name;
  if (name === "play" || name === "adapters") loadModels();
}

// --- runs: list, selection, live metrics over server-sent events (read with fetch so the key header goes along) ---
// Errors of the runs tab's actions (stop, zip, a stream that cannot start), shown above the list.
function runsError(message) {
  const box = $("#runs-error");
  box.textContent = message ? "error: " + message : "";
  box.hidden = !message;
}
// A run's stream state beside its status ("reconnecting…"), kept across the list's reloads.
function setNote(name, note) {
  if (note) state.notes[name] = note; else delete state.notes[name];
  const span = document.querySelector(`#runs tr[data-run="${CSS.escape(name)}"] .stream-note`);
  if (span) span.textContent = note || "";
}
// A ticked run that is no longer listed (its folder was deleted) is unticked: its stream closed, its curves and data
// dropped. Only runs ticked before the list was asked for: one ticked meanwhile (just started) is not in it yet.
async function loadRuns() {
  const asked = new Set(state.selected);
  const { runs } = await api("/ui/api/runs");
  state.runs = runs;
  const listed = new Set(runs.map(r => r.name));
  const gone = state.selected.filter(n => asked.has(n) && !listed.has(n));
  for (const name of gone) {
    state.streams[name]?.abort();
    delete state.streams[name];
    delete state.data[name];
    delete state.notes[name];
  }
  if (gone.length) {
    state.selected = state.selected.filter(n => !gone.includes(n));
    draw();
    showExtras();
  }
  const body = $("#runs tbody");
  body.replaceChildren();
  for (const run of runs) {
    const box = el("input", { type: "checkbox", "data-run": run.name });
    box.checked = state.selected.includes(run.name);
    box.addEventListener("change", () => toggleRun(run.name, box.checked));
    const actions = el("td");
    // Stop: SIGINT, the run finishes its step and checkpoints it, however long that takes. Once asked, "Stop now"
    // (SIGTERM) interrupts the step instead; the last complete checkpoint is kept.
    if (run.status === "running" && run.stopping) {
      actions.append(el("span", { class: "stopping" }, "stopping… "),
                     el("button", { class: "stop-now", onclick: () => stopRun(run.name, true),
                                    title: "interrupt the step now: it is lost, the last complete checkpoint is kept" },
                        "Stop now"));
    } else if (run.status === "running") {
      actions.append(el("button", { class: "stop", onclick: () => stopRun(run.name),
                                    title: "finish the current step, save a checkpoint of it, then stop" }, "Stop"));
    }
    if (run.has_adapter) actions.append(el("button", { class: "zip", onclick: () => downloadZip(run.name) }, "zip"));
    const row = el("tr", { "data-run": run.name, "data-status": run.status,
                           class: state.selected.includes(run.name) ? "selected" : "" },
      el("td", {}, box), el("td", {}, run.name),
      el("td", { class: "status-" + run.status }, run.status,
         el("span", { class: "stream-note" }, state.notes[run.name] || "")),
      actions);
    body.append(row);
  }
}
function toggleRun(name, on) {
  state.selected = on ? [...new Set([...state.selected, name])] : state.selected.filter(n => n !== name);
  if (on) follow(name); else { state.streams[name]?.abort(); delete state.streams[name]; setNote(name, ""); }
  loadRuns().then(() => { draw(); showExtras(); }).catch(e => runsError(e.message));
}
// A row the charts can use: an object with a numeric step. A damaged or hand-written metrics.jsonl can hold anything
// (null, arrays, strings, a string step); such rows are skipped here whatever the server sends.
const isRow = r => r !== null && typeof r === "object" && !Array.isArray(r) && Number.isFinite(r.step);

// A browser holds 6 connections per host (HTTP/1.1) and a stream holds one while it lasts: seven ticked live runs
// left Stop, the list, extras and the playground waiting forever. The runs' streams share STREAM_SLOTS connections,
// each for a slice of at most SLICE_S seconds (the server then sends `pause`), queued in turn; the rest stay free.
const STREAM_SLOTS = 3, SLICE_S = 5;
const slots = { free: STREAM_SLOTS, waiting: [] };
// Resolves true once a slot is this stream's, false if the stream was aborted while it waited.
function takeSlot(signal) {
  if (signal.aborted) return Promise.resolve(false);
  if (slots.free > 0) {
    slots.free--;
    return Promise.resolve(true);
  }
  return new Promise(done => {
    const waiter = () => done(true);
    slots.waiting.push(waiter);
    signal.addEventListener("abort", () => {
      const i = slots.waiting.indexOf(waiter);
      if (i >= 0) { slots.waiting.splice(i, 1); done(false); }
    }, { once: true });
  });
}
function giveSlot() {
  const next = slots.waiting.shift();
  if (next) next(); else slots.free++;
}
// Follow a ticked run's metrics until its `end` event, in slices (`pause`: back in the queue for a slot, from the
// offset reached). A stream that breaks before its end (the server restarted, the network dropped) is reopened from
// the last offset, 1 s later and then up to 10 s apart, while the run stays ticked; an answer the server refuses (a
// wrong key, a run that is gone) is shown and not retried until the key changes.
async function follow(name) {
  state.streams[name]?.abort();
  const ctrl = new AbortController();
  state.streams[name] = ctrl;
  const run = state.data[name] = { rows: [], offset: 0 };
  let delay = 1000;
  while (!ctrl.signal.aborted) {
    if (!await takeSlot(ctrl.signal)) return;
    let paused = false;
    try {
      const file = run.file ? `&file=${encodeURIComponent(run.file)}` : "";  // which file run.offset is in
      const query = `interval=0.3&budget=${SLICE_S}&offset=${run.offset}${file}`;
      const r = await fetch(`/ui/api/runs/${encodeURIComponent(name)}/events?${query}`,
                            { headers: headers(), signal: ctrl.signal });
      if (r.status === 400 && run.offset > 0) {  // metrics.jsonl was rewritten meanwhile (shorter): read it anew
        run.rows = [];
        run.offset = 0;
        run.file = null;
        continue;
      }
      if (r.status >= 400 && r.status < 500) {
        setNote(name, "");
        runsError(`${name}: ${await failure(r)}`);
        return;
      }
      if (!r.ok) throw new Error(await failure(r));
      for await (const { event, data } of serverSentEvents(r)) {
        let msg;
        try {
          msg = parseJSON(data);
        } catch (e) {
          console.warn(`${name}: an unreadable metrics event skipped`, e);
          continue;
        }
        if (ctrl.signal.aborted) return;
        if (event === "reset") run.rows = [];  // metrics.jsonl was replaced (a run started over): from its start
        if (typeof msg?.file === "string") run.file = msg.file;
        for (const row of Array.isArray(msg?.rows) ? msg.rows : []) if (isRow(row)) run.rows.push(row);
        if (Number.isFinite(msg?.offset)) run.offset = msg.offset;
        run.status = msg?.status;
        delay = 1000;
        setNote(name, "");
        draw();
        if (event === "end") {
          loadRuns().then(showExtras).catch(e => runsError(e.message));
          return;
        }
        if (event === "pause") {
          paused = true;
          break;
        }
      }
    } catch (e) {
      if (ctrl.signal.aborted) return;
      console.warn(`${name}: metrics stream broke`, e);
    } finally {
      giveSlot();
    }
    if (paused) continue;
    setNote(name, "reconnecting…");
    await sleep(delay, ctrl.signal);
    delay = Math.min(2 * delay, 10000);
  }
}
// Server-sent events of a fetch response, one { event, data } per event (data lines joined); events without data
// are skipped. Both the runs' live metrics and the playground's streamed completions are read through it.
async function* serverSentEvents(response) {
  const reader = response.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const lines = buf.slice(0, i).split("\n"); buf = buf.slice(i + 2);
      const data = lines.filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\n");
      const event = (lines.find(l => l.startsWith("event: ")) || "").slice(7);
      if (data) yield { event, data };
    }
  }
}
// Stop answers 409 when the run ended between two reloads of the list: the server's message says so. `force`: "Stop
// now", for a run already asked to stop.
async function stopRun(name, force = false) {
  runsError("");
  try {
    await api(`/ui/api/runs/${encodeURIComponent(name)}/stop${force ? "?force=true" : ""}`, { method: "POST" });
  } catch (e) {
    runsError(e.message);
  }
  setTimeout(() => loadRuns().catch(() => {}), 500);
}
async function downloadZip(name) {
  runsError("");
  try {
    const r = await fetch(`/ui/api/runs/${encodeURIComponent(name)}/adapter.zip`, { headers: headers() });
    if (!r.ok) throw new Error(await failure(r));
    const url = URL.createObjectURL(await r.blob());
    el("a", { href: url, download: name.split("/").pop() + "-adapter.zip" }).click();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (e) {
    runsError(e.message);
  }
}

// --- charts: one uPlot per metric, one series per selected run on a shared step axis; a value that is not a finite
// number (null, NaN, a string) is no point ---
function draw() {
  for (const metric of METRICS) {
    const box = $("#chart-" + metric);
    const steps = new Set(), series = [{}], cols = [];
    let points = 0;
    state.selected.forEach((name, i) => {
      const rows = state.data[name]?.rows || [];
      const keys = metric === "loss" ? ["loss", "eval_loss"] : [metric];
      for (const key of keys) {
        const m = new Map(rows.filter(r => Number.isFinite(r[key])).map(r => [r.step, r[key]]));
        m.forEach((_, s) => steps.add(s));
        points += m.size;
        cols.push(m);
        series.push({ label: key === "eval_loss" ? name + " (held-out)" : name, stroke: COLORS[i % COLORS.length],
                      dash: key === "eval_loss" ? [6, 4] : undefined, spanGaps: true,
                      points: { show: key === "eval_loss" } });
      }
    });
    const xs = [...steps].sort((a, b) => a - b);
    const data = [xs, ...cols.map(m => xs.map(s => m.has(s) ? m.get(s) : null))];
    box.dataset.points = points;
    const key = state.selected.join("|") + ":" + series.length;
    if (state.charts[metric] && state.charts[metric].key === key) { state.charts[metric].plot.setData(data); continue; }
    state.charts[metric]?.plot.destroy();
    const tick = v => v == null ? "" : String(Number(v.toPrecision(3)));
    const opts = { width: 450, height: 220, series, scales: { x: { time: false } },
                   axes: [{ label: "step" }, { size: 60, values: (u, vals) => vals.map(tick) }],
                   legend: { show: true } };
    state.charts[metric] = { key, plot: new uPlot(opts, data, box) };
  }
}

// --- extras of the last selected run: AdaLoRA rank heat-map, forgetting table, log tail of a failed run. Ticking a run
// and its stream's end both ask for them: only the newest call's answer is shown, once. ---
let extrasCall = 0;
async function showExtras() {
  const call = ++extrasCall;
  const box = $("#extras");
  const name = state.selected[state.selected.length - 1];
  if (!name) { box.replaceChildren(); return; }
  let x;
  try {
    x = await api(`/ui/api/runs/${encodeURIComponent(name)}/extras`);
  } catch (e) {
    if (call === extrasCall) box.replaceChildren(el("pre", { class: "error" }, `error: ${name}: ${e.message}`));
    return;
  }
  if (call !== extrasCall) return;  // a newer call is under way
  const parts = [];
  if (x.ranks) {
    const max = x.ranks.init_r || Math.max(...Object.values(x.ranks.ranks));
    const table = el("table", { class: "heat" });
    for (const [mod, r] of Object.entries(x.ranks.ranks)) {
      const shade = Math.round(40 + 180 * (1 - r / max));
      table.append(el("tr", {}, el("th", {}, mod), el("td", { style: `background: rgb(${shade},${shade},200)` }, r)));
    }
    parts.push(el("h3", {}, `${name}: AdaLoRA kept rank per module (of ${max})`), table);
  }
  if (x.forgetting) {
    const rows = (Array.isArray(x.forgetting.rows) ? x.forgetting.rows : []).filter(r => r && typeof r === "object");
    const keys = [...new Set(rows.flatMap(r => Object.keys(r)))];
    const table = el("table", { class: "forgetting" }, el("tr", {}, ...keys.map(k => el("th", {}, k))));
    const cell = v => typeof v === "number" ? v.toFixed(4) : JSON.stringify(v) ?? "";
    for (const r of rows) table.append(el("tr", {}, ...keys.map(k => el("td", {}, cell(r[k])))));
    parts.push(el("h3", {}, `${name}: forgetting`),
               rows.length ? table : el("pre", {}, JSON.stringify(x.forgetting, null, 1)));
  }
  const run = state.runs.find(r => r.name === name);
  if (run?.config) parts.push(el("h3", {}, `${name}: config`), el("pre", {}, run.config));
  if (x.log && run && run.status !== "finished") {
    parts.push(el("h3", {}, `${name}: train.log (end)`), el("pre", {}, x.log));
  }
  box.replaceChildren(...parts);
}

// --- start a run: the server validates with the CLI's rules and answers with the CLI's message ---
$("#start-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const form = Object.fromEntries(new FormData(ev.target).entries());
  const err = $("#form-error");
  err.hidden = true;
  try {
    const r = await api("/ui/api/runs", { method: "POST", body: JSON.stringify(form),
                                          headers: { "Content-Type": "application/json" } });
    showTab("runs");
    state.selected = [...new Set([...state.selected, r.name])];
    follow(r.name);
    await loadRuns();
    showExtras();
  } catch (e) {
    err.textContent = "error: " + e.message;  // what `loraforge train` prints for the same config
    err.hidden = false;
  }
});

// --- playground: the same conversation to each ticked model, streamed from /v1/chat/completions ---
async function loadModels() {
  const { data } = await api("/v1/models");
  state.base = data.find(m => !m.parent)?.id;
  const box = $("#play-models");
  const ticked = new Set([...box.querySelectorAll("input:checked")].map(i => i.value));
  box.replaceChildren(...data.map(m => {
    const i = el("input", { type: "checkbox", value: m.id, "data-model": m.id });
    i.checked = ticked.size ? ticked.has(m.id) : !m.parent;
    return el("label", { class: "model" }, i, m.parent ? m.id : m.id + " (base)");
  }));
  const served = $("#served tbody");
  served.replaceChildren(...data.filter(m => m.parent).map(m => el("tr", { "data-adapter": m.id },
    el("td", {}, m.id), el("td", {}, el("button", { class: "unload", onclick: () => unload(m.id) }, "Unload")))));
  const avail = await api("/ui/api/adapters");
  $("#load-form select").replaceChildren(...avail.available.map(p => el("option", { value: p }, p)));
}
$("#play-reset").addEventListener("click", () => { state.convo = {}; $("#play-cols").replaceChildren(); });
// The sampling fields as typed: an empty one is left out of the request (the server's default); any other must be a
// number (max tokens a whole one), or nothing is sent and the error names the field. Number() alone made "0,5" NaN,
// which JSON sends as null, so the server quietly used its default; an empty max tokens became 0.
function sampling() {
  const fields = [["#temperature", "temperature", "temperature", "a number", "0.7 (with a dot, not a comma)",
                   Number.isFinite],
                  ["#max-tokens", "max tokens", "max_tokens", "a whole number", "64", Number.isSafeInteger]];
  const params = {};
  for (const [sel, label, key, kind, example, ok] of fields) {
    const text = $(sel).value.trim();
    if (!text) continue;
    const value = Number(text);
    if (!ok(value)) throw new Error(`${label} ${JSON.stringify(text)} is not ${kind}: type one such as ${example}, ` +
                                    `or leave it empty for the server's default`);
    params[key] = value;
  }
  return params;
}
$("#play-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text) return;
  const err = $("#play-error");
  let params;
  try {
    params = sampling();
  } catch (e) {
    err.textContent = "error: " + e.message;
    err.hidden = false;
    return;  // the prompt stays, to send once the field is fixed
  }
  err.hidden = true;
  $("#prompt").value = "";
  const models = [...document.querySelectorAll("#play-models input:checked")].map(i => i.value);
  for (const m of models) chat(m, text, params);
});
function column(model) {
  let col = document.querySelector(`.play-col[data-model="${CSS.escape(model)}"]`);
  if (!col) {
    col = el("div", { class: "play-col", "data-model": model },
             el("h3", {}, model === state.base ? model + " (base)" : model));
    $("#play-cols").append(col);
  }
  return col;
}
// The turn joins the model's conversation only once answered: a failed one (a prompt too long) is shown with its error
// and left out of the next requests, which it would otherwise make fail too.
async function chat(model, text, params) {
  const convo = state.convo[model] = state.convo[model] || [];
  const turn = { role: "user", content: text };
  const col = column(model);
  col.append(el("div", { class: "msg user" }, text));
  const out = el("div", { class: "msg assistant", "data-done": "false" }), stats = el("div", { class: "stats" });
  col.append(out, stats);
  const t0 = performance.now();
  let first = null, usage = null, reply = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model, messages: [...convo, turn], stream: true, stream_options: { include_usage: true },
                             ...params }) });
    if (!r.ok) throw new Error(await failure(r));
    for await (const { data } of serverSentEvents(r)) {
      if (data === "[DONE]") continue;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message);
      if (obj.usage) usage = obj.usage;
      const delta = obj.choices?.[0]?.delta?.content;
      if (delta) { first = first ?? performance.now(); reply += delta; out.textContent = reply; }
    }
    convo.push(turn, { role: "assistant", content: reply });
    const ms = performance.now() - t0;
    stats.textContent = `${usage?.completion_tokens ?? "?"} tokens (prompt ${usage?.prompt_tokens ?? "?"}), ` +
      `first token ${first ? Math.round(first - t0) : "-"} ms, total ${Math.round(ms)} ms`;
  } catch (e) {
    out.classList.add("error"); out.textContent = "error: " + e.message;
  }
  out.dataset.done = "true";
}

// --- adapters: load (confined to the server's adapters_dir) and unload through /v1/adapters ---
$("#load-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const f = Object.fromEntries(new FormData(ev.target).entries());
  const err = $("#adapter-error");
  err.hidden = true;
  try {
    await api("/v1/adapters", { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify({ name: f.name, path: f.path }) });
  } catch (e) { err.textContent = "error: " + e.message; err.hidden = false; }
  loadModels();
});
async function unload(name) {
  const err = $("#adapter-error");
  err.hidden = true;
  try {
    await api(`/v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
  } catch (e) { err.textContent = "error: " + e.message; err.hidden = false; }
  loadModels();
}

// --- start ---
async function init() {
  try {
    state.info = await api("/ui/api/info");
  } catch (e) {
    $("#runs tbody").replaceChildren(el("tr", {}, el("td", { colspan: 4, class: "error" }, "error: " + e.message)));
    return;
  }
  const form = $("#start-form");
  const opts = (sel, values) => form.querySelector(sel)
    .replaceChildren(...values.map(v => el("option", { value: v }, v)));
  opts("[name=model]", state.info.models);
  opts("[name=dataset]", state.info.datasets);
  opts("[name=method]", state.info.methods);
  await loadRuns();
  draw();
  showExtras();
}
// The list reloads every 3 s while its tab shows; a slow answer is awaited, not overlapped by the next request.
let reloading = false;
setInterval(async () => {
  if (reloading || $("#tab-runs").hidden) return;
  reloading = true;
  try { await loadRuns(); } catch { /* the next reload tries again */ } finally { reloading = false; }
}, 3000);
$("#refresh").addEventListener("click", () => loadRuns().then(draw).catch(e => runsError(e.message)));
init();
