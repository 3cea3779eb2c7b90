// loraforge dashboard: plain JavaScript, no build step. Talks to /ui/api (runs) and /v1 (OpenAI-compatible API).
"use strict";
const $ = (sel, el = document) => el.querySelector(sel);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const METRICS = ["loss", "lr", "grad_norm", "tokens_per_s"];
const state = { runs: [], selected: [], data: {}, streams: {}, charts: {}, info: null, base: null, convo: {} };

const keyInput = $("#key");
keyInput.value = localStorage.getItem("loraforge-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("loraforge-key", keyInput.value); init(); });
function headers(extra = {}) {
  return keyInput.value ? { Authorization: "Bearer " + keyInput.value, ...extra } : extra;
}
async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: headers(opts.headers || {}) });
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (!r.ok) throw new Error(body?.error?.message || r.statusText);
  return body;
}
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
async function loadRuns() {
  const { runs } = await api("/ui/api/runs");
  state.runs = runs;
  const body = $("#runs tbody");
  body.replaceChildren();
  for (const run of runs) {
    const box = el("input", { type: "checkbox", "data-run": run.name });
    box.checked = state.selected.includes(run.name);
    box.addEventListener("change", () => toggleRun(run.name, box.checked));
    const actions = el("td");
    if (run.status === "running") actions.append(el("button", { class: "stop", onclick: () => stopRun(run.name) }, "Stop"));
    if (run.has_adapter) actions.append(el("button", { class: "zip", onclick: () => downloadZip(run.name) }, "zip"));
    const row = el("tr", { "data-run": run.name, "data-status": run.status,
                           class: state.selected.includes(run.name) ? "selected" : "" },
      el("td", {}, box), el("td", {}, run.name), el("td", { class: "status-" + run.status }, run.status), actions);
    body.append(row);
  }
}
function toggleRun(name, on) {
  state.selected = on ? [...new Set([...state.selected, name])] : state.selected.filter(n => n !== name);
  if (on) follow(name); else { state.streams[name]?.abort(); delete state.streams[name]; }
  loadRuns().then(draw);
  showExtras();
}
async function follow(name) {
  state.data[name] = { rows: [], offset: 0 };
  const ctrl = new AbortController();
  state.streams[name] = ctrl;
  try {
    const r = await fetch(`/ui/api/runs/${encodeURIComponent(name)}/events?interval=0.3`,
                          { headers: headers(), signal: ctrl.signal });
    if (!r.ok) throw new Error((await r.json()).error.message);
    for await (const { event, data } of serverSentEvents(r)) {
      const msg = JSON.parse(data);
      state.data[name].rows.push(...msg.rows);
      state.data[name].status = msg.status;
      draw();
      if (event === "end") { loadRuns(); showExtras(); }
    }
  } catch (e) { if (e.name !== "AbortError") console.error(e); }
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
async function stopRun(name) {
  await api(`/ui/api/runs/${encodeURIComponent(name)}/stop`, { method: "POST" });
  setTimeout(loadRuns, 500);
}
async function downloadZip(name) {
  const r = await fetch(`/ui/api/runs/${encodeURIComponent(name)}/adapter.zip`, { headers: headers() });
  const a = el("a", { href: URL.createObjectURL(await r.blob()), download: name + "-adapter.zip" });
  a.click();
}

// --- charts: one uPlot per metric, one series per selected run on a shared step axis ---
function draw() {
  for (const metric of METRICS) {
    const box = $("#chart-" + metric);
    const steps = new Set(), series = [{}], cols = [];
    let points = 0;
    state.selected.forEach((name, i) => {
      const rows = state.data[name]?.rows || [];
      const keys = metric === "loss" ? ["loss", "eval_loss"] : [metric];
      for (const key of keys) {
        const m = new Map(rows.filter(r => r[key] != null).map(r => [r.step, r[key]]));
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
    const opts = { width: 450, height: 220, series, scales: { x: { time: false } },
                   axes: [{ label: "step" }, { size: 60, values: (u, vals) => vals.map(v => v == null ? "" : String(Number(v.toPrecision(3)))) }], legend: { show: true } };
    state.charts[metric] = { key, plot: new uPlot(opts, data, box) };
  }
}

// --- extras of the last selected run: AdaLoRA rank heat-map, forgetting table, log tail of a failed run ---
async function showExtras() {
  const box = $("#extras");
  box.replaceChildren();
  const name = state.selected[state.selected.length - 1];
  if (!name) return;
  const x = await api(`/ui/api/runs/${encodeURIComponent(name)}/extras`);
  if (x.ranks) {
    const max = x.ranks.init_r || Math.max(...Object.values(x.ranks.ranks));
    const table = el("table", { class: "heat" });
    for (const [mod, r] of Object.entries(x.ranks.ranks)) {
      const shade = Math.round(40 + 180 * (1 - r / max));
      table.append(el("tr", {}, el("th", {}, mod), el("td", { style: `background: rgb(${shade},${shade},200)` }, r)));
    }
    box.append(el("h3", {}, `${name}: AdaLoRA kept rank per module (of ${max})`), table);
  }
  if (x.forgetting) {
    const rows = x.forgetting.rows || [];
    const keys = rows.length ? Object.keys(rows[0]) : [];
    const table = el("table", { class: "forgetting" }, el("tr", {}, ...keys.map(k => el("th", {}, k))));
    for (const r of rows) table.append(el("tr", {}, ...keys.map(k => el("td", {}, typeof r[k] === "number" ? r[k].toFixed(4) : JSON.stringify(r[k])))));
    box.append(el("h3", {}, `${name}: forgetting`), rows.length ? table : el("pre", {}, JSON.stringify(x.forgetting, null, 1)));
  }
  const run = state.runs.find(r => r.name === name);
  if (run?.config) box.append(el("h3", {}, `${name}: config`), el("pre", {}, run.config));
  if (x.log && run && run.status !== "finished") box.append(el("h3", {}, `${name}: train.log (end)`), el("pre", {}, x.log));
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
$("#play-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text) return;
  $("#prompt").value = "";
  const models = [...document.querySelectorAll("#play-models input:checked")].map(i => i.value);
  for (const m of models) chat(m, text);
});
function column(model) {
  let col = document.querySelector(`.play-col[data-model="${CSS.escape(model)}"]`);
  if (!col) {
    col = el("div", { class: "play-col", "data-model": model }, el("h3", {}, model === state.base ? model + " (base)" : model));
    $("#play-cols").append(col);
  }
  return col;
}
async function chat(model, text) {
  const convo = state.convo[model] = state.convo[model] || [];
  convo.push({ role: "user", content: text });
  const col = column(model);
  col.append(el("div", { class: "msg user" }, text));
  const out = el("div", { class: "msg assistant", "data-done": "false" }), stats = el("div", { class: "stats" });
  col.append(out, stats);
  const t0 = performance.now();
  let first = null, usage = null, reply = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model, messages: convo, stream: true, stream_options: { include_usage: true },
                             temperature: Number($("#temperature").value), max_tokens: Number($("#max-tokens").value) }) });
    if (!r.ok) throw new Error((await r.json()).error.message);
    for await (const { data } of serverSentEvents(r)) {
      if (data === "[DONE]") continue;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message);
      if (obj.usage) usage = obj.usage;
      const delta = obj.choices?.[0]?.delta?.content;
      if (delta) { first = first ?? performance.now(); reply += delta; out.textContent = reply; }
    }
    convo.push({ role: "assistant", content: reply });
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
  await api(`/v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
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
  const opts = (sel, values) => form.querySelector(sel).replaceChildren(...values.map(v => el("option", { value: v }, v)));
  opts("[name=model]", state.info.models);
  opts("[name=dataset]", state.info.datasets);
  opts("[name=method]", state.info.methods);
  await loadRuns();
  draw();
}
setInterval(() => { if (!$("#tab-runs").hidden) loadRuns().catch(() => {}); }, 3000);
init();
