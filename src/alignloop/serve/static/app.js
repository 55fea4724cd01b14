// alignloop chat: the product page of the serve package. Plain JS, no build step.
//
// It talks to the product API (/api/...), keeps the anonymous account's key in localStorage
// ("alignloop_key"), and logs what the user does as events: read (seconds a reply was on screen
// while the tab was visible and focused), swipe, select, vote, edit, report. The server records
// `message` events itself when a message is posted.
(() => {
  "use strict";

  const KEY_STORAGE = "alignloop_key";

  const state = {
    key: localStorage.getItem(KEY_STORAGE),
    userId: localStorage.getItem(KEY_STORAGE + "_user"),
    characters: [],
    conversations: [],
    conv: null, // {id, character_id, character_name, model_version}
    // The selected path of the conversation tree, in order:
    //   {kind: "user", turn_id, text, pending}
    //   {kind: "assistant", user_turn_id, cands: [{turn_id, text, candidate_index, vote, edited, reported}],
    //    idx, swiped, picked (turn_id settled on with "pick"), generating}
    items: [],
    busy: false,
    editing: null, // turn_id being edited
  };

  // ---------------------------------------------------------------- DOM helpers

  const $ = (id) => document.getElementById(id);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "testid") el.dataset.testid = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "html") el.innerHTML = v; // only for our own constant SVG icons
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  // Feather icons (MIT), inlined so that no font or network is needed.
  const ICONS = {
    left: '<polyline points="15 18 9 12 15 6"/>',
    right: '<polyline points="9 18 15 12 9 6"/>',
    check: '<polyline points="20 6 9 17 4 12"/>',
    up: '<path d="M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3"/>',
    down: '<path d="M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17"/>',
    regen: '<polyline points="23 4 23 10 17 10"/><polyline points="1 20 1 14 7 14"/><path d="M3.51 9a9 9 0 0 1 14.85-3.36L23 10M1 14l4.64 4.36A9 9 0 0 0 20.49 15"/>',
    edit: '<path d="M17 3a2.828 2.828 0 1 1 4 4L7.5 20.5 2 22l1.5-5.5L17 3z"/>',
    flag: '<path d="M4 15s1-1 4-1 5 2 8 2 4-1 4-1V3s-1 1-4 1-5-2-8-2-4 1-4 1z"/><line x1="4" y1="22" x2="4" y2="15"/>',
  };
  const icon = (name) => h("span", { class: "icon", "aria-hidden": "true",
    html: `<svg viewBox="0 0 24 24">${ICONS[name]}</svg>` });

  function initials(name) {
    const parts = String(name || "?").trim().split(/\s+/);
    return ((parts[0] || "?")[0] + (parts.length > 1 ? parts[parts.length - 1][0] : "")).toUpperCase();
  }

  // A stable pastel hue per character, so each one is recognisable in the sidebar and the chat.
  function hue(s) {
    const i = state.characters.findIndex((c) => c.name === s);
    if (i >= 0) return Math.round(230 + (i * 360) / state.characters.length) % 360; // evenly spread
    let x = 7;
    for (const ch of String(s || "")) x = (x * 131 + ch.codePointAt(0)) % 1000003;
    return Math.round((x % 360) * 137.508) % 360; // golden angle: neighbours far apart
  }

  const avatar = (name, id, cls = "") => h("span", { class: `avatar ${cls}`, style: `--hue:${hue(id || name)}`,
    "aria-hidden": "true" }, initials(name));

  // ---------------------------------------------------------------- errors

  function showError(err) {
    const msg = err && err.message ? err.message : String(err);
    $("error-text").textContent = msg;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  function detailOf(body) {
    if (!body || body.detail === undefined) return null;
    const d = body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((x) => (x && x.msg ? x.msg : JSON.stringify(x))).join("; ");
    return JSON.stringify(d);
  }

  let signingUp = null;

  function ensureKey() {
    if (state.key) return Promise.resolve(state.key);
    if (!signingUp) {
      signingUp = api("POST", "/api/signup", {}, { auth: false })
        .then((r) => {
          state.key = r.api_key;
          state.userId = r.user_id;
          localStorage.setItem(KEY_STORAGE, r.api_key);
          localStorage.setItem(KEY_STORAGE + "_user", r.user_id);
          renderAccount();
          return r.api_key;
        })
        .finally(() => { signingUp = null; });
    }
    return signingUp;
  }

  async function api(method, path, body, { auth = true, retry = true } = {}) {
    const headers = { "Content-Type": "application/json" };
    if (auth) headers.Authorization = "Bearer " + (await ensureKey());
    let res;
    try {
      res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(0, "Cannot reach the server (" + e.message + ")");
    }
    if (res.status === 401 && auth && retry) {
      // The stored key is unknown to this server (a fresh store): sign up again, once.
      state.key = null;
      localStorage.removeItem(KEY_STORAGE);
      return api(method, path, body, { auth, retry: false });
    }
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) throw new ApiError(res.status, detailOf(data) || `${res.status} ${res.statusText}`);
    return data;
  }

  // ---------------------------------------------------------------- events

  // Events are posted one batch after the other, in the order they happened.
  let chain = Promise.resolve();

  // Each event carries a client-chosen id: re-sending one is a no-op on the server, and within this
  // page the ids sort in the order the events happened.
  const PAGE = Array.from(crypto.getRandomValues(new Uint8Array(6)), (b) => b.toString(16).padStart(2, "0")).join("");
  let seq = 0;
  const eventId = () => `ev-${PAGE}-${String(++seq).padStart(6, "0")}`;

  function event(type, turnId, value = null, text = null) {
    return { event_id: eventId(), type, conversation_id: state.conv ? state.conv.id : null, turn_id: turnId,
      value, text };
  }

  function sendEvents(events) {
    events = events.filter(Boolean);
    if (events.length) {
      chain = chain.then(() => api("POST", "/api/events", { events })).then(() => undefined, showError);
    }
    return chain;
  }

  // On unload or when the tab is hidden the page may be gone before a normal fetch completes.
  function sendEventsKeepalive(events) {
    events = events.filter(Boolean);
    if (!events.length || !state.key) return;
    try {
      fetch("/api/events", {
        method: "POST",
        keepalive: true,
        headers: { "Content-Type": "application/json", Authorization: "Bearer " + state.key },
        body: JSON.stringify({ events }),
      }).catch(() => {});
    } catch (e) { /* nothing to do while unloading */ }
  }

  // ---------------------------------------------------------------- reading time
  //
  // The reply being read is the current candidate of the last assistant reply. Its clock runs
  // while the tab is visible and focused; a `read` event carries the seconds when the reply stops
  // being visible (swiped away, a new message, another conversation, tab hidden, unload).

  const reading = { conv: null, turn: null, acc: 0, since: null };

  const attentive = () => document.visibilityState === "visible" && document.hasFocus();

  function syncClock() {
    const now = performance.now();
    const on = reading.turn !== null && attentive();
    if (on && reading.since === null) reading.since = now;
    if (!on && reading.since !== null) {
      reading.acc += now - reading.since;
      reading.since = null;
    }
  }

  // The read event for the time accumulated so far (null when none); the clock restarts at zero.
  function takeRead() {
    syncClock();
    const now = performance.now();
    const ms = reading.acc + (reading.since !== null ? now - reading.since : 0);
    reading.acc = 0;
    if (reading.since !== null) reading.since = now;
    const seconds = Math.round(ms) / 1000;
    if (reading.turn === null || !(seconds > 0)) return null;
    return { event_id: eventId(), type: "read", conversation_id: reading.conv, turn_id: reading.turn,
      value: seconds, text: null };
  }

  function watch(turnId) {
    reading.conv = turnId && state.conv ? state.conv.id : null;
    reading.turn = turnId || null;
    reading.acc = 0;
    reading.since = null;
    syncClock();
  }

  // Stop reading the visible reply; returns its read event (or null).
  function endReading() {
    const r = takeRead();
    watch(null);
    return r;
  }

  function watchLast() {
    const slot = lastAssistant();
    watch(slot && !slot.generating ? current(slot).turn_id : null);
  }

  window.addEventListener("focus", syncClock);
  window.addEventListener("blur", syncClock);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") sendEventsKeepalive([takeRead()]);
    syncClock();
  });
  window.addEventListener("pagehide", () => sendEventsKeepalive([takeRead()]));

  // Debug hook: send the pending read time now; resolves once every event so far is stored.
  window.alignloopFlushReads = () => sendEvents([takeRead()]);

  // ---------------------------------------------------------------- conversation state

  const current = (slot) => slot.cands[slot.idx];

  function lastAssistant() {
    const last = state.items[state.items.length - 1];
    return last && last.kind === "assistant" ? last : null;
  }

  function cand(c) {
    return { turn_id: c.turn_id, text: c.text, candidate_index: c.candidate_index, vote: 0, edited: false,
      reported: false };
  }

  // The selected path of a conversation tree: from the first user turn, each user turn's
  // candidates with the one the conversation went on from (else the selected one, else the first).
  function pathOf(turns) {
    const children = new Map();
    for (const t of turns) {
      const k = t.parent_id || "";
      if (!children.has(k)) children.set(k, []);
      children.get(k).push(t);
    }
    const kids = (id) => (children.get(id || "") || []).slice();
    const pickOne = (list) => list.find((t) => t.selected) || list[list.length - 1];
    const items = [];
    let user = pickOne(kids(null).filter((t) => t.role === "user"));
    while (user) {
      items.push({ kind: "user", turn_id: user.turn_id, text: user.text });
      const cands = kids(user.turn_id).filter((t) => t.role === "assistant")
        .sort((a, b) => a.candidate_index - b.candidate_index);
      if (!cands.length) break;
      const next = cands.find((t) => kids(t.turn_id).some((u) => u.role === "user"));
      const chosen = next || cands.find((t) => t.selected) || cands[0];
      items.push({ kind: "assistant", user_turn_id: user.turn_id, cands: cands.map(cand),
        idx: cands.indexOf(chosen), swiped: false, picked: chosen.selected ? chosen.turn_id : null,
        generating: false });
      const users = kids(chosen.turn_id).filter((t) => t.role === "user");
      user = users.length ? pickOne(users) : null;
    }
    return items;
  }

  function setBusy(b) {
    state.busy = b;
    if (b) document.body.dataset.busy = "1";
    else delete document.body.dataset.busy;
  }

  // ---------------------------------------------------------------- actions

  async function loadCharacters() {
    try {
      state.characters = await api("GET", "/api/characters", undefined, { auth: false });
    } catch (e) {
      state.characters = [];
      showError(e);
    }
    renderCharacters();
    render(); // the header and the conversations take the characters' colours
  }

  async function loadConversations() {
    try {
      state.conversations = await api("GET", "/api/conversations");
    } catch (e) {
      showError(e);
    }
    renderConversations();
  }

  async function startConversation(character) {
    if (state.busy) return;
    clearError();
    sendEvents([endReading()]);
    setBusy(true);
    try {
      const r = await api("POST", "/api/conversations", { character_id: character.id });
      state.conv = { id: r.conversation_id, character_id: r.character_id, character_name: r.character_name,
        model_version: r.model_version };
      state.items = [];
      state.editing = null;
    } catch (e) {
      showError(e);
      watchLast();
      return;
    } finally {
      setBusy(false);
      render();
    }
    $("message-input").focus();
    loadConversations();
  }

  async function openConversation(cid) {
    if (state.busy || (state.conv && state.conv.id === cid)) return;
    clearError();
    sendEvents([endReading()]);
    setBusy(true);
    try {
      const r = await api("GET", `/api/conversations/${encodeURIComponent(cid)}`);
      state.conv = { id: r.conversation_id, character_id: r.character_id, character_name: r.character_name,
        model_version: r.model_version };
      state.items = pathOf(r.turns || []);
      state.editing = null;
    } catch (e) {
      showError(e);
    } finally {
      setBusy(false);
      render(true);
      watchLast();
    }
  }

  async function sendMessage() {
    const input = $("message-input");
    const text = input.value.trim();
    if (!text || state.busy || !state.conv) return;
    clearError();
    const last = lastAssistant();
    const parent = last ? current(last) : null;
    const before = [endReading()];
    // Answering a reply after swiping settles on it, as "pick" would.
    if (last && last.swiped && last.picked !== parent.turn_id) {
      before.push(event("select", parent.turn_id, parent.candidate_index));
      last.picked = parent.turn_id;
    }
    const pending = { kind: "user", turn_id: null, text, pending: true };
    const slot = { kind: "assistant", user_turn_id: null, cands: [], idx: 0, swiped: false, picked: null,
      generating: true };
    state.items.push(pending, slot);
    state.editing = null;
    input.value = "";
    autosize();
    setBusy(true);
    render(true);
    await sendEvents(before); // the read and select happened before the message
    try {
      const r = await api("POST", `/api/conversations/${encodeURIComponent(state.conv.id)}/messages`,
        { text, parent_id: parent ? parent.turn_id : null });
      pending.turn_id = r.user_turn.turn_id;
      pending.text = r.user_turn.text;
      pending.pending = false;
      slot.user_turn_id = r.user_turn.turn_id;
      slot.cands = [cand(r.candidate)];
      slot.generating = false;
    } catch (e) {
      state.items.splice(state.items.indexOf(pending), 2);
      input.value = text;
      autosize();
      showError(e);
    } finally {
      setBusy(false);
      render(true);
      watchLast();
    }
    input.focus();
  }

  // Show candidate `to` of the last reply (an existing one).
  function moveTo(to) {
    const slot = lastAssistant();
    if (!slot || state.busy || to < 0 || to >= slot.cands.length || to === slot.idx) return;
    clearError();
    const from = current(slot);
    const r = endReading();
    slot.idx = to;
    slot.swiped = true;
    state.editing = null;
    render();
    watchLast();
    sendEvents([r, event("swipe", from.turn_id, current(slot).candidate_index)]);
  }

  // Generate the next candidate of the last reply and show it.
  async function generate() {
    const slot = lastAssistant();
    if (!slot || state.busy || !slot.user_turn_id) return;
    clearError();
    const from = current(slot);
    const r = endReading();
    slot.generating = true;
    state.editing = null;
    setBusy(true);
    render(true);
    let made = null;
    try {
      made = await api("POST", `/api/turns/${encodeURIComponent(slot.user_turn_id)}/candidates`, {});
      slot.cands.push(cand(made));
      slot.cands.sort((a, b) => a.candidate_index - b.candidate_index);
      slot.idx = slot.cands.findIndex((c) => c.turn_id === made.turn_id);
      slot.swiped = true;
    } catch (e) {
      showError(e);
    } finally {
      slot.generating = false;
      setBusy(false);
      render(true);
      watchLast();
    }
    sendEvents([r, made ? event("swipe", from.turn_id, made.candidate_index) : null]);
  }

  function swipeRight() {
    const slot = lastAssistant();
    if (!slot) return;
    if (slot.idx < slot.cands.length - 1) moveTo(slot.idx + 1);
    else generate();
  }

  function swipeLeft() {
    const slot = lastAssistant();
    if (slot) moveTo(slot.idx - 1);
  }

  function pick() {
    const slot = lastAssistant();
    if (!slot || state.busy) return;
    clearError();
    const c = current(slot);
    slot.picked = c.turn_id;
    render();
    sendEvents([event("select", c.turn_id, c.candidate_index)]);
  }

  function vote(direction) {
    const slot = lastAssistant();
    if (!slot || state.busy) return;
    clearError();
    const c = current(slot);
    c.vote = c.vote === direction ? 0 : direction;
    render();
    sendEvents([event("vote", c.turn_id, c.vote)]);
  }

  function report() {
    const slot = lastAssistant();
    if (!slot || state.busy) return;
    clearError();
    const c = current(slot);
    const reason = window.prompt("What is wrong with this reply?", "");
    if (reason === null || !reason.trim()) return;
    c.reported = true;
    render();
    sendEvents([event("report", c.turn_id, null, reason.trim())]);
  }

  function startEdit() {
    const slot = lastAssistant();
    if (!slot || state.busy) return;
    clearError();
    state.editing = current(slot).turn_id;
    render();
    const box = document.querySelector('[data-testid="edit-input"]');
    if (box) {
      box.focus();
      box.setSelectionRange(box.value.length, box.value.length);
    }
  }

  function saveEdit() {
    const slot = lastAssistant();
    const box = document.querySelector('[data-testid="edit-input"]');
    if (!slot || !box) return;
    const c = current(slot);
    const text = box.value.trim();
    state.editing = null;
    if (text && text !== c.text) {
      c.text = text;
      c.edited = true;
      sendEvents([event("edit", c.turn_id, null, text)]);
    }
    render();
  }

  function cancelEdit() {
    state.editing = null;
    render();
  }

  // ---------------------------------------------------------------- rendering

  function renderAccount() {
    $("account").textContent = state.userId ? `Signed in anonymously · ${state.userId}` : "";
  }

  function renderCharacters() {
    const ul = $("characters");
    ul.replaceChildren();
    if (!state.characters.length) {
      ul.append(h("li", { class: "muted small" }, "No characters available."));
      return;
    }
    for (const c of state.characters) {
      ul.append(h("li", {},
        h("button", { type: "button", class: "character", testid: `character-${c.id}`, title: c.description,
          onclick: () => startConversation(c) },
          avatar(c.name, c.name),
          h("span", { class: "character-text" },
            h("span", { class: "character-name" }, c.name),
            h("span", { class: "character-desc" }, c.description)))));
    }
  }

  function when(iso) {
    const d = new Date(iso);
    if (isNaN(d)) return iso || "";
    return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  function renderConversations() {
    const ul = $("conversations");
    ul.replaceChildren();
    if (!state.conversations.length) {
      ul.append(h("li", { class: "muted small empty" }, "No conversations yet."));
      return;
    }
    for (const c of state.conversations) {
      const active = state.conv && state.conv.id === c.conversation_id;
      ul.append(h("li", {},
        h("button", { type: "button", class: "conversation" + (active ? " active" : ""),
          testid: `conversation-${c.conversation_id}`, "aria-current": active ? "true" : null,
          onclick: () => openConversation(c.conversation_id) },
          avatar(c.character_name, c.character_name, "small"),
          h("span", { class: "conversation-text" },
            h("span", { class: "conversation-name" }, c.character_name),
            h("span", { class: "conversation-when" }, when(c.started_at))))));
    }
  }

  function characterOf(conv) {
    return state.characters.find((c) => c.id === conv.character_id) || null;
  }

  function renderHeader() {
    const head = $("chat-header");
    head.replaceChildren();
    if (!state.conv) {
      head.append(h("div", { class: "chat-title" }, h("span", { class: "title" }, "Welcome")));
      return;
    }
    const ch = characterOf(state.conv);
    head.append(
      avatar(state.conv.character_name, state.conv.character_name, "large"),
      h("div", { class: "chat-title" },
        h("span", { class: "title", testid: "character-name" }, state.conv.character_name),
        ch ? h("span", { class: "subtitle" }, ch.description) : null),
      h("span", { class: "chip", title: "The model that writes the replies", testid: "model-version" },
        "model ", h("b", {}, state.conv.model_version)));
  }

  function typing() {
    return h("div", { class: "bubble typing", testid: "typing", "aria-label": "Writing a reply" },
      h("span", {}), h("span", {}), h("span", {}));
  }

  function button(testid, label, iconName, onclick, extra = {}) {
    return h("button", { type: "button", class: "tool", testid, onclick, title: extra.title || label,
      "aria-label": extra.aria || label, "aria-pressed": extra.pressed === undefined ? null : String(extra.pressed),
      disabled: extra.disabled || false, ...(extra.attrs || {}) },
      iconName ? icon(iconName) : null, extra.iconOnly ? null : h("span", {}, label));
  }

  function controls(slot) {
    const c = current(slot);
    const n = slot.cands.length;
    const busy = state.busy;
    const shownIndex = slot.generating ? n + 1 : slot.idx + 1;
    const shownTotal = slot.generating ? n + 1 : n;
    const picked = slot.picked === c.turn_id;
    return h("div", { class: "controls", testid: "controls" },
      h("div", { class: "swipe", role: "group", "aria-label": "Alternative replies" },
        h("button", { type: "button", class: "tool icon-only", testid: "swipe-left", "aria-label": "Previous reply",
          title: "Previous reply", disabled: busy || slot.idx === 0, onclick: swipeLeft }, icon("left")),
        h("span", { class: "counter", testid: "candidate-counter" }, `${shownIndex}/${shownTotal}`),
        h("button", { type: "button", class: "tool icon-only", testid: "swipe-right",
          "aria-label": slot.idx === n - 1 ? "New reply" : "Next reply",
          title: slot.idx === n - 1 ? "Write another reply" : "Next reply", disabled: busy, onclick: swipeRight },
          icon("right"))),
      h("span", { class: "sep" }),
      button("pick", picked ? "Picked" : "Pick", "check", pick,
        { pressed: picked, disabled: busy, title: "Keep this reply", attrs: { class: "tool pick" + (picked ? " on" : "") } }),
      button("thumb-up", "Good reply", "up", () => vote(1),
        { pressed: c.vote === 1, disabled: busy, iconOnly: true, attrs: { class: "tool icon-only" + (c.vote === 1 ? " on up" : "") } }),
      button("thumb-down", "Bad reply", "down", () => vote(-1),
        { pressed: c.vote === -1, disabled: busy, iconOnly: true, attrs: { class: "tool icon-only" + (c.vote === -1 ? " on down" : "") } }),
      h("span", { class: "spacer" }),
      button("regenerate", "Regenerate", "regen", generate, { disabled: busy }),
      button("edit", "Edit", "edit", startEdit, { disabled: busy }),
      button("report", c.reported ? "Reported" : "Report", "flag", report,
        { disabled: busy || c.reported, attrs: { class: "tool danger" } }));
  }

  function assistantBody(slot, isLast) {
    if (slot.generating) return [typing()];
    const c = current(slot);
    if (isLast && state.editing === c.turn_id) {
      const box = h("textarea", { class: "edit-box", testid: "edit-input", rows: "4",
        onkeydown: (e) => {
          if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); saveEdit(); }
          if (e.key === "Escape") { e.preventDefault(); cancelEdit(); }
        } });
      box.value = c.text;
      return [box, h("div", { class: "edit-actions" },
        h("button", { type: "button", class: "tool", testid: "edit-cancel", onclick: cancelEdit }, "Cancel"),
        h("button", { type: "button", class: "tool primary", testid: "edit-save", onclick: saveEdit }, "Save"))];
    }
    const tags = [];
    if (c.edited) tags.push(h("span", { class: "tag" }, "edited"));
    if (c.reported) tags.push(h("span", { class: "tag warn" }, "reported"));
    return [h("div", { class: "bubble", testid: isLast ? "candidate-text" : null, "data-turn-id": c.turn_id,
      "data-candidate-index": c.candidate_index },
      c.text ? c.text : h("span", { class: "muted empty-reply" }, "(empty reply)"),
      tags.length ? h("span", { class: "tags" }, tags) : null)];
  }

  function renderMessages(scroll) {
    const box = $("messages");
    const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    box.replaceChildren();
    if (!state.conv) {
      box.append(h("div", { class: "empty-state" },
        h("div", { class: "empty-title" }, "Chat with a character"),
        h("p", {}, "Pick a character on the left to start a conversation. Swipe through alternative replies, " +
          "pick the one you like and rate it: your choices teach the next model.")));
      return;
    }
    const inner = h("div", { class: "thread" });
    if (!state.items.length) {
      const ch = characterOf(state.conv);
      inner.append(h("div", { class: "empty-state" },
        avatar(state.conv.character_name, state.conv.character_name, "huge"),
        h("div", { class: "empty-title" }, `Say hello to ${state.conv.character_name}`),
        ch ? h("p", {}, ch.description) : null));
    }
    const lastIdx = state.items.length - 1;
    state.items.forEach((it, i) => {
      if (it.kind === "user") {
        inner.append(h("div", { class: "msg user" + (it.pending ? " pending" : ""), testid: "user-message",
          "data-turn-id": it.turn_id },
          h("div", { class: "bubble" }, it.text)));
        return;
      }
      const isLast = i === lastIdx;
      inner.append(h("div", { class: "msg assistant" + (isLast ? " last" : ""), testid: isLast ? "reply" : "old-reply" },
        avatar(state.conv.character_name, state.conv.character_name),
        h("div", { class: "msg-body" },
          h("div", { class: "msg-name" }, state.conv.character_name,
            !isLast && it.cands.length > 1 ? h("span", { class: "muted small" }, ` · ${it.idx + 1}/${it.cands.length}`) : null),
          ...assistantBody(it, isLast),
          isLast && it.cands.length && state.editing !== current(it).turn_id ? controls(it) : null)));
    });
    box.append(inner);
    if (scroll || nearBottom) box.scrollTop = box.scrollHeight;
  }

  function renderComposer() {
    const input = $("message-input");
    input.disabled = !state.conv;
    input.placeholder = state.conv ? `Message ${state.conv.character_name}…` : "Pick a character to start";
    $("send").disabled = !state.conv || state.busy;
  }

  function render(scroll = false) {
    renderHeader();
    renderMessages(scroll);
    renderComposer();
    renderConversations();
  }

  function autosize() {
    const input = $("message-input");
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight, 200) + "px";
  }

  // ---------------------------------------------------------------- wiring

  function init() {
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); sendMessage(); });
    const input = $("message-input");
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendMessage(); }
    });
    input.addEventListener("input", autosize);
    $("error-close").addEventListener("click", clearError);
    document.addEventListener("keydown", (e) => {
      const t = e.target;
      if (t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT") && t.value) return;
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      if (e.key === "ArrowRight") { e.preventDefault(); swipeRight(); }
      if (e.key === "ArrowLeft") { e.preventDefault(); swipeLeft(); }
    });
    renderAccount();
    render();
    loadCharacters();
    ensureKey().then(loadConversations, showError);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
