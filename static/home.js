// The home: a live list of runs from the overview stream (GET /workflows as
// text/event-stream, which is what EventSource asks for). All text from the server is set
// with textContent, never parsed as HTML.
"use strict";

(() => {
  const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
  const STATES = ["CREATED", "PENDING", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "CANCELLED"];
  const GOING = new Set(["CREATED", "PENDING", "RUNNING", "PAUSED"]);
  // The state is said in words; the icon and the colour repeat it.
  const ICONS = { CREATED: "○", PENDING: "○", RUNNING: "▶", PAUSED: "⏸", COMPLETED: "✓",
                  FAILED: "✕", CANCELLED: "⊘" };
  const LIST_MAX = 50; // the server's first page (its default limit), and the rows kept
  const MAX_BACKOFF_MS = 10000;
  const RENDER_DELAY_MS = 30; // a first page is 50 frames at once: one redraw for all

  // The filters of a URL's query: state (one or more, comma-separated) and definition_id.
  function filtersOf(url) {
    const q = new URL(url, window.location.href).searchParams;
    const states = (q.get("state") || "").split(",").map((s) => s.trim()).filter((s) => STATES.includes(s));
    const definition = (q.get("definition_id") || "").trim();
    return { states, definition: ID_RE.test(definition) ? definition : "" };
  }

  function queryOf(f) {
    const q = new URLSearchParams();
    if (f.states.length) q.set("state", f.states.join(","));
    if (f.definition) q.set("definition_id", f.definition);
    const text = q.toString();
    return text ? `?${text}` : "";
  }

  function matches(f, s) {
    return (!f.states.length || f.states.includes(s.state))
      && (!f.definition || s.definition_id === f.definition);
  }

  function rank(s) {
    return s.state === "RUNNING" ? 0 : GOING.has(s.state) ? 1 : 2;
  }

  function ms(ts) {
    const t = ts ? Date.parse(ts) : NaN;
    return Number.isNaN(t) ? 0 : t;
  }

  // Running first, the newest start on top (a running run does not jump at each event);
  // then the others, the most recently updated first.
  function before(a, b) {
    const ra = rank(a.s);
    const rb = rank(b.s);
    if (ra !== rb) return ra - rb;
    const ka = ra < 2 ? ms(a.s.started_at) || ms(a.s.updated_at) : ms(a.s.updated_at);
    const kb = rb < 2 ? ms(b.s.started_at) || ms(b.s.updated_at) : ms(b.s.updated_at);
    if (ka !== kb) return kb - ka;
    return a.s.workflow_id < b.s.workflow_id ? -1 : 1;
  }

  class Home {
    // el: {section, caption, filters, state, definition, definitions, clear, error, list,
    // empty, template}; hooks: {open(id), badge(text), duration(s), when(ts), setUrl(query)}.
    constructor(el, hooks) {
      this.el = el;
      this.hooks = hooks;
      this.filters = { states: [], definition: "" };
      this.runs = new Map(); // workflow_id -> {s: summary, at: performance.now(), li}
      this.es = null;
      this.shown = false;
      this.opens = 0; // connections opened on this EventSource
      this.failures = 0;
      this.retryTimer = null;
      this.renderTimer = null;
      this.definitions = new Set();
      this.bind();
      setInterval(() => { if (this.shown) this.tick(); }, 1000);
    }

    bind() {
      const el = this.el;
      el.filters.addEventListener("submit", (e) => { e.preventDefault(); this.applyControls(); });
      el.state.addEventListener("change", () => this.applyControls());
      el.definition.addEventListener("change", () => this.applyControls());
      el.clear.addEventListener("click", () => {
        el.state.value = "";
        el.definition.value = "";
        this.applyControls();
      });
      el.list.addEventListener("click", (e) => {
        const a = e.target.closest("a.run-link");
        if (!a || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
        e.preventDefault(); // a plain click (or Enter) opens the run here; others a new tab
        this.hooks.open(a.dataset.workflowId);
      });
      el.list.addEventListener("keydown", (e) => {
        const a = e.target.closest("a.run-link");
        if (!a) return;
        const links = Array.from(el.list.querySelectorAll("a.run-link"));
        const i = links.indexOf(a);
        let target = null;
        if (e.key === "ArrowDown") target = links[i + 1];
        else if (e.key === "ArrowUp") target = links[i - 1];
        else if (e.key === "Home") target = links[0];
        else if (e.key === "End") target = links[links.length - 1];
        else return;
        e.preventDefault();
        if (target) target.focus();
      });
    }

    applyControls() {
      const el = this.el;
      const definition = el.definition.value.trim();
      if (definition && !ID_RE.test(definition)) {
        this.error("A definition id is 1 to 128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit.");
        return;
      }
      const f = { states: el.state.value ? [el.state.value] : [], definition };
      if (queryOf(f) === queryOf(this.filters) && this.es) return;
      this.filters = f;
      this.hooks.setUrl(queryOf(f));
      this.open();
    }

    // Show the home for a URL's filters, and follow the overview stream.
    show(url) {
      this.shown = true;
      this.el.section.hidden = false;
      const f = filtersOf(url);
      this.filters = f;
      const state = f.states.join(",");
      if (state && !Array.from(this.el.state.options).some((o) => o.value === state)) {
        const option = document.createElement("option");
        option.value = state;
        option.textContent = f.states.join(" or ");
        this.el.state.append(option);
      }
      this.el.state.value = state;
      this.el.definition.value = f.definition;
      this.open();
    }

    hide() {
      this.shown = false;
      this.el.section.hidden = true;
      this.close();
    }

    close() {
      if (this.es) { this.es.close(); this.es = null; }
      if (this.retryTimer !== null) { clearTimeout(this.retryTimer); this.retryTimer = null; }
    }

    error(text) {
      this.el.error.textContent = text || "";
      this.el.error.hidden = !text;
    }

    // A new EventSource for the current filters; the list starts again from its first page.
    open() {
      this.close();
      this.error("");
      for (const r of this.runs.values()) if (r.li) r.li.remove();
      this.runs.clear();
      this.render();
      this.connect();
    }

    connect() {
      this.retryTimer = null;
      const es = new EventSource(`/workflows${queryOf(this.filters)}`);
      this.es = es;
      this.opens = 0;
      this.hooks.badge(this.failures ? "reconnecting" : "connecting");
      es.onopen = () => {
        if (es !== this.es) return;
        this.opens += 1;
        this.failures = 0;
        this.error("");
        this.hooks.badge("live");
        // The browser reconnected by itself: the server sends the first page again; runs
        // no longer in it (expired, or moved out of the first page) are dropped.
        if (this.opens > 1) this.reconcile(es, performance.now());
      };
      es.onerror = () => {
        if (es !== this.es) return;
        this.hooks.badge("reconnecting");
        if (es.readyState === EventSource.CLOSED) {
          // An HTTP error (401, 503...): the browser gave up; find out which, then retry.
          this.es = null;
          this.recover();
        }
      };
      es.addEventListener("run", (e) => {
        if (es !== this.es) return;
        this.onRun(e);
      });
    }

    async recover() {
      this.failures += 1;
      let status = 0;
      try {
        const q = queryOf(this.filters);
        const r = await fetch(`/workflows${q ? `${q}&` : "?"}limit=1`,
                              { headers: { Accept: "application/json" }, cache: "no-store" });
        status = r.status;
      } catch (err) {
        // Offline: retry.
      }
      if (!this.shown || this.es) return;
      if (status === 401 || status === 403) {
        this.error("This server needs a token to list runs: set the access_token cookie " +
                   "(see Security in the README), then reload.");
      } else if (status === 400) {
        this.error("The server refused these filters.");
      }
      const delay = Math.min(MAX_BACKOFF_MS, 1000 * 1.5 ** (this.failures - 1));
      this.retryTimer = setTimeout(() => this.connect(), delay);
    }

    async reconcile(es, since) {
      let page;
      try {
        const r = await fetch(`/workflows${queryOf(this.filters)}`,
                              { headers: { Accept: "application/json" }, cache: "no-store" });
        if (r.status !== 200) return;
        page = await r.json();
      } catch (err) {
        return;
      }
      if (es !== this.es || !page || !Array.isArray(page.workflows)) return;
      const listed = new Set(page.workflows.map((s) => s && s.workflow_id));
      for (const [id, r] of this.runs) {
        if (r.at < since && !listed.has(id)) this.drop(id);
      }
      this.queueRender();
    }

    drop(id) {
      const r = this.runs.get(id);
      if (!r) return;
      if (r.li) r.li.remove();
      this.runs.delete(id);
    }

    onRun(e) {
      window.__homeFrames = (window.__homeFrames || 0) + 1; // for tests
      let s;
      try {
        s = JSON.parse(e.data);
      } catch (err) {
        return;
      }
      if (!s || typeof s !== "object" || typeof s.workflow_id !== "string" || !ID_RE.test(s.workflow_id)) return;
      if (!matches(this.filters, s)) {
        this.drop(s.workflow_id); // it left the filter (say, a RUNNING run completed)
        this.queueRender();
        return;
      }
      const r = this.runs.get(s.workflow_id) || { li: null };
      // A frame older than the figures shown (the server can queue one while it reads the
      // first page, and send it after) would move the bar back: it is ignored.
      if (r.s && ms(s.updated_at) < ms(r.s.updated_at)) return;
      r.s = s;
      r.at = performance.now();
      this.runs.set(s.workflow_id, r);
      if (typeof s.definition_id === "string" && s.definition_id && !this.definitions.has(s.definition_id)
          && ID_RE.test(s.definition_id)) {
        this.definitions.add(s.definition_id);
        const option = document.createElement("option");
        option.value = s.definition_id;
        this.el.definitions.append(option);
      }
      this.queueRender();
    }

    queueRender() {
      if (this.renderTimer !== null) return;
      this.renderTimer = setTimeout(() => { this.renderTimer = null; this.render(); }, RENDER_DELAY_MS);
    }

    render() {
      const ordered = Array.from(this.runs.values()).sort(before);
      for (const r of ordered.slice(LIST_MAX)) this.drop(r.s.workflow_id);
      const rows = ordered.slice(0, LIST_MAX);
      const focused = document.activeElement && document.activeElement.closest
        ? document.activeElement.closest("#runs a.run-link") : null;
      const now = performance.now();
      rows.forEach((r, i) => {
        if (!r.li) r.li = this.row(r.s.workflow_id);
        this.fill(r, now);
        if (this.el.list.children[i] !== r.li) this.el.list.insertBefore(r.li, this.el.list.children[i] || null);
      });
      if (focused && document.activeElement !== focused && focused.isConnected) focused.focus();
      this.caption(rows);
    }

    row(id) {
      const li = this.el.template.content.firstElementChild.cloneNode(true);
      li.dataset.workflowId = id;
      const a = li.querySelector("a.run-link");
      a.dataset.workflowId = id;
      a.href = `/?workflow=${encodeURIComponent(id)}`;
      li.querySelector(".run-id").textContent = id;
      return li;
    }

    fill(r, now) {
      const s = r.s;
      const li = r.li;
      const state = STATES.includes(s.state) ? s.state : "";
      li.dataset.state = state;
      const pct = Math.max(0, Math.min(100, Number(s.percentage) || 0));
      const total = Number.isInteger(s.total_nodes) ? s.total_nodes : 0;
      const done = Number.isInteger(s.completed_nodes) ? s.completed_nodes : 0;
      const failed = Number.isInteger(s.failed_nodes) ? s.failed_nodes : 0;
      li.dataset.percentage = String(pct);
      li.querySelector(".run-state").dataset.state = state;
      li.querySelector(".run-icon").textContent = ICONS[state] || "?";
      li.querySelector(".run-state-text").textContent = state || "unknown";
      const def = li.querySelector(".run-def");
      def.textContent = s.definition_id ? `definition ${s.definition_id}` : "no definition";
      def.classList.toggle("muted", !s.definition_id);
      li.querySelector(".run-bar-fill").style.width = `${pct}%`;
      li.querySelector(".run-pct").textContent = `${pct.toFixed(1)} %`;
      li.querySelector(".run-count").textContent = `${done} of ${total} completed`;
      const failedEl = li.querySelector(".run-failed");
      failedEl.textContent = failed ? `${failed} failed` : "";
      failedEl.hidden = !failed;
      this.fillEta(r, now);
      const n = Number.isInteger(s.watchers) ? s.watchers : 0;
      li.querySelector(".run-watchers").textContent = n === 1 ? "1 watcher" : `${n} watchers`;
      this.fillTime(li.querySelector(".run-started"), s.started_at);
      this.fillTime(li.querySelector(".run-updated"), s.updated_at);
    }

    fillTime(span, ts) {
      const time = span.querySelector("time");
      span.hidden = !ts;
      if (!ts) return;
      time.dateTime = ts;
      time.textContent = this.hooks.when(ts);
    }

    // The ETA of the last frame, counted down since it arrived.
    fillEta(r, now) {
      const s = r.s;
      const eta = r.li.querySelector(".run-eta");
      let text = "";
      if (GOING.has(s.state)) {
        if (typeof s.estimated_remaining_seconds !== "number") text = "estimating time left…";
        else {
          const left = Math.max(0, s.estimated_remaining_seconds - (now - r.at) / 1000);
          text = left < 1 ? "almost done" : `about ${this.hooks.duration(left)} left`;
          eta.dataset.completionAt = String(Math.round(Date.now() + left * 1000));
        }
      }
      if (!text) delete eta.dataset.completionAt;
      eta.textContent = text;
    }

    tick() {
      const now = performance.now();
      for (const r of this.runs.values()) if (r.li && GOING.has(r.s.state)) this.fillEta(r, now);
    }

    caption(rows) {
      const going = rows.filter((r) => r.s.state === "RUNNING").length;
      const what = [];
      if (this.filters.states.length) what.push(this.filters.states.join(" or "));
      if (this.filters.definition) what.push(`of ${this.filters.definition}`);
      const filtered = what.length ? ` (${what.join(", ")})` : "";
      this.el.caption.textContent = `${rows.length} ${rows.length === 1 ? "run" : "runs"}${filtered}, ${going} running`;
      this.el.empty.hidden = rows.length > 0;
      this.el.empty.textContent = rows.length ? "" : what.length
        ? "No run matches these filters yet; new ones appear here as they start."
        : "No runs yet; new ones appear here as they start.";
    }
  }

  window.WfHome = { Home, filtersOf, queryOf };
})();
