// Pure rendering helpers of the chat page: elements, markdown-ish text, the cache bar.

export function node(tag, cls, text) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Markdown-ish: ``` fences become code blocks (the first line names the language), `x` inline code. */
export function renderText(el, text) {
  el.replaceChildren();
  text.split("```").forEach((part, i) => {
    if (i % 2 === 0) {
      part.split(/`([^`\n]+)`/).forEach((t, j) => el.append(j % 2 ? node("code", "", t) : t));
      return;
    }
    const nl = part.indexOf("\n");
    const code = node("code", "", nl < 0 ? part : part.slice(nl + 1));
    if (nl > 0) code.dataset.lang = part.slice(0, nl).trim();
    const pre = node("pre");
    pre.append(code);
    el.append(pre);
  });
}

export function fillBar(bar, s) {
  const [pinned, sinks, win] = bar.children;
  if (!s) {
    for (const seg of bar.children) seg.style.width = "0";
    bar.setAttribute("aria-label", "no turn yet");
    return;
  }
  const capacity = s.sink_tokens + s.window;
  const sinkFill = Math.min(s.cache_tokens, s.sink_tokens);
  const pin = Math.min(s.pinned_tokens, sinkFill);
  const fill = Math.max(0, s.cache_tokens - s.sink_tokens);
  const pct = (n) => `${(100 * n) / capacity}%`;
  pinned.style.width = pct(pin);
  sinks.style.width = pct(sinkFill - pin);
  win.style.width = pct(fill);
  bar.setAttribute(
    "aria-label",
    `${pin} pinned system-prompt tokens, ${sinkFill - pin} sink tokens, window ${fill} of ${s.window}, ` +
      `${s.evicted} evicted`,
  );
}

export const num = (n) => n.toLocaleString("en-US");
