// The dashboard: one EventSource per watched workflow, numbers from /progress.
// All text that comes from events is set with textContent, never parsed as HTML.
"use strict";

(() => {
  const EVENT_TYPES = [
    "workflow_planned", "workflow_state_changed", "node_started", "node_progress",
    "node_completed", "node_failed", "node_skipped",
  ];
  const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
  const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
  const PROGRESS_EVERY_MS = 250; // at most 4 /progress fetches a second, as the server's stream
  const NO_PROGRESS_EVERY_MS = 3000; // while /progress answers 404 although events arrive
  const LOG_SIZE = 20;
  const MAX_BACKOFF_MS = 10000;
  const SCHEDULE_EVERY_MS = 1000; // /schedule at most once a second, after a /progress answer
  // A running node is "far past its usual time" beyond OVERDUE_FACTOR x its p90 (p50 when
  // the history has no p90) and at least OVERDUE_MIN_S over it.
  const OVERDUE_FACTOR = 2;
  const OVERDUE_MIN_S = 1;
  const Pictures = window.WfPictures;

  const $ = (id) => document.getElementById(id);
  const el = {
    badge: $("badge"), form: $("pick"), input: $("wf-input"), demo: $("demo-start"),
    pickError: $("pick-error"), view: $("view"), title: $("wf-title"), state: $("state"),
    definition: $("definition"), bar: $("bar"), barFill: $("bar-fill"), percent: $("percent"),
    count: $("count"), eta: $("eta"), runningLine: $("running-line"), notice: $("notice"),
    nodes: $("nodes"), events: $("events"), nodeTemplate: $("node-template"),
    summary: document.querySelector(".summary"),
    graphPanel: $("graph-panel"), graph: $("graph"), graphCaption: $("graph-caption"),
    timelinePanel: $("timeline-panel"), timeline: $("timeline"),
    timelineCaption: $("timeline-caption"), picturesNote: $("pictures-note"),
    back: $("back"),
  };

  // Every event id this page received, in arrival order, duplicates included: tests read it.
  window.__seenIds = [];

  let current = null; // the watched workflow (see newWatch)

  // ---------------------------------------------------------------- small helpers
  function parseEventId(id) {
    const m = /^(\d+)-(\d+)$/.exec(id || "");
    return m ? [Number(m[1]), Number(m[2])] : null;
  }

  function idAfter(a, b) { // is event id a strictly after b?
    const x = parseEventId(a);
    const y = parseEventId(b);
    if (!x || !y) return true;
    return x[0] > y[0] || (x[0] === y[0] && x[1] > y[1]);
  }

  function formatDuration(seconds) {
    if (seconds < 10) return `${Math.max(0, seconds).toFixed(1)} s`;
    let s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) {
      const m = Math.floor(s / 60);
      s %= 60;
      return s ? `${m} min ${s} s` : `${m} min`;
    }
    const h = Math.floor(s / 3600);
    return `${h} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function localTime(timestamp) {
    const d = timestamp ? new Date(timestamp) : new Date();
    if (Number.isNaN(d.getTime())) return "";
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function setBadge(state) {
    el.badge.dataset.state = state;
    el.badge.textContent = state;
  }

  function showNotice(text) {
    el.notice.hidden = !text;
    el.notice.textContent = text || "";
  }

  // ---------------------------------------------------------------- watch state
  function newWatch(id) {
    return {
      id,
      es: null,
      lastId: null, // the last event id applied
      complete: true, // every event since the first was folded here (false after a gap)
      nodes: new Map(), // node_id -> {id, name, type, status, ...}
      planOrder: [], // node ids of the plan, in plan order
      deps: new Map(), // node_id -> depends_on, from the plan
      order: [], // planned nodes in plan order, then the others: the pictures' rows
      schedule: null, // the last /schedule answer
      scheduleAt: 0, // performance.now() when it arrived
      predicted: new Map(), // node_id -> {start, end} in ms of the server's clock
      lastSchedule: -Infinity,
      scheduling: false,
      stats: null, // {nodes: Map, types: Map} of {p50, p90} from /definitions/{id}/stats
      statsFor: null,
      selected: null, // node id selected in any of the three views
      shownFinish: null, // the timeline's right edge (ms), the ETA shown
      startedAt: null, // the run's start (ms), from /progress
      definition: null,
      maxConcurrency: null,
      state: null,
      firstTs: null,
      lastTs: null,
      log: [],
      progress: null, // the last /progress object
      progressAt: 0, // performance.now() when it arrived
      progressMissing: false, // /progress answered 404 (no events yet, or an older server)
      etag: null,
      offsetMs: 0, // server clock minus local clock, estimated from /progress
      fetchTimer: null,
      fetching: false,
      fetchAgain: false,
      lastFetch: -Infinity,
      failures: 0,
      reconnectTimer: null,
      finished: false,
    };
  }

  function nodeOf(w, nodeId, name, type) {
    let node = w.nodes.get(nodeId);
    if (!node) {
      node = { id: nodeId, name: null, type: null, status: "pending", startedAt: null,
               finishedAt: null, fraction: null, durationMs: null, error: null,
               lastError: null, attempts: 0, reason: null, li: null };
      w.nodes.set(nodeId, node);
    }
    if (name) node.name = name;
    if (type) node.type = type;
    return node;
  }

  // Fold one event into the watch (the latest event of a node decides its state).
  function apply(w, ev) {
    const ts = ev.timestamp ? Date.parse(ev.timestamp) : Date.now();
    if (w.firstTs === null) w.firstTs = ts;
    w.lastTs = ts;
    switch (ev.event_type) {
      case "workflow_planned":
        w.planOrder = (ev.nodes || []).map((n) => n.node_id);
        w.deps = new Map();
        for (const n of ev.nodes || []) {
          nodeOf(w, n.node_id, n.node_name, n.node_type);
          w.deps.set(n.node_id, Array.isArray(n.depends_on) ? n.depends_on : []);
        }
        w.definition = ev.definition_id || null;
        w.maxConcurrency = ev.max_concurrency || null;
        return true; // the node list is redrawn in plan order
      case "workflow_state_changed":
        w.state = ev.to_state;
        return false;
      case "node_started": {
        const node = nodeOf(w, ev.node_id, ev.node_name, ev.node_type);
        node.status = "running";
        node.startedAt = ts;
        node.finishedAt = null;
        node.fraction = null;
        node.attempts += 1;
        return node;
      }
      case "node_progress": {
        const node = nodeOf(w, ev.node_id);
        node.fraction = ev.fraction;
        if (node.status === "pending") { node.status = "running"; node.startedAt = ts; node.attempts += 1; }
        return node;
      }
      case "node_completed": {
        const node = nodeOf(w, ev.node_id, ev.node_name, ev.node_type);
        node.status = "completed";
        node.finishedAt = ts;
        node.attempts = Math.max(node.attempts, 1);
        node.durationMs = Number.isInteger(ev.duration_ms) ? ev.duration_ms
          : node.startedAt !== null ? ts - node.startedAt : null;
        return node;
      }
      case "node_failed": {
        const node = nodeOf(w, ev.node_id, ev.node_name, ev.node_type);
        node.status = "failed";
        node.finishedAt = ts;
        node.attempts = Math.max(node.attempts, 1);
        node.error = ev.error;
        node.lastError = ev.error;
        node.durationMs = Number.isInteger(ev.duration_ms) ? ev.duration_ms
          : node.startedAt !== null ? ts - node.startedAt : null;
        return node;
      }
      case "node_skipped": {
        const node = nodeOf(w, ev.node_id);
        node.status = "skipped";
        node.finishedAt = ts;
        node.reason = ev.reason || null;
        return node;
      }
      default:
        return false;
    }
  }

  function describe(w, ev) {
    const node = ev.node_id ? w.nodes.get(ev.node_id) : null;
    const label = node ? (node.name || node.id) : "";
    switch (ev.event_type) {
      case "workflow_planned":
        return `planned ${(ev.nodes || []).length} nodes` +
          (ev.definition_id ? ` of ${ev.definition_id}` : "");
      case "workflow_state_changed":
        return `${ev.from_state ? ev.from_state + " → " : ""}${ev.to_state}` +
          (ev.reason ? ` (${ev.reason})` : "");
      case "node_started":
        return `${label} started` + (node && node.attempts > 1 ? ` (attempt ${node.attempts})` : "");
      case "node_progress":
        return `${label} ${Math.round(100 * ev.fraction)} %` + (ev.message ? ` · ${ev.message}` : "");
      case "node_completed":
        return `${label} completed` +
          (Number.isInteger(ev.duration_ms) ? ` in ${formatDuration(ev.duration_ms / 1000)}` : "");
      case "node_failed":
        return `${label} failed: ${ev.error}`;
      case "node_skipped":
        return `${label} skipped` + (ev.reason ? ` (${ev.reason})` : "");
      default:
        return ev.event_type;
    }
  }

  // ---------------------------------------------------------------- the numbers
  function localCounts(w) {
    let done = 0;
    const running = [];
    for (const node of w.nodes.values()) {
      if (node.status === "completed" || node.status === "skipped") done += 1;
      if (node.status === "running") running.push(node.name || node.id);
    }
    const total = w.nodes.size;
    const pct = w.state === "COMPLETED" ? 100 : total ? Math.round((1000 * done) / total) / 10 : 0;
    return { percentage: pct, done, total, running };
  }

  function figures(w) {
    const p = w.progress;
    const terminal = TERMINAL.has(w.state) ? w.state : null;
    if (p && !w.progressMissing) {
      const state = terminal || p.state;
      let eta = p.estimated_remaining_seconds;
      let etaAt = w.progressAt;
      const s = w.schedule;
      // A /schedule answer newer than /progress for the same event carries the same figure
      // a moment later: the ETA shown and the timeline's right edge are one number.
      if (s && w.scheduleAt >= w.progressAt && s.last_event_id === p.last_event_id
          && typeof s.estimated_remaining_seconds === "number") {
        eta = s.estimated_remaining_seconds;
        etaAt = w.scheduleAt;
      }
      if (typeof eta === "number") eta = Math.max(0, eta - (performance.now() - etaAt) / 1000);
      const f = {
        state,
        percentage: state === "COMPLETED" ? 100 : (p.percentage || 0),
        done: (p.completed_nodes || 0) + (p.skipped_nodes || 0),
        total: p.total_nodes || 0,
        eta: typeof eta === "number" ? eta : null,
        elapsed: typeof p.elapsed_seconds === "number" ? p.elapsed_seconds : null,
        running: (p.running || []).map((r) => r.node_name || r.node_id),
        fromServer: true,
      };
      // The snapshot lags the stream by up to one fetch. While it does, and the page has
      // folded every event since the start (no gap), its own counts are the same fold one
      // step further on, so "n of N" always agrees with the node list.
      const stale = w.lastId !== null && idAfter(w.lastId, p.last_event_id);
      if (stale && w.complete) Object.assign(f, localCounts(w), { state: terminal || w.state || p.state });
      if (stale && terminal && w.firstTs !== null) f.elapsed = (w.lastTs - w.firstTs) / 1000;
      return f;
    }
    // No /progress (yet): count from the events this page has seen.
    return {
      state: w.state, ...localCounts(w), eta: null,
      elapsed: w.firstTs !== null && terminal ? (w.lastTs - w.firstTs) / 1000 : null,
      fromServer: false,
    };
  }

  function etaText(w, f) {
    if (TERMINAL.has(f.state)) {
      const took = f.elapsed !== null ? ` in ${formatDuration(f.elapsed)}` : "";
      return f.state === "COMPLETED" ? `finished${took}` : `${f.state.toLowerCase()}${took}`;
    }
    if (!f.fromServer) return w.nodes.size ? "time left unknown" : "";
    if (f.eta === null) return "estimating time left…";
    if (f.eta < 1) return "almost done";
    return `about ${formatDuration(f.eta)} left`;
  }

  function renderSummary(w) {
    const f = figures(w);
    const pct = Math.max(0, Math.min(100, f.percentage));
    el.state.textContent = f.state || "waiting";
    el.state.dataset.state = f.state || "";
    el.bar.setAttribute("aria-valuenow", String(pct));
    el.bar.setAttribute("aria-valuetext", `${pct} %, ${f.done} of ${f.total} nodes`);
    el.barFill.style.width = `${pct}%`;
    el.summary.toggleAttribute("data-done", f.state === "COMPLETED");
    el.percent.textContent = `${pct.toFixed(1)} %`;
    el.count.textContent = `${f.done} of ${f.total} nodes`;
    el.eta.textContent = etaText(w, f);
    if (f.eta !== null && !TERMINAL.has(f.state)) {
      el.eta.dataset.completionAt = String(Math.round(Date.now() + w.offsetMs + f.eta * 1000));
    } else {
      delete el.eta.dataset.completionAt;
    }
    el.runningLine.textContent = f.running.length && !TERMINAL.has(f.state)
      ? `Running: ${f.running.join(", ")}` : "";
    el.runningLine.hidden = TERMINAL.has(f.state);
    const parts = [];
    if (w.definition) parts.push(`definition ${w.definition}`);
    if (w.firstTs !== null) parts.push(`started ${localTime(new Date(w.firstTs).toISOString())}`);
    if (w.maxConcurrency) parts.push(`up to ${w.maxConcurrency} nodes at once`);
    el.definition.textContent = parts.join(" · ");
    if (!w.nodes.size && !w.finished && w.lastId === null) {
      showNotice("Waiting for the first event of this workflow…");
    } else if (el.notice.dataset.kind !== "gap") {
      showNotice("");
    }
  }

  // ---------------------------------------------------------------- the node list
  function nodeDetail(w, node) {
    const now = Date.now() + w.offsetMs;
    switch (node.status) {
      case "running": {
        const parts = [];
        if (node.startedAt !== null) parts.push(`running ${formatDuration(Math.max(0, now - node.startedAt) / 1000)}`);
        else parts.push("running");
        if (typeof node.fraction === "number") parts.push(`${Math.round(100 * node.fraction)} %`);
        if (node.attempts > 1) parts.push(`attempt ${node.attempts}`);
        return parts.join(" · ");
      }
      case "completed":
        return (node.durationMs !== null ? formatDuration(node.durationMs / 1000) : "done") +
          (node.attempts > 1 ? ` · attempt ${node.attempts}` : "");
      case "failed":
        return node.durationMs !== null ? `failed after ${formatDuration(node.durationMs / 1000)}` : "failed";
      case "skipped":
        return node.reason ? `skipped: ${node.reason}` : "skipped";
      default:
        return "pending";
    }
  }

  // ---------------------------------------------------------------- usual durations
  function usual(w, node) {
    if (!w.stats) return null;
    const own = w.stats.nodes.get(node.id);
    if (own && typeof own.p50 === "number") return own;
    const kind = node.type ? w.stats.types.get(node.type) : null;
    return kind && typeof kind.p50 === "number" ? kind : null;
  }

  function runningSeconds(w, node, now) {
    return node.startedAt === null ? 0 : Math.max(0, now - node.startedAt) / 1000;
  }

  function overdue(w, node, now) {
    if (node.status !== "running") return false;
    const u = usual(w, node);
    if (!u) return false;
    const bound = typeof u.p90 === "number" ? u.p90 : u.p50;
    const ran = runningSeconds(w, node, now);
    return ran > OVERDUE_FACTOR * bound && ran - bound >= OVERDUE_MIN_S;
  }

  function usualText(w, node, now) {
    const u = usual(w, node);
    if (!u) return "";
    const text = `usually ${formatDuration(u.p50)}`;
    return overdue(w, node, now) ? `⚠ far past its usual ${formatDuration(u.p50)}` : text;
  }

  async function fetchStats(w) {
    if (!w.definition || w.statsFor === w.definition) return;
    w.statsFor = w.definition;
    try {
      const r = await fetch(`/definitions/${encodeURIComponent(w.definition)}/stats`,
                            { headers: { Accept: "application/json" }, cache: "no-store" });
      if (w !== current || r.status !== 200) return; // 404: nothing recorded yet
      const body = await r.json();
      const pick = (x) => ({ p50: x.p50_seconds, p90: x.p90_seconds });
      w.stats = {
        nodes: new Map((body.nodes || []).map((x) => [x.node_id, pick(x)])),
        types: new Map((body.node_types || []).map((x) => [x.node_type, pick(x)])),
      };
      renderAllNodes(w);
      renderPictures(w);
    } catch (err) {
      w.statsFor = null; // offline: try again after the next event
    }
  }

  // ---------------------------------------------------------------- keyboard
  function roveTo(items, target) {
    if (!target) return;
    for (const item of items) item.tabIndex = -1;
    target.tabIndex = 0;
    target.focus();
  }

  el.nodes.addEventListener("keydown", (e) => {
    const li = e.target.closest("li.node");
    if (!li) return;
    const items = Array.from(el.nodes.children);
    const i = items.indexOf(li);
    let target = null;
    if (e.key === "ArrowDown") target = items[i + 1];
    else if (e.key === "ArrowUp") target = items[i - 1];
    else if (e.key === "Home") target = items[0];
    else if (e.key === "End") target = items[items.length - 1];
    else if (e.key === "Enter" && pictures.dag && current && current.order.length <= Pictures.MAX_NODES) {
      pictures.dag.focus(li.dataset.nodeId);
    } else return;
    e.preventDefault();
    roveTo(items, target);
  });

  el.nodes.addEventListener("focusin", (e) => {
    const li = e.target.closest("li.node");
    if (li && current) select(current, li.dataset.nodeId, "list");
  });

  function select(w, id, from, jump) {
    if (w !== current) return;
    w.selected = id;
    for (const node of w.nodes.values()) if (node.li) node.li.toggleAttribute("data-selected", node.id === id);
    renderPictures(w);
    if (jump) {
      const node = w.nodes.get(id);
      if (node && node.li) roveTo(Array.from(el.nodes.children), node.li);
    }
  }

  function renderNode(w, node) {
    if (!node.li) {
      node.li = el.nodeTemplate.content.firstElementChild.cloneNode(true);
      node.li.dataset.nodeId = node.id;
      node.li.tabIndex = el.nodes.children.length ? -1 : 0;
      el.nodes.appendChild(node.li);
    }
    const li = node.li;
    li.dataset.status = node.status;
    li.querySelector(".node-name").textContent = node.name || node.id;
    li.querySelector(".node-type").textContent = node.type || "";
    li.querySelector(".node-status").textContent = node.status;
    li.querySelector(".node-detail").textContent = nodeDetail(w, node);
    const now = Date.now() + w.offsetMs;
    li.querySelector(".node-usual").textContent = usualText(w, node, now);
    li.toggleAttribute("data-overdue", overdue(w, node, now));
    li.toggleAttribute("data-retried", node.attempts > 1 && node.status !== "failed");
    const error = node.status === "failed" ? node.error
      : node.lastError && node.status !== "skipped" ? `earlier attempt failed: ${node.lastError}` : "";
    const errorEl = li.querySelector(".node-error");
    errorEl.textContent = error || "";
    errorEl.hidden = !error;
    errorEl.classList.toggle("earlier", node.status !== "failed");
  }

  function renderAllNodes(w) {
    // Plan order first, then nodes seen without a plan, each exactly once.
    const ordered = [];
    const seen = new Set();
    for (const id of w.planOrder) {
      const node = w.nodes.get(id);
      if (node && !seen.has(id)) { ordered.push(node); seen.add(id); }
    }
    for (const node of w.nodes.values()) if (!seen.has(node.id)) ordered.push(node);
    for (const node of ordered) {
      renderNode(w, node);
      el.nodes.appendChild(node.li); // moves it into place
    }
  }

  // ---------------------------------------------------------------- the pictures
  const hooks = {
    label: (n) => n.name || n.id,
    short: (n, now) => {
      switch (n.status) {
        case "running": {
          const parts = [formatDuration(runningSeconds(current, n, now))];
          if (typeof n.fraction === "number") parts.push(`${Math.round(100 * n.fraction)} %`);
          return parts.join(" · ");
        }
        case "completed": return n.durationMs !== null ? formatDuration(n.durationMs / 1000) : "done";
        case "failed": return n.durationMs !== null ? `after ${formatDuration(n.durationMs / 1000)}` : "";
        case "skipped": return "skipped";
        default: {
          const u = usual(current, n);
          return u ? `usually ${formatDuration(u.p50)}` : "pending";
        }
      }
    },
    overdue: (n, now) => overdue(current, n, now),
    // Reported by the engine when it says; else the share of the predicted duration run.
    fraction: (n, now) => {
      if (typeof n.fraction === "number") return n.fraction;
      const p = current.predicted.get(n.id);
      if (!p || p.end === null || n.startedAt === null || p.end <= n.startedAt) return null;
      return Math.min(0.95, Math.max(0, (now - n.startedAt) / (p.end - n.startedAt)));
    },
    time: (ms) => localTime(new Date(ms).toISOString()),
    duration: (s) => formatDuration(s),
    select: (id, from, jump) => current && select(current, id, from, jump),
  };
  const pictures = {
    dag: Pictures ? new Pictures.Dag(el.graph, el.graphCaption, hooks) : null,
    timeline: Pictures ? new Pictures.Timeline(el.timeline, el.timelineCaption, hooks) : null,
  };

  function pictureOrder(w) {
    const seen = new Set();
    const order = [];
    for (const id of w.planOrder) if (w.nodes.has(id) && !seen.has(id)) { order.push(id); seen.add(id); }
    for (const id of w.nodes.keys()) if (!seen.has(id)) order.push(id);
    return order;
  }

  function renderPictures(w) {
    if (w !== current || !pictures.dag) return;
    renderSummary(w); // the ETA text and the timeline's edge are drawn at the same moment
    w.order = pictureOrder(w);
    const count = w.order.length;
    const fits = count > 0 && count <= Pictures.MAX_NODES;
    el.graphPanel.hidden = count === 0;
    el.timelinePanel.hidden = !fits;
    el.graph.hidden = !fits;
    el.graphPanel.querySelector(".legend").hidden = !fits;
    el.picturesNote.hidden = fits;
    el.picturesNote.textContent = fits ? "" :
      `This run has ${count} nodes: above ${Pictures.MAX_NODES} the graph and the timeline give way to the node list below.`;
    el.graphCaption.hidden = !fits;
    if (!fits) return;
    w.terminal = TERMINAL.has(w.state) || (w.progress && TERMINAL.has(w.progress.state));
    const now = Date.now() + w.offsetMs;
    if (w.progress && w.progress.started_at) w.startedAt = Date.parse(w.progress.started_at);
    pictures.dag.render(w, now);
    pictures.timeline.render(w, now, shownSchedule(w, now), w.terminal ? null : w.shownFinish);
  }

  // The schedule as of `now`, its latest end on the ETA the summary shows: what was due
  // to start by now starts now, and the rest is stretched by (shown ETA) / (schedule's
  // ETA), which stays 1 within a few ms while the schedule is fresh (see fetchSchedule).
  function shownSchedule(w, now) {
    w.shownFinish = null;
    const f = figures(w);
    if (w.terminal || f.eta === null || !w.predicted.size) return w.predicted;
    const finish = now + f.eta * 1000;
    let latest = null;
    for (const p of w.predicted.values()) if (p.end !== null) latest = Math.max(latest ?? p.end, p.end);
    if (latest === null) return w.predicted;
    const k = latest - now > 1 ? (finish - now) / (latest - now) : 0;
    const out = new Map();
    for (const [id, p] of w.predicted) {
      if (p.end === null) { out.set(id, p); continue; }
      const end = k ? now + Math.max(p.end - now, 0) * k : finish;
      const start = p.start === null ? null : Math.min(end, now + Math.max(p.start - now, 0) * k);
      out.set(id, { start, end });
    }
    w.shownFinish = finish;
    return out;
  }

  let picturesQueued = false;
  function queuePictures(w) {
    if (picturesQueued) return;
    picturesQueued = true;
    // Not requestAnimationFrame: a tab in the background gets none, and the pictures
    // would trail the summary until the next tick.
    setTimeout(() => { picturesQueued = false; renderPictures(w); }, 50);
  }

  async function fetchSchedule(w) {
    if (w.scheduling || w.finished || !pictures.dag || w.order.length > Pictures.MAX_NODES) return;
    if (performance.now() - w.lastSchedule < SCHEDULE_EVERY_MS && w.schedule
        && w.schedule.last_event_id === (w.progress && w.progress.last_event_id)) return;
    w.scheduling = true;
    w.lastSchedule = performance.now();
    try {
      const sent = Date.now();
      const r = await fetch(`/workflows/${encodeURIComponent(w.id)}/schedule`,
                            { headers: { Accept: "application/json" }, cache: "no-store" });
      if (w !== current || r.status !== 200) return;
      const body = await r.json();
      const back = Date.now();
      w.schedule = body;
      w.scheduleAt = performance.now();
      // The answer's clock is exact to the millisecond: the page's server time follows it.
      if (body.as_of) w.offsetMs = Date.parse(body.as_of) - (sent + back) / 2;
      w.predicted = new Map();
      for (const n of body.nodes || []) {
        w.predicted.set(n.node_id, {
          start: n.expected_start_at ? Date.parse(n.expected_start_at) : null,
          end: n.expected_end_at ? Date.parse(n.expected_end_at) : null,
        });
      }
      renderSummary(w);
      renderPictures(w);
    } catch (err) {
      // Offline: the pictures keep the last schedule.
    } finally {
      w.scheduling = false;
    }
  }

  window.addEventListener("resize", () => current && queuePictures(current));

  // ---------------------------------------------------------------- the event log
  function logEvent(w, id, ev, text) {
    w.log.unshift({ id, ts: ev.timestamp, type: ev.event_type, text });
    w.log.length = Math.min(w.log.length, LOG_SIZE);
    const li = document.createElement("li");
    li.dataset.eventId = id || "";
    li.dataset.eventType = ev.event_type;
    const time = document.createElement("time");
    if (ev.timestamp) time.dateTime = ev.timestamp;
    time.textContent = localTime(ev.timestamp);
    const type = document.createElement("span");
    type.className = "event-type";
    type.textContent = ev.event_type;
    const body = document.createElement("span");
    body.className = "event-text";
    body.textContent = text;
    li.append(time, type, body);
    el.events.prepend(li);
    while (el.events.children.length > LOG_SIZE) el.events.lastElementChild.remove();
  }

  // ---------------------------------------------------------------- /progress
  function scheduleProgress(w) {
    if (w !== current) return;
    if (w.fetchTimer !== null || w.fetching) { w.fetchAgain = true; return; }
    // A 404 despite events means a server without /progress: ask rarely, count locally.
    const every = w.progressMissing && w.lastId !== null ? NO_PROGRESS_EVERY_MS : PROGRESS_EVERY_MS;
    const wait = Math.max(0, w.lastFetch + every - performance.now());
    w.fetchTimer = setTimeout(() => { w.fetchTimer = null; fetchProgress(w); }, wait);
  }

  function setProgress(w, p) {
    if (!p || typeof p !== "object") return;
    w.progress = p;
    w.progressAt = performance.now();
    w.progressMissing = false;
    if (p.started_at && typeof p.elapsed_seconds === "number" && !TERMINAL.has(p.state)) {
      w.offsetMs = Date.parse(p.started_at) + p.elapsed_seconds * 1000 - Date.now();
    }
  }

  async function fetchProgress(w) {
    w.fetching = true;
    w.fetchAgain = false;
    w.lastFetch = performance.now();
    try {
      const headers = { Accept: "application/json" };
      if (w.etag) headers["If-None-Match"] = w.etag;
      const r = await fetch(`/workflows/${encodeURIComponent(w.id)}/progress`,
                            { headers, cache: "no-store" });
      if (w !== current) return;
      if (r.status === 200) {
        const p = await r.json();
        w.etag = r.headers.get("ETag");
        setProgress(w, p);
      } else if (r.status === 404) {
        w.progressMissing = true; // no events yet, or a server without /progress: count locally
      }
    } catch (err) {
      // Offline: the EventSource's reconnect brings us back; keep the last figures.
    } finally {
      w.fetching = false;
      if (w === current) {
        renderSummary(w);
        renderPictures(w); // with the summary: a new ETA moves the timeline's edge at once
        if (w.fetchAgain) scheduleProgress(w);
        else if (!w.progressMissing && w.progress && !TERMINAL.has(w.progress.state)) fetchSchedule(w);
      }
    }
  }

  // ---------------------------------------------------------------- the stream
  function onEvent(w, e) {
    if (w !== current) return;
    window.__seenIds.push(e.lastEventId);
    if (w.lastId !== null && !idAfter(e.lastEventId, w.lastId)) return; // already applied
    let ev;
    try {
      ev = JSON.parse(e.data);
    } catch (err) {
      return;
    }
    if (!ev || typeof ev !== "object") return;
    w.lastId = e.lastEventId || w.lastId;
    w.failures = 0;
    const changed = apply(w, ev);
    if (changed === true) renderAllNodes(w);
    else if (changed) {
      if (!changed.li) renderAllNodes(w);
      else renderNode(w, changed);
    }
    logEvent(w, e.lastEventId, ev, describe(w, ev));
    renderSummary(w);
    queuePictures(w);
    if (ev.event_type === "workflow_planned") fetchStats(w);
    scheduleProgress(w);
    if (ev.event_type === "workflow_state_changed" && TERMINAL.has(ev.to_state)) finish(w);
  }

  function onGap(w, e) {
    if (w !== current) return;
    let gap = {};
    try { gap = JSON.parse(e.data) || {}; } catch (err) { /* keep {} */ }
    if (gap.progress) {
      setProgress(w, gap.progress);
      for (const r of gap.progress.running || []) {
        const node = nodeOf(w, r.node_id, r.node_name);
        node.status = "running";
        if (r.started_at) node.startedAt = Date.parse(r.started_at);
      }
      renderAllNodes(w);
    }
    w.complete = false;
    el.notice.dataset.kind = "gap";
    showNotice("Some events were trimmed from the server's history before this page read them; " +
               "the figures are redrawn from the server's snapshot, the node list may be incomplete.");
    logEvent(w, "", { event_type: "gap" },
             `events after ${gap.requested} up to ${gap.earliest_available} were trimmed`);
    renderSummary(w);
    w.fetchTimer === null && !w.fetching ? fetchProgress(w) : (w.fetchAgain = true);
  }

  function connect(w) {
    if (w !== current || w.finished) return;
    w.reconnectTimer = null;
    // A new EventSource cannot send Last-Event-ID itself: the query parameter carries it.
    const query = w.lastId ? `?lastEventId=${encodeURIComponent(w.lastId)}` : "";
    const es = new EventSource(`/workflows/${encodeURIComponent(w.id)}/events${query}`);
    w.es = es;
    setBadge(w.failures ? "reconnecting" : "connecting");
    es.onopen = () => {
      if (w !== current || w.finished) return;
      setBadge("live");
      scheduleProgress(w);
    };
    es.onerror = () => {
      if (w !== current || w.finished) return;
      setBadge("reconnecting");
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error, or 204): find out which, then retry ourselves.
        w.es = null;
        recover(w);
      }
    };
    for (const type of EVENT_TYPES) es.addEventListener(type, (e) => onEvent(w, e));
    es.addEventListener("gap", (e) => onGap(w, e));
  }

  async function recover(w) {
    w.failures += 1;
    await fetchProgress(w);
    if (w !== current || w.finished) return;
    const p = w.progress;
    if (p && TERMINAL.has(p.state) && w.lastId && !idAfter(p.last_event_id, w.lastId)) {
      w.state = p.state; // the stream answered 204: we have every event already
      finish(w);
      return;
    }
    const delay = Math.min(MAX_BACKOFF_MS, 1000 * 1.5 ** (w.failures - 1));
    w.reconnectTimer = setTimeout(() => connect(w), delay);
  }

  function finish(w) {
    w.finished = true;
    if (w.es) { w.es.close(); w.es = null; }
    if (w.reconnectTimer !== null) { clearTimeout(w.reconnectTimer); w.reconnectTimer = null; }
    setBadge("finished");
    for (const node of w.nodes.values()) if (node.li) renderNode(w, node);
    renderSummary(w);
    renderPictures(w);
    scheduleProgress(w); // the final figures
  }

  function stop(w) {
    if (!w) return;
    if (w.es) w.es.close();
    if (w.reconnectTimer !== null) clearTimeout(w.reconnectTimer);
    if (w.fetchTimer !== null) clearTimeout(w.fetchTimer);
  }

  function watch(id) {
    stop(current);
    if (home) home.hide();
    el.back.href = homeUrl();
    current = newWatch(id);
    window.__seenIds = [];
    el.input.value = id;
    el.pickError.hidden = true;
    el.view.hidden = false;
    el.title.textContent = id;
    el.nodes.replaceChildren();
    el.events.replaceChildren();
    el.graph.replaceChildren();
    el.timeline.replaceChildren();
    el.graphPanel.hidden = true;
    el.timelinePanel.hidden = true;
    if (pictures.dag) { pictures.dag.shape = ""; pictures.timeline.shape = ""; }
    delete el.notice.dataset.kind;
    document.title = `${id} · Workflow progress`;
    renderSummary(current);
    connect(current);
  }

  // The home: the live list of runs, with the filters of the URL.
  function goHome() {
    stop(current);
    current = null;
    el.view.hidden = true;
    document.title = "Runs · Workflow progress";
    setBadge("idle");
    if (home) home.show(window.location.href);
  }

  // The page's URL without the workflow: the home with the filters it was opened from.
  function homeUrl() {
    const url = new URL(window.location.href);
    url.searchParams.delete("workflow");
    return url.pathname + url.search;
  }

  // Between events: the ETA counts down and running nodes' elapsed times go up.
  setInterval(() => {
    const w = current;
    if (!w) return;
    renderSummary(w);
    for (const node of w.nodes.values()) if (node.status === "running" && node.li) renderNode(w, node);
    renderPictures(w); // the same tick as the ETA: the timeline's edge and it agree
  }, 1000);

  // ---------------------------------------------------------------- the controls
  const home = window.WfHome ? new window.WfHome.Home({
    section: $("home"), caption: $("home-caption"), filters: $("filters"), state: $("f-state"),
    definition: $("f-definition"), definitions: $("f-definitions"), clear: $("f-clear"),
    error: $("home-error"), list: $("runs"), empty: $("runs-empty"), template: $("run-template"),
  }, {
    open: (id) => { setUrl(id, false); watch(id); },
    badge: (text) => setBadge(text),
    duration: (seconds) => formatDuration(seconds),
    when: (ts) => {
      const d = new Date(ts);
      if (Number.isNaN(d.getTime())) return "";
      const today = d.toDateString() === new Date().toDateString();
      return today ? localTime(ts) : d.toLocaleString([], { month: "short", day: "numeric",
        hour: "2-digit", minute: "2-digit", second: "2-digit" });
    },
    setUrl: (query) => history.replaceState(null, "", `/${query}`),
  }) : null;

  function setUrl(id, replace) {
    const url = new URL(window.location.href);
    url.searchParams.set("workflow", id);
    if (replace) history.replaceState(null, "", url);
    else history.pushState(null, "", url);
  }

  function pickError(text) {
    el.pickError.textContent = text;
    el.pickError.hidden = false;
  }

  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const id = el.input.value.trim();
    if (!ID_RE.test(id)) {
      pickError("A workflow id is 1 to 128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit.");
      return;
    }
    setUrl(id, false);
    watch(id);
  });

  el.demo.addEventListener("click", async () => {
    el.demo.disabled = true;
    try {
      const r = await fetch("/demo/workflows", { method: "POST" });
      if (r.status !== 201) throw new Error(`the server answered ${r.status}`);
      const { workflow_id: id } = await r.json();
      setUrl(id, false);
      watch(id);
    } catch (err) {
      pickError(`Could not start a demo run: ${err.message}`);
    } finally {
      el.demo.disabled = false;
    }
  });

  el.back.addEventListener("click", (e) => {
    if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    e.preventDefault();
    history.pushState(null, "", el.back.getAttribute("href") || "/");
    goHome();
  });

  function route() {
    const id = new URL(window.location.href).searchParams.get("workflow");
    if (id && ID_RE.test(id)) {
      if (!current || current.id !== id) watch(id);
    } else {
      goHome();
    }
  }

  window.addEventListener("popstate", route);

  async function start() {
    route();
    // The demo routes exist only with --demo: 200 shows the button, 404 hides it.
    try {
      const r = await fetch("/demo/workflows", { headers: { Accept: "application/json" } });
      if (!r.ok) return;
      el.demo.hidden = false;
      document.body.dataset.demo = "on"; // the home lists the demo's runs as they start
    } catch (err) {
      // No demo: the id box is all there is.
    }
  }

  start();
})();
