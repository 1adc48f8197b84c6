// The chat page: conversations in the sidebar, answers streamed over SSE and rendered as safe Markdown.

import { api, ApiError, streamEvents, CONNECTION_LOST } from "./api.js";
import { copyButton, renderMarkdownInto } from "./markdown.js";
import { icon } from "./icons.js";
import { decodingDefaults, modelForNewChat, showModel, startModels } from "./models.js";

const $ = (id) => document.getElementById(id);
const el = {
  app: $("app"),
  list: $("conversation-list"),
  newChat: $("new-chat"),
  title: $("chat-title"),
  messages: $("messages"),
  empty: $("empty-state"),
  composer: $("composer"),
  input: $("msg"),
  send: $("send"),
  stop: $("stop"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  bannerClose: $("banner-close"),
  settingsButton: $("settings-button"),
  settingsDialog: $("settings-dialog"),
  settingsForm: $("settings-form"),
  settingsError: $("settings-error"),
  confirmDialog: $("confirm-dialog"),
  confirmText: $("confirm-text"),
  toggleSidebar: $("toggle-sidebar"),
  scrim: $("scrim"),
};

const DEFAULTS_KEY = "scratchgpt.newChatSettings";

const state = {
  conversations: [],
  current: null, // the open conversation (with its settings)
  streaming: null, // { controller, stopTimer, conversationId }
};

// --- small helpers ---------------------------------------------------------------

function showBanner(text, kind = "error") {
  el.bannerText.textContent = text;
  el.banner.dataset.kind = kind;
  el.banner.hidden = false;
}

function hideBanner() {
  el.banner.hidden = true;
}

function formatNumber(n, digits = 1) {
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits });
}

function setBusy(busy) {
  el.send.hidden = busy;
  el.stop.hidden = !busy;
  el.app.classList.toggle("is-streaming", busy);
  for (const button of el.messages.querySelectorAll(".regenerate")) button.disabled = busy;
}

function scrollToBottom(force = false) {
  const m = el.messages;
  const nearBottom = m.scrollHeight - m.scrollTop - m.clientHeight < 120;
  if (force || nearBottom) m.scrollTop = m.scrollHeight;
}

function autoResize() {
  el.input.style.height = "auto";
  el.input.style.height = `${Math.min(el.input.scrollHeight, 240)}px`;
}

// The conversation drawer of small screens (on wide ones the sidebar is always there).
function setSidebarOpen(open) {
  document.body.classList.toggle("sidebar-open", open);
  el.scrim.hidden = !open;
  el.toggleSidebar.setAttribute("aria-expanded", String(open));
}

function conversationIdFromUrl() {
  const m = location.pathname.match(/^\/c\/([A-Za-z0-9_-]+)$/);
  return m ? m[1] : null;
}

function newChatSettings() {
  try {
    return JSON.parse(localStorage.getItem(DEFAULTS_KEY) || "{}");
  } catch {
    return {};
  }
}

// --- sidebar ---------------------------------------------------------------------

async function loadConversations() {
  try {
    const data = await api("/api/v1/conversations?limit=200");
    state.conversations = data.conversations;
    const current = state.current && data.conversations.find((c) => c.id === state.current.id);
    if (current) {
      // The server names a chat after its first message.
      state.current.title = current.title;
      el.title.textContent = current.title;
      document.title = `${current.title} · scratchgpt`;
    }
    renderSidebar();
  } catch (err) {
    showBanner(err.detail || String(err));
  }
}

// A sidebar action: an icon for the eye, "<action> <title>" for a screen reader.
function iconButton(kind, action, title, iconName, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `icon-btn ${kind}`;
  button.title = action;
  button.setAttribute("aria-label", `${action} ${title}`);
  button.append(icon(iconName));
  button.addEventListener("click", onClick);
  return button;
}

function renderSidebar() {
  el.list.replaceChildren();
  if (!state.conversations.length) {
    const p = document.createElement("p");
    p.className = "list-empty";
    p.textContent = "No conversations yet.";
    el.list.append(p);
    return;
  }
  for (const c of state.conversations) {
    const item = document.createElement("div");
    item.className = "conversation-item";
    item.dataset.id = c.id;
    if (state.current && state.current.id === c.id) item.classList.add("active");

    const link = document.createElement("a");
    link.href = `/c/${c.id}`;
    link.className = "conversation-link";
    link.textContent = c.title;
    link.title = c.title;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      openConversation(c.id, true);
    });

    const rename = iconButton("rename", "Rename", c.title, "pencil", () => startRename(item, c));
    const del = iconButton("delete", "Delete", c.title, "trash", () => deleteConversation(c));
    item.append(link, rename, del);
    el.list.append(item);
  }
}

function startRename(item, conversation) {
  const input = document.createElement("input");
  input.className = "rename-input";
  input.value = conversation.title;
  input.maxLength = 200;
  input.setAttribute("aria-label", "New title");
  item.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        const updated = await api(`/api/v1/conversations/${conversation.id}`, { method: "PATCH", body: { title } });
        conversation.title = updated.title;
        if (state.current && state.current.id === conversation.id) {
          state.current.title = updated.title;
          el.title.textContent = updated.title;
        }
      } catch (err) {
        showBanner(err.detail || String(err));
      }
    }
    renderSidebar();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

function confirmDelete(title) {
  return new Promise((resolve) => {
    el.confirmText.textContent = `“${title}” and all its messages will be deleted.`;
    el.confirmDialog.returnValue = "";
    el.confirmDialog.addEventListener("close", () => resolve(el.confirmDialog.returnValue === "ok"), { once: true });
    el.confirmDialog.showModal();
  });
}

async function deleteConversation(conversation) {
  if (!(await confirmDelete(conversation.title))) return;
  try {
    await api(`/api/v1/conversations/${conversation.id}`, { method: "DELETE" });
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) {
      showBanner(err.detail || String(err));
      return;
    }
  }
  state.conversations = state.conversations.filter((c) => c.id !== conversation.id);
  if (state.current && state.current.id === conversation.id) showNewChat(true);
  renderSidebar();
}

// --- messages ----------------------------------------------------------------------

// The state an answer ended in, as [icon, words], or null for a plain finish.
function messageEnding(message) {
  if (message.status === "interrupted") return ["stop", "stopped"];
  if (message.status === "error") return ["warning", "failed"];
  if (message.status === "complete" && message.finish_reason === "length") return ["cut", "cut off at the token limit"];
  return null;
}

function messageMeta(message) {
  const parts = [];
  if (message.completion_tokens) parts.push(`${message.completion_tokens} tokens`);
  if (message.tokens_per_second) parts.push(`${formatNumber(message.tokens_per_second)} tok/s`);
  if (message.duration_ms) parts.push(`${formatNumber(message.duration_ms / 1000, 2)} s`);
  return parts.join(" · ");
}

function renderMessage(message) {
  const article = document.createElement("article");
  article.className = `message ${message.role}`;
  article.dataset.status = message.status || "complete";
  if (message.id) article.dataset.id = message.id;

  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.textContent = message.role === "user" ? "You" : "AI";

  const bubble = document.createElement("div");
  bubble.className = "bubble";
  const content = document.createElement("div");
  content.className = message.role === "user" ? "content plain" : "content markdown";
  bubble.append(content);

  const notice = document.createElement("p");
  notice.className = "notice";
  notice.hidden = true;
  bubble.append(notice);

  const footer = document.createElement("div");
  footer.className = "meta";
  const metaText = document.createElement("span");
  metaText.className = "meta-text";
  footer.append(metaText, copyButton("Copy message", () => article.messageText || ""));
  bubble.append(footer);

  article.append(avatar, bubble);
  updateMessage(article, message);
  return article;
}

function updateMessage(article, message) {
  const content = article.querySelector(".content");
  if (message.role === "user") content.textContent = message.content;
  else renderMarkdownInto(content, message.content);
  article.messageText = message.content;
  if (message.status) article.dataset.status = message.status;
  if (message.id) article.dataset.id = message.id;
  const metaText = article.querySelector(".meta-text");
  const ending = message.role === "assistant" ? messageEnding(message) : null;
  metaText.replaceChildren();
  if (ending) {
    const mark = document.createElement("span");
    mark.className = `ending ending-${ending[0]}`;
    mark.append(icon(ending[0]), ` ${ending[1]}`);
    metaText.append(mark);
  }
  const meta = message.role === "assistant" ? messageMeta(message) : "";
  if (meta) metaText.append(`${ending ? " · " : ""}${meta}`);
  if (message.status === "streaming" && message.waiting != null && !message.content) {
    const waiting = document.createElement("span");
    waiting.className = "waiting";
    waiting.textContent = message.waiting ? `waiting: ${message.waiting} ahead` : "waiting: next in line";
    metaText.append(waiting);
  }
  article.dataset.finish = message.finish_reason || "";
  const notice = article.querySelector(".notice");
  const notes = [];
  if (message.dropped_messages) {
    notes.push(
      `The ${message.dropped_messages} oldest message${message.dropped_messages === 1 ? " was" : "s were"} left out to fit the model's context window.`
    );
  }
  if (message.status === "error" && message.error) notes.push(message.error);
  notice.textContent = notes.join(" ");
  notice.hidden = !notes.length;
  notice.classList.toggle("notice-error", message.status === "error");
}

function refreshRegenerate() {
  for (const b of el.messages.querySelectorAll(".regenerate")) b.remove();
  const articles = el.messages.querySelectorAll(".message");
  const last = articles[articles.length - 1];
  if (!last || state.streaming) return;
  if (last.classList.contains("user") || last.classList.contains("assistant")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "btn btn-ghost btn-small regenerate";
    button.append(icon("refresh"), last.classList.contains("user") ? " Answer" : " Regenerate");
    button.addEventListener("click", regenerate);
    (last.querySelector(".meta") || last).append(button);
  }
}

function renderConversation(conversation) {
  showModel(conversation);
  el.messages.replaceChildren();
  el.title.textContent = conversation.title;
  document.title = `${conversation.title} · scratchgpt`;
  if (!conversation.messages.length) el.messages.append(el.empty);
  for (const message of conversation.messages) el.messages.append(renderMessage(message));
  refreshRegenerate();
  scrollToBottom(true);
}

function showNewChat(push) {
  state.current = null;
  showModel(null);
  el.messages.replaceChildren(el.empty);
  el.title.textContent = "New chat";
  document.title = "Chat · scratchgpt";
  if (push) history.pushState({}, "", "/");
  renderSidebar();
  el.input.focus();
}

async function openConversation(id, push) {
  if (state.streaming) return;
  try {
    const conversation = await api(`/api/v1/conversations/${id}`);
    state.current = conversation;
    if (push) history.pushState({ id }, "", `/c/${id}`);
    hideBannerUnlessModel();
    renderConversation(conversation);
    renderSidebar();
    setSidebarOpen(false);
    if (conversation.generating) showBanner("An answer is still being generated in this conversation; reload to see it when it is done.", "info");
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      showBanner("That conversation does not exist (or belongs to someone else).");
      showNewChat(true);
    } else {
      showBanner(err.detail || String(err));
    }
  }
}

function hideBannerUnlessModel() {
  if (el.banner.dataset.kind !== "warn") hideBanner();
}

async function ensureConversation() {
  if (state.current) return state.current;
  const created = await api("/api/v1/conversations", { method: "POST", body: { ...newChatSettings(), model: modelForNewChat() } });
  state.current = { ...created, messages: [] };
  showModel(created);
  state.conversations.unshift(created);
  history.pushState({ id: created.id }, "", `/c/${created.id}`);
  renderSidebar();
  return state.current;
}

// --- streaming an answer ----------------------------------------------------------------

async function streamAnswer(path, body, userText) {
  const conversation = state.current;
  el.empty.remove();
  const userArticle = userText === null ? null : renderMessage({ role: "user", content: userText, status: "sending" });
  if (userArticle) el.messages.append(userArticle);
  const answer = { role: "assistant", content: "", status: "streaming" };
  const article = renderMessage(answer);
  article.classList.add("pending");
  el.messages.append(article);
  scrollToBottom(true);

  const controller = new AbortController();
  state.streaming = { controller, conversationId: conversation.id, stopTimer: null };
  setBusy(true);
  refreshRegenerate();

  let frame = 0;
  const paint = () => {
    frame = 0;
    updateMessage(article, answer);
    scrollToBottom();
  };
  let finished = false;
  let started = false;
  try {
    await streamEvents(path, body, {
      signal: controller.signal,
      onEvent(event, data) {
        if (event === "start") {
          started = true;
          article.classList.remove("pending");
          answer.id = data.assistant_message_id;
          answer.dropped_messages = data.dropped_messages;
          if (userArticle && data.user_message) updateMessage(userArticle, data.user_message);
          paint();
        } else if (event === "queued") {
          // Other answers hold the model's places: how many go before this one.
          answer.waiting = data.ahead;
          paint();
        } else if (event === "delta") {
          answer.waiting = null;
          answer.content += data.text;
          if (!frame) frame = requestAnimationFrame(paint);
        } else if (event === "done") {
          finished = true;
          Object.assign(answer, data.message, { content: answer.content });
          paint();
        } else if (event === "error") {
          finished = true;
          Object.assign(answer, data.message || {}, { status: "error", error: data.detail });
          paint();
        }
      },
    });
    if (!finished) {
      // The stream ended without a final event: the server went away mid-answer.
      answer.status = "interrupted";
      paint();
      showBanner("The connection closed before the answer finished; what arrived was saved.", "error");
    }
  } catch (err) {
    if (err.name === "AbortError") {
      answer.status = "interrupted";
      paint();
    } else if (!started) {
      // Refused or unreachable before generation started: nothing was stored for this turn.
      article.remove();
      if (userArticle) {
        userArticle.remove();
        el.input.value = userText;
        autoResize();
      }
      if (!el.messages.querySelector(".message")) el.messages.append(el.empty);
      showBanner(err.detail || String(err), err.status === 503 ? "warn" : "error");
    } else {
      answer.status = "interrupted";
      paint();
      showBanner(`${CONNECTION_LOST} The answer so far was saved.`, "error");
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    clearTimeout(state.streaming && state.streaming.stopTimer);
    state.streaming = null;
    article.classList.remove("pending");
    setBusy(false);
    refreshRegenerate();
    loadConversations();
  }
}

async function sendMessage() {
  const text = el.input.value;
  if (!text.trim() || state.streaming) return;
  let conversation;
  try {
    conversation = await ensureConversation();
  } catch (err) {
    showBanner(err.detail || String(err));
    return;
  }
  el.input.value = "";
  autoResize();
  hideBannerUnlessModel();
  if (conversation.title === "New chat") el.title.textContent = text.trim().split(/\s+/).join(" ").slice(0, 60);
  await streamAnswer(`/api/v1/conversations/${conversation.id}/messages`, { content: text }, text);
}

async function regenerate() {
  if (!state.current || state.streaming) return;
  const articles = el.messages.querySelectorAll(".message");
  const last = articles[articles.length - 1];
  if (last && last.classList.contains("assistant")) last.remove();
  hideBannerUnlessModel();
  await streamAnswer(`/api/v1/conversations/${state.current.id}/regenerate`, {}, null);
}

async function stopGenerating() {
  const streaming = state.streaming;
  if (!streaming) return;
  el.stop.disabled = true;
  // Ask the server to stop (it then sends the final event); abort the request if it does not end soon.
  streaming.stopTimer = setTimeout(() => streaming.controller.abort(), 1500);
  try {
    await api(`/api/v1/conversations/${streaming.conversationId}/stop`, { method: "POST" });
  } catch {
    streaming.controller.abort();
  } finally {
    el.stop.disabled = false;
  }
}

// --- settings --------------------------------------------------------------------------

// The penalties against repeating: [input, field, the value that penalizes nothing].
const PENALTIES = [["set-repetition", "repetition_penalty", 1], ["set-frequency", "frequency_penalty", 0], ["set-presence", "presence_penalty", 0]];

function settingsSource() {
  if (state.current) return state.current;
  return { temperature: 0.7, top_p: 0.95, top_k: 50, max_new_tokens: 256, system_prompt: "", ...decodingDefaults(), ...newChatSettings() };
}

function openSettings() {
  const s = settingsSource();
  $("set-system").value = s.system_prompt ?? "";
  $("set-temperature").value = s.temperature ?? 0.7;
  $("set-top-p").value = s.top_p ?? 1;
  $("set-top-k").value = s.top_k ?? "";
  $("set-max-tokens").value = s.max_new_tokens ?? 256;
  for (const [id, key, neutral] of PENALTIES) $(id).value = s[key] ?? neutral;
  syncOutputs();
  el.settingsError.hidden = true;
  el.settingsDialog.showModal();
}

function syncOutputs() {
  $("out-temperature").textContent = Number($("set-temperature").value).toFixed(2);
  $("out-top-p").textContent = Number($("set-top-p").value).toFixed(2);
}

async function saveSettings(event) {
  if (event.submitter && event.submitter.value !== "save") return;
  event.preventDefault();
  const topK = $("set-top-k").value.trim();
  const topP = Number($("set-top-p").value);
  const changes = {
    system_prompt: $("set-system").value,
    temperature: Number($("set-temperature").value),
    top_p: topP >= 1 ? null : topP,
    top_k: topK === "" ? null : Number(topK),
    max_new_tokens: Number($("set-max-tokens").value),
  };
  for (const [id, key, neutral] of PENALTIES) changes[key] = $(id).value.trim() === "" ? neutral : Number($(id).value);
  if (!Number.isInteger(changes.max_new_tokens) || changes.max_new_tokens < 1) {
    el.settingsError.textContent = "Max new tokens must be a whole number of at least 1.";
    el.settingsError.hidden = false;
    return;
  }
  if (changes.top_k !== null && (!Number.isInteger(changes.top_k) || changes.top_k < 1)) {
    el.settingsError.textContent = "Top-k must be empty or a whole number of at least 1.";
    el.settingsError.hidden = false;
    return;
  }
  try {
    if (state.current) {
      const updated = await api(`/api/v1/conversations/${state.current.id}`, { method: "PATCH", body: changes });
      Object.assign(state.current, updated);
    }
    const defaults = { ...changes };
    for (const key of Object.keys(defaults)) if (defaults[key] === null) delete defaults[key];
    localStorage.setItem(DEFAULTS_KEY, JSON.stringify(defaults));
    el.settingsDialog.close("save");
  } catch (err) {
    el.settingsError.textContent = err.detail || String(err);
    el.settingsError.hidden = false;
  }
}

// --- wiring ------------------------------------------------------------------------------

el.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});
el.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  } else if (event.key === "Escape" && state.streaming) {
    stopGenerating();
  }
});
el.input.addEventListener("input", autoResize);
el.stop.addEventListener("click", stopGenerating);
el.newChat.addEventListener("click", () => {
  setSidebarOpen(false);
  if (!state.streaming) showNewChat(true);
});
el.bannerClose.addEventListener("click", hideBanner);
el.settingsButton.addEventListener("click", openSettings);
el.settingsForm.addEventListener("submit", saveSettings);
$("set-temperature").addEventListener("input", syncOutputs);
$("set-top-p").addEventListener("input", syncOutputs);
el.toggleSidebar.addEventListener("click", () => setSidebarOpen(!document.body.classList.contains("sidebar-open")));
el.scrim.addEventListener("click", () => setSidebarOpen(false));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && document.body.classList.contains("sidebar-open")) setSidebarOpen(false);
});
window.addEventListener("popstate", () => {
  const id = conversationIdFromUrl();
  if (id) openConversation(id, false);
  else showNewChat(false);
});

async function start() {
  startModels({ onUnavailable: (text) => showBanner(text, "warn") });
  await loadConversations();
  const id = conversationIdFromUrl();
  if (id) await openConversation(id, false);
  else renderSidebar();
  el.input.focus();
  document.body.dataset.ready = "true";
}

start();
