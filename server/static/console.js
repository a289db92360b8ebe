// tinker-jax console: polls /api/v1/console/state once a second and renders it. No framework, no build step.
"use strict";

const STORE = "tinker-jax-api-key";
const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
if (fromHash) localStorage.setItem(STORE, fromHash);
let key = localStorage.getItem(STORE) || "";
const charts = new Map();  // "run|metric" -> {plot, n}

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
  '"': "&quot;", "'": "&#39;"}[c]));
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "—");
const bytes = (n) => {
  if (n == null) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
};
const table = (heads, rows) => `<table><tr>${heads.map((h) => `<th>${h}</th>`).join("")}</tr>${
  rows.map((r) => `<tr>${r.join("")}</tr>`).join("")}</table>`;
const td = (v, cls = "") => `<td class="${cls}">${v}</td>`;

let wantKey = false;  // the key form was asked for (a 401, or the header button)

function showLogin(message) {
  $("login").hidden = false; $("content").hidden = true; $("forget").hidden = true;
  $("login-error").textContent = message || "";
  $("health").textContent = "API key needed"; $("health").className = "pill";
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault(); key = $("key").value.trim(); localStorage.setItem(STORE, key); wantKey = false; refresh();
});
$("forget").addEventListener("click", () => { localStorage.removeItem(STORE); key = ""; location.hash = "";
  wantKey = true; showLogin(); });

// The steps on record, padded by one either side when there is a single one (uPlot would span 0-100).
function xRange(u) {
  const xs = u.data[0] || [];
  if (!xs.length) return [0, 1];
  const lo = Math.min(...xs), hi = Math.max(...xs);
  return lo === hi ? [lo - 1, hi + 1] : [lo, hi];
}

function renderRuns(runs) {
  const box = $("runs");
  if (!runs.length) { box.innerHTML = `<p class="muted">No training runs yet.</p>`; return; }
  const seen = new Set();
  for (const run of runs) {
    let el = document.getElementById(`run-${run.id}`);
    if (!el) {
      el = document.createElement("div"); el.className = "run"; el.id = `run-${run.id}`;
      el.innerHTML = `<div class="run-head"></div><div class="charts"></div>`; box.appendChild(el);
    }
    const steps = Math.max(0, ...Object.values(run.metrics).map((s) => s.length));
    el.querySelector(".run-head").innerHTML = `<h3>${esc(run.id)}</h3>
      <span>${esc(run.base_model)}</span>
      <span>${run.lora_rank == null ? "full fine-tuning" : `LoRA rank ${run.lora_rank}`}</span>
      <span class="muted">owner ${esc(run.owner ?? "local")}</span>
      <span class="muted">created ${when(run.created)}</span>
      <span class="muted">last request ${when(run.last_request)}</span>
      <span class="muted">${steps} step${steps === 1 ? "" : "s"} recorded</span>`;
    const holder = el.querySelector(".charts");
    for (const [name, points] of Object.entries(run.metrics)) {
      const id = `${run.id}|${name}`; seen.add(id);
      const data = [points.map((p) => p[0]), points.map((p) => p[1])];
      let c = charts.get(id);
      if (!c) {
        const wrap = document.createElement("div"); wrap.className = "chart";
        wrap.innerHTML = `<div class="title">${esc(name)}</div>`; holder.appendChild(wrap);
        const plot = new uPlot({width: 330, height: 170, legend: {show: false}, cursor: {show: true},
          scales: {x: {time: false, auto: false, range: xRange}},
          axes: [{label: "step", size: 34}, {size: 52}],
          series: [{label: "step"}, {label: name, stroke: "#3559e0", width: 2, points: {show: true, size: 5}}]},
          data, wrap);
        c = {plot, wrap}; charts.set(id, c);
      } else {
        c.plot.setData(data);
      }
      c.wrap.dataset.metric = name; c.wrap.dataset.run = run.id; c.wrap.dataset.points = String(points.length);
    }
  }
  for (const [id, c] of charts) if (!seen.has(id)) { c.plot.destroy(); c.wrap.remove(); charts.delete(id); }
  for (const el of [...box.querySelectorAll(".run")]) if (!runs.some((r) => `run-${r.id}` === el.id)) el.remove();
  const none = box.querySelector("p.muted"); if (none) none.remove();
}

function render(s) {
  if (wantKey) return;  // the key form stays up until a key is given
  $("login").hidden = true; $("content").hidden = false; $("forget").hidden = false;
  $("forget").textContent = s.key_given ? "change key" : "enter key";
  $("health").textContent = s.health.ok ? "healthy" : `problems: ${s.health.problems.join("; ")}`;
  $("health").className = `pill ${s.health.ok ? "ok" : "bad"}`;
  $("updated").textContent = `updated ${new Date(s.time * 1000).toLocaleTimeString()}` +
    (s.key_given ? "" : " · no key: showing what was made without one");
  renderRuns(s.runs);
  $("checkpoints").innerHTML = s.checkpoints.length ? table(
    ["checkpoint", "type", "step", "size", "created", "expires", "published", "download"],
    s.checkpoints.map((c) => [td(`<code>${esc(c.path)}</code>`), td(esc(c.type)), td(c.step ?? "—", "num"),
      td(bytes(c.size_bytes), "num"), td(when(c.created)), td(c.expires ? when(c.expires) : "never"),
      td(c.public ? "yes" : "no"),
      td(c.downloads.map((d) => `<a class="download" href="${esc(d.url)}">${esc(d.name)}</a>`).join("<br>"))]))
    : `<p class="muted">No checkpoints.</p>`;
  const models = Object.entries(s.models);
  $("models").innerHTML = models.length ? table(["base model", "queued", "in flight", "LoRA slots", "sampler"],
    models.map(([name, m]) => [td(esc(name) + (m.loaded ? "" : " <span class=muted>(loading)</span>")),
      td(m.queued ?? 0, "num"), td(m.inflight ?? 0, "num"), td(esc(JSON.stringify(m.lora_slots_in_use ?? {}))),
      td(m.sampler ? `${m.sampler.running_rows ?? 0} rows running, ${m.sampler.queued ?? 0} queued, ` +
        `KV pages ${m.sampler.kv_pages_used ?? 0}/${m.sampler.kv_pages_total ?? 0}, ` +
        `${m.sampler.tokens_generated ?? 0} tokens generated` : "—")]))
    : `<p class="muted">No base model loaded yet.</p>`;
  $("sessions").innerHTML = s.sessions.length ? table(["session", "SDK", "last heartbeat", "state", "models"],
    s.sessions.map((x) => [td(`<code>${esc(x.id)}</code>`), td(esc(x.sdk_version)), td(when(x.last_heartbeat)),
      td(x.finished ? "finished" : "open"), td(x.models.map(esc).join("<br>"))]))
    : `<p class="muted">No sessions.</p>`;
  const cache = s.compile_cache || {};
  $("server").innerHTML = table(["device", "platform", "memory in use", "memory limit"],
    s.devices.map((d) => [td(`${d.id}: ${esc(d.kind)}`), td(esc(d.platform)), td(bytes(d.bytes_in_use), "num"),
      td(bytes(d.bytes_limit), "num")])) +
    `<p class="muted">Compiled programs: ${s.programs_compiled ?? "—"}. Compile cache: ${
      cache.on ? `${cache.files ?? 0} files, ${bytes(cache.bytes)}` : "off"}.</p>`;
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const r = await fetch("/api/v1/console/state", {headers: key ? {"X-API-Key": key} : {}});
    if (r.status === 401) { showLogin(key ? "That key was not accepted." : ""); return; }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    render(await r.json());
  } catch (e) {
    $("health").textContent = `server unreachable (${e.message})`; $("health").className = "pill bad";
  } finally {
    busy = false;
  }
}
refresh();
setInterval(refresh, 1000);
