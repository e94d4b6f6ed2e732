// The status page: polls /v1/workers once a second and renders one card per model.
// No framework and no external resources: the requester serves everything, and the
// Content-Security-Policy it sends forbids anything else. Text goes in with textContent only.
"use strict";

const POLL_MS = 1000;
const cards = new Map(); // model -> {el, status, fetchedAt}
let key = sessionStorage.getItem("fma-api-key") || "";
let lastOk = 0;

function headers() {
  return key ? {"Authorization": "Bearer " + key} : {};
}

function modelPath(model) {
  // Model names may hold "/": keep it as a path separator, escape each segment.
  return model.split("/").map(encodeURIComponent).join("/");
}

function seconds(v) {
  if (v === null || v === undefined) return "–";
  if (v < 10) return v.toFixed(2) + "s";
  if (v < 60) return v.toFixed(1) + "s";
  const t = Math.round(v), m = Math.floor(t / 60), s = t % 60;
  if (m < 60) return m + "m" + String(s).padStart(2, "0") + "s";
  return Math.floor(m / 60) + "h" + String(m % 60).padStart(2, "0") + "m";
}

function ago(ts) {
  if (ts === null || ts === undefined) return "never";
  const d = Math.max(0, Date.now() / 1000 - ts);
  if (d < 1) return "just now";
  if (d >= 86400) return Math.floor(d / 86400) + "d ago";
  if (d >= 3600) return Math.floor(d / 3600) + "h ago";
  if (d >= 60) return Math.floor(d / 60) + "m ago";
  return Math.floor(d) + "s ago";
}

function setText(card, cls, text) {
  card.querySelector("." + cls).textContent = text;
}

function render(card, w, fetchedAt) {
  const phase = w.phase || w.state;
  const state = card.querySelector(".state");
  state.textContent = phase === w.state ? w.state : w.state + " · " + phase;
  state.className = "state s-" + phase;
  card.dataset.state = w.state;
  card.dataset.phase = phase;
  setText(card, "backend", w.backend || "–");
  const act = w.last_actuation;
  setText(card, "actuation", act ? act.path + " " + seconds(act.seconds) : "–");
  setText(card, "in_flight", String(w.in_flight));
  setText(card, "queued", String(w.queued));
  setText(card, "last_used", ago(w.last_used));
  const left = w.idle_left_s === null || w.idle_left_s === undefined ? null
    : Math.max(0, w.idle_left_s - (Date.now() - fetchedAt) / 1000);
  setText(card, "idle_left", left === null ? "–" : seconds(left));
  const detail = card.querySelector(".detail");
  const why = w.error || w.detail || "";
  detail.textContent = why;
  detail.hidden = !why;
  detail.classList.toggle("error", Boolean(w.error));
  const busy = card.dataset.busy === "1";
  for (const b of card.querySelectorAll("button")) {
    const a = b.dataset.action;
    b.disabled = busy
      || (a === "warm" && w.state === "ready")
      || (a.startsWith("sleep") && !(w.state === "ready" || w.state === "sleeping"))
      || (a === "release" && w.state === "cold");
  }
}

function summary(rows) {
  const count = s => rows.filter(w => w.state === s).length;
  const parts = [rows.length + (rows.length === 1 ? " model" : " models"),
    count("ready") + " awake", count("sleeping") + " sleeping", count("starting") + " starting"];
  if (count("failed")) parts.push(count("failed") + " failed");
  const inflight = rows.reduce((n, w) => n + w.in_flight, 0);
  const queued = rows.reduce((n, w) => n + w.queued, 0);
  parts.push(inflight + " in flight", queued + " queued");
  document.getElementById("summary").textContent = parts.join(" · ");
}

function problem(text) {
  const p = document.getElementById("problem");
  p.textContent = text || "";
  p.hidden = !text;
}

async function act(model, action, card) {
  const path = "v1/workers/" + modelPath(model);
  const [method, url] = {
    warm: ["POST", path + "/warm"],
    sleep1: ["POST", path + "/sleep?level=1"],
    sleep2: ["POST", path + "/sleep?level=2"],
    release: ["DELETE", path],
  }[action];
  const outcome = card.querySelector(".outcome");
  outcome.textContent = action + "…";
  card.dataset.busy = "1";
  setTimeout(poll, 150); // show the transition (starting, going_to_sleep) without waiting a whole period
  try {
    const resp = await fetch(url, {method, headers: headers()});
    const body = await resp.json().catch(() => ({}));
    if (resp.status === 401) askForKey();
    outcome.textContent = resp.ok ? action + ": " + body.state
      : action + " failed: " + resp.status + " " + ((body.error && body.error.message) || resp.statusText);
    outcome.classList.toggle("error", !resp.ok);
  } catch (err) {
    outcome.textContent = action + " failed: " + err;
    outcome.classList.add("error");
  } finally {
    card.dataset.busy = "0";
    poll();
  }
}

function cardFor(model) {
  let entry = cards.get(model);
  if (entry) return entry;
  const el = document.getElementById("card").content.firstElementChild.cloneNode(true);
  el.dataset.model = model;
  el.querySelector(".name").textContent = model;
  for (const b of el.querySelectorAll("button")) {
    b.addEventListener("click", () => act(model, b.dataset.action, el));
  }
  document.getElementById("models").appendChild(el);
  entry = {el, status: null, fetchedAt: 0};
  cards.set(model, entry);
  return entry;
}

function askForKey() {
  document.getElementById("auth").hidden = false;
}

document.getElementById("auth").addEventListener("submit", ev => {
  ev.preventDefault();
  key = document.getElementById("key").value.trim();
  sessionStorage.setItem("fma-api-key", key);
  document.getElementById("auth").hidden = true;
  poll();
});

// Each model's kind and aliases (GET /v1/models/{model}: unlisted models too), asked once per model.
const metadata = new Map();
async function describe(model, el) {
  if (metadata.has(model)) return;
  metadata.set(model, null);
  try {
    const resp = await fetch("v1/models/" + modelPath(model), {headers: headers(), cache: "no-store"});
    if (!resp.ok) { metadata.delete(model); return; }
    const m = await resp.json();
    metadata.set(model, m);
    setText(el, "kind", m.kind || "–");
    setText(el, "aliases", (m.aliases || []).join(", ") || "–");
    if (m.description) el.querySelector(".name").title = m.description;
  } catch (err) {
    metadata.delete(model);
  }
}

let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  try {
    const resp = await fetch("v1/workers", {headers: headers(), cache: "no-store"});
    if (resp.status === 401) { askForKey(); problem("an API key is needed to see the workers"); return; }
    if (!resp.ok) { problem("the requester answered " + resp.status); return; }
    const rows = (await resp.json()).data;
    const now = Date.now();
    const seen = new Set();
    for (const w of rows) {
      const entry = cardFor(w.model);
      describe(w.model, entry.el);
      entry.status = w;
      entry.fetchedAt = now;
      render(entry.el, w, now);
      seen.add(w.model);
    }
    for (const [model, entry] of cards) {
      if (!seen.has(model)) { entry.el.remove(); cards.delete(model); } // removed by a models reload
    }
    summary(rows);
    problem("");
    lastOk = now;
    document.getElementById("updated").textContent = "· updated " + new Date(now).toLocaleTimeString();
  } catch (err) {
    problem("cannot reach the requester (" + err.message + "); retrying");
  } finally {
    polling = false;
  }
}

// Between polls only the clocks move: re-render from the last answer.
function tick() {
  for (const entry of cards.values()) if (entry.status) render(entry.el, entry.status, entry.fetchedAt);
  if (lastOk && Date.now() - lastOk > 5000) problem("no answer from the requester for " + ago(lastOk / 1000).replace(" ago", ""));
}

poll();
setInterval(poll, POLL_MS);
setInterval(tick, 250);
