// chatforge chat page: streams replies from /v1/chat/completions and renders them as safe Markdown.
//
// Safety rules this file keeps: model and user text only ever reaches the page through textContent and
// createElement (never innerHTML), so no reply can inject markup or script; links are not made clickable; nothing
// is read from the URL, so a crafted link cannot make the page send anything.
"use strict";

const KEY_STORAGE = "chatforge-api-key";
const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
  system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"), status: $("status"),
  keyRow: $("key-row"), apiKey: $("api-key"), modelName: $("model-name"), composer: $("composer"),
};

let history = [];        // [{role, content}] of the current chat, system prompt excluded
let controller = null;   // AbortController of the reply being streamed
let modelId = null;
let needsKey = false;

// ---------------------------------------------------------------------------------------------- safe Markdown

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Inline spans: `code`, **bold**, *italic* / _italic_. Everything else is plain text.
const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*)|(\b_[^_\s][^_\n]*_\b)/g;

function renderInline(text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    const s = m[0];
    if (m[1]) parent.append(el("code", "", s.slice(1, -1)));
    else if (m[2]) parent.append(el("strong", "", s.slice(2, -2)));
    else parent.append(el("em", "", s.slice(1, -1)));
    last = m.index + s.length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function renderLines(lines, parent) {
  lines.forEach((line, i) => {
    if (i) parent.append(el("br"));
    renderInline(line, parent);
  });
}

// Blocks: ``` fences (an unclosed fence while streaming runs to the end), #-headings, - / * / 1. lists,
// paragraphs separated by blank lines.
function renderMarkdown(src, parent) {
  const lines = src.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      i++;  // the closing fence
      const pre = el("pre");
      const c = el("code", "", code.join("\n"));
      if (fence[1]) c.dataset.lang = fence[1];
      pre.append(c);
      parent.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = el("h" + Math.min(6, heading[1].length + 2));
      renderInline(heading[2], h);
      parent.append(h);
      i++;
      continue;
    }
    const bullet = /^\s*[-*+]\s+/, numbered = /^\s*\d+[.)]\s+/;
    if (bullet.test(line) || numbered.test(line)) {
      const pattern = bullet.test(line) ? bullet : numbered;
      const list = el(pattern === bullet ? "ul" : "ol");
      while (i < lines.length && pattern.test(lines[i])) {
        const li = el("li");
        renderInline(lines[i].replace(pattern, ""), li);
        list.append(li);
        i++;
      }
      parent.append(list);
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^\s*```/.test(lines[i]) && !/^#{1,6}\s/.test(lines[i])
           && !bullet.test(lines[i]) && !numbered.test(lines[i])) para.push(lines[i++]);
    const p = el("p");
    renderLines(para, p);
    parent.append(p);
  }
}

// ---------------------------------------------------------------------------------------------- the chat view

function addBubble(role, text) {
  const bubble = el("div", "message " + role);
  bubble.append(el("div", "role", role === "user" ? "You" : "Assistant"));
  const body = el("div", "body");
  bubble.append(body);
  if (role === "user") body.textContent = text;  // what the user typed is shown exactly as typed
  els.messages.append(bubble);
  scrollDown();
  return bubble;
}

function scrollDown() { els.messages.scrollTop = els.messages.scrollHeight; }

function setBusy(busy) {
  els.send.disabled = busy;
  els.stop.disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

function setStatus(text) { els.status.textContent = text || ""; }

function authHeaders() {
  const key = needsKey ? els.apiKey.value.trim() : "";
  return key ? { "Authorization": "Bearer " + key } : {};
}

function numberFrom(input, fallback, min, max) {
  const v = Number(input.value);
  return Number.isFinite(v) ? Math.min(max, Math.max(min, v)) : fallback;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + response.status;
}

// Reads a server-sent-event stream, calling onEvent with each parsed `data:` payload until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");  // stream: true keeps a character split across reads whole
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send() {
  const text = els.input.value.trim();
  if (!text || controller) return;
  if (!modelId) await connect().catch(() => {});
  if (!modelId) return;
  if (needsKey && !els.apiKey.value.trim()) {
    setStatus("Enter the API key first.");
    els.apiKey.focus();
    return;
  }
  if (needsKey) sessionStorage.setItem(KEY_STORAGE, els.apiKey.value.trim());
  els.input.value = "";
  history.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant");
  const body = bubble.querySelector(".body");
  bubble.classList.add("streaming");
  const messages = [];
  const system = els.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const request = {
    model: modelId, messages, stream: true,
    max_tokens: Math.round(numberFrom(els.maxTokens, 256, 1, 1e6)),
  };
  // An empty temperature is left to the model's default (its generation_config.json, else the server's built-in).
  if (els.temperature.value.trim() !== "") request.temperature = numberFrom(els.temperature, 0.7, 0, 2);
  controller = new AbortController();
  setBusy(true);
  setStatus("");
  let reply = "";
  let pending = false;
  const render = () => {
    pending = false;
    body.replaceChildren();
    renderMarkdown(reply, body);
    scrollDown();
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(request),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices && event.choices[0];
      const piece = choice && choice.delta && choice.delta.content;
      if (piece) {
        reply += piece;
        if (!pending) { pending = true; requestAnimationFrame(render); }
      }
    });
    render();
    history.push({ role: "assistant", content: reply });
  } catch (err) {
    render();
    if (err.name === "AbortError") {
      bubble.classList.add("stopped");
      bubble.append(el("div", "note", "stopped"));
      if (reply) history.push({ role: "assistant", content: reply });
      else history.pop();  // nothing came back: forget the unanswered message
    } else {
      bubble.classList.add("error");
      bubble.append(el("div", "note", "Error: " + err.message));
      history.pop();
    }
  } finally {
    bubble.classList.remove("streaming");
    controller = null;
    setBusy(false);
    els.input.focus();
  }
}

function stop() { if (controller) controller.abort(); }

function newChat() {
  stop();
  history = [];
  els.messages.replaceChildren();
  setStatus("");
  els.input.focus();
}

async function connect() {
  needsKey = false;
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) els.apiKey.value = saved;
  let response = await fetch("/v1/models", { headers: authHeaders() });
  if (response.status === 401) {
    needsKey = true;
    els.keyRow.hidden = false;
    if (els.apiKey.value) response = await fetch("/v1/models", { headers: authHeaders() });
  }
  if (!response.ok) {
    setStatus(needsKey ? "This server requires an API key." : await errorMessage(response));
    return;
  }
  const models = await response.json();
  modelId = models.data[0].id;
  els.modelName.textContent = modelId;
  document.title = modelId + " · chatforge";
  const context = models.data[0].context_length;
  if (context > 1) {  // leave room for the conversation in a small model's context
    els.maxTokens.max = String(context - 1);
    if (Number(els.maxTokens.value) > context / 2) els.maxTokens.value = String(Math.floor(context / 2));
  }
  setStatus("");
}

els.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
els.input.addEventListener("keydown", (e) => {
  // Enter sends, but not while an input method is composing (Chinese, Japanese...): that Enter picks characters.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    send();
  }
});
els.stop.addEventListener("click", stop);
els.newChat.addEventListener("click", newChat);
els.apiKey.addEventListener("change", () => { connect(); });
els.keyRow.addEventListener("submit", (e) => { e.preventDefault(); connect(); });
connect().catch((err) => setStatus("Cannot reach the server: " + err.message));
