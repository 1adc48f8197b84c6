// Talking to the service: JSON calls and Server-Sent Event streams, with the page's CSRF token.

const csrfToken = document.querySelector('meta[name="csrf-token"]')?.content ?? "";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

export const CONNECTION_LOST = "Connection lost: the server cannot be reached. Check that it is running and try again.";

function describe(body, status) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail) && detail.length) {
    return detail.map((e) => `${(e.loc || []).slice(1).join(".") || "request"}: ${e.msg}`).join("; ");
  }
  return `The server answered ${status}.`;
}

function headersFor(method, hasBody, accept = "application/json") {
  const headers = { Accept: accept };
  if (hasBody) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken;
  return headers;
}

async function send(path, method, body, signal, accept) {
  try {
    return await fetch(path, {
      method,
      headers: headersFor(method, body !== undefined, accept),
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, CONNECTION_LOST);
  }
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const response = await send(path, method, body, signal);
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, describe(data, response.status));
  return data;
}

function parseEvent(raw) {
  let event = "message";
  const data = [];
  for (const line of raw.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return null; // a comment or keep-alive
  try {
    return { event, data: JSON.parse(data.join("\n")) };
  } catch {
    return { event, data: data.join("\n") };
  }
}

// POST `body` to `path` (or GET it, with method "GET") and call onEvent(name, data) for each
// Server-Sent Event until the stream ends. A 204 is a stream with no events.
export async function streamEvents(path, body, { signal, onEvent, method = "POST" }) {
  const response = await send(path, method, body, signal, "text/event-stream");
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    throw new ApiError(response.status, describe(data, response.status));
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, CONNECTION_LOST);
    }
    if (chunk.done) break;
    buffer += chunk.value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const parsed = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (parsed) onEvent(parsed.event, parsed.data);
    }
  }
}
