// dsm dashboard: plain modern JavaScript, no build step. It reads the JSON API of `dsm api` and
// follows its server-sent events; routes live in the URL's hash (#/, #/instances/ID, #/workers,
// #/schedules, #/start), so the server serves one page.

const TOKEN_KEY = "dsm.api.token";
const STATUSES = ["running", "succeeded", "failed", "cancelled"];
const SINCE = [["", "any time"], ["15m", "last 15 minutes"], ["1h", "last hour"], ["24h", "last 24 hours"],
               ["7d", "last 7 days"]];
const PAGE_SIZES = [25, 50, 100, 200];
const HISTORY_SHOWN = 300; // history entries drawn before "show all"

// -- small DOM helpers ------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// Replaces an element's children; null, undefined and false are left out (as `h` does).
function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

function when(iso) {
  if (!iso) return h("span", { class: "muted" }, "—");
  return h("time", { datetime: iso, title: new Date(iso).toLocaleString() }, ago(iso));
}

function ago(iso) {
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (!Number.isFinite(seconds)) return iso;
  const future = seconds < 0;
  const s = Math.abs(seconds);
  const text = s < 5 ? "just now" : s < 60 ? `${Math.round(s)}s` : s < 3600 ? `${Math.floor(s / 60)}m`
    : s < 86400 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m` : `${Math.floor(s / 86400)}d`;
  if (text === "just now") return text;
  return future ? `in ${text}` : `${text} ago`;
}

function span(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60000);
  return m < 60 ? `${m}m ${Math.round((ms % 60000) / 1000)}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
}

function elapsed(from, to) {
  const a = Date.parse(from);
  const b = to ? Date.parse(to) : Date.now();
  return Number.isFinite(a) && Number.isFinite(b) ? span(b - a) : "";
}

function json(value) {
  return JSON.stringify(value, null, 2);
}

setInterval(() => {
  for (const el of document.querySelectorAll("time[datetime]")) el.textContent = ago(el.getAttribute("datetime"));
}, 10000);

// -- the API ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers(extra = {}) {
  const out = { Accept: "application/json", ...extra };
  if (token()) out.Authorization = `Bearer ${token()}`;
  return out;
}

let asking = null;

function askToken(message) {
  // One dialog for every request that needs the token at once.
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  input.value = "";
  dialog.querySelector("p").textContent = message ||
    "This server asks for a bearer token (DSM_API_TOKEN). It is kept in this browser tab only.";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      asking = null;
      if (dialog.returnValue === "ok" && input.value) {
        sessionStorage.setItem(TOKEN_KEY, input.value.trim());
        resolve(true);
      } else resolve(false);
    }, { once: true });
    dialog.showModal();
  });
  return asking;
}

async function api(method, path, body) {
  for (let tries = 0; ; tries++) {
    const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    if (response.status === 401 && tries < 3) {
      const again = await askToken(token() ? "That token was refused: enter the server's token." : undefined);
      if (again) continue;
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!response.ok) {
      const err = data && data.error ? data.error : { type: `HTTP ${response.status}`, message: text || response.statusText };
      throw new ApiError(response.status, err.type, err.message);
    }
    return data;
  }
}

// A query string of the parameters given (none for "", null or undefined); an array is the
// parameter repeated, once a value.
function query(params) {
  const q = new URLSearchParams();
  for (const [key, given] of Object.entries(params)) {
    for (const value of [given].flat()) if (value !== "" && value !== null && value !== undefined) q.append(key, value);
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

let machinesCache = null;

async function machines() {
  // [{machine, version, digest, ...}] newest definition first, or plain names: both are taken.
  if (!machinesCache) {
    machinesCache = api("GET", "/api/machines").then((data) => {
      const items = Array.isArray(data) ? data : (data && (data.items || data.machines)) || [];
      return items.map((m) => (typeof m === "string" ? { machine: m } : { ...m, machine: m.machine || m.name }));
    }).catch((err) => { machinesCache = null; throw err; });
  }
  return machinesCache;
}

// -- live updates: server-sent events read with fetch (so a token, when known, travels in a header) --

const indicator = document.getElementById("live");

function showLive(state, text) {
  indicator.className = `live ${state}`;
  indicator.textContent = text;
}

// One event stream, for one view: `onEvent({type, data})` for each event; "open" and "lost" when
// the connection comes and goes. It reconnects by itself, resuming after the last event seen.
class Live {
  constructor(url, onEvent) {
    this.url = url;
    this.onEvent = onEvent;
    this.lastId = null;
    this.delay = 500;
    this.abort = new AbortController();
    this.connect();
  }

  close() {
    this.closed = true;
    this.abort.abort();
  }

  async connect() {
    while (!this.closed) {
      try {
        const extra = { Accept: "text/event-stream" };
        if (this.lastId) extra["Last-Event-ID"] = this.lastId;
        const response = await fetch(this.url, { headers: headers(extra), cache: "no-store", signal: this.abort.signal });
        if (response.status === 401) {
          showLive("off", "live: needs token");
          if (!(await askToken())) await sleep(15000);
          continue;
        }
        if (response.status === 404) { this.onEvent({ type: "deleted", data: {} }); return; }
        if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
        showLive("on", "live");
        this.delay = 500;
        this.onEvent({ type: "open", data: {} });
        await this.read(response.body.getReader());
        throw new Error("closed");
      } catch (err) {
        if (this.closed) return;
        showLive("off", "reconnecting");
        this.onEvent({ type: "lost", data: {} });
        await sleep(this.delay);
        this.delay = Math.min(this.delay * 2, 10000);
      }
    }
  }

  async read(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    let event = { type: "message", data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this.closed) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(buffer[cut] === "\r" && buffer[cut + 1] === "\n" ? cut + 2 : cut + 1);
        if (line === "") {
          if (event.data.length) this.dispatch(event.type, event.data.join("\n"));
          event = { type: "message", data: [] };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") event.type = text;
          else if (field === "data") event.data.push(text);
          else if (field === "id") this.lastId = text;
          else if (field === "retry" && /^\d+$/.test(text)) this.delay = Number(text);
        }
      }
    }
  }

  dispatch(type, text) {
    let data;
    try { data = JSON.parse(text); } catch { data = { text }; }
    try { this.onEvent({ type, data }); } catch (err) { console.error(err); }
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Runs `task` at most once per `gap` ms however often it is asked for, and never twice at once.
function throttled(task, gap) {
  let timer = null, running = false, again = false, last = 0;
  const run = async () => {
    timer = null;
    if (running) { again = true; return; }
    running = true;
    last = Date.now();
    try { await task(); } finally {
      running = false;
      if (again) { again = false; schedule(); }
    }
  };
  const schedule = () => {
    if (timer) return;
    timer = setTimeout(run, Math.max(0, gap - (Date.now() - last)));
  };
  schedule.cancel = () => { clearTimeout(timer); timer = null; };
  return schedule;
}

// -- the instance list ----------------------------------------------------------------------------

// What the search box asks for: search attributes, `name=value` (several, separated by spaces or
// commas, must all hold; a pair ends where the next `name=` starts, so a value may hold spaces),
// as the API's `where` takes them (`name:value`); or else an instance id.
function parseSearch(text) {
  const trimmed = text.trim();
  const where = [];
  for (const pair of trimmed ? trimmed.split(/[\s,]+(?=[A-Za-z_][A-Za-z0-9_]*\s*=)/) : []) {
    const found = pair.match(/^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/); // a name as `search:` has them
    if (!found) return { id: trimmed };
    where.push(`${found[1]}:${found[2]}`);
  }
  return { where };
}

// A `where` item (`name:value`) as [name, value]: the name holds no ':', the value may.
function wherePair(item) {
  const cut = item.indexOf(":");
  return [item.slice(0, cut), item.slice(cut + 1)];
}

class ListView {
  constructor(root, params) {
    this.root = root;
    this.filters = {
      status: params.get("status") || "", machine: params.get("machine") || "", since: params.get("since") || "",
      limit: Math.min(Math.max(Math.floor(Number(params.get("limit"))) || 50, 1), 1000), // as the API takes
      where: params.getAll("where").filter(Boolean), // search attributes, `name:value` as the API takes them
    };
    this.after = params.get("after") || "";
    this.back = ListView.pages.get(ListView.key(this.filters, this.after)) || [];
    this.rows = new Map();
    this.latest = new Map(); // id -> the last event's summary and when it came (until the next page)
    this.refresh = throttled(() => this.load(false), 1000);
    this.build();
    this.load(true);
    this.live = new Live("/api/events", (event) => this.onEvent(event));
  }

  static pages = new Map(); // filters -> cursors of the pages before this one, for "Newer"
  static searching = false; // the search box had the focus when this page was asked for: it keeps it

  static key(f, after) {
    return JSON.stringify([f.status, f.machine, f.since, f.limit, f.where, after]);
  }

  go(changes, after = "", back = []) {
    const f = { ...this.filters, ...changes };
    const next = { ...f, after, limit: f.limit === 50 ? "" : f.limit };
    ListView.pages.set(ListView.key(f, after), back);
    const hash = `#/${query(next)}`;
    if ((location.hash || "#/") !== hash) location.hash = hash;
    else { ListView.searching = false; this.refresh(); } // the same page: read it again
  }

  // The search box: attributes filter the list (kept in the address as `where`); an id opens that
  // instance's page when there is one, and says so here otherwise, the list and its filters kept.
  async find(text) {
    fill(this.found);
    const asked = parseSearch(text);
    if (asked.where) { ListView.searching = true; this.go({ where: asked.where }); return; }
    try {
      await api("GET", `/api/instances/${encodeURIComponent(asked.id)}`);
    } catch (err) {
      if (this.disposed) return;
      fill(this.found, h("div", { class: "notice note", id: "search-note" }, err.status === 404
        ? `No instance ${asked.id}. To search by attribute, type name=value (customer=c7).`
        : `${err.type ? `${err.type}: ` : ""}${err.message}`));
      return;
    }
    if (!this.disposed) location.hash = `#/instances/${encodeURIComponent(asked.id)}`;
  }

  clearSearch() {
    this.search.value = "";
    fill(this.found);
    if (this.filters.where.length) { ListView.searching = true; this.go({ where: [] }); }
  }

  build() {
    const chips = h("div", { class: "chips", role: "group", "aria-label": "status" },
      ["", ...STATUSES].map((status) => h("button", {
        class: this.filters.status === status ? "on" : "", dataset: { status },
        onclick: () => this.go({ status }),
      }, status || "all")));
    this.machineSelect = h("select", { id: "filter-machine", onchange: (e) => this.go({ machine: e.target.value }) },
      h("option", { value: "" }, "all machines"),
      this.filters.machine ? h("option", { value: this.filters.machine, selected: true }, this.filters.machine) : null);
    machines().then((list) => {
      for (const m of new Set(list.map((x) => x.machine))) {
        if (m !== this.filters.machine) this.machineSelect.append(h("option", { value: m }, m));
      }
    }).catch(() => {});
    const since = h("select", { id: "filter-since", onchange: (e) => this.go({ since: e.target.value }) },
      SINCE.map(([value, label]) => h("option", { value, selected: value === this.filters.since }, label)));
    if (this.filters.since && !SINCE.some(([v]) => v === this.filters.since)) {
      since.append(h("option", { value: this.filters.since, selected: true }, `since ${this.filters.since}`));
    }
    const limit = h("select", { id: "filter-limit", onchange: (e) => this.go({ limit: Number(e.target.value) }) },
      [...new Set([...PAGE_SIZES, this.filters.limit])].sort((a, b) => a - b)
        .map((n) => h("option", { value: n, selected: n === this.filters.limit }, `${n} a page`)));
    const where = this.filters.where;
    this.search = h("input", { id: "search", type: "search", placeholder: "instance id or name=value",
                               autocomplete: "off", spellcheck: "false",
                               value: where.map((w) => wherePair(w).join("=")).join(" "),
                               onkeydown: (e) => { if (e.key === "Escape") { e.preventDefault(); this.clearSearch(); } } });
    const search = h("form", { class: "search", role: "search", onsubmit: (e) => { e.preventDefault(); this.find(this.search.value); } },
      h("label", { class: "field" }, "Search", this.search));
    const searched = where.length ? h("div", { class: "searched", id: "search-active", "aria-label": "search attributes" },
      where.map((w) => {
        const [name, value] = wherePair(w);
        return h("span", { class: "tag", dataset: { name } }, `${name} = ${value}`,
          h("button", { type: "button", title: `Stop filtering on ${name}`, "aria-label": `Stop filtering on ${name}`,
                        onclick: () => this.go({ where: where.filter((x) => x !== w) }) }, "×"));
      })) : null;
    this.found = h("div");
    this.notice = h("div");
    this.body = h("tbody");
    this.table = h("table", { class: "list", id: "instances" },
      h("thead", {}, h("tr", {}, ["Instance", "Machine", "Status", "State", "Transitions", "Created", "Took"]
        .map((t, i) => h("th", { class: i === 4 ? "num" : "" }, t)))),
      this.body);
    // the pager's buttons are made once, so that a refresh never replaces one under the pointer
    this.shown = h("span", { class: "muted" });
    this.newest = h("button", { id: "page-newest", disabled: true, onclick: () => this.go({}) }, "Newest");
    this.newer = h("button", { id: "page-newer", disabled: true, onclick: () => {
      const back = [...this.back];
      const prev = back.pop();
      this.go({}, prev, back);
    } }, "← Newer");
    this.older = h("button", { id: "page-older", disabled: true,
                               onclick: () => this.go({}, this.next, [...this.back, this.after]) }, "Older →");
    this.pager = h("div", { class: "pager" }, this.shown, this.newest, this.newer, this.older);
    fill(this.root,
      h("div", { class: "filters" }, search, chips,
        h("label", { class: "field" }, "Machine", this.machineSelect),
        h("label", { class: "field" }, "Started", since),
        h("label", { class: "field" }, "Page", limit), searched),
      this.found,
      this.notice,
      h("div", { class: "panel", style: "padding: 0 0 2px" }, this.table),
      this.pager);
    if (ListView.searching) this.search.focus();
    ListView.searching = false;
  }

  async load(first) {
    const f = this.filters;
    const sent = performance.now();
    let page;
    try {
      page = await api("GET", `/api/instances${query({ status: f.status, machine: f.machine, since: f.since,
                                                         where: f.where, limit: f.limit, after: this.after })}`);
    } catch (err) {
      fill(this.notice, h("div", { class: "notice error" }, `Cannot list instances: ${err.message}`));
      return;
    }
    if (this.disposed) return;
    fill(this.notice);
    this.next = page.next;
    // An event that came while the page was on its way is newer than the page: it wins.
    const items = (page.items || []).map((item) => {
      const seen = this.latest.get(item.id);
      return seen && seen.at >= sent ? { ...item, ...seen.data } : item;
    });
    for (const [id, seen] of this.latest) if (seen.at < sent) this.latest.delete(id);
    this.draw(items, first);
  }

  draw(items, first) {
    const seen = new Set();
    const order = [];
    for (const item of items) {
      seen.add(item.id);
      const old = this.rows.get(item.id);
      const sig = this.sig(item);
      if (old && old.sig === sig) { old.item = item; order.push(old.tr); continue; }
      const tr = this.row(item);
      if (!first) tr.classList.add("flash");
      this.rows.set(item.id, { tr, sig, item });
      order.push(tr);
    }
    this.rows = new Map(items.map((item) => [item.id, this.rows.get(item.id)]));
    if (!items.length) {
      const f = this.filters;
      const named = SINCE.find(([v]) => v && v === f.since);
      const since = f.since && (named ? `started in the ${named[1]}` : `started since ${f.since}`);
      const where = f.where.length && `with ${f.where.map((w) => wherePair(w).join(" = ")).join(" and ")}`;
      const text = [`No ${f.status ? `${f.status} ` : ""}instances`, f.machine && `of machine ${f.machine}`,
                    since, where, this.after && "on this page"].filter(Boolean).join(" ");
      fill(this.body, h("tr", {}, h("td", { colspan: 7, class: "empty" }, `${text}.`)));
    } else {
      fill(this.body, ...order);
    }
    this.shown.textContent = items.length ? `${items.length} shown, newest first` : "";
    this.newest.disabled = !this.after;
    this.newer.disabled = !this.back.length;
    this.older.disabled = !this.next;
  }

  sig(item) {
    return `${item.status}|${item.state}|${(item.active || []).join(",")}|${item.transitions}|${(item.waiting || []).length}`;
  }

  row(item) {
    const state = item.state || (item.active || []).join(", ") || (item.error && item.error.state) || "—";
    const waiting = (item.waiting || []).filter((w) => w.kind !== "retry");
    const retrying = (item.waiting || []).filter((w) => w.kind === "retry");
    return h("tr", { dataset: { id: item.id, status: item.status } },
      h("td", { class: "id" }, h("a", { href: `#/instances/${encodeURIComponent(item.id)}` }, item.id)),
      h("td", {}, item.machine, item.version !== null && item.version !== undefined ? h("span", { class: "muted" }, ` v${item.version}`) : null),
      h("td", {}, badge(item.status),
        item.error ? h("span", { class: "muted", title: item.error.message }, ` ${item.error.type}`) : null),
      h("td", {}, h("span", { class: "mono" }, state),
        waiting.map((w) => h("span", { class: "badge waiting", style: "margin-left:6px" }, waitWords(w))),
        retrying.map((w) => h("span", { class: "badge waiting", style: "margin-left:6px" }, `retry ${w.attempt}`))),
      h("td", { class: "num" }, item.transitions),
      h("td", {}, when(item.created_at)),
      h("td", { class: "muted" }, item.finished_at ? elapsed(item.created_at, item.finished_at) : ""));
  }

  // Whether a summary may belong in this list. Summaries carry no search attributes, so with a
  // `where` filter this is only a first sieve: the page is read again, never added to from an event.
  matches(item) {
    const f = this.filters;
    return (!f.status || item.status === f.status) && (!f.machine || item.machine === f.machine);
  }

  onEvent(event) {
    const data = event.data || {};
    if (event.type === "open" || event.type === "resync") { this.refresh(); return; }
    if (event.type === "deleted") { if (this.rows.has(data.id)) this.refresh(); return; }
    if (event.type !== "instance" || !data.id) return;
    if (this.latest.size > 10000) this.latest.clear(); // a flood between two pages: the next page is as new
    this.latest.set(data.id, { data, at: performance.now() });
    const shown = this.rows.get(data.id);
    if (shown) {
      // The event carries the summary: the row changes in place, at once.
      const item = { ...shown.item, ...data };
      const tr = this.row(item);
      tr.classList.add("flash");
      shown.tr.replaceWith(tr);
      this.rows.set(data.id, { tr, item, sig: this.sig(item) });
      // it left the filter, or may have (its attributes are not in the event): the page is read again
      if (!this.matches(item) || this.filters.where.length) this.refresh();
    } else if (!this.after && this.matches(data)) {
      const oldest = [...this.rows.values()].at(-1);
      const full = this.rows.size >= this.filters.limit;
      if (!full || !oldest || data.created_at >= oldest.item.created_at) this.refresh(); // new on the first page
    }
  }

  dispose() {
    this.disposed = true;
    this.refresh.cancel();
    this.live.close();
  }
}

function waitWords(w) {
  if (w.kind === "signal") return `waits for signal ${w.signal}`;
  if (w.kind === "timer") return "waits for a timer";
  if (w.kind === "child") return "waits for a child";
  if (w.kind === "retry") return `retry ${w.attempt}`;
  return `waits (${w.kind})`;
}

// -- the instance page ----------------------------------------------------------------------------

let mermaidLoading = null;

function loadMermaid() {
  if (!mermaidLoading) {
    mermaidLoading = new Promise((resolve, reject) => {
      const script = h("script", { src: "static/vendor/mermaid.min.js" });
      script.onload = () => {
        // States not visited stay plain, so that the marks of the instance's path stand out.
        window.mermaid.initialize({
          startOnLoad: false, securityLevel: "strict", theme: "base", state: { useMaxWidth: false },
          themeVariables: { primaryColor: "#ffffff", primaryBorderColor: "#9aa3b2", primaryTextColor: "#1c2330",
                            lineColor: "#6b7280", edgeLabelBackground: "#f3f4f7", labelBackgroundColor: "#f3f4f7",
                            fontFamily: "system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif",
                            fontSize: "14px" },
        });
        resolve(window.mermaid);
      };
      script.onerror = () => { mermaidLoading = null; reject(new Error("the drawing library did not load")); };
      document.head.append(script);
    });
  }
  return mermaidLoading;
}

let drawings = 0;

class InstanceView {
  constructor(root, id) {
    this.root = root;
    this.id = id;
    this.showAll = false;
    this.eventAt = -1; // when the stream last brought the record
    this.reload = throttled(() => this.load(), 500);
    this.redraw = throttled(() => this.record && this.draw(this.record), 250);
    this.regraph = throttled(() => this.record && this.drawGraph(), 1000);
    fill(this.root, h("div", { class: "empty" }, "Loading…"));
    this.load();
    this.live = new Live(`/api/events${query({ instance: id })}`, (event) => this.onEvent(event));
  }

  async load() {
    const sent = performance.now();
    let record;
    try {
      record = await api("GET", `/api/instances/${encodeURIComponent(this.id)}`);
    } catch (err) {
      if (this.disposed) return;
      if (err.status === 404) this.vanished();
      else this.flash(`Cannot read the instance: ${err.message}`);
      return;
    }
    if (this.disposed || this.gone) return;
    if (this.record && this.eventAt >= sent) {
      // the stream said something since this was read: its record is newer; keep the history read
      this.update({ ...this.record, history: undefined }, record.history || []);
      return;
    }
    this.update(record, record.history || []);
  }

  vanished() {
    this.gone = true;
    this.live.close();
    fill(this.root, h("div", { class: "panel empty", id: "not-found" },
      `No instance ${this.id}: it never existed, or it was deleted (by hand or by retention). `,
      h("a", { href: "#/" }, "Back to the list")));
  }

  // A newer record (without history when it comes from an event) and history entries to add.
  update(record, entries) {
    const old = this.record;
    const history = record.history || (old ? old.history : []);
    let last = history.length ? history[history.length - 1].seq : 0;
    for (const e of entries) if (e.seq > last) { history.push(e); last = e.seq; }
    this.record = { ...record, history };
    const where = (r) => `${r.status}|${r.state}|${(r.active || []).join(",")}|${r.transitions}|${r.redrives}`;
    if (!old) { this.draw(this.record); this.drawGraph(); return; }
    this.redraw();
    if (where(old) !== where(this.record)) this.regraph();
  }

  flash(message, kind = "error") {
    if (!this.notice) {
      fill(this.root, h("div", { class: `notice ${kind}` }, message));
      return;
    }
    fill(this.notice, h("div", { class: `notice ${kind}` }, message));
    if (kind === "ok") setTimeout(() => this.notice && fill(this.notice), 4000);
  }

  draw(r) {
    const first = !this.notice;
    if (first) {
      this.notice = h("div", { id: "notice" });
      this.head = h("div", { class: "title" });
      this.facts = h("div", { class: "panel", id: "facts" });
      this.drawing = h("div", { class: "drawing", id: "drawing" }, h("span", { class: "muted" }, "Drawing…"));
      this.historyPanel = h("div", { class: "panel", id: "history" });
      this.dataPanel = h("div", { class: "grid", id: "data" });
      fill(this.root, this.notice, this.head, this.facts,
        h("div", { class: "split" },
          h("div", { class: "panel" }, h("h2", {}, "Machine"), this.drawing,
            h("div", { class: "legend" }, h("span", { class: "l-visited" }, "went through"),
              h("span", { class: "l-active" }, "active now"), h("span", { class: "l-failed" }, "failed here"),
              h("span", { class: "l-taken" }, "transition taken"),
              h("em", {}, "click a state to find it in the history"))),
          this.historyPanel),
        this.dataPanel);
    }
    const running = r.status === "running";
    const finished = !running;
    const failureTerminal = r.status === "failed" && !r.error && r.state;
    if (first) {
      // made once and only enabled or disabled after, so that a button is never replaced under the pointer
      this.buttons = {
        signal: h("button", { id: "act-signal", onclick: () => this.signal() }, "Signal…"),
        cancel: h("button", { id: "act-cancel", onclick: () => this.cancel() }, "Cancel…"),
        redrive: h("button", { id: "act-redrive", class: "primary", onclick: () => this.redrive() }, "Redrive"),
        remove: h("button", { id: "act-delete", class: "danger", onclick: () => this.remove() }, "Delete"),
      };
      this.status = h("span", { id: "status" });
      this.machine = h("span", { class: "muted" });
      fill(this.head, h("h1", { id: "instance-id", class: "mono" }, r.id), this.status, this.machine,
        h("div", { class: "actions" }, Object.values(this.buttons)));
    }
    fill(this.status, badge(r.status));
    fill(this.machine, r.machine, r.version !== null && r.version !== undefined ? ` v${r.version}` : "");
    this.buttons.signal.disabled = !running;
    this.buttons.cancel.disabled = !running;
    this.buttons.redrive.disabled = !(r.status === "failed" || r.status === "cancelled") || Boolean(failureTerminal);
    this.buttons.redrive.title = failureTerminal ? "It ended in a failure state: start a new instance instead" : "";
    this.buttons.remove.disabled = !finished;

    const facts = [
      ["State", r.state ? h("span", { class: "mono" }, r.state) : null],
      ["Active", (r.active || []).length ? r.active.map((s) => h("span", { class: "tag" }, s)) : null],
      ["Created", r.created_at ? when(r.created_at) : null],
      ["Finished", r.finished_at ? when(r.finished_at) : null],
      ["Took", r.finished_at ? elapsed(r.created_at, r.finished_at) : null],
      ["Transitions", String(r.transitions)],
      ["Redrives", r.redrives ? String(r.redrives) : null],
      ["Parent", r.parent ? [h("a", { href: `#/instances/${encodeURIComponent(r.parent.id)}` }, r.parent.id),
                             h("span", { class: "muted" }, ` at ${r.parent.state}`)] : null],
      ["Cancelled", r.cancel ? `${r.cancel.reason || "no reason given"}${r.cancel.by ? ` — by ${r.cancel.by}` : ""}` : null],
      ["Kept until", r.expires_at ? when(r.expires_at) : null],
      ["Definition", h("span", { class: "mono", title: r.digest }, (r.digest || "").slice(0, 19))],
    ].filter(([, v]) => v !== null && v !== undefined);
    const parts = [];
    if (r.error) {
      const e = r.error;
      parts.push(h("div", { class: "error-box", id: "error" },
        h("div", { class: "what" }, `${e.type} in state ${e.state} after ${e.attempts} attempt${e.attempts === 1 ? "" : "s"}: ${e.message}`),
        e.traceback ? h("pre", { class: "traceback" }, e.traceback) : h("div", { class: "muted" }, "no traceback: this error was not raised by the handler")));
    }
    for (const w of r.waiting || []) parts.push(this.waitBox(w));
    parts.push(h("div", { class: "facts" }, facts.map(([k, v]) => h("div", {}, h("div", { class: "k" }, k), h("div", { class: "v" }, v)))));
    if ((r.signals || []).length) {
      parts.push(h("h2", { style: "margin-top:12px" }, "Signals received, not yet consumed"),
        h("ul", {}, r.signals.map((s) => h("li", {}, h("span", { class: "tag" }, s.name),
          s.outcome ? ` outcome ${s.outcome} ` : " ", when(s.at)))));
    }
    fill(this.facts, ...parts);
    this.drawHistory(r);
    fill(this.dataPanel,
      h("div", { class: "panel" }, h("h2", {}, "Payload"), h("pre", { id: "payload" }, json(r.payload))),
      h("div", { class: "panel" }, h("h2", {}, "Input"),
        r.input !== null && r.input !== undefined ? h("pre", {}, json(r.input))
          : h("div", { class: "muted" }, "not kept (over 256 KiB): only its digest is")));
  }

  waitBox(w) {
    const what = {
      signal: [`Waits for signal `, h("span", { class: "tag" }, w.signal)],
      timer: ["Waits for a timer"],
      child: ["Waits for its child ", w.child ? h("a", { href: `#/instances/${encodeURIComponent(w.child)}` }, w.child) : ""],
      retry: [`Attempt ${w.attempt} will run`],
    }[w.kind] || [`Waits (${w.kind})`];
    const branch = (w.branch || []).length ? ` in branch ${w.branch.join(" / ")}` : "";
    const until = w.until ? (Date.parse(w.until) > Date.now() ? [" — ", when(w.until)] : [" — due now"])
      : w.kind === "retry" ? "" : [" — until it comes"];
    return h("div", { class: "wait-box", dataset: { kind: w.kind } },
      h("div", {}, ...what, ` at state `, h("span", { class: "mono" }, w.state), branch, ...[until].flat()),
      w.last_error ? this.failure({ error: w.last_error, attempt: w.attempt - 1 }, true) : null);
  }

  failure(f, open = false) {
    const e = f.error || {};
    const where = [f.worker ? ` on ${f.worker}` : "", f.duration_ms !== undefined ? ` after ${span(f.duration_ms)}` : ""].join("");
    return h("details", { class: "attempt", open },
      h("summary", {}, `attempt ${f.attempt} failed${where}: ${e.type}: ${e.message}`),
      e.traceback ? h("pre", { class: "traceback" }, e.traceback) : null);
  }

  drawHistory(r) {
    const history = r.history || [];
    const shown = this.showAll ? history : history.slice(-HISTORY_SHOWN);
    const body = h("tbody");
    for (const e of shown) {
      const next = e.next.length ? e.next.join(", ") : "end";
      const extra = [];
      if (e.signal) extra.push(h("span", { class: "tag" }, `signal ${e.signal.name}${e.signal.outcome ? ` → ${e.signal.outcome}` : ""}`));
      if (e.child) extra.push(h("a", { href: `#/instances/${encodeURIComponent(e.child)}` }, `child ${e.child}`));
      body.append(h("tr", { dataset: { state: e.state, seq: e.seq }, class: e.state === this.selected ? "sel" : null },
        h("td", { class: "num" }, e.seq),
        h("td", {}, when(e.at)),
        h("td", {}, h("span", { class: "mono" }, e.state), h("span", { class: "arrow" }, "→"), h("span", { class: "mono" }, next)),
        h("td", {}, (e.branch || []).join(" / ")),
        h("td", {}, e.outcome ?? "", ...extra),
        h("td", { class: "num" }, e.attempt),
        h("td", { class: "num" }, span(e.duration_ms)),
        h("td", { class: "muted" }, e.worker)));
      if ((e.failures || []).length) {
        body.append(h("tr", { class: "failures" }, h("td", {}), h("td", { colspan: 7, class: "fail" },
          e.failures.map((f) => this.failure(f)))));
      }
    }
    const hidden = history.length - shown.length;
    fill(this.historyPanel,
      h("h2", {}, `History (${history.length} transition${history.length === 1 ? "" : "s"})`),
      hidden ? h("div", { class: "muted" }, `${hidden} earlier transitions not shown. `,
        h("a", { href: "javascript:void 0", onclick: () => { this.showAll = true; this.drawHistory(r); } }, "Show all")) : null,
      history.length ? h("table", { class: "list history" },
        h("thead", {}, h("tr", {}, ["#", "At", "Transition", "Branch", "Outcome", "Attempt", "Took", "Worker"]
          .map((t) => h("th", {}, t)))), body)
        : h("div", { class: "empty" }, "No transition yet."));
  }

  async drawGraph() {
    let graph;
    try {
      graph = await api("GET", `/api/instances/${encodeURIComponent(this.id)}/graph`);
    } catch (err) {
      if (!this.disposed && !this.gone) fill(this.drawing, h("span", { class: "muted" }, `No drawing: ${err.message}`));
      return;
    }
    this.signals = graph.signals || [];
    const text = graph.mermaid;
    if (text === this.drawn || this.disposed) return;
    this.drawn = text;
    const name = `dsm-drawing-${++drawings}`;
    try {
      const mermaid = await loadMermaid();
      const { svg } = await mermaid.render(name, text);
      if (this.disposed || this.drawn !== text) return;
      this.drawing.innerHTML = svg; // mermaid's own output, sanitized by it (securityLevel strict)
      this.decorate(graph, name);
      this.drawing.dataset.drawn = graph.status;
    } catch (err) {
      fill(this.drawing, h("div", { class: "notice error" }, `Drawing failed: ${err.message || err}`), h("pre", {}, text));
    }
  }

  // Marks the transitions taken, names each state's tick and visits in a tooltip, and makes a
  // click on a state pick out its entries in the history. Mermaid numbers edges in the order of
  // the text's transitions (`name-edgeN`) and names nodes `name-state-ID-N`, ids as in the graph.
  decorate(graph, name) {
    const nodes = graph.nodes || [];
    const byId = new Map(nodes.map((n) => [n.id, n]));
    for (const g of this.drawing.querySelectorAll("svg g.node")) {
      const found = g.id.match(/-state-(.+)-\d+$/);
      const node = found && byId.get(found[1]);
      if (!node || node.kind !== "state") continue;
      g.dataset.state = node.state;
      const lines = [node.state, node.tick && `tick ${node.tick}`, node.label,
                     node.visits ? `visited ${node.visits}×` : "not visited", node.active && "active now",
                     node.failed && "failed here"].filter(Boolean);
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = lines.join("\n");
      g.prepend(title);
      g.classList.add("pick");
      g.addEventListener("click", () => this.select(node.state));
    }
    const start = (nodes.find((n) => n.kind === "start") || {}).id;
    const final = this.record && this.record.state && (nodes.find((n) => n.kind === "state" && n.state === this.record.state) || {}).id;
    const taken = new Set((graph.edges || []).filter((e) => e.taken).map((e) => `${e.source} ${e.target}`));
    const transitions = [...graph.mermaid.matchAll(/^\s*(\S+) --> (\S+?)(?:\s*:.*)?$/gm)];
    transitions.forEach(([, source, target], i) => {
      const from = source === "[*]" ? start : source;
      const on = target === "[*]" ? from === final : taken.has(`${from} ${target}`);
      const edge = document.getElementById(`${name}-edge${i}`);
      if (on && edge) edge.classList.add("taken");
    });
  }

  select(state) {
    const rows = [...this.historyPanel.querySelectorAll("tr[data-state]")];
    const again = rows.some((tr) => tr.dataset.state === state && tr.classList.contains("sel"));
    for (const tr of rows) tr.classList.toggle("sel", !again && tr.dataset.state === state);
    this.selected = again ? null : state;
    const first = rows.find((tr) => tr.classList.contains("sel"));
    if (first) first.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  // -- actions

  async act(label, call, after) {
    try {
      const result = await call();
      this.flash(label, "ok");
      if (after) after(result); else this.reload();
      return true;
    } catch (err) {
      this.flash(`${err.type ? `${err.type}: ` : ""}${err.message}`);
      return false;
    }
  }

  // The signals the instance's machine takes, with their outcomes (from its graph route): the
  // form offers only those, as the API refuses anything else (422).
  async takes() {
    if (!this.signals) {
      const graph = await api("GET", `/api/instances/${encodeURIComponent(this.id)}/graph`);
      this.signals = graph.signals || [];
    }
    return this.signals;
  }

  async signal() {
    let takes;
    try {
      takes = await this.takes();
    } catch (err) {
      this.flash(`Cannot offer the signals of this instance's machine: ${err.message}`);
      return;
    }
    if (!takes.length) {
      this.flash(`Machine ${this.record.machine} waits for no signals.`);
      return;
    }
    const waiting = (this.record.waiting || []).filter((w) => w.kind === "signal").map((w) => w.signal);
    const chosen = (takes.find((s) => waiting.includes(s.name)) || takes[0]).name;
    const name = h("select", { id: "signal-name", required: true }, takes.map((s) =>
      h("option", { value: s.name, selected: s.name === chosen },
        waiting.includes(s.name) ? `${s.name} (waited for now)` : s.name)));
    const outcome = h("select", { id: "signal-outcome" });
    const offer = () => {
      const s = takes.find((t) => t.name === name.value);
      const none = s.outcomes.length ? "none" : "none: its states route without one";
      fill(outcome, s.outcome_required ? null : h("option", { value: "" }, none),
        s.outcomes.map((label) => h("option", { value: label }, label)));
      outcome.disabled = !s.outcomes.length;
    };
    name.addEventListener("change", offer);
    offer();
    const payload = h("textarea", { id: "signal-payload", spellcheck: "false" }, "{}");
    dialog("Send a signal", [
      h("label", { class: "field" }, "Signal", name),
      h("label", { class: "field" }, "Outcome", outcome),
      h("label", { class: "field" }, "Payload (a JSON object)", payload)], "Send", async () => {
      const body = { payload: parseObject(payload.value) };
      if (outcome.value) body.outcome = outcome.value;
      await api("POST", `/api/instances/${encodeURIComponent(this.id)}/signals/${encodeURIComponent(name.value)}`, body);
      this.flash(`Signal ${name.value} sent.`, "ok");
      this.reload();
    });
  }

  cancel() {
    const reason = h("input", { id: "cancel-reason", placeholder: "why" });
    dialog("Cancel this instance", [
      h("p", { class: "muted" }, "Pending work stops; a cancelled instance can be redriven later."),
      h("label", { class: "field" }, "Reason", reason)], "Cancel instance", async () => {
      await api("POST", `/api/instances/${encodeURIComponent(this.id)}/cancel`, { reason: reason.value.trim() || null });
      this.flash("Cancelled.", "ok");
      this.reload();
    });
  }

  redrive() {
    this.act("Redriven: it continues where it stopped.",
      () => api("POST", `/api/instances/${encodeURIComponent(this.id)}/redrive`));
  }

  remove() {
    dialog("Delete this instance", [
      h("p", {}, "Its record, history and index entries are deleted now, as retention would later.")],
    "Delete", async () => {
      await api("DELETE", `/api/instances/${encodeURIComponent(this.id)}`);
      location.hash = "#/";
    });
  }

  onEvent(event) {
    if (this.gone) return;
    const data = event.data || {};
    if (event.type === "resync") this.reload();
    else if (event.type === "deleted") this.vanished();
    else if (event.type === "history" && data.id === this.id && this.record) {
      const { id, ...entry } = data;
      this.update({ ...this.record, history: undefined }, [entry]);
    } else if (event.type === "instance" && data.id === this.id) {
      this.eventAt = performance.now();
      const { history, ...record } = data;
      if (this.record) this.update(record, history || []);
      else this.reload();
    }
  }

  dispose() {
    this.disposed = true;
    this.live.close();
    this.reload.cancel();
    this.redraw.cancel();
    this.regraph.cancel();
  }
}

function parseObject(text) {
  const trimmed = text.trim();
  if (!trimmed) return {};
  let value;
  try { value = JSON.parse(trimmed); } catch (err) { throw new ApiError(0, "InvalidJSON", `the payload is not JSON: ${err.message}`); }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new ApiError(0, "InvalidPayload", "the payload must be a JSON object");
  }
  return value;
}

// A modal form: `submit` runs on OK; the dialog stays open with the error when it throws.
function dialog(title, body, okLabel, submit) {
  const el = document.getElementById("action-dialog");
  const error = document.getElementById("action-error");
  const ok = document.getElementById("action-ok");
  document.getElementById("action-title").textContent = title;
  fill(document.getElementById("action-body"), h("div", { class: "form" }, body));
  error.hidden = true;
  ok.textContent = okLabel;
  const form = el.querySelector("form");
  const onSubmit = async (e) => {
    if (e.submitter && e.submitter.value !== "ok") return;
    e.preventDefault();
    ok.disabled = true;
    try {
      await submit();
      el.close("ok");
    } catch (err) {
      error.textContent = `${err.type ? `${err.type}: ` : ""}${err.message}`;
      error.hidden = false;
    } finally {
      ok.disabled = false;
    }
  };
  form.addEventListener("submit", onSubmit);
  el.addEventListener("close", () => form.removeEventListener("submit", onSubmit), { once: true });
  el.showModal();
}

// -- workers --------------------------------------------------------------------------------------

class PolledView {
  // A page read from one route and read again every 5 s (and when asked, at most every 2 s).
  constructor(root, path, what) {
    this.root = root;
    this.path = path;
    this.what = what;
    this.refresh = throttled(() => this.load(), 2000);
    this.timer = setInterval(() => this.refresh(), 5000);
    showLive("on", "refreshed every 5 s");
    fill(this.root, h("div", { class: "empty" }, "Loading…"));
    this.load();
  }

  async load() {
    let data;
    try {
      data = await api("GET", this.path);
    } catch (err) {
      if (!this.disposed) fill(this.root, h("div", { class: "notice error" }, `Cannot list ${this.what}: ${err.message}`));
      return;
    }
    if (!this.disposed) this.render(data);
  }

  dispose() {
    this.disposed = true;
    this.refresh.cancel();
    clearInterval(this.timer);
  }
}

class WorkersView extends PolledView {
  constructor(root) {
    super(root, "/api/workers", "workers");
  }

  render(data) {
    const workers = Array.isArray(data) ? data : (data && (data.items || data.workers)) || [];
    const alarms = (data && data.alarms) || [];
    const total = workers.reduce((n, w) => n + (w.concurrency || 0), 0);
    const busy = workers.reduce((n, w) => n + (w.in_flight || 0), 0);
    const served = (list) => (list || []).map((d) => h("span", { class: "tag", title: d.digest },
      `${d.machine}${d.version !== null && d.version !== undefined ? ` v${d.version}` : ""}`));
    fill(this.root,
      h("div", { class: "title" }, h("h1", {}, "Workers"),
        h("span", { class: "muted" }, workers.length ? `${workers.length} live, ${busy} of ${total} slots busy` : "")),
      alarms.length ? h("div", { class: "notice error", id: "alarms" },
        `etcd raised ${alarms.join(", ")}: workers write nothing until an operator makes room and disarms it.`) : null,
      h("div", { class: "panel", style: "padding: 0 0 2px" }, workers.length ? h("table", { class: "list", id: "workers" },
        h("thead", {}, h("tr", {}, ["Worker", "Host", "PID", "In flight", "Serves", "Cannot run", "Allows", "Started", "Heartbeat"]
          .map((t) => h("th", {}, t)))),
        h("tbody", {}, workers.map((w) => h("tr", { dataset: { id: w.id } },
          h("td", { class: "mono" }, w.id),
          h("td", {}, w.host),
          h("td", { class: "num" }, w.pid),
          h("td", {}, h("div", { title: `${w.in_flight} of ${w.concurrency}` }, `${w.in_flight} / ${w.concurrency}`,
            h("div", { class: "bar" }, h("i", { style: `width:${w.concurrency ? Math.round(100 * w.in_flight / w.concurrency) : 0}%` })))),
          h("td", {}, served(w.definitions)),
          h("td", {}, served(w.refused)),
          h("td", { class: "mono muted" }, w.allow === null ? "any module" : [...(w.allow || []), ...(w.functions || [])].join(", ")),
          h("td", {}, when(w.started_at)),
          h("td", {}, when(w.updated_at))))))
        : h("div", { class: "empty" }, "No live worker in this namespace. Start one with ", h("code", {}, "dsm worker PATH --etcd URL"), ".")));
  }
}

// -- schedules ------------------------------------------------------------------------------------

function scheduleWhen(s) {
  if (s.cron !== null && s.cron !== undefined) return `cron ${s.cron} (${s.timezone})`;
  return `every ${span(s.every * 1000)}`;
}

class SchedulesView extends PolledView {
  constructor(root) {
    super(root, "/api/schedules", "schedules");
  }

  async act(method, path, body) {
    try {
      await api(method, path, body);
    } catch (err) {
      if (!this.disposed) this.root.prepend(h("div", { class: "notice error" }, `${err.type ? `${err.type}: ` : ""}${err.message}`));
      return;
    }
    this.load();
  }

  render(data) {
    const schedules = (data && data.items) || [];
    const path = (s, action) => `/api/schedules/${encodeURIComponent(s.name)}/${action}`;
    const panel = (s) => h("div", { class: "panel schedule", dataset: { name: s.name } },
      h("div", { class: "title" }, h("h2", {}, s.name),
        h("a", { href: `#/?machine=${encodeURIComponent(s.machine)}`, class: "tag" }, s.machine),
        h("span", { class: "muted" }, `${scheduleWhen(s)} · overlap ${s.overlap}`),
        s.paused ? h("span", { class: "badge waiting paused" }, "paused") : null,
        h("span", { class: "spacer" }),
        h("button", { class: "trigger", onclick: () => this.act("POST", path(s, "trigger"), {}) }, "Run now"),
        s.paused
          ? h("button", { class: "unpause", onclick: () => this.act("POST", path(s, "unpause"), {}) }, "Unpause")
          : h("button", { class: "pause", onclick: () => this.act("POST", path(s, "pause"), {}) }, "Pause")),
      s.paused && s.note ? h("div", { class: "notice note" }, `Paused: ${s.note}`) : null,
      h("div", { class: "muted counts" }, `${s.fires} started · ${s.skips} skipped by overlap · ${s.misses} missed`
        + (s.buffered ? ` · one buffered (due ${new Date(s.buffered).toLocaleString()})` : "")),
      h("div", { class: "next" }, h("strong", {}, "Next: "), s.paused || !s.next.length
        ? h("span", { class: "muted" }, s.paused ? "none while paused" : "none")
        : s.next.map((iso) => h("span", { class: "tag" }, when(iso), " ", new Date(iso).toLocaleString()))),
      s.runs.length ? h("table", { class: "list runs" },
        h("thead", {}, h("tr", {}, ["Due", "What", "Instance"].map((t) => h("th", {}, t)))),
        h("tbody", {}, [...s.runs].reverse().map((r) => h("tr", {},
          h("td", {}, when(r.due)),
          h("td", {}, r.action + (r.count ? ` ×${r.count}` : "")),
          h("td", { class: "mono" }, r.id ? h("a", { href: `#/instances/${encodeURIComponent(r.id)}` }, r.id)
            : h("span", { class: "muted" }, "—"))))))
        : h("div", { class: "muted" }, "No run yet."));
    fill(this.root,
      h("div", { class: "title" }, h("h1", {}, "Schedules"),
        h("span", { class: "muted" }, schedules.length ? `${schedules.length} in this namespace` : "")),
      schedules.length ? schedules.map(panel)
        : h("div", { class: "empty" }, "No schedule in this namespace. Create one with ",
          h("code", {}, "dsm schedule create NAME --machine M --cron \"0 * * * *\""), "."));
  }
}

// -- start an instance ----------------------------------------------------------------------------

class StartView {
  constructor(root, params) {
    this.root = root;
    const machine = h("select", { id: "start-machine", required: true });
    const id = h("input", { id: "start-id", placeholder: "optional: a generated UUIDv7 otherwise",
                            pattern: "[A-Za-z0-9][A-Za-z0-9._:-]{0,127}" });
    const payload = h("textarea", { id: "start-payload", spellcheck: "false", rows: 10 }, "{}");
    const notice = h("div");
    const version = h("div", { class: "muted" });
    const submit = h("button", { class: "primary", id: "start-submit", type: "submit" }, "Start");
    const form = h("form", { class: "form panel", onsubmit: async (e) => {
      e.preventDefault();
      submit.disabled = true;
      try {
        const body = { payload: parseObject(payload.value) };
        if (id.value.trim()) body.id = id.value.trim();
        const record = await api("POST", `/api/machines/${encodeURIComponent(machine.value)}/instances`, body);
        location.hash = `#/instances/${encodeURIComponent(record.id)}`;
      } catch (err) {
        fill(notice, h("div", { class: "notice error" }, `${err.type ? `${err.type}: ` : ""}${err.message}`));
      } finally {
        submit.disabled = false;
      }
    } },
    h("label", { class: "field" }, "Machine", machine), version,
    h("label", { class: "field" }, "Payload (a JSON object)", payload),
    h("label", { class: "field" }, "Instance id", id),
    notice, h("div", {}, submit));
    fill(this.root, h("div", { class: "title" }, h("h1", {}, "Start an instance")),
      h("p", { class: "muted" }, "Starts an instance of the newest definition registered for the machine."), form);
    machines().then((list) => {
      const seen = new Set();
      for (const m of list) {
        if (seen.has(m.machine)) continue;
        seen.add(m.machine);
        machine.append(h("option", { value: m.machine, selected: m.machine === params.get("machine") }, m.machine));
      }
      const describe = () => {
        const m = list.find((x) => x.machine === machine.value);
        version.textContent = m ? [m.version !== undefined && m.version !== null ? `version ${m.version}` : "",
          m.digest ? m.digest.slice(0, 19) : "", m.description || ""].filter(Boolean).join(" · ") : "";
      };
      machine.addEventListener("change", describe);
      describe();
      if (!list.length) fill(notice, h("div", { class: "notice error" }, "No machine is registered yet: a worker or dsm submit registers one."));
    }).catch((err) => fill(notice, h("div", { class: "notice error" }, `Cannot list machines: ${err.message}`)));
  }

  dispose() {}
}

// -- routing --------------------------------------------------------------------------------------

const root = document.getElementById("view");
let view = null;

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, search = ""] = hash.split("?");
  const params = new URLSearchParams(search);
  if (view) view.dispose();
  showLive("", "");
  let nav = "list";
  const instance = path.match(/^\/instances\/(.+)$/);
  if (instance) {
    view = new InstanceView(root, decodeURIComponent(instance[1]));
    nav = "";
    document.title = `${decodeURIComponent(instance[1])} · dsm`;
  } else if (path === "/workers") {
    view = new WorkersView(root);
    nav = "workers";
    document.title = "workers · dsm";
  } else if (path === "/schedules") {
    view = new SchedulesView(root);
    nav = "schedules";
    document.title = "schedules · dsm";
  } else if (path === "/start") {
    view = new StartView(root, params);
    nav = "start";
    document.title = "start · dsm";
  } else {
    view = new ListView(root, params);
    document.title = "instances · dsm";
  }
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("current", a.dataset.nav === nav);
}

window.addEventListener("hashchange", route);
route();
