// The dashboard's pages, drawn from the JSON endpoints (/api/...). Data is
// only ever set as text (never as HTML), so nothing a work carries can run.
"use strict";

const STATES = ["PENDING", "SCHEDULED", "IN_PROGRESS", "DONE", "FAILED", "CANCELLED"];
const CHART_POINTS = 300; // the charts show the last five minutes (one point a second)
const TAIL_ROWS = 200;
let me = null; // {name, roles, access_checked, logged_in}
let cleanup = []; // what the current view must stop when another is shown

// --- small helpers -----------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

const fmt = new Intl.NumberFormat();
function num(value) { return fmt.format(value); }
function age(seconds) {
  if (!seconds) return "—";
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}
function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}
function mayAdmin() { return me !== null && me.roles.includes("admin"); }
function workLink(id) { return el("a", {href: `/works/${encodeURIComponent(id)}`, text: id}); }

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const init = {method: options.method || "GET", headers: {"Accept": "application/json"}, credentials: "same-origin"};
  if (init.method !== "GET") {
    init.headers["X-Dworkers"] = "1";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body || {});
  }
  const response = await fetch(path, init);
  let body = {};
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    if (response.status === 401 && !path.startsWith("/api/login")) toLogin();
    throw new HttpError(response.status, body.error || response.statusText);
  }
  return body;
}

function toLogin() {
  if (location.pathname !== "/login") {
    history.pushState(null, "", `/login?next=${encodeURIComponent(location.pathname + location.search)}`);
    route();
  }
}

function notice(text, isError = false) {
  return el("p", {class: isError ? "notice error" : "notice", role: isError ? "alert" : "status", text});
}

// A live stream of server-sent events, closed when the view changes.
function live(path, handlers) {
  const source = new EventSource(path);
  for (const [event, handle] of Object.entries(handlers)) {
    source.addEventListener(event, (e) => handle(e.data ? JSON.parse(e.data) : null));
  }
  cleanup.push(() => source.close());
  return source;
}

// --- overview ----------------------------------------------------------------

function chart(id, caption) {
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", `0 0 ${CHART_POINTS} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-labelledby", `${id}-caption`);
  svg.append(line);
  const latest = el("span", {id: `${id}-latest`, text: "—"});
  const figure = el("figure", {id}, el("figcaption", {id: `${id}-caption`}, `${caption}: `, latest), svg);
  const points = [];
  return {
    figure,
    add(value, label) {
      points.push(value);
      if (points.length > CHART_POINTS) points.shift();
      const top = Math.max(1, ...points);
      const offset = CHART_POINTS - points.length;
      line.setAttribute("points", points.map((v, i) => `${offset + i},${(100 - (v / top) * 96).toFixed(1)}`).join(" "));
      latest.textContent = `${label} (peak ${num(Math.round(top))})`;
    },
  };
}

function card(label, id) {
  return el("div", {class: "card"}, el("div", {class: "label", id: `${id}-label`, text: label}),
    el("div", {class: "value", id, "aria-labelledby": `${id}-label ${id}`, text: "—"}));
}

function showOverview(main) {
  const master = el("p", {id: "master", text: "Looking for the active master…"});
  const standbys = el("p", {id: "standbys", class: "muted"});
  const counts = el("div", {class: "cards"},
    STATES.map((s) => card(s.replace("_", " ").toLowerCase().replace(/^./, (c) => c.toUpperCase()), `count-${s}`)),
    card("Oldest pending", "oldest-pending"), card("Worker slots", "worker-slots"));
  const throughput = chart("throughput", "Finished per second");
  const depth = chart("depth", "Queue depth (pending)");
  const kinds = el("tbody", {id: "kinds"});
  const workers = el("tbody", {id: "workers"});
  const status = el("div", {"aria-live": "polite"});
  main.replaceChildren(
    el("h1", {text: "Overview"}), status,
    el("section", {"aria-labelledby": "h-master"}, el("h2", {id: "h-master", text: "Master"}), master, standbys),
    el("section", {"aria-labelledby": "h-works"}, el("h2", {id: "h-works", text: "Works"}), counts),
    el("section", {"aria-labelledby": "h-charts"}, el("h2", {id: "h-charts", text: "Flow"}),
      el("div", {class: "charts"}, throughput.figure, depth.figure)),
    el("section", {"aria-labelledby": "h-kinds"}, el("h2", {id: "h-kinds", text: "Kinds"}),
      el("div", {class: "table-wrap"}, el("table", {},
        el("thead", {}, el("tr", {}, ["Kind", "Slots", "Idle", "Pending", "Rate limit"].map((h, i) =>
          el("th", {scope: "col", class: i ? "num" : null, text: h})))), kinds))),
    el("section", {"aria-labelledby": "h-workers"}, el("h2", {id: "h-workers", text: "Workers"}),
      el("div", {class: "table-wrap"}, el("table", {},
        el("thead", {}, el("tr", {}, ["Slot", "Host", "Kinds", "Status", "Work", "Progress"].map((h) =>
          el("th", {scope: "col", class: h === "Host" || h === "Kinds" ? "wide" : null, text: h})))), workers))));
  let previous = null;
  live("/api/overview/stream", {
    overview(o) {
      status.replaceChildren();
      master.textContent = o.master ? `Active: ${o.master.address} (epoch ${o.master.epoch})` : "No active master";
      standbys.textContent = o.standbys.length
        ? `Standing by: ${o.standbys.map((b) => `${b.address} (epoch ${b.epoch})`).join(", ")}` : "No standby";
      for (const s of STATES) document.getElementById(`count-${s}`).textContent = num(o.counts[s]);
      document.getElementById("oldest-pending").textContent = age(o.oldest_pending_seconds);
      document.getElementById("worker-slots").textContent = num(o.worker_slots);
      if (previous !== null && o.time > previous.time) {
        const rate = Math.max(0, (o.finished - previous.finished) / (o.time - previous.time));
        throughput.add(rate, `${num(Math.round(rate))}/s`);
      }
      depth.add(o.counts.PENDING, num(o.counts.PENDING));
      previous = o;
      kinds.replaceChildren(...o.kinds.map((k) => el("tr", {},
        el("td", {text: k.kind}), el("td", {class: "num", text: num(k.slots)}),
        el("td", {class: "num", text: num(k.idle_slots)}), el("td", {class: "num", text: num(k.pending)}),
        el("td", {class: "num", text: k.rate_limit ? `${k.rate_limit}/s` : "—"}))));
      workers.replaceChildren(...o.workers.slice(0, 200).map((w) => el("tr", {},
        el("td", {text: w.identity ? `${w.identity} / ${w.worker_id}` : w.worker_id}), el("td", {class: "wide", text: w.host}),
        el("td", {class: "wide", text: w.kinds.join(", ")}), el("td", {text: w.status}),
        el("td", {}, w.work_id ? workLink(w.work_id) : "—"),
        el("td", {text: w.progress === null ? "—" : `${Math.round(w.progress * 100)} %`}))));
    },
    failed(e) { status.replaceChildren(notice(`The overview stopped: ${e.error}`, true)); },
    error() { if (!status.childElementCount) status.replaceChildren(notice("Reconnecting…")); },
  });
}

// --- works ---------------------------------------------------------------------

function showWorks(main) {
  const params = new URLSearchParams(location.search);
  const state = params.get("state") || "PENDING";
  const kind = params.get("kind") || "";
  const size = params.get("page_size") || "50";
  const tokens = [""]; // the page tokens of the pages seen, for going back
  const search = el("form", {class: "search", role: "search", onsubmit(e) {
    e.preventDefault();
    const id = this.elements.work_id.value.trim();
    if (id) go(`/works/${encodeURIComponent(id)}`);
  }}, el("label", {}, "Work id", el("input", {name: "work_id", id: "search-id", required: true, autocomplete: "off"})),
  el("button", {type: "submit", id: "search-open", text: "Open"}));
  const filters = el("form", {class: "filters", onsubmit(e) {
    e.preventDefault();
    const f = this.elements;
    go(`/works?state=${f.state.value}&kind=${encodeURIComponent(f.kind.value.trim())}&page_size=${f.page_size.value}`);
  }},
  el("label", {}, "State", el("select", {name: "state", id: "filter-state"},
    STATES.map((s) => el("option", {value: s, selected: s === state, text: s})))),
  el("label", {}, "Kind", el("input", {name: "kind", id: "filter-kind", value: kind, placeholder: "every kind"})),
  el("label", {}, "Per page", el("select", {name: "page_size"},
    ["20", "50", "100", "500"].map((n) => el("option", {value: n, selected: n === size, text: n})))),
  el("button", {type: "submit", text: "List"}));
  const body = el("tbody", {id: "works"});
  const info = el("p", {class: "muted", "aria-live": "polite"});
  const previous = el("button", {type: "button", class: "secondary", text: "Previous page", disabled: true});
  const next = el("button", {type: "button", class: "secondary", text: "Next page", disabled: true});
  main.replaceChildren(el("h1", {text: "Works"}), search, filters, info,
    el("div", {class: "table-wrap"}, el("table", {}, el("caption", {class: "muted", text: `${state} works`}),
      el("thead", {}, el("tr", {}, ["Work", "Kind", "State", "Attempts", "Priority"].map((h, i) =>
        el("th", {scope: "col", class: i > 2 ? "num" : null, text: h})))), body)),
    el("div", {class: "pager"}, previous, next));
  let page = 0;
  async function load() {
    info.textContent = "Loading…";
    try {
      const q = new URLSearchParams({state, kind, page_size: size, page_token: tokens[page]});
      const answer = await api(`/api/works?${q}`);
      body.replaceChildren(...answer.works.map((w) => el("tr", {},
        el("td", {}, workLink(w.work_id)), el("td", {text: w.kind}),
        el("td", {class: `state state-${w.state}`, text: w.state}),
        el("td", {class: "num", text: w.attempts}), el("td", {class: "num", text: w.priority}))));
      tokens[page + 1] = answer.next_page_token;
      info.textContent = answer.works.length ? `Page ${page + 1}` : (page ? "No more works" : `No ${state} works`);
      previous.disabled = page === 0;
      next.disabled = !answer.next_page_token;
    } catch (e) {
      info.replaceChildren(notice(e.message, true));
    }
  }
  previous.addEventListener("click", () => { page -= 1; load(); });
  next.addEventListener("click", () => { page += 1; load(); });
  load();
}

// --- one work ------------------------------------------------------------------

function showWork(main, id) {
  const heading = el("h1", {}, "Work ", el("code", {text: id}));
  const fields = el("dl", {class: "fields", id: "work-fields"});
  const actions = el("div", {class: "actions"});
  const status = el("div", {"aria-live": "polite", id: "work-status"});
  const details = el("div");
  main.replaceChildren(heading, status, fields, actions, details);
  let timer = null;
  async function act(verb) {
    try {
      await api(`/api/works/${encodeURIComponent(id)}/${verb}`, {method: "POST"});
      status.replaceChildren(notice(verb === "cancel" ? "Cancelled." : "Queued again."));
    } catch (e) {
      status.replaceChildren(notice(e.message, true));
    }
    load();
  }
  async function load() {
    let w;
    try {
      w = await api(`/api/works/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e.status !== 401) status.replaceChildren(notice(e.message, true));
      return;
    }
    const rows = [["Kind", w.kind], ["State", w.state], ["Attempts", w.attempts], ["Priority", w.priority]];
    if (w.sequence) rows.push(["Result sequence", w.sequence]);
    if (w.not_before) rows.push(["Queued at", new Date(w.not_before * 1000).toLocaleString()]);
    fields.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {text: k}),
      el("dd", {id: `work-${k.toLowerCase().replace(/ /g, "-")}`, class: k === "State" ? `state state-${v}` : null,
        text: String(v)})]));
    if (w.progress !== null) {
      fields.append(el("dt", {text: "Progress"}), el("dd", {},
        el("progress", {max: "1", value: String(w.progress), "aria-label": "Progress"}),
        ` ${Math.round(w.progress * 100)} % ${w.progress_details}`));
    }
    actions.replaceChildren();
    if (mayAdmin() && w.cancellable) {
      actions.append(el("button", {type: "button", class: "danger", id: "cancel", text: "Cancel", onclick: () => act("cancel")}));
    }
    if (mayAdmin() && w.retryable) {
      actions.append(el("button", {type: "button", id: "retry", text: "Retry", onclick: () => act("retry")}));
    }
    details.replaceChildren();
    if (w.error) details.append(el("h2", {text: "Last error"}), el("pre", {id: "work-error", text: w.error}));
    if (w.result) {
      const r = w.result;
      const what = `${bytes(r.size)}${r.content_type ? `, ${r.content_type}` : ""}${r.truncated ? " (first 64 KiB)" : ""}`;
      details.append(el("h2", {text: "Result"}), el("p", {class: "muted", text: what}),
        el("pre", {id: "work-result", text: r.json ?? r.text ?? r.hex ?? ""}));
    }
    clearTimeout(timer);
    if (["PENDING", "SCHEDULED", "IN_PROGRESS"].includes(w.state)) timer = setTimeout(load, 1000);
  }
  cleanup.push(() => clearTimeout(timer));
  load();
}

// --- results -------------------------------------------------------------------

function showResults(main) {
  const body = el("tbody", {id: "results"});
  const info = el("p", {class: "muted", id: "results-info", "aria-live": "polite", text: "Waiting for results…"});
  let paused = false;
  const pause = el("button", {type: "button", class: "secondary", "aria-pressed": "false", text: "Pause",
    onclick() { paused = !paused; this.textContent = paused ? "Resume" : "Pause"; this.setAttribute("aria-pressed", String(paused)); }});
  main.replaceChildren(el("h1", {text: "Results"}), el("div", {class: "actions"}, pause), info,
    el("div", {class: "table-wrap"}, el("table", {}, el("thead", {}, el("tr", {},
      ["#", "Work", "Kind", "State", "Attempts", "Result or error"].map((h, i) =>
        el("th", {scope: "col", class: i === 0 || i === 4 ? "num" : (i === 2 ? "wide" : null), text: h})))), body)));
  let seen = 0;
  live("/api/results/stream", {
    results(batch) {
      seen += batch.results.length + batch.skipped;
      info.textContent = `${num(seen)} results since this page opened${batch.skipped ? " (the busiest moments show their latest)" : ""}`;
      if (paused) return;
      for (const r of batch.results) {
        body.prepend(el("tr", {}, el("td", {class: "num", text: r.sequence}), el("td", {}, workLink(r.work_id)),
          el("td", {class: "wide", text: r.kind}), el("td", {class: `state state-${r.state}`, text: r.state}),
          el("td", {class: "num", text: r.attempts}), el("td", {text: r.error || r.preview})));
      }
      while (body.rows.length > TAIL_ROWS) body.lastElementChild.remove();
    },
    failed(e) { info.replaceChildren(notice(`The tail stopped: ${e.error}`, true)); },
  });
}

// --- login ---------------------------------------------------------------------

function showLogin(main) {
  const status = el("div", {"aria-live": "polite"});
  const form = el("form", {class: "filters", async onsubmit(e) {
    e.preventDefault();
    try {
      me = await api("/api/login", {method: "POST", body: {token: this.elements.token.value}});
      showWho();
      const next = new URLSearchParams(location.search).get("next") || "/";
      go(next.startsWith("/") && !next.startsWith("//") ? next : "/");
    } catch (err) {
      status.replaceChildren(notice(err.message, true));
    }
  }}, el("label", {}, "Token", el("input", {type: "password", name: "token", id: "token", required: true,
    autocomplete: "current-password"})), el("button", {type: "submit", id: "login", text: "Log in"}));
  main.replaceChildren(el("h1", {text: "Log in"}),
    el("p", {text: "This cluster checks who calls it. Log in with a token its operator issued you."}), status, form);
}

// --- routing -------------------------------------------------------------------

function go(path) {
  history.pushState(null, "", path);
  route();
}

async function whoAmI() {
  try {
    me = await api("/api/me");
  } catch (e) {
    me = null;
    if (e.status !== 401) {
      document.getElementById("main").replaceChildren(el("h1", {text: "dworkers"}),
        notice(`The frontend cannot answer now: ${e.message}. Reload the page to try again.`, true));
    }
  }
  showWho();
}

// Who is looking, in the header (when the cluster checks who calls it).
function showWho() {
  document.getElementById("who").hidden = !(me && me.access_checked);
  document.getElementById("who-name").textContent = me ? me.name : "";
  document.getElementById("logout").hidden = !(me && me.logged_in);
}

async function route() {
  for (const stop of cleanup) stop();
  cleanup = [];
  const main = document.getElementById("main");
  const path = location.pathname;
  if (path !== "/login" && me === null) await whoAmI();
  if (path !== "/login" && me === null) return; // whoAmI sent the visitor to log in
  for (const link of document.querySelectorAll("nav a")) {
    const current = link.getAttribute("href") === path || (path.startsWith("/works/") && link.dataset.view === "works");
    if (current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  if (path === "/") { document.title = "Overview · dworkers"; showOverview(main); }
  else if (path === "/works") { document.title = "Works · dworkers"; showWorks(main); }
  else if (path.startsWith("/works/")) {
    const id = decodeURIComponent(path.slice("/works/".length));
    document.title = `${id} · dworkers`;
    showWork(main, id);
  }
  else if (path === "/results") { document.title = "Results · dworkers"; showResults(main); }
  else if (path === "/login") { document.title = "Log in · dworkers"; showLogin(main); }
  else main.replaceChildren(el("h1", {text: "Not found"}), el("p", {}, el("a", {href: "/", text: "Overview"})));
}

document.addEventListener("click", (e) => {
  const link = e.target.closest("a");
  if (!link || link.origin !== location.origin || e.ctrlKey || e.metaKey || e.shiftKey || link.target) return;
  e.preventDefault();
  go(link.pathname + link.search);
});
window.addEventListener("popstate", route);
document.getElementById("logout").addEventListener("click", async () => {
  await api("/api/logout", {method: "POST"});
  me = null;
  showWho();
  go("/login");
});
route();
