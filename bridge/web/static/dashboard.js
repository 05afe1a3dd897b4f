// StratumRM dashboard: renders the snapshot /ws pushes every second. No build step.
"use strict";

const $ = (id) => document.getElementById(id);

function text(id, value) { $(id).textContent = value; }

function num(value) { return value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US"); }

function hashrate(value) {
  const units = ["H/s", "kH/s", "MH/s", "GH/s", "TH/s", "PH/s", "EH/s"];
  let i = 0;
  while (value >= 1000 && i < units.length - 1) { value /= 1000; i += 1; }
  return `${value.toFixed(value < 10 && i > 0 ? 2 : 1)} ${units[i]}`;
}

function duration(seconds) {
  seconds = Math.floor(seconds);
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600), m = Math.floor(seconds % 3600 / 60);
  return d ? `${d} d ${h} h` : h ? `${h} h ${m} min` : `${m} min ${seconds % 60} s`;
}

function reasons(map) {
  return Object.entries(map || {}).filter(([, n]) => n).map(([k, n]) => `${k} ${n}`).join(", ");
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "–" : value;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function table(id, items, columns, empty) {
  const body = $(id);
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    for (const [value, cls] of columns(item)) cell(tr, value, cls);
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = body.closest("table").querySelectorAll("th").length;
    td.className = "empty";
    td.textContent = empty;
    tr.appendChild(td);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function render(s) {
  const h = s.health, t = s.totals;
  text("role", h.role);
  text("version", `stratumrm ${h.version}`);
  const state = $("state");
  state.textContent = h.draining ? "draining" : h.ready ? "ready" : `not ready: ${h.reason}`;
  state.className = `state ${h.ready ? "ready" : "not-ready"}`;
  text("uptime", `up ${duration(h.uptime)}`);
  $("warnings").replaceChildren(...h.warnings.map((w) => { const li = document.createElement("li"); li.textContent = w; return li; }));

  text("total-rigs", num(t.rigs));
  text("total-hashrate", hashrate(t.hashrate));
  text("total-accepted", num(t.accepted));
  text("total-rejected", num(t.rejected));
  text("total-rejected-reasons", reasons(t.rejected_by_reason));
  text("total-stale", num(t.stale));
  text("total-active", t.active_upstream || "none");
  text("total-failovers", t.failovers === null ? "" : `${t.failovers} rig moves`);
  text("total-loss", t.udp_loss === null ? "–" : `${(t.udp_loss * 100).toFixed(2)} %`);
  const dg = [];
  if (t.datagrams_sent !== null) dg.push(`${num(t.datagrams_sent)} sent`);
  if (t.datagrams_received !== null) dg.push(`${num(t.datagrams_received)} received`);
  if (t.datagrams_dropped !== null) dg.push(`${num(t.datagrams_dropped)} dropped`);
  if (t.datagrams_sent !== null) dg.push("share copies resent (an upper bound on loss)");
  text("total-datagrams", dg.join(", "));
  text("total-retransmissions", num(t.retransmissions));
  text("total-fallbacks", t.tls_fallbacks === null ? "" : `${t.tls_fallbacks} TLS fallbacks`);
  text("total-rtt", t.srtt_ms === null ? "–" : `${t.srtt_ms.toFixed(1)} ms`);
  text("total-sessions", num(t.sessions));
  text("total-channels", `${num(t.channels)} channels`);
  text("total-refusals", num(Object.values(t.admission_refusals).reduce((a, b) => a + b, 0)));
  $("total-refusals").title = reasons(t.admission_refusals);
  text("total-pending", t.handshakes_pending === null ? "" : `${t.handshakes_pending} handshakes pending`);
  text("total-blocks", num(t.block_candidates));

  text("rigs-note", s.rigs_shown < t.rigs ? `(busiest ${s.rigs_shown} of ${t.rigs})` : "");
  table("rigs", s.rigs, (r) => [
    [r.id], [r.workers.join(", ") || "–"], [r.peer], [r.upstream], [r.difficulty === null ? "–" : r.difficulty, "n"],
    [hashrate(r.hashrate), "n"], [num(r.accepted), "n"], [num(r.rejected), "n"], [num(r.stale), "n"],
  ], "no rigs connected");
  table("upstreams", s.upstreams, (u) => [
    [u.name], [u.state, u.state === "up" ? "up" : u.state === "down" ? "down" : "warn"], [u.active ? "active" : ""],
    [num(u.rigs), "n"], [u.udp === null ? "–" : u.udp ? "up" : "down"],
    [u.srtt_ms === null ? "–" : `${u.srtt_ms.toFixed(1)} ms`, "n"],
    [u.retransmissions_udp === null ? "–" : `${u.retransmissions_udp} udp / ${u.retransmissions_tls} tls`, "n"],
    [num(u.tls_fallbacks), "n"], [u.reason || ""],
  ], "no upstreams");
  table("history", s.failover_history.slice().reverse(), (e) => [
    [new Date(e.at).toLocaleTimeString()], [e.kind], [e.message],
  ], "no failover events");
  table("sessions", s.sessions, (x) => [
    [x.peer], [x.certificate], [x.accounts.join(", ")], [num(x.channels), "n"], [num(x.shares_udp), "n"],
    [num(x.shares_tls), "n"], [num(x.datagrams), "n"], [reasons(x.datagram_drops) || "none"],
  ], "no StratumRM sessions");
  table("certificates", s.certificates, (c) => {
    const x = c.certificate;
    const state = x.expired ? "EXPIRED" : x.expiring_soon ? "expires soon" : "ok";
    return [[c.use], [x.name], [x.serial.slice(0, 12)], [x.not_after.replace("T", " ").slice(0, 16) + " UTC"],
      [x.days_left.toFixed(1), "n"], [state, x.expired ? "down" : x.expiring_soon ? "warn" : "up"]];
  }, "no certificates");
}

function connect() {
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  socket.onmessage = (event) => render(JSON.parse(event.data));
  socket.onclose = () => {
    const state = $("state");
    state.textContent = "disconnected; retrying…";
    state.className = "state not-ready";
    setTimeout(connect, 2000);
  };
}

connect();
