// chat-render.js: model text into the page, safely, as it streams.
//
// Model text is only ever text: text nodes and `textContent`, never HTML.
// Fenced code blocks (``` at the start of a line, an optional language after
// it) become <pre><code>; everything else stays text (CSS white-space:
// pre-wrap keeps its line breaks). `splitFences` has no DOM, so Node tests it.

const FENCE = /^ {0,3}(```+|~~~+)[ \t]*([^\n`]*)$/;

/**
 * Splits text into text and fenced-code segments. An unclosed fence (the
 * answer is still streaming) runs to the end. The newline before an opening
 * fence and the one after a closing fence belong to the fence.
 *
 * @param {string} text
 * @returns {Array<{type: 'text', text: string} | {type: 'code', lang: string, text: string,
 *          closed: boolean}>}
 */
export function splitFences(text) {
  const segments = [];
  const lines = text.split('\n');
  let plain = [];
  let code = null; // {fence, lang, lines}
  const flushText = () => {
    if (plain.length) {
      const body = plain.join('\n');
      if (body) segments.push({ type: 'text', text: body });
    }
    plain = [];
  };
  for (const line of lines) {
    if (code) {
      const close = line.trim();
      if (close.startsWith(code.fence[0].repeat(code.fence.length)) && /^(`+|~+)$/.test(close)) {
        segments.push({ type: 'code', lang: code.lang, text: code.lines.join('\n'), closed: true });
        code = null;
        continue;
      }
      code.lines.push(line);
      continue;
    }
    const open = FENCE.exec(line);
    if (open) {
      flushText();
      code = { fence: open[1], lang: open[2].trim().split(/\s+/)[0] || '', lines: [] };
      continue;
    }
    plain.push(line);
  }
  if (code) {
    segments.push({ type: 'code', lang: code.lang, text: code.lines.join('\n'), closed: false });
  } else {
    flushText();
  }
  return segments;
}

/** Grows a text node to `text`: appends when it only grew (the streaming case). */
function setText(node, text) {
  if (node.data === text) return;
  if (text.startsWith(node.data)) node.appendData(text.slice(node.data.length));
  else node.data = text;
}

/**
 * Renders `text` into `element`, reusing what is already there: while a
 * stream grows the text, only the last node changes. `element` holds nothing
 * else.
 *
 * @param {Element} element
 * @param {string} text
 */
export function renderText(element, text) {
  const doc = element.ownerDocument;
  const segments = splitFences(text);
  segments.forEach((segment, i) => {
    const node = element.childNodes[i];
    if (segment.type === 'text') {
      if (node && node.nodeType === 3) return setText(node, segment.text);
      const fresh = doc.createTextNode(segment.text);
      if (node) element.replaceChild(fresh, node);
      else element.appendChild(fresh);
      return;
    }
    if (node && node.nodeName === 'PRE' && node.dataset.lang === segment.lang) {
      return setText(node.firstChild.firstChild, segment.text);
    }
    const pre = doc.createElement('pre');
    pre.className = 'code';
    pre.dataset.lang = segment.lang;
    const code = doc.createElement('code');
    code.appendChild(doc.createTextNode(segment.text));
    pre.appendChild(code);
    if (node) element.replaceChild(pre, node);
    else element.appendChild(pre);
  });
  while (element.childNodes.length > segments.length) element.lastChild.remove();
}
