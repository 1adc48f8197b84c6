// Attention: POST /api/v1/lab/attention for one layer (all heads), drawn as an SVG heatmap,
// a strip of tokens that lights up with what the hovered token attends to, and a canvas per head.

import { $, api, busy, el, heat, markReady, svg, tokenChip, visible } from "./common.js";

const form = $("att-form");
const layerSelect = $("att-layer");
const headSelect = $("att-head");
let data = null; // the last answer
let selected = "avg"; // "avg" or a head index
let pinned = null; // a query row kept highlighted after a click

// Weights are drawn with a square-root scale: most weights are small, and a linear
// scale would leave all but the largest looking empty.
const shade = (w) => heat(Math.sqrt(w));

function matrix() {
  return selected === "avg" ? data.average : data.weights[data.heads.indexOf(Number(selected))];
}

function label(token, max = 10) {
  const text = visible(token.text) || "∅";
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function fillSelects() {
  if (layerSelect.options.length !== data.n_layers) {
    layerSelect.replaceChildren(
      ...Array.from({ length: data.n_layers }, (_, i) => new Option(`${i}`, String(i))),
    );
  }
  layerSelect.value = String(data.layer);
  if (headSelect.options.length !== data.n_heads + 1) {
    headSelect.replaceChildren(
      new Option("average of heads", "avg"),
      ...Array.from({ length: data.n_heads }, (_, i) => new Option(`head ${i}`, String(i))),
    );
  }
  headSelect.value = String(selected);
}

function drawHeatmap() {
  const m = matrix();
  const tokens = data.tokens;
  const n = tokens.length;
  const plot = $("att-heatmap");
  const size = 520;
  const cell = size / n;
  const showLabels = cell >= 9;
  const margin = showLabels ? 92 : 8;
  const fontSize = Math.min(13, Math.max(8, cell * 0.6));
  plot.setAttribute("viewBox", `0 0 ${size + margin + 8} ${size + margin + 8}`);
  plot.replaceChildren();
  const grid = svg("g", { transform: `translate(${margin},${margin})` });
  grid.append(svg("rect", { x: 0, y: 0, width: size, height: size, class: "heatmap-bg" }));
  for (let q = 0; q < n; q++) {
    for (let k = 0; k <= q; k++) {
      grid.append(
        svg("rect", {
          x: k * cell, y: q * cell, width: cell + 0.3, height: cell + 0.3,
          fill: shade(m[q][k]), "data-q": q, "data-k": k, class: "cell",
        }),
      );
    }
  }
  grid.append(svg("rect", { x: 0, y: 0, width: size, height: cell, class: "row-outline", id: "att-row", visibility: "hidden" }));
  plot.append(grid);
  if (showLabels) {
    tokens.forEach((token, i) => {
      plot.append(svg("text", {
        x: margin - 6, y: margin + (i + 0.5) * cell, class: "axis-label", "text-anchor": "end",
        "dominant-baseline": "middle", "font-size": fontSize, "data-q": i,
      }, label(token)));
      const x = margin + (i + 0.5) * cell;
      plot.append(svg("text", {
        x, y: margin - 6, class: "axis-label", "text-anchor": "start", "font-size": fontSize,
        transform: `rotate(-60 ${x} ${margin - 6})`,
      }, label(token)));
    });
  }
  plot.dataset.cells = String(grid.querySelectorAll(".cell").length);
}

function drawStrip() {
  const strip = $("att-strip");
  strip.replaceChildren(...data.tokens.map((token, i) => {
    const chip = tokenChip(token, i);
    chip.classList.add("tok-plain");
    chip.dataset.q = i;
    return chip;
  }));
}

// Light up what query token `q` attends to, in the strip and on the heatmap.
function highlight(q) {
  const chips = $("att-strip").children;
  const row = $("att-row");
  if (q === null) {
    for (const chip of chips) {
      chip.style.background = "";
      chip.classList.remove("tok-query");
    }
    row?.setAttribute("visibility", "hidden");
    $("att-readout").textContent = "\u00a0";
    return;
  }
  const weights = matrix()[q];
  for (let k = 0; k < chips.length; k++) {
    chips[k].style.background = k <= q ? shade(weights[k]) : "";
    chips[k].classList.toggle("tok-query", k === q);
    chips[k].classList.toggle("tok-light", k <= q && weights[k] > 0.35);
  }
  if (row) {
    const cell = 520 / data.tokens.length;
    row.setAttribute("y", String(q * cell));
    row.setAttribute("height", String(cell));
    row.setAttribute("visibility", "visible");
  }
  let best = 0;
  for (let k = 1; k <= q; k++) if (weights[k] > weights[best]) best = k;
  $("att-readout").textContent =
    `“${visible(data.tokens[q].text)}” attends most to “${visible(data.tokens[best].text)}” (${weights[best].toFixed(3)})`;
}

function drawHeads() {
  const grid = $("att-heads");
  const items = [["avg", data.average], ...data.heads.map((h, i) => [String(h), data.weights[i]])];
  grid.replaceChildren(...items.map(([key, m]) => {
    const button = el("button", `head-thumb${String(selected) === key ? " active" : ""}`);
    button.type = "button";
    button.dataset.head = key;
    const canvas = document.createElement("canvas");
    const px = 84;
    canvas.width = px;
    canvas.height = px;
    const ctx = canvas.getContext("2d");
    const n = m.length;
    const cell = px / n;
    for (let q = 0; q < n; q++) {
      for (let k = 0; k <= q; k++) {
        ctx.fillStyle = shade(m[q][k]);
        ctx.fillRect(k * cell, q * cell, Math.ceil(cell), Math.ceil(cell));
      }
    }
    button.append(canvas, el("span", "", key === "avg" ? "average" : `head ${key}`));
    button.addEventListener("click", () => choose(key));
    return button;
  }));
}

function choose(head) {
  selected = head;
  headSelect.value = String(head);
  render();
}

function render() {
  fillSelects();
  const which = selected === "avg" ? "average of heads" : `head ${selected}`;
  $("att-title").textContent = `Layer ${data.layer} of ${data.n_layers} · ${which}`;
  $("att-model").textContent = `${data.model} · ${data.tokens.length} tokens · ${data.n_heads} heads`;
  drawStrip();
  drawHeatmap();
  drawHeads();
  $("att-card").hidden = false;
  highlight(pinned !== null && pinned < data.tokens.length ? pinned : null);
}

async function load() {
  await busy($("att-run"), "Loading…", async () => {
    const layer = Number(layerSelect.value || 0);
    data = await api("/api/v1/lab/attention", {
      method: "POST",
      body: { text: $("att-text").value, layer },
    });
    pinned = null;
    render();
  });
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
layerSelect.addEventListener("change", load);
headSelect.addEventListener("change", () => choose(headSelect.value));
for (const area of [$("att-heatmap"), $("att-strip")]) {
  area.addEventListener("mouseover", (event) => {
    const q = event.target.closest("[data-q]")?.dataset.q;
    if (q !== undefined) highlight(Number(q));
  });
  area.addEventListener("mouseleave", () => highlight(pinned));
  area.addEventListener("click", (event) => {
    const q = event.target.closest("[data-q]")?.dataset.q;
    pinned = q === undefined ? null : Number(q);
    highlight(pinned);
  });
}

load().finally(() => markReady("ready"));
