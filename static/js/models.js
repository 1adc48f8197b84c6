// The chat models (GET /api/v1/models): the new chat's model picker, and the header's pill naming the
// model of the open conversation (or the one picked for a new chat) with its state.

import { api } from "./api.js";

const $ = (id) => document.getElementById(id);
const el = { pill: $("model-status"), choice: $("model-choice"), picker: $("model-picker"), note: $("model-note") };

const STATE_WORDS = { loading: "loading", missing: "not made yet", error: "failed to load", disabled: "switched off" };
// A model's decoding defaults as the settings dialog names them, with the value that changes nothing.
const DECODING_WORDS = [
  ["temperature", "temperature"], ["top_p", "top-p", 1], ["top_k", "top-k"],
  ["repetition_penalty", "repetition penalty", 1], ["frequency_penalty", "frequency penalty", 0],
  ["presence_penalty", "presence penalty", 0],
];

const models = {
  list: [],
  default: null,
  shown: null, // the open conversation's model; null: a new chat, whose model is the picker's
  picked: null, // what the user chose in the picker, if anything
  warned: new Set(), // "name:state" already reported, so a poll does not repeat the banner
  onUnavailable: () => {},
};

function byName(name) {
  return models.list.find((m) => m.name === name) || null;
}

function selectable(model) {
  return model.state === "ready" || model.state === "loading";
}

// The model a new conversation is created with (undefined until the list has come: the server's default).
export function modelForNewChat() {
  return el.picker.value || undefined;
}

// The decoding settings a new conversation gets with the picked model.
export function decodingDefaults() {
  const model = byName(modelForNewChat());
  return model ? { ...model.decoding } : {};
}

// Show the model of `conversation` in the header; null: a new chat, with the picker.
export function showModel(conversation) {
  models.shown = conversation ? conversation.model : null;
  render();
}

function describeDecoding(decoding) {
  return DECODING_WORDS.filter(([key, , neutral]) => decoding[key] !== null && decoding[key] !== undefined && decoding[key] !== neutral)
    .map(([key, words]) => `${words} ${decoding[key]}`).join(" · ");
}

function renderPicker() {
  const wanted = models.picked && byName(models.picked) && selectable(byName(models.picked)) ? models.picked : models.default;
  el.picker.replaceChildren();
  for (const model of models.list) {
    const words = model.state === "ready" ? "" : ` (${STATE_WORDS[model.state] || model.state})`;
    const option = new Option(`${model.name}${words}`, model.name, false, model.name === wanted);
    option.disabled = !selectable(model);
    el.picker.append(option);
  }
  el.choice.hidden = models.shown !== null || models.list.length < 2;
  const model = byName(el.picker.value);
  el.note.textContent = model ? `Decodes with ${describeDecoding(model.decoding) || "no sampling filters"} unless you change the settings.` : "";
}

function renderPill() {
  const name = models.shown ?? modelForNewChat();
  const model = byName(name);
  if (!model) {
    // A conversation held with a model this server no longer serves (or the list is not there yet).
    el.pill.textContent = name ? "model unavailable" : "checking model…";
    el.pill.className = `pill ${name ? "pill-error" : "pill-muted"}`;
    el.pill.title = name ? `Chat model ${name} is not served here` : "Chat model";
    return;
  }
  if (model.state === "ready") {
    el.pill.textContent = model.name;
    el.pill.title = `Chat model ${model.name} (context ${model.context_length} tokens)`;
    el.pill.className = "pill pill-ok";
    return;
  }
  if (model.state === "loading") {
    el.pill.textContent = "model loading…";
    el.pill.title = `Chat model ${model.name} is loading`;
    el.pill.className = "pill pill-warn";
    return;
  }
  el.pill.textContent = "model unavailable";
  el.pill.title = `Chat model ${model.name}: ${model.detail || model.state}`;
  el.pill.className = "pill pill-error";
  const seen = `${model.name}:${model.state}`;
  if (!models.warned.has(seen)) {
    models.warned.add(seen);
    const how = model.make_with ? ` Create it with: ${model.make_with}` : "";
    models.onUnavailable(`The chat model ${model.name} is not available (${model.detail || model.state}).${how}`);
  }
}

function render() {
  if (!models.list.length) return;
  renderPicker();
  renderPill();
}

async function poll() {
  try {
    const data = await api("/api/v1/models");
    models.list = data.models;
    models.default = data.default;
  } catch {
    el.pill.textContent = "offline";
    el.pill.className = "pill pill-error";
    setTimeout(poll, 5000);
    return;
  }
  render();
  // A model still loading is ready in seconds; one being made (fine-tuned) in minutes.
  setTimeout(poll, models.list.some((m) => m.state === "loading") ? 2000 : 15000);
}

// Start polling the models; `onUnavailable(text)` reports a model the page shows that cannot answer.
export function startModels({ onUnavailable }) {
  models.onUnavailable = onUnavailable;
  el.picker.addEventListener("change", () => {
    models.picked = el.picker.value;
    render();
  });
  poll();
}
