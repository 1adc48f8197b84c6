// The spam page's explanation: POST /api/v1/lab/explain and colour each token by how much it
// moved the classifier (gradient x input) or how much the last token attended to it.

import { api, el, percent, tokenChip, visible } from "./common.js";

let mode = "gradient";
let last = null;

function section(parent) {
  let box = parent.querySelector(".explain");
  if (box) return box;
  box = el("div", "explain");
  box.id = "spam-explain";
  const head = el("div", "explain-head");
  head.append(el("h3", "", "Why? The tokens that moved the decision"));
  const toggle = el("div", "seg");
  for (const [key, label] of [["gradient", "gradient × input"], ["attention", "last-token attention"]]) {
    const button = el("button", `seg-btn${key === mode ? " active" : ""}`, label);
    button.type = "button";
    button.dataset.mode = key;
    button.addEventListener("click", () => {
      mode = key;
      for (const b of toggle.children) b.classList.toggle("active", b.dataset.mode === mode);
      if (last) draw(box, last);
    });
    toggle.append(button);
  }
  head.append(toggle);
  box.append(head, el("p", "explain-note muted small"), el("div", "chips explain-chips"), el("p", "explain-top small"));
  parent.append(box);
  return box;
}

function draw(box, data) {
  const chips = box.querySelector(".explain-chips");
  const note = box.querySelector(".explain-note");
  const top = box.querySelector(".explain-top");
  chips.replaceChildren();
  const other = Object.keys(data.probabilities).find((k) => k !== data.target) ?? "other";
  if (mode === "gradient") {
    const scores = data.tokens.map((t) => t.gradient_x_input);
    const scale = Math.max(...scores.map(Math.abs), 1e-12);
    data.tokens.forEach((t, i) => {
      const s = t.gradient_x_input / scale;
      const chip = tokenChip(t.token, i, { title: `gradient × input ${t.gradient_x_input.toFixed(4)}` });
      chip.classList.add("tok-plain");
      chip.style.background = s >= 0 ? `rgba(220, 38, 38, ${(0.08 + 0.72 * s).toFixed(3)})` : `rgba(5, 150, 105, ${(0.08 - 0.72 * s).toFixed(3)})`;
      chips.append(chip);
    });
    note.textContent = `Red tokens pushed towards “${data.target}”, green ones towards “${other}”; the stronger the colour, the larger the push (gradient × input, Shrikumar et al. 2016).`;
    const order = data.tokens.map((t, i) => [t.gradient_x_input, i]).sort((a, b) => b[0] - a[0]);
    const names = order.filter(([s]) => s > 0).slice(0, 3).map(([, i]) => `“${visible(data.tokens[i].token.text).trim()}”`);
    top.textContent = names.length ? `Strongest towards ${data.target}: ${names.join(", ")}` : "";
  } else {
    const scale = Math.max(...data.tokens.map((t) => t.attention), 1e-12);
    data.tokens.forEach((t, i) => {
      const chip = tokenChip(t.token, i, { title: `attention ${percent(t.attention)}` });
      chip.classList.add("tok-plain");
      chip.style.background = `rgba(79, 70, 229, ${(0.06 + 0.74 * (t.attention / scale)).toFixed(3)})`;
      chips.append(chip);
    });
    note.textContent = "How much the last token, where the classifier reads its answer, attends to each token in the last layer (mean over heads).";
    top.textContent = "";
  }
  if (data.truncated) top.textContent += " Only the start of the text fits the classifier; the rest was not read.";
  box.dataset.tokens = String(data.tokens.length);
}

// Explain the classifier's verdict on `text` inside `parent` (the result panel).
export async function explain(parent, text) {
  const box = section(parent);
  box.hidden = false;
  box.dataset.state = "loading";
  box.querySelector(".explain-note").textContent = "Measuring which tokens mattered…";
  box.querySelector(".explain-chips").replaceChildren();
  box.querySelector(".explain-top").textContent = "";
  try {
    last = await api("/api/v1/lab/explain", { method: "POST", body: { text } });
    draw(box, last);
    box.dataset.state = "done";
  } catch (err) {
    last = null;
    box.querySelector(".explain-note").textContent = `No explanation: ${err.detail || err}`;
    box.dataset.state = "error";
  }
}
