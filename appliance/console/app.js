// The rainio web console: a single page over /api/v1. It polls every two seconds, draws the
// charts from successive counter snapshots, and sends the CSRF token with every change.
// No framework and no build step: the appliance serves this file as it is.
"use strict";

const POLL_MS = 2000;
const HISTORY = 90; // points per chart (3 minutes at 2 s)
const COLORS = ["#2f6fed", "#38c6a8", "#d98a00", "#a855f7", "#d64545", "#0ea5e9", "#65a30d", "#db2777"];

const state = {
  csrf: null,
  timer: null,
  page: "dashboard",
  lastEventId: 0,
  events: [],
  prev: null,          // previous controllers snapshot {t, byId: {id: io}, vols: {name: io}}
  series: { iops: {}, mbps: {}, lat: {}, vol: {} },
};

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
    else if (k === "style") for (const [p, val] of Object.entries(v)) e.style.setProperty(p, val);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
};

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 || Number.isInteger(n) ? n.toFixed(0) : n.toFixed(1)) + " " + u[i];
}
function duration(s) {
  if (s == null) return "unknown";
  s = Math.round(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}
const time = (ms) => new Date(ms).toLocaleTimeString();
const badge = (s) => el("span", { class: "badge " + s }, s);

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  if (method !== "GET" && state.csrf) opts.headers["X-CSRF-Token"] = state.csrf;
  const r = await fetch(path, opts);
  let data = null;
  const text = await r.text();
  try { data = text ? JSON.parse(text) : null; } catch { data = { error: text }; }
  if (r.status === 401 && path !== "/api/v1/login") {
    showLogin();
    throw new Error("not logged in");
  }
  return { status: r.status, ok: r.ok, data };
}

// ---------------------------------------------------------------- login

function showLogin(message) {
  clearInterval(state.timer);
  state.timer = null;
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#login-password").focus();
}

async function login(ev) {
  ev.preventDefault();
  const btn = $("#login-form button");
  btn.disabled = true;
  $("#login-error").textContent = "";
  try {
    const r = await api("POST", "/api/v1/login", {
      user: $("#login-user").value,
      password: $("#login-password").value,
    });
    if (!r.ok) {
      $("#login-error").textContent = (r.data && r.data.error) || ("login failed (" + r.status + ")");
      return;
    }
    state.csrf = r.data.csrf_token;
    $("#login-password").value = "";
    start();
  } catch (e) {
    $("#login-error").textContent = "cannot reach the appliance: " + e.message;
  } finally {
    btn.disabled = false;
  }
}

async function logout() {
  try { await api("POST", "/api/v1/logout"); } catch { /* shown as login anyway */ }
  state.csrf = null;
  showLogin("Signed out.");
}

// ---------------------------------------------------------------- navigation

function route() {
  const page = (location.hash.replace(/^#\//, "") || "dashboard").split("/")[0];
  state.page = document.querySelector(`[data-view="${page}"]`) ? page : "dashboard";
  document.querySelectorAll("[data-view]").forEach((s) => { s.hidden = s.dataset.view !== state.page; });
  document.querySelectorAll(".sidebar a").forEach((a) => a.classList.toggle("active", a.dataset.page === state.page));
  refresh();
}

function start() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  route();
  clearInterval(state.timer);
  state.timer = setInterval(refresh, POLL_MS);
}

// ---------------------------------------------------------------- data

let refreshing = false;
async function refresh() {
  if (refreshing || $("#app").hidden) return;
  refreshing = true;
  try {
    const [cl, ctrls, vols, jobs, evs, sess] = await Promise.all([
      api("GET", "/api/v1/cluster"),
      api("GET", "/api/v1/controllers"),
      api("GET", "/api/v1/volumes"),
      api("GET", "/api/v1/jobs"),
      api("GET", "/api/v1/events?after=" + state.lastEventId + "&limit=200"),
      state.page === "sessions" ? api("GET", "/api/v1/sessions") : Promise.resolve({ ok: true, data: null }),
    ]);
    if (![cl, ctrls, vols, jobs, evs].every((r) => r.ok)) throw new Error("API error");
    $("#stale").hidden = true;
    for (const e of evs.data) {
      state.events.push(e);
      state.lastEventId = Math.max(state.lastEventId, e.id);
    }
    state.events = state.events.slice(-500);
    sample(ctrls.data, vols.data);
    renderSummary(cl.data);
    renderControllers(ctrls.data);
    renderVolumes(vols.data);
    renderJobs(jobs.data);
    renderEvents();
    if (sess.data) renderSessions(sess.data);
    drawCharts();
  } catch (e) {
    if (e.message !== "not logged in") $("#stale").hidden = false;
  } finally {
    refreshing = false;
  }
}

function push(series, key, v) {
  (series[key] = series[key] || []).push(v);
  if (series[key].length > HISTORY) series[key].shift();
}

// Rates from two successive counter snapshots.
function sample(ctrls, vols) {
  const now = performance.now();
  const cur = { t: now, byId: {}, vols: {} };
  for (const c of ctrls) if (c.reachable) cur.byId[c.id] = c.io;
  for (const v of vols) cur.vols[v.name] = v.io;
  const p = state.prev;
  if (p) {
    const dt = (now - p.t) / 1000;
    for (const c of ctrls) {
      const key = "controller " + c.id;
      const a = p.byId[c.id], b = cur.byId[c.id];
      if (!a || !b || dt <= 0) {
        push(state.series.iops, key, null);
        push(state.series.mbps, key, null);
        push(state.series.lat, key, null);
        continue;
      }
      const ops = (b.read_ops + b.write_ops) - (a.read_ops + a.write_ops);
      const all = (b.read_ops + b.write_ops + b.other_ops) - (a.read_ops + a.write_ops + a.other_ops);
      const by = (b.read_bytes + b.write_bytes) - (a.read_bytes + a.write_bytes);
      const lat = b.latency_sum_us - a.latency_sum_us;
      push(state.series.iops, key, Math.max(0, ops / dt));
      push(state.series.mbps, key, Math.max(0, by / dt / 1e6));
      push(state.series.lat, key, all > 0 ? lat / all / 1000 : 0);
    }
    for (const v of vols) {
      const a = p.vols[v.name], b = cur.vols[v.name];
      const ops = a && b ? (b.read_ops + b.write_ops) - (a.read_ops + a.write_ops) : 0;
      push(state.series.vol, v.name, dt > 0 ? Math.max(0, ops / dt) : 0);
    }
  }
  state.prev = cur;
}

// ---------------------------------------------------------------- rendering

function table(id, head, rows, empty) {
  const t = $(id);
  t.replaceChildren();
  t.append(el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))));
  const tb = el("tbody");
  if (rows.length === 0) tb.append(el("tr", {}, el("td", { class: "empty", colspan: String(head.length) }, empty)));
  for (const r of rows) tb.append(r);
  t.append(tb);
}

function renderSummary(c) {
  const pill = $("#health-pill");
  pill.textContent = c.health;
  pill.className = "pill " + c.health;
  $("#topbar-info").textContent = `${c.iqn} · answered by controller ${c.answered_by} · epoch ${c.epoch}`;
  const h = $("#card-health");
  h.textContent = c.health;
  h.className = "card-value " + c.health;
  const down = c.controllers_total - c.controllers_up;
  $("#card-health-sub").textContent = c.problems.length ? c.problems[0]
    : c.health === "unavailable" ? "this controller refuses I/O (no lease); use another portal"
    : c.health !== "healthy" ? [down ? down + " controller(s) not up" : "", c.volumes_degraded ? c.volumes_degraded + " volume(s) with reduced redundancy" : ""].filter(Boolean).join(", ")
    : c.jobs ? c.jobs + " job(s) running" : "all data fully redundant";
  $("#card-controllers").textContent = `${c.controllers_up} / ${c.controllers_total}`;
  $("#card-controllers-sub").textContent = c.leader ? "metadata leader: controller " + c.leader : "single controller";
  $("#card-volumes").textContent = String(c.volumes_total);
  $("#card-volumes-sub").textContent = c.volumes_degraded ? c.volumes_degraded + " not healthy" : "all healthy";
  $("#card-capacity").textContent = bytes(c.volume_bytes);
  $("#card-capacity-sub").textContent = "provisioned · " + bytes(c.capacity_bytes) + " of backing storage";
}

// One line per backing device: its errors, slow requests and checksum failures.
function deviceCells(ds) {
  if (!ds.length) return ["—"];
  return ds.map((d) => {
    const errors = d.read_errors + d.write_errors + d.flush_errors;
    const bad = errors + d.checksum_failures > 0;
    const text = `${d.role}: ${errors} errors, ${d.slow_ios} slow, ${d.checksum_failures} checksum`;
    return el("div", { class: bad ? "device bad" : "device", title: d.path + " · " + d.engine + " · " + d.ios.toLocaleString() + " requests" }, text);
  });
}

function renderControllers(cs) {
  const short = cs.map((c) => el("tr", { dataset: { testid: "controller-row", id: String(c.id), state: c.state } },
    el("td", {}, "controller " + c.id + (c.leader ? " ★" : "")),
    el("td", {}, badge(c.state)),
    el("td", {}, c.portals.join(", ") || "—"),
    el("td", { class: "num" }, String(c.sessions))));
  table("#dash-controllers", ["Controller", "State", "Portal", "Sessions"], short, "no controllers");
  const long = cs.map((c) => el("tr", { dataset: { state: c.state } },
    el("td", {}, "controller " + c.id + (c.leader ? " (metadata leader)" : "")),
    el("td", {}, badge(c.state), c.fenced ? el("div", { class: "muted" }, "refusing I/O (no lease)") : ""),
    el("td", {}, c.reachable ? (c.rtt_ms ? c.rtt_ms.toFixed(1) + " ms" : "this one") : el("span", { class: "muted" }, c.error || "unreachable")),
    el("td", {}, c.portals.join(", ") || "—", el("div", { class: "muted" }, c.api ? "console " + c.api : "")),
    el("td", { class: "num" }, String(c.sessions)),
    el("td", { class: "num" }, bytes(c.capacity_bytes)),
    el("td", {}, ...deviceCells(c.devices || [])),
    el("td", { class: "num" }, c.reachable ? duration(c.uptime_secs) : "—"),
    el("td", { class: "num" }, c.log.term ? `term ${c.log.term} · ${c.log.applied}/${c.log.last_index}` : "—")));
  table("#controllers-table", ["Controller", "State", "Round trip", "Portals", "Sessions", "Storage", "Devices", "Uptime", "Metadata log"], long, "no controllers");
}

// Deleting asks for the volume's name, as the API does (?confirm=<name>).
function deleteButton(name) {
  const b = el("button", { class: "danger", dataset: { testid: "delete-volume", name } }, "Delete");
  b.addEventListener("click", async () => {
    const typed = window.prompt(`Deleting ${name} destroys its data on every controller. Type its name to confirm:`);
    if (typed === null) return;
    if (typed !== name) {
      $("#nv-error").textContent = `Not deleted: "${typed}" is not "${name}".`;
      return;
    }
    b.disabled = true;
    try {
      const r = await api("DELETE", `/api/v1/volumes/${encodeURIComponent(name)}?confirm=${encodeURIComponent(typed)}`);
      if (r.ok) $("#nv-ok").textContent = `Volume ${name} deleted.`;
      else $("#nv-error").textContent = (r.data && r.data.error) || "the appliance refused (" + r.status + ")";
      refresh();
    } catch (e) {
      if (e.message !== "not logged in") $("#nv-error").textContent = "cannot reach the appliance: " + e.message;
    } finally {
      b.disabled = false;
    }
  });
  return b;
}

function renderVolumes(vs) {
  const row = (v, wide) => el("tr", { dataset: { testid: "volume-row", name: v.name, health: v.health } },
    el("td", {}, v.name),
    el("td", {}, badge(v.health), v.rows_behind ? el("div", { class: "muted" }, v.rows_behind + " rows behind") : ""),
    el("td", { class: "num" }, bytes(v.size_bytes)),
    el("td", { class: "num" }, String(v.lun)),
    ...(wide ? [
      el("td", { class: "num" }, v.block_size + " B"),
      el("td", { class: "num" }, v.m ? `k=${v.k} m=${v.m}` : "single copy"),
      el("td", { class: "num" }, (v.io.read_ops + v.io.write_ops).toLocaleString()),
      el("td", {}, v.runtime ? deleteButton(v.name) : el("span", { class: "muted", title: "defined in the config file" }, "config")),
    ] : []));
  table("#dash-volumes", ["Volume", "Health", "Size", "LUN"], vs.map((v) => row(v, false)), "no volumes");
  table("#volumes-table", ["Volume", "Health", "Size", "LUN", "Block", "Protection", "I/Os", ""], vs.map((v) => row(v, true)), "no volumes yet: create one");
}

function jobView(j) {
  const pct = j.total ? Math.round((100 * j.done) / j.total) : 100;
  return el("div", { class: "job", dataset: { testid: "job", id: j.id, done: String(j.done), total: String(j.total) } },
    el("div", { class: "job-head" }, el("strong", {}, `${j.kind} · volume ${j.volume}`), el("span", {}, pct + "%")),
    el("div", { class: "bar" }, el("div", { style: { width: pct + "%" }, dataset: { testid: "job-bar" } })),
    el("div", { class: "job-foot" }, `${j.done.toLocaleString()} of ${j.total.toLocaleString()} chunks · ${j.rate.toFixed(1)} chunks/s · ETA ${duration(j.eta_secs)}`));
}

function renderJobs(js) {
  for (const id of ["#dash-jobs", "#jobs-list"]) {
    const box = $(id);
    box.replaceChildren(...(js.length ? js.map(jobView) : [el("p", { class: "muted" }, "No jobs running.")]));
  }
}

function renderEvents() {
  const rows = (n) => state.events.slice(-n).reverse().map((e) => el("tr", { dataset: { kind: e.kind } },
    el("td", { class: "muted" }, time(e.at_unix_ms)), el("td", {}, e.message)));
  table("#dash-events", ["Time", "Event"], rows(8), "no events yet");
  table("#events-table", ["Time", "Event"], rows(500), "no events yet");
}

function renderSessions(ss) {
  const rows = ss.map((s) => el("tr", {},
    el("td", {}, s.initiator),
    el("td", {}, s.isid),
    el("td", {}, "controller " + s.controller + " · " + s.portal),
    el("td", {}, s.peer),
    el("td", { class: "num" }, String(s.in_flight)),
    el("td", { class: "num" }, s.commands.toLocaleString()),
    el("td", { class: "muted" }, Object.entries(s.params).filter(([k]) => /Digest|MaxBurst|ImmediateData|InitialR2T/.test(k)).map(([k, v]) => k + "=" + v).join(" "))));
  table("#sessions-table", ["Initiator", "ISID", "Controller · portal", "From", "In flight", "Commands", "Negotiated"], rows, "no sessions logged in");
}

// ---------------------------------------------------------------- charts

function drawChart(canvasId, legendId, series, unit) {
  const c = document.getElementById(canvasId);
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth || 560, h = c.clientHeight || 180;
  if (c.width !== w * dpr) { c.width = w * dpr; c.height = h * dpr; }
  const g = c.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const keys = Object.keys(series).sort();
  let max = 0;
  for (const k of keys) for (const v of series[k]) if (v != null) max = Math.max(max, v);
  max = max > 0 ? max * 1.15 : 1;
  const left = 44, bottom = h - 18, top = 8, right = w - 8;
  g.strokeStyle = "#e2e7ef";
  g.fillStyle = "#67748a";
  g.font = "11px system-ui, sans-serif";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + ((bottom - top) * i) / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
    const v = max * (1 - i / 4);
    g.fillText(v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2), 4, y + 4);
  }
  g.fillText("-" + Math.round((HISTORY * POLL_MS) / 1000) + "s", left, h - 4);
  g.fillText("now", right - 22, h - 4);
  keys.forEach((k, i) => {
    const pts = series[k];
    g.strokeStyle = COLORS[i % COLORS.length];
    g.lineWidth = 2;
    g.beginPath();
    let pen = false;
    pts.forEach((v, j) => {
      const x = right - ((pts.length - 1 - j) * (right - left)) / (HISTORY - 1);
      if (v == null) { pen = false; return; }
      const y = bottom - ((bottom - top) * v) / max;
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true;
    });
    g.stroke();
  });
  const legend = document.getElementById(legendId);
  legend.replaceChildren(...keys.map((k, i) => {
    const last = series[k].filter((v) => v != null).slice(-1)[0];
    return el("span", { style: { "--c": COLORS[i % COLORS.length] } }, `${k}: ${last == null ? "—" : last.toFixed(last >= 100 ? 0 : 1)} ${unit}`);
  }));
}

function drawCharts() {
  if (state.page !== "dashboard") return;
  drawChart("chart-iops", "legend-iops", state.series.iops, "IOPS");
  drawChart("chart-mbps", "legend-mbps", state.series.mbps, "MB/s");
  drawChart("chart-lat", "legend-lat", state.series.lat, "ms");
  drawChart("chart-vol", "legend-vol", state.series.vol, "IOPS");
}

// ---------------------------------------------------------------- volume form

async function createVolume(ev) {
  ev.preventDefault();
  const f = ev.target;
  f.querySelectorAll(".field-error").forEach((p) => { p.textContent = ""; });
  $("#nv-error").textContent = "";
  $("#nv-ok").textContent = "";
  const name = f.name.value.trim(), size = f.size.value.trim(), lun = f.lun.value.trim();
  // The same rules the API applies, checked here first for a quick answer.
  const errors = {};
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(name)) errors.name = "Use 1 to 64 letters, digits, '-' and '_'.";
  if (!/^\d+\s*(B|K|KiB|M|MiB|G|GiB|T|TiB)?$/.test(size)) errors.size = "Give a size such as 10GiB or 512MiB.";
  if (lun && !/^\d{1,3}$/.test(lun)) errors.lun = "A number from 0 to 255, or empty for the lowest free LUN.";
  for (const [k, m] of Object.entries(errors)) f.querySelector(`[data-field="${k}"]`).textContent = m;
  if (Object.keys(errors).length) return;
  const body = { name, size, block_size: Number(f.block_size.value) };
  if (lun) body.lun = Number(lun);
  const btn = f.querySelector("button");
  btn.disabled = true;
  btn.textContent = "Creating…";
  try {
    const r = await api("POST", "/api/v1/volumes", body);
    if (r.ok) {
      $("#nv-ok").textContent = `Volume ${r.data.name} created as LUN ${r.data.lun}; hosts see it after a rescan.`;
      f.reset();
      refresh();
    } else if (r.data && r.data.field && f.querySelector(`[data-field="${r.data.field}"]`)) {
      f.querySelector(`[data-field="${r.data.field}"]`).textContent = r.data.error;
    } else {
      $("#nv-error").textContent = (r.data && r.data.error) || "the appliance refused (" + r.status + ")";
    }
  } catch (e) {
    if (e.message !== "not logged in") $("#nv-error").textContent = "cannot reach the appliance: " + e.message;
  } finally {
    btn.disabled = false;
    btn.textContent = "Create volume";
  }
}

// ---------------------------------------------------------------- start

window.addEventListener("DOMContentLoaded", async () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  $("#create-volume").addEventListener("submit", createVolume);
  window.addEventListener("hashchange", route);
  try {
    const r = await api("GET", "/api/v1/session");
    if (r.ok) {
      state.csrf = r.data.csrf_token;
      start();
    }
  } catch {
    /* showLogin already ran */
  }
});
