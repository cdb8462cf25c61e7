// tillsync dashboard: a little JavaScript on server-rendered pages, no framework, no CDN.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const e = data.error || { code: "http_" + response.status, field: "", reason: response.statusText };
    throw new Error(`${e.code}${e.field ? " (" + e.field + ")" : ""}: ${e.reason}`);
  }
  return data;
}

// <form data-api="/api/x/{key}" data-method="PUT">: fields become a JSON body; {name} in the
// path takes that field; data-json fields are parsed; checkboxes are booleans.
function formBody(form) {
  let path = form.dataset.api;
  const body = {};
  for (const el of form.elements) {
    if (!el.name) continue;
    if (path.includes(`{${el.name}}`)) {
      path = path.replace(`{${el.name}}`, encodeURIComponent(el.value.trim()));
      continue;
    }
    if (el.type === "checkbox") body[el.name] = el.checked;
    else if (el.dataset.json) body[el.name] = JSON.parse(el.value);
    else if (el.value.trim() !== "") body[el.name] = el.value.trim();
  }
  return { path, body };
}

function show(form, text, ok) {
  const out = form.querySelector("output");
  if (out) { out.textContent = text; out.className = "result " + (ok ? "ok" : "error"); }
}

async function pollReinit(sent, status) {
  const query = new URLSearchParams({ kind: "reinit", since: sent.sent_at, limit: "500" });
  for (let i = 0; i < 300; i++) {
    const data = await api("GET", "/api/syncs?" + query);
    const done = data.syncs.filter((s) => sent.registers.includes(s.register_id));
    const results = done.map((s) => `${s.register_id}: ${s.result}`).join(", ");
    status.textContent = `reinit (${sent.mode}) completed on ${done.length}/${sent.registers.length}` + (results ? ` — ${results}` : "");
    status.dataset.done = String(done.length);
    if (done.length >= sent.registers.length) return;
    await new Promise((r) => setTimeout(r, 2000));
  }
}

document.addEventListener("submit", async (event) => {
  const form = event.target;
  if (!form.dataset.api) return;
  event.preventDefault();
  let request;
  try { request = formBody(form); } catch (e) { show(form, "not JSON: " + e.message, false); return; }
  try {
    const data = await api(form.dataset.method || "POST", request.path, request.body);
    show(form, "done", true);
    if (form.dataset.reinit) {
      const status = document.querySelector('[data-testid="reinit-status"]');
      show(form, `sent to ${data.registers.length} register(s)`, true);
      if (status && data.registers.length) pollReinit(data, status);
    } else if (form.dataset.reload) {
      setTimeout(() => location.reload(), 300);
    }
  } catch (e) {
    show(form, e.message, false);
  }
});

// Elements marked data-autorefresh="N" (with a data-testid) re-read their content from
// the same page every N seconds: one request refreshes them all.
const refreshing = [...document.querySelectorAll("[data-autorefresh][data-testid]")];
if (refreshing.length) {
  const seconds = Math.min(...refreshing.map((el) => Number(el.dataset.autorefresh) || 5));
  setInterval(async () => {
    const response = await fetch(location.href, { credentials: "same-origin" });
    if (!response.ok) return;
    const doc = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const el of refreshing) {
      const fresh = doc.querySelector(`[data-testid="${el.dataset.testid}"]`);
      if (fresh) el.innerHTML = fresh.innerHTML;
    }
  }, seconds * 1000);
}

// The live page: server-sent events, and a browser notification when allowed.
const feed = document.getElementById("live-feed");
if (feed) {
  const status = document.querySelector('[data-testid="live-status"]');
  const button = document.getElementById("notify-enable");
  if (!("Notification" in window)) button.hidden = true;
  button.addEventListener("click", () => Notification.requestPermission());
  const describe = {
    document: (d) => `${d.doc_type} ${d.register_id} #${d.seq}` + (d.total_display ? ` ${d.total_display}` : ""),
    offline: (d) => `register ${d.register_id} went offline (${d.pending} pending)`,
    online: (d) => `register ${d.register_id} is back online`,
    dead_letter: (d) => `dead letter ${d.id}: ${d.code} ${d.field} ${d.register_id || ""}`,
  };
  const source = new EventSource("/api/events");
  source.addEventListener("ready", () => { status.textContent = "live"; status.className = "badge online"; });
  source.onerror = () => { status.textContent = "reconnecting…"; status.className = "badge offline"; };
  for (const [name, text] of Object.entries(describe)) {
    source.addEventListener(name, (event) => {
      const data = JSON.parse(event.data);
      const li = document.createElement("li");
      li.dataset.testid = "event-" + name;
      li.dataset.key = data.register_id + (data.seq != null ? "/" + data.seq : "");
      li.className = name;
      li.textContent = new Date().toLocaleTimeString() + " " + text(data);
      feed.prepend(li);
      while (feed.children.length > 500) feed.lastChild.remove();
      if (window.Notification && Notification.permission === "granted" && name !== "online") {
        new Notification("tillsync", { body: text(data) });
      }
    });
  }
}
