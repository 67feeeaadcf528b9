// The admin page. The token lives in `token` below and nowhere else: not in
// localStorage, sessionStorage, a cookie or the URL. Everything the API
// answers is untrusted text: it reaches the page through textContent only.

import { Chart } from "./chart.mjs";
import { ParseError, parsePrometheus, rates, Series, sumBy, topKeys } from "./prom.mjs";

const METRICS_EVERY_MS = 1000;
const STATUS_EVERY_MS = 2000;
const TRACE_EVERY_MS = 1000;
const CHART_WINDOW_S = 120;
const MAX_LINES = 12;        // per chart; the rest are summed as "(other)"
const CONNECTIONS_SHOWN = 50;
const TRACE_ROWS_SHOWN = 1000;

let token = null;            // the admin token, in memory only
let generation = 0;          // bumped when the token goes: older polling loops stop
let traced = null;           // connection id whose trace is shown
let here = null;             // id of the node that answers this page

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ API

class Unauthorized extends Error {}

class ApiFailure extends Error {
  constructor(status, body) {
    super(typeof body?.error === "string" ? body.error : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  let answer = null;
  try {
    answer = await r.json();
  } catch {
    answer = null;
  }
  if (r.status === 401) throw new Unauthorized(answer?.error ?? "unauthorized");
  if (!r.ok) throw new ApiFailure(r.status, answer);
  return { status: r.status, body: answer };
}

// A 401 on any call: the token is wrong now (or was changed on the node), so
// it is forgotten and asked for again. True when that happened.
function refused(e) {
  if (!(e instanceof Unauthorized)) return false;
  signOut(`The gateway refused the token (401: ${e.message}). Enter it again.`);
  return true;
}

function failure(e) {
  return e instanceof ApiFailure ? `${e.status}: ${e.message}` : e.message;
}

// ------------------------------------------------------------------ helpers

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (className) td.className = className;
  return td;
}

function row(...cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}

function emptyRow(columns, text) {
  const td = cell(text, "empty");
  td.colSpan = columns;
  return row(td);
}

function duration(s) {
  if (typeof s !== "number" || !Number.isFinite(s)) return "-";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function loop(everyMs, step, showError) {
  // One call at a time (the next starts after this one ends), until the token goes.
  const mine = generation;
  const tick = async () => {
    if (mine !== generation) return;
    try {
      await step();
    } catch (e) {
      if (refused(e)) return;
      showError(e instanceof ApiFailure || e instanceof ParseError ? e.message
        : `admin listener unreachable (${e.message})`);
    }
    if (mine === generation) setTimeout(tick, everyMs);
  };
  tick();
}

// ------------------------------------------------------------------ sign in / out

function signOut(message) {
  token = null;
  generation += 1;
  traced = null;
  $("dash").hidden = true;
  for (const id of ["reload-button", "drain-button", "signout-button", "node-badge", "ready-badge"]) $(id).hidden = true;
  for (const id of ["nodes", "backends", "connections", "trace-frames-table"]) {
    document.querySelector(`#${id} tbody`).replaceChildren();
  }
  $("action-result").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message ?? "";
  setStatus("");
  $("token-input").value = "";
  $("token-input").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("token-input");
  token = input.value.trim() || null;
  input.value = "";
  $("login-error").textContent = "";
  try {
    const { body } = await api("GET", "/v1/nodes");
    generation += 1;
    $("login").hidden = true;
    $("dash").hidden = false;
    for (const id of ["reload-button", "drain-button", "signout-button"]) $(id).hidden = false;
    showNodes(body);
    startPolling();
  } catch (e) {
    token = null;
    $("login-error").textContent = e instanceof Unauthorized
      ? `Wrong token: the gateway answered 401 (${e.message}).`
      : `Could not reach the admin API: ${e.message}`;
    input.focus();
  }
}

// ------------------------------------------------------------------ panels

function showNodes(body) {
  const tbody = document.querySelector("#nodes tbody");
  const nodes = Array.isArray(body?.nodes) ? body.nodes : [];
  tbody.replaceChildren(...(nodes.length ? nodes.map((n) => {
    const id = cell(n.id);
    if (n.id === here) {
      const tag = document.createElement("span");
      tag.className = "here";
      tag.textContent = "this node";
      id.append(" ", tag);
    }
    const tr = row(id, cell(n.state, `state-${n.state}`), cell(n.connections), cell(n.sessions_left),
      cell(n.channels), cell(n.heartbeat_age_s === null ? n.store ?? "-" : duration(n.heartbeat_age_s)),
      cell(n.pid), cell(typeof n.started_at === "number" ? duration(Date.now() / 1000 - n.started_at) : "-"));
    tr.dataset.node = String(n.id);
    tr.dataset.state = String(n.state);
    return tr;
  }) : [emptyRow(8, "no node records")]));
}

function showBackends(body) {
  const rows = [];
  for (const b of Array.isArray(body?.backends) ? body.backends : []) {
    const eps = Array.isArray(b.endpoints) ? b.endpoints : [];
    if (!eps.length) {
      rows.push(row(cell(b.name), cell(b.type), cell("(in process)"), cell("-"), cell("-"), cell("-")));
      continue;
    }
    for (const ep of eps) {
      const tr = row(cell(b.name), cell(b.type), cell(ep.url), cell(ep.state, `state-${ep.state}`),
        cell(ep.sessions), cell(ep.failures));
      tr.dataset.endpoint = String(ep.url);
      tr.dataset.state = String(ep.state);
      rows.push(tr);
    }
  }
  document.querySelector("#backends tbody").replaceChildren(...(rows.length ? rows : [emptyRow(6, "no backends")]));
}

function showConnections(body) {
  const list = Array.isArray(body?.connections) ? body.connections : [];
  const total = typeof body?.total === "number" ? body.total : list.length;
  $("connections-total").textContent = list.length < total ? `${list.length} of ${total}` : String(total);
  const rows = list.map((c) => {
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "small";
    btn.textContent = "Trace";
    btn.addEventListener("click", () => {
      $("trace-conn").value = String(c.connection);
      $("trace-conn").focus();
    });
    const td = document.createElement("td");
    td.append(btn);
    const tr = row(cell(c.connection, "mono"), cell(c.route), cell(c.sub), cell(c.ip), cell(c.backend),
      cell(duration(c.age_s)), cell(c.messages_in), cell(c.messages_out), td);
    tr.dataset.connection = String(c.connection);
    return tr;
  });
  document.querySelector("#connections tbody").replaceChildren(...(rows.length ? rows : [emptyRow(9, "no sessions")]));
}

async function readiness() {
  // /readyz needs no token; its status is what the load balancer sees.
  const badge = $("ready-badge");
  try {
    const r = await fetch("/readyz", { cache: "no-store", credentials: "omit" });
    const body = await r.json().catch(() => ({}));
    const store = body.store && body.store !== "ok" ? `, store ${body.store}` : "";
    badge.textContent = `readyz ${r.status} ${body.status ?? ""}${store}`.trim();
    badge.className = `badge ${r.ok ? "ok" : "bad"}`;
  } catch {
    badge.textContent = "readyz unreachable";
    badge.className = "badge bad";
  }
  badge.hidden = false;
}

function panelError(table, columns, e) {
  const tr = emptyRow(columns, failure(e));
  tr.firstChild.classList.add("error");
  document.querySelector(`#${table} tbody`).replaceChildren(tr);
}

// Each panel on its own: in a Redis outage the cluster-wide /v1/nodes answers
// 503 while this node's backends and sessions still answer (and are wanted most).
async function pollStatus() {
  const [conns, nodes, backends] = await Promise.allSettled([
    api("GET", `/v1/connections?limit=${CONNECTIONS_SHOWN}`),
    api("GET", "/v1/nodes"),
    api("GET", "/v1/backends"),
    readiness(),
  ]);
  const results = [conns, nodes, backends];
  const denied = results.find((r) => r.status === "rejected" && r.reason instanceof Unauthorized);
  if (denied) throw denied.reason;
  if (conns.status === "fulfilled") {
    here = conns.value.body?.node ?? null;
    showConnections(conns.value.body);
  } else {
    panelError("connections", 9, conns.reason);
  }
  if (nodes.status === "fulfilled") {
    showNodes(nodes.value.body);
    // A draining node cannot be drained again (it exits when done).
    const mine = (nodes.value.body?.nodes ?? []).find((n) => n.id === here);
    $("drain-button").disabled = mine?.state === "draining";
  } else {
    panelError("nodes", 8, nodes.reason);
  }
  if (backends.status === "fulfilled") showBackends(backends.value.body);
  else panelError("backends", 6, backends.reason);
  const badge = $("node-badge");
  badge.textContent = `node ${here ?? "?"}`;
  badge.hidden = false;
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw failed.reason;   // the status line says it too
  setStatus(`updated ${new Date().toLocaleTimeString()}`);
}

// ------------------------------------------------------------------ charts

const sessions = new Series(CHART_WINDOW_S);
const messageRates = new Series(CHART_WINDOW_S);
let sessionsChart = null;
let ratesChart = null;
let lastCounters = null;     // {t, values} of the previous /metrics reading

async function pollMetrics() {
  const r = await fetch("/metrics", { cache: "no-store", credentials: "omit" });
  if (!r.ok) throw new Error(`/metrics answered ${r.status}`);
  const samples = parsePrometheus(await r.text());
  const t = performance.now() / 1000;
  const open = sumBy(samples, "gateway_sessions_open", ["route"]);
  sessions.push(t, topKeys(open, MAX_LINES));
  let total = 0;
  for (const v of open.values()) total += v;
  $("sessions-total").textContent = String(total);
  const counters = sumBy(samples, "gateway_messages_total", ["route", "direction"]);
  if (lastCounters !== null) {
    messageRates.push(t, topKeys(rates(lastCounters.values, counters, t - lastCounters.t), MAX_LINES));
  }
  lastCounters = { t, values: counters };
  $("metrics-error").textContent = "";
  sessionsChart.draw(sessions, t);
  ratesChart.draw(messageRates, t);
}

// ------------------------------------------------------------------ drain and reload

function confirmAction(title, text) {
  // Our own <dialog> (not window.confirm): it says what will happen, and tests can drive it.
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-ok").removeEventListener("click", ok);
      $("confirm-cancel").removeEventListener("click", cancel);
      dialog.removeEventListener("cancel", cancel);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const ok = () => done(true);
    const cancel = () => done(false);
    $("confirm-ok").addEventListener("click", ok);
    $("confirm-cancel").addEventListener("click", cancel);
    dialog.addEventListener("cancel", cancel);   // Escape
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

function showResult(ok, summary, problems = []) {
  const box = $("action-result");
  box.hidden = false;
  box.classList.toggle("error", !ok);
  box.classList.toggle("ok", ok);
  box.dataset.outcome = ok ? "ok" : "error";
  $("action-summary").textContent = summary;
  $("action-problems").replaceChildren(...problems.map((p) => {
    const li = document.createElement("li");
    li.textContent = String(p);
    return li;
  }));
}

async function runAction(method, path, describe) {
  try {
    const { status, body } = await api(method, path);
    showResult(true, describe(status, body));
  } catch (e) {
    if (refused(e)) return;
    const problems = Array.isArray(e.body?.problems) ? e.body.problems : [];
    showResult(false, failure(e), problems);
  }
}

async function reload() {
  if (!await confirmAction("Reload the config?",
    "The node re-reads its routes file. New sessions get the new routes at once; sessions whose route " +
    "is removed are drained with a resume token; a file with errors changes nothing.")) return;
  await runAction("POST", "/v1/reload", (status, b) => (status === 202
    ? "Every worker was asked to reload."
    : `Reloaded ${b?.config ?? "the config"}: ${b?.routes} routes, ${b?.backends} backends.`));
}

async function drain() {
  if (!await confirmAction("Drain this node?",
    "Readiness goes 503 at once, and after drain.announce_s every session is closed with 1012 " +
    "(with a resume token where a shared store keeps it); then the process exits. This cannot be undone.")) return;
  await runAction("POST", "/v1/drain", (status, b) => `Draining node ${b?.node ?? ""} (HTTP ${status}).`);
}

// ------------------------------------------------------------------ trace

const OPCODES = { 0: "continuation", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong" };

function traceStatus(text, isError = false) {
  const el = $("trace-status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function showTrace(t) {
  const frames = Array.isArray(t?.frames) ? t.frames : [];
  const shown = frames.slice(-TRACE_ROWS_SHOWN);
  $("trace-frames-table").querySelector("tbody").replaceChildren(...shown.map((f) => {
    const op = OPCODES[f.opcode] ?? f.opcode;
    const tr = row(cell(typeof f.t_ms === "number" ? f.t_ms.toFixed(1) : f.t_ms), cell(f.dir === "up" ? "up (client to backend)" : f.dir === "down"
      ? "down (backend to client)" : f.dir), cell(op), cell(f.fin), cell(f.size), cell(f.head, "mono head"));
    tr.dataset.dir = String(f.dir);
    return tr;
  }));
  const state = t?.active ? "tracing" : `ended${t?.ended ? ` (${t.ended})` : ""}`;
  traceStatus(`${t?.connection ?? traced}: ${state}, ${frames.length} frames` +
    (frames.length > shown.length ? ` (last ${shown.length} shown)` : "") +
    ` (max ${t?.max_frames ?? "?"} frames, ${t?.max_s ?? "?"} s)`);
  $("trace").dataset.active = t?.active ? "true" : "false";
}

function traceLoop() {
  const mine = generation;
  const id = traced;
  const tick = async () => {
    if (mine !== generation || traced !== id) return;
    let active = false;
    try {
      const { body } = await api("GET", `/v1/connections/${encodeURIComponent(id)}/trace`);
      showTrace(body);
      active = Boolean(body?.active);
    } catch (e) {
      if (refused(e)) return;
      traceStatus(`${id}: ${e.message}`, true);
    }
    if (active && mine === generation && traced === id) setTimeout(tick, TRACE_EVERY_MS);
  };
  tick();
}

async function startTrace(event) {
  event.preventDefault();
  const id = $("trace-conn").value.trim();
  const maxFrames = Number($("trace-frames").value);
  const maxS = Number($("trace-seconds").value);
  if (!id) {
    traceStatus("Choose a session: its connection id, or Trace in the sessions table.", true);
    return;
  }
  if (!(Number.isInteger(maxFrames) && maxFrames > 0 && maxS > 0)) {
    traceStatus("max frames must be a whole number above 0, max seconds a number above 0.", true);
    return;
  }
  traced = id;
  $("trace-frames-table").querySelector("tbody").replaceChildren();
  try {
    await api("POST", `/v1/connections/${encodeURIComponent(id)}/trace`, { max_frames: maxFrames, max_s: maxS });
    traceStatus(`${id}: tracing`);
    traceLoop();
  } catch (e) {
    if (refused(e)) return;
    traceStatus(`${id}: ${failure(e)}`, true);
  }
}

async function stopTrace() {
  const id = traced ?? $("trace-conn").value.trim();
  if (!id) return;
  try {
    await api("DELETE", `/v1/connections/${encodeURIComponent(id)}/trace`);
    const { body } = await api("GET", `/v1/connections/${encodeURIComponent(id)}/trace`);
    showTrace(body);
  } catch (e) {
    if (refused(e)) return;
    traceStatus(`${id}: ${failure(e)}`, true);
  }
}

// ------------------------------------------------------------------ start

function startPolling() {
  loop(STATUS_EVERY_MS, pollStatus, (message) => setStatus(message, true));
  loop(METRICS_EVERY_MS, pollMetrics, (message) => { $("metrics-error").textContent = `/metrics: ${message}`; });
}

function main() {
  sessionsChart = new Chart($("sessions-chart"), $("sessions-legend"), { windowS: CHART_WINDOW_S, floor: 4 });
  ratesChart = new Chart($("rates-chart"), $("rates-legend"), { windowS: CHART_WINDOW_S, unit: "/s" });
  $("login-form").addEventListener("submit", signIn);
  $("signout-button").addEventListener("click", () => signOut("Token forgotten."));
  $("reload-button").addEventListener("click", reload);
  $("drain-button").addEventListener("click", drain);
  $("trace-form").addEventListener("submit", startTrace);
  $("trace-stop").addEventListener("click", stopTrace);
  $("token-input").focus();
}

main();
