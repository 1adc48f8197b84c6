// Icons are SVG files in static/icons/, drawn by app.css as a CSS mask so they take the text
// colour. Glyphs would need an emoji or symbol font that many machines lack (empty boxes).

// <span class="icon icon-NAME">, hidden from screen readers: the button around it has the label.
export function icon(name) {
  const span = document.createElement("span");
  span.className = `icon icon-${name}`;
  span.setAttribute("aria-hidden", "true");
  return span;
}
