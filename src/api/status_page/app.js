// The mtunnel status page: reads the node's JSON API with the API token the user gives
// once (kept in sessionStorage, sent as the Authorization header) and redraws every 2 s.
// Everything shown is built with textContent: no API text is ever parsed as HTML.
"use strict";

(() => {
  const KEY = "mtunnel-token";
  const REFRESH_MS = 2000;
  const API = "/api2/json";
  // `localhost` is always the node that serves this page, also in a cluster.
  const NODE = "localhost";
  const LOG_LINES = 500;

  let token = null;
  let timer = null;
  // UPIDs whose log is shown.
  const expanded = new Set();
  // Per stream ("upid|socket"): the byte counts of the previous refresh, for the rates.
  const previous = new Map();

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, String(v));
    }
    for (const c of children) {
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function normalizeToken(raw) {
    const t = raw.trim();
    if (!t) return null;
    return t.startsWith("PVEAPIToken=") ? t : "PVEAPIToken=" + t;
  }

  // `#token=...&task=UPID`: the token is stored, the task's log opened, and the fragment
  // removed from the address bar (it never reaches the server, but stays in history).
  function readFragment() {
    const hash = location.hash.replace(/^#/, "");
    if (!hash) return;
    for (const part of hash.split("&")) {
      const at = part.indexOf("=");
      if (at < 0) continue;
      const key = part.slice(0, at);
      let value;
      try {
        value = decodeURIComponent(part.slice(at + 1));
      } catch (e) {
        continue;
      }
      if (key === "token") {
        const t = normalizeToken(value);
        if (t) sessionStorage.setItem(KEY, t);
      } else if (key === "task" && value) {
        expanded.add(value);
      }
    }
    history.replaceState(null, "", location.pathname + location.search);
  }

  async function api(path) {
    const r = await fetch(API + path, {
      headers: { Authorization: token },
      cache: "no-store",
      credentials: "omit",
    });
    let body = null;
    try {
      body = await r.json();
    } catch (e) {
      body = null;
    }
    if (!r.ok) {
      const msg = body && body.message ? String(body.message).trim() : "";
      const err = new Error(msg || `${r.status} ${r.statusText}`);
      err.status = r.status;
      throw err;
    }
    return body;
  }

  // A failure other than 401 is shown in place; a 401 ends the session.
  async function optional(path) {
    try {
      return await api(path);
    } catch (e) {
      if (e.status === 401) throw e;
      return { error: e };
    }
  }

  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n;
    let i = 0;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
  }

  function fmtTime(secs) {
    if (!secs) return "";
    return new Date(secs * 1000).toISOString().replace("T", " ").slice(0, 19);
  }

  function rate(key, netin, netout, uptime, now) {
    const prev = previous.get(key);
    previous.set(key, { netin, netout, at: now });
    if (prev && now > prev.at) {
      const dt = (now - prev.at) / 1000;
      return [(netin - prev.netin) / dt, (netout - prev.netout) / dt];
    }
    // First sight: the average since the stream's first connection.
    return uptime > 0 ? [netin / uptime, netout / uptime] : [null, null];
  }

  const fmtRate = (r) => (r === null ? "–" : `${fmtBytes(Math.max(0, Math.round(r)))}/s`);

  function phase(t) {
    if (t.command) return `'${t.command}' (${t.commands} commands)`;
    return t.connected ? "connected" : "waiting for the source";
  }

  function tunnelRows(t, now) {
    const streams = t.streams.length ? t.streams : [null];
    return streams.map((s, i) => {
      const tr = el("tr", { "data-vmid": t.vmid, "data-stream": s ? s.stream : "" });
      if (i === 0) {
        const span = { rowspan: streams.length };
        tr.append(
          el("td", { ...span, class: "vmid" }, t.vmid),
          el("td", { ...span, class: "upid" }, t.upid),
          el("td", { ...span, class: "user" }, t.user),
          el("td", { ...span, class: "command", title: fmtTime(t.commandtime) }, phase(t)),
        );
      }
      if (!s) {
        tr.append(el("td", { class: "stream", colspan: 6 }, "no stream yet"));
        return tr;
      }
      const [rin, rout] = rate(`${t.upid}|${s.socket}`, s.netin, s.netout, s.uptime, now);
      tr.append(
        el("td", { class: "stream", title: s.socket }, s.stream),
        el("td", { class: "open" }, s.open),
        el("td", { class: "netin", "data-bytes": s.netin }, fmtBytes(s.netin)),
        el("td", { class: "netout", "data-bytes": s.netout }, fmtBytes(s.netout)),
        el("td", { class: "ratein" }, fmtRate(rin)),
        el("td", { class: "rateout" }, fmtRate(rout)),
      );
      return tr;
    });
  }

  function renderTunnels(status) {
    const now = performance.now();
    const rows = status.tunnels.flatMap((t) => tunnelRows(t, now));
    $("tunnels").tBodies[0].replaceChildren(...rows);
    $("no-tunnels").hidden = status.tunnels.length > 0;
  }

  function taskUser(t) {
    return t.tokenid ? `${t.user}!${t.tokenid}` : t.user;
  }

  function logRow(upid, log) {
    let text;
    if (log.error) text = `reading the log failed: ${log.error.message}`;
    else text = log.data.map((l) => l.t).join("\n");
    return el(
      "tr",
      { class: "log", "data-log": upid },
      el("td", { colspan: 6 }, el("pre", {}, text)),
    );
  }

  function renderTasks(tasks, logs) {
    const rows = [];
    for (const t of tasks.data) {
      const open = expanded.has(t.upid);
      const tr = el(
        "tr",
        { class: open ? "task open" : "task", "data-upid": t.upid, title: t.upid },
        el("td", { class: "start" }, fmtTime(t.starttime)),
        el("td", { class: "end" }, fmtTime(t.endtime)),
        el("td", { class: "type" }, t.type),
        el("td", { class: "id" }, t.id),
        el("td", { class: "user" }, taskUser(t)),
        el("td", { class: "status" }, t.status || ""),
      );
      tr.addEventListener("click", () => {
        if (expanded.has(t.upid)) expanded.delete(t.upid);
        else expanded.add(t.upid);
        refresh();
      });
      rows.push(tr);
      if (open && logs.has(t.upid)) rows.push(logRow(t.upid, logs.get(t.upid)));
    }
    $("tasks").tBodies[0].replaceChildren(...rows);
    $("no-tasks").hidden = tasks.data.length > 0;
  }

  function renderCluster(cluster) {
    const members = $("members");
    if (cluster.error) {
      $("cluster").textContent = `cluster status unavailable: ${cluster.error.message}`;
      members.hidden = true;
      return;
    }
    const info = cluster.data.find((e) => e.type === "cluster");
    if (!info) {
      $("cluster").textContent = "standalone";
      members.hidden = true;
      return;
    }
    const quorum = info.quorate ? "quorate" : "NOT quorate";
    $("cluster").textContent = `cluster ${info.name}: ${quorum}, ${info.nodes} nodes`;
    const rows = cluster.data
      .filter((e) => e.type === "node")
      .map((n) =>
        el(
          "tr",
          { "data-node": n.name, class: n.online ? "online" : "offline" },
          el("td", {}, n.local ? `${n.name} (this node)` : n.name),
          el("td", {}, n.nodeid),
          el("td", {}, n.ip),
          el("td", {}, n.online ? "online" : "offline"),
        ),
      );
    members.tBodies[0].replaceChildren(...rows);
    members.hidden = false;
  }

  async function readLogs() {
    const logs = new Map();
    for (const upid of expanded) {
      const path = `/nodes/${NODE}/tasks/${encodeURIComponent(upid)}/log`;
      let log = await optional(`${path}?start=0&limit=${LOG_LINES}`);
      // Long logs: their last lines.
      if (!log.error && log.total > LOG_LINES) {
        log = await optional(`${path}?start=${log.total - LOG_LINES}&limit=${LOG_LINES}`);
      }
      logs.set(upid, log);
    }
    return logs;
  }

  async function refresh() {
    clearTimeout(timer);
    timer = null;
    try {
      const [status, tasks, cluster] = await Promise.all([
        api(`/nodes/${NODE}/mtunnel-status`),
        api(`/nodes/${NODE}/tasks?source=all&limit=20`),
        optional("/cluster/status"),
      ]);
      const logs = await readLogs();
      $("node").textContent = status.data.node;
      document.title = `mtunnel ${status.data.node}`;
      renderTunnels(status.data);
      renderTasks(tasks, logs);
      renderCluster(cluster);
      $("error").textContent = "";
      $("updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
    } catch (e) {
      if (e.status === 401) {
        forget(`The API refused the token: ${e.message}`);
        return;
      }
      $("error").textContent = `Refresh failed: ${e.message}`;
    }
    if (token) timer = setTimeout(refresh, REFRESH_MS);
  }

  function showLogin(message) {
    $("status").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  function forget(message) {
    clearTimeout(timer);
    timer = null;
    token = null;
    sessionStorage.removeItem(KEY);
    showLogin(message);
  }

  function start() {
    token = sessionStorage.getItem(KEY);
    if (!token) {
      showLogin("");
      return;
    }
    $("login").hidden = true;
    $("status").hidden = false;
    $("logout").hidden = false;
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = normalizeToken($("token").value);
      $("token").value = "";
      if (!t) {
        $("login-error").textContent = "Enter a token.";
        return;
      }
      sessionStorage.setItem(KEY, t);
      start();
    });
    $("logout").addEventListener("click", () => forget(""));
    readFragment();
    start();
  });
})();
