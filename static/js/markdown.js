// Model answers as Markdown, through pinned copies of well-kept libraries (static/vendor/,
// refreshed by .ci/vendor-web): markdown-it parses (CommonMark + GFM tables), highlight.js
// colours fenced code, DOMPurify sanitizes what comes out. The page loads them as classic
// scripts before its module (templates/chat.html), so they are globals here.
//
// Three walls keep an answer's HTML inert: markdown-it runs with raw HTML off (tags in an
// answer come out as text) and links only to http(s) and mailto; DOMPurify then keeps only the
// tags and attributes Markdown makes; and the page's CSP (script-src 'self') would stop inline
// code that got past both.

import { icon } from "./icons.js";

const ALLOWED_TAGS = [
  "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "ol", "p",
  "pre", "s", "span", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul",
];
const ALLOWED_ATTR = ["href", "class", "start", "target", "rel"];
const SAFE_URL = /^(https?:\/\/|mailto:)/i;
const ALIGN = /text-align:\s*(left|center|right)/;

const md = window.markdownit({
  html: false,
  linkify: true,
  breaks: true, // a model's single newlines are meant as line breaks
  highlight: highlightCode,
});
md.validateLink = (url) => SAFE_URL.test(url.trim());
// An image would load from wherever the answer says (the CSP blocks it, but loudly): images stay text.
md.disable("image");

function highlightCode(code, lang) {
  const hljs = window.hljs;
  if (!lang || !hljs || !hljs.getLanguage(lang)) return ""; // markdown-it escapes it
  const html = hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
  return `<pre><code class="hljs language-${md.utils.escapeHtml(lang)}">${html}</code></pre>`;
}

// markdown-it aligns table cells with style attributes, which the CSP (style-src 'self') refuses:
// a class does the same from app.css.
for (const rule of ["th_open", "td_open"]) {
  md.renderer.rules[rule] = (tokens, idx, options, env, self) => {
    const token = tokens[idx];
    const align = (token.attrGet("style") || "").match(ALIGN);
    if (token.attrs) token.attrs = token.attrs.filter(([name]) => name !== "style");
    if (align) token.attrJoin("class", `align-${align[1]}`);
    return self.renderToken(tokens, idx, options);
  };
}

const purify = window.DOMPurify;
const PURIFY = { ALLOWED_TAGS, ALLOWED_ATTR, ALLOW_DATA_ATTR: false, ALLOW_ARIA_ATTR: false, RETURN_DOM_FRAGMENT: true };

// The answer as sanitized nodes. A link markdown-it let through to an unsafe URL (it should
// let none) loses its link and keeps its text.
function sanitized(source) {
  const fragment = purify.sanitize(md.render(String(source ?? "")), PURIFY);
  for (const a of fragment.querySelectorAll("a")) {
    const href = a.getAttribute("href");
    if (href === null || !SAFE_URL.test(href.trim())) {
      a.replaceWith(...a.childNodes);
    } else {
      a.setAttribute("target", "_blank");
      a.setAttribute("rel", "noopener noreferrer nofollow");
    }
  }
  return fragment;
}

// Sanitized HTML for `source`.
export function renderMarkdown(source) {
  const holder = document.createElement("div");
  holder.append(sanitized(source));
  return holder.innerHTML;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Served over plain http to another machine, the page is no secure context and has no
  // clipboard API: the old selection-and-copy way still works there.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  if (!ok) throw new Error("copy refused");
}

// A button that copies what `getText` returns, then says so for a moment.
export function copyButton(label, getText) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "icon-btn copy";
  button.title = label;
  button.setAttribute("aria-label", label);
  button.append(icon("copy"));
  button.addEventListener("click", async () => {
    try {
      await copyText(getText());
      button.dataset.copied = "true";
      button.replaceChildren(icon("check"));
      setTimeout(() => {
        delete button.dataset.copied;
        button.replaceChildren(icon("copy"));
      }, 1500);
    } catch {
      button.title = "Copying was refused by the browser";
    }
  });
  return button;
}

// Render `source` into `element`, each code block with its copy button.
export function renderMarkdownInto(element, source) {
  element.replaceChildren(sanitized(source));
  for (const pre of element.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    const block = document.createElement("div");
    block.className = "code-block";
    const lang = code && [...code.classList].find((c) => c.startsWith("language-"));
    const bar = document.createElement("div");
    bar.className = "code-bar";
    const name = document.createElement("span");
    name.className = "code-lang";
    name.textContent = lang ? lang.slice("language-".length) : "code";
    // markdown-it ends a block's text with its closing newline, which a pasted snippet does not want.
    bar.append(name, copyButton("Copy code", () => (code || pre).textContent.replace(/\n$/, "")));
    pre.replaceWith(block);
    block.append(bar, pre);
  }
}
