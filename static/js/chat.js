// The chat page: conversations in the sidebar, answers streamed over SSE and rendered as safe Markdown;
// questions edited and sent again, answers regenerated (the earlier ones kept to flip through) or
// continued, and answers that go on on the server while another conversation is open.

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
  for (const button of el.messages.querySelectorAll(".regenerate, .continue, .edit, .alternatives button")) {
    button.disabled = busy || button.dataset.end === "true";
  }
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

// A small button in a message's footer: an icon, with its name for a screen reader and a tooltip.
function metaButton(className, label, iconName, onClick, text = "") {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `btn btn-ghost btn-small ${className}`;
  button.title = label;
  button.setAttribute("aria-label", label);
  button.append(icon(iconName));
  if (text) button.append(` ${text}`);
  button.addEventListener("click", onClick);
  return button;
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
  const alternatives = document.createElement("span");
  alternatives.className = "alternatives";
  footer.append(metaText, alternatives, copyButton("Copy message", () => article.message.content || ""));
  if (message.role === "user") footer.append(metaButton("edit", "Edit and resend", "pencil", () => startEdit(article)));
  bubble.append(footer);

  article.append(avatar, bubble);
  updateMessage(article, message);
  return article;
}

function updateMessage(article, message) {
  article.message = message;
  const content = article.querySelector(".content");
  if (message.role === "user") content.textContent = message.content;
  else renderMarkdownInto(content, message.content);
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
  renderAlternatives(article.querySelector(".alternatives"), message);
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

// Regenerate (or Answer) and Continue go on the last message only: they act on the conversation's end.
function refreshActions() {
  for (const b of el.messages.querySelectorAll(".regenerate, .continue")) b.remove();
  const articles = el.messages.querySelectorAll(".message");
  const last = articles[articles.length - 1];
  if (!last || state.streaming) return;
  const meta = last.querySelector(".meta") || last;
  const isUser = last.classList.contains("user");
  meta.append(metaButton("regenerate", isUser ? "Answer" : "Regenerate", "refresh", regenerate, isUser ? "Answer" : "Regenerate"));
  if (!isUser && canContinue(last.message)) meta.append(metaButton("continue", "Continue this answer", "forward", continueAnswer, "Continue"));
}

function renderConversation(conversation) {
  showModel(conversation);
  el.messages.replaceChildren();
  el.title.textContent = conversation.title;
  document.title = `${conversation.title} · scratchgpt`;
  if (!conversation.messages.length) el.messages.append(el.empty);
  for (const message of conversation.messages) el.messages.append(renderMessage(message));
  refreshActions();
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
  leaveAnswer();
  try {
    const conversation = await api(`/api/v1/conversations/${id}`);
    state.current = conversation;
    if (push) history.pushState({ id }, "", `/c/${id}`);
    hideBannerUnlessModel();
    renderConversation(conversation);
    renderSidebar();
    setSidebarOpen(false);
    if (conversation.generating) followAnswer(conversation);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      showBanner("That conversation does not exist (or belongs to someone else).");
      showNewChat(true);
    } else {
      showBanner(err.detail || String(err));
    }
  }
}

// The open conversation again from the server (after a turn that changed more than one message).
async function reloadCurrent() {
  if (!state.current) return;
  const id = state.current.id;
  try {
    const conversation = await api(`/api/v1/conversations/${id}`);
    if (!state.current || state.current.id !== id || state.streaming) return;
    state.current = conversation;
    renderConversation(conversation);
  } catch (err) {
    showBanner(err.detail || String(err));
  }
}

function hideBannerUnlessModel() {
  if (el.banner.dataset.kind !== "warn") hideBanner();
}

async function ensureConversation() {
  if (state.current) return state.current;
  const created = await api("/api/v1/conversations", { method: "POST", body: { ...withinLimits(newChatSettings()), model: modelForNewChat() } });
  state.current = { ...created, messages: [] };
  showModel(created);
  state.conversations.unshift(created);
  history.pushState({ id: created.id }, "", `/c/${created.id}`);
  renderSidebar();
  return state.current;
}

// --- streaming an answer ----------------------------------------------------------------

// A new, empty answer at the end of the conversation.
function appendAnswer() {
  el.empty.remove();
  const answer = { role: "assistant", content: "", status: "streaming" };
  const article = renderMessage(answer);
  article.classList.add("pending");
  el.messages.append(article);
  scrollToBottom(true);
  return article;
}

// Stream one answer's events (from `path`) into `article`. `userArticle` gets the stored question;
// `resetOnStart` empties the answer first (a late follower gets the text so far as a delta);
// `onRefused(err)` runs when the server refused before anything was stored.
// Returns whether the answer ended with a final event while this page followed it.
async function runAnswer(path, { body, method = "POST", article, userArticle = null, resetOnStart = false, onRefused }) {
  const answer = article.message;
  const controller = new AbortController();
  const streaming = { controller, conversationId: state.current.id, stopTimer: null, left: false };
  state.streaming = streaming;
  setBusy(true);
  refreshActions();

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
      method,
      signal: controller.signal,
      onEvent(event, data) {
        if (event === "start") {
          started = true;
          article.classList.remove("pending");
          answer.id = data.assistant_message_id;
          answer.status = "streaming";
          answer.dropped_messages = data.dropped_messages;
          if (resetOnStart) answer.content = "";
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
    if (!finished && started) {
      // The stream ended without a final event: the server went away mid-answer.
      answer.status = "interrupted";
      paint();
      showBanner("The connection closed before the answer finished; what arrived was saved.", "error");
    }
  } catch (err) {
    if (streaming.left) {
      // Another conversation was opened: the answer goes on on the server, this page stops following.
    } else if (err.name === "AbortError") {
      answer.status = "interrupted";
      paint();
    } else if (!started) {
      // Refused or unreachable before generation started: nothing was stored for this turn.
      article.remove();
      if (onRefused) onRefused(err);
      if (!el.messages.querySelector(".message")) el.messages.append(el.empty);
      showBanner(err.detail || String(err), err.status === 503 ? "warn" : "error");
    } else {
      answer.status = "interrupted";
      paint();
      showBanner(`${CONNECTION_LOST} The answer so far was saved.`, "error");
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    clearTimeout(streaming.stopTimer);
    if (state.streaming === streaming) {
      state.streaming = null;
      setBusy(false);
    }
    if (!streaming.left) {
      article.classList.remove("pending");
      refreshActions();
    }
    loadConversations();
  }
  return finished && !streaming.left;
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
  el.empty.remove();
  const userArticle = renderMessage({ role: "user", content: text, status: "sending" });
  el.messages.append(userArticle);
  await runAnswer(`/api/v1/conversations/${conversation.id}/messages`, {
    body: { content: text },
    article: appendAnswer(),
    userArticle,
    onRefused() {
      userArticle.remove();
      el.input.value = text;
      autoResize();
    },
  });
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

// --- regenerate, with the earlier answers kept as alternatives --------------------------------------

async function regenerate() {
  if (!state.current || state.streaming) return;
  const articles = el.messages.querySelectorAll(".message");
  const last = articles[articles.length - 1];
  if (last && last.classList.contains("assistant")) last.remove();
  hideBannerUnlessModel();
  const done = await runAnswer(`/api/v1/conversations/${state.current.id}/regenerate`, {
    body: {},
    article: appendAnswer(),
    onRefused: reloadCurrent,
  });
  if (done) await reloadCurrent(); // the new answer's place among its alternatives
}

// "< 2/3 >" under an answer that has alternatives.
function renderAlternatives(box, message) {
  box.replaceChildren();
  const ids = message.alternatives || [];
  const at = ids.indexOf(message.id);
  if (ids.length < 2 || at < 0) return;
  const previous = metaButton("alt-previous", "Previous answer", "chevron-left", () => selectAlternative(ids[at - 1]));
  const next = metaButton("alt-next", "Next answer", "chevron-right", () => selectAlternative(ids[at + 1]));
  previous.dataset.end = String(at === 0);
  next.dataset.end = String(at === ids.length - 1);
  for (const button of [previous, next]) button.disabled = button.dataset.end === "true" || Boolean(state.streaming);
  const position = document.createElement("span");
  position.className = "alt-position";
  position.textContent = `${at + 1}/${ids.length}`;
  box.append(previous, position, next);
}

async function selectAlternative(id) {
  if (!state.current || state.streaming) return;
  const conversationId = state.current.id;
  try {
    const thread = await api(`/api/v1/conversations/${conversationId}/messages/${id}/select`, { method: "POST" });
    if (!state.current || state.current.id !== conversationId) return;
    state.current.messages = thread;
    const chosen = thread.find((m) => m.id === id);
    const shown = [...el.messages.querySelectorAll(".message.assistant")].find(
      (a) => a.message && (a.message.alternatives || []).includes(id)
    );
    if (chosen && shown) shown.replaceWith(renderMessage(chosen));
    refreshActions();
  } catch (err) {
    showBanner(err.detail || String(err));
  }
}

// --- continue an answer cut by the token limit --------------------------------------------------------

function canContinue(message) {
  if (!message || message.role !== "assistant" || !message.content) return false;
  return (message.status === "complete" && message.finish_reason === "length") || message.status === "interrupted";
}

async function continueAnswer() {
  if (!state.current || state.streaming) return;
  const answers = el.messages.querySelectorAll(".message.assistant");
  const article = answers[answers.length - 1];
  if (!article || !canContinue(article.message)) return;
  hideBannerUnlessModel();
  Object.assign(article.message, { status: "streaming", finish_reason: null });
  await runAnswer(`/api/v1/conversations/${state.current.id}/continue`, {
    body: {},
    article,
    onRefused: reloadCurrent,
  });
}

// --- edit a question and send it again ---------------------------------------------------------------

function startEdit(article) {
  if (state.streaming || article.querySelector(".edit-form")) return;
  const content = article.querySelector(".content");
  const form = document.createElement("form");
  form.className = "edit-form";
  const input = document.createElement("textarea");
  input.className = "edit-input";
  input.value = article.message.content;
  input.rows = Math.min(10, input.value.split("\n").length + 1);
  input.setAttribute("aria-label", "Edited message");
  const actions = document.createElement("div");
  actions.className = "edit-actions";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "btn btn-ghost btn-small edit-cancel";
  cancel.textContent = "Cancel";
  const send = document.createElement("button");
  send.type = "submit";
  send.className = "btn btn-primary btn-small edit-send";
  send.textContent = "Send";
  actions.append(cancel, send);
  form.append(input, actions);
  content.hidden = true;
  content.after(form);
  input.focus();
  const close = () => {
    form.remove();
    content.hidden = false;
  };
  cancel.addEventListener("click", close);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!input.value.trim() || state.streaming) return;
    close();
    resendEdited(article, input.value);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    } else if (event.key === "Escape") {
      event.stopPropagation();
      close();
    }
  });
}

// The server replaces the message and removes what followed it, in one step; the page does the same.
async function resendEdited(article, text) {
  if (!state.current) return;
  const edited = article.message;
  while (article.nextElementSibling) article.nextElementSibling.remove();
  updateMessage(article, { ...edited, content: text, status: "sending" });
  hideBannerUnlessModel();
  await runAnswer(`/api/v1/conversations/${state.current.id}/messages/${edited.id}/edit`, {
    body: { content: text },
    article: appendAnswer(),
    userArticle: article,
    onRefused: reloadCurrent,
  });
}

// --- switching conversations while an answer streams -----------------------------------------------

// Stop following the answer on screen (it goes on on the server): another conversation is opened.
function leaveAnswer() {
  const streaming = state.streaming;
  if (!streaming) return;
  streaming.left = true;
  state.streaming = null;
  setBusy(false);
  streaming.controller.abort();
}

// Follow the answer being generated in the conversation just opened, from its text so far.
async function followAnswer(conversation) {
  const answers = el.messages.querySelectorAll(".message.assistant");
  let article = answers[answers.length - 1];
  if (!article || article.message.status !== "streaming") article = appendAnswer();
  const done = await runAnswer(`/api/v1/conversations/${conversation.id}/answer`, {
    method: "GET",
    article,
    resetOnStart: true,
  });
  // Ended before this page joined (204), or done: the stored conversation is the truth.
  if (done || !article.isConnected || article.message.status === "streaming") await reloadCurrent();
}

// --- settings --------------------------------------------------------------------------

// The penalties against repeating: [input, field, the value that penalizes nothing].
const PENALTIES = [["set-repetition", "repetition_penalty", 1], ["set-frequency", "frequency_penalty", 0], ["set-presence", "presence_penalty", 0]];

// What this server accepts and gives new chats (GET /api/v1/settings); filled at start.
const server = { limits: {}, defaults: {}, maxSystemPrompt: 8000 };

const LIMIT_NAMES = { temperature: "Temperature", top_k: "Top-k", top_p: "Top-p", max_new_tokens: "Max new tokens" };

async function loadServerSettings() {
  try {
    const data = await api("/api/v1/settings");
    Object.assign(server, { limits: data.limits, defaults: data.defaults, maxSystemPrompt: data.max_system_prompt_chars });
  } catch {
    return; // the form keeps its own bounds; the server still checks every value
  }
  const { temperature, top_k: topK, max_new_tokens: maxTokens } = server.limits;
  $("set-temperature").min = temperature.minimum;
  $("set-temperature").max = temperature.maximum;
  $("set-top-k").min = topK.minimum;
  $("set-top-k").max = topK.maximum;
  $("set-max-tokens").min = maxTokens.minimum;
  $("set-max-tokens").max = maxTokens.maximum;
  $("set-system").maxLength = server.maxSystemPrompt;
  $("max-tokens-limit").textContent = `(up to ${maxTokens.maximum})`;
}

// Why `value` is outside the server's range for `name`, or null.
function limitProblem(name, value) {
  const limit = server.limits[name];
  if (!limit || value === null || value === undefined) return null;
  const low = limit.exclusive_minimum ? value <= limit.minimum : value < limit.minimum;
  if (!low && value <= limit.maximum) return null;
  const from = limit.exclusive_minimum ? `above ${limit.minimum}` : `at least ${limit.minimum}`;
  return `${LIMIT_NAMES[name]} must be ${from} and at most ${limit.maximum} on this server.`;
}

// Saved new-chat settings without those this server would refuse (saved under other limits).
function withinLimits(settings) {
  const kept = { ...settings };
  for (const name of Object.keys(LIMIT_NAMES)) if (limitProblem(name, kept[name])) delete kept[name];
  return kept;
}

function settingsSource() {
  if (state.current) return state.current;
  return { ...server.defaults, ...decodingDefaults(), ...withinLimits(newChatSettings()) };
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

function showSettingsError(text) {
  el.settingsError.textContent = text;
  el.settingsError.hidden = false;
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
  if (!Number.isInteger(changes.max_new_tokens)) return showSettingsError("Max new tokens must be a whole number.");
  if (changes.top_k !== null && !Number.isInteger(changes.top_k)) return showSettingsError("Top-k must be empty or a whole number.");
  for (const name of Object.keys(LIMIT_NAMES)) {
    const problem = limitProblem(name, changes[name]);
    if (problem) return showSettingsError(problem);
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
    showSettingsError(err.detail || String(err));
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
  leaveAnswer(); // the answer goes on on the server
  showNewChat(true);
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
  else {
    leaveAnswer();
    showNewChat(false);
  }
});

async function start() {
  startModels({ onUnavailable: (text) => showBanner(text, "warn") });
  await loadServerSettings();
  await loadConversations();
  const id = conversationIdFromUrl();
  if (id) await openConversation(id, false);
  else renderSidebar();
  el.input.focus();
  document.body.dataset.ready = "true";
}

start();
