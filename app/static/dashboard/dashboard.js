// paramserver's dashboard: polls GET /stats every POLL_MS, draws the sessions' table, a chart
// per session of a reported metric (the loss by default) against iterations and one of the
// push latency (p50 and p99, a history this page keeps from successive polls).
//
// Rules this file keeps (the server sends a Content-Security-Policy of default-src 'self'):
// no innerHTML, no eval, no inline style; every session id and metric name reaches the page
// through textContent or setAttribute, and a URL only through encodeURIComponent. With tokens
// configured the data answers 401: the page asks for a token, keeps it in sessionStorage (this
// tab only) and sends it as an Authorization header, never in a URL.
"use strict";

(() => {
  const POLL_MS = 2000;
  const SUMMARIES_MS = 10000; // GET /sessions (optimizer configs, parameters): less often
  const HIDDEN_POLL_MS = 10000; // a tab in the background polls less
  const MAX_CHARTED = 12; // sessions with charts (the most recently pushed); the table has all
  const MAX_POINTS = 10000; // metric points kept per session (what the server keeps at most)
  const MAX_LATENCY = 300; // latency samples kept per session: 10 minutes at POLL_MS
  const TOKEN_KEY = "paramserver.dashboard.token";
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    forget: $("forget-token"),
    prompt: $("token-prompt"),
    form: $("token-form"),
    input: $("token-input"),
    message: $("token-message"),
    overview: $("overview"),
    serverSessions: $("server-sessions"),
    serverHeld: $("server-held"),
    serverRate: $("server-rate"),
    serverUpdated: $("server-updated"),
    sessionsSection: $("sessions-section"),
    tbody: $("sessions-body"),
    noSessions: $("no-sessions"),
    chartsSection: $("charts-section"),
    chartsNote: $("charts-note"),
    charts: $("charts"),
  };

  /** Per session id: its table row, its chart card, its metric points and latency history. */
  const sessions = new Map();
  let summaries = new Map(); // session id -> GET /sessions summary
  let summariesAt = 0;
  let timer = null;
  let polling = false;
  let waitingForToken = false;

  // --- the token ---------------------------------------------------------------------------

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (_) {
      return null; // storage disabled: the page still works without tokens
    }
  }

  function storeToken(token) {
    try {
      if (token === null) sessionStorage.removeItem(TOKEN_KEY);
      else sessionStorage.setItem(TOKEN_KEY, token);
    } catch (_) {
      /* nothing to keep it in */
    }
    ui.forget.hidden = token === null;
  }

  class Unauthorized extends Error {}

  function askForToken(message) {
    waitingForToken = true;
    stopPolling();
    ui.message.textContent = message;
    ui.prompt.hidden = false;
    for (const section of [ui.overview, ui.sessionsSection, ui.chartsSection]) section.hidden = true;
    setStatus("a token is needed", "warn");
    ui.input.value = "";
    ui.input.focus();
  }

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault(); // never a navigation: the token would land in a URL
    const token = ui.input.value.trim();
    ui.input.value = "";
    if (!token) return;
    if (!/^[\x20-\x7e]+$/.test(token)) {
      ui.message.textContent = "A token is printable ASCII (what a header can carry); try again.";
      ui.input.focus();
      return;
    }
    storeToken(token);
    ui.prompt.hidden = true;
    waitingForToken = false;
    summariesAt = 0;
    poll();
  });

  ui.forget.addEventListener("click", () => {
    storeToken(null);
    askForToken("Token forgotten. Enter one to see the server again.");
  });

  // --- the server's API ----------------------------------------------------------------------

  /** GET a JSON document at a path relative to this page (so a path prefix is kept). */
  async function api(path) {
    const headers = { Accept: "application/json" };
    const token = storedToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(path, {
        headers,
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
        referrerPolicy: "no-referrer",
      });
    } catch (error) {
      throw new Error(`cannot reach the server (${error.message})`);
    }
    if (response.status === 401) throw new Unauthorized();
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const body = await response.json();
        if (body && body.error && body.error.message) message += `: ${body.error.message}`;
      } catch (_) {
        /* not a JSON error body */
      }
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  const metricsPath = (id, name, since) =>
    `sessions/${encodeURIComponent(id)}/metrics?name=${encodeURIComponent(name)}` +
    `&since_iterations=${since}&limit=${MAX_POINTS}`;

  // --- polling -------------------------------------------------------------------------------

  function stopPolling() {
    if (timer !== null) clearTimeout(timer);
    timer = null;
  }

  function schedule() {
    stopPolling();
    if (!waitingForToken) timer = setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !waitingForToken && !polling) poll();
  });

  async function poll() {
    if (polling) return;
    polling = true;
    stopPolling();
    try {
      const stats = await api("stats");
      if (waitingForToken) return; // the token was forgotten while this poll was out
      const now = Date.now();
      if (now - summariesAt > SUMMARIES_MS || stats.sessions.some((s) => !summaries.has(s.session_id))) {
        summariesAt = now;
        await loadSummaries();
      }
      if (waitingForToken) return;
      render(stats, now);
      await Promise.all(
        charted(stats).map((s) =>
          loadPoints(sessions.get(s.session_id), s).catch((error) => {
            if (error instanceof Unauthorized) throw error;
            // e.g. 404: deleted since /stats answered; the next poll drops it
          })
        )
      );
      for (const s of charted(stats)) drawCharts(sessions.get(s.session_id), now);
      setStatus(`live, every ${POLL_MS / 1000} s`, "ok");
    } catch (error) {
      if (error instanceof Unauthorized) {
        const hadToken = storedToken() !== null;
        storeToken(null);
        askForToken(
          hadToken
            ? "The server refused that token (401). Enter a valid token."
            : "The server answers only requests with a bearer token."
        );
      } else {
        setStatus(`${error.message}; retrying`, "error");
      }
    } finally {
      polling = false;
      schedule();
    }
  }

  async function loadSummaries() {
    try {
      const body = await api("sessions");
      summaries = new Map(body.sessions.map((s) => [s.session_id, s]));
    } catch (error) {
      if (error instanceof Unauthorized) throw error;
      /* the table still renders from /stats */
    }
  }

  function setStatus(text, kind) {
    ui.status.textContent = text;
    ui.status.className = `status status-${kind}`;
  }

  /** The sessions that get charts: the MAX_CHARTED most recently pushed, in the table's order
   * (so that cards of sessions training together do not trade places at every poll). */
  function charted(stats) {
    if (stats.sessions.length <= MAX_CHARTED) return stats.sessions;
    const age = (s) => (s.last_push_age_seconds === null ? Infinity : s.last_push_age_seconds);
    const recent = [...stats.sessions].sort((a, b) => age(a) - age(b)).slice(0, MAX_CHARTED);
    const ids = new Set(recent.map((s) => s.session_id));
    return stats.sessions.filter((s) => ids.has(s.session_id));
  }

  // --- the table -----------------------------------------------------------------------------

  function render(stats, now) {
    ui.prompt.hidden = true;
    ui.overview.hidden = false;
    ui.sessionsSection.hidden = false;
    ui.forget.hidden = storedToken() === null;

    const seen = new Set();
    stats.sessions.forEach((s, index) => {
      seen.add(s.session_id);
      let entry = sessions.get(s.session_id);
      if (!entry) {
        entry = newEntry(s.session_id);
        sessions.set(s.session_id, entry);
      }
      if (s.iterations < entry.lastIterations) resetPoints(entry); // deleted and created anew
      entry.lastIterations = s.iterations;
      entry.stats = s;
      fillRow(entry, s);
      if (ui.tbody.children[index] !== entry.row) ui.tbody.insertBefore(entry.row, ui.tbody.children[index] || null);
      recordLatency(entry, s, now);
    });
    for (const [id, entry] of sessions) {
      if (!seen.has(id)) {
        entry.row.remove();
        entry.card.remove();
        sessions.delete(id);
      }
    }
    ui.noSessions.hidden = stats.sessions.length > 0;

    const chartedIds = charted(stats).map((s) => s.session_id);
    ui.chartsSection.hidden = chartedIds.length === 0;
    chartedIds.forEach((id, index) => {
      const card = sessions.get(id).card;
      if (ui.charts.children[index] !== card) ui.charts.insertBefore(card, ui.charts.children[index] || null);
    });
    for (const [id, entry] of sessions) if (!chartedIds.includes(id)) entry.card.remove();
    ui.chartsNote.hidden = stats.sessions.length <= MAX_CHARTED;
    ui.chartsNote.textContent = `Charts for the ${MAX_CHARTED} most recently pushed of ${stats.sessions.length} sessions.`;

    ui.serverSessions.textContent = String(stats.server.sessions);
    ui.serverHeld.textContent = formatBytes(stats.server.held_bytes);
    const rate = stats.sessions.reduce((sum, s) => sum + s.steps_per_second, 0);
    ui.serverRate.textContent = formatNumber(rate);
    ui.serverUpdated.textContent = new Date(now).toLocaleTimeString();
  }

  function newEntry(id) {
    const row = document.createElement("tr");
    row.dataset.sessionId = id;
    const cells = {};
    for (const key of ["id", "optimizer", "mode", "iterations", "rate", "p50", "p99", "age", "in", "out", "held"]) {
      const cell = document.createElement(key === "id" ? "th" : "td");
      if (key === "id") cell.scope = "row";
      else if (!["optimizer", "mode"].includes(key)) cell.className = "num";
      cell.dataset.field = key;
      cells[key] = cell;
      row.append(cell);
    }
    const entry = {
      id,
      row,
      cells,
      card: null,
      stats: null,
      metric: null, // the metric name charted
      points: [], // [iterations, value] of that metric, oldest first
      since: -1, // the last iterations fetched
      fetchedAt: -1, // the session's iterations at the last fetch
      lastIterations: 0,
      latency: [], // [time ms, p50 s, p99 s]
    };
    buildCard(entry);
    return entry;
  }

  function fillRow(entry, s) {
    const c = entry.cells;
    const summary = summaries.get(s.session_id);
    c.id.textContent = s.session_id;
    c.optimizer.textContent = s.optimizer;
    c.optimizer.title = summary ? describeOptimizer(summary.optimizer) : "";
    c.mode.textContent = describeMode(s.training, summary);
    c.iterations.textContent = s.iterations.toLocaleString();
    c.rate.textContent = formatNumber(s.steps_per_second);
    c.p50.textContent = formatSeconds(s.push_seconds_p50);
    c.p99.textContent = formatSeconds(s.push_seconds_p99);
    c.age.textContent = formatAge(s.last_push_age_seconds);
    c.in.textContent = formatBytes(s.bytes_in);
    c.out.textContent = formatBytes(s.bytes_out);
    c.held.textContent = formatBytes(s.held_bytes);
    c.held.title = summary ? describeParameters(summary.parameters) : "";
    entry.row.classList.toggle("idle", s.last_push_age_seconds === null || s.last_push_age_seconds > 60);
  }

  function describeOptimizer(optimizer) {
    if (!optimizer || !optimizer.config) return "";
    const parts = Object.entries(optimizer.config).map(([k, v]) => `${k}=${JSON.stringify(v)}`);
    return `${optimizer.class_name}(${parts.join(", ")})`;
  }

  function describeMode(training, summary) {
    let text = "async";
    if (training && training.mode === "sync") {
      text = `sync ${training.replicas_to_aggregate}/${training.total_num_replicas}`;
    } else if (training && training.max_staleness != null) {
      text = `async, staleness ≤ ${training.max_staleness}`;
    }
    if (summary && summary.shard) text += `, shard ${summary.shard.index + 1}/${summary.shard.count}`;
    return text;
  }

  function describeParameters(parameters) {
    if (!parameters) return "";
    const entries = Object.values(parameters);
    const elements = entries.reduce((sum, p) => sum + p.shape.reduce((a, b) => a * b, 1), 0);
    return `${entries.length} tensors, ${elements.toLocaleString()} parameters`;
  }

  // --- the charts' data ----------------------------------------------------------------------

  function recordLatency(entry, s, now) {
    if (s.push_seconds_p50 === null) return; // no push in the last minute: a gap, not a zero
    entry.latency.push([now, s.push_seconds_p50, s.push_seconds_p99]);
    if (entry.latency.length > MAX_LATENCY) entry.latency.splice(0, entry.latency.length - MAX_LATENCY);
  }

  function resetPoints(entry) {
    entry.points = [];
    entry.since = -1;
    entry.fetchedAt = -1;
  }

  /** The metric to chart: the one picked, else "loss", else the first reported. */
  function chooseMetric(entry, names) {
    if (entry.metric !== null && names.includes(entry.metric)) return entry.metric;
    if (names.includes("loss")) return "loss";
    return names.length ? names[0] : null;
  }

  async function loadPoints(entry, s) {
    updatePicker(entry, s.metric_names);
    const metric = chooseMetric(entry, s.metric_names);
    if (metric !== entry.metric) {
      entry.metric = metric;
      resetPoints(entry);
      entry.picker.value = metric === null ? "" : metric;
    }
    if (metric === null || s.iterations === entry.fetchedAt) return; // nothing new
    const body = await api(metricsPath(entry.id, metric, entry.since));
    if (entry.metric !== metric) return; // another metric was picked meanwhile
    for (const point of body.points) {
      if (point.name !== metric || point.iterations <= entry.since) continue;
      entry.points.push([point.iterations, point.value]);
    }
    if (entry.points.length > MAX_POINTS) entry.points.splice(0, entry.points.length - MAX_POINTS);
    if (entry.points.length) entry.since = entry.points[entry.points.length - 1][0];
    entry.fetchedAt = s.iterations;
  }

  function updatePicker(entry, names) {
    const current = [...entry.picker.options].map((o) => o.value);
    if (current.length === names.length && current.every((n, i) => n === names[i])) return;
    entry.picker.replaceChildren(
      ...names.map((name) => {
        const option = document.createElement("option");
        option.value = name;
        option.textContent = name;
        return option;
      })
    );
    entry.picker.disabled = names.length < 2;
    entry.picker.parentElement.hidden = names.length === 0;
    if (entry.metric !== null) entry.picker.value = entry.metric;
  }

  // --- the charts ----------------------------------------------------------------------------

  function buildCard(entry) {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.sessionId = entry.id;

    const head = document.createElement("header");
    head.className = "card-head";
    const title = document.createElement("h3");
    title.textContent = entry.id;
    const label = document.createElement("label");
    label.className = "picker";
    label.append("metric ");
    const picker = document.createElement("select");
    picker.addEventListener("change", () => {
      entry.metric = picker.value;
      resetPoints(entry);
      if (!polling) poll();
    });
    label.append(picker);
    label.hidden = true; // until the session reports a metric
    const logLabel = document.createElement("label");
    logLabel.className = "picker";
    const log = document.createElement("input");
    log.type = "checkbox";
    log.addEventListener("change", () => drawCharts(entry, Date.now()));
    logLabel.append(log, " log scale");
    head.append(title, label, logLabel);

    const metricChart = chartElement("metric-chart");
    const latencyChart = chartElement("latency-chart");
    card.append(head, metricChart.figure, latencyChart.figure);
    Object.assign(entry, { card, picker, log, metricChart, latencyChart });
  }

  function chartElement(kind) {
    const figure = document.createElement("figure");
    figure.className = `chart ${kind}`;
    const head = document.createElement("figcaption");
    const caption = document.createElement("span");
    caption.className = "caption-text";
    const legend = document.createElement("span");
    legend.className = "legend";
    head.append(caption, legend);
    const svg = document.createElementNS(SVG_NS, "svg");
    svg.setAttribute("viewBox", `0 0 ${CHART.width} ${CHART.height}`);
    svg.setAttribute("role", "img");
    svg.classList.add("chart-svg");
    svg.dataset.points = "0";
    figure.append(head, svg);
    return { figure, caption, legend, svg };
  }

  function drawCharts(entry, now) {
    if (!entry.card.isConnected) return;
    const metric = entry.metric;
    const useLog = entry.log.checked && entry.points.every((p) => p[1] > 0);
    entry.metricChart.caption.textContent =
      metric === null ? "Reported metric" : `${metric} by iteration${useLog ? " (log scale)" : ""}`;
    drawChart(entry.metricChart, {
      series: metric === null ? [] : [{ name: metric, points: entry.points, className: "line-metric" }],
      xLabel: "iterations",
      xStep: 1,
      formatX: (x) => formatNumber(x, 0),
      formatY: (y) => formatNumber(y),
      log: useLog,
      empty:
        metric === null
          ? 'no metrics reported yet: session.push(grads, metrics={"loss": ...})'
          : "no points yet",
    });

    const start = now - MAX_LATENCY * POLL_MS;
    const shown = entry.latency.filter((p) => p[0] >= start);
    // at least the last minute, up to the oldest sample kept, "now" on the right
    const span = Math.max(60, shown.length ? (now - shown[0][0]) / 1000 : 0);
    entry.latencyChart.caption.textContent =
      `Push latency (ms): p50 and p99 of the last minute, at each poll${entry.log.checked ? " (log scale)" : ""}`;
    drawChart(entry.latencyChart, {
      series: [
        { name: "p50", points: shown.map((p) => [(p[0] - now) / 1000, p[1] * 1000]), className: "line-p50" },
        { name: "p99", points: shown.map((p) => [(p[0] - now) / 1000, p[2] * 1000]), className: "line-p99" },
      ],
      xLabel: "seconds ago",
      xDomain: [-span, 0],
      formatX: (x) => formatNumber(Math.abs(x), 0),
      formatY: (y) => formatNumber(y),
      unit: " ms",
      log: entry.log.checked,
      empty: "no push in the last minute",
    });
  }

  const CHART = { width: 560, height: 220, left: 56, right: 12, top: 12, bottom: 36 };

  function svgElement(name, attributes, text) {
    const element = document.createElementNS(SVG_NS, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    if (text !== undefined) element.textContent = text;
    return element;
  }

  /** Lines of [x, y] points with axes and ticks, drawn into the chart's svg anew; its legend
   * shows each series' last value. */
  function drawChart(chart, { series, xLabel, formatX, formatY, unit = "", log, empty, xDomain, xStep }) {
    const svg = chart.svg;
    chart.legend.replaceChildren(
      ...series
        .filter((s) => s.points.length > 0)
        .map((s) => {
          const item = document.createElement("span");
          item.className = `legend-item ${s.className}`;
          const swatch = document.createElement("span");
          swatch.className = "swatch";
          item.append(swatch, `${s.name} ${formatY(s.points[s.points.length - 1][1])}${unit}`);
          return item;
        })
    );
    const { width, height, left, right, top, bottom } = CHART;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const all = series.flatMap((s) => s.points);
    const children = [];
    svg.dataset.points = String(all.length);
    svg.dataset.series = series.map((s) => `${s.name}:${s.points.length}`).join(" ");
    svg.setAttribute("aria-label", `${series.map((s) => s.name).join(", ") || "no data"}: ${all.length} points`);

    children.push(svgElement("rect", { class: "plot", x: left, y: top, width: plotW, height: plotH }));
    if (all.length === 0) {
      children.push(svgElement("text", { class: "empty", x: left + plotW / 2, y: top + plotH / 2 }, empty));
      svg.replaceChildren(...children);
      return;
    }
    log = log && all.every((p) => p[1] > 0);
    const ty = log ? Math.log10 : (y) => y;
    let [x0, x1] = xDomain || extent(all.map((p) => p[0]));
    let [y0, y1] = extent(all.map((p) => ty(p[1])));
    if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
    if (y0 === y1) [y0, y1] = [y0 - (Math.abs(y0) || 1) * 0.1, y1 + (Math.abs(y1) || 1) * 0.1];
    const yTicks = log ? logTicks(y0, y1) : niceTicks(y0, y1, 5);
    if (!log) [y0, y1] = [Math.min(y0, yTicks[0]), Math.max(y1, yTicks[yTicks.length - 1])];
    const sx = (x) => left + ((x - x0) / (x1 - x0)) * plotW;
    const sy = (y) => top + plotH - ((ty(y) - y0) / (y1 - y0)) * plotH;

    for (const t of yTicks) {
      const y = top + plotH - ((t - y0) / (y1 - y0)) * plotH;
      if (y < top - 0.5 || y > top + plotH + 0.5) continue;
      children.push(svgElement("line", { class: "grid", x1: left, x2: left + plotW, y1: y, y2: y }));
      children.push(
        svgElement("text", { class: "tick tick-y", x: left - 6, y: y + 4 }, formatY(log ? 10 ** t : t))
      );
    }
    for (const t of niceTicks(x0, x1, 6, xStep)) {
      if (t < x0 || t > x1) continue;
      const x = sx(t);
      children.push(svgElement("line", { class: "grid", x1: x, x2: x, y1: top, y2: top + plotH }));
      children.push(svgElement("text", { class: "tick tick-x", x, y: top + plotH + 16 }, formatX(t)));
    }
    children.push(svgElement("text", { class: "axis-label", x: left + plotW / 2, y: height - 4 }, xLabel));

    for (const s of series) {
      if (s.points.length === 0) continue;
      const coordinates = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      const line = svgElement("polyline", { class: `line ${s.className}`, points: coordinates });
      line.dataset.name = s.name;
      line.dataset.points = String(s.points.length);
      children.push(line);
      if (s.points.length === 1) {
        const [x, y] = s.points[0];
        children.push(svgElement("circle", { class: `dot ${s.className}`, cx: sx(x), cy: sy(y), r: 3 }));
      }
    }
    svg.replaceChildren(...children);
  }

  function extent(values) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of values) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    return [lo, hi];
  }

  /** About `count` round values (1, 2 or 5 times a power of ten apart, at least `minStep`)
   * covering [lo, hi]. */
  function niceTicks(lo, hi, count, minStep = 0) {
    const raw = Math.max((hi - lo) / count, minStep);
    const power = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let t = Math.floor(lo / step) * step; t <= hi + step * 0.5; t += step) {
      ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
      if (ticks.length > 50) break;
    }
    return ticks;
  }

  /** Powers of ten (exponents) covering [lo, hi] (log10 values), at most ~6 of them. */
  function logTicks(lo, hi) {
    const first = Math.floor(lo);
    const last = Math.ceil(hi);
    const stride = Math.max(1, Math.ceil((last - first) / 6));
    const ticks = [];
    for (let e = first; e <= last; e += stride) ticks.push(e);
    return ticks;
  }

  // --- formats -------------------------------------------------------------------------------

  function formatNumber(value, digits) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    if (digits !== undefined) return value.toLocaleString(undefined, { maximumFractionDigits: digits });
    const magnitude = Math.abs(value);
    if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e6)) return value.toExponential(2);
    return value.toLocaleString(undefined, { maximumSignificantDigits: 4 });
  }

  function formatSeconds(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1) return `${formatNumber(seconds * 1000)} ms`;
    return `${formatNumber(seconds)} s`;
  }

  function formatAge(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    if (seconds < 60) return `${seconds.toFixed(1)} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h ago`;
    return `${(seconds / 86400).toFixed(1)} d ago`;
  }

  function formatBytes(bytes) {
    if (bytes === null || bytes === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
  }

  ui.forget.hidden = storedToken() === null;
  poll();
})();
