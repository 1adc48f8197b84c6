// Word, character and BPE tokenization of one text: POST /api/v1/lab/tokenizer-levels, drawn as a table and chips.

import { $, api, busy, el, markReady, tokenChip } from "./common.js";

const MAX_CHIPS = 600; // a long text in characters would be thousands of chips; the counts say the rest

function row(level) {
  const tr = el("tr");
  tr.dataset.key = level.key;
  const unknown = el("td", level.unknown ? "lv-unknown" : "", String(level.unknown));
  tr.append(
    el("td", "", level.name),
    el("td", "", level.vocab_size.toLocaleString()),
    el("td", "", level.count.toLocaleString()),
    unknown,
    el("td", "", level.tokens_per_word.toFixed(2)),
  );
  return tr;
}

function column(level) {
  const card = el("section", "card tok-column");
  card.dataset.key = level.key;
  const head = el("div", "card-head");
  head.append(el("h2", "", level.name), el("span", "count-badge", `${level.count} tokens`));
  card.append(head);
  const chips = el("div", "chips");
  level.tokens.slice(0, MAX_CHIPS).forEach((token, i) => chips.append(tokenChip(token, i)));
  card.append(chips);
  if (level.tokens.length > MAX_CHIPS) card.append(el("p", "muted small", `… and ${level.tokens.length - MAX_CHIPS} more`));
  return card;
}

async function run(event) {
  event?.preventDefault();
  const size = $("lv-bpe").value.trim();
  const body = { text: $("lv-text").value, reference: $("lv-reference").value };
  if (size) body.bpe_vocab_size = Number(size);
  await busy($("lv-run"), "Comparing…", async () => {
    const data = await api("/api/v1/lab/tokenizer-levels", { method: "POST", body });
    $("lv-stats").textContent = `${data.characters} characters · ${data.words} words`;
    $("lv-table").querySelector("tbody").replaceChildren(...data.levels.map(row));
    $("lv-summary-card").hidden = false;
    $("lv-results").replaceChildren(...data.levels.map(column));
  });
}

$("lv-form").addEventListener("submit", run);
run().finally(() => markReady("ready"));
