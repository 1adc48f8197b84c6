// Tokenizer playground: POST /api/v1/lab/tokenize and /api/v1/lab/merges, drawn as chips.

import { $, api, busy, el, hexBytes, markReady, setBanner, tokenChip, visible } from "./common.js";

const form = $("tok-form");
const input = $("tok-text");
const results = $("tok-results");
let timer = null;
let seq = 0;

function column(tokenization, otherCount) {
  const card = el("section", "card tok-column");
  card.dataset.key = tokenization.key;
  const head = el("div", "card-head");
  head.append(el("h2", "", tokenization.name));
  const count = el("span", "count-badge", `${tokenization.count} tokens`);
  if (otherCount !== undefined && otherCount !== tokenization.count) {
    const diff = tokenization.count - otherCount;
    count.title = `${diff > 0 ? "+" : ""}${diff} compared with the other tokenizer`;
  }
  head.append(count);
  card.append(head);
  const chips = el("div", "chips");
  tokenization.tokens.forEach((token, i) => chips.append(tokenChip(token, i)));
  card.append(chips);
  const ids = el("details", "ids");
  ids.append(el("summary", "", "Token ids"));
  ids.append(el("code", "ids-list", tokenization.tokens.map((t) => t.id).join(", ")));
  card.append(ids);
  return card;
}

async function run() {
  const text = input.value;
  if (!text.trim()) {
    results.replaceChildren();
    $("tok-stats").textContent = "";
    return;
  }
  const mine = ++seq;
  await busy($("tok-run"), "Tokenizing…", async () => {
    const data = await api("/api/v1/lab/tokenize", { method: "POST", body: { text } });
    if (mine !== seq) return; // a newer request is on its way
    $("tok-stats").textContent = `${data.characters} characters · ${data.bytes} UTF-8 bytes`;
    const counts = data.tokenizers.map((t) => t.count);
    results.replaceChildren(
      ...data.tokenizers.map((t, i) => column(t, counts.length > 1 ? counts[1 - i] : undefined)),
    );
    for (const note of data.notes) {
      const card = el("section", "card tok-column tok-missing");
      card.append(el("h2", "", "Chat model"), el("p", "muted", note));
      results.append(card);
    }
    document.body.dataset.tokens = String(data.tokenizers.reduce((n, t) => n + t.count, 0));
  });
}

// The parts before the merged one are unchanged, so the first difference is the new part.
function mergedIndex(previous, step) {
  if (!previous) return -1;
  return step.findIndex((part, i) => previous[i]?.bytes_hex !== part.bytes_hex);
}

function mergeStep(step, index, previous) {
  const item = el("li", "merge-step");
  const merged = mergedIndex(previous, step);
  item.append(el("span", "merge-label", index === 0 ? "bytes" : `merge ${index}`));
  const row = el("div", "chips");
  step.forEach((part, i) => {
    const token = part.token ?? { id: "—", text: "", bytes_hex: part.bytes_hex, special: false };
    const chip = tokenChip({ ...token, text: token.text || visible(hexBytes(part.bytes_hex)) }, i, { showId: true });
    if (i === merged) chip.classList.add("tok-new");
    row.append(chip);
  });
  item.append(row);
  return item;
}

function mergePiece(piece, many) {
  const item = el("li", "merge-piece");
  if (many) item.append(el("p", "merge-piece-title", `pre-token “${visible(piece.text)}”`));
  const list = el("ol", "merge-steps");
  list.replaceChildren(...piece.steps.map((step, i) => mergeStep(step, i, piece.steps[i - 1])));
  item.append(list);
  return item;
}

let mergeSeq = 0;

async function merges(event) {
  event?.preventDefault();
  const word = $("merge-word").value;
  // A newer word wins: an older answer arriving last must not overwrite it.
  const mine = ++mergeSeq;
  const load = async () => {
    const data = await api("/api/v1/lab/merges", {
      method: "POST",
      body: { word, tokenizer: $("merge-tokenizer").value },
    });
    if (mine !== mergeSeq) return;
    const list = $("merge-steps");
    const many = data.pieces.length > 1;
    list.replaceChildren(...data.pieces.map((piece) => mergePiece(piece, many)));
    if (many) {
      list.prepend(el("li", "muted small", `The pre-tokenizer first splits this into ${data.pieces.length} pieces; BPE merges inside each piece only.`));
    }
    list.dataset.steps = String(data.pieces.reduce((n, p) => n + p.steps.length, 0));
  };
  if (event) {
    await busy($("merge-form").querySelector("button"), "Merging…", load);
  } else {
    // The default word, when the panel opens: the button stays enabled, because a disabled
    // default button blocks the Enter of a word typed while this is on its way.
    await load().catch((err) => setBanner(err.detail || String(err)));
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  run();
});
input.addEventListener("input", () => {
  clearTimeout(timer);
  timer = setTimeout(run, 350);
});
$("merge-toggle").addEventListener("click", () => {
  const panel = $("merge-panel");
  panel.hidden = !panel.hidden;
  $("merge-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  $("merge-toggle").textContent = panel.hidden ? "Show merges" : "Hide merges";
  if (!panel.hidden && !$("merge-steps").children.length) merges();
});
$("merge-form").addEventListener("submit", merges);

run().finally(() => markReady("ready"));
setBanner("");
