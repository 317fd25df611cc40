// gateway-client.js: one browser API over the gateway's three transports.
//
//   import { stream, runAgent, ToolRegistry } from '/static/gateway-client.js';
//   const result = await stream({ transport: 'sse' | 'ws' | 'chunked', body, onToken, signal });
//
// Dependency-free ES module. Nothing here touches `window` or `document`, and
// browser globals (fetch, EventSource, WebSocket, location) are read only when
// a stream starts, so the parsers can be imported and tested in Node.
//
// Contract (see DESIGN.md): every stream is one event log, `start` (seq 0),
// then `token`, `reasoning` and `tool_call` events (one seq sequence), then
// one terminal `done` or `error`. A dropped connection is resumed from the
// last seq seen (SSE `Last-Event-ID`, NDJSON `?after=`, WebSocket `resume`),
// and events are de-duplicated by seq, so the text is never doubled nor
// lost. Aborting `signal` cancels the generation on the server (WebSocket
// `cancel`, else `DELETE /v1/generations/{id}`), waits for its
// `done{finish_reason: "cancelled"}` and resolves with it.
//
// `tool_call` fragments are assembled per `index` and handed over, with their
// arguments parsed, when `done{finish_reason: "tool_calls"}` completes them.
// `runAgent` runs the tool loop: it calls the app's tool functions and goes
// on with the conversation (OpenAI's `tools` / `messages` shapes) until the
// model answers in text, up to `maxSteps` model calls.
//
// `stopChat(options, chatId)` is the explicit stop for the AI SDK UI message
// stream route (`POST /v1/stream/ui`, what `useChat` talks to): `DELETE
// /v1/stream/ui/{chatId}/stream` cancels the chat's running generation and
// resolves `true`, or `false` when nothing was running. `useChat`'s `stop()`
// only aborts its fetch, which the server cannot tell from a dropped
// connection (that one may be resumed), so call both:
//
//   const { stop } = useChat({ id: chatId, transport, resume: true });
//   const onStop = () => { stop(); stopChat({ baseUrl, token }, chatId); };
//
// As a package (types in gateway-client.d.ts): `npm install
// <repo>/gateway/static`, then `import { stream, stopChat } from 'gateway-client'`.

const DEFAULTS = {
  baseUrl: '',
  maxAttempts: 8, // reconnects in a row without receiving an event
  baseDelayMs: 250,
  maxDelayMs: 5000,
  cancelTimeoutMs: 3000, // how long to wait for the server's done{cancelled}
  wsIdleMs: 30000, // a shared WebSocket with no stream left closes after this
};
/** How many model calls `runAgent` makes at most, tool round trips included. */
const DEFAULT_MAX_STEPS = 5;

export class GatewayError extends Error {
  /**
   * @param {string} code contract error code, or `connection_lost` / `connection_failed` /
   *        `bad_event`, or (runAgent) `too_many_steps`
   * @param {string} message
   * @param {{retryable?: boolean, status?: number|null, event?: object|null}} [info]
   */
  constructor(code, message, { retryable = false, status = null, event = null } = {}) {
    super(message);
    this.name = 'GatewayError';
    this.code = code;
    this.retryable = retryable;
    this.status = status;
    this.event = event;
    /** The text received before the failure (set by `stream`). */
    this.text = '';
    this.generationId = null;
  }
}

// ---------------------------------------------------------------- parsers --

/**
 * A Server-Sent Events parser per the WHATWG HTML spec ("Parsing an event
 * stream"): lines end with CRLF, LF or CR (also when a CRLF is split across
 * chunks), `:` starts a comment, `data:` lines join with "\n", `id:` (without
 * NUL) sets the last event id, which persists, `retry:` takes ASCII digits
 * only, one space after the colon is dropped, a blank line dispatches, an
 * event without data is not dispatched, an unterminated event at the end is
 * discarded. Bytes are decoded as streaming UTF-8 (a character may be split
 * across chunks); a leading BOM is dropped.
 *
 * @param {{onEvent?: (ev: {type: string, data: string, id: string}) => void,
 *          onRetry?: (ms: number) => void, onComment?: (text: string) => void}} [handlers]
 * @returns {{push(chunk: string|Uint8Array): Array<{type: string, data: string, id: string}>,
 *            end(): Array<object>, readonly lastEventId: string, readonly retry: number|null}}
 */
export function createSSEParser(handlers = {}) {
  const decoder = new TextDecoder('utf-8');
  let buffer = ''; // an unterminated line (contains no CR or LF)
  let skipLF = false; // the previous chunk ended with CR: a leading LF belongs to it
  let first = true;
  let data = [];
  let type = '';
  let lastEventId = '';
  let retry = null;

  function dispatch(out) {
    if (data.length === 0) {
      type = '';
      return;
    }
    const event = { type: type || 'message', data: data.join('\n'), id: lastEventId };
    data = [];
    type = '';
    out.push(event);
    if (handlers.onEvent) handlers.onEvent(event);
  }

  function line(text, out) {
    if (text === '') return dispatch(out);
    if (text.charCodeAt(0) === 58 /* : */) {
      if (handlers.onComment) handlers.onComment(text.slice(1));
      return;
    }
    const colon = text.indexOf(':');
    let field = text;
    let value = '';
    if (colon >= 0) {
      field = text.slice(0, colon);
      value = text.slice(colon + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1);
    }
    if (field === 'data') data.push(value);
    else if (field === 'event') type = value;
    else if (field === 'id') {
      if (!value.includes('\0')) lastEventId = value;
    } else if (field === 'retry') {
      if (/^[0-9]+$/.test(value)) {
        retry = Number(value);
        if (handlers.onRetry) handlers.onRetry(retry);
      }
    } // any other field is ignored
  }

  function feed(text) {
    const out = [];
    if (text.length === 0) return out;
    if (first) {
      first = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (skipLF) {
      skipLF = false;
      if (text.charCodeAt(0) === 10) text = text.slice(1);
    }
    const s = buffer + text;
    let start = 0;
    for (let i = buffer.length; i < s.length; i++) {
      const c = s.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      line(s.slice(start, i), out);
      if (c === 13) {
        if (i + 1 === s.length) skipLF = true;
        else if (s.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    buffer = s.slice(start);
    return out;
  }

  return {
    push(chunk) {
      const text = typeof chunk === 'string' ? chunk : decoder.decode(chunk, { stream: true });
      // TextDecoder drops a BOM itself; for strings we do it in feed().
      if (typeof chunk !== 'string' && first && text.length > 0) first = false;
      return feed(text);
    },
    /** End of stream: flush the decoder; an unterminated event is discarded (spec). */
    end() {
      const rest = decoder.decode();
      const out = rest ? feed(rest) : [];
      buffer = '';
      data = [];
      type = '';
      return out;
    },
    get lastEventId() {
      return lastEventId;
    },
    get retry() {
      return retry;
    },
  };
}

/**
 * Splits an NDJSON byte or text stream into parsed values: lines may be split
 * anywhere across chunks (also inside a UTF-8 character), `\r\n` is accepted,
 * blank lines (the gateway's heartbeats) are skipped. A line that is not JSON
 * throws a SyntaxError naming it.
 *
 * @param {{onValue?: (value: any) => void}} [handlers]
 * @returns {{push(chunk: string|Uint8Array): any[], end(): any[]}}
 */
export function createNDJSONSplitter(handlers = {}) {
  const decoder = new TextDecoder('utf-8');
  let buffer = '';

  function parse(text, out) {
    if (text.endsWith('\r')) text = text.slice(0, -1);
    if (text.trim() === '') return;
    let value;
    try {
      value = JSON.parse(text);
    } catch (err) {
      throw new SyntaxError(`NDJSON: not a JSON line: ${JSON.stringify(text.slice(0, 80))}`, {
        cause: err,
      });
    }
    out.push(value);
    if (handlers.onValue) handlers.onValue(value);
  }

  function feed(text) {
    const out = [];
    let start = 0;
    let searchFrom = buffer.length;
    const s = buffer + text;
    for (;;) {
      const nl = s.indexOf('\n', searchFrom);
      if (nl < 0) break;
      parse(s.slice(start, nl), out);
      start = nl + 1;
      searchFrom = start;
    }
    buffer = s.slice(start);
    return out;
  }

  return {
    push(chunk) {
      return feed(typeof chunk === 'string' ? chunk : decoder.decode(chunk, { stream: true }));
    },
    /** Clean end of stream: a last line without a newline is still a value. */
    end() {
      const out = feed(decoder.decode());
      const rest = buffer;
      buffer = '';
      parse(rest, out);
      return out;
    },
  };
}

// ------------------------------------------------------------- tool calls --

/**
 * Parses a tool call's JSON arguments: `{args}` (an empty string is `{}`), or
 * `{error}` when they are not JSON or not an object.
 *
 * @param {string} text
 * @returns {{args: object, error?: undefined} | {args?: undefined, error: string}}
 */
export function parseToolArguments(text) {
  if (text === undefined || text === null || String(text).trim() === '') return { args: {} };
  let args;
  try {
    args = JSON.parse(text);
  } catch (err) {
    const start = String(text).slice(0, 80);
    return { error: `the arguments are not valid JSON (${err.message}): ${start}` };
  }
  if (args === null || typeof args !== 'object' || Array.isArray(args)) {
    return { error: `the arguments are not a JSON object: ${String(text).slice(0, 80)}` };
  }
  return { args };
}

/**
 * Assembles `tool_call` event fragments per `index`: `id` and `name` come on
 * the first fragment of an index, the `arguments` fragments concatenate to
 * the call's JSON arguments. Fragments of several calls may interleave.
 *
 * A call so far is `{index, id, name, arguments}` (`id`, `name` null until
 * seen); `finish()` gives the complete calls with `args` (parsed) or `error`.
 *
 * @returns {{push(ev: object): object, readonly calls: object[], readonly size: number,
 *            finish(): Array<{index: number, id: string, name: string|null, arguments: string,
 *                             args?: object, error?: string}>}}
 */
export function createToolCallAssembler() {
  const calls = new Map(); // index -> the call so far
  const sorted = () => [...calls.values()].sort((a, b) => a.index - b.index);
  return {
    /** Take one fragment; returns a copy of its call as assembled so far. */
    push(ev) {
      const index = Number.isInteger(ev.index) ? ev.index : 0;
      let call = calls.get(index);
      if (!call) {
        call = { index, id: null, name: null, arguments: '' };
        calls.set(index, call);
      }
      if (ev.id && !call.id) call.id = String(ev.id);
      if (ev.name && !call.name) call.name = String(ev.name);
      if (typeof ev.arguments === 'string') call.arguments += ev.arguments;
      return { ...call };
    },
    get calls() {
      return sorted().map((call) => ({ ...call }));
    },
    get size() {
      return calls.size;
    },
    /** The complete calls, in index order, with their arguments parsed (`args`) or an `error`. */
    finish() {
      return sorted().map((call) => {
        const parsed = call.name
          ? parseToolArguments(call.arguments)
          : { error: 'the tool call has no function name' };
        return { ...call, id: call.id || `call_${call.index}`, ...parsed };
      });
    },
  };
}

// ---------------------------------------------------------------- helpers --

function sleep(ms, signal) {
  // Resolves early when `signal` aborts: the caller then goes on to cancel.
  return new Promise((resolve) => {
    if (signal && signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', done);
      resolve();
    }
    if (signal) signal.addEventListener('abort', done, { once: true });
  });
}

function backoff(attempt, o) {
  const ceiling = Math.min(o.maxDelayMs, o.baseDelayMs * 2 ** Math.max(0, attempt - 1));
  return ceiling * (0.5 + Math.random() / 2); // "equal jitter"
}

async function resolveToken(token) {
  const value = typeof token === 'function' ? await token() : token;
  return value ? String(value) : '';
}

function absoluteBase(baseUrl) {
  const here = globalThis.location && globalThis.location.href;
  if (!baseUrl) {
    if (!here) throw new TypeError('baseUrl is required outside a browser page');
    return new URL('/', here).href;
  }
  return new URL(baseUrl.endsWith('/') ? baseUrl : `${baseUrl}/`, here || undefined).href;
}

function urlFor(o, path, query) {
  const url = new URL(path.replace(/^\//, ''), absoluteBase(o.baseUrl));
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== '') {
      url.searchParams.set(name, String(value));
    }
  }
  return url.href;
}

async function authHeaders(o, extra) {
  const headers = { ...(o.headers || {}), ...extra };
  const token = await resolveToken(o.token);
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

/**
 * The credential for a GET URL (EventSource, WebSocket): a stream ticket, never a
 * key or JWT, which the gateway refuses in URLs (they end up in proxy logs).
 * `options.ticket` if given; else, with a `token`, a fresh ticket minted with it
 * (`POST /v1/tickets`, one per open, so single-use tickets work too). A token
 * that may not mint (401) is a ticket itself, and is used as it is.
 */
async function urlCredential(o) {
  if (o.ticket !== undefined && o.ticket !== null) return resolveToken(o.ticket);
  const token = await resolveToken(o.token);
  if (!token) return ''; // anonymous, or a cookie
  const response = await fetch(urlFor(o, '/v1/tickets'), {
    ...fetchInit(o),
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
  });
  if (response.status === 401) return token;
  if (!response.ok) throw await httpError(response);
  const minted = await response.json().catch(() => null);
  if (!minted || typeof minted.ticket !== 'string') {
    throw new GatewayError('bad_event', 'POST /v1/tickets answered without a ticket');
  }
  return minted.ticket;
}

function fetchInit(o) {
  return { credentials: o.withCredentials ? 'include' : 'same-origin', cache: 'no-store' };
}

async function httpError(response) {
  let code = 'http_error';
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // not our JSON error body
  }
  const retryable = response.status === 429 || response.status >= 500;
  return new GatewayError(code, message, { retryable, status: response.status });
}

function errorFromEvent(ev) {
  return new GatewayError(ev.code || 'internal_error', ev.message || 'stream failed', {
    retryable: !!ev.retryable,
    event: ev,
  });
}

let requestCounter = 0;
function newRequestId() {
  requestCounter += 1;
  return `r${requestCounter}-${Math.random().toString(36).slice(2, 8)}`;
}

// ------------------------------------------------------------------- a run --

/** One generation as this client sees it: de-duplication by seq, text so far, end. */
class Run {
  constructor(o) {
    this.o = o;
    this.generationId = null;
    this.lastSeq = -1;
    this.text = '';
    this.reasoning = '';
    this.tokens = 0;
    this.events = 0;
    this.assembler = createToolCallAssembler();
    this.toolCalls = []; // complete calls, set by done{tool_calls}
    this.resumes = 0;
    this.terminal = null;
    this.failure = null;
    this.cancelRequested = false;
    this.onCancel = null; // set by the transport
    this.cleanups = [];
    this.settled = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
  }

  get over() {
    return this.terminal !== null || this.failure !== null;
  }

  status(state, info) {
    if (this.o.onStatus) this.o.onStatus(state, info || {});
  }

  /** Take one event; false if it is a duplicate (already seen) or arrives after the end. */
  accept(ev) {
    if (this.over) return false;
    if (typeof ev.seq === 'number') {
      if (ev.seq <= this.lastSeq) return false;
      this.lastSeq = ev.seq;
    }
    if (!this.generationId && ev.generation_id) this.generationId = ev.generation_id;
    this.events += 1;
    if (this.o.onEvent) this.o.onEvent(ev);
    if (ev.type === 'token') {
      this.text += ev.text;
      this.tokens += 1;
      if (this.o.onToken) this.o.onToken(ev.text, ev);
    } else if (ev.type === 'reasoning') {
      this.reasoning += ev.text;
      if (this.o.onReasoning) this.o.onReasoning(ev.text, ev);
    } else if (ev.type === 'tool_call') {
      const call = this.assembler.push(ev);
      if (this.o.onToolCallDelta) this.o.onToolCallDelta(call, ev);
    } else if (ev.type === 'done' || ev.type === 'error') {
      if (ev.type === 'done' && ev.finish_reason === 'tool_calls') {
        // The calls are complete only now: their arguments can be parsed.
        this.toolCalls = this.assembler.finish();
        if (this.o.onToolCall) for (const call of this.toolCalls) this.o.onToolCall(call, ev);
      }
      this.terminal = ev;
      this._resolve();
    }
    return true;
  }

  /** End without the server's word (a cancel it did not confirm in time). */
  finishLocal(reason) {
    if (this.over) return;
    this.terminal = { type: 'done', finish_reason: reason, local: true };
    this._resolve();
  }

  fail(err) {
    if (this.over) return;
    this.failure = err;
    this._reject(err);
  }

  cancel() {
    if (this.over || this.cancelRequested) return;
    this.cancelRequested = true;
    this.status('cancelling');
    if (this.onCancel) this.onCancel();
    else this.finishLocal('cancelled');
  }
}

/**
 * HTTP cancel: `DELETE /v1/generations/{id}` (the server then ends the stream
 * with done{cancelled}, which counts as a cancel); if that does not arrive
 * within `cancelTimeoutMs`, drop the connection and end locally.
 */
function cancelOverHttp(run, dropConnection) {
  const o = run.o;
  if (!run.generationId) {
    dropConnection();
    run.finishLocal('cancelled');
    return;
  }
  const timer = setTimeout(() => {
    dropConnection();
    run.finishLocal('cancelled');
  }, o.cancelTimeoutMs);
  run.settled.then(
    () => clearTimeout(timer),
    () => clearTimeout(timer),
  );
  deleteGeneration(o, run.generationId).catch(() => {});
}

/** `DELETE /v1/generations/{id}`: cancel a generation (204; idempotent once ended). */
export async function deleteGeneration(options, generationId) {
  const o = { ...DEFAULTS, ...options };
  const url = urlFor(o, `/v1/generations/${encodeURIComponent(generationId)}`);
  const response = await fetch(url, {
    ...fetchInit(o),
    method: 'DELETE',
    headers: await authHeaders(o, {}),
  });
  if (!response.ok && response.status !== 404) throw await httpError(response);
}

/**
 * `DELETE /v1/stream/ui/{chatId}/stream`: stop the AI SDK UI stream chat's running
 * generation (the explicit stop that `useChat`'s `stop()`, a mere fetch abort, cannot
 * express). Resolves `true` when a running generation was cancelled (200, with
 * `{"cancelled": true, "generation_id": …}`), `false` when the chat had nothing running
 * (204); any other answer rejects with a GatewayError carrying the gateway's error code.
 *
 * @param {{baseUrl?: string, token?: string|(() => string|Promise<string>),
 *          headers?: Record<string, string>, withCredentials?: boolean}} options
 * @param {string} chatId the `id` the chat was posted with (`useChat({id})`)
 * @returns {Promise<boolean>}
 */
export async function stopChat(options, chatId) {
  if (typeof chatId !== 'string' || chatId === '') {
    throw new TypeError('stopChat: chatId must be a non-empty string');
  }
  const o = { ...DEFAULTS, ...options };
  const url = urlFor(o, `/v1/stream/ui/${encodeURIComponent(chatId)}/stream`);
  const response = await fetch(url, {
    ...fetchInit(o),
    method: 'DELETE',
    headers: await authHeaders(o, { Accept: 'application/json' }),
  });
  if (!response.ok) throw await httpError(response);
  if (response.status === 204) return false;
  const body = await response.json().catch(() => null);
  return body && typeof body.cancelled === 'boolean' ? body.cancelled : true;
}

/** `GET /v1/models` → list of model ids. */
export async function listModels(options = {}) {
  const o = { ...DEFAULTS, ...options };
  const response = await fetch(urlFor(o, '/v1/models'), {
    ...fetchInit(o),
    headers: await authHeaders(o, { Accept: 'application/json' }),
  });
  if (!response.ok) throw await httpError(response);
  const body = await response.json();
  return (body.data || []).map((m) => m.id);
}

// ------------------------------------------------- HTTP: NDJSON, SSE POST --

class Dropped extends Error {}

function httpRequest(run, wire, o) {
  const body = JSON.stringify(o.body);
  if (wire === 'ndjson') {
    if (run.generationId) {
      return {
        url: urlFor(o, `/v1/generations/${encodeURIComponent(run.generationId)}/events`, {
          after: run.lastSeq,
        }),
        method: 'GET',
        headers: { Accept: 'application/x-ndjson' },
      };
    }
    return {
      url: urlFor(o, '/v1/stream/chunked'),
      method: 'POST',
      headers: { Accept: 'application/x-ndjson', 'Content-Type': 'application/json' },
      body,
    };
  }
  const headers = { Accept: 'text/event-stream', 'Content-Type': 'application/json' };
  if (run.generationId) headers['Last-Event-ID'] = `${run.generationId}:${run.lastSeq}`;
  return { url: urlFor(o, '/v1/stream/sse'), method: 'POST', headers, body };
}

async function runHttp(run, wire) {
  const o = run.o;
  let connection = null;
  let failures = 0;
  run.onCancel = () => cancelOverHttp(run, () => connection && connection.abort());
  run.cleanups.push(() => connection && connection.abort());
  while (!run.over) {
    connection = new AbortController();
    const resuming = run.generationId !== null;
    const before = run.events;
    try {
      const req = httpRequest(run, wire, o);
      run.status(resuming ? 'reconnecting' : 'connecting', { attempt: failures });
      const response = await fetch(req.url, {
        ...fetchInit(o),
        method: req.method,
        headers: await authHeaders(o, req.headers),
        body: req.body,
        signal: connection.signal,
      });
      if (response.status === 204) {
        // The server says we already had the terminal event: nothing more will come.
        run.finishLocal(run.cancelRequested ? 'cancelled' : 'unknown');
        break;
      }
      if (!response.ok) {
        const err = await httpError(response);
        if (resuming && err.retryable) throw new Dropped(err.message);
        throw err;
      }
      if (resuming) run.resumes += 1;
      run.status('streaming');
      await readHttpBody(run, wire, response, connection);
      if (!run.over) throw new Dropped('the stream ended before its terminal event');
    } catch (err) {
      if (run.over) break;
      if (err instanceof GatewayError) throw err;
      if (run.cancelRequested && !run.generationId) {
        run.finishLocal('cancelled');
        break;
      }
      failures = run.events > before ? 1 : failures + 1;
      if (failures > o.maxAttempts) {
        throw new GatewayError('connection_lost', `gave up after ${o.maxAttempts} reconnects`, {
          retryable: true,
        });
      }
      run.status('reconnecting', { attempt: failures, error: String(err && err.message) });
      await sleep(backoff(failures, o), run.cancelRequested ? null : o.signal);
    }
  }
}

async function readHttpBody(run, wire, response, connection) {
  const reader = response.body.getReader();
  const parser = wire === 'sse' ? createSSEParser() : createNDJSONSplitter();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      for (const item of parser.push(value)) {
        let ev = item;
        if (wire === 'sse') {
          try {
            ev = JSON.parse(item.data);
          } catch {
            throw new GatewayError('bad_event', `SSE data is not JSON: ${item.data.slice(0, 80)}`);
          }
          if (!ev.type) ev.type = item.type;
        }
        // A draining replica's retryable goodbye: reconnect (elsewhere) and resume.
        if (ev.type === 'error' && ev.code === 'shutting_down' && run.generationId) {
          throw new Dropped('server is shutting down');
        }
        if (typeof ev.seq === 'number' && ev.seq > run.lastSeq + 1 && run.lastSeq >= 0) {
          throw new Dropped(`gap: seq ${ev.seq} after ${run.lastSeq}`); // resume fills it
        }
        run.accept(ev);
        if (run.over) return;
      }
    }
  } finally {
    connection.abort(); // also on the terminal event: never keep the body open
    reader.cancel().catch(() => {});
  }
}

// ------------------------------------------------------ SSE: EventSource --

function canUseEventSource(o) {
  if (o.sse === 'fetch') return false;
  if (typeof globalThis.EventSource !== 'function') return false;
  if (o.sse === 'eventsource') return true;
  // Custom headers cannot ride on EventSource's GET: fetch can send them.
  return !(o.headers && Object.keys(o.headers).length);
}

/**
 * `POST /v1/generations` (the whole body as JSON; a conversation does not fit
 * in a URL) → `{id, events_url}`. Rejects with a GatewayError for an HTTP error
 * answer, with a TypeError (fetch's) when the network failed.
 */
async function createGeneration(o, token, signal) {
  const response = await fetch(urlFor(o, '/v1/generations'), {
    ...fetchInit(o),
    method: 'POST',
    headers: await authHeaders(
      { ...o, token },
      { Accept: 'application/json', 'Content-Type': 'application/json' },
    ),
    body: JSON.stringify(o.body),
    signal,
  });
  if (!response.ok) throw await httpError(response);
  const created = await response.json().catch(() => null);
  if (!created || typeof created.id !== 'string') {
    throw new GatewayError('bad_event', 'POST /v1/generations answered without an id');
  }
  return created;
}

/**
 * SSE by the browser's EventSource: the generation is created with
 * `POST /v1/generations` (fetch, `Authorization` header), then its
 * `events_url` is followed with EventSource (a GET: a stream ticket rides as
 * `?access_token=`, or a cookie does). The prompt never goes in a URL.
 * EventSource reconnects by itself with `Last-Event-ID`, which that route
 * resumes from, and it answers 204 once everything was delivered.
 */
async function runEventSource(run) {
  const o = run.o;
  const token = await resolveToken(o.token);
  const posting = new AbortController();
  let source = null;
  let opens = 0;
  let failures = 0;

  const close = () => {
    if (source) source.close();
    source = null;
  };
  run.cleanups.push(close);
  run.onCancel = () => {
    if (!run.generationId) posting.abort();
    cancelOverHttp(run, close);
  };

  // 1. Create the generation. Nothing was shown yet, so asking again after a
  // network failure is safe (an orphan is cancelled after the resume grace).
  let created = null;
  for (let attempt = 1; created === null; attempt++) {
    run.status('connecting', attempt > 1 ? { attempt } : {});
    try {
      created = await createGeneration(o, token, posting.signal);
    } catch (err) {
      if (run.over) return;
      if (err instanceof GatewayError) throw err; // the gateway said no: not retried
      if (attempt > o.maxAttempts) {
        throw new GatewayError('connection_failed', `POST /v1/generations failed: ${err.message}`, {
          retryable: true,
        });
      }
      await sleep(backoff(attempt, o), o.signal);
      if (run.over) return;
    }
  }
  if (run.over) {
    // Cancelled while the POST was on its way: cancel what it created.
    deleteGeneration({ ...o, token }, created.id).catch(() => {});
    return;
  }
  run.generationId = created.id;
  const eventsPath =
    created.events_url || `/v1/generations/${encodeURIComponent(created.id)}/events`;

  const onData = (e) => {
    let ev;
    try {
      ev = JSON.parse(e.data);
    } catch {
      close();
      const start = String(e.data).slice(0, 80);
      run.fail(new GatewayError('bad_event', `SSE data is not JSON: ${start}`));
      return;
    }
    if (!ev.type) ev.type = e.type;
    // A draining replica's goodbye carries no id: the browser reconnects by
    // itself with the last token's id and resumes (elsewhere).
    if (ev.type === 'error' && ev.code === 'shutting_down' && run.generationId) return;
    failures = 0;
    run.accept(ev);
    if (run.terminal) close(); // or EventSource reconnects (and gets 204)
  };

  // 2. Follow its events.
  const open = (url) => {
    const es = new EventSource(url, { withCredentials: !!o.withCredentials });
    source = es;
    run.status(opens ? 'reconnecting' : 'connecting');
    es.addEventListener('open', () => {
      if (source !== es) return;
      opens += 1;
      if (opens > 1) run.resumes += 1;
      run.status('streaming');
    });
    for (const type of ['start', 'token', 'reasoning', 'tool_call', 'done']) {
      es.addEventListener(type, onData);
    }
    es.addEventListener('error', (e) => {
      if (source !== es) return;
      if (typeof e.data === 'string') return onData(e); // our `error` event has data
      // EventSource's own connection error (no data).
      if (run.over) return close();
      if (es.readyState === 0 /* CONNECTING */) {
        run.status('reconnecting'); // it retries by itself, with Last-Event-ID
        return;
      }
      // CLOSED: the browser gave up (a non-200 answer). Re-attach by hand.
      close();
      failures += 1;
      if (opens === 0 && failures > 2) {
        // Never opened: likely refused (credential, origin). A refused GET is
        // invisible to the page; sse: 'fetch' shows the error body.
        deleteGeneration({ ...o, token }, run.generationId).catch(() => {});
        run.fail(
          new GatewayError('connection_failed', 'the event stream could not be opened', {
            retryable: true,
          }),
        );
        return;
      }
      if (failures > o.maxAttempts) {
        run.fail(new GatewayError('connection_lost', `gave up after ${o.maxAttempts} reconnects`));
        return;
      }
      run.status('reconnecting', { attempt: failures });
      sleep(backoff(failures, o))
        .then(() => (run.over ? null : openWith({ after: run.lastSeq })))
        .catch((err) =>
          run.fail(
            err instanceof GatewayError
              ? err
              : new GatewayError('connection_failed', `a stream ticket: ${err.message}`, {
                  retryable: true,
                }),
          ),
        );
    });
  };
  // A fresh ticket for every open: the URL never carries a key or JWT.
  const openWith = async (query) => {
    const ticket = await urlCredential(o);
    if (!run.over) open(urlFor(o, eventsPath, { ...query, access_token: ticket }));
  };

  await openWith({});
}

// ------------------------------------------------- WebSocket, multiplexed --

const sockets = new Map();

/** One WebSocket per base URL, shared by every stream to it, reconnected with backoff. */
class SharedSocket {
  constructor(key, o) {
    this.key = key;
    this.o = o; // the options of the stream that opened it (base URL, token)
    this.ws = null;
    this.runs = new Map(); // request_id -> run
    this.connecting = false;
    this.failures = 0;
    this.everOpened = false;
    this.idleTimer = null;
  }

  get open() {
    return this.ws !== null && this.ws.readyState === 1;
  }

  add(run) {
    clearTimeout(this.idleTimer);
    this.runs.set(run.requestId, run);
    this.kick();
  }

  remove(run) {
    this.runs.delete(run.requestId);
    if (this.runs.size === 0) {
      clearTimeout(this.idleTimer);
      this.idleTimer = setTimeout(() => this.close(), this.o.wsIdleMs);
    }
  }

  close() {
    sockets.delete(this.key);
    if (this.ws) this.ws.close(1000);
    this.ws = null;
  }

  send(message) {
    this.ws.send(JSON.stringify(message));
  }

  /** Attach every stream that is not on the current socket; connect first if needed. */
  kick() {
    if (this.open) {
      for (const run of this.runs.values()) if (!run.attached) run.attach(this);
      return;
    }
    if (!this.connecting) this.connectLoop();
  }

  async connectLoop() {
    this.connecting = true;
    try {
      while (this.runs.size > 0 && !this.open) {
        if (this.failures > 0) {
          // A socket that never opened is likely refused (origin, credential): fail fast.
          if (this.failures > (this.everOpened ? this.o.maxAttempts : 2)) {
            const err = new GatewayError('connection_lost', 'the WebSocket could not reconnect', {
              retryable: true,
            });
            for (const run of [...this.runs.values()]) run.fail(err);
            this.runs.clear();
            this.close();
            return;
          }
          for (const run of this.runs.values()) {
            run.status('reconnecting', { attempt: this.failures });
          }
          await sleep(backoff(this.failures, this.o));
        }
        try {
          await this.connect();
        } catch {
          this.failures += 1;
        }
      }
    } finally {
      this.connecting = false;
    }
    if (this.open) this.kick();
  }

  async connect() {
    const ticket = await urlCredential(this.o);
    const url = new URL(urlFor(this.o, '/v1/stream/ws', { access_token: ticket }));
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(url.href);
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onclose = () => reject(new Error('WebSocket closed while opening'));
    });
    this.everOpened = true;
    ws.onmessage = (m) => this.onMessage(m);
    ws.onclose = () => this.onClose(ws);
    this.ws = ws;
  }

  onMessage(message) {
    let ev;
    try {
      ev = JSON.parse(message.data);
    } catch {
      return;
    }
    this.failures = 0;
    const run = this.runs.get(ev.request_id);
    if (run) run.onWsEvent(ev);
  }

  onClose(ws) {
    if (ws !== this.ws) return;
    this.ws = null;
    if (this.runs.size === 0) {
      sockets.delete(this.key);
      return;
    }
    this.failures = Math.max(this.failures, 1); // reconnect after a backoff, then resume
    for (const run of this.runs.values()) {
      run.attached = false;
      run.status('reconnecting', { attempt: this.failures });
    }
    this.kick();
  }
}

function socketFor(o) {
  const key = absoluteBase(o.baseUrl);
  let socket = sockets.get(key);
  if (!socket) {
    socket = new SharedSocket(key, o);
    sockets.set(key, socket);
  }
  return socket;
}

/** Close every shared WebSocket (their streams are resumed if used again). */
export function closeSockets() {
  for (const socket of [...sockets.values()]) socket.close();
}

function runWebSocket(run) {
  const o = run.o;
  const socket = socketFor(o);
  run.requestId = newRequestId();
  run.attached = false;
  let attaches = 0;

  run.attach = (s) => {
    if (run.over) return;
    run.attached = true;
    attaches += 1;
    if (run.generationId) {
      run.resumes += 1;
      s.send({
        type: 'resume',
        request_id: run.requestId,
        generation_id: run.generationId,
        after_seq: run.lastSeq,
      });
    } else {
      // Nothing was shown yet (no `start`): asking again is safe.
      s.send({ ...o.body, type: 'generate', request_id: run.requestId });
    }
    run.status(attaches > 1 ? 'resuming' : 'connecting');
  };
  run.onWsEvent = (ev) => {
    if (ev.type !== 'done' && ev.type !== 'error') run.status('streaming');
    run.accept(ev);
  };
  run.onCancel = () => {
    if (socket.open && run.attached) {
      socket.send({ type: 'cancel', request_id: run.requestId });
      const timer = setTimeout(() => run.finishLocal('cancelled'), o.cancelTimeoutMs);
      run.settled.then(
        () => clearTimeout(timer),
        () => clearTimeout(timer),
      );
    } else {
      cancelOverHttp(run, () => {});
    }
  };
  run.cleanups.push(() => socket.remove(run));
  socket.add(run);
}

// -------------------------------------------------------------- the API --

/**
 * Stream one generation.
 *
 * @param {object} options
 * @param {'sse'|'ws'|'chunked'} [options.transport='sse']
 * @param {object} options.body request body: {prompt | messages, model, max_tokens, seed, …}
 * @param {AbortSignal} [options.signal] abort = cancel the generation on the server
 * @param {(text: string, ev: object) => void} [options.onToken]
 * @param {(text: string, ev: object) => void} [options.onReasoning] a delta of the model's
 *        visible thinking (`reasoning` events)
 * @param {(call: object, ev: object) => void} [options.onToolCallDelta] a `tool_call` fragment
 *        arrived; `call` is its call so far: {index, id, name, arguments (the string so far)}
 * @param {(call: object, ev: object) => void} [options.onToolCall] a complete call, once per
 *        index when `done{finish_reason: "tool_calls"}` arrives: {index, id, name,
 *        arguments (the JSON string), args (parsed) | error (why it could not be parsed)}
 * @param {(ev: object) => void} [options.onDone]
 * @param {(err: GatewayError) => void} [options.onError]
 * @param {(ev: object) => void} [options.onEvent] every event, once (duplicates dropped)
 * @param {(state: string, info: object) => void} [options.onStatus]
 *        connecting | streaming | reconnecting | resuming | cancelling
 * @param {string|(() => string|Promise<string>)} [options.token] API key or JWT, sent as
 *        `Authorization: Bearer` on fetch; EventSource and WebSocket URLs get a stream
 *        ticket minted with it (`POST /v1/tickets`) before each (re)connect. A page that
 *        holds only a ticket passes it here too, and uses the WebSocket transport (a
 *        ticket opens GET streams only). A function is called on every use.
 * @param {string|(() => string|Promise<string>)} [options.ticket] a stream ticket for
 *        the URLs of EventSource and WebSocket, e.g. minted by your backend; default:
 *        minted with `token`
 * @param {boolean} [options.withCredentials] send cookies cross-origin (cookie auth)
 * @param {string} [options.baseUrl] gateway origin; default: this page's origin
 * @param {'auto'|'eventsource'|'fetch'} [options.sse='auto'] SSE by EventSource
 *        (`POST /v1/generations`, then EventSource on its `events_url`) or by fetch
 *        (`POST /v1/stream/sse`); `auto` takes EventSource unless `headers` are set
 * @returns {Promise<{text: string, reasoning: string, toolCalls: object[],
 *          generationId: string|null, finishReason: string, usage: object|null,
 *          events: number, tokens: number, resumes: number, confirmed: boolean}>}
 *          rejects with a GatewayError (`err.text` holds the partial text)
 */
export async function stream(options) {
  const o = { ...DEFAULTS, transport: 'sse', sse: 'auto', ...options };
  if (!o.body || typeof o.body !== 'object') throw new TypeError('body is required');
  if (o.signal && o.signal.aborted) {
    throw new DOMException('The stream was aborted before it started', 'AbortError');
  }
  let drive;
  if (o.transport === 'ws') drive = runWebSocket;
  else if (o.transport === 'chunked') drive = (r) => runHttp(r, 'ndjson');
  else if (o.transport === 'sse') {
    drive = canUseEventSource(o) ? runEventSource : (r) => runHttp(r, 'sse');
  } else throw new TypeError(`unknown transport ${o.transport}`);
  const run = new Run(o);
  const onAbort = () => run.cancel();
  if (o.signal) o.signal.addEventListener('abort', onAbort, { once: true });
  Promise.resolve()
    .then(() => drive(run))
    .catch((err) =>
      run.fail(err instanceof GatewayError ? err : new GatewayError('internal_error', String(err))),
    );
  try {
    await run.settled;
  } catch (err) {
    err.text = run.text;
    err.generationId = run.generationId;
    if (o.onError) o.onError(err);
    throw err;
  } finally {
    if (o.signal) o.signal.removeEventListener('abort', onAbort);
    for (const cleanup of run.cleanups) cleanup();
  }
  const end = run.terminal;
  if (end.type === 'error') {
    const err = errorFromEvent(end);
    err.text = run.text;
    err.generationId = run.generationId;
    if (o.onError) o.onError(err);
    throw err;
  }
  if (o.onDone) o.onDone(end);
  return {
    text: run.text,
    reasoning: run.reasoning,
    toolCalls: run.toolCalls,
    generationId: run.generationId,
    finishReason: end.finish_reason,
    usage: end.usage || null,
    events: run.events,
    tokens: run.tokens,
    resumes: run.resumes,
    confirmed: !end.local,
  };
}

/**
 * The same stream as an async iterator of events (start, token…, done);
 * an `error` event is yielded, then thrown as a GatewayError. Leaving the
 * loop early cancels the generation.
 */
export async function* streamEvents(options) {
  const inner = new AbortController();
  const outer = options.signal;
  const relay = () => inner.abort();
  if (outer) {
    if (outer.aborted) inner.abort();
    else outer.addEventListener('abort', relay, { once: true });
  }
  const queue = [];
  let wake = null;
  let finished = false;
  let failure = null;
  const pending = stream({
    ...options,
    signal: inner.signal,
    onEvent(ev) {
      if (options.onEvent) options.onEvent(ev);
      queue.push(ev);
      if (wake) wake();
    },
  }).then(
    () => {
      finished = true;
      if (wake) wake();
    },
    (err) => {
      failure = err;
      finished = true;
      if (wake) wake();
    },
  );
  try {
    for (;;) {
      if (queue.length) {
        yield queue.shift();
        continue;
      }
      if (finished) break;
      await new Promise((resolve) => {
        wake = resolve;
      });
      wake = null;
    }
    if (failure) throw failure;
  } finally {
    if (outer) outer.removeEventListener('abort', relay);
    if (!finished) {
      inner.abort();
      await pending;
    }
  }
}

// ------------------------------------------------------------ agent loop --

const TOOL_NAME = /^[A-Za-z0-9_-]{1,64}$/;

/**
 * The app's tool functions, by name: what the model is offered (`definitions()`,
 * OpenAI's `tools` shape) and what runs when it calls one (`call()`).
 *
 *   const tools = new ToolRegistry().register({
 *     name: 'calculate', description: 'Evaluate arithmetic',
 *     parameters: { type: 'object', properties: { expression: { type: 'string' } },
 *                   required: ['expression'] },
 *     run: async ({ expression }, { signal }) => ({ value: evaluate(expression) }),
 *   });
 */
export class ToolRegistry {
  /** @param {Array<object>} [tools] tool specs, as `register` takes them */
  constructor(tools = []) {
    this.tools = new Map();
    for (const tool of tools) this.register(tool);
  }

  /**
   * @param {{name: string, description?: string, parameters?: object,
   *          run: (args: object, context: {signal?: AbortSignal, call: object}) => any}} tool
   *        `parameters` is a JSON schema (default: an object without properties); `run`
   *        may be async; what it returns (JSON-serializable) goes back to the model
   * @returns {ToolRegistry} this
   */
  register({ name, description = '', parameters, run }) {
    if (typeof name !== 'string' || !TOOL_NAME.test(name)) {
      throw new TypeError(`a tool name is 1 to 64 of [A-Za-z0-9_-], not ${JSON.stringify(name)}`);
    }
    if (typeof run !== 'function') throw new TypeError(`tool ${name}: run must be a function`);
    const schema = parameters || { type: 'object', properties: {} };
    this.tools.set(name, { name, description, parameters: schema, run });
    return this;
  }

  get size() {
    return this.tools.size;
  }

  has(name) {
    return this.tools.has(name);
  }

  /** OpenAI's `tools` field: `[{type: "function", function: {name, description, parameters}}]`. */
  definitions() {
    return [...this.tools.values()].map(({ name, description, parameters }) => ({
      type: 'function',
      function: { name, description, parameters },
    }));
  }

  /**
   * Run one complete call (as `onToolCall` gives it). Never throws: a failure
   * is `{error}`. `content` is what goes back to the model: the JSON of the
   * result, or of `{error}`.
   *
   * @returns {Promise<{result?: any, error?: string, content: string}>}
   */
  async call(call, { signal } = {}) {
    const failed = (error) => ({ error, content: JSON.stringify({ error }) });
    const tool = call.name ? this.tools.get(call.name) : undefined;
    if (!tool) return failed(`unknown tool: ${call.name}`);
    if (call.error) return failed(call.error);
    let args = call.args;
    if (args === undefined) {
      const parsed = parseToolArguments(call.arguments);
      if (parsed.error) return failed(parsed.error);
      args = parsed.args;
    }
    const required = (tool.parameters && tool.parameters.required) || [];
    const missing = required.filter((key) => args[key] === undefined);
    if (missing.length) return failed(`missing required argument(s): ${missing.join(', ')}`);
    let result;
    try {
      result = await tool.run(args, { signal, call });
    } catch (err) {
      return failed(String((err && err.message) || err));
    }
    let content;
    try {
      content = JSON.stringify(result === undefined ? null : result);
    } catch (err) {
      return failed(`the result is not JSON-serializable: ${err.message}`);
    }
    return { result, content };
  }
}

/** The assistant message that records a step's tool calls (OpenAI's chat shape). */
export function assistantToolMessage(text, calls) {
  return {
    role: 'assistant',
    content: text ? text : null,
    tool_calls: calls.map((call) => ({
      id: call.id,
      type: 'function',
      function: { name: call.name, arguments: call.arguments || '{}' },
    })),
  };
}

function addUsage(total, usage) {
  if (!usage) return total;
  const sum = total || {};
  for (const [key, value] of Object.entries(usage)) {
    if (typeof value === 'number') sum[key] = (sum[key] || 0) + value;
  }
  return sum;
}

/**
 * The agent loop: stream the conversation with the registered tools; when the
 * model answers with tool calls (`done{finish_reason: "tool_calls"}`), run
 * them, append the assistant message (`tool_calls`) and one `tool` message per
 * call (`content`: the JSON of the result, or of `{error}`), and call the
 * model again, until it answers in text. Every transport and option of
 * `stream()` works (resume included); each step is one generation.
 *
 * @param {object} options everything `stream()` takes (transport, body, signal,
 *        token, onToken, onReasoning, onToolCallDelta, onToolCall, onEvent, onStatus, …), plus:
 * @param {object[]} [options.messages] the conversation so far (OpenAI's chat shape);
 *        default: `body.messages`, or `body.prompt` as one user message
 * @param {ToolRegistry|object[]} [options.tools] the app's tools (a registry, or specs for one)
 * @param {number} [options.maxSteps=5] model calls at most; a model that still asks
 *        for tools at the last one ends the loop with a GatewayError `too_many_steps`
 * @param {(info: {step: number, messages: object[]}) => void} [options.onStep] a model
 *        call starts (step 1, 2, …)
 * @param {(call: object, outcome: {result?: any, error?: string, content: string},
 *          step: number) => void} [options.onToolResult] a tool has run
 * @returns {Promise<{text: string, messages: object[], steps: number, finishReason: string,
 *          usage: object|null, results: object[], events: number, tokens: number,
 *          resumes: number, toolCalls: object[]}>} `messages` is the conversation with
 *          this turn appended (the caller's array is not changed); rejects with a
 *          GatewayError whose `messages` holds the conversation up to the failure
 */
export async function runAgent(options) {
  const {
    tools,
    maxSteps = DEFAULT_MAX_STEPS,
    messages: given,
    onStep,
    onToolResult,
    ...streamOptions
  } = options;
  const registry = tools instanceof ToolRegistry ? tools : new ToolRegistry(tools || []);
  const body = { ...(options.body || {}) };
  let history;
  if (given) history = [...given];
  else if (Array.isArray(body.messages)) history = [...body.messages];
  else if (typeof body.prompt === 'string') history = [{ role: 'user', content: body.prompt }];
  else throw new TypeError('messages (or body.messages, or body.prompt) are required');
  delete body.prompt;
  delete body.messages;
  if (registry.size && body.tools === undefined) body.tools = registry.definitions();
  if (!(maxSteps >= 1)) throw new TypeError('maxSteps must be at least 1');

  const signal = streamOptions.signal;
  const results = [];
  const allCalls = [];
  let usage = null;
  const summary = (last) => ({
    text: last.text,
    messages: history,
    steps: results.length,
    finishReason: last.finishReason,
    usage,
    results,
    events: results.reduce((n, r) => n + r.events, 0),
    tokens: results.reduce((n, r) => n + r.tokens, 0),
    resumes: results.reduce((n, r) => n + r.resumes, 0),
    toolCalls: allCalls,
  });

  for (let step = 1; ; step++) {
    if (onStep) onStep({ step, messages: history });
    let result;
    try {
      result = await stream({ ...streamOptions, body: { ...body, messages: history } });
    } catch (err) {
      err.messages = history;
      err.steps = results.length + 1;
      throw err;
    }
    results.push(result);
    usage = addUsage(usage, result.usage);
    const calls = result.finishReason === 'tool_calls' ? result.toolCalls : [];
    if (calls.length === 0) {
      // The answer (or what came of it before a cancel).
      if (result.text || result.finishReason !== 'cancelled') {
        history.push({ role: 'assistant', content: result.text });
      }
      return summary(result);
    }
    if (step >= maxSteps) {
      const err = new GatewayError(
        'too_many_steps',
        `the model still asks for tools after ${maxSteps} model calls (maxSteps ${maxSteps})`,
      );
      err.text = result.text;
      err.generationId = result.generationId;
      err.messages = history;
      err.steps = results.length;
      err.toolCalls = calls;
      if (options.onError) options.onError(err);
      throw err;
    }
    history.push(assistantToolMessage(result.text, calls));
    allCalls.push(...calls);
    const outcomes = await Promise.all(calls.map((call) => registry.call(call, { signal })));
    calls.forEach((call, i) => {
      history.push({ role: 'tool', tool_call_id: call.id, content: outcomes[i].content });
      if (onToolResult) onToolResult(call, outcomes[i], step);
    });
    if (signal && signal.aborted) {
      // Stopped while the tools ran: the conversation holds their results.
      return summary({ ...result, text: '', finishReason: 'cancelled' });
    }
  }
}
