// loraforge dashboard: plain JavaScript, no build step. Talks to /ui/api (runs) and /v1 (OpenAI-compatible API).
"use strict";
const $ = (sel, el = document) => el.querySelector(sel);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const METRICS = ["loss", "lr", "grad_norm", "tokens_per_s"];
// The ticked runs are kept in this browser's storage: a reload of the page ticks them again (those still listed).
const TICKED = "loraforge-ticked";
function storedTicks() {
  try {
    const names = JSON.parse(localStorage.getItem(TICKED));
    return Array.isArray(names) ? names.filter(n => typeof n === "string") : [];
  } catch {
    return [];
  }
}
const state = { runs: [], selected: storedTicks(), data: {}, streams: {}, notes: {}, charts: {}, info: null,
                base: null, convo: {}, sending: null };
function select(names) {
  state.selected = names;
  localStorage.setItem(TICKED, JSON.stringify(names));
}

// A new key reloads the page's data and restarts the streams of the runs already ticked (they failed, or used the
// old key).
const keyInput = $("#key");
keyInput.value = localStorage.getItem("loraforge-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("loraforge-key", keyInput.value);
  runsError("");
  init().catch(runsError);
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
// The server does not answer, or refuses the key: said once for the whole page, in the banner under the header (not
// in each tab's box, nor as an uncaught "Failed to fetch"); the next answer clears it.
class Trouble extends Error {}
const DOWN = "the dashboard's server does not answer; retrying", NO_KEY = "API key missing or wrong: enter it above";
const keyRefused = e => e instanceof Trouble && e.message === NO_KEY;
function banner(message) {
  const box = $("#banner");
  box.textContent = message;
  box.hidden = !message;
  document.body.classList.toggle("trouble", Boolean(message));
}
// fetch with the key; no answer, or 401, is Trouble (in the banner)
async function request(path, opts = {}) {
  let r;
  try {
    r = await fetch(path, { ...opts, headers: headers(opts.headers || {}) });
  } catch (e) {
    if (opts.signal?.aborted) throw e;
    banner(DOWN);
    throw new Trouble(DOWN);
  }
  banner(r.status === 401 ? NO_KEY : "");
  if (r.status === 401) throw new Trouble(NO_KEY);
  return r;
}
async function api(path, opts = {}) {
  const r = await request(path, opts);
  if (!r.ok) throw new Error(await failure(r));
  return r.headers.get("content-type")?.includes("json") ? await r.json() : null;
}
// An error in its tab's box (`e` empty: the box hidden); Trouble is the banner's alone.
function showError(box, e, prefix = "") {
  const message = e && !(e instanceof Trouble) ? `error: ${prefix}${e.message}` : "";
  box.textContent = message;
  box.hidden = !message;
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
  if (name === "play" || name === "adapters") {
    loadModels().catch(e => showError($(name === "play" ? "#play-error" : "#adapter-error"), e));
  }
}

// --- runs: list, selection, live metrics over server-sent events (read with fetch so the key header goes along) ---
// Errors of the runs tab's actions (stop, zip, a stream that cannot start), shown above the list.
function runsError(e, prefix = "") {
  showError($("#runs-error"), e, prefix);
}
// A run's stream state beside its status ("reconnecting…"), kept across the list's reloads.
function setNote(name, note) {
  if (note) state.notes[name] = note; else delete state.notes[name];
  const span = document.querySelector(`#runs tr[data-run="${CSS.escape(name)}"] .stream-note`);
  if (span) span.textContent = note || "";
}
// A ticked run that is no longer listed (its folder was deleted) is unticked: its stream closed, its curves and data
// dropped. Only runs ticked before the list was asked for: one ticked meanwhile (just started) is not in it yet.
// A ticked run whose stream ended and that reads running again (continued with --resume from a terminal) is
// followed again from where its curve stopped: its curve stayed frozen until a reload.
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
    select(state.selected.filter(n => !gone.includes(n)));
    draw();
    showExtras();
  }
  showRuns(runs);
  for (const run of runs) {
    if (run.status === "running" && state.selected.includes(run.name) && !state.streams[run.name]) {
      follow(run.name, true);
    }
  }
}
// The list is updated in place: a row keeps its place, its checkbox and its buttons (and so the keyboard focus)
// across reloads; a run not shown before goes on top, a gone one's row is removed. Rebuilt every 3 s in the server's
// order (newest files first), rows moved under the mouse and the focus fell to the page.
function showRuns(runs) {
  const body = $("#runs tbody");
  const rows = new Map([...body.children].map(r => [r.dataset.run, r]));
  const listed = new Set(runs.map(r => r.name));
  for (const [name, row] of rows) if (!listed.has(name)) row.remove();
  const top = body.firstElementChild;
  for (const run of runs) {
    let row = rows.get(run.name);
    if (!row) {
      row = runRow(run.name);
      body.insertBefore(row, top);
    }
    updateRow(row, run);
  }
}
function runRow(name) {
  const box = el("input", { type: "checkbox", "data-run": name, "aria-label": name });
  box.addEventListener("change", () => toggleRun(name, box.checked));
  return el("tr", { "data-run": name }, el("td", {}, box), el("td", {}, name),
            el("td", {}, el("span", { class: "state" }), el("span", { class: "stream-note" }, state.notes[name] || "")),
            el("td"));
}
function updateRow(row, run) {
  const [boxCell, , statusCell, actions] = row.cells;
  const on = state.selected.includes(run.name);
  row.classList.toggle("selected", on);
  boxCell.firstChild.checked = on;
  row.dataset.status = run.status;
  statusCell.className = "status-" + run.status;
  statusCell.firstChild.textContent = run.status;
  // the buttons are made anew only when they change: one that stays keeps the keyboard focus
  // Stop only where the server takes it (stoppable): a run launched from this page's server, still running; not a
  // run from a terminal, nor one continued there (the server refuses those, naming their process)
  const stop = run.status === "running" && run.stoppable && (run.stopping ? "stop-now" : "stop");
  const buttons = JSON.stringify([stop, run.has_adapter]);
  if (row.dataset.buttons === buttons) return;
  row.dataset.buttons = buttons;
  actions.replaceChildren();
  // Stop: SIGINT, the run finishes its step and checkpoints it, however long that takes. Once asked, "Stop now"
  // (SIGTERM) interrupts the step instead; the last complete checkpoint is kept.
  if (stop === "stop-now") {
    actions.append(el("span", { class: "stopping" }, "stopping… "),
                   el("button", { class: "stop-now", onclick: () => stopRun(run.name, true),
                                  title: "interrupt the step now: it is lost, the last complete checkpoint is kept" },
                      "Stop now"));
  } else if (stop === "stop") {
    actions.append(el("button", { class: "stop", onclick: () => stopRun(run.name),
                                  title: "finish the current step, save a checkpoint of it, then stop" }, "Stop"));
  }
  if (run.has_adapter) actions.append(el("button", { class: "zip", onclick: () => downloadZip(run.name) }, "zip"));
}
function toggleRun(name, on) {
  select(on ? [...new Set([...state.selected, name])] : state.selected.filter(n => n !== name));
  runsError("");  // an error of another run's stream (or an action) is old news
  if (on) follow(name); else { state.streams[name]?.abort(); delete state.streams[name]; setNote(name, ""); }
  loadRuns().then(() => { draw(); showExtras(); }).catch(runsError);
}
// A row the charts can use: an object with a numeric step. A damaged or hand-written metrics.jsonl can hold anything
// (null, arrays, strings, a string step); such rows are skipped here whatever the server sends.
const isRow = r => r !== null && typeof r === "object" && !Array.isArray(r) && Number.isFinite(r.step);

// A browser holds 6 connections per host (HTTP/1.1), shared by all its tabs, and a stream holds one while it lasts:
// seven ticked live runs left Stop, the list, extras and the playground waiting forever. The runs' streams share
// STREAM_SLOTS connections, each for a slice of at most SLICE_S seconds (the server then sends `pause`), queued in
// turn; the rest stay free. The slots are Web Locks, which every tab of this server in the browser shares as it
// shares the connections (three tabs of 3 slots each took all 6: a third tab's curves stayed empty, the list took
// 10-25 s); a page without them (not a secure context: another machine's address over http) counts its own.
const STREAM_SLOTS = 3, SLICE_S = 5;
const LOCKS = window.isSecureContext ? navigator.locks : undefined;
const slots = { free: STREAM_SLOTS, waiting: [] };
// Resolves to the function that gives the slot back once a slot is this stream's; null if the stream was aborted
// while it waited.
function takeSlot(signal) {
  if (signal.aborted) return Promise.resolve(null);
  if (LOCKS) return takeLock(signal);
  if (slots.free > 0) {
    slots.free--;
    return Promise.resolve(giveSlot);
  }
  return new Promise(done => {
    const waiter = () => done(giveSlot);
    slots.waiting.push(waiter);
    signal.addEventListener("abort", () => {
      const i = slots.waiting.indexOf(waiter);
      if (i >= 0) { slots.waiting.splice(i, 1); done(null); }
    }, { once: true });
  });
}
function giveSlot() {
  const next = slots.waiting.shift();
  if (next) next(); else slots.free++;
}
// One of the STREAM_SLOTS locks, whichever is granted first (the others' requests are withdrawn; one granted
// meanwhile is given back at once); held until the returned function is called.
function takeLock(signal) {
  return new Promise(done => {
    let held = false;
    const asks = [];
    const withdraw = () => asks.forEach(ask => ask.abort());
    signal.addEventListener("abort", () => { withdraw(); if (!held) done(null); }, { once: true });
    for (let i = 0; i < STREAM_SLOTS; i++) {
      const ask = new AbortController();
      asks.push(ask);
      LOCKS.request(`loraforge-stream-slot-${i}`, { signal: ask.signal }, () => {
        if (held || signal.aborted) return undefined;  // given back at once
        held = true;
        withdraw();
        return new Promise(release => done(release));
      }).catch(() => {});  // withdrawn before it was granted (AbortError)
    }
  });
}
// Follow a ticked run's metrics until its `end` event, in slices (`pause`: back in the queue for a slot, from the
// offset reached). A stream that breaks before its end (the server restarted, the network dropped) is reopened from
// the last offset, 1 s later and then up to 10 s apart, while the run stays ticked; an answer the server refuses (a
// wrong key, a run that is gone) is shown and not retried until the key changes. After `end` the run has no stream;
// the list's reload follows it again (`resume`: from the rows and offset it has) if it reads running again.
async function follow(name, resume = false) {
  state.streams[name]?.abort();
  const ctrl = new AbortController();
  state.streams[name] = ctrl;
  const run = resume && state.data[name] || (state.data[name] = { rows: [], offset: 0 });
  let delay = 1000;
  while (!ctrl.signal.aborted) {
    const release = await takeSlot(ctrl.signal);
    if (!release) return;
    let paused = false;
    try {
      const file = run.file ? `&file=${encodeURIComponent(run.file)}` : "";  // which file run.offset is in
      const query = `interval=0.3&budget=${SLICE_S}&offset=${run.offset}${file}`;
      const r = await request(`/ui/api/runs/${encodeURIComponent(name)}/events?${query}`, { signal: ctrl.signal });
      if (r.status === 400 && run.offset > 0) {  // metrics.jsonl was rewritten meanwhile (shorter): read it anew
        run.rows = [];
        run.offset = 0;
        run.file = null;
        continue;
      }
      if (r.status >= 400 && r.status < 500) {
        setNote(name, "");
        runsError(new Error(await failure(r)), `${name}: `);
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
        drawSoon();
        if (event === "end") {
          if (state.streams[name] === ctrl) delete state.streams[name];
          loadRuns().then(showExtras).catch(runsError);
          return;
        }
        // the server ends the stream right after `pause`: read to its end, so the slot is given back only once the
        // connection is free (a break cancelled the body, and the next slice's stream opened while it still closed)
        if (event === "pause") paused = true;
      }
    } catch (e) {
      if (ctrl.signal.aborted) return;
      if (keyRefused(e)) {  // the banner says so; the key's change starts the stream again
        setNote(name, "");
        return;
      }
      console.warn(`${name}: metrics stream broke`, e);
    } finally {
      release();
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
    runsError(e);
  }
  setTimeout(() => loadRuns().catch(() => {}), 500);
}
async function downloadZip(name) {
  runsError("");
  try {
    const r = await request(`/ui/api/runs/${encodeURIComponent(name)}/adapter.zip`);
    if (!r.ok) throw new Error(await failure(r));
    const url = URL.createObjectURL(await r.blob());
    el("a", { href: url, download: name.split("/").pop() + "-adapter.zip" }).click();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (e) {
    runsError(e);
  }
}

// --- charts: one uPlot per metric, one series per selected run on a shared step axis; a value that is not a finite
// number (null, NaN, a string) is no point ---
// A stream asks for a draw after each event, and a draw goes over every row: a run with 1,000,000 metrics rows came
// in 133 events of 1 MB and was drawn whole after each (a soak: the page answered nothing for 2 minutes). Its draws
// are coalesced: one at most waits, and it starts no sooner than 4 × the last draw's time (and 0.25 s) after that
// draw ended, so drawing never takes more than a fifth of the page's time however long the run.
const DRAW_GAP_MS = 250;
const drawing = { waiting: false, ended: -Infinity, took: 0 };
function drawSoon() {
  if (drawing.waiting) return;
  drawing.waiting = true;
  setTimeout(() => {
    drawing.waiting = false;
    const began = performance.now();
    draw();
    drawing.ended = performance.now();
    drawing.took = drawing.ended - began;
  }, Math.max(0, drawing.ended + Math.max(DRAW_GAP_MS, 4 * drawing.took) - performance.now()));
}
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
        if (key === "eval_loss" && !m.size) continue;  // a held-out legend entry only for a run with held-out loss
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
    const clip = clipOf(cols);
    box.querySelector(".clipped").textContent = clip.above ? ` — ${clip.above} point${clip.above > 1 ? "s" : ""} ` +
      `above the chart, up to ${clip.max.toPrecision(3)}` : "";
    const key = state.selected.join("|") + ":" + series.length;
    const chart = state.charts[metric];
    if (chart && chart.key === key) {
      chart.clip = clip;
      chart.plot.setData(data);
      continue;
    }
    chart?.plot.destroy();
    const made = state.charts[metric] = { key, clip };
    const range = (u, min, max) => uPlot.rangeNum(min, Math.min(max, made.clip.top), 0.1, true);
    const opts = { width: chartWidth(), height: 220, series, scales: { x: { time: false }, y: { range } },
                   axes: [{ label: "step" }, { size: axisSize, values: (u, vals) => tickLabels(vals) }],
                   legend: { show: true } };
    made.plot = new uPlot(opts, data, box);
    for (const label of box.querySelectorAll(".u-legend .u-label")) label.title = label.textContent;
  }
}
// A value far above the others (one 1e308 loss flattened every curve) is left above the chart, whose title says so:
// past q3 + 1000 × the interquartile range of the values (quartiles of a sample of about 2,000). `top`: the highest
// value kept, where the y range ends.
function clipOf(cols) {
  const values = cols.flatMap(m => [...m.values()]);
  const stride = Math.ceil(values.length / 2000) || 1;
  const sample = values.filter((_, i) => i % stride === 0).sort((a, b) => a - b);
  const q = p => sample[Math.floor(p * (sample.length - 1))];
  const spread = sample.length >= 4 ? Math.max(q(0.75) - q(0.25), Math.abs(q(0.75)) * 1e-3) : 0;
  const fence = spread > 0 ? q(0.75) + 1000 * spread : Infinity;
  const highest = vs => vs.reduce((a, v) => Math.max(a, v), -Infinity);
  const above = values.filter(v => v > fence);
  return { top: above.length ? highest(values.filter(v => v <= fence)) : Infinity, above: above.length,
           max: highest(above) };
}
// 450 px, less on a narrow screen (a phone's 400 px)
const chartWidth = () => Math.min(450, document.documentElement.clientWidth - 48);
addEventListener("resize", () => {
  for (const { plot } of Object.values(state.charts)) plot.setSize({ width: chartWidth(), height: 220 });
});
// The decimals `x` needs (0.25: 2, 20: 0; at most 15); float noise (0.30000000000000004) needs none.
function decimals(x) {
  let d = 0;
  while (d < 15 && Math.abs(Math.round(x * 10 ** d) - x * 10 ** d) > 1e-6) d++;
  return d;
}
// A chart's y labels for uPlot's ticks (evenly spaced, at nice steps): each with the decimals the step between them
// needs, so no two read the same (toPrecision(3) read 2.3, 2.31, 2.31); at 1e5 and past, or under 1e-3, as 1.2346e6
// (1,234,600 was cut to "234600" by the axis).
function tickLabels(vals) {
  const finite = vals.filter(Number.isFinite);
  const step = finite.length > 1 ? Math.abs(finite[1] - finite[0]) : finite[0] || 0;
  const big = Math.max(0, ...finite.map(Math.abs));
  const exponent = big >= 1e5 || (big > 0 && big < 1e-3);
  const d = decimals(step / (exponent ? 10 ** Math.floor(Math.log10(big)) : 1));
  const label = v => v === 0 ? "0" : exponent ? v.toExponential(d).replace("e+", "e") : v.toFixed(d);
  return vals.map(v => Number.isFinite(v) ? label(v) : "");
}
// The y axis as wide as its longest label (uPlot's axis-autosize recipe): a fixed 60 px cut long ones.
function axisSize(u, values, i, cycle) {
  const axis = u.axes[i];
  if (cycle > 1) return axis._size;
  const longest = (values || []).reduce((a, v) => v.length > a.length ? v : a, "");
  u.ctx.font = axis.font[0];
  return Math.max(40, Math.ceil(axis.ticks.size + axis.gap + u.ctx.measureText(longest).width / devicePixelRatio));
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
    if (call !== extrasCall) return;
    box.replaceChildren(...e instanceof Trouble ? [] : [el("pre", { class: "error" }, `error: ${name}: ${e.message}`)]);
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

// --- start a run: the server validates with the CLI's rules and answers with the CLI's message. Start is off while
// its request is on its way: a double click started the run and showed the second request's 409 here. ---
$("#start-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const button = $("#start-form button[type=submit]");
  if (button.disabled) return;
  const form = Object.fromEntries(new FormData(ev.target).entries());
  const err = $("#form-error");
  showError(err, null);
  button.disabled = true;
  try {
    const r = await api("/ui/api/runs", { method: "POST", body: JSON.stringify(form),
                                          headers: { "Content-Type": "application/json" } });
    showTab("runs");
    select([...new Set([...state.selected, r.name])]);
    follow(r.name);
    await loadRuns();
    showExtras();
  } catch (e) {
    showError(err, e);  // what `loraforge train` prints for the same config
  } finally {
    button.disabled = false;
  }
});

// --- playground: the same conversation to each ticked model, streamed from /v1/chat/completions ---
// An adapter the server warns of (a QLoRA adapter over the full-precision base: the CLI's sentence) shows it beside
// its name in both lists, where it is chosen: the server's log alone left the page's user unaware.
async function loadModels() {
  const [{ data }, avail] = await Promise.all([api("/v1/models"), api("/ui/api/adapters")]);
  const warned = id => avail.warnings?.[id] ? [el("span", { class: "adapter-warning", "data-warns": id },
                                                   avail.warnings[id])] : [];
  state.base = data.find(m => !m.parent)?.id;
  const box = $("#play-models");
  const ticked = new Set([...box.querySelectorAll("input:checked")].map(i => i.value));
  box.replaceChildren(...data.map(m => {
    const i = el("input", { type: "checkbox", value: m.id, "data-model": m.id });
    i.checked = ticked.size ? ticked.has(m.id) : !m.parent;
    return el("label", { class: "model" }, i, m.parent ? m.id : m.id + " (base)", ...warned(m.id));
  }));
  const served = $("#served tbody");
  served.replaceChildren(...data.filter(m => m.parent).map(m => el("tr", { "data-adapter": m.id },
    el("td", {}, m.id, ...warned(m.id)),
    el("td", {}, el("button", { class: "unload", onclick: () => unload(m.id) }, "Unload")))));
  $("#load-form select").replaceChildren(...avail.available.map(p => el("option", { value: p }, p)));
}
// New conversation stops the answers still streaming; their turns stay out of the new one.
$("#play-reset").addEventListener("click", () => {
  stopAnswers();
  state.convo = {};
  $("#play-cols").replaceChildren();
});
$("#play-stop").addEventListener("click", stopAnswers);
function stopAnswers() {
  state.sending?.abort();
  state.sending = null;
  sendable();
}
// Send is off while answers stream (Stop is on): a turn joins the conversation when its answer ends, and a second
// send meanwhile put the history out of order ([SECOND, reply, FIRST, reply]).
function sendable() {
  $("#play-send").disabled = Boolean(state.sending);
  $("#play-stop").disabled = !state.sending;
}
// Ctrl+Enter (Cmd+Enter on a Mac) sends; Enter is a new line
$("#prompt").addEventListener("keydown", ev => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
    ev.preventDefault();
    $("#play-form").requestSubmit();
  }
});
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
$("#play-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text || state.sending) return;
  const err = $("#play-error");
  const models = [...document.querySelectorAll("#play-models input:checked")].map(i => i.value);
  let params;
  try {
    if (!models.length) throw new Error("tick a model above to send the message to");
    params = sampling();
  } catch (e) {
    showError(err, e);
    return;  // the prompt stays, to send once the field is fixed
  }
  showError(err, null);
  $("#prompt").value = "";
  const sending = state.sending = new AbortController();
  sendable();
  await Promise.all(models.map(m => chat(m, text, params, sending.signal)));
  if (state.sending === sending) {  // answered (not stopped meanwhile)
    state.sending = null;
    sendable();
  }
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
async function chat(model, text, params, signal) {
  const convo = state.convo[model] = state.convo[model] || [];
  const turn = { role: "user", content: text };
  const col = column(model);
  col.append(el("div", { class: "msg user" }, text));
  const out = el("div", { class: "msg assistant", "data-done": "false" }), stats = el("div", { class: "stats" });
  col.append(out, stats);
  const t0 = performance.now();
  let first = null, usage = null, reply = "";
  try {
    const r = await request("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal,
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
    if (signal.aborted) {
      out.classList.add("stopped");
      stats.textContent = "stopped: left out of the conversation";
    } else {
      out.classList.add("error"); out.textContent = "error: " + e.message;
    }
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
  } catch (e) { showError(err, e); }
  loadModels().catch(e => showError(err, e));
});
async function unload(name) {
  const err = $("#adapter-error");
  err.hidden = true;
  try {
    await api(`/v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
  } catch (e) { showError(err, e); }
  loadModels().catch(e => showError(err, e));
}

// --- start ---
async function init() {
  state.info = await api("/ui/api/info");
  const form = $("#start-form");
  const opts = (sel, values) => form.querySelector(sel)
    .replaceChildren(...values.map(v => el("option", { value: v }, v)));
  opts("[name=model]", state.info.models);
  opts("[name=dataset]", state.info.datasets);
  opts("[name=method]", state.info.methods);
  await loadRuns();
  for (const name of state.selected) if (!state.streams[name]) follow(name);  // ticked before the page was reloaded
  draw();
  showExtras();
}
// The list reloads every 3 s while its tab shows, and so does the page while the banner shows (the server did not
// answer, or refused the key): once answered, the open tab's models too. A slow answer is awaited, not overlapped.
let reloading = false;
setInterval(async () => {
  const troubled = !$("#banner").hidden;
  if (reloading || ($("#tab-runs").hidden && !troubled)) return;
  reloading = true;
  try {
    await (state.info ? loadRuns() : init());
    const tab = $("nav button.active").dataset.tab;
    if (troubled && (tab === "play" || tab === "adapters")) showTab(tab);
  } catch { /* the next reload tries again */ } finally { reloading = false; }
}, 3000);
$("#refresh").addEventListener("click", () => loadRuns().then(draw).catch(runsError));
init().catch(runsError);
