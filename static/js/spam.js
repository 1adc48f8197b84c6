// The spam-check page: POST /api/v1/classify and show the label and the probability of spam.

import { api } from "./api.js";
import { explain } from "./lab/explain.js";

const $ = (id) => document.getElementById(id);
const form = $("spam-form");
const input = $("spam-text");
const button = $("spam-check");
const banner = $("spam-banner");
const result = $("spam-result");
const historyList = $("spam-history");

function showError(text) {
  banner.textContent = text;
  banner.dataset.kind = "error";
  banner.hidden = false;
}

function percent(p) {
  return `${(p * 100).toFixed(p > 0.999 || p < 0.001 ? 2 : 1)}%`;
}

function showResult(text, r) {
  const spam = r.label === "spam";
  $("spam-label").textContent = spam ? "Spam" : "Not spam (ham)";
  $("spam-label").className = `badge ${spam ? "badge-spam" : "badge-ham"}`;
  $("spam-prob").textContent = `${percent(r.spam_probability)} probability of spam`;
  $("spam-meter").style.width = `${Math.max(1, r.spam_probability * 100)}%`;
  $("spam-meter").className = `meter-fill ${spam ? "meter-spam" : "meter-ham"}`;
  $("spam-model").textContent = r.model;
  result.hidden = false;
  result.dataset.label = r.label;

  const item = document.createElement("li");
  const badge = document.createElement("span");
  badge.className = `badge badge-small ${spam ? "badge-spam" : "badge-ham"}`;
  badge.textContent = r.label;
  const snippet = document.createElement("span");
  snippet.className = "history-text";
  snippet.textContent = text.length > 120 ? `${text.slice(0, 117)}…` : text;
  const prob = document.createElement("span");
  prob.className = "history-prob";
  prob.textContent = percent(r.spam_probability);
  item.append(badge, snippet, prob);
  historyList.prepend(item);
  while (historyList.children.length > 8) historyList.lastChild.remove();
  $("history-card").hidden = false;
}

async function check(event) {
  event.preventDefault();
  const text = input.value;
  if (!text.trim()) {
    showError("Type or paste a message first.");
    return;
  }
  banner.hidden = true;
  button.disabled = true;
  button.textContent = "Checking…";
  try {
    showResult(text, await api("/api/v1/classify", { method: "POST", body: { text } }));
    explain(result, text); // the Lab's "why": which tokens moved the decision
  } catch (err) {
    result.hidden = true;
    showError(err.detail || String(err));
  } finally {
    button.disabled = false;
    button.textContent = "Check message";
  }
}

form.addEventListener("submit", check);
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});
for (const chip of document.querySelectorAll("[data-example]")) {
  chip.addEventListener("click", () => {
    input.value = chip.dataset.example;
    form.requestSubmit();
  });
}
document.body.dataset.ready = "true";
