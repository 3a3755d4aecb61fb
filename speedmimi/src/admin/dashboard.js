// The dashboard's script (served at /dashboard.js; see admin/dashboard.rs).
"use strict";
const KEEP = 300, WIN = "over the last 10 seconds";
const $ = (s) => document.querySelector(s);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
const num = (v, d = 1) => v == null ? "–" : Number(v).toFixed(d);
const series = new Map();
let token = sessionStorage.getItem("speedmimi.token") || "";
let live = null, stream = null;

function headers(extra) {
  const h = Object.assign({}, extra);
  if (token) h.Authorization = "Bearer " + token;
  return h;
}
function say(text, ok) { const s = $("#status"); s.textContent = text; s.className = ok ? "ok" : "err"; }

function addPoint(p) {
  for (const [key, v] of Object.entries(p.s)) {
    let s = series.get(key);
    if (!s) series.set(key, s = { t: [], v: [] });
    s.t.push(p.t); s.v.push(v);
    if (s.t.length > KEEP) { s.t.shift(); s.v.shift(); }
  }
}

// A chart of the last five minutes against wall time: one line per column of the scope's
// points (0 rate, 1 p99, 2 4xx/s, 3 5xx/s), all on the scale of the largest value shown.
function chart(key, lines, label, unit) {
  const s = series.get(key);
  const now = Date.now(), w = 300, h = 40;
  let max = 0, svg = "";
  const last = lines.map(() => null);
  if (s) {
    for (const v of s.v) for (const [i] of lines) if (v[i] != null) max = Math.max(max, v[i]);
    lines.forEach(([i, color], n) => {
      let pts = "";
      for (let j = 0; j < s.v.length; j++) {
        const v = s.v[j][i], x = w - (now - s.t[j]) / 1000;
        if (v == null || x < 0) continue;
        pts += x.toFixed(1) + "," + (h - 2 - (max ? v / max : 0) * (h - 4)).toFixed(1) + " ";
        last[n] = v;
      }
      svg += `<polyline fill="none" stroke="${color}" stroke-width="2" vector-effect="non-scaling-stroke" points="${pts}"/>`;
    });
  }
  const now_ = last.map((v, n) => num(v, lines[n][0] === 1 ? 1 : 0)).join(" · ");
  return `<span class="chart" title="${esc(label)}: last 5 minutes, max ${num(max, 2)}${unit}">` +
    `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none">${svg}</svg>` +
    `<span>${esc(label)} ${now_}${unit}</span></span>`;
}
function charts(key, latency = true) {
  return `<span class="charts">${chart(key, [[0, "#2563eb"]], "req/s", "")}` +
    (latency ? chart(key, [[1, "#7c3aed"]], "p99", " ms") : "") +
    `${chart(key, [[3, "#c62828"], [2, "#d97706"]], "5xx · 4xx /s", "")}</span>`;
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? s + " s ago" : s < 7200 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
}
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}
function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function render(l) {
  live = l;
  const s = l.server, f = s.figures;
  $("#uptime").textContent = duration(s.uptime_seconds);
  $("#conns").textContent = s.connections_open;
  $("#rate").textContent = num(f.rate);
  $("#p99").textContent = f.p99_ms == null ? "–" : num(f.p99_ms, 2) + " ms";
  $("#datapath").textContent = s.datapath;
  $("#generation").textContent = "#" + s.config_generation;
  $("#server").innerHTML =
    `<h2>Server <small>changed ${esc(ago(s.config_changed_unix_ms))}` +
    `${s.config_reloaded_unix_ms ? ", last reloaded " + esc(ago(s.config_reloaded_unix_ms)) : ", never reloaded"}</small>` +
    `<small>${s.connections_total} connections since start</small>` +
    `<small>upgraded flows open ${s.upgraded_open}, spliced ${s.spliced_open}, parked ${s.spliced_parked}</small>` +
    `<small>4xx/s ${num(f.errors_4xx)}, 5xx/s ${num(f.errors_5xx)}, p50 ${num(f.p50_ms, 2)} ms</small>` +
    (s.tls ? `<button data-act="tls" class="danger">Reload TLS</button>` : "") + `</h2>` +
    `<div class="big">${charts("server")}</div>`;
  $("#upstreams").innerHTML = l.upstreams.map(upstream).join("");
  $("#routes").innerHTML = `<h2>Routes</h2><div class="scroll"><table><tr><th>route</th><th>path</th>` +
    `<th>upstream</th><th>req/s</th><th>4xx/s</th><th>5xx/s</th><th>last 5 min</th></tr>` +
    l.routes.map((r) => `<tr data-route="${esc(r.name)}"><td>${esc(r.name)}</td><td>${esc(r.prefix)}</td>` +
      `<td>${esc(r.upstream)}</td><td class="n rate">${num(r.figures.rate)}</td>` +
      `<td class="n">${num(r.figures.errors_4xx)}</td><td class="n">${num(r.figures.errors_5xx)}</td>` +
      `<td>${charts("r/" + r.name, false)}</td></tr>`).join("") + `</table></div>`;
  $("#l4").innerHTML = `<h2>XDP L4 services</h2>` + (l.l4.length ? l.l4.map((x) =>
    `<h2><small>${esc(x.service)}: ${esc(x.vip)}:${esc(x.port)} on ${esc(x.interface)} → ${esc(x.upstream)}</small></h2>` +
    `<div class="scroll"><table><tr><th>backend</th><th>Maglev ring share</th><th>packets/s</th></tr>` +
    x.backends.map((b) => `<tr><td>${esc(b.backend)}</td><td><span class="bar" style="width:${(b.ring_share * 200).toFixed(0)}px">` +
      `</span> ${num(b.ring_share * 100)}%</td><td class="n">${num(b.packets_per_second)}</td></tr>`).join("") +
    `</table></div>`).join("") : `<p class="dim">none steered (no <code>l4:</code> services, or no XDP datapath)</p>`);
}

function upstream(u) {
  const f = u.figures, kernel = u.backends.some((b) => b.kernel);
  return `<section data-upstream="${esc(u.name)}"><h2>${esc(u.name)} <small>${num(f.rate)} req/s, ` +
    `p99 ${num(f.p99_ms, 2)} ms, 4xx/s ${num(f.errors_4xx)}, 5xx/s ${num(f.errors_5xx)}</small>` +
    `${charts("u/" + u.name)}</h2><div class="scroll"><table><tr><th>backend</th><th>state</th>` +
    `<th>weight (eff.)</th><th>in flight</th><th title="${WIN}">req/s</th><th title="${WIN}">4xx · 5xx /s</th>` +
    `<th title="${WIN}">p50 / p99 ms</th><th>ejections</th><th title="WebSocket and SSE flows: spliced in the kernel now (parked: quiet, outside tokio); since start: spliced ones that ended, copied ones begun">upgraded flows</th>${kernel ? `<th title="bytes spliced both ways, and packets XDP steered to it">kernel</th>` : ""}` +
    `<th>last 5 min</th></tr>` + u.backends.map((b) => backend(b, kernel)).join("") + `</table></div></section>`;
}

function backend(b, withKernel) {
  const f = b.figures, c = b.condition, k = b.kernel, key = b.upstream + "/" + b.id;
  const kernel = !withKernel ? "" : k ? `<td>${bytes(k.spliced_bytes_to_backend + k.spliced_bytes_to_client)}` +
    `<span class="why">${bytes(f.spliced_bytes_per_second)}/s</span>` +
    (k.xdp ? `XDP ${k.xdp.packets} pkts<span class="why">${num(f.xdp_packets_per_second)} pkts/s</span>` : "") + `</td>`
    : `<td class="dim">none yet</td>`;
  const drained = c.state === "drained";
  return `<tr data-b="${esc(key)}" data-up="${esc(b.upstream)}" data-id="${esc(b.id)}"><td><b>${esc(b.id)}</b>` +
    `<span class="why">${esc(b.host)}:${esc(b.port)}</span><span class="acts">` +
    (drained ? `<button data-act="undrain">Undrain</button>` : `<button data-act="drain" class="danger">Drain</button>`) +
    `<button data-act="weight">Weight</button><button data-act="disconnect" class="danger">Disconnect</button></span></td>` +
    `<td><span class="st ${esc(c.state)}">${esc(c.state.replace("_", " "))}</span><span class="why">${esc(c.why)}</span></td>` +
    `<td class="n">${b.weight} (${b.effective_weight})</td><td class="n">${b.in_flight}</td>` +
    `<td class="n rate">${num(f.rate)}</td><td class="n">${num(f.errors_4xx)} · ${num(f.errors_5xx)}</td>` +
    `<td class="n">${num(f.p50_ms, 2)} / ${num(f.p99_ms, 2)}</td><td class="n">${b.outlier.ejections}</td>` +
    `<td>${flows(b.upgraded_flows)}</td>${kernel}` +
    `<td>${charts("b/" + key)}</td></tr>`;
}

function flows(u) {
  return `${u.spliced_open} spliced (${u.parked_open} parked)` +
    `<span class="why">done: ${u.spliced} spliced, ${u.copied} copied</span>`;
}

// Actions: each is one call of the admin API; the answer (or its error) shows in the status line.
async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers({ "Content-Type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body) });
  let j = null;
  try { j = await r.json(); } catch (e) { j = null; }
  if (r.status === 401) { login("The token was refused (401): enter it again."); }
  if (!r.ok) throw new Error((j && j.error) || r.status + " " + r.statusText);
  return j;
}
function ask(text, weight) {
  return new Promise((resolve) => {
    const d = $("#ask");
    $("#ask-text").textContent = text;
    $("#ask-weight").hidden = weight == null;
    $("#ask-value").value = weight ?? "";
    d.returnValue = "";
    d.onclose = () => resolve(d.returnValue !== "ok" ? null : weight == null ? true : $("#ask-value").value.trim());
    d.showModal();
  });
}
document.addEventListener("click", async (ev) => {
  const btn = ev.target.closest("button[data-act]");
  if (!btn) return;
  const act = btn.dataset.act, row = btn.closest("tr[data-b]");
  const up = row?.dataset.up, id = row?.dataset.id;
  const b = row && live.upstreams.find((u) => u.name === up)?.backends.find((x) => x.id === id);
  const ref = row && `?upstream=${encodeURIComponent(up)}&backend_id=${encodeURIComponent(id)}`;
  try {
    if (act === "drain") {
      if (!await ask(`Drain ${id} (${up})? It gets no new requests or flows; in-flight ones finish.`)) return;
      await api("PUT", "/api/v1/backends/update", { upstream: up, backend: { id, active: false } });
      say(`${id} drained`, true);
    } else if (act === "undrain") {
      await api("PUT", "/api/v1/backends/update", { upstream: up, backend: { id, active: true } });
      say(`${id} back in (slow start if configured)`, true);
    } else if (act === "weight") {
      const w = await ask(`New weight for ${id} (${up}):`, b ? b.weight : 100);
      if (w === null) return;
      if (!/^[0-9]+$/.test(w)) throw new Error("a weight is a whole number");
      await api("PUT", "/api/v1/backends/update", { upstream: up, backend: { id, weight: Number(w) } });
      say(`${id}: weight ${w}`, true);
    } else if (act === "disconnect") {
      if (!await ask(`Disconnect ${id} (${up})? Its open WebSocket and SSE flows and idle connections close now; new requests still go to it (drain it to stop them).`)) return;
      await api("POST", "/api/v1/backends/disconnect" + ref);
      say(`${id}: flows disconnected`, true);
    } else if (act === "tls") {
      if (!await ask("Reload the TLS certificate and key files now?")) return;
      await api("POST", "/api/v1/config/reload-ssl");
      say("TLS certificates reloaded", true);
    }
  } catch (e) { say(`${act} ${id || ""}: ${e.message}`, false); }
});

function login(msg) {
  if (stream) stream.abort();
  $("#main").hidden = true; $("#login").hidden = false;
  $("#login-msg").textContent = msg; $("#link").textContent = "token needed"; $("#token").focus();
}
$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("#token").value;
  sessionStorage.setItem("speedmimi.token", token);
  $("#login-msg").textContent = "";
  connect();
});

// The event stream through fetch, so the token goes in a header (EventSource cannot send one).
async function connect() {
  if (stream) stream.abort();
  const ctl = stream = new AbortController();
  try {
    const r = await fetch("/api/v1/dashboard/events", { headers: headers(), signal: ctl.signal });
    if (r.status === 401) {
      return login(token ? "Wrong token: the admin API refused it (401)." : "This admin API needs a token.");
    }
    if (!r.ok) throw new Error(r.status + " " + r.statusText);
    $("#login").hidden = true; $("#main").hidden = false; $("#link").textContent = "live";
    series.clear();
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i); buf = buf.slice(i + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).replace(/^ /, "");
        }
        if (event === "history") JSON.parse(data).forEach(addPoint);
        else if (event === "tick") { const t = JSON.parse(data); addPoint(t.point); render(t.live); }
      }
    }
    throw new Error("stream ended");
  } catch (e) {
    if (ctl.signal.aborted) return;
    $("#link").textContent = "disconnected (" + e.message + "), retrying…";
    setTimeout(() => { if (stream === ctl) connect(); }, 2000);
  }
}
connect();
