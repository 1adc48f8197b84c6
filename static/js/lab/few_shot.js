// Zero-shot against few-shot: POST /api/v1/lab/few-shot, one column per number of examples k.

import { $, api, busy, el, markReady, percent } from "./common.js";

const DEFAULT_TEXT = {
  sentiment: "The worst film I have seen this year.",
  spam: "Your parcel is waiting. Pay the 2 pound delivery fee at this link to get it today.",
};

function labelRow(score, predicted) {
  const row = el("div", `fs-label${score.label === predicted ? " fs-predicted" : ""}`);
  const bar = el("div", "fs-bar");
  const fill = el("div", "fs-bar-fill");
  fill.style.width = `${(score.probability * 100).toFixed(1)}%`;
  bar.append(fill);
  row.append(el("span", "fs-label-name", score.label), bar, el("span", "fs-label-value", percent(score.probability)));
  row.title = score.logprob === null ? "log-probability: −∞" : `log-probability ${score.logprob.toFixed(3)}`;
  return row;
}

function column(attempt) {
  const card = el("section", "card fs-column");
  card.dataset.k = String(attempt.k);
  const head = el("div", "card-head");
  head.append(
    el("h2", "", attempt.k === 0 ? "k = 0 (zero-shot)" : `k = ${attempt.k}`),
    el("span", "count-badge", `${attempt.prompt_tokens} prompt tokens`),
  );
  card.append(head, el("div", "muted small", "The model wrote"));
  card.append(el("div", "fs-answer", attempt.answer || "∅ (nothing before the end of the line)"));
  card.append(el("div", "muted small", `Label probabilities · label mass ${percent(attempt.label_mass)}`));
  attempt.labels.forEach((score) => card.append(labelRow(score, attempt.predicted)));
  const prompt = el("details", "fs-prompt");
  prompt.append(el("summary", "", "The prompt as built"), el("pre", "", attempt.prompt));
  card.append(prompt);
  return card;
}

function shots() {
  return $("fs-shots").value.split(/[\s,]+/).filter(Boolean).map(Number);
}

async function run(event) {
  event?.preventDefault();
  const body = { task: $("fs-task").value, text: $("fs-text").value, shots: shots(), chat_template: $("fs-template").checked };
  await busy($("fs-run"), "Asking…", async () => {
    const data = await api("/api/v1/lab/few-shot", { method: "POST", body });
    $("fs-stats").textContent = `${data.model} · labels: ${data.labels.join(", ")}`;
    $("fs-results").replaceChildren(...data.attempts.map(column));
  });
}

$("fs-task").addEventListener("change", () => {
  $("fs-text").value = DEFAULT_TEXT[$("fs-task").value];
});
$("fs-form").addEventListener("submit", run);
run().finally(() => markReady("ready"));
