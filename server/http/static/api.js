// The HTTP API as the playground calls it: JSON calls, and POST /v1/generate read as
// server-sent events with fetch() and a ReadableStream (EventSource cannot POST).

export class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

export class Api {
  constructor(key) { this.key = key; } // () => the API key typed in, or ""

  headers(extra) {
    const headers = Object.assign({}, extra);
    const key = this.key().trim();
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  // One call: a JSON body (or an ArrayBuffer, sent as bytes); the JSON reply, or the Response if `raw`.
  async call(method, path, body, raw) {
    const bytes = body instanceof ArrayBuffer;
    const type = bytes ? "application/octet-stream" : body !== undefined ? "application/json" : undefined;
    const init = { method, headers: this.headers(type ? { "Content-Type": type } : {}) };
    if (body !== undefined) init.body = bytes ? body : JSON.stringify(body);
    const response = await fetch(path, init);
    if (!response.ok) throw await failure(response);
    return raw ? response : response.json();
  }

  // Stream one Generate: onText(text) per event with characters; resolves with the last event's
  // data (finish_reason, counts). Aborting `signal` closes the connection: the server cancels.
  async generate(body, signal, onText) {
    const response = await fetch("/v1/generate", { method: "POST", signal, body: JSON.stringify(body),
      headers: this.headers({ "Content-Type": "application/json", Accept: "text/event-stream" }) });
    if (!response.ok) throw await failure(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new ApiError(0, "UNAVAILABLE", "the stream ended without a finish (server stopped?)");
      buffer += value;
      const blocks = buffer.split(/\r\n\r\n|\n\n|\r\r/); // an event ends at a blank line
      buffer = blocks.pop();
      for (const block of blocks) {
        const event = parseEvent(block);
        if (!event) continue;
        const [name, data] = event;
        if (name === "error") throw new ApiError(200, data.error.code, data.error.message);
        if (data.text) onText(data.text);
        if (data.finish_reason && data.finish_reason !== "FINISH_REASON_UNSPECIFIED") return data;
      }
    }
  }
}

// One event's lines: `event:` names it (default "message"), `data:` lines join with newlines.
function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split(/\r\n|\n|\r/)) {
    if (line.startsWith(":")) continue; // a comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value; else if (field === "data") data.push(value);
  }
  return data.length ? [name, JSON.parse(data.join("\n"))] : null;
}

async function failure(response) {
  let code = "HTTP_" + response.status, message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) { code = body.error.code; message = body.error.message; }
  } catch (ignored) { /* not the API's JSON error: keep the HTTP status */ }
  return new ApiError(response.status, code, message);
}
