// The server's HTTP API as the page uses it: JSON calls, the chat stream (fetch + SSE parsing), the API key.

const KEY = "streamllm.key";
let apiKey = localStorage.getItem(KEY) || "";

export function setKey(key, remember) {
  apiKey = key;
  // The key stays in this tab's memory unless the user asks to keep it in this browser.
  if (remember && key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

export const keyRemembered = () => localStorage.getItem(KEY) !== null;
export const currentKey = () => apiKey;

export class ApiError extends Error {
  constructor(status, error) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (error && error.code) || null;
  }
}

function headers() {
  const h = { "content-type": "application/json" };
  if (apiKey) h.authorization = `Bearer ${apiKey}`;
  return h;
}

async function failure(res) {
  const body = await res.json().catch(() => ({}));
  return new ApiError(res.status, body.error);
}

export async function call(method, path, body) {
  const res = await fetch(path, { method, headers: headers(), body: body && JSON.stringify(body) });
  if (!res.ok) throw await failure(res);
  return res.json();
}

/** The caller's session `id`, or null when the server has none. */
export async function session(id) {
  try {
    return await call("GET", `/v1/sessions/${encodeURIComponent(id)}`);
  } catch (e) {
    if (e.status === 404) return null;
    throw e;
  }
}

/** POST a streaming chat completion; `onText(delta)` per content delta. Resolves to
 * {finish, usage, ttft, seconds} (ms from the request to the first delta, s from it to the end). */
export async function streamChat(body, onText, signal) {
  const start = performance.now();
  const res = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!res.ok) throw await failure(res);
  const out = { finish: null, usage: null, ttft: null, seconds: 0 };
  let first = null;
  const event = (data) => {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(200, chunk.error); // an error after the stream began
    if (chunk.usage) out.usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return;
    if (choice.delta && choice.delta.content) {
      if (first === null) first = performance.now();
      onText(choice.delta.content);
    }
    if (choice.finish_reason) out.finish = choice.finish_reason;
  };
  await sseData(res.body, event);
  const end = performance.now();
  out.ttft = first === null ? null : first - start;
  out.seconds = first === null ? 0 : (end - first) / 1000;
  return out;
}

/** Calls `onData` with the payload of every `data:` line of an SSE body (lines end in \n, \r\n or \r). */
async function sseData(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const lines = buffer.split(/\r\n|\n|\r/);
    // The last piece may be a partial line: keep it for later. A \r\n split between two reads only
    // makes an extra empty line, which carries no data.
    buffer = done ? "" : lines.pop();
    for (const line of lines) {
      if (line.startsWith("data:")) onData(line.slice(5).trim());
    }
    if (done) return;
  }
}
