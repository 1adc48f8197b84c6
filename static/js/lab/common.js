// Shared pieces of the Lab pages: token chips, SVG helpers, colour scales and the error banner.

export { api, ApiError } from "../api.js";

export const $ = (id) => document.getElementById(id);

const SVG_NS = "http://www.w3.org/2000/svg";

// An SVG element with attributes; text content when `text` is given.
export function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Whitespace made visible, so " the" and "the" look different on a chip.
export function visible(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

export function hexBytes(hex) {
  return hex.match(/../g)?.join(" ") ?? "";
}

export function tokenTitle(token, extra = "") {
  const bytes = token.bytes_hex ? `bytes ${hexBytes(token.bytes_hex)}` : "no bytes";
  return `id ${token.id} · ${bytes}${token.special ? " · special token" : ""}${extra ? ` · ${extra}` : ""}`;
}

// A coloured chip for one token; `index` picks the colour so neighbours differ.
export function tokenChip(token, index, { showId = false, title = "" } = {}) {
  const chip = el("span", `tok tok-c${index % 8}${token.special ? " tok-special" : ""}`);
  chip.append(el("span", "tok-text", visible(token.text) || "∅"));
  if (showId) chip.append(el("span", "tok-id", String(token.id)));
  chip.title = tokenTitle(token, title);
  chip.dataset.id = token.id;
  return chip;
}

export function setBanner(text, kind = "error") {
  const banner = $("lab-banner");
  if (!banner) return;
  banner.textContent = text ?? "";
  banner.dataset.kind = kind;
  banner.hidden = !text;
}

export function percent(p, digits = 1) {
  if (p === null || p === undefined) return "–";
  if (p > 0 && p < 0.001) return "<0.1%";
  return `${(p * 100).toFixed(digits)}%`;
}

// Disable a button while `work` runs; errors go to the banner.
export async function busy(button, label, work) {
  // Calls can overlap (typing starts a new request before the last one answers): the idle
  // label is kept on the button, and only the last call to finish restores it.
  const running = Number(button.dataset.busy || 0);
  if (!running) button.dataset.idleLabel = button.textContent;
  button.dataset.busy = String(running + 1);
  button.disabled = true;
  button.textContent = label;
  try {
    setBanner("");
    return await work();
  } catch (err) {
    setBanner(err.detail || String(err));
    return undefined;
  } finally {
    const left = Number(button.dataset.busy) - 1;
    if (left) {
      button.dataset.busy = String(left);
    } else {
      delete button.dataset.busy;
      button.disabled = false;
      button.textContent = button.dataset.idleLabel;
    }
  }
}

// Accent colour with alpha `a` (0..1), for heatmap cells and highlights.
export function heat(a) {
  const alpha = Math.max(0, Math.min(1, a));
  return `rgba(79, 70, 229, ${alpha.toFixed(3)})`;
}

// Red (0) through amber to green (1), for the model's confidence in a token.
export function confidence(p, alpha = 1) {
  const hue = Math.round(120 * Math.max(0, Math.min(1, p)) ** 0.5);
  return `hsla(${hue}, 75%, 45%, ${alpha})`;
}

export function markReady(name) {
  document.body.dataset[name] = "true";
}
