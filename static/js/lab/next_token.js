// Next token: POST /api/v1/lab/next-token drawn as SVG bars, a step button that appends the chosen
// token, and GET /api/v1/lab/conversations/{id}/messages/{id}/tokens for a stored answer.

import { $, api, busy, confidence, el, markReady, percent, setBanner, svg, tokenChip, visible } from "./common.js";

let ids = null; // the prompt as token ids once it has been tokenized; null while the text is being edited
let data = null;
let chosen = 0; // index into data.choices

function settings() {
  const topK = $("nt-top-k").value.trim();
  const topP = Number($("nt-top-p").value);
  return {
    temperature: Number($("nt-temperature").value),
    top_k: topK ? Math.max(1, Math.min(1000, Math.round(Number(topK)))) : null,
    top_p: topP >= 1 ? null : topP,
    k: Math.max(1, Math.min(50, Math.round(Number($("nt-k").value) || 10))),
  };
}

function showSettings() {
  const s = settings();
  $("nt-temperature-out").textContent = s.temperature === 0 ? "0 (greedy)" : s.temperature.toFixed(2);
  $("nt-top-p-out").textContent = s.top_p === null ? "off" : s.top_p.toFixed(2);
}

function drawBars() {
  const plot = $("nt-bars");
  const rowH = 30;
  const labelW = 170;
  const barW = 420;
  const width = labelW + barW + 80;
  const height = data.choices.length * rowH + 8;
  plot.setAttribute("viewBox", `0 0 ${width} ${height}`);
  plot.replaceChildren();
  const top = Math.max(...data.choices.map((c) => c.probability), 1e-9);
  data.choices.forEach((choice, i) => {
    const y = 4 + i * rowH;
    const g = svg("g", { class: `bar-row${i === chosen ? " chosen" : ""}${choice.probability === 0 ? " filtered" : ""}`, "data-index": i });
    g.append(svg("rect", { x: 0, y, width, height: rowH - 2, class: "bar-hit" }));
    const text = visible(choice.token.text) || "∅";
    g.append(svg("text", { x: labelW - 10, y: y + rowH / 2, class: "bar-label", "text-anchor": "end", "dominant-baseline": "middle" },
      text.length > 18 ? `${text.slice(0, 17)}…` : text));
    g.append(svg("rect", { x: labelW, y: y + 4, width: barW, height: rowH - 10, rx: 5, class: "bar-track" }));
    g.append(svg("rect", {
      x: labelW, y: y + 4, width: Math.max(choice.probability > 0 ? 2 : 0, (barW * choice.probability) / top),
      height: rowH - 10, rx: 5, class: "bar",
    }));
    g.append(svg("text", { x: labelW + barW + 8, y: y + rowH / 2, class: "bar-value", "dominant-baseline": "middle" },
      choice.probability === 0 ? "cut" : percent(choice.probability)));
    const title = svg("title", {}, `id ${choice.token.id} · p ${choice.probability} · logit ${choice.logit}`);
    g.append(title);
    plot.append(g);
  });
  plot.dataset.bars = String(data.choices.length);
  const token = data.choices[chosen]?.token;
  $("nt-chosen").textContent = token ? `“${visible(token.text)}”` : "";
}

function render() {
  $("nt-card").hidden = false;
  $("nt-model").textContent = `${data.model} · ${data.prompt.length} prompt tokens`;
  $("nt-prompt").replaceChildren(...data.prompt.map((t, i) => tokenChip(t, i)));
  $("nt-entropy").textContent = `${data.entropy.toFixed(3)} nats (${(data.entropy / Math.LN2).toFixed(2)} bits)`;
  $("nt-greedy").textContent = `“${visible(data.greedy.text)}”`;
  const mass = data.choices.reduce((sum, c) => sum + c.probability, 0);
  $("nt-mass").textContent = percent(mass);
  $("nt-stats").textContent = `${data.prompt.length} tokens`;
  drawBars();
}

async function predict() {
  await busy($("nt-run"), "Predicting…", async () => {
    const body = { ...settings() };
    if (ids) body.token_ids = ids;
    else {
      body.text = $("nt-text").value;
      body.chat_template = $("nt-template").checked;
    }
    data = await api("/api/v1/lab/next-token", { method: "POST", body });
    ids = data.prompt.map((t) => t.id);
    chosen = 0;
    render();
  });
}

function step() {
  const choice = data?.choices[chosen];
  if (!choice || !ids) return;
  ids = [...ids, choice.token.id];
  $("nt-text").value = $("nt-template").checked ? $("nt-text").value : data.text + choice.token.text;
  predict();
}

// --- stored answers --------------------------------------------------------------

async function loadConversations() {
  const select = $("cv-select");
  try {
    const list = await api("/api/v1/conversations?limit=50");
    select.replaceChildren(new Option(list.conversations.length ? "choose a conversation…" : "no conversations yet: chat first", ""));
    for (const c of list.conversations) select.append(new Option(c.title, c.id));
    const wanted = new URLSearchParams(location.search).get("conversation");
    if (wanted && list.conversations.some((c) => c.id === wanted)) {
      select.value = wanted;
      await showConversation(wanted);
    }
  } catch (err) {
    select.replaceChildren(new Option("conversations unavailable", ""));
    setBanner(err.detail || String(err));
  }
}

function legend(answer) {
  const p = el("p", "muted small");
  p.textContent = `${answer.tokens.length} tokens after a ${answer.prompt_tokens}-token prompt` +
    (answer.perplexity ? ` · perplexity ${answer.perplexity.toFixed(2)}` : "");
  return p;
}

async function showAnswer(conversationId, message, box, button) {
  await busy(button, "Measuring…", async () => {
    const answer = await api(`/api/v1/lab/conversations/${conversationId}/messages/${message.id}/tokens`);
    const chips = el("div", "chips conf-chips");
    answer.tokens.forEach((t, i) => {
      const chip = tokenChip(t.token, i, { title: `p = ${t.probability === null ? "unknown" : t.probability}` });
      chip.classList.add("tok-conf");
      if (t.probability !== null) {
        chip.style.borderBottomColor = confidence(t.probability);
        chip.style.background = confidence(t.probability, 0.2);
      }
      chips.append(chip);
    });
    box.replaceChildren(legend(answer), chips);
    box.dataset.loaded = "true";
    button.hidden = true;
  });
}

async function showConversation(id) {
  const target = $("cv-answers");
  target.replaceChildren();
  if (!id) return;
  try {
    const conversation = await api(`/api/v1/conversations/${id}`);
    const answers = conversation.messages.filter((m) => m.role === "assistant" && m.content);
    if (!answers.length) {
      target.append(el("p", "muted", "This conversation has no answers yet."));
      return;
    }
    // Message ids are random: the order is the list's.
    const position = new Map(conversation.messages.map((m, i) => [m.id, i]));
    let latest = null;
    for (const message of answers) {
      const item = el("article", "cv-answer");
      const before = conversation.messages.slice(0, position.get(message.id));
      const question = before.filter((m) => m.role === "user").pop();
      if (question) item.append(el("p", "cv-question", question.content.length > 140 ? `${question.content.slice(0, 137)}…` : question.content));
      const box = el("div", "cv-box");
      box.append(el("p", "cv-text", message.content.length > 240 ? `${message.content.slice(0, 237)}…` : message.content));
      const button = el("button", "btn btn-ghost btn-small", "Show token probabilities");
      button.type = "button";
      button.addEventListener("click", () => showAnswer(id, message, box, button));
      item.append(box, button);
      target.append(item);
      latest = [message, box, button];
    }
    if (latest) await showAnswer(id, ...latest);
  } catch (err) {
    setBanner(err.detail || String(err));
  }
}

$("nt-form").addEventListener("submit", (event) => {
  event.preventDefault();
  ids = null;
  predict();
});
$("nt-text").addEventListener("input", () => {
  ids = null;
});
$("nt-template").addEventListener("change", () => {
  ids = null;
});
for (const id of ["nt-temperature", "nt-top-p", "nt-top-k", "nt-k"]) {
  $(id).addEventListener("input", showSettings);
  $(id).addEventListener("change", () => data && predict());
}
$("nt-bars").addEventListener("click", (event) => {
  const row = event.target.closest("[data-index]");
  if (!row) return;
  chosen = Number(row.dataset.index);
  drawBars();
});
$("nt-step").addEventListener("click", step);
$("nt-reset").addEventListener("click", () => {
  ids = null;
  predict();
});
$("cv-select").addEventListener("change", (event) => showConversation(event.target.value));

showSettings();
Promise.all([predict(), loadConversations()]).finally(() => markReady("ready"));
