// Embeddings: POST /api/v1/lab/embeddings and draw the 2-D PCA projection as an SVG scatter plot.

import { $, api, busy, markReady, svg, visible } from "./common.js";

const PALETTE = ["#4f46e5", "#db2777", "#059669", "#d97706", "#0891b2", "#7c3aed", "#dc2626", "#65a30d"];

// One group per line, words separated by commas.
function parse(text) {
  const words = [];
  const groups = [];
  text.split("\n").map((line) => line.split(",").map((w) => w.trim()).filter(Boolean)).filter((line) => line.length)
    .forEach((line, g) => {
      for (const word of line) {
        words.push(word);
        groups.push(g);
      }
    });
  return { words, groups };
}

// Greedy label placement: each label takes the first spot around its point (right, left, above,
// below, then further out) whose box overlaps no point and no label placed before it.
function placeLabels(points, W, H) {
  const charW = 7.6;
  const boxes = points.map(([x, y]) => [x - 6, y - 6, x + 6, y + 6]);
  const overlaps = (a) => boxes.some((b) => a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]);
  return points.map(([x, y, word]) => {
    const w = word.length * charW;
    const spots = [];
    for (const d of [0, 10, 20]) {
      spots.push([x + 9, y + 4 + d, "start"], [x + 9, y + 4 - d, "start"], [x - 9, y + 4 + d, "end"],
        [x - 9, y + 4 - d, "end"], [x, y - 10 - d, "middle"], [x, y + 18 + d, "middle"]);
    }
    const box = ([lx, ly, anchor]) => {
      const left = anchor === "start" ? lx : anchor === "end" ? lx - w : lx - w / 2;
      return [left, ly - 11, left + w, ly + 3];
    };
    const inside = (b) => b[0] >= 2 && b[2] <= W - 2 && b[1] >= 2 && b[3] <= H - 2;
    const spot = spots.find((s) => inside(box(s)) && !overlaps(box(s))) ?? spots[0];
    boxes.push(box(spot));
    return spot;
  });
}

function draw(data, groups) {
  const plot = $("emb-plot");
  const W = 760;
  const H = 480;
  const pad = 48;
  plot.setAttribute("viewBox", `0 0 ${W} ${H}`);
  plot.replaceChildren();
  const xs = data.points.map((p) => p.x);
  const ys = data.points.map((p) => p.y);
  const span = (v) => {
    const lo = Math.min(...v, 0);
    const hi = Math.max(...v, 0);
    const extra = (hi - lo || 1) * 0.08;
    return [lo - extra, hi + extra];
  };
  const [x0, x1] = span(xs);
  const [y0, y1] = span(ys);
  const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (W - 2 * pad);
  const sy = (y) => H - pad - ((y - y0) / (y1 - y0)) * (H - 2 * pad);

  plot.append(svg("rect", { x: pad, y: pad / 2, width: W - 2 * pad, height: H - 1.5 * pad, class: "plot-bg", rx: 8 }));
  plot.append(svg("line", { x1: sx(x0), x2: sx(x1), y1: sy(0), y2: sy(0), class: "axis" }));
  plot.append(svg("line", { x1: sx(0), x2: sx(0), y1: sy(y0), y2: sy(y1), class: "axis" }));
  const [r1, r2] = data.explained_variance;
  plot.append(svg("text", { x: W - pad, y: H - pad / 2 + 6, class: "axis-title", "text-anchor": "end" },
    `PC 1 · ${(r1 * 100).toFixed(1)}% of variance`));
  plot.append(svg("text", { x: pad / 2, y: pad / 2 - 6, class: "axis-title" },
    `PC 2 · ${(r2 * 100).toFixed(1)}%`));

  const labels = placeLabels(data.points.map((p) => [sx(p.x), sy(p.y), p.word]), W, H);
  data.points.forEach((p, i) => {
    const color = PALETTE[groups[i] % PALETTE.length];
    const g = svg("g", { class: "point" });
    const tokens = p.tokens.map((t) => visible(t.text)).join(" | ");
    g.append(svg("title", {}, `${p.word}: ${p.tokens.length} token${p.tokens.length > 1 ? "s" : ""} (${tokens}) · (${p.x.toFixed(3)}, ${p.y.toFixed(3)})`));
    g.append(svg("circle", { cx: sx(p.x), cy: sy(p.y), r: p.tokens.length > 1 ? 5 : 6, fill: color,
      stroke: color, "stroke-width": 2, class: p.tokens.length > 1 ? "multi" : "" }));
    const [lx, ly, anchor] = labels[i];
    g.append(svg("text", { x: lx, y: ly, class: "point-label", fill: color, "text-anchor": anchor }, p.word));
    plot.append(g);
  });
  plot.dataset.points = String(data.points.length);
}

async function run() {
  const { words, groups } = parse($("emb-words").value);
  await busy($("emb-run"), "Projecting…", async () => {
    const data = await api("/api/v1/lab/embeddings", {
      method: "POST",
      body: { words, leading_space: $("emb-space").checked },
    });
    $("emb-card").hidden = false;
    $("emb-model").textContent = `${data.model} · ${data.points.length} words`;
    const multi = data.points.filter((p) => p.tokens.length > 1).length;
    $("emb-note").textContent =
      `Each point is a word's input embedding (the mean of its tokens' rows when it takes several: ${multi} of ${data.points.length} here, drawn hollow). ` +
      `The two axes keep ${((data.explained_variance[0] + data.explained_variance[1]) * 100).toFixed(1)}% of how these vectors differ.`;
    draw(data, groups);
  });
}

$("emb-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run();
});
run().finally(() => markReady("ready"));
