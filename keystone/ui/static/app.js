// The Keystone status page: polls the agent's own API (same origin, session cookie) and draws
// what it answers. No framework, no build step; every value goes into the page as text.

const POLL_MS = 2000; // while the page is visible
const HIDDEN_POLL_MS = 15000; // while it is in a background tab
const CSRF = { "X-Keystone-UI": "1" };

const $ = (sel) => document.querySelector(sel);
const state = { open: new Set(), graphKey: "", timer: 0, busy: false };

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path) {
  const init = { method, headers: method === "GET" ? {} : { ...CSRF }, cache: "no-store" };
  const resp = await fetch(path, init);
  if (resp.status === 401) {
    location.assign("/ui/login");
    throw new ApiError(401, { error: "signed out" });
  }
  const text = await resp.text();
  let body = null;
  if (text) {
    try { body = JSON.parse(text); } catch { body = { error: text }; }
  }
  if (!resp.ok) throw new ApiError(resp.status, body);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k === "onclick") node.addEventListener("click", v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

function ago(epoch) {
  if (!epoch) return "";
  const s = Math.max(0, Date.now() / 1000 - epoch);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 19);
}

function when(epoch) {
  return epoch ? new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "";
}

function short(rev) {
  return typeof rev === "string" && /^[0-9a-f]{40,64}$/.test(rev) ? rev.slice(0, 12) : rev ?? "";
}

// --- drawing ---------------------------------------------------------------------------------

function drawHealth(h) {
  $("#device").textContent = h ? `${h.device || ""} · agent ${h.version || ""}` : "";
  const badge = $("#health");
  // status is the agent's own liveness ("ok", as in Go); components_status says degraded.
  const status = h ? (h.components_status === "degraded" ? "degraded" : h.status) : "unreachable";
  badge.textContent = status;
  badge.className = `badge ${h ? status : "down"}`;
}

function drawComponents(list) {
  const body = $("#components tbody");
  body.replaceChildren();
  for (const c of list) {
    // state and last_health are the Go agent's values; phase and health_detail are ours.
    const health = [c.last_health, c.health_detail].filter(Boolean).join(": ");
    const row = el(
      "tr",
      { "data-name": c.name, "data-state": c.state, "data-phase": c.phase || "", "data-pid": c.pid ?? "" },
      el("td", { class: "name" }, el("strong", {}, c.name), el("div", { class: "muted" }, c.recipe || "")),
      el("td", { class: "state" }, el("span", { class: `badge ${c.state}` }, c.state),
        c.phase && c.phase !== c.state ? el("div", { class: "muted phase" }, c.phase) : "",
        c.error ? el("div", { class: "error-text" }, c.error) : ""),
      el("td", { class: "health" }, health),
      el("td", { class: "version" }, c.version || ""),
      el("td", { class: "pid num" }, c.pid || "–"),
      el("td", { class: "restarts num" }, c.restarts ?? 0),
      el("td", { class: "since muted", title: when(c.since) }, ago(c.since)),
      el("td", { class: "buttons" },
        el("button", { type: "button", class: "small", "data-action": "logs", "data-name": c.name,
          onclick: () => toggleLogs(c.name) }, state.open.has(c.name) ? "Hide logs" : "Logs"),
        " ",
        el("button", { type: "button", class: "small", "data-action": "restart", "data-name": c.name,
          onclick: () => restart(c.name) }, "Restart"),
        " ",
        el("button", { type: "button", class: "small", "data-action": "stop", "data-name": c.name,
          onclick: () => stop(c.name) }, "Stop")),
    );
    body.append(row);
    if (state.open.has(c.name)) {
      body.append(el("tr", { class: "logs", "data-logs": c.name },
        el("td", { colSpan: 8 }, el("pre", { class: "stdout" }, "…"), el("pre", { class: "stderr" }))));
    }
  }
  if (!list.length) body.append(el("tr", {}, el("td", { colSpan: 8, class: "muted" }, "No components: no plan is applied.")));
}

async function drawLogs() {
  for (const name of state.open) {
    const row = document.querySelector(`tr[data-logs="${CSS.escape(name)}"]`);
    if (!row) continue;
    try {
      const logs = await api("GET", `/v1/components/${encodeURIComponent(name)}/logs?lines=30`);
      row.querySelector("pre.stdout").textContent = logs.stdout.join("\n") || "(stdout.log is empty)";
      row.querySelector("pre.stderr").textContent = logs.stderr.join("\n");
    } catch (err) {
      row.querySelector("pre.stdout").textContent = `logs: ${err.message}`;
    }
  }
}

function drawGraph(components) {
  // Redraw the picture only when a state changed: the SVG is rendered by the agent.
  const key = components.map((c) => `${c.name}=${c.phase || c.state}`).join(",");
  if (key === state.graphKey) return;
  state.graphKey = key;
  $("#graph").src = `/v1/plan/graph?format=svg&k=${encodeURIComponent(key)}`;
}

function row(dl, label, value, id) {
  if (value === undefined || value === null || value === "") return;
  dl.append(el("dt", {}, label), el("dd", { id }, value));
}

function drawRevision(rev, history) {
  const dl = $("#revision");
  dl.replaceChildren();
  if (!rev) {
    dl.append(el("dd", { class: "muted" }, "No GitOps source on this agent (the plan was applied locally)."));
    return;
  }
  const lastSync = rev.last_sync || {};
  row(dl, "applied", rev.applied ? `${short(rev.applied)}${rev.signer ? " signed by " + rev.signer : ""}` : "none", "rev-applied");
  if (rev.fingerprint) row(dl, "key", rev.fingerprint);
  row(dl, "last known-good", rev.last_known_good ? `${short(rev.last_known_good)}${signerOf(rev.last_known_good, history)}` : "none", "rev-lkg");
  const pending = lastSync.revision && lastSync.revision !== rev.applied ? lastSync.revision : null;
  row(dl, "pending", pending ? `${short(pending)}${signerOf(pending, history)} (${lastSync.result || ""})` : "none", "rev-pending");
  for (const [revision, info] of Object.entries(rev.failed || {})) {
    row(dl, "failed", `${short(revision)}: ${(info && (info.reason || info.kind)) || ""}`);
  }
  row(dl, "source", rev.source ? `${rev.source}${rev.ref ? " @ " + rev.ref : ""}` : "");
  row(dl, "applied at", when(rev.applied_at));
  row(dl, "last sync", lastSync.time ? `${when(lastSync.time)} ${lastSync.result || ""}` : "");
  row(dl, "next poll", rev.suspended ? "suspended" : when(rev.next_poll));
  if (rev.soaking) row(dl, "soak", "watching the new revision");
  for (const key of ["wave", "rollout", "window", "maintenance_window"]) {
    const v = rev[key];
    if (v !== undefined && v !== null) row(dl, key.replace("_", " "), typeof v === "object" ? JSON.stringify(v) : v);
  }
  row(dl, "labels", (rev.labels || []).join(", "));
  $("#suspend").hidden = !!rev.suspended;
  $("#resume").hidden = !rev.suspended;
}

function signerOf(revision, history) {
  const e = (history || []).find((h) => (h.revision === revision || h.to === revision) && h.signer);
  return e ? ` signed by ${e.signer}` : "";
}

function drawHistory(list) {
  const body = $("#history tbody");
  body.replaceChildren();
  for (const h of list || []) {
    const details = h.reason || (h.changes ? summary(h.changes) : "") || h.error || "";
    body.append(el("tr", { "data-kind": h.kind || "" },
      el("td", { class: "muted", title: when(h.time) }, ago(h.time)),
      el("td", {}, h.kind || ""),
      el("td", {}, el("span", { class: `badge ${h.ok === false ? "failed" : "ok"}` }, h.result || (h.ok ? "ok" : ""))),
      el("td", {}, short(h.revision || h.to || "")),
      el("td", {}, details)));
  }
  if (!(list || []).length) body.append(el("tr", {}, el("td", { colSpan: 5, class: "muted" }, "Nothing yet.")));
}

function summary(ch) {
  return ["added", "changed", "restarted", "removed"]
    .filter((k) => (ch[k] || []).length)
    .map((k) => `${k}: ${ch[k].join(", ")}`)
    .join("; ");
}

function drawDatasets(list) {
  const box = $("#datasets");
  box.replaceChildren();
  if (!list || !list.length) {
    box.append(el("p", { class: "muted" }, "No datasets on this device."));
    return;
  }
  const table = el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "State"), el("th", {}, "Details"))));
  const body = el("tbody");
  for (const d of list) body.append(el("tr", {}, el("td", {}, d.name || ""), el("td", {}, d.state || d.status || ""), el("td", {}, JSON.stringify(d))));
  table.append(body);
  box.append(table);
}

// --- polling ---------------------------------------------------------------------------------

async function refresh() {
  if (state.busy) return; // one poll at a time, whatever the timers do
  state.busy = true;
  try {
    // One request after another: the browser then keeps one connection to the agent, so the
    // agent keeps one handler thread for the page instead of one per parallel request.
    const health = await fetch("/healthz", { cache: "no-store" }).then((r) => r.json()).catch(() => null);
    const components = await api("GET", "/v1/components");
    const history = await api("GET", "/v1/history?limit=20");
    const datasets = await api("GET", "/v1/datasets").catch(() => []);
    // No [source]: the agent answers 400 and the page says so instead of failing.
    const revision = await api("GET", "/v1/revision").catch(() => null);
    drawHealth(health);
    drawComponents(components);
    drawGraph(components);
    drawRevision(revision, history);
    drawHistory(history);
    drawDatasets(datasets);
    await drawLogs();
    $("#problem").hidden = true;
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (!document.body.dataset.loaded) document.body.dataset.loadedAt = String(Math.round(performance.now()));
    document.body.dataset.loaded = "1";
  } catch (err) {
    if (err.status !== 401) {
      $("#problem").textContent = `Cannot reach the agent: ${err.message}`;
      $("#problem").hidden = false;
    }
  } finally {
    state.busy = false;
  }
}

function schedule() {
  clearTimeout(state.timer);
  const ms = document.visibilityState === "hidden" ? HIDDEN_POLL_MS : POLL_MS;
  state.timer = setTimeout(async () => { await refresh(); schedule(); }, ms);
}

// --- actions: always the dry run first, then a confirmation ----------------------------------

function ask(title, text, dry) {
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-dry").textContent = dry === undefined ? "" : JSON.stringify(dry, null, 2);
  $("#confirm-dry").hidden = dry === undefined;
  const dialog = $("#confirm");
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true }));
}

function tell(title, body) {
  $("#result-title").textContent = title;
  $("#result-body").textContent = typeof body === "string" ? body : JSON.stringify(body, null, 2);
  $("#result").showModal();
}

async function act(title, dryCall, explain, doCall) {
  let dry;
  try {
    dry = dryCall ? await dryCall() : undefined;
  } catch (err) {
    tell(`${title}: refused`, err.body || err.message);
    return;
  }
  if (!(await ask(title, explain(dry), dry))) return;
  try {
    const result = await doCall();
    tell(`${title}: done`, result ?? "done");
  } catch (err) {
    tell(`${title}: failed`, err.body || err.message);
  }
  await refresh();
}

const comp = (name) => `/v1/components/${encodeURIComponent(name)}`;

function restart(name) {
  return act(`Restart ${name}`, () => api("POST", `${comp(name)}:restart?dry=true`),
    (d) => `Stops ${d.stopOrder.join(", ")}, then starts ${d.startOrder.join(", ")} (dry run below).`,
    () => api("POST", `${comp(name)}:restart?wait=pid&timeout=60s`));
}

function stop(name) {
  return act(`Stop ${name}`, () => api("POST", `${comp(name)}:stop?dry=true`),
    (d) => `Stops ${name}; it stays stopped until restarted or the plan is applied again.` +
      (d.dependents.length ? ` ${d.dependents.join(", ")} depend on it and keep running without it.` : ""),
    async () => { await api("POST", `${comp(name)}:stop`); return `${name} stopped`; });
}

function toggleLogs(name) {
  if (state.open.has(name)) state.open.delete(name); else state.open.add(name);
  refresh();
}

function wire() {
  $("#sync").addEventListener("click", () => act("Sync now", () => api("POST", "/v1/sync?dry_run=true"),
    (d) => `The dry run says: ${d.result || "see below"}. Run the sync for real?`,
    () => api("POST", "/v1/sync")));
  $("#suspend").addEventListener("click", () => act("Suspend", null,
    () => "Stop polling the source. Running components are untouched; resume starts polling again.",
    () => api("POST", "/v1/suspend")));
  $("#resume").addEventListener("click", () => act("Resume", null,
    () => "Start polling the source again.", () => api("POST", "/v1/resume")));
  $("#logout").addEventListener("click", async () => {
    await fetch("/ui/logout", { method: "POST", headers: CSRF }).catch(() => null);
    location.assign("/ui/login");
  });
  document.addEventListener("visibilitychange", schedule);
}

wire();
refresh().then(schedule);
