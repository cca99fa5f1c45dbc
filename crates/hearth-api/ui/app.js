// hearth dashboard. Plain DOM, no framework, no build step.
//
// Safety rule of this file: everything the server returns (names,
// descriptions, agent and step output, event data) is attacker-written, so
// it reaches the page only as text: through el(), textContent, or attribute
// values set with setAttribute. Nothing here assigns innerHTML.
"use strict";

const TERMINAL = new Set(["completed", "failed", "killed"]);
const EVENT_KINDS = [
  "vm.booting", "vm.ready", "vm.assigned", "vm.returned", "vm.destroyed", "vm.failed",
  "agent.queued", "agent.provisioning", "agent.running", "agent.idle", "agent.sleeping",
  "agent.completed", "agent.failed", "agent.killed",
  "instance.step", "instance.ready", "instance.failed",
  "resource.written", "resource.deleted",
  "workspace.backing_off", "workspace.hard_limited", "workspace.recovered",
  "pool.flushed", "pool.nuked", "pool.up",
];
const FAMILIES = ["vm", "agent", "instance", "resource", "workspace", "pool"];
const POLL_MS = 2000;       // only while the event stream is down
const RETRY_MS = 3000;      // reopening a stream the browser gave up on
const DEBOUNCE_MS = 150;    // events come in bursts: one re-read per burst
const KEEP_EVENTS = 1000;   // the Events view's window, newest kept
// `/ui?poll=off` never polls: the page then learns of changes from the
// event stream alone (the browser tests use it to prove the live path).
const NO_POLL = new URLSearchParams(location.search).get("poll") === "off";

/**
 * Which views an event of each family concerns: on an event, the shown
 * view is re-read only when it is one of these (the Events view itself
 * only appends the event).
 */
const CONCERNS = {
  vm: ["overview", "vms", "agents"],
  agent: ["overview", "agents"],
  instance: ["overview", "instances"],
  resource: ["overview", "vms", "agents", "instances", "config"],
  workspace: ["overview"],
  pool: ["overview", "vms"],
};

const state = {
  session: null,            // {csrf_token, identity, role, expires_at}
  permissions: new Set(),
  view: "overview",
  selectedAgent: null,
  selectedInstance: null,
  events: [],               // newest last, at most KEEP_EVENTS
  lastEventId: 0,           // the cursor: the stream reopens after it
  eventFamily: "",          // the Events view's filter ("" = all)
  stream: null,
  retry: null,
  live: false,
  timer: null,
  pending: null,
  followOutput: false,      // the agents view shows a running agent's output
  workspaces: [],
  armed: null,              // {key, until}: a destructive button awaiting its second click
};

// ---------------------------------------------------------------- DOM

/** Makes an element; children are nodes or strings (always text). */
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);

function show(node, on) { node.hidden = !on; }

function message(node, text) {
  node.textContent = text || "";
  show(node, !!text);
}

function can(permission) { return state.permissions.has(permission); }

// Ids are UUIDv7: their head is a timestamp shared by neighbours, their tail random.
function short(id) { return id ? String(id).slice(-8) : "—"; }

function when(text) {
  if (!text) return "—";
  const d = new Date(text);
  if (isNaN(d)) return String(text);
  const s = Math.round((Date.now() - d.getTime()) / 1000);
  if (s < 60) return `${Math.max(s, 0)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return d.toISOString().slice(0, 16).replace("T", " ");
}

function badge(text) {
  return el("span", { class: `badge ${String(text).replace(/[^a-z_]/g, "")}`, "data-field": "status", text });
}

// ---------------------------------------------------------------- API

/** Calls the JSON API with the session cookie; non-GET calls carry the CSRF token. */
async function api(method, path, body, contentType) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && method !== "HEAD" && state.session) {
    headers["X-Hearth-CSRF"] = state.session.csrf_token;
  }
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = contentType || "application/json";
    payload = typeof body === "string" ? body : JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  let data = null;
  const text = await response.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = { message: text }; }
  }
  if (response.status === 401 && path !== "/ui/session") signedOut();
  return { ok: response.ok, status: response.status, body: data };
}

/** The API's own error message, verbatim. */
function errorText(answer) {
  if (answer.body && answer.body.message) return answer.body.message;
  return `HTTP ${answer.status}`;
}

function items(body) {
  if (Array.isArray(body)) return body;
  if (body && Array.isArray(body.items)) return body.items;
  if (body && Array.isArray(body.events)) return body.events;
  return [];
}

// ---------------------------------------------------------------- session

async function start() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("flush").addEventListener("click", (e) => armed("flush", e.currentTarget, "Confirm flush", () => flush(null)));
  $("spawn-form").addEventListener("submit", spawn);
  $("test-form").addEventListener("submit", testBoot);
  $("pool-form").addEventListener("submit", savePool);
  $("workspace-form").addEventListener("submit", saveWorkspace);
  const filter = $("event-family");
  filter.replaceChildren(el("option", { value: "", text: "all" }),
    ...FAMILIES.map((f) => el("option", { value: f, text: f })));
  filter.addEventListener("change", () => { state.eventFamily = filter.value; renderEvents(); });
  window.addEventListener("hashchange", route);
  const answer = await api("GET", "/ui/session");
  if (answer.ok) await signedIn(answer.body);
  else signedOut();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("token");
  const answer = await api("POST", "/ui/session", { token: input.value.trim() });
  input.value = "";
  if (!answer.ok) {
    message($("sign-in-error"), errorText(answer));
    return;
  }
  message($("sign-in-error"), "");
  await signedIn(answer.body);
}

async function signOut() {
  await api("DELETE", "/ui/session");
  signedOut();
}

function signedOut() {
  state.session = null;
  state.permissions = new Set();
  closeStream();
  clearTimeout(state.timer);
  state.events = [];
  state.lastEventId = 0;
  show($("sign-in"), true);
  show($("app"), false);
  show($("nav"), false);
  show($("who"), false);
}

async function signedIn(session) {
  state.session = session;
  const who = await api("GET", "/v1/whoami");
  if (!who.ok) { signedOut(); return; }
  state.permissions = new Set(who.body.permissions || []);
  $("identity").textContent = `${who.body.identity} · ${who.body.role} · ${who.body.tenant}`;
  for (const node of document.querySelectorAll("[data-needs]")) {
    show(node, can(node.getAttribute("data-needs")));
  }
  for (const id of ["cfg-max-vms", "cfg-max-agents", "cfg-reap", "cfg-description"]) {
    $(id).disabled = !can("pool-config.update");
  }
  for (const id of ["ws-name", "ws-environment", "ws-min-idle", "ws-max-idle"]) {
    $(id).disabled = !can("workspace.update");
  }
  show($("sign-in"), false);
  show($("app"), true);
  show($("nav"), true);
  show($("who"), true);
  await catchUp();
  connectStream();
  route();
}

// ---------------------------------------------------------------- live updates

/**
 * Reads the log up to now (pages of 1000, keeping the newest KEEP_EVENTS),
 * so the stream can start after its last id.
 */
async function catchUp() {
  for (;;) {
    const answer = await api("GET", `/v1/events?after=${state.lastEventId}&limit=1000`);
    if (!answer.ok) {
      message($("events-note"), `cannot read the event log: ${errorText(answer)}`);
      return;
    }
    message($("events-note"), "");
    const list = items(answer.body);
    addEvents(list);
    if (list.length < 1000) return;
  }
}

function closeStream() {
  clearTimeout(state.retry);
  state.retry = null;
  if (state.stream) { state.stream.close(); state.stream = null; }
  setLive(false);
}

/**
 * Follows the event stream from the last id seen, authenticated by the
 * session cookie (a GET: no CSRF header needed, and EventSource could not
 * send one). While it is open the page does not poll; on an error the
 * browser reconnects by itself with `Last-Event-ID` and the page polls
 * meanwhile; when the browser gives up (an HTTP error answer), the page
 * reopens it from its last id every RETRY_MS.
 */
function connectStream() {
  closeStream();
  if (!state.session || !can("event.read")) return;
  const stream = new EventSource(`/v1/events/stream?after=${state.lastEventId}`);
  state.stream = stream;
  stream.onopen = () => {
    setLive(true);
    // What changed while the stream was down was polled for, or is on
    // its way now: one re-read catches the view up either way.
    soon(state.view);
  };
  stream.onerror = () => {
    if (state.stream !== stream) return;
    setLive(false);
    if (stream.readyState === EventSource.CLOSED) {
      state.stream = null;
      state.retry = setTimeout(() => { if (state.session) connectStream(); }, RETRY_MS);
    }
  };
  const onEvent = (e) => {
    let event;
    try { event = JSON.parse(e.data); } catch { return; }
    addEvents([event]);
    const family = String(event.kind || "").split(".")[0];
    if ((CONCERNS[family] || []).includes(state.view)) soon(state.view);
  };
  stream.onmessage = onEvent;
  for (const kind of EVENT_KINDS) stream.addEventListener(kind, onEvent);
}

function setLive(on) {
  state.live = on;
  const pill = $("live");
  pill.textContent = on ? "live" : NO_POLL ? "offline" : "polling";
  pill.className = `pill ${on ? "live" : "polling"}`;
  schedule();
}

/**
 * The polling fallback: a re-read every POLL_MS while the stream is down.
 * While it is live, only a running agent's output is re-read so (output
 * is not in the event log).
 */
function schedule() {
  clearTimeout(state.timer);
  if (!state.session || NO_POLL) return;
  if (state.live && !(state.view === "agents" && state.followOutput)) return;
  state.timer = setTimeout(async () => { await refresh(); schedule(); }, POLL_MS);
}

/** A re-read of `view` shortly, once per burst of events. */
function soon(view) {
  if (state.pending) return;
  state.pending = setTimeout(async () => {
    state.pending = null;
    if (state.view === view) await refresh();
  }, DEBOUNCE_MS);
}

// ---------------------------------------------------------------- views

function route() {
  const view = (location.hash || "#overview").slice(1).split("/")[0];
  state.view = document.getElementById(`view-${view}`) ? view : "overview";
  for (const node of document.querySelectorAll(".view")) show(node, node.id === `view-${state.view}`);
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.getAttribute("data-view") === state.view);
  }
  if (state.view === "config") loadConfigForms();
  refresh().then(schedule);
}

let refreshing = false;
let again = false;
/**
 * Re-reads the shown view. Asked while a re-read is under way, it runs
 * once more after it: that one may have read before the change that asked.
 */
async function refresh() {
  if (!state.session) return;
  if (refreshing) { again = true; return; }
  refreshing = true;
  try {
    do {
      again = false;
      const views = { overview, vms, agents, instances, config, events: renderEvents };
      await views[state.view]();
      message($("banner"), "");
    } while (again && state.session);
  } catch (e) {
    message($("banner"), `cannot reach the server: ${e.message || e}`);
  } finally {
    refreshing = false;
  }
}

async function loadWorkspaces() {
  const answer = await api("GET", "/v1/workspaces");
  if (answer.ok) state.workspaces = items(answer.body);
  for (const id of ["spawn-workspace", "test-workspace"]) {
    const select = $(id);
    const chosen = select.value;
    const names = state.workspaces.map((w) => w.name);
    const have = [...select.options].map((o) => o.value);
    if (names.join("\n") !== have.join("\n")) {
      select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
      if (names.includes(chosen)) select.value = chosen;
    }
  }
}

// Overview ------------------------------------------------------------

async function overview() {
  const [status, config] = await Promise.all([
    api("GET", "/v1/pool/status"),
    api("GET", "/v1/pool-config/default"),
  ]);
  if (!status.ok) { message($("banner"), errorText(status)); return; }
  const s = status.body;
  const description = config.ok && config.body.spec ? config.body.spec.description || "" : "";
  $("pool-name").replaceChildren(`Pool: ${s.pool} `, badge(s.status));
  $("pool-description").textContent = description;
  const maxVms = s.configuration.max_vms;
  const live = s.vms.total;
  $("summary").replaceChildren(
    stat("VMs", live, maxVms ? `of max_vms ${maxVms}` : "no max_vms", "total",
      maxVms ? bar([[s.vms.active, "assigned"], [s.vms.idle, "idle"], [s.vms.booting, "booting"]], maxVms, []) : null),
    stat("Active", s.vms.active, "running agents", "active"),
    stat("Idle", s.vms.idle, "warm, ready to claim", "idle"),
    stat("Booting", s.vms.booting, "starting up", "booting"),
    stat("Stale", s.vms.stale, "old image or environment", "stale"),
    stat("Queued", s.queued, "spawns waiting for capacity", "queued"),
    stat("Reaper", s.reaper.stranded, `stranded · ${s.reaper.mode}`, "stranded"),
  );
  // One scale for every workspace, so their bars compare at a glance.
  const scale = Math.max(1, ...s.workspaces.map((w) =>
    Math.max(w.min_idle, w.max_idle, w.idle + w.booting + w.active + w.stale)));
  const rows = s.workspaces.map((w) => workspaceRow(w, maxVms, scale));
  $("workspaces").replaceChildren(...(rows.length ? rows : [el("p", { class: "muted", text: "No workspaces yet." })]));
}

function stat(label, value, sub, key, extra) {
  return el("div", { class: "stat", "data-stat": key },
    el("div", { class: "label", text: label }),
    el("div", { class: "value", "data-count": key, text: value }),
    el("div", { class: "sub", text: sub }),
    extra || null);
}

/** A stacked bar of [count, class] segments on a scale of `scale`, with marks at `marks`. */
function bar(segments, scale, marks, thin) {
  const node = el("div", { class: thin ? "bar thin" : "bar" });
  const total = Math.max(scale, 1);
  for (const [count, kind] of segments) {
    const seg = el("div", { class: `seg ${kind}`, title: `${kind}: ${count}` });
    seg.style.width = `${(100 * count) / total}%`;
    node.append(seg);
  }
  for (const [at, kind, label] of marks) {
    const mark = el("div", { class: `mark ${kind}`, title: label });
    mark.style.left = `calc(${Math.min((100 * at) / total, 100)}% - 1px)`;
    node.append(mark);
  }
  return node;
}

function workspaceRow(w, maxVms, scale) {
  const marks = [[w.min_idle, "min", `min_idle ${w.min_idle}`]];
  if (w.max_idle !== w.min_idle) marks.push([w.max_idle, "max", `max_idle ${w.max_idle}`]);
  const count = (key, value, label) =>
    el("span", {}, el("b", { "data-count": key, text: value }), ` ${label}`);
  const actions = el("div", { class: "actions" });
  if (can("pool-config.delete")) {
    const key = `flush/${w.name}`;
    actions.append(el("button", {
      type: "button", class: "danger small", "data-action": "flush-workspace", "data-label": "Flush",
      onclick: (e) => armed(key, e.currentTarget, "Confirm", () => flush(w.name)),
    }, armedLabel(key, "Flush", "Confirm")));
  }
  return el("div", { class: "ws", "data-workspace": w.name },
    el("div", {},
      el("div", { class: "name", title: w.name, text: w.name }),
      badge(w.status)),
    el("div", {},
      bar([[w.idle, "idle"], [w.booting, "booting"], [w.active, "assigned"], [w.stale, "stale"]], scale, marks),
      el("div", { class: "counts" },
        count("idle", w.idle, `idle / min_idle ${w.min_idle} · max_idle ${w.max_idle}`),
        count("booting", w.booting, "booting"),
        count("assigned", w.active, "assigned"),
        count("stale", w.stale, "stale"),
        count("queued", w.queued, "queued"),
        maxVms ? el("span", { text: `max_vms ${maxVms}` }) : null)),
    actions,
    w.last_error && w.status !== "healthy"
      ? el("div", { class: "err", text: `${w.consecutive_failures} failed boot(s): ${w.last_error}` })
      : null);
}

/**
 * A destructive button acts on a second click within 4 s. The armed state
 * is kept by key, not on the button, so a re-render between the two
 * clicks (the page refreshes every few seconds) keeps it.
 */
function armed(key, button, confirmText, action) {
  if (state.armed && state.armed.key === key && Date.now() < state.armed.until) {
    state.armed = null;
    button.textContent = button.getAttribute("data-label") || button.textContent;
    action();
    return;
  }
  state.armed = { key, until: Date.now() + 4000 };
  if (!button.getAttribute("data-label")) button.setAttribute("data-label", button.textContent);
  button.textContent = confirmText;
  setTimeout(() => {
    if (!state.armed || state.armed.key !== key || Date.now() >= state.armed.until) {
      button.textContent = button.getAttribute("data-label");
    }
  }, 4100);
}

/** The label of a re-rendered destructive button: armed or not. */
function armedLabel(key, label, confirmText) {
  return state.armed && state.armed.key === key && Date.now() < state.armed.until ? confirmText : label;
}

async function flush(workspace) {
  const answer = await api("POST", "/v1/pool/flush", workspace ? { workspace } : {});
  const node = $("flush-result");
  if (!answer.ok) {
    node.className = "error";
    message(node, errorText(answer));
    return;
  }
  const n = answer.body.flushed || 0;
  node.className = "notice";
  message(node, n > 0 ? `Flushed ${n} warm VMs — pool will replenish with fresh ones` : "No warm VMs to flush");
  refresh();
}

// VMs -----------------------------------------------------------------

async function vms() {
  const answer = await api("GET", "/v1/vms");
  if (!answer.ok) { message($("banner"), errorText(answer)); return; }
  const rows = items(answer.body).map((v) => el("tr", { "data-vm": v.id },
    el("td", { class: "id", title: v.id, text: short(v.id) }),
    el("td", { text: v.workspace }),
    el("td", {}, badge(v.state)),
    el("td", { class: "id", title: v.agent || "", text: short(v.agent) }),
    el("td", { text: v.driver }),
    el("td", { text: v.stale ? "stale" : "" }),
    el("td", { text: v.test ? "test" : "" }),
    el("td", { title: v.created_at, text: when(v.created_at) })));
  $("vm-rows").replaceChildren(...(rows.length ? rows : [emptyRow(8, "No VMs.")]));
}

function emptyRow(span, text) {
  return el("tr", {}, el("td", { colspan: span, class: "muted", text }));
}

// Agents --------------------------------------------------------------

async function agents() {
  await loadWorkspaces();
  const answer = await api("GET", "/v1/agents");
  if (!answer.ok) { message($("banner"), errorText(answer)); return; }
  const list = items(answer.body);
  const rows = list.map((a) => {
    const kill = can("agent.kill") && !TERMINAL.has(a.phase)
      ? el("button", {
        type: "button", class: "danger small", "data-action": "kill", "data-label": "Kill",
        onclick: (e) => { e.stopPropagation(); armed(`kill/${a.id}`, e.currentTarget, "Confirm", () => killAgent(a.id)); },
      }, armedLabel(`kill/${a.id}`, "Kill", "Confirm"))
      : null;
    return el("tr", {
      class: `selectable${a.id === state.selectedAgent ? " selected" : ""}`, "data-agent": a.id,
      onclick: () => { state.selectedAgent = a.id; agents(); },
    },
    el("td", { class: "id", title: a.id, text: short(a.id) }),
    el("td", { text: a.workspace }),
    el("td", { text: a.owner }),
    el("td", { "data-field": "phase" }, badge(a.phase)),
    el("td", { class: "mono", text: a.command || "" }),
    el("td", { text: a.exit_code ?? "" }),
    el("td", { title: a.created_at, text: when(a.created_at) }),
    el("td", {}, kill));
  });
  $("agent-rows").replaceChildren(...(rows.length ? rows : [emptyRow(8, "No agents.")]));
  const chosen = list.find((a) => a.id === state.selectedAgent);
  state.followOutput = !!chosen && !TERMINAL.has(chosen.phase);
  if (chosen) {
    $("agent-detail").replaceChildren(
      el("h2", {}, `Agent ${short(chosen.id)} `, badge(chosen.phase)),
      el("dl", {},
        el("dt", { text: "id" }), el("dd", { class: "mono", text: chosen.id }),
        el("dt", { text: "workspace" }), el("dd", { text: chosen.workspace }),
        el("dt", { text: "VM" }), el("dd", { class: "mono", text: chosen.vm || "—" }),
        el("dt", { text: "command" }), el("dd", { class: "mono", text: chosen.command || "—" }),
        el("dt", { text: "exit code" }), el("dd", { text: chosen.exit_code ?? "—" }),
        chosen.error ? el("dt", { text: "error" }) : null,
        chosen.error ? el("dd", { text: chosen.error }) : null),
      el("div", { class: "muted", text: chosen.output_hidden ? "output hidden from your role" : "output" }),
      el("pre", { class: "output", "data-field": "output", text: chosen.output || "" }));
  }
}

async function spawn(event) {
  event.preventDefault();
  const body = { workspace: $("spawn-workspace").value };
  const command = $("spawn-command").value.trim();
  if (command) body.command = command;
  const answer = await api("POST", "/v1/agents", body);
  if (!answer.ok) { message($("spawn-error"), errorText(answer)); return; }
  message($("spawn-error"), "");
  state.selectedAgent = answer.body.id;
  agents();
}

async function killAgent(id) {
  const answer = await api("POST", `/v1/agents/${encodeURIComponent(id)}/kill`, {});
  message($("spawn-error"), answer.ok ? "" : errorText(answer));
  agents();
}

// Instances -----------------------------------------------------------

async function instances() {
  await loadWorkspaces();
  const answer = await api("GET", "/v1/instances");
  if (!answer.ok) { message($("banner"), errorText(answer)); return; }
  const list = items(answer.body);
  const rows = list.map((i) => el("tr", {
    class: `selectable${i.id === state.selectedInstance ? " selected" : ""}`, "data-instance": i.id,
    onclick: () => { state.selectedInstance = i.id; instances(); },
  },
  el("td", { class: "id", title: i.id, text: short(i.id) }),
  el("td", { text: i.workspace }),
  el("td", {}, badge(i.status)),
  el("td", { text: i.test ? "test" : "" }),
  el("td", { text: (i.summary && i.summary.failedStep) || "" }),
  el("td", { title: i.createdAt, text: when(i.createdAt) })));
  $("instance-rows").replaceChildren(...(rows.length ? rows : [emptyRow(6, "No instances.")]));
  if (!state.selectedInstance) return;
  const one = await api("GET", `/v1/instances/${encodeURIComponent(state.selectedInstance)}`);
  if (one.ok) $("instance-detail").replaceChildren(...stepView(one.body).filter(Boolean));
}

function duration(step) {
  const ms = step.duration_ms ?? step.durationMs;
  if (typeof ms === "number") return ms < 1000 ? `${ms}ms` : `${(ms / 1000).toFixed(1)}s`;
  return step.duration || "";
}

const STEP_ICON = { pending: "○", running: "◐", succeeded: "●", success: "●", ready: "●", failed: "✕", skipped: "–" };

/** The live step view of `warm-pool test --watch`. */
function stepView(i) {
  const steps = (i.steps || []).map((s) => el("li", { "data-step": s.name },
    el("div", { class: "head" },
      el("span", { class: `icon ${String(s.status).replace(/[^a-z_]/g, "")}`, text: STEP_ICON[s.status] || "·" }),
      el("b", { class: "mono", text: s.name }),
      badge(s.status),
      el("span", { class: "dur", text: duration(s) })),
    s.output ? el("pre", { class: "output", text: s.output }) : null,
    s.error ? el("div", { class: "error", text: s.error }) : null));
  const summary = i.summary && !i.summary.success
    ? el("p", { class: "error", text: `failed at ${i.summary.failedStep}: ${i.summary.error}` })
    : null;
  return [
    el("h2", {}, `Instance ${short(i.id)} `, badge(i.status)),
    el("dl", {},
      el("dt", { text: "workspace" }), el("dd", { text: i.workspace }),
      el("dt", { text: "VM" }), el("dd", { class: "mono", text: i.vm || "—" })),
    summary,
    el("ol", { class: "steps" }, ...steps),
  ];
}

async function testBoot(event) {
  event.preventDefault();
  const ws = $("test-workspace").value;
  const answer = await api("POST", `/v1/workspaces/${encodeURIComponent(ws)}/warm-pool/test`, {});
  if (!answer.ok) { message($("test-error"), errorText(answer)); return; }
  message($("test-error"), "");
  state.selectedInstance = answer.body.id;
  instances();
}

// Config --------------------------------------------------------------

async function config() {
  await loadWorkspaces();
  const rows = state.workspaces.map((w) => el("tr", {
    class: "selectable", "data-workspace": w.name,
    onclick: () => editWorkspace(w),
  },
  el("td", { text: w.name }),
  el("td", { text: w.spec.environment || "" }),
  el("td", { text: w.spec.min_idle ?? 0 }),
  el("td", { text: w.spec.max_idle ?? "" }),
  el("td", { text: (w.spec.repos || []).map((r) => r.url || r.name || "").join(", ") }),
  el("td", { text: w.version }),
  el("td", { title: w.updated_at, text: when(w.updated_at) })));
  $("ws-rows").replaceChildren(...(rows.length ? rows : [emptyRow(7, "No workspaces.")]));
}

async function loadConfigForms() {
  const answer = await api("GET", "/v1/pool-config/default");
  if (!answer.ok) return;
  const spec = answer.body.spec || {};
  $("cfg-max-vms").value = spec.max_vms ?? "";
  $("cfg-max-agents").value = spec.max_agents_per_developer ?? 0;
  $("cfg-reap").value = spec.reap_stranded_workflows || "dry_run";
  $("cfg-description").value = spec.description || "";
}

function editWorkspace(w) {
  $("ws-name").value = w.name;
  $("ws-environment").value = w.spec.environment || "";
  $("ws-min-idle").value = w.spec.min_idle ?? 0;
  $("ws-max-idle").value = w.spec.max_idle ?? "";
  message($("ws-error"), "");
  message($("ws-saved"), "");
}

/** A number field as the API should see it: what was typed, unchanged. */
function numberField(id) {
  const text = $(id).value.trim();
  if (text === "") return undefined;
  const n = Number(text);
  return Number.isFinite(n) ? n : text;
}

async function savePool(event) {
  event.preventDefault();
  const patch = {
    max_vms: numberField("cfg-max-vms"),
    max_agents_per_developer: numberField("cfg-max-agents"),
    reap_stranded_workflows: $("cfg-reap").value,
    description: $("cfg-description").value,
  };
  const answer = await api("PATCH", "/v1/pool-config/default", patch, "application/merge-patch+json");
  message($("pool-saved"), "");
  if (!answer.ok) { message($("pool-error"), errorText(answer)); return; }
  message($("pool-error"), "");
  message($("pool-saved"), `Saved (version ${answer.body.resource ? answer.body.resource.version : "?"})`);
}

async function saveWorkspace(event) {
  event.preventDefault();
  const name = $("ws-name").value.trim();
  const fields = {
    environment: $("ws-environment").value.trim() || undefined,
    min_idle: numberField("ws-min-idle"),
    max_idle: numberField("ws-max-idle"),
  };
  const exists = state.workspaces.some((w) => w.name === name);
  const path = `/v1/workspaces/${encodeURIComponent(name)}`;
  const answer = exists
    ? await api("PATCH", path, fields, "application/merge-patch+json")
    : await api("PUT", path, fields);
  message($("ws-saved"), "");
  if (!answer.ok) { message($("ws-error"), errorText(answer)); return; }
  message($("ws-error"), "");
  message($("ws-saved"), `Saved workspace ${name}`);
  config();
}

// Events --------------------------------------------------------------

/** Adds events not seen yet (ids above the cursor), keeping the newest KEEP_EVENTS. */
function addEvents(list) {
  let added = false;
  for (const e of list) {
    if (!e || typeof e.id !== "number" || e.id <= state.lastEventId) continue;
    state.events.push(e);
    state.lastEventId = e.id;
    added = true;
  }
  if (state.events.length > KEEP_EVENTS) state.events.splice(0, state.events.length - KEEP_EVENTS);
  if (added && state.view === "events") renderEvents();
}

/** An event's data as `key=value` pairs in key order, nulls left out (as `hearth events` prints). */
function details(data) {
  if (!data || typeof data !== "object" || Array.isArray(data)) return "";
  return Object.keys(data).sort()
    .filter((k) => data[k] !== null && data[k] !== undefined)
    .map((k) => `${k}=${typeof data[k] === "string" ? data[k] : JSON.stringify(data[k])}`)
    .join(" ");
}

/** The time of day an event was written (the full timestamp in its title). */
function clock(text) {
  const d = new Date(text);
  if (isNaN(d)) return String(text || "");
  const pad = (n) => String(n).padStart(2, "0");
  const day = d.toDateString() === new Date().toDateString() ? "" : `${d.toISOString().slice(0, 10)} `;
  return `${day}${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** The Events view, newest at the top, of the chosen family. */
function renderEvents() {
  const family = state.eventFamily;
  const shown = state.events.filter((e) => !family || String(e.kind).startsWith(`${family}.`));
  const rows = shown.reverse().map((e) => el("tr", { "data-event": e.id, "data-kind": e.kind },
    el("td", { class: "id", text: e.id }),
    el("td", { class: "id", title: e.at, text: clock(e.at) }),
    el("td", {}, el("span", { class: `badge ${String(e.kind).split(".").pop().replace(/[^a-z_]/g, "")}`, "data-field": "kind", text: e.kind })),
    el("td", { class: "mono", "data-field": "subject", text: e.subject }),
    el("td", { "data-field": "actor", text: e.actor || "—" }),
    el("td", { class: "data", "data-field": "details", text: details(e.data) })));
  $("event-rows").replaceChildren(...(rows.length ? rows : [emptyRow(6, family ? `No ${family} events.` : "No events yet.")]));
}

document.addEventListener("DOMContentLoaded", start);
