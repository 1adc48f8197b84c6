// The spam page's explanation: POST /api/v1/lab/explain and colour each word by how it moved the
// classifier (occlusion: the spam log-odds with the word minus those without it) or each token by
// how much the last token attended to it. Red always means towards spam and green towards ham,
// as on the verdict's badge, whatever the verdict; the list names the words behind the verdict.

import { api, el, percent, tokenChip, visible } from "./common.js";

let mode = "push";
let last = null;

const SPAM_RGB = "220, 38, 38"; // --danger, the spam badge
const HAM_RGB = "5, 150, 105"; // --ok, the ham badge

function legend() {
  const box = el("div", "explain-legend small");
  box.id = "spam-explain-legend";
  for (const [kind, text] of [["spam", "pushed towards spam"], ["ham", "pushed towards ham"]]) {
    const item = el("span", "legend-item");
    item.dataset.towards = kind;
    const swatch = el("span", `legend-swatch legend-${kind}`);
    swatch.setAttribute("aria-hidden", "true");
    item.append(swatch, el("span", "", text));
    box.append(item);
  }
  box.append(el("span", "legend-item muted", "paler: a smaller push; grey: none"));
  return box;
}

function section(parent) {
  let box = parent.querySelector(".explain");
  if (box) return box;
  box = el("div", "explain");
  box.id = "spam-explain";
  const head = el("div", "explain-head");
  head.append(el("h3", "", "Why? The words that moved the decision"));
  const toggle = el("div", "seg");
  for (const [key, label] of [["push", "word push"], ["attention", "last-token attention"]]) {
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
  box.append(head, el("p", "explain-note muted small"), legend(), el("div", "chips explain-chips"),
    el("p", "explain-top small"), el("p", "explain-against muted small"));
  parent.append(box);
  return box;
}

// One entry per word: its text (the tokens' text joined) and its push, in reading order.
function words(data) {
  const out = [];
  for (const t of data.tokens) {
    const word = out[t.word] ?? (out[t.word] = { text: "", push: t.push });
    word.text += t.token.text;
  }
  return out.filter(Boolean);
}

function quoted(list) {
  return list.map((w) => `“${visible(w.text.trim()) || visible(w.text)}”`).join(", ");
}

function drawPush(box, data) {
  const chips = box.querySelector(".explain-chips");
  const other = Object.keys(data.probabilities).find((k) => k !== data.target) ?? "other";
  const scale = Math.max(...data.tokens.map((t) => Math.abs(t.push)), 1e-12);
  data.tokens.forEach((t, i) => {
    const s = t.push / scale;
    const towards = t.push > 0 ? data.target : t.push < 0 ? other : "neither";
    const chip = tokenChip(t.token, i, {
      title: `word ${t.word + 1}: ${t.push >= 0 ? "+" : ""}${t.push.toFixed(3)} log-odds, towards ${towards}`,
    });
    chip.classList.add("tok-plain");
    chip.dataset.towards = towards;
    chip.dataset.word = String(t.word);
    if (t.push !== 0) chip.style.background = `rgba(${t.push > 0 ? SPAM_RGB : HAM_RGB}, ${(0.08 + 0.72 * Math.abs(s)).toFixed(3)})`;
    chips.append(chip);
  });
  const cut = data.threshold === null || data.threshold === undefined
    ? ""
    : ` The verdict is ${data.target} from a ${percent(data.threshold, 2)} probability of ${data.target} up (a cut chosen on validation messages).`;
  box.querySelector(".explain-note").textContent =
    `Each word is coloured by how the ${data.target} score changes when the word is left out: red words pushed ` +
    `towards ${data.target}, green words towards ${other}; the stronger the colour, the bigger the push ` +
    `(occlusion on the ${data.target} log-odds).${cut}`;
  // The words behind the verdict first; the ones pulling the other way after, named as such.
  const sign = data.label === data.target ? 1 : -1;
  const ranked = words(data).sort((a, b) => sign * (b.push - a.push));
  const forVerdict = ranked.filter((w) => sign * w.push > 0).slice(0, 3);
  const against = ranked.filter((w) => sign * w.push < 0).reverse().slice(0, 3);
  const opposite = data.label === data.target ? other : data.target;
  box.querySelector(".explain-top").textContent = forVerdict.length
    ? `Strongest towards ${data.label} (the verdict): ${quoted(forVerdict)}`
    : `No single word pushed towards ${data.label}; the verdict comes from the message as a whole.`;
  box.querySelector(".explain-against").textContent = against.length
    ? `Pulling the other way, towards ${opposite}: ${quoted(against)}`
    : "";
}

function drawAttention(box, data) {
  const chips = box.querySelector(".explain-chips");
  const scale = Math.max(...data.tokens.map((t) => t.attention), 1e-12);
  data.tokens.forEach((t, i) => {
    const chip = tokenChip(t.token, i, { title: `attention ${percent(t.attention)}` });
    chip.classList.add("tok-plain");
    chip.style.background = `rgba(79, 70, 229, ${(0.06 + 0.74 * (t.attention / scale)).toFixed(3)})`;
    chips.append(chip);
  });
  box.querySelector(".explain-note").textContent =
    "How much the last token, where the classifier reads its answer, attends to each token in the last layer " +
    "(mean over heads). Attention says where the model looked, not which way a token pushed.";
  box.querySelector(".explain-top").textContent = "";
  box.querySelector(".explain-against").textContent = "";
}

function draw(box, data) {
  box.querySelector(".explain-chips").replaceChildren();
  box.querySelector(".explain-legend").hidden = mode !== "push";
  if (mode === "push") drawPush(box, data);
  else drawAttention(box, data);
  if (data.truncated) box.querySelector(".explain-top").textContent += " Only the start of the text fits the classifier; the rest was not read.";
  box.dataset.tokens = String(data.tokens.length);
  box.dataset.verdict = data.label;
}

// Explain the classifier's verdict on `text` inside `parent` (the result panel).
export async function explain(parent, text) {
  const box = section(parent);
  box.hidden = false;
  box.dataset.state = "loading";
  box.querySelector(".explain-note").textContent = "Measuring which words mattered…";
  box.querySelector(".explain-chips").replaceChildren();
  box.querySelector(".explain-top").textContent = "";
  box.querySelector(".explain-against").textContent = "";
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
