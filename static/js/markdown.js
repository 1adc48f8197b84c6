// A small, safe Markdown renderer for model answers.
//
// Safety comes from the order of work: every piece of the source is HTML-escaped *before*
// any markup is added, and the only markup added is a fixed set of tags whose attributes we
// write ourselves (links only for http:, https: and mailto: URLs). So "<script>", "onerror="
// or "javascript:" in an answer come out as text. The page's CSP (script-src 'self') is a
// second wall: even injected inline code would not run.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const MAX_DEPTH = 6;

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// `url` is already escaped; only absolute web and mail links are kept.
function safeUrl(url) {
  return /^(https?:\/\/|mailto:)[^\s]*$/i.test(url) ? url : null;
}

// Inline markup on one escaped line: code spans, links, bold, italics, strikethrough.
// Finished pieces are held behind NUL-delimited placeholders (renderMarkdown strips NULs from
// the source, so only ours exist) to keep later passes out of them.
const PLACEHOLDER = /\u0000(\d+)\u0000/g;

function inline(escaped) {
  const held = [];
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  let text = escaped.replace(/`([^`\n]+)`/g, (_, code) => hold(`<code>${code}</code>`));
  text = text.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, url) => {
    // A code span inside the URL makes it no link: its markup must never land in href.
    const href = url.includes("\u0000") ? null : safeUrl(url);
    if (!href) return whole;
    return hold(`<a href="${href}" target="_blank" rel="noopener noreferrer nofollow">${emphasis(label)}</a>`);
  });
  text = emphasis(text);
  // A held link may hold a code span ("[`x`](https://...)"), so restoring recurses; a piece
  // only ever holds pieces made before it, so this ends.
  const restore = (html) => html.replace(PLACEHOLDER, (_, i) => restore(held[Number(i)]));
  return restore(text);
}

function emphasis(text) {
  return text
    .replace(/\*\*(?=\S)([^*\n]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/__(?=\S)([^_\n]*?\S)__/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*(?=\S)([^*\n]*?\S)\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(?=\S)([^_\n]*?\S)_(?![_\w])/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([^~\n]*?\S)~~/g, "<del>$1</del>");
}

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?/;
const BULLET = /^\s{0,3}[-*+]\s+/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+/;

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || BULLET.test(line) || NUMBERED.test(line);
}

function renderBlocks(lines, depth) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      // A fence still open (an answer mid-stream) runs to the end of the text.
      const fence = m[1];
      const lang = m[2];
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
      i += 1;
      const cls = lang ? ` class="language-${escapeHtml(lang)}"` : "";
      out.push(`<pre><code${cls}>${escapeHtml(body.join("\n"))}</code></pre>`);
    } else if (!line.trim()) {
      i += 1;
    } else if ((m = line.match(HEADING))) {
      const level = m[1].length;
      out.push(`<h${level}>${inline(escapeHtml(m[2]))}</h${level}>`);
      i += 1;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i += 1;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(QUOTE, ""));
      const inner = depth < MAX_DEPTH ? renderBlocks(quoted, depth + 1) : `<p>${inline(escapeHtml(quoted.join(" ")))}</p>`;
      out.push(`<blockquote>${inner}</blockquote>`);
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const ordered = !BULLET.test(line);
      const marker = ordered ? NUMBERED : BULLET;
      const items = [];
      while (i < lines.length && marker.test(lines[i])) {
        let item = lines[i++].replace(marker, "");
        // Indented lines continue the item.
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !marker.test(lines[i])) item += " " + lines[i++].trim();
        items.push(`<li>${inline(escapeHtml(item))}</li>`);
      }
      const start = ordered ? Number(line.match(NUMBERED)[1]) : 1;
      const attr = ordered && start !== 1 ? ` start="${start}"` : "";
      out.push(ordered ? `<ol${attr}>${items.join("")}</ol>` : `<ul>${items.join("")}</ul>`);
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() && !(para.length && startsBlock(lines[i]))) para.push(lines[i++]);
      out.push(`<p>${para.map((l) => inline(escapeHtml(l))).join("<br>")}</p>`);
    }
  }
  return out.join("\n");
}

export function renderMarkdown(source) {
  const text = String(source ?? "").replace(/\r\n?/g, "\n").replace(/\u0000/g, "");
  return renderBlocks(text.split("\n"), 0);
}
