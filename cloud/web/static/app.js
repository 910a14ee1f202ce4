/* edgefl operator console: renders /api/* and follows /api/stream (server-sent events).
 * Hand-written, no dependencies, no external resources. Data is only ever inserted as
 * text (never as HTML), so device-provided strings cannot inject markup. */
"use strict";

(function () {
  const TOKEN_KEY = "edgefl.operatorToken";
  const PALETTE = ["#7c5cff", "#00a3a3", "#d6336c", "#8f6b00", "#0b7285", "#e8590c", "#5c7cfa", "#2f9e44"];
  const state = { overview: null, rounds: null, devices: [], models: null, events: [], rollouts: null };
  /** The device list is one page of a filtered query: a fleet may hold 10,000 devices. */
  const DEVICE_PAGE = 50;
  const devicePage = { offset: 0, q: "", state: "", total: 0 };
  let refreshTimer = null;

  // --- small helpers ------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    // The namespace of the page's own <svg> elements (the HTML parser sets it).
    const node = document.createElementNS(document.querySelector("svg").namespaceURI, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return Number(value).toFixed(digits === undefined ? 3 : digits);
  }

  function pct(value) {
    if (value === null || value === undefined) return "–";
    return (100 * value).toFixed(1) + " %";
  }

  function bytes(n) {
    if (!n) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function ago(seconds) {
    if (!seconds) return "never";
    const d = Math.max(0, Date.now() / 1000 - seconds);
    if (d < 5) return "just now";
    if (d < 90) return Math.round(d) + " s ago";
    if (d < 5400) return Math.round(d / 60) + " min ago";
    if (d < 129600) return Math.round(d / 3600) + " h ago";
    return new Date(seconds * 1000).toLocaleString();
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    return Math.floor(seconds / 60) + " min " + Math.round(seconds % 60) + " s";
  }

  /** A typed metric field of the API ("eval_accuracy", "train_loss", ...), or null. */
  function num(value) {
    return typeof value === "number" ? value : null;
  }

  /** A metric value: counts (examples, steps) as integers, the rest with 3 decimals. */
  function metricValue(value) {
    return Number.isInteger(value) ? String(value) : fmt(value);
  }

  function metricsText(metrics) {
    const keys = Object.keys(metrics || {}).sort();
    if (!keys.length) return "–";
    return keys.map((k) => k + " " + metricValue(metrics[k])).join(" · ");
  }

  /** The device states of the status protocol (docs/reference.md, DeviceState). */
  const DEVICE_STATES = ["SERVING", "TRAINING", "UPDATING", "DEGRADED", "OFFLINE"];

  function deviceState(d) {
    return DEVICE_STATES.includes(d.state) ? d.state : "UNKNOWN";
  }

  function setProgress(node, fraction, label) {
    const value = Math.round(100 * Math.max(0, Math.min(1, fraction || 0)));
    node.setAttribute("aria-valuenow", String(value));
    if (label) node.setAttribute("aria-valuetext", label);
    node.querySelector(".progress-bar").style.width = value + "%";
  }

  /** Replace a tbody's rows, keeping keyboard focus on the element with the same id. */
  function replaceRows(tbody, rows, emptyText, columns) {
    const focusedId = document.activeElement && tbody.contains(document.activeElement)
      ? document.activeElement.id : null;
    tbody.replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", { colspan: columns, className: "empty", text: emptyText }))]));
    if (focusedId && $(focusedId)) $(focusedId).focus();
  }

  // --- fetching -------------------------------------------------------------------------

  function authHeaders(accept) {
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    const headers = { Accept: accept };
    if (token) headers.Authorization = "Bearer " + token;
    return headers;
  }

  async function getJSON(path) {
    const response = await fetch(path, { headers: authHeaders("application/json"), cache: "no-store" });
    if (!response.ok) throw new Error(path + " answered " + response.status);
    return response.json();
  }

  async function fetchDevices() {
    const params = new URLSearchParams({ offset: String(devicePage.offset), limit: String(DEVICE_PAGE) });
    if (devicePage.q) params.set("q", devicePage.q);
    if (devicePage.state) params.set("state", devicePage.state);
    const path = "/api/devices?" + params.toString();
    const response = await fetch(path, { headers: authHeaders("application/json"), cache: "no-store" });
    if (response.status === 401 || response.status === 503) {
      showMessage("Devices and events need the operator token on this server: enter it below.", "error");
      devicePage.total = 0;
      return [];
    }
    if (!response.ok) throw new Error(path + " answered " + response.status);
    devicePage.total = Number(response.headers.get("X-Total-Count") || "0");
    return response.json();
  }

  async function refreshDevices() {
    state.devices = await fetchDevices();
    if (!state.devices.length && devicePage.offset > 0 && devicePage.total > 0) {
      // The page emptied (devices filtered away): show the last page that has rows.
      devicePage.offset = Math.floor((devicePage.total - 1) / DEVICE_PAGE) * DEVICE_PAGE;
      state.devices = await fetchDevices();
    }
    renderDevices();
  }

  /** Device inventory and events need the operator token when the server is not on loopback. */
  async function getPrivateJSON(path) {
    const response = await fetch(path, { headers: authHeaders("application/json"), cache: "no-store" });
    if (response.status === 401 || response.status === 503) {
      showMessage("Devices and events need the operator token on this server: enter it below.", "error");
      return [];
    }
    if (!response.ok) throw new Error(path + " answered " + response.status);
    return response.json();
  }

  async function download(link) {
    const response = await fetch(link.href, { headers: authHeaders("application/octet-stream") });
    if (!response.ok) {
      showMessage("Download refused (" + response.status + ")" + (response.status === 401 ? ": enter the operator token." : "."), "error");
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    const a = el("a", { href: url, download: link.getAttribute("data-filename") || "model.edgefl" });
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  /** Rollouts: null when this server has no controller (501) or wants the token. */
  async function fetchRollouts() {
    const response = await fetch("/api/rollouts", { headers: authHeaders("application/json"), cache: "no-store" });
    if (!response.ok) return null;
    return response.json();
  }

  async function refreshLists() {
    const [rounds, devices, models, events, rollouts] = await Promise.all([
      getJSON("/api/rounds"), fetchDevices(), getJSON("/api/models"), getPrivateJSON("/api/events?limit=50"),
      fetchRollouts(),
    ]);
    state.rounds = rounds; state.devices = devices; state.models = models; state.events = events;
    state.rollouts = rollouts;
    renderRounds(); renderDevices(); renderModels(); renderEvents(); renderRollouts();
    renderOverview();  // the rollout card follows the fleet target's row of the models list
    document.body.removeAttribute("data-loading");
  }

  function scheduleRefresh() {
    if (refreshTimer !== null) return;
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      refreshLists().catch((err) => console.warn("refresh failed", err));
    }, 150);
  }

  async function refreshAll() {
    state.overview = await getJSON("/api/overview");
    renderOverview();
    await refreshLists();
  }

  // --- overview -------------------------------------------------------------------------

  function renderOverview() {
    const o = state.overview;
    if (!o) return;
    $("fleet-name").textContent = o.fleet;
    const alerts = o.alerts || [];
    $("alerts").hidden = !alerts.length;
    $("alerts").replaceChildren(...alerts.map((text) => el("p", { text: text })));
    document.title = "edgefl · " + o.fleet;
    const run = o.run;
    const p = o.progress;
    const counter = $("round-counter");
    const text = run ? "Round " + (p ? p.current : 0) + " / " + run.num_rounds : "No run yet";
    if (counter.textContent !== text) counter.textContent = text;
    const badge = $("run-status");
    badge.textContent = run ? run.status : "idle";
    badge.className = "badge " + (run ? run.status : "");
    setProgress($("round-progress"), p ? p.fraction : 0, p ? Math.round(100 * p.fraction) + "% of rounds done" : "no run");
    $("run-meta").textContent = run
      ? "Run #" + run.id + " · " + run.strategy + (run.flower_run_id ? " · Flower run " + run.flower_run_id : "") +
        " · started " + ago(run.started_at)
      : "Start a run to train the fleet.";
    $("start-run").disabled = Boolean(run && run.status === "running");
    $("stop-run").disabled = !(run && run.status === "running");

    const replied = p ? p.replied : [], timedOut = p ? p.timed_out : [], failed = p ? p.failed : [], pending = p ? p.pending : [];
    $("count-replied").textContent = p ? replied.length + " / " + p.sampled.length : "0";
    $("count-timed-out").textContent = String(timedOut.length);
    $("count-failed").textContent = String(failed.length);
    $("count-pending").textContent = String(pending.length);
    const chips = [];
    for (const [list, cls, what] of [[replied, "ok", "replied"], [timedOut, "timeout", "timed out"], [failed, "failed", "failed"], [pending, "", "waiting"]]) {
      for (const id of list) chips.push(el("li", { className: "chip " + cls, title: id + ": " + what, text: id }));
    }
    $("round-devices").replaceChildren(...chips);

    const m = o.latest_metrics;
    $("metric-accuracy").textContent = m ? pct(num(m.eval_accuracy) ?? num(m.train_accuracy)) : "–";
    $("metric-loss").textContent = m ? fmt(num(m.eval_loss)) : "–";
    $("metric-train-loss").textContent = m ? fmt(num(m.train_loss)) : "–";
    $("metrics-meta").textContent = m ? "after round " + m.round : "No metrics yet.";

    // The card follows the fleet target: the pinned version while pinned, else the newest.
    const newest = o.newest_version;
    const s = o.serving;
    const listed = s && state.models ? state.models.versions.find((x) => x.version === s.version) : null;
    const v = s && newest && s.version !== newest.version ? listed || null : newest;
    const target = s ? s.version : newest ? newest.version : null;
    $("newest-version").textContent = target !== null ? "v" + target : "no model yet";
    $("serving-info").textContent = s
      ? (s.pinned ? "pinned fleet target" : "fleet target") +
        (newest && newest.version !== s.version ? " · newest v" + newest.version : "")
      : newest ? "newest, not released yet" : "";
    $("spread-progress").setAttribute("aria-label", "Online devices serving the fleet target");
    if (v && v.spread.total) {
      const sp = v.spread;
      setProgress($("spread-progress"), sp.online ? sp.serving / sp.online : 0, sp.serving + " of " + sp.online + " online devices");
      $("spread-text").textContent = sp.serving + " of " + sp.online + " online devices serve v" + v.version +
        " (" + sp.total + " known, " + (sp.total - sp.online) + " offline)";
    } else {
      setProgress($("spread-progress"), 0, v ? "no devices" : "no model");
      $("spread-text").textContent = o.devices.total ? o.devices.online + " of " + o.devices.total + " devices online" : "No devices have reported yet.";
    }
  }

  // --- charts ---------------------------------------------------------------------------

  function seriesFor(rounds, name) {
    const series = [];
    const test = [], train = [];
    const perDevice = new Map();
    for (const r of rounds) {
      const t = num(r["eval_" + name]);
      if (t !== null) test.push([r.round, t]);
      const a = num(r["train_" + name]);
      if (a !== null) train.push([r.round, a]);
      for (const reply of r.replies) {
        const d = reply.ok ? num(reply["train_" + name]) : null;
        if (d === null) continue;
        if (!perDevice.has(reply.device_id)) perDevice.set(reply.device_id, []);
        perDevice.get(reply.device_id).push([r.round, d]);
      }
    }
    if (test.length) series.push({ label: "Test (server)", color: "#2155d6", points: test, device: false });
    if (train.length) series.push({ label: "Train (aggregated)", color: "#f08c00", points: train, device: false });
    [...perDevice.keys()].sort().forEach((id, i) => {
      series.push({ label: id, color: PALETTE[i % PALETTE.length], points: perDevice.get(id), device: true });
    });
    return series;
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const exp = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 1.2, 2, 3, 4, 5, 6, 8, 10]) if (step * exp >= value) return step * exp;
    return 10 * exp;
  }

  function drawChart(name, rounds, totalRounds) {
    const root = document.querySelector('svg[data-chart="' + name + '"]');
    const legend = document.querySelector('ul[data-legend="' + name + '"]');
    const W = 560, H = 250, L = 46, R = 14, T = 12, B = 34;
    const series = seriesFor(rounds, name);
    const all = series.flatMap((s) => s.points);
    const nodes = [];
    const isAccuracy = name === "accuracy";
    const yMax = isAccuracy ? 1 : niceMax(Math.max(0, ...all.map((p) => p[1])) * 1.05);
    const xMin = Math.min(0, ...all.map((p) => p[0]));
    const xMax = Math.max(1, totalRounds || 0, ...all.map((p) => p[0]));
    const x = (v) => L + ((v - xMin) / (xMax - xMin)) * (W - L - R);
    const y = (v) => T + (1 - Math.max(0, Math.min(v, yMax)) / yMax) * (H - T - B);

    for (let i = 0; i <= 4; i += 1) {
      const v = (yMax * i) / 4;
      nodes.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      nodes.push(svg("text", { class: "tick", x: L - 6, y: y(v) + 4, "text-anchor": "end" },
        isAccuracy ? Math.round(v * 100) + "%" : (yMax >= 10 ? v.toFixed(0) : v.toFixed(2))));
    }
    const step = Math.max(1, Math.ceil((xMax - xMin) / 10));
    for (let r = xMin; r <= xMax; r += step) {
      nodes.push(svg("text", { class: "tick", x: x(r), y: H - B + 16, "text-anchor": "middle" }, String(r)));
    }
    nodes.push(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    nodes.push(svg("text", { class: "axis-title", x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "round"));

    if (!all.length) {
      nodes.push(svg("text", { class: "empty-note", x: (L + W - R) / 2, y: (T + H - B) / 2, "text-anchor": "middle" }, "No " + name + " reported yet"));
    }
    // Devices first, so that the aggregated lines are drawn on top.
    const ordered = series.filter((s) => s.device).concat(series.filter((s) => !s.device));
    for (const s of ordered) {
      const group = svg("g", { "data-series": s.label, class: s.device ? "device" : "aggregate" });
      const d = s.points.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
      group.append(svg("path", { class: "series" + (s.device ? " device" : ""), d: d, stroke: s.color }));
      for (const p of s.points) {
        const c = svg("circle", {
          class: "point" + (s.device ? " device" : ""), cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1),
          r: s.device ? 2.6 : 4, fill: s.color, "data-round": p[0], "data-value": p[1],
        });
        c.append(svg("title", {}, s.label + ", round " + p[0] + ": " + (isAccuracy ? pct(p[1]) : fmt(p[1]))));
        group.append(c);
      }
      nodes.push(group);
    }
    root.replaceChildren(...nodes);

    const main = series.find((s) => !s.device);
    const last = main ? main.points[main.points.length - 1] : null;
    root.setAttribute("aria-label", last
      ? name[0].toUpperCase() + name.slice(1) + " per round; " + main.label + " is " +
        (isAccuracy ? pct(last[1]) : fmt(last[1])) + " after round " + last[0]
      : name[0].toUpperCase() + name.slice(1) + " per round: no data yet");
    legend.replaceChildren(...series.map((s) => el("li", {},
      (() => { const sw = el("span", { className: "swatch" + (s.device ? " device" : "") }); sw.style.background = s.color; return sw; })(),
      s.label)));
  }

  // --- tables ---------------------------------------------------------------------------

  function renderRounds() {
    const data = state.rounds;
    const rounds = data ? data.rounds : [];
    const total = data && data.run ? data.run.num_rounds : 0;
    drawChart("accuracy", rounds, total);
    drawChart("loss", rounds, total);
    const rows = rounds.slice().reverse().map((r) => {
      const status = r.round === 0 ? "initial" : r.finished_at ? "done" : "running";
      const perDevice = el("ul", { className: "device-metrics" }, ...r.replies.map((reply) => reply.ok
        ? el("li", { text: reply.device_id + ": " + metricsText(reply.metrics) + " (" + reply.num_examples + " ex.)" })
        : el("li", { className: "failed", text: reply.device_id + ": failed — " + (reply.error || "no detail") })));
      const lost = r.dropped.concat(r.failed);
      return el("tr", { "data-round": r.round },
        el("th", { scope: "row", text: String(r.round) }),
        el("td", {}, el("span", { className: "badge " + (status === "done" ? "completed" : status === "running" ? "running" : ""), text: status })),
        el("td", { className: "num", text: r.round === 0 ? "–" : r.replied.length + " / " + r.sampled.length }),
        el("td", { text: lost.length ? lost.join(", ") : "–" }),
        el("td", { className: "num", text: fmt(num(r.train_loss)) }),
        el("td", { className: "num", text: pct(num(r.eval_accuracy)) }),
        el("td", { className: "num", text: fmt(num(r.eval_loss)) }),
        el("td", { className: "num", text: duration(r.duration) }),
        el("td", { className: "num", text: r.version ? "v" + r.version : "–" }),
        el("td", {}, r.replies.length ? perDevice : "–"));
    });
    replaceRows(document.querySelector("#rounds-table tbody"), rows, "No rounds yet.", 10);
  }

  function renderDevices() {
    const rows = state.devices.map((d) => el("tr", { "data-device": d.device_id },
      el("th", { scope: "row", text: d.device_id }),
      el("td", {}, el("span", { className: "badge state-" + deviceState(d).toLowerCase(), text: deviceState(d) })),
      el("td", { className: "num" }, d.serving_version ? "v" + d.serving_version : "none",
        d.unknown_version ? el("span", { className: "unknown-version", title: "The registry does not know this version: a release this cloud did not issue.", text: "unknown version" }) : null),
      el("td", { className: "num", title: new Date(d.last_seen_ms).toLocaleString(), text: ago(d.last_seen_ms / 1000) }),
      el("td", { className: "num", text: String(d.sample_count) }),
      el("td", { text: metricsText(d.last_metrics) + (d.last_error ? " · error: " + d.last_error : "") }),
      el("td", { text: d.profile || "–" }),
      el("td", { className: "num", text: "CPU " + d.cpu_percent.toFixed(0) + "% · RSS " + bytes(d.rss_bytes) + " · disk free " + bytes(d.disk_free_bytes) })));
    const filtered = Boolean(devicePage.q || devicePage.state);
    replaceRows(document.querySelector("#devices-table tbody"), rows,
      filtered ? "No device matches the filter." : "No device has reported yet.", 8);
    const first = devicePage.total ? devicePage.offset + 1 : 0;
    const last = devicePage.offset + state.devices.length;
    $("devices-range").textContent = devicePage.total
      ? first.toLocaleString("en-US") + "–" + last.toLocaleString("en-US") + " of " + devicePage.total.toLocaleString("en-US")
      : (filtered ? "no match" : "no devices");
    $("devices-prev").disabled = devicePage.offset === 0;
    $("devices-next").disabled = last >= devicePage.total;
  }

  function wireDeviceFilter() {
    let typing = null;
    const apply = () => {
      devicePage.offset = 0;
      devicePage.q = $("device-search").value.trim();
      devicePage.state = $("device-state").value;
      refreshDevices().catch((err) => console.warn("device list failed", err));
    };
    $("device-filter").addEventListener("submit", (event) => { event.preventDefault(); apply(); });
    $("device-search").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(apply, 250);
    });
    $("device-state").addEventListener("change", apply);
    $("devices-prev").addEventListener("click", () => {
      devicePage.offset = Math.max(0, devicePage.offset - DEVICE_PAGE);
      refreshDevices().catch((err) => console.warn("device list failed", err));
    });
    $("devices-next").addEventListener("click", () => {
      if (devicePage.offset + DEVICE_PAGE < devicePage.total) devicePage.offset += DEVICE_PAGE;
      refreshDevices().catch((err) => console.warn("device list failed", err));
    });
  }

  function renderModels() {
    const data = state.models;
    const versions = data ? data.versions : [];
    const current = data ? data.current : null;
    const newest = versions.length ? versions[0].version : 0;
    const rows = versions.map((v) => {
      const isCurrent = current && current.version === v.version;
      const label = v.version < newest ? "Roll back" : "Pin";
      const actions = el("div", { className: "actions" },
        el("a", { href: v.download_url, download: "", className: "download-link", "data-filename": "v" + v.version + ".edgefl", "aria-label": "Download version " + v.version, text: "Download" }),
        el("button", {
          type: "button", id: "pin-v" + v.version, className: "button button-small button-secondary pin-button",
          "data-version": v.version, "aria-label": label + " fleet to version " + v.version, text: label,
        }));
      return el("tr", { "data-version": v.version, className: isCurrent ? "is-current" : "" },
        el("th", { scope: "row" }, "v" + v.version, isCurrent ? " " : null,
          isCurrent ? el("span", { className: "badge " + (current.pinned ? "pinned" : "ok"), text: current.pinned ? "pinned" : "target" }) : null),
        el("td", { className: "num", text: v.run_id === null ? "–" : String(v.run_id) }),
        el("td", { className: "num", text: String(v.round) }),
        el("td", { text: v.architecture_id }),
        el("td", { text: metricsText(v.metrics) }),
        el("td", { className: "digest", title: v.sha256, text: v.sha256.slice(0, 16) + "…" }),
        el("td", { className: "num", text: bytes(v.size) }),
        el("td", { className: "num", text: v.spread.serving + " / " + v.spread.online + " online" }),
        el("td", { className: "num", text: ago(v.created_at) }),
        el("td", {}, actions));
    });
    replaceRows(document.querySelector("#models-table tbody"), rows, "No model version yet.", 10);
  }

  function renderRollouts() {
    const data = state.rollouts;
    $("rollout-policy").textContent = data
      ? "Policy: " + data.policy + (data.policy === "immediate" ? " (every round's model goes to the whole fleet at once)." : " (each phase is gated by the devices' own checks).")
      : "Rollouts are not available on this server (or need the operator token).";
    const all = data ? data.history.slice().reverse() : [];
    if (data && data.active && data.active.status === "running") all.unshift(data.active);
    const errors = (f) => (f.candidate_error_rate === null || f.candidate_error_rate === undefined) ? "" :
      ", inference errors " + fmt(f.served_error_rate, 3) + " → " + fmt(f.candidate_error_rate, 3);
    const accuracy = (f) => "accuracy " + fmt(f.served_accuracy, 3) + " → " + fmt(f.candidate_accuracy, 3) +
      " (drop " + fmt(f.accuracy_drop, 3) + ")" + errors(f) + ", " + f.failures + " failed";
    /** The last phase's gate figures; while it runs, its checks so far, after the figures
     * of the phase decided before it (so a passed phase's figures stay in view). */
    function gateFigures(phases) {
      const last = phases.length ? phases[phases.length - 1] : null;
      if (!last) return "–";
      if (last.figures) return accuracy(last.figures) + ", " + last.figures.silent + " silent";
      const parts = [];
      const decided = phases.slice(0, -1).filter((p) => p.figures).pop();
      if (decided) parts.push("phase " + decided.phase + ": " + accuracy(decided.figures));
      if (last.so_far && last.so_far.checked > 0) {
        parts.push("so far: " + accuracy(last.so_far) + ", " + last.so_far.pending + " pending");
      }
      return parts.length ? parts.join("; ") : "–";
    }
    const rows = all.map((r) => {
      const last = r.phases.length ? r.phases[r.phases.length - 1] : null;
      const figures = gateFigures(r.phases);
      const running = r.status === "running";
      const actions = running ? el("div", { className: "actions" },
        el("button", { type: "button", id: "promote-v" + r.version, className: "button button-small button-secondary rollout-button",
          "data-version": r.version, "data-action": "promote", "aria-label": "Promote version " + r.version + " to the whole fleet", text: "Promote" }),
        el("button", { type: "button", id: "halt-v" + r.version, className: "button button-small button-secondary rollout-button",
          "data-version": r.version, "data-action": "halt", "aria-label": "Halt the rollout of version " + r.version, text: "Halt" }))
        : null;
      return el("tr", { "data-version": r.version },
        el("th", { scope: "row" }, "v" + r.version + " (from v" + r.served_version + ")"),
        el("td", {}, el("span", { className: "badge " + (r.status === "promoted" ? "ok" : running ? "pinned" : ""), text: r.status })),
        el("td", { className: "num", text: r.phase + " / " + r.phase_count }),
        el("td", { className: "num", text: last ? last.checked.length + " / " + last.cohort.length : "–" }),
        el("td", { text: figures }),
        el("td", { text: last && last.reason ? last.reason : (running ? "checking…" : "–") }),
        el("td", { className: "num", text: ago(r.started_at) }),
        el("td", {}, actions));
    });
    replaceRows(document.querySelector("#rollouts-table tbody"), rows, "No rollout yet.", 8);
  }

  function renderEvents() {
    const items = state.events.map((e) => el("li", {},
      el("time", { datetime: new Date(e.timestamp_ms).toISOString(), text: new Date(e.timestamp_ms).toLocaleTimeString() }),
      el("span", { className: "kind", text: e.kind }),
      el("span", { text: e.device_id + (e.version ? " · v" + e.version : "") + (e.detail ? " · " + e.detail : "") })));
    $("events-list").replaceChildren(...(items.length ? items : [el("li", { className: "empty", text: "No events yet." })]));
  }

  // --- operator actions -------------------------------------------------------------------

  function showMessage(text, kind) {
    const box = $("action-message");
    box.hidden = false;
    box.className = "notice " + kind;
    box.setAttribute("role", kind === "error" ? "alert" : "status");
    box.textContent = text;
  }

  async function operatorAction(path, what) {
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    let response;
    try {
      response = await fetch(path, { method: "POST", headers: headers });
    } catch (err) {
      showMessage(what + " failed: the server cannot be reached.", "error");
      return;
    }
    let body = {};
    try { body = await response.json(); } catch (err) { body = {}; }
    if (response.ok) {
      showMessage(body.message || what + " done.", "success");
      scheduleRefresh();
    } else if (response.status === 401) {
      showMessage(what + " refused: " + (token ? "the operator token is wrong." : "enter the operator token first.") + " (401)", "error");
      $("operator-token").focus();
    } else if (response.status === 503) {
      showMessage(what + " refused: write actions are disabled on this server (no operator token configured).", "error");
    } else {
      showMessage(what + " failed: " + (body.detail || response.statusText) + " (" + response.status + ")", "error");
    }
  }

  function wireControls() {
    const input = $("operator-token");
    input.value = sessionStorage.getItem(TOKEN_KEY) || "";
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (value) { sessionStorage.setItem(TOKEN_KEY, value); showMessage("Token saved for this tab.", "success"); }
      else { sessionStorage.removeItem(TOKEN_KEY); showMessage("Token cleared.", "success"); }
    });
    $("forget-token").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY); input.value = ""; showMessage("Token forgotten.", "success");
    });
    document.querySelector("#models-table tbody").addEventListener("click", (event) => {
      const link = event.target.closest("a.download-link");
      if (link) { event.preventDefault(); download(link); return; }
      const button = event.target.closest("button.pin-button");
      if (!button) return;
      const version = button.getAttribute("data-version");
      operatorAction("/api/models/" + encodeURIComponent(version) + "/pin", button.textContent + " to v" + version);
    });
    document.querySelector("#rollouts-table tbody").addEventListener("click", (event) => {
      const button = event.target.closest("button.rollout-button");
      if (!button) return;
      const version = button.getAttribute("data-version");
      const action = button.getAttribute("data-action");
      operatorAction("/api/rollouts/" + encodeURIComponent(version) + "/" + action, button.textContent + " v" + version);
    });
    $("start-run").addEventListener("click", () => operatorAction("/api/runs/start", "Start run"));
    $("stop-run").addEventListener("click", () => operatorAction("/api/runs/stop", "Stop run"));
  }

  // --- live updates -----------------------------------------------------------------------

  function setConnection(text, cls) {
    $("connection").className = "connection " + cls;
    $("connection-text").textContent = text;
  }

  function connect() {
    if (!("EventSource" in window)) {
      setConnection("Polling", "live");
      setInterval(() => refreshAll().catch(() => setConnection("Offline", "down")), 5000);
      return;
    }
    const source = new EventSource("/api/stream");
    source.addEventListener("open", () => setConnection("Live", "live"));
    source.addEventListener("error", () => setConnection("Reconnecting…", "down"));
    source.addEventListener("overview", (event) => {
      setConnection("Live", "live");
      state.overview = JSON.parse(event.data);
      renderOverview();
      scheduleRefresh();
    });
    source.addEventListener("heartbeat", () => setConnection("Live", "live"));
  }

  document.addEventListener("DOMContentLoaded", () => {
    wireControls();
    wireDeviceFilter();
    refreshAll().catch((err) => { console.warn(err); setConnection("Server unreachable", "down"); });
    connect();
    // Relative times ("12 s ago") age even when nothing changes.
    setInterval(() => { renderDevices(); }, 10000);
  });
})();
