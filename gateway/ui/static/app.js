// Corral status page. Live from the gateway's status stream, read with fetch() so the key
// travels as a bearer header (an EventSource cannot send one); the key lives in this tab's
// sessionStorage only. No polling: the gateway pushes model updates as they happen and a
// fresh cluster snapshot whenever it changes. The one timer here redraws "12 s ago".
"use strict";

const KEY_STORE = "corral.apiKey";
const STREAM = "/v1/models/status/stream?cluster=true";
const QUIET_MS = 25000; // the gateway sends a heartbeat every 15 s: silence past this is a dead link
const PRIORITIES = ["high", "normal", "low"];
const STATE_ORDER = ["ready", "loading", "unloading", "failed"];

const view = { status: null, cluster: null, viewer: null, offsetMs: 0, updatedAt: 0 };
let link = null; // the current stream's AbortController
let retryMs = 500;
let retryTimer = null;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- the key

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setupKeyForm() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("key").value.trim();
    if (value) sessionStorage.setItem(KEY_STORE, value);
    $("key").value = "";
    reconnect(0);
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    clearData();
    reconnect(0);
  });
}

// ---------------------------------------------------------------- connection

function setConn(kind, text) {
  const pill = $("conn");
  pill.className = `pill pill-${kind}`;
  pill.textContent = text;
}

function showBanner(text, info = false) {
  const b = $("banner");
  b.textContent = text;
  b.classList.toggle("info", info);
  b.hidden = !text;
}

function notice(text, bad = false) {
  const n = $("notice");
  n.textContent = text;
  n.classList.toggle("bad", bad);
}

function setStale(stale) {
  $("main").classList.toggle("stale", stale);
}

function reconnect(delayMs) {
  if (link) link.abort();
  link = null;
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, delayMs);
}

async function connect() {
  const controller = new AbortController();
  link = controller;
  if (!view.cluster) setConn("wait", "Connecting…");
  let resp;
  try {
    resp = await fetch(STREAM, { headers: authHeaders(), cache: "no-store", signal: controller.signal });
  } catch (err) {
    if (controller.signal.aborted) return;
    return lost("Gateway unreachable", "Cannot reach the gateway. Retrying…");
  }
  if (resp.status === 401 || resp.status === 403) return refused(resp);
  if (!resp.ok) return failedOpen(resp);
  retryMs = 500;
  try {
    await readEvents(resp.body, controller);
  } catch (err) {
    if (controller.signal.aborted && link !== controller) return; // replaced on purpose
  }
  if (link !== controller) return;
  await diagnose();
}

async function readEvents(body, controller) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let watchdog = setTimeout(() => controller.abort(), QUIET_MS);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      clearTimeout(watchdog);
      watchdog = setTimeout(() => controller.abort(), QUIET_MS);
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        dispatch(block);
      }
    }
  } finally {
    clearTimeout(watchdog);
  }
}

function dispatch(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (event === "full_status") onFullStatus(payload);
  else if (event === "model_update") onModelUpdate(payload);
  else if (event === "cluster") onCluster(payload);
  else if (event === "error") onStreamError(payload);
  else if (event === "heartbeat") onHeartbeat();
}

// The stream ended or never opened: tell the gateway being down from Redis being down.
async function diagnose() {
  try {
    const health = await fetch("/health", { cache: "no-store" });
    const body = await health.json().catch(() => ({}));
    if (body.redis === false) {
      return lost("Redis unreachable", "The gateway is up but cannot reach Redis. Retrying…");
    }
    return lost("Reconnecting…", "The status stream ended. Reconnecting…", true);
  } catch (err) {
    return lost("Gateway unreachable", "Cannot reach the gateway. Retrying…");
  }
}

function lost(pill, text, info = false) {
  setConn(info ? "wait" : "down", pill);
  showBanner(text, info);
  setStale(true);
  retryMs = Math.min(retryMs * 2, 5000);
  reconnect(retryMs);
}

async function refused(resp) {
  const err = await errorOf(resp);
  clearData();
  setConn("down", apiKey() ? "Key refused" : "Key needed");
  const why = apiKey()
    ? `This key cannot open the status: ${err.message}`
    : "This gateway wants an API key: the admin key to manage it, or a user key to watch it.";
  showBanner(why, true);
  $("key").focus();
}

async function failedOpen(resp) {
  const err = await errorOf(resp);
  if (err.code === "auth_unavailable" || err.code === "redis_unavailable") {
    return lost("Redis unreachable", `The gateway cannot reach Redis: ${err.message} Retrying…`);
  }
  return lost("Gateway error", `The gateway answered ${resp.status}: ${err.message} Retrying…`);
}

async function errorOf(resp) {
  try {
    const body = await resp.json();
    return body.error || { message: JSON.stringify(body) };
  } catch (e) {
    return { message: `HTTP ${resp.status}` };
  }
}

// ---------------------------------------------------------------- events

function live() {
  setConn("live", "Live");
  showBanner("");
  setStale(false);
}

function onFullStatus(status) {
  view.status = status;
  live();
  renderModels();
}

function onHeartbeat() {
  if (view.cluster) live();
}

function onCluster(snapshot) {
  view.cluster = snapshot;
  view.status = { models: snapshot.models, summary: snapshot.summary };
  view.viewer = snapshot.viewer;
  view.offsetMs = snapshot.now * 1000 - Date.now();
  view.updatedAt = snapshot.now;
  live();
  renderAll();
}

function onStreamError(payload) {
  const err = payload.error || {};
  setConn("down", "Redis unreachable");
  showBanner(`${err.message || "The gateway cannot read Redis."} Showing the last data seen.`);
  setStale(true);
}

// One worker's model changed state: patch that model at once (the next snapshot follows).
function onModelUpdate(ev) {
  const model = view.status && view.status.models[ev.alias];
  if (!model) return;
  const others = (model.workers || []).filter((w) => w.worker !== ev.worker);
  const mine = (model.workers || []).find((w) => w.worker === ev.worker) || { worker: ev.worker };
  if (ev.status !== "off") others.push({ ...mine, status: ev.status, error: ev.error });
  model.workers = others;
  model.failed = { ...(model.failed || {}) };
  if (ev.status === "failed") model.failed[ev.worker] = ev.error || "failed";
  else delete model.failed[ev.worker];
  const states = new Set(others.map((w) => w.status));
  model.status = STATE_ORDER.find((s) => states.has(s)) || "off";
  model.replicas = others.filter((w) => w.status === "ready").length;
  renderModels();
}

function clearData() {
  view.status = null;
  view.cluster = null;
  view.viewer = null;
  renderAll();
}

// ---------------------------------------------------------------- formatting

function nowS() {
  return (Date.now() + view.offsetMs) / 1000;
}

function ago(ts) {
  if (!ts) return "—";
  const s = nowS() - ts;
  return s < 1 ? "just now" : `${duration(s)} ago`;
}

function duration(s) {
  if (s == null || Number.isNaN(s)) return "—";
  s = Math.max(0, s);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function mib(v) {
  if (v == null) return "—";
  return v >= 10240 ? `${(v / 1024).toFixed(1)} GiB` : `${Math.round(v)} MiB`;
}

function rate(v) {
  if (v == null) return "—";
  return v >= 1000 ? `${(v / 1000).toFixed(1)}k` : `${Math.round(v)}`;
}

function badge(state) {
  const span = document.createElement("span");
  span.className = `badge s-${state}`;
  span.textContent = state;
  return span;
}

// ---------------------------------------------------------------- rendering

// Keep rows keyed and update them in place: a button that has the keyboard focus stays.
function syncRows(table, items, keyOf, fill) {
  const tbody = $(table).querySelector("tbody");
  const labels = [...$(table).querySelectorAll("thead th")].map((th) => th.textContent);
  const existing = new Map([...tbody.rows].map((tr) => [tr.dataset.key, tr]));
  let before = tbody.firstChild;
  for (const item of items) {
    const key = keyOf(item);
    let tr = existing.get(key);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.key = key;
      for (const label of labels) {
        const td = document.createElement("td");
        td.dataset.label = label;
        if (label === "Actions") td.className = "admin";
        tr.appendChild(td);
      }
    }
    existing.delete(key);
    fill(tr, item);
    if (tr !== before) tbody.insertBefore(tr, before);
    before = tr.nextSibling;
  }
  for (const tr of existing.values()) tr.remove();
  document.querySelector(`[data-empty="${table}"]`).hidden = items.length > 0 || !view.status;
}

// A cell's content sits in one <span class="v">, so a phone's card layout can put the
// column's label beside it whatever the content is made of.
function cell(tr, i, content, cls = "") {
  const td = tr.cells[i];
  let v = td.firstElementChild;
  if (!v || !v.classList.contains("v")) {
    v = document.createElement("span");
    v.className = "v";
    td.replaceChildren(v);
  }
  const text = typeof content === "string" ? content : null;
  if (text !== null) {
    if (v.textContent !== text || v.childElementCount) v.textContent = text;
  } else {
    v.replaceChildren(...[].concat(content));
  }
  td.className = cls;
  td.classList.toggle("empty-cell", text === "—" || text === "");
  return td;
}

function withSub(main, sub) {
  const frag = [document.createTextNode(main)];
  if (sub) {
    const s = document.createElement("span");
    s.className = "sub";
    s.textContent = sub;
    frag.push(s);
  }
  return frag;
}

function actionButtons(tr, specs) {
  const td = tr.cells[tr.cells.length - 1];
  let box = td.querySelector(".actions");
  if (!box) {
    box = document.createElement("div");
    box.className = "actions";
    td.replaceChildren(box);
  }
  const want = specs.map((s) => s.label);
  for (const btn of [...box.children]) if (!want.includes(btn.dataset.action)) btn.remove();
  for (const spec of specs) {
    let btn = box.querySelector(`[data-action="${spec.label}"]`);
    if (!btn) {
      btn = document.createElement("button");
      btn.type = "button";
      btn.dataset.action = spec.label;
      btn.textContent = spec.label;
      if (spec.danger) btn.className = "danger";
      box.appendChild(btn);
    }
    btn.setAttribute("aria-label", `${spec.label} ${spec.target}`);
    btn.onclick = spec.run;
  }
  td.classList.toggle("empty-cell", specs.length === 0);
}

function renderAll() {
  const role = view.viewer ? view.viewer.role : null;
  document.body.classList.toggle("readonly", !(role === "admin" || role === "open"));
  $("viewer").textContent = role
    ? `Viewing as ${role === "open" ? "anyone (no keys configured)" : role}` +
      (view.viewer.key ? ` · key ${view.viewer.key}` : "")
    : "";
  renderModels();
  renderWorkers();
  renderQueues();
  renderRequests();
  renderBatches();
  tick();
}

function renderModels() {
  const models = view.status ? Object.entries(view.status.models) : [];
  const s = view.status && view.status.summary;
  $("summary").textContent = s ? `${s.ready} ready of ${s.total}` : "";
  syncRows("models", models, ([alias]) => alias, (tr, [alias, m]) => {
    tr.dataset.model = alias;
    const holders = (m.workers || []).filter((w) => w.status === "ready");
    const budget = holders.reduce((t, w) => t + (w.budget_mb || 0), 0);
    const used = m.vram_used_mb;
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = budget || 1;
    meter.value = used || 0;
    meter.setAttribute("aria-label", `${alias} memory used`);
    cell(tr, 0, alias, "mono");
    cell(tr, 1, badge(m.status)).dataset.col = "status";
    cell(tr, 2, `${m.replicas} / ${m.replicas_wanted ?? 1}`, "num");
    cell(tr, 3, used || budget ? [meter, ...withSub(` ${mib(used)} / ${mib(budget)}`)] : "—", "num");
    const sp = m.speed || {};
    const timed = sp.prompt_tokens_per_s != null || sp.gen_tokens_per_s != null;
    const speed = timed ? `${rate(sp.prompt_tokens_per_s)} · ${rate(sp.gen_tokens_per_s)}` : "—";
    const served = `${sp.requests} req / ${Math.round(sp.window_s / 60)} min`;
    cell(tr, 4, sp.requests ? withSub(speed, served) : "—", "num");
    const q = m.queued || {};
    cell(tr, 5, `${PRIORITIES.map((p) => q[p] || 0).join("/")} · ${q.batch || 0}`, "num");
    const last = m.last_used;
    cell(tr, 6, last ? ago(last) : "—", "num ago").dataset.ts = last || "";
    const why = Object.entries(m.failed || {}).map(([w, e]) => `${w}: ${String(e).split("\n")[0]}`);
    cell(tr, 7, why.join("; ") || "—", "why");
    const acts = [];
    if (m.status === "off" || m.status === "failed") {
      acts.push({ label: "Load", target: alias, run: () => modelAction("load", alias) });
    }
    if (m.status === "ready" || m.status === "loading") {
      acts.push({ label: "Eject", target: alias, danger: true, run: () => modelAction("eject", alias) });
    }
    if (m.status === "failed" || Object.keys(m.failed || {}).length) {
      acts.push({ label: "Reset", target: alias, run: () => modelAction("reset", alias) });
    }
    actionButtons(tr, acts);
  });
}

function renderWorkers() {
  const workers = view.cluster ? view.cluster.workers : [];
  syncRows("workers", workers, (w) => w.worker, (tr, w) => {
    cell(tr, 0, w.worker, "mono");
    cell(tr, 1, w.host || "—");
    cell(tr, 2, w.gpu && w.gpu !== "cpu" ? `GPU ${w.gpu}` : "CPU");
    cell(tr, 3, `${mib(w.used_mb)} / ${mib(w.budget_mb)}`, "num");
    cell(tr, 4, w.model ? withSub(w.model, w.next_model ? `→ ${w.next_model}` : "") : "—", "mono");
    cell(tr, 5, badge(w.state));
    cell(tr, 6, `${w.slots_busy} / ${w.slots}`, "num");
  });
}

function renderQueues() {
  const queues = view.cluster ? Object.entries(view.cluster.queues) : [];
  syncRows("queues", queues, ([m]) => m, (tr, [model, q]) => {
    cell(tr, 0, model, "mono");
    PRIORITIES.forEach((p, i) => {
      const one = q.priorities[p] || {};
      const wait = one.oldest_wait_s != null ? duration(one.oldest_wait_s) : "";
      cell(tr, i + 1, one.depth ? withSub(String(one.depth), `oldest ${wait}`) : "0", "num");
    });
    cell(tr, 4, String(q.running), "num");
  });
}

function renderRequests() {
  const reqs = view.cluster ? view.cluster.requests : [];
  syncRows("requests", reqs, (r) => r.request_id, (tr, r) => {
    tr.dataset.request = r.request_id;
    tr.dataset.state = r.state;
    cell(tr, 0, withSub(r.request_id.replace(/^req_/, "").slice(0, 10), ago(r.enqueued_at)), "mono");
    cell(tr, 1, r.model, "mono");
    cell(tr, 2, r.priority);
    cell(tr, 3, badge(r.state)).dataset.col = "state";
    let where = "—";
    if (r.state === "queued" && r.position) {
      const eta = r.estimated_start_at;
      const left = eta ? eta - nowS() : null;
      const when = left == null ? "ETA unknown" : left < 0.5 ? "due now" : `starts in ~${duration(left)}`;
      where = `#${r.position} · ${when}`;
    }
    const pos = cell(tr, 4, where, "num");
    pos.dataset.col = "eta";
    const began = r.started_at || (r.state === "queued" ? nowS() : r.finished_at);
    cell(tr, 5, began ? duration(began - r.enqueued_at) : "—", "num");
    cell(tr, 6, r.ttft_ms != null ? duration(r.ttft_ms / 1000) : "—", "num");
    const toks = r.completion_tokens != null ? `${r.prompt_tokens} → ${r.completion_tokens}` : "—";
    cell(tr, 7, toks, "num");
    const acts = [];
    if (r.state === "queued" || r.state === "running") {
      acts.push({ label: "Cancel", target: r.request_id, danger: true, run: () => cancelRequest(r.request_id) });
    }
    actionButtons(tr, acts);
  });
}

function renderBatches() {
  const batches = view.cluster ? view.cluster.batches : [];
  syncRows("batches", batches, (b) => b.id, (tr, b) => {
    const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
    cell(tr, 0, b.id.replace(/^batch_/, "").slice(0, 12), "mono");
    cell(tr, 1, badge(b.status));
    cell(tr, 2, b.endpoint, "mono");
    const bar = document.createElement("progress");
    bar.max = c.total || 1;
    bar.value = c.completed + c.failed;
    bar.setAttribute("aria-label", `batch ${b.id} progress`);
    const failed = c.failed ? `, ${c.failed} failed` : "";
    cell(tr, 3, [bar, ...withSub(` ${c.completed + c.failed} / ${c.total}`, failed)], "num");
    cell(tr, 4, ago(b.created_at), "num");
  });
}

function tick() {
  for (const td of document.querySelectorAll("td.ago")) {
    if (td.dataset.ts) td.firstElementChild.textContent = ago(Number(td.dataset.ts));
  }
  $("updated").textContent = view.updatedAt ? `Updated ${ago(view.updatedAt)}.` : "";
}

// ---------------------------------------------------------------- actions

async function post(path, body) {
  const resp = await fetch(path, {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error((data.error && data.error.message) || `HTTP ${resp.status}`);
  return data;
}

async function modelAction(kind, alias) {
  if (kind === "eject" && !confirm(`Eject ${alias}? Requests for it wait until it loads again.`)) return;
  notice(`${kind} ${alias}…`);
  try {
    const path = kind === "reset" ? `/v1/models/${encodeURIComponent(alias)}/reset` : `/v1/models/${kind}`;
    const data = await post(path, kind === "reset" ? undefined : { model: alias });
    notice(data.message || `${kind} ${alias}: ${data.status}`);
  } catch (err) {
    notice(`Could not ${kind} ${alias}: ${err.message}`, true);
  }
}

async function cancelRequest(id) {
  if (!confirm(`Cancel request ${id}?`)) return;
  try {
    const rec = await post(`/v1/requests/${encodeURIComponent(id)}/cancel`);
    notice(`Request ${id}: ${rec.state}`);
  } catch (err) {
    notice(`Could not cancel ${id}: ${err.message}`, true);
  }
}

// ---------------------------------------------------------------- start

setupKeyForm();
setInterval(tick, 1000);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && !link) reconnect(0);
});
connect();
