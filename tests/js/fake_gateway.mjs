// A tiny fake gateway (node:http) with a scripted tool-calling model, for the
// client's tool-call and agent-loop tests. Not a test file itself.
//
// Routes: POST /v1/stream/chunked (NDJSON), POST /v1/stream/sse (SSE),
// POST /v1/generations (201 {id, events_url}) + GET /v1/generations/{id}/events
// (SSE, or NDJSON with `Accept: application/x-ndjson`, from `?after=` or
// `Last-Event-ID`), DELETE /v1/generations/{id}.
//
// The model, like the gateway's simulated one: it thinks (two `reasoning`
// events), then, if the last message is a user message that names a tool (or
// a 4+ letter word of its name), calls those tools (finish_reason
// `tool_calls`, arguments streamed in 4-character fragments); if the last
// message is a tool result, it answers "The <name> tool returned <content>.";
// else "Hello there.". With `alwaysTools` it calls the first tool whatever
// the last message is (a model that never stops).
import { createServer } from 'node:http';

function words(name) {
  return name
    .split(/_|(?=[A-Z])/)
    .map((w) => w.toLowerCase())
    .filter((w) => w.length >= 4 && !['get', 'set', 'list'].includes(w));
}

function mentioned(text, tool) {
  const lower = text.toLowerCase();
  const name = tool.function.name;
  return lower.includes(name.toLowerCase()) || words(name).some((w) => lower.includes(w));
}

function argumentsFor(tool, text) {
  const args = {};
  const schema = tool.function.parameters || {};
  for (const key of schema.required || []) {
    const expression = /\d+(?:\.\d+)?(?:\s*[-+*/]\s*\d+(?:\.\d+)?)+/.exec(text);
    args[key] = key.includes('expr') && expression ? expression[0] : 'topic';
  }
  return JSON.stringify(args);
}

function pieces(text, size) {
  const out = [];
  for (let i = 0; i < text.length; i += size) out.push(text.slice(i, i + size));
  return out;
}

/** The events of one generation for `body` (seq numbered, start to done). */
export function scriptedEvents(body, id, { alwaysTools = false } = {}) {
  const messages = body.messages || [{ role: 'user', content: body.prompt }];
  const last = messages[messages.length - 1];
  const events = [{ type: 'start', generation_id: id, model: body.model || 'fake', created: 1 }];
  events.push({ type: 'reasoning', text: 'Let me ' }, { type: 'reasoning', text: 'think.' });
  const tools = body.tools || [];
  let calls = [];
  if (body.tool_choice !== 'none' && last.role === 'user') {
    calls = tools.filter((t) => mentioned(String(last.content), t));
    if (calls.length === 0 && body.tool_choice === 'required' && tools.length) calls = [tools[0]];
  }
  if (alwaysTools && calls.length === 0 && tools.length) calls = [tools[0]];
  let finish = 'stop';
  if (calls.length) {
    calls.forEach((tool, index) => {
      const callId = `call_${id.slice(-4)}_${index}`;
      events.push({ type: 'tool_call', index, id: callId, name: tool.function.name, arguments: '' });
      for (const part of pieces(argumentsFor(tool, String(last.content)), 4)) {
        events.push({ type: 'tool_call', index, arguments: part });
      }
    });
    finish = 'tool_calls';
  } else if (last.role === 'tool') {
    const call = messages
      .flatMap((m) => m.tool_calls || [])
      .find((c) => c.id === last.tool_call_id);
    const name = call ? call.function.name : 'unknown';
    for (const part of pieces(`The ${name} tool returned ${last.content}.`, 5)) {
      events.push({ type: 'token', text: part });
    }
  } else {
    events.push({ type: 'token', text: 'Hello' }, { type: 'token', text: ' there.' });
  }
  const completion = events.length - 1;
  events.push({
    type: 'done',
    finish_reason: finish,
    usage: { prompt_tokens: 5, completion_tokens: completion, total_tokens: 5 + completion },
  });
  return events.map((ev, seq) => ({ ...ev, seq }));
}

const sse = (ev, id) =>
  `id: ${id}:${ev.seq}\nevent: ${ev.type}\ndata: ${JSON.stringify(ev)}\n\n`;
const ndjson = (ev) => `${JSON.stringify(ev)}\n`;

/**
 * Starts the fake. `options.dropAfter`: the first stream of each generation
 * is cut after that many events (the client must resume); `options.alwaysTools`:
 * see scriptedEvents; `options.refuseEvents`: GET …/events answers 401. A POST
 * /v1/generations for model `nope` answers 404 model_not_found.
 *
 * @returns {Promise<{url: string, requests: object[], close(): void}>}
 *          `requests`: {method, url, authorization, lastEventId, body}
 */
export function startFakeGateway(options = {}) {
  const generations = new Map();
  const requests = [];
  let counter = 0;

  function create(body) {
    counter += 1;
    const id = `gen_fake${String(counter).padStart(4, '0')}`;
    const generation = { id, events: scriptedEvents(body, id, options), streams: 0 };
    generations.set(id, generation);
    return generation;
  }

  function send(res, generation, after, wire) {
    generation.streams += 1;
    const events = generation.events.filter((ev) => ev.seq > after);
    const cut = generation.streams === 1 && options.dropAfter !== undefined;
    const shown = cut ? events.slice(0, options.dropAfter) : events;
    res.writeHead(200, {
      'Content-Type': wire === 'sse' ? 'text/event-stream' : 'application/x-ndjson',
    });
    const text = shown.map((ev) => (wire === 'sse' ? sse(ev, generation.id) : ndjson(ev)));
    if (cut) {
      res.write(text.join(''));
      setTimeout(() => res.socket.destroy(), 10);
    } else {
      res.end(text.join(''));
    }
  }

  let minted = 0;
  const server = createServer(async (req, res) => {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const raw = Buffer.concat(chunks).toString('utf8');
    const body = raw ? JSON.parse(raw) : null;
    const url = new URL(req.url, 'http://x');
    requests.push({
      method: req.method,
      url: req.url,
      authorization: req.headers.authorization || '',
      lastEventId: req.headers['last-event-id'] || '',
      body,
    });
    const match = /^\/v1\/generations\/([^/]+)(\/events)?$/.exec(url.pathname);
    if (req.method === 'POST' && url.pathname === '/v1/stream/chunked') {
      return send(res, create(body), -1, 'ndjson');
    }
    if (req.method === 'POST' && url.pathname === '/v1/stream/sse') {
      const lastEventId = req.headers['last-event-id'];
      if (lastEventId) {
        const [id, seq] = lastEventId.split(':');
        return send(res, generations.get(id), Number(seq), 'sse');
      }
      return send(res, create(body), -1, 'sse');
    }
    // The gateway's rules for stream tickets: minted with a key or JWT, they open
    // GET streams only (a bearer starting with `ticket-` plays a ticket here).
    const bearer = (req.headers.authorization || '').replace(/^Bearer /, '');
    if (req.method === 'POST' && url.pathname === '/v1/tickets') {
      if (!bearer || bearer.startsWith('ticket-')) return res.writeHead(401).end();
      minted += 1;
      res.writeHead(201, { 'Content-Type': 'application/json' });
      return res.end(JSON.stringify({ ticket: `ticket-minted-${minted}`, expires_at: 0 }));
    }
    if (req.method === 'POST' && bearer.startsWith('ticket-')) {
      res.writeHead(401, { 'Content-Type': 'application/json' });
      const error = { type: 'authentication_error', code: 'unauthorized', message: 'a stream ticket opens GET streams only' };
      return res.end(JSON.stringify({ error }));
    }
    if (req.method === 'POST' && url.pathname === '/v1/generations') {
      if (body.model === 'nope') {
        res.writeHead(404, { 'Content-Type': 'application/json' });
        const error = { type: 'not_found', code: 'model_not_found', message: 'no model nope' };
        return res.end(JSON.stringify({ error }));
      }
      const generation = create(body);
      const eventsUrl = `/v1/generations/${generation.id}/events`;
      res.writeHead(201, { 'Content-Type': 'application/json', Location: eventsUrl });
      return res.end(JSON.stringify({ id: generation.id, events_url: eventsUrl }));
    }
    if (match && req.method === 'GET' && match[2]) {
      const generation = generations.get(match[1]);
      if (!generation) return res.writeHead(404).end();
      if (options.refuseEvents) return res.writeHead(401).end();
      let after = -1;
      if (url.searchParams.has('after')) after = Number(url.searchParams.get('after'));
      else if (req.headers['last-event-id']) {
        after = Number(req.headers['last-event-id'].split(':')[1]);
      }
      if (after >= generation.events.length - 1) return res.writeHead(204).end();
      const wire = (req.headers.accept || '').includes('application/x-ndjson') ? 'ndjson' : 'sse';
      return send(res, generation, after, wire);
    }
    if (match && req.method === 'DELETE') return res.writeHead(204).end();
    res.writeHead(404).end();
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () =>
      resolve({
        url: `http://127.0.0.1:${server.address().port}`,
        requests,
        close() {
          server.closeAllConnections();
          server.close();
        },
      }),
    );
  });
}

/**
 * A stand-in for the browser's EventSource, on fetch and the client's own SSE
 * parser: it dispatches typed events, reconnects with `Last-Event-ID` when the
 * stream drops (after `retry`), and closes for good on 204 or another status.
 */
export function fakeEventSourceClass(createSSEParser, log = []) {
  return class FakeEventSource {
    constructor(url, init = {}) {
      this.url = url;
      this.withCredentials = !!init.withCredentials;
      this.readyState = 0;
      this.listeners = new Map();
      this.lastEventId = '';
      this.controller = null;
      log.push(url);
      this.connect();
    }

    addEventListener(type, fn) {
      if (!this.listeners.has(type)) this.listeners.set(type, []);
      this.listeners.get(type).push(fn);
    }

    emit(type, event) {
      for (const fn of this.listeners.get(type) || []) fn(event);
    }

    close() {
      this.readyState = 2;
      if (this.controller) this.controller.abort();
    }

    async connect() {
      this.controller = new AbortController();
      const headers = { Accept: 'text/event-stream' };
      if (this.lastEventId) headers['Last-Event-ID'] = this.lastEventId;
      let response;
      try {
        response = await fetch(this.url, { headers, signal: this.controller.signal });
      } catch {
        return this.retry();
      }
      if (this.readyState === 2) return;
      if (response.status !== 200) {
        this.readyState = 2;
        return this.emit('error', { type: 'error' });
      }
      this.readyState = 1;
      this.emit('open', { type: 'open' });
      const parser = createSSEParser();
      try {
        const reader = response.body.getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          for (const ev of parser.push(value)) {
            this.lastEventId = ev.id;
            if (this.readyState === 2) return;
            this.emit(ev.type, { type: ev.type, data: ev.data, lastEventId: ev.id });
          }
        }
      } catch {
        // a drop: reconnect
      }
      this.retry();
    }

    retry() {
      if (this.readyState === 2) return;
      this.readyState = 0;
      this.emit('error', { type: 'error' });
      setTimeout(() => this.readyState === 0 && this.connect(), 5);
    }
  };
}
