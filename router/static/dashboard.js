/* The cost dashboard: reads this router's usage API and draws it, every 5 seconds.
 *
 * Plain JavaScript, no framework and no network but this router (the page's
 * Content-Security-Policy allows nothing else). Charts are inline SVG.
 *
 * Numbers are formatted by fixed rules, not by the browser's locale, so that what the page
 * shows can be compared with the API (tests/test_dashboard.py does):
 *
 *   counts and tokens   whole number, "," between thousands           1,234,567
 *   money (US dollars)  "$", 4 decimals, "," between thousands        $1,234.5678
 *   shares and rates    percent, 1 decimal                            75.0%
 *   latency             milliseconds, 1 decimal, " ms"                123.4 ms
 *   throughput          tokens per second, 1 decimal                  41.7
 *   no value            (nothing in the window to measure)            —
 *
 * Decimals are rounded half up on the number's exact value (Number.prototype.toFixed).
 *
 * Elements that show numbers carry data-field (the cards, and the cells of the agents
 * table, whose rows carry data-agent); the histograms' bars carry data-bucket and
 * data-count; #status carries data-state (loading, ok, error), data-renders (how many
 * times the API's answers were drawn) and data-window (the window they are of).
 */
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const TIMEOUT_MS = 10000;
  // A window and how many buckets its charts have: 30 s, 1 min, 30 min and 2 h.
  const BUCKETS = { "15m": 30, "1h": 60, "24h": 48, "7d": 84 };
  const DEFAULT_WINDOW = "24h";
  const DASH = "—";
  // The SVG namespace is a name, never fetched.
  const SVG_NS = "http://www.w3.org/2000/svg";
  const DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

  // --- number formats (see the top of this file) -------------------------------------

  function grouped(digits) {
    return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  function fixed(value, decimals) {
    const [whole, fraction] = value.toFixed(decimals).split(".");
    return grouped(whole) + (fraction ? `.${fraction}` : "");
  }

  const missing = (value) => value === null || value === undefined;
  const fmt = {
    count: (n) => (missing(n) ? DASH : fixed(n, 0)),
    money: (n) => (missing(n) ? DASH : `$${fixed(n, 4)}`),
    share: (n) => (missing(n) ? DASH : `${fixed(n * 100, 1)}%`),
    ms: (n) => (missing(n) ? DASH : `${fixed(n, 1)} ms`),
    rate: (n) => (missing(n) ? DASH : fixed(n, 1)),
  };

  // Axis labels only: short, not compared with anything.
  function compact(n) {
    const short = (x) => String(Number(x.toFixed(1)));
    if (n >= 1e6) return `${short(n / 1e6)}M`;
    if (n >= 1e3) return `${short(n / 1e3)}k`;
    return short(n);
  }

  const pad2 = (n) => String(n).padStart(2, "0");

  function timeLabel(date, bucketSeconds) {
    const clock = `${pad2(date.getHours())}:${pad2(date.getMinutes())}`;
    return bucketSeconds >= 3600 ? `${DAYS[date.getDay()]} ${clock}` : clock;
  }

  function duration(seconds) {
    if (seconds < 60) return `${Math.round(seconds)} s`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
    return `${Number((seconds / 3600).toFixed(1))} h`;
  }

  function msBound(ms) {
    return ms < 1000 ? String(ms) : `${ms / 1000}s`;
  }

  // --- the DOM ---------------------------------------------------------------------

  function node(tag, attrs = {}, text = null, ns = null) {
    const made = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (!missing(value)) made.setAttribute(name, value);
    }
    if (text !== null) made.textContent = text;
    return made;
  }

  const svg = (tag, attrs, text = null) => node(tag, attrs, text, SVG_NS);

  function setField(name, text) {
    for (const cell of document.querySelectorAll(`.cards [data-field="${name}"]`)) {
      cell.textContent = text;
    }
  }

  function setStatus(state, text) {
    const status = document.getElementById("status");
    status.dataset.state = state;
    document.getElementById("status-text").textContent = text;
  }

  // --- reading the API ------------------------------------------------------------

  function errorMessage(body) {
    const error = body && body.error;
    if (typeof error === "string") return error; // {"error": "message"}
    return error && error.message; // {"error": {"message": ...}}
  }

  async function getJSON(path) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      const response = await fetch(path, {
        signal: controller.signal,
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      const body = await response.json().catch(() => null);
      if (!response.ok) throw new Error(errorMessage(body) || `HTTP ${response.status}`);
      return body;
    } catch (error) {
      throw error.name === "AbortError" ? new Error(`${path}: no answer in 10 s`) : error;
    } finally {
      clearTimeout(timer);
    }
  }

  // --- the cards ------------------------------------------------------------------

  function renderSummary(s) {
    const tokens = s.local_tokens + s.cloud_tokens;
    setField("tokens", fmt.count(tokens));
    setField("tokens-local", fmt.count(s.local_tokens));
    setField("tokens-cloud", fmt.count(s.cloud_tokens));
    setField("cost", fmt.money(s.cost));
    setField("calls-cloud", fmt.count(s.cloud_calls));
    setField("saved", fmt.money(s.saved));
    setField("would-have-cost", fmt.money(s.would_have_cost));
    setField("embedding-calls", fmt.count(s.embedding_calls));
    setField("embedding-tokens", fmt.count(s.embedding_tokens));
    setField("embedding-would-have-cost", fmt.money(s.embedding_would_have_cost));
    setField("local-share", fmt.share(s.local_share));
    setField("calls-local", fmt.count(s.local_calls));
    setField("calls", fmt.count(s.calls));
    setField("fallback-rate", fmt.share(s.fallback_rate));
    setField("fallbacks", fmt.count(s.fallbacks));
    setField("routed", fmt.count(s.routed));
    setField("spills", fmt.count(s.spills));
    setField("error-rate", fmt.share(s.error_rate));
    setField("errors", fmt.count(s.errors));
    const split = document.getElementById("tokens-split");
    split.parentElement.classList.toggle("empty", tokens === 0);
    split.style.width = tokens ? `${(100 * s.local_tokens) / tokens}%` : "0";
  }

  // --- charts ---------------------------------------------------------------------

  function niceScale(peak) {
    if (!(peak > 0)) return { top: 4, step: 1 };
    const raw = peak / 4;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const norm = raw / magnitude;
    let step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * magnitude;
    step = Math.max(1, step); // whole tokens and counts
    return { top: Math.ceil(peak / step) * step, step };
  }

  /* Bars per time bucket: stacked (tokens) or side by side (fallbacks, errors). */
  function barChart(container, { buckets, bucketSeconds, series, stacked, unit }) {
    const width = Math.max(280, container.clientWidth);
    const height = Math.max(160, container.clientHeight);
    const m = { top: 10, right: 6, bottom: 24, left: 44 };
    const plotW = width - m.left - m.right;
    const plotH = height - m.top - m.bottom;
    const sizes = buckets.map((b) =>
      stacked
        ? series.reduce((sum, s) => sum + b[s.key], 0)
        : Math.max(...series.map((s) => b[s.key])),
    );
    const peak = Math.max(0, ...sizes);
    const { top, step } = niceScale(peak);
    const y = (value) => m.top + plotH - (value / top) * plotH;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });

    const grid = svg("g", { class: "grid" });
    for (let k = 0; k * step <= top; k += 1) {
      const at = y(k * step);
      grid.append(svg("line", { x1: m.left, x2: width - m.right, y1: at, y2: at }));
      grid.append(
        svg("text", { x: m.left - 6, y: at + 4, "text-anchor": "end" }, compact(k * step)),
      );
    }
    chart.append(grid);

    const band = plotW / buckets.length;
    const inner = Math.max(1, band * 0.76);
    buckets.forEach((bucket, i) => {
      const x0 = m.left + i * band;
      const start = new Date(bucket.start);
      const end = new Date(start.getTime() + bucketSeconds * 1000);
      const group = svg("g", { class: "band" });
      group.append(svg("rect", { class: "hover", x: x0, y: m.top, width: band, height: plotH }));
      let base = 0;
      series.forEach((s, j) => {
        const value = bucket[s.key];
        if (!value) return;
        const w = stacked ? inner : inner / series.length;
        const x = x0 + (band - inner) / 2 + (stacked ? 0 : j * w);
        const from = stacked ? base : 0;
        const h = Math.max(1.5, y(from) - y(from + value)); // one call still shows
        group.append(svg("rect", { class: s.cls, x, y: y(from) - h, width: w, height: h }));
        base += value;
      });
      const parts = series.map((s) => `${s.label} ${fmt.count(bucket[s.key])}`).join(" · ");
      const when = `${timeLabel(start, bucketSeconds)}–${timeLabel(end, bucketSeconds)}`;
      group.append(svg("title", {}, `${when}: ${parts} ${unit}`));
      chart.append(group);
    });

    const every = Math.max(1, Math.ceil(buckets.length / 6));
    buckets.forEach((bucket, i) => {
      if (i % every) return;
      const x = m.left + i * band + band / 2;
      const label = timeLabel(new Date(bucket.start), bucketSeconds);
      chart.append(svg("text", { x, y: height - 6, "text-anchor": "middle" }, label));
    });
    chart.append(svg("line", { class: "baseline", x1: m.left, x2: width - m.right, y1: y(0), y2: y(0) }));
    if (!peak) {
      const attrs = { x: m.left + plotW / 2, y: m.top + plotH / 2, "text-anchor": "middle" };
      chart.append(svg("text", { ...attrs, class: "empty-note" }, "Nothing in this window"));
    }
    container.replaceChildren(chart);
  }

  function renderSeries(series) {
    const buckets = series.buckets;
    for (const label of document.querySelectorAll("[data-bucket-size]")) {
      label.textContent = `per ${duration(series.bucket_seconds)}`;
    }
    barChart(document.getElementById("chart-tokens"), {
      buckets,
      bucketSeconds: series.bucket_seconds,
      stacked: true,
      unit: "tokens",
      series: [
        { key: "local_tokens", cls: "local", label: "local" },
        { key: "cloud_tokens", cls: "cloud", label: "cloud" },
      ],
    });
    barChart(document.getElementById("chart-incidents"), {
      buckets,
      bucketSeconds: series.bucket_seconds,
      stacked: false,
      unit: "",
      series: [
        { key: "fallbacks", cls: "fallback", label: "fallbacks" },
        { key: "errors", cls: "error", label: "errors" },
      ],
    });
  }

  /* One agent's latency histogram: a bar per bucket, its count above it. */
  function histogram(container, agent, bounds) {
    const counts = agent.latency_histogram;
    const labels = bounds.map((b) => `≤${msBound(b)}`);
    labels.push(`>${msBound(bounds[bounds.length - 1])}`);
    const card = node("div", { class: "histogram", "data-agent": agent.agent_id });
    const head = node("div", { class: "histogram-head" });
    head.append(node("h3", {}, agent.agent_id));
    const p = (name, value) => `${name} ${fmt.ms(value)}`;
    const percentiles = [
      p("p50", agent.latency_p50_ms),
      p("p95", agent.latency_p95_ms),
      p("p99", agent.latency_p99_ms),
    ];
    head.append(node("span", { class: "percentiles" }, percentiles.join(" · ")));
    const area = node("div", { class: "histogram-chart" });
    card.append(head, area);
    container.append(card);

    const width = Math.max(240, area.clientWidth);
    const height = Math.max(120, area.clientHeight);
    const m = { top: 16, right: 2, bottom: 20, left: 2 };
    const plotH = height - m.top - m.bottom;
    const band = (width - m.left - m.right) / counts.length;
    const peak = Math.max(1, ...counts);
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    counts.forEach((count, i) => {
      const x = m.left + i * band;
      const h = count ? Math.max(1.5, (count / peak) * plotH) : 0;
      const bar = svg("rect", {
        class: "hist",
        x: x + band * 0.12,
        y: m.top + plotH - h,
        width: band * 0.76,
        height: h,
        "data-bucket": i,
        "data-count": count,
      });
      bar.append(svg("title", {}, `${labels[i]} ms: ${fmt.count(count)} calls`));
      chart.append(bar);
      if (count) {
        const at = { x: x + band / 2, y: m.top + plotH - h - 4, "text-anchor": "middle" };
        chart.append(svg("text", { ...at, class: "count" }, fmt.count(count)));
      }
      const under = { x: x + band / 2, y: height - 5, "text-anchor": "middle" };
      chart.append(svg("text", under, labels[i]));
    });
    const base = m.top + plotH;
    chart.append(svg("line", { class: "baseline", x1: m.left, x2: width - m.right, y1: base, y2: base }));
    area.append(chart);
  }

  function renderHistograms(byAgent) {
    const container = document.getElementById("histograms");
    container.replaceChildren();
    const measured = byAgent.agents.filter((a) => a.latency_histogram);
    if (!measured.length) {
      container.append(node("p", { class: "note" }, "No calls in this window."));
      return;
    }
    for (const agent of measured) histogram(container, agent, byAgent.latency_buckets_ms);
  }

  // --- the agents table -----------------------------------------------------------

  function health(record, provider, registryError) {
    if (registryError) return { status: "unknown", title: registryError };
    if (record) return { status: record.status, title: record.output || null };
    if (provider !== "local") return { status: "cloud", title: "a cloud provider" };
    return { status: "not registered", title: "not in the registry now" };
  }

  function renderAgents(byAgent, registry) {
    const records = new Map((registry.agents || []).map((a) => [a.agent_id, a]));
    const rows = byAgent.agents.map((usage) => ({ usage, record: records.get(usage.agent_id) }));
    const used = new Set(byAgent.agents.map((usage) => usage.agent_id));
    const idle = [...records.values()].filter((a) => !used.has(a.agent_id));
    idle.sort((a, b) => (a.agent_id < b.agent_id ? -1 : 1));
    for (const record of idle) rows.push({ usage: null, record });

    const body = document.querySelector("#agents tbody");
    if (!rows.length) {
      const empty = node("tr", { class: "empty" });
      const none = registry.error
        ? "No calls in this window, and the registry cannot be read."
        : "No agents registered and no calls in this window.";
      empty.append(node("td", { colspan: 12 }, none));
      body.replaceChildren(empty);
      return;
    }
    body.replaceChildren(
      ...rows.map(({ usage, record }) => {
        const id = usage ? usage.agent_id : record.agent_id;
        const provider = usage ? usage.provider : record.locality;
        const state = health(record, provider, registry.error);
        const u = usage || {
          calls: 0,
          errors: 0,
          prompt_tokens: 0,
          completion_tokens: 0,
          embedding_calls: 0,
          embedding_tokens: 0,
        };
        const tr = node("tr", { "data-agent": id });
        const who = node("td");
        who.append(node("span", { class: "agent-id" }, id));
        const model = record && record.metadata && record.metadata.model;
        if (model) who.append(node("span", { class: "agent-model" }, String(model)));
        const badge = node("td");
        const slug = state.status.replace(/\s+/g, "-");
        badge.append(
          node("span", { class: `badge ${slug}`, "data-field": "health", title: state.title }, state.status),
        );
        const cell = (field, text) => node("td", { class: "num", "data-field": field }, text);
        tr.append(
          who,
          node("td", { "data-field": "provider" }, provider),
          badge,
          cell("calls", fmt.count(u.calls)),
          cell("errors", fmt.count(u.errors)),
          cell("tokens", fmt.count(u.prompt_tokens + u.completion_tokens)),
          cell("embedding-calls", fmt.count(u.embedding_calls)),
          cell("embedding-tokens", fmt.count(u.embedding_tokens)),
          cell("tokens-per-second", fmt.rate(u.tokens_per_second)),
          cell("p50", fmt.ms(u.latency_p50_ms)),
          cell("p95", fmt.ms(u.latency_p95_ms)),
          cell("p99", fmt.ms(u.latency_p99_ms)),
        );
        return tr;
      }),
    );
  }

  function renderRegistryNote(registry) {
    const note = document.getElementById("registry-note");
    note.classList.toggle("bad", Boolean(registry.error));
    const n = (registry.agents || []).length;
    note.textContent = registry.error
      ? `registry unavailable: ${registry.error}`
      : `${fmt.count(n)} registered ${n === 1 ? "agent" : "agents"} · health from the registry`;
  }

  // --- the loop -------------------------------------------------------------------

  const state = {
    window: (() => {
      const asked = new URLSearchParams(window.location.search).get("window");
      return Object.hasOwn(BUCKETS, asked) ? asked : DEFAULT_WINDOW;
    })(),
    generation: 0, // a refresh started for an older window must not draw over a newer one
    timer: null,
    last: null,
    renders: 0,
  };

  function render(data) {
    renderSummary(data.summary);
    renderSeries(data.series);
    renderAgents(data.byAgent, data.registry);
    renderHistograms(data.byAgent);
    renderRegistryNote(data.registry);
  }

  function schedule() {
    clearTimeout(state.timer);
    // A hidden tab does not poll; it refreshes when shown again.
    if (document.visibilityState !== "hidden") state.timer = setTimeout(refresh, REFRESH_MS);
  }

  async function refresh() {
    clearTimeout(state.timer);
    const generation = ++state.generation;
    const query = `window=${encodeURIComponent(state.window)}`;
    try {
      const [summary, series, byAgent, registry] = await Promise.all([
        getJSON(`api/usage/summary?${query}`),
        getJSON(`api/usage/timeseries?${query}&buckets=${BUCKETS[state.window]}`),
        getJSON(`api/usage/by-agent?${query}`),
        // Without the registry the page still shows usage; health shows as unknown.
        getJSON("api/agents").catch((error) => ({ agents: [], error: error.message })),
      ]);
      if (generation !== state.generation) return;
      state.last = { summary, series, byAgent, registry };
      render(state.last);
      state.renders += 1;
      const status = document.getElementById("status");
      status.dataset.renders = String(state.renders);
      status.dataset.window = state.window; // what the numbers on the page are of
      const now = new Date();
      const at = `${pad2(now.getHours())}:${pad2(now.getMinutes())}:${pad2(now.getSeconds())}`;
      setStatus("ok", `Updated ${at} · refreshes every ${REFRESH_MS / 1000} s`);
    } catch (error) {
      if (generation !== state.generation) return;
      setStatus("error", `Cannot read the usage API (${error.message}); retrying`);
    }
    if (generation === state.generation) schedule();
  }

  function selectWindow(chosen) {
    state.window = chosen;
    for (const button of document.querySelectorAll("#windows button")) {
      button.setAttribute("aria-pressed", String(button.dataset.window === chosen));
    }
    const url = new URL(window.location.href);
    url.searchParams.set("window", chosen);
    window.history.replaceState(null, "", url);
  }

  function start() {
    selectWindow(state.window);
    document.getElementById("windows").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-window]");
      if (!button || button.dataset.window === state.window) return;
      selectWindow(button.dataset.window);
      refresh();
    });
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") refresh();
    });
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => state.last && render(state.last), 150);
    });
    refresh();
  }

  start();
})();
