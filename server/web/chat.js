// The chat page: sessions kept in this browser (transcripts, names), turns sent in delta mode, and each
// session's cache (sinks, window, evicted tokens) read back from GET /v1/sessions after every turn.
import { ApiError, call, currentKey, keyRemembered, session, setKey, streamChat } from "./api.js";
import { fillBar, node, num, renderText } from "./render.js";

const $ = (id) => document.getElementById(id);
const LOCAL = "streamllm.sessions", CURRENT = "streamllm.current", PREFS = "streamllm.prefs";
const KEEP_MESSAGES = 400; // a transcript kept in this browser: its first message and the most recent ones
const FOLD_CHARS = 1500; // a longer message (a pasted book) shows its start, the rest on demand
// A regenerate or edit resends history (the server rebuilds the session from it): at most this much.
const RESEND_MESSAGES = 64, RESEND_CHARS = 200_000;

const local = JSON.parse(localStorage.getItem(LOCAL) || "{}"); // id -> {name, system, messages, dropped, ...}
const prefs = JSON.parse(localStorage.getItem(PREFS) || "{}");
const info = {}; // id -> the server's summary, or null when it has no such session
let current = localStorage.getItem(CURRENT);
let model = null, busy = null, editing = false;

function save() {
  localStorage.setItem(CURRENT, current);
  localStorage.setItem(PREFS, JSON.stringify(prefs));
  // Over the browser's quota: keep every name, then only the current transcript, then only its ends.
  const shrink = [
    () => Object.entries(local).forEach(([id, s]) => id !== current && (s.messages = s.messages.slice(0, 1))),
    () => trim(conv(), 3),
  ];
  for (let i = 0; ; i++) {
    try {
      return localStorage.setItem(LOCAL, JSON.stringify(local));
    } catch (e) {
      if (i === shrink.length) return console.warn("transcripts not saved:", e);
      shrink[i]();
    }
  }
}

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const conv = () => local[current];
const committed = () => (info[current] && info[current].turns) || 0;
// Messages of the session this page has no copy of (the server's `messages` counts every committed one).
const missing = () => ((info[current] && info[current].messages) || 0) - conv().messages.length - conv().dropped;
// Regenerate and edit resend this page's copy of the history: only when it is the whole history.
const inSync = () => missing() === 0;

function openSession(id) {
  current = id;
  editing = false;
  // A session made elsewhere has no system prompt of this page's: it is not pinned in that session.
  local[id] ??= { name: "", system: info[id] ? "" : prefs.system || "", messages: [], dropped: 0 };
  save();
  renderAll();
}

// -- rendering ------------------------------------------------------------------------------------

function bubble(role, text, note) {
  const el = node("div", `msg ${role}`);
  el.append(node("div", "text"));
  if (role === "user" && text.length > FOLD_CHARS) {
    renderText(el.firstChild, text.slice(0, FOLD_CHARS / 3));
    const more = node("details");
    more.append(node("summary", "", `… ${num(text.length - FOLD_CHARS / 3)} more characters`));
    more.ontoggle = () => more.childElementCount === 1 && more.append(text.slice(FOLD_CHARS / 3));
    el.append(more);
  } else renderText(el.firstChild, text);
  if (note) el.append(node("span", "note", note));
  $("log").append(el);
  scrollDown();
  return el;
}

const scrollDown = () => ($("log").scrollTop = $("log").scrollHeight);

function renderLog(messages = conv().messages) {
  $("log").replaceChildren();
  const s = conv();
  const shown = messages.filter((m) => m.role !== "system");
  if (s.dropped) bubble("note", `${s.dropped} earlier messages are no longer kept in this browser.`);
  if (missing() > 0) bubble("note", `${missing()} messages of this session were sent elsewhere: the server holds them.`);
  for (const m of shown) bubble(m.role, m.content);
}

function renderCache() {
  const s = info[current], c = conv();
  $("session-name").textContent = c.name || current;
  fillBar($("cache-bar"), s);
  const set = (id, text) => ($(id).textContent = text);
  set("stat-sinks", s ? `${s.sink_tokens} (${Math.min(s.pinned_tokens, s.sink_tokens)} pinned system prompt)` : "–");
  set("stat-window", s ? `${num(Math.max(0, s.cache_tokens - s.sink_tokens))} / ${num(s.window)}` : "–");
  set("stat-evicted", s ? num(s.evicted) : "–");
  set("stat-seen", s ? num(s.tokens_seen) : "–");
  set("stat-turns", s ? num(s.turns) : "–");
  const last = s && s.last_turn && s.last_turn.mode ? s.last_turn : null;
  set("stat-cached", last ? `${num(last.cached_tokens)} of ${num(last.prompt_tokens)} (${last.mode})` : "–");
  set("stat-ttft", c.ttft != null ? `${Math.round(c.ttft)} ms` : "–");
  set("stat-speed", c.speed != null ? `${c.speed.toFixed(1)} tok/s` : "–");
}

function renderSessions() {
  const ids = Object.keys(info).filter((id) => info[id]);
  for (const id of Object.keys(local)) if (!ids.includes(id) && (id === current || !(id in info))) ids.push(id);
  $("sessions").replaceChildren(
    ...ids.map((id) => {
      const li = node("li");
      li.dataset.id = id;
      li.setAttribute("aria-current", String(id === current));
      const c = local[id], first = c && c.messages.find((m) => m.role === "user");
      const open = node("button", "open", (c && c.name) || (first && first.content.slice(0, 40)) || id);
      open.type = "button";
      open.title = id;
      open.onclick = () => !busy && openSession(id);
      const rename = node("button", "icon rename", "✎");
      rename.setAttribute("aria-label", `Rename ${open.textContent}`);
      rename.onclick = () => renameSession(id);
      const del = node("button", "icon delete", "×");
      del.setAttribute("aria-label", `Delete ${open.textContent}`);
      del.onclick = () => deleteSession(id);
      const bar = node("div", "bar");
      bar.setAttribute("role", "img");
      bar.append(node("span", "seg pinned"), node("span", "seg sinks"), node("span", "seg window"));
      fillBar(bar, info[id]);
      li.append(open, rename, del, bar);
      return li;
    }),
  );
}

function renderControls() {
  const s = conv();
  const last = s.messages.at(-1);
  const canResend = !busy && last && last.role === "assistant" && inSync();
  $("send").disabled = !!busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = !canResend;
  $("edit").disabled = !canResend;
  $("new-session").disabled = !!busy;
  $("system").value = s.system;
  $("system").disabled = !!busy || s.messages.length > 0 || committed() > 0;
}

function renderAll() {
  renderLog();
  renderCache();
  renderSessions();
  renderControls();
}

// -- talking to the server ------------------------------------------------------------------------
async function refresh() {
  try {
    const list = await call("GET", "/v1/sessions");
    for (const id of Object.keys(info)) delete info[id];
    for (const s of list.data) info[s.id] = s;
    if (!info[current]) info[current] = await session(current);
  } catch (e) {
    status(e);
  }
  renderCache();
  renderSessions();
  renderControls();
}

/** What a turn resends when the server must (re)build the session: the first message and the most
 * recent ones that fit, starting at a user message (the session keeps only its tail anyway). */
function resendable(messages) {
  if (messages.length <= 1) return messages;
  let chars = messages[0].content.length, start = messages.length;
  while (start > 1 && messages.length - start < RESEND_MESSAGES - 1) {
    chars += messages[start - 1].content.length;
    if (chars > RESEND_CHARS && start < messages.length) break;
    start -= 1;
  }
  while (start < messages.length - 1 && messages[start].role !== "user") start += 1;
  return [messages[0], ...messages.slice(start)];
}

/** One turn: `history` is what the session holds before it (committed messages), `text` the user's. */
async function turn(history, text, { rebuild = false } = {}) {
  const s = conv(), id = current;
  const userMsg = { role: "user", content: text };
  busy = new AbortController();
  renderControls();
  bubble("user", text);
  const reply = bubble("assistant", "");
  const note = (t) => reply.append(node("span", "note", t));
  let content = "", ok = false;
  try {
    info[id] = await session(id);
    const full = [...history, userMsg];
    const delta = !rebuild && info[id] && info[id].turns > 0;
    const body = {
      model,
      session_id: id,
      messages: delta ? [userMsg] : resendable(full),
      session_mode: delta ? "delta" : "auto",
      temperature: Number($("temperature").value),
      max_tokens: Number($("max-tokens").value),
    };
    const onText = (t) => {
      content += t;
      renderText(reply.firstChild, content);
      scrollDown();
    };
    const out = await withRetry(() => streamChat(body, onText, busy.signal), note);
    // What the session holds now: the page's history plus this turn, or exactly what was resent.
    if (!delta) s.dropped = 0;
    s.messages = [...(delta ? full : body.messages), { role: "assistant", content }];
    trim(s);
    s.ttft = out.ttft;
    const completion = out.usage ? out.usage.completion_tokens : 0;
    s.speed = out.seconds > 0 && completion > 1 ? (completion - 1) / out.seconds : null;
    ok = true;
    if (out.finish === "length") note("cut at max tokens");
  } catch (e) {
    reply.classList.add(e.name === "AbortError" ? "stopped" : "failed");
    if (e.name === "AbortError") note("stopped: the server keeps only finished turns, so this one is not in the session");
    else note(`error ${e.status || ""}: ${e.message}`);
  } finally {
    busy = null;
    save();
    await refresh();
    scrollDown();
    const last = info[id] && info[id].last_turn;
    if (ok && rebuild && last && last.mode === "rebuilt") {
      note(`the server rebuilt the session from this page's history (cached ${last.cached_tokens} tokens)`);
    }
  }
}

/** A stopped turn leaves its session busy for a moment (until the server has aborted it): retry 409s. */
async function withRetry(request, note) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await request();
    } catch (e) {
      if (!(e instanceof ApiError && e.code === "session_busy" && attempt < 20)) throw e;
      if (attempt === 0) note("the session is still busy with the previous turn: waiting…");
      await new Promise((r) => setTimeout(r, 300));
    }
  }
}

function trim(s, keep = KEEP_MESSAGES) {
  const extra = s.messages.length - keep;
  if (extra <= 0) return;
  s.messages.splice(1, extra);
  s.dropped += extra;
}

function submit() {
  const text = $("prompt").value;
  if (busy || !text.trim()) return;
  $("prompt").value = "";
  const s = conv();
  const history = s.messages.length ? [...s.messages] : s.system.trim() ? [{ role: "system", content: s.system }] : [];
  if (editing) {
    editing = false;
    return replaceLast(text);
  }
  return turn(history, text);
}

/** The edited message replaces the last user message: a history that diverges from the session, which
 * the server rebuilds from (same id). Edited first messages restart the session: the server could not
 * tell them from a new turn. The page's copy changes only once the server has committed the new turn. */
async function replaceLast(text) {
  const s = conv(), i = lastUser(s.messages);
  if (busy || i < 0 || !inSync()) return;
  const before = s.messages.slice(0, i);
  renderLog(before);
  if (i === 0) {
    await call("DELETE", `/v1/sessions/${encodeURIComponent(current)}`).catch(status);
    bubble("note", "the first message changed: the session starts again");
  }
  return turn(before, text, { rebuild: i > 0 });
}

const lastUser = (messages) => messages.map((m) => m.role).lastIndexOf("user");

function regenerate() {
  const s = conv(), i = lastUser(s.messages);
  if (i >= 0) replaceLast(s.messages[i].content);
}

function edit() {
  const s = conv(), i = lastUser(s.messages);
  if (busy || i < 0 || !inSync()) return;
  editing = true;
  $("prompt").value = s.messages[i].content;
  $("prompt").focus();
}

async function deleteSession(id) {
  if (busy) return;
  try {
    await call("DELETE", `/v1/sessions/${encodeURIComponent(id)}`);
  } catch (e) {
    if (e.status !== 404) return status(e);
  }
  delete local[id];
  delete info[id];
  if (id === current) {
    const rest = Object.keys(info).filter((k) => info[k]);
    openSession(rest[0] || newId());
  }
  save();
  await refresh();
}

function renameSession(id) {
  const name = window.prompt("Name of this session (kept in this browser)", (local[id] && local[id].name) || "");
  if (name === null) return;
  local[id] ??= { name: "", system: "", messages: [], dropped: 0 };
  local[id].name = name.trim();
  save();
  renderAll();
}

function status(e) {
  $("health").textContent = e instanceof Error ? e.message : e;
  if (e instanceof ApiError && e.status === 401) {
    $("auth").hidden = false;
    $("api-key").focus();
  }
}

async function connect() {
  try {
    const health = await fetch("/health").then((r) => r.json());
    $("health").textContent = health.status || (health.error && health.error.message) || "";
    const models = await call("GET", "/v1/models");
    model = models.data[0].id;
    $("model").textContent = model;
    await refresh();
  } catch (e) {
    status(e);
  }
}

// -- wiring ---------------------------------------------------------------------------------------
function wire() {
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    submit();
  };
  $("prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  };
  document.addEventListener("keydown", (e) => e.key === "Escape" && busy && busy.abort());
  $("stop").onclick = () => busy && busy.abort();
  $("regenerate").onclick = regenerate;
  $("edit").onclick = edit;
  $("new-session").onclick = () => openSession(newId());
  $("system").oninput = () => {
    conv().system = prefs.system = $("system").value;
    save();
  };
  for (const [id, key] of [["temperature", "temperature"], ["max-tokens", "maxTokens"]]) {
    if (prefs[key] !== undefined) $(id).value = prefs[key];
    $(id).oninput = () => {
      prefs[key] = $(id).value;
      $("temperature-value").textContent = $("temperature").value;
      save();
    };
  }
  $("temperature-value").textContent = $("temperature").value;
  $("api-key").value = currentKey();
  $("remember-key").checked = keyRemembered();
  $("auth").hidden = !currentKey();
  const keyChanged = () => {
    setKey($("api-key").value.trim(), $("remember-key").checked);
    connect();
  };
  $("api-key").onchange = keyChanged;
  $("remember-key").onchange = keyChanged;
}

wire();
openSession(current || newId());
connect();
