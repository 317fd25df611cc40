// Unit tests of the NDJSON splitter, and of stream() over chunked against a
// tiny fake gateway (node:http) that drops the connection mid-answer.
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { test } from 'node:test';

import {
  createNDJSONSplitter,
  stream,
  streamEvents,
} from '../../gateway/static/gateway-client.js';

function splitAll(chunks) {
  const splitter = createNDJSONSplitter();
  const values = [];
  for (const chunk of chunks) values.push(...splitter.push(chunk));
  values.push(...splitter.end());
  return values;
}

const EVENTS = [
  { type: 'start', seq: 0, generation_id: 'gen_x', model: 'sim-1', created: 1 },
  { type: 'token', seq: 1, text: 'Größe 東京 🚀' },
  { type: 'token', seq: 2, text: 'line\nbreak\r\n' },
  { type: 'done', seq: 3, finish_reason: 'stop', usage: { completion_tokens: 2 } },
];
const WIRE = EVENTS.map((e) => `${JSON.stringify(e)}\n`).join('');

test('whole lines in one chunk', () => {
  assert.deepEqual(splitAll([WIRE]), EVENTS);
});

test('every split point of the bytes (inside UTF-8 characters too) gives the same values', () => {
  const bytes = new TextEncoder().encode(WIRE);
  for (let i = 0; i <= bytes.length; i++) {
    for (const j of [i, Math.min(bytes.length, i + 1), Math.min(bytes.length, i + 5)]) {
      const chunks = [bytes.slice(0, i), bytes.slice(i, j), bytes.slice(j)];
      assert.deepEqual(splitAll(chunks), EVENTS, `split at ${i}/${j}`);
    }
  }
});

test('one byte at a time', () => {
  const bytes = new TextEncoder().encode(WIRE);
  assert.deepEqual(splitAll([...bytes].map((b) => Uint8Array.of(b))), EVENTS);
});

test('blank lines (heartbeats) are skipped, CRLF is accepted', () => {
  const wire = `\n\n${JSON.stringify(EVENTS[0])}\r\n\r\n  \n${JSON.stringify(EVENTS[1])}\n\n`;
  assert.deepEqual(splitAll([wire]), EVENTS.slice(0, 2));
});

test('push returns only complete lines; the rest waits for its newline', () => {
  const splitter = createNDJSONSplitter();
  assert.deepEqual(splitter.push('{"a":1}\n{"b":'), [{ a: 1 }]);
  assert.deepEqual(splitter.push('2'), []);
  assert.deepEqual(splitter.push('}\n'), [{ b: 2 }]);
  assert.deepEqual(splitter.end(), []);
});

test('end() parses a last line without a newline', () => {
  const splitter = createNDJSONSplitter();
  assert.deepEqual(splitter.push('{"a":1}\n{"b":2}'), [{ a: 1 }]);
  assert.deepEqual(splitter.end(), [{ b: 2 }]);
});

test('a line that is not JSON throws a SyntaxError naming it', () => {
  const splitter = createNDJSONSplitter();
  assert.throws(() => splitter.push('{"a":1}\nnot json\n'), (err) => {
    assert.ok(err instanceof SyntaxError);
    assert.match(err.message, /not json/);
    return true;
  });
});

test('onValue sees every value', () => {
  const seen = [];
  const splitter = createNDJSONSplitter({ onValue: (v) => seen.push(v) });
  splitter.push(WIRE.slice(0, 50));
  splitter.push(WIRE.slice(50));
  splitter.end();
  assert.deepEqual(seen, EVENTS);
});

// --- stream() over chunked: drop, resume by ?after=, no duplicate, no loss ---

const TOKENS = ['Hel', 'lo', ', ', 'wor', 'ld', '!', ' 🚀', '\n', 'bye'];
const LOG = [
  { type: 'start', seq: 0, generation_id: 'gen_node', model: 'sim-1', created: 1 },
  ...TOKENS.map((text, i) => ({ type: 'token', seq: i + 1, text })),
  { type: 'done', seq: TOKENS.length + 1, finish_reason: 'stop', usage: { total_tokens: 9 } },
];

/** A fake gateway: the first stream dies after 4 events; resumes repeat one old event. */
function fakeGateway() {
  const requests = [];
  const server = createServer((req, res) => {
    requests.push(`${req.method} ${req.url} ${req.headers.authorization || ''}`);
    const url = new URL(req.url, 'http://x');
    res.writeHead(200, { 'Content-Type': 'application/x-ndjson' });
    if (req.method === 'POST' && url.pathname === '/v1/stream/chunked') {
      // the last line is cut in the middle: a drop, not a value
      const wire = LOG.slice(0, 4).map((e) => `${JSON.stringify(e)}\n`).join('');
      res.write(`${wire}\n{"type":"tok`);
      setTimeout(() => res.socket.destroy(), 20);
      return;
    }
    if (url.pathname === '/v1/generations/gen_node/events') {
      const after = Number(url.searchParams.get('after'));
      // send one event the client already has: it must be dropped by seq
      res.end(LOG.slice(after).map((e) => `${JSON.stringify(e)}\n`).join(''));
      return;
    }
    res.writeHead(404).end();
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => resolve({ server, requests }));
  });
}

test('stream() over chunked resumes after a drop with ?after= and keeps the text exact', async () => {
  const { server, requests } = await fakeGateway();
  try {
    const tokens = [];
    const statuses = [];
    const result = await stream({
      transport: 'chunked',
      baseUrl: `http://127.0.0.1:${server.address().port}`,
      body: { prompt: 'hi', seed: 1 },
      token: 'secret',
      baseDelayMs: 5,
      onToken: (text) => tokens.push(text),
      onStatus: (state) => statuses.push(state),
    });
    assert.equal(result.text, TOKENS.join(''));
    assert.deepEqual(tokens, TOKENS);
    assert.equal(result.finishReason, 'stop');
    assert.equal(result.events, LOG.length);
    assert.equal(result.resumes, 1);
    assert.equal(result.generationId, 'gen_node');
    assert.deepEqual(requests, [
      'POST /v1/stream/chunked Bearer secret',
      'GET /v1/generations/gen_node/events?after=3 Bearer secret',
    ]);
    assert.ok(statuses.includes('reconnecting'));
  } finally {
    server.close();
  }
});

/** A fake gateway whose stream stays open until DELETE, which ends it with done{cancelled}. */
function cancellableGateway() {
  const requests = [];
  let open = null;
  const server = createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`);
    if (req.method === 'POST') {
      res.writeHead(200, { 'Content-Type': 'application/x-ndjson' });
      res.write(LOG.slice(0, 3).map((e) => `${JSON.stringify(e)}\n`).join(''));
      open = res;
      return;
    }
    if (req.method === 'DELETE' && req.url === '/v1/generations/gen_node') {
      const done = { type: 'done', seq: 3, finish_reason: 'cancelled', usage: {} };
      open.end(`${JSON.stringify(done)}\n`);
      res.writeHead(204).end();
      return;
    }
    res.writeHead(404).end();
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => resolve({ server, requests }));
  });
}

test('streamEvents() yields the events; aborting cancels with DELETE and ends on done', async () => {
  const { server, requests } = await cancellableGateway();
  try {
    const controller = new AbortController();
    const seen = [];
    for await (const ev of streamEvents({
      transport: 'chunked',
      baseUrl: `http://127.0.0.1:${server.address().port}`,
      body: { prompt: 'hi' },
      signal: controller.signal,
    })) {
      seen.push(ev.type);
      if (ev.seq === 2) controller.abort(); // the user presses Stop
    }
    assert.deepEqual(seen, ['start', 'token', 'token', 'done']);
    assert.deepEqual(requests, ['POST /v1/stream/chunked', 'DELETE /v1/generations/gen_node']);
  } finally {
    server.closeAllConnections();
    server.close();
  }
});

test('stream() resolves a cancel with the server-confirmed done{cancelled}', async () => {
  const { server, requests } = await cancellableGateway();
  try {
    const controller = new AbortController();
    const result = await stream({
      transport: 'chunked',
      baseUrl: `http://127.0.0.1:${server.address().port}`,
      body: { prompt: 'hi' },
      signal: controller.signal,
      onToken: () => controller.abort(),
    });
    assert.equal(result.finishReason, 'cancelled');
    assert.equal(result.confirmed, true);
    assert.equal(result.text, 'Hello'); // what the server sent before the cancel
    assert.equal(requests.at(-1), 'DELETE /v1/generations/gen_node');
  } finally {
    server.closeAllConnections();
    server.close();
  }
});
