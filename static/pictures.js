// The run view's two pictures: the DAG (layers from depends_on) and the timeline (real
// times, then the server's predicted schedule up to the ETA). Plain SVG built with
// createElementNS; every text from events goes in with textContent, never as markup.
"use strict";

window.WfPictures = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  // Above this many nodes the pictures give way to the node list (documented in README).
  const MAX_NODES = 300;
  const ICON = { pending: "○", running: "▶", completed: "✓", failed: "✕", skipped: "↷" };

  function make(tag, attrs, parent) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, attrs, value) {
    const t = make("text", attrs, parent);
    t.textContent = value;
    return t;
  }

  // Rough width of a string at 12 px: CJK and Hangul take a full em, the rest about 0.58 em.
  function textWidth(s, px) {
    let w = 0;
    for (const ch of s) w += /[\u1100-\u11ff\u2e80-\ua4cf\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]/.test(ch) ? 1 : 0.58;
    return w * px;
  }

  function fit(s, width, px) {
    if (textWidth(s, px) <= width) return s;
    const chars = Array.from(s);
    while (chars.length > 1 && textWidth(chars.join("") + "…", px) > width) chars.pop();
    return chars.join("") + "…";
  }

  // ------------------------------------------------------------------ DAG layout
  // Layer = the longest chain of dependencies above a node; within a layer, nodes are
  // ordered by the mean position of their neighbours (a few barycentre sweeps), which
  // removes most crossings. A layer wider than the box wraps onto more rows, so the
  // picture never needs horizontal scrolling and its text stays readable.
  function layers(ids, deps) {
    const index = new Map(ids.map((id, i) => [id, i]));
    const layer = new Map();
    const visit = (id, depth) => {
      if (layer.has(id)) return layer.get(id);
      if (depth > ids.length) return 0; // a cycle (the server refuses them): stop
      let l = 0;
      for (const d of deps.get(id) || []) if (index.has(d) && d !== id) l = Math.max(l, visit(d, depth + 1) + 1);
      layer.set(id, l);
      return l;
    };
    for (const id of ids) visit(id, 0);
    const rows = [];
    for (const id of ids) {
      const l = layer.get(id);
      (rows[l] || (rows[l] = [])).push(id);
    }
    const children = new Map(ids.map((id) => [id, []]));
    for (const id of ids) for (const d of deps.get(id) || []) if (children.has(d)) children.get(d).push(id);
    const pos = new Map();
    const place = () => rows.forEach((row) => row.forEach((id, i) => pos.set(id, i / Math.max(row.length, 1))));
    place();
    const mean = (list) => list.length ? list.reduce((a, id) => a + pos.get(id), 0) / list.length : null;
    for (let sweep = 0; sweep < 4; sweep += 1) {
      const down = sweep % 2 === 0;
      const order = down ? rows.slice(1) : rows.slice(0, -1).reverse();
      for (const row of order) {
        const key = new Map(row.map((id) => {
          const m = mean((down ? deps.get(id) || [] : children.get(id)).filter((n) => pos.has(n)));
          return [id, m === null ? pos.get(id) : m];
        }));
        row.sort((a, b) => key.get(a) - key.get(b) || index.get(a) - index.get(b));
        row.forEach((id, i) => pos.set(id, i / Math.max(row.length, 1)));
      }
    }
    return { rows: rows.filter(Boolean), children };
  }

  function layoutDag(ids, deps, width) {
    const { rows, children } = layers(ids, deps);
    const widest = Math.max(1, ...rows.map((r) => r.length));
    const gap = 12;
    const fitted = Math.max(104, Math.min(170, Math.floor((width - gap) / widest) - gap));
    const cols = Math.max(1, Math.floor((width - gap) / (fitted + gap)));
    // A wrapped layer fills the width: fewer, wider boxes read better than more, cut ones.
    const nodeW = cols < widest ? Math.min(170, Math.floor((width - gap) / cols) - gap) : fitted;
    const nodeH = 42;
    const rowGap = 26;
    const at = new Map();
    let y = 8;
    const lines = []; // [ids of one visual row]
    rows.forEach((row, layer) => {
      for (let i = 0; i < row.length; i += cols) {
        const line = row.slice(i, i + cols);
        const span = line.length * nodeW + (line.length - 1) * gap;
        const x0 = Math.max(gap / 2, (width - span) / 2);
        line.forEach((id, k) => at.set(id, { x: x0 + k * (nodeW + gap), y, layer, line: lines.length, col: k }));
        lines.push(line);
        y += nodeH + rowGap;
      }
    });
    return { at, lines, children, nodeW, nodeH, height: y - rowGap + 8, width, layerCount: rows.length };
  }

  // ------------------------------------------------------------------ shared bits
  function statusWord(n) {
    return n.status + (n.attempts > 1 && n.status !== "failed" ? `, retried (attempt ${n.attempts})` : "");
  }

  // Roving tabindex: one element of a picture is in the tab order; arrows move it.
  function rove(items, current, next) {
    if (!next) return;
    for (const item of items) item.setAttribute("tabindex", "-1");
    next.setAttribute("tabindex", "0");
    next.focus();
  }

  // ------------------------------------------------------------------ the DAG
  class Dag {
    constructor(box, caption, hooks) {
      this.box = box;
      this.caption = caption;
      this.hooks = hooks; // {label(node), detail(node), overdue(node), select(id, from)}
      this.shape = "";
      this.svg = null;
      this.items = new Map();
    }

    build(ids, deps, width) {
      const layout = layoutDag(ids, deps, width);
      this.layout = layout;
      const svg = make("svg", {
        class: "dag", width: layout.width, height: layout.height,
        viewBox: `0 0 ${layout.width} ${layout.height}`, role: "list",
        "aria-label": `Graph of the run, ${ids.length} nodes in ${layout.layerCount} layers; `
          + "arrow keys move between nodes (left and right in a layer, up to a dependency, down to a dependant)",
      });
      const edges = make("g", { class: "edges", "aria-hidden": "true" }, svg);
      const { nodeW, nodeH, at } = layout;
      this.edges = [];
      for (const id of ids) {
        const to = at.get(id);
        for (const d of deps.get(id) || []) {
          const from = at.get(d);
          if (!from || d === id) continue;
          const x1 = from.x + nodeW / 2, y1 = from.y + nodeH, x2 = to.x + nodeW / 2, y2 = to.y;
          const bend = Math.max(14, (y2 - y1) / 2);
          const path = make("path", {
            class: "edge", "data-from": d, "data-to": id,
            d: `M${x1},${y1} C${x1},${y1 + bend} ${x2},${y2 - bend} ${x2},${y2}`,
          }, edges);
          this.edges.push(path);
        }
      }
      this.items = new Map();
      let first = true;
      for (const line of layout.lines) {
        for (const id of line) {
          const p = at.get(id);
          const g = make("g", {
            class: "dag-node", role: "listitem", tabindex: first ? "0" : "-1",
            transform: `translate(${p.x},${p.y})`, "data-node-id": id,
          }, svg);
          first = false;
          make("rect", { class: "box", width: nodeW, height: nodeH, rx: 6 }, g);
          make("rect", { class: "fraction", x: 1, y: nodeH - 5, width: 0, height: 4, rx: 2 }, g);
          const icon = text(g, { class: "icon", x: 7, y: 17, "aria-hidden": "true" }, "");
          const name = text(g, { class: "name", x: 22, y: 17 }, "");
          const detail = text(g, { class: "detail", x: 8, y: 33 }, "");
          const flag = text(g, { class: "flag", x: nodeW - 6, y: 14, "text-anchor": "end", "aria-hidden": "true" }, "");
          const title = make("title", {}, g);
          g.addEventListener("focus", () => this.hooks.select(id, "dag"));
          g.addEventListener("click", () => rove(Array.from(this.items.values(), (i) => i.g), null, g));
          g.addEventListener("keydown", (e) => this.key(e, id));
          this.items.set(id, { g, icon, name, detail, flag, title, fraction: g.querySelector(".fraction") });
        }
      }
      this.svg = svg;
      this.box.replaceChildren(svg);
    }

    key(e, id) {
      const { at, lines, children } = this.layout;
      const p = at.get(id);
      let target = null;
      const line = lines[p.line];
      const deps = this.deps.get(id) || [];
      switch (e.key) {
        case "ArrowRight": target = line[p.col + 1] || (lines[p.line + 1] || [])[0]; break;
        case "ArrowLeft": target = line[p.col - 1] || (lines[p.line - 1] || []).slice(-1)[0]; break;
        case "ArrowUp": target = deps.find((d) => at.has(d)) || (lines[p.line - 1] || [])[0]; break;
        case "ArrowDown": target = (children.get(id) || [])[0] || (lines[p.line + 1] || [])[0]; break;
        case "Home": target = lines[0][0]; break;
        case "End": target = lines[lines.length - 1].slice(-1)[0]; break;
        case "Enter": case " ": this.hooks.select(id, "dag", true); e.preventDefault(); return;
        default: return;
      }
      e.preventDefault();
      if (target && this.items.has(target)) rove(Array.from(this.items.values(), (i) => i.g), null, this.items.get(target).g);
    }

    render(w, now) {
      const ids = w.order;
      const width = Math.max(240, Math.floor(this.box.clientWidth || 600));
      const key = `${ids.join("\u0000")}|${Array.from(ids, (id) => (w.deps.get(id) || []).join(",")).join(";")}|${width}`;
      if (key !== this.shape) {
        this.shape = key;
        this.deps = w.deps;
        this.build(ids, w.deps, width);
      }
      const counts = {};
      for (const [id, item] of this.items) {
        const n = w.nodes.get(id);
        if (!n) continue;
        counts[n.status] = (counts[n.status] || 0) + 1;
        const { g } = item;
        g.dataset.status = n.status;
        g.toggleAttribute("data-retried", n.attempts > 1 && n.status !== "failed");
        const overdue = this.hooks.overdue(n, now);
        g.toggleAttribute("data-overdue", overdue);
        item.icon.textContent = ICON[n.status] || "";
        const label = this.hooks.label(n);
        item.name.textContent = fit(label, this.layout.nodeW - 30, 12);
        const detail = this.hooks.short(n, now);
        item.detail.textContent = fit(detail, this.layout.nodeW - 14, 11);
        item.flag.textContent = (overdue ? "⚠" : "") + (n.attempts > 1 && n.status !== "failed" ? `↻${n.attempts}` : "");
        const frac = n.status === "running" ? this.hooks.fraction(n, now) : n.status === "completed" ? 1 : 0;
        item.fraction.setAttribute("width", String(Math.max(0, (this.layout.nodeW - 2) * (frac || 0))));
        const after = (w.deps.get(id) || []).map((d) => this.hooks.label(w.nodes.get(d) || { id: d }));
        const full = `${label}: ${statusWord(n)}${detail ? ", " + detail : ""}${overdue ? ", far past its usual time" : ""}`
          + (after.length ? `; after ${after.join(", ")}` : "; first in the plan");
        g.setAttribute("aria-label", full);
        item.title.textContent = full;
        g.toggleAttribute("data-selected", w.selected === id);
      }
      for (const edge of this.edges) {
        const from = w.nodes.get(edge.dataset.from);
        edge.dataset.done = from && (from.status === "completed" || from.status === "skipped") ? "1" : "0";
      }
      const parts = Object.entries(counts).map(([s, c]) => `${c} ${s}`);
      this.caption.textContent = `${ids.length} nodes in ${this.layout.layerCount} layers, top to bottom: ${parts.join(", ")}.`;
    }

    focus(id) {
      const item = this.items.get(id);
      if (item) rove(Array.from(this.items.values(), (i) => i.g), null, item.g);
    }
  }

  // ------------------------------------------------------------------ the timeline
  function niceStep(seconds, ticks) {
    const raw = seconds / ticks;
    const steps = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400];
    return steps.find((s) => s >= raw) || steps[steps.length - 1];
  }

  class Timeline {
    constructor(box, caption, hooks) {
      this.box = box;
      this.caption = caption;
      this.hooks = hooks; // {label, time(ms), duration(s), select}
      this.shape = "";
      this.rows = new Map();
    }

    build(ids, width) {
      const narrow = width < 560;
      this.labelW = narrow ? 92 : 170;
      this.rowH = 20;
      this.top = 22;
      this.chartW = Math.max(80, width - this.labelW - 14);
      const height = this.top + ids.length * this.rowH + 6;
      const svg = make("svg", {
        class: "timeline", width, height, viewBox: `0 0 ${width} ${height}`, role: "list",
        "aria-label": `Timeline of the run, one row per node (${ids.length}); real times, then the `
          + "predicted schedule up to the expected end; arrow keys move between rows",
      });
      this.axis = make("g", { class: "axis", "aria-hidden": "true" }, svg);
      const body = make("g", {}, svg);
      this.rows = new Map();
      ids.forEach((id, i) => {
        const y = this.top + i * this.rowH;
        const g = make("g", { class: "tl-row", role: "listitem", tabindex: i === 0 ? "0" : "-1", "data-node-id": id }, body);
        make("rect", { class: "row-bg", x: 0, y, width, height: this.rowH }, g);
        const name = text(g, { class: "tl-name", x: 4, y: y + 14 }, "");
        const bars = make("g", { class: "bars" }, g);
        const title = make("title", {}, g);
        g.addEventListener("focus", () => this.hooks.select(id, "timeline"));
        g.addEventListener("keydown", (e) => this.key(e, i));
        g.addEventListener("click", () => rove(Array.from(this.rows.values(), (r) => r.g), null, g));
        this.rows.set(id, { g, name, bars, title, y });
      });
      this.marks = make("g", { class: "marks", "aria-hidden": "true" }, svg);
      this.height = height;
      this.width = width;
      this.ids = ids;
      this.svg = svg;
      this.box.replaceChildren(svg);
    }

    key(e, i) {
      const ids = this.ids;
      let j = null;
      if (e.key === "ArrowDown") j = Math.min(ids.length - 1, i + 1);
      else if (e.key === "ArrowUp") j = Math.max(0, i - 1);
      else if (e.key === "Home") j = 0;
      else if (e.key === "End") j = ids.length - 1;
      else if (e.key === "Enter" || e.key === " ") { this.hooks.select(ids[i], "timeline", true); e.preventDefault(); return; }
      if (j === null) return;
      e.preventDefault();
      rove(Array.from(this.rows.values(), (r) => r.g), null, this.rows.get(ids[j]).g);
    }

    // Each row's spans, in the server's clock (ms): [kind, start, end].
    spans(w, n, now, plan) {
      const out = [];
      const started = n.startedAt;
      const end = n.finishedAt;
      const p = plan.get(n.id);
      if (n.status === "completed" || n.status === "failed") {
        const s = started !== null ? started : end !== null && n.durationMs !== null ? end - n.durationMs : null;
        if (s !== null && end !== null) out.push(["done", s, Math.max(end, s)]);
      } else if (n.status === "skipped" && end !== null) {
        out.push(["skipped", end, end]);
      } else if (n.status === "running" && started !== null) {
        out.push(["elapsed", started, Math.max(now, started)]);
        if (p && p.end !== null && !w.terminal) out.push(["rest", Math.max(now, started), Math.max(p.end, now)]);
      }
      if ((n.status === "pending" || n.status === "failed") && p && p.start !== null && p.end !== null && !w.terminal) {
        const s = Math.max(p.start, now);
        out.push(["pending", s, Math.max(p.end, s)]);
      }
      return out;
    }

    render(w, now, plan, edge) {
      const ids = w.order;
      const width = Math.max(240, Math.floor(this.box.clientWidth || 600));
      const key = `${ids.join("\u0000")}|${width}`;
      if (key !== this.shape) {
        this.shape = key;
        this.build(ids, width);
      }
      const all = new Map();
      let t0 = Infinity;
      let t1 = -Infinity;
      for (const id of ids) {
        const n = w.nodes.get(id);
        if (!n) continue;
        const spans = this.spans(w, n, now, plan);
        all.set(id, spans);
        for (const [, s, e] of spans) { t0 = Math.min(t0, s); t1 = Math.max(t1, e); }
      }
      if (w.startedAt !== null) t0 = Math.min(t0, w.startedAt);
      if (!w.terminal) t1 = Math.max(t1, now, edge === null ? -Infinity : edge);
      if (!Number.isFinite(t0) || !Number.isFinite(t1)) { t0 = now - 1000; t1 = now; }
      if (t1 - t0 < 1000) t1 = t0 + 1000;
      const x = (t) => this.labelW + ((t - t0) / (t1 - t0)) * this.chartW;
      this.svg.dataset.t0 = String(t0);
      this.svg.dataset.t1 = String(t1);
      this.svg.dataset.x0 = String(this.labelW);
      this.svg.dataset.x1 = String(this.labelW + this.chartW);
      this.svg.dataset.now = String(now);
      // The right edge of the predicted bars: the ETA (equal to the schedule's
      // estimated_completion_at while the schedule is fresh).
      let predictedEnd = null;
      for (const spans of all.values()) for (const [kind, , e] of spans) if (kind === "rest" || kind === "pending") predictedEnd = Math.max(predictedEnd ?? e, e);
      if (predictedEnd === null) delete this.svg.dataset.endAt;
      else this.svg.dataset.endAt = String(predictedEnd);

      // Axis: elapsed time since the start.
      this.axis.replaceChildren();
      const step = niceStep((t1 - t0) / 1000, this.chartW > 400 ? 8 : 4) * 1000;
      for (let t = 0; t0 + t <= t1 + 1; t += step) {
        const xx = x(t0 + t);
        make("line", { class: "tick", x1: xx, x2: xx, y1: this.top - 4, y2: this.height - 4 }, this.axis);
        text(this.axis, { class: "tick-label", x: xx, y: 12, "text-anchor": t === 0 ? "start" : "middle" }, this.hooks.duration(t / 1000));
      }
      this.marks.replaceChildren();
      if (!w.terminal) {
        const xn = x(now);
        make("line", { class: "now", x1: xn, x2: xn, y1: this.top - 6, y2: this.height }, this.marks);
        if (predictedEnd !== null) {
          const xe = x(predictedEnd);
          make("line", { class: "eta-line", x1: xe, x2: xe, y1: this.top - 6, y2: this.height }, this.marks);
        }
      }

      const counts = { done: 0, running: 0, pending: 0 };
      ids.forEach((id) => {
        const row = this.rows.get(id);
        const n = w.nodes.get(id);
        if (!row || !n) return;
        const label = this.hooks.label(n);
        row.name.textContent = fit(label, this.labelW - 8, 12);
        row.g.dataset.status = n.status;
        row.g.toggleAttribute("data-selected", w.selected === id);
        row.bars.replaceChildren();
        const words = [];
        for (const [kind, s, e] of all.get(id) || []) {
          const x1 = x(s);
          const wd = kind === "skipped" ? 0 : Math.max(2, x(e) - x1);
          if (kind === "skipped") {
            make("path", { class: "bar skipped", "data-kind": kind, d: `M${x1},${row.y + 4} l5,6 l-5,6 l-5,-6 z` }, row.bars);
          } else {
            make("rect", { class: `bar ${kind}`, "data-kind": kind, "data-start": s, "data-end": e,
                           x: x1, y: row.y + 4, width: wd, height: this.rowH - 8, rx: 2 }, row.bars);
          }
          const span = `${this.hooks.time(s)} to ${this.hooks.time(e)} (${this.hooks.duration((e - s) / 1000)})`;
          if (kind === "done") { words.push(`${n.status}, ran ${span}`); counts.done += 1; }
          else if (kind === "skipped") { words.push(`skipped at ${this.hooks.time(s)}`); counts.done += 1; }
          else if (kind === "elapsed") { words.push(`running since ${this.hooks.time(s)} (${this.hooks.duration((e - s) / 1000)})`); counts.running += 1; }
          else if (kind === "rest") words.push(`expected to end at ${this.hooks.time(e)}`);
          else if (kind === "pending") { words.push(`expected ${span}`); counts.pending += 1; }
        }
        if (!words.length) words.push(n.status === "pending" ? "pending, no prediction yet" : n.status);
        const full = `${label}: ${words.join(", ")}`;
        row.g.setAttribute("aria-label", full);
        row.title.textContent = full;
      });
      const parts = [`${counts.done} finished`, `${counts.running} running`];
      if (!w.terminal) parts.push(`${counts.pending} predicted`);
      this.caption.textContent = `${this.hooks.time(t0)} to ${this.hooks.time(t1)}: ${parts.join(", ")}.`
        + (!w.terminal && predictedEnd !== null ? ` Expected end ${this.hooks.time(predictedEnd)} (the ETA), the dashed line.` : "");
    }

    focus(id) {
      const row = this.rows.get(id);
      if (row) rove(Array.from(this.rows.values(), (r) => r.g), null, row.g);
    }
  }

  return { MAX_NODES, ICON, Dag, Timeline, layers, layoutDag };
})();
