// tool_call fragment assembly and reasoning, in the parser-level API and in
// stream() over every HTTP wire (chunked, SSE by fetch, SSE by EventSource).
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { test } from 'node:test';

import {
  GatewayError,
  createSSEParser,
  createToolCallAssembler,
  parseToolArguments,
  stream,
} from '../../gateway/static/gateway-client.js';
import { fakeEventSourceClass, scriptedEvents, startFakeGateway } from './fake_gateway.mjs';

test('fragments assemble per index; id and name come from the first fragment', () => {
  const assembler = createToolCallAssembler();
  const fragments = [
    { type: 'tool_call', seq: 3, index: 0, id: 'call_a', name: 'calculate', arguments: '' },
    { type: 'tool_call', seq: 4, index: 0, arguments: '{"expr' },
    { type: 'tool_call', seq: 5, index: 1, id: 'call_b', name: 'get_current_time', arguments: '{' },
    { type: 'tool_call', seq: 6, index: 0, arguments: 'ession": "17 * 23"}' },
    { type: 'tool_call', seq: 7, index: 1, arguments: '}' },
  ];
  const partial = fragments.map((ev) => assembler.push(ev));
  assert.deepEqual(partial[1], { index: 0, id: 'call_a', name: 'calculate', arguments: '{"expr' });
  assert.equal(assembler.size, 2);
  assert.deepEqual(assembler.finish(), [
    {
      index: 0,
      id: 'call_a',
      name: 'calculate',
      arguments: '{"expression": "17 * 23"}',
      args: { expression: '17 * 23' },
    },
    { index: 1, id: 'call_b', name: 'get_current_time', arguments: '{}', args: {} },
  ]);
});

test('a later id or name does not replace the first; a missing index is 0', () => {
  const assembler = createToolCallAssembler();
  assembler.push({ id: 'call_1', name: 'first', arguments: '{"a":' });
  assembler.push({ index: 0, id: 'call_2', name: 'second', arguments: '1}' });
  const [call] = assembler.finish();
  assert.equal(call.id, 'call_1');
  assert.equal(call.name, 'first');
  assert.deepEqual(call.args, { a: 1 });
});

test('bad arguments and a call without a name are reported, not thrown', () => {
  const assembler = createToolCallAssembler();
  assembler.push({ index: 0, id: 'c0', name: 'f', arguments: '{"a": 1' });
  assembler.push({ index: 1, id: 'c1', name: 'g', arguments: '[1, 2]' });
  assembler.push({ index: 2, arguments: '{}' });
  const [truncated, array, nameless] = assembler.finish();
  assert.match(truncated.error, /not valid JSON/);
  assert.equal(truncated.args, undefined);
  assert.match(array.error, /not a JSON object/);
  assert.match(nameless.error, /no function name/);
  assert.equal(nameless.id, 'call_2'); // an id is made up when the upstream gave none
});

test('parseToolArguments: empty is {}, whitespace is {}, an object parses', () => {
  assert.deepEqual(parseToolArguments(''), { args: {} });
  assert.deepEqual(parseToolArguments('  '), { args: {} });
  assert.deepEqual(parseToolArguments('{"x": [1, {"y": null}]}'), {
    args: { x: [1, { y: null }] },
  });
  assert.match(parseToolArguments('null').error, /not a JSON object/);
});

const TOOLS = [
  {
    type: 'function',
    function: {
      name: 'calculate',
      description: 'arithmetic',
      parameters: {
        type: 'object',
        properties: { expression: { type: 'string' } },
        required: ['expression'],
      },
    },
  },
];
const BODY = { messages: [{ role: 'user', content: 'Calculate 17 * 23' }], tools: TOOLS };

/** stream() with callbacks that record everything tool- and reasoning-related. */
async function streamRecorded(options) {
  const seen = { reasoning: [], deltas: [], calls: [], order: [] };
  const result = await stream({
    baseDelayMs: 5,
    ...options,
    onReasoning: (text) => {
      seen.reasoning.push(text);
      seen.order.push('reasoning');
    },
    onToolCallDelta: (call) => {
      seen.deltas.push(call);
      seen.order.push('delta');
    },
    onToolCall: (call) => {
      seen.calls.push(call);
      seen.order.push('call');
    },
    onDone: () => seen.order.push('done'),
  });
  return { result, seen };
}

function assertCalculateCall({ result, seen }) {
  assert.equal(result.finishReason, 'tool_calls');
  assert.equal(result.reasoning, 'Let me think.');
  assert.deepEqual(seen.reasoning, ['Let me ', 'think.']);
  assert.equal(result.text, '');
  assert.equal(result.toolCalls.length, 1);
  const [call] = result.toolCalls;
  assert.equal(call.name, 'calculate');
  assert.match(call.id, /^call_/);
  assert.equal(call.arguments, '{"expression":"17 * 23"}');
  assert.deepEqual(call.args, { expression: '17 * 23' });
  // complete calls come once, at the end; the fragments before, growing
  assert.deepEqual(seen.calls, result.toolCalls);
  assert.deepEqual(seen.order.slice(-2), ['call', 'done']);
  assert.equal(seen.deltas.at(-1).arguments, call.arguments);
  assert.equal(seen.deltas[0].arguments, '');
  assert.equal(seen.deltas[0].name, 'calculate');
}

test('stream() over chunked: reasoning, then one assembled tool call at done', async () => {
  const fake = await startFakeGateway();
  try {
    assertCalculateCall(await streamRecorded({ transport: 'chunked', baseUrl: fake.url, body: BODY }));
    assert.deepEqual(fake.requests[0].body, BODY);
  } finally {
    fake.close();
  }
});

test('stream() over chunked resumed in the middle of the fragments assembles them once', async () => {
  const fake = await startFakeGateway({ dropAfter: 5 }); // start, 2 reasoning, 2 fragments
  try {
    const recorded = await streamRecorded({ transport: 'chunked', baseUrl: fake.url, body: BODY });
    assertCalculateCall(recorded);
    assert.equal(recorded.result.resumes, 1);
    assert.match(fake.requests[1].url, /^\/v1\/generations\/gen_fake0001\/events\?after=4$/);
  } finally {
    fake.close();
  }
});

test('stream() over SSE by fetch (POST /v1/stream/sse), resumed by Last-Event-ID', async () => {
  const fake = await startFakeGateway({ dropAfter: 6 });
  try {
    const recorded = await streamRecorded({
      transport: 'sse',
      sse: 'fetch',
      baseUrl: fake.url,
      body: BODY,
    });
    assertCalculateCall(recorded);
    assert.equal(fake.requests[1].lastEventId, 'gen_fake0001:5');
  } finally {
    fake.close();
  }
});

test('stream() by EventSource: POST /v1/generations, then events_url; no prompt in any URL', async () => {
  const fake = await startFakeGateway({ dropAfter: 4 });
  const opened = [];
  globalThis.EventSource = fakeEventSourceClass(createSSEParser, opened);
  try {
    const recorded = await streamRecorded({
      transport: 'sse',
      baseUrl: fake.url,
      body: BODY,
      token: 'key-123',
    });
    assertCalculateCall(recorded);
    const [post, mint, first, resumed] = fake.requests;
    assert.equal(post.method, 'POST');
    assert.equal(post.url, '/v1/generations');
    assert.equal(post.authorization, 'Bearer key-123');
    assert.deepEqual(post.body, BODY);
    // The key mints a stream ticket; only the ticket goes in the URL.
    assert.equal(mint.url, '/v1/tickets');
    assert.equal(mint.authorization, 'Bearer key-123');
    assert.equal(first.method, 'GET');
    assert.equal(first.url, '/v1/generations/gen_fake0001/events?access_token=ticket-minted-1');
    // its own reconnect resumes by Last-Event-ID (the browser sends it)
    assert.equal(resumed.url, first.url);
    assert.equal(resumed.lastEventId, 'gen_fake0001:3');
    for (const url of opened) {
      assert.doesNotMatch(decodeURIComponent(url), /Calculate|17 \* 23|messages|prompt|key-123/);
    }
    assert.ok(recorded.result.resumes >= 1);
  } finally {
    delete globalThis.EventSource;
    fake.close();
  }
});

test('a page holding only a ticket is told that EventSource mode needs a key or JWT', async () => {
  const fake = await startFakeGateway({});
  globalThis.EventSource = fakeEventSourceClass(createSSEParser, []);
  try {
    await assert.rejects(
      stream({ transport: 'sse', baseUrl: fake.url, body: BODY, token: 'ticket-abc' }),
      (err) => err instanceof GatewayError && err.code === 'unauthorized',
    );
    assert.deepEqual(
      fake.requests.map((r) => `${r.method} ${r.url}`),
      ['POST /v1/generations'],
    );
  } finally {
    delete globalThis.EventSource;
    fake.close();
  }
});

test('tool calls without done{tool_calls} (cut by length) are not handed over', async () => {
  const events = scriptedEvents(BODY, 'gen_len').slice(0, 5); // start, 2 reasoning, 2 fragments
  events.push({ type: 'done', seq: 5, finish_reason: 'length', usage: {} });
  const server = createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'application/x-ndjson' });
    res.end(events.map((ev) => `${JSON.stringify(ev)}\n`).join(''));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const { result, seen } = await streamRecorded({
      transport: 'chunked',
      baseUrl: `http://127.0.0.1:${server.address().port}`,
      body: BODY,
    });
    assert.equal(result.finishReason, 'length');
    assert.deepEqual(result.toolCalls, []);
    assert.deepEqual(seen.calls, []);
    assert.equal(seen.deltas.length, 2); // the fragments were still shown as they came
  } finally {
    server.close();
  }
});

test('EventSource mode: a refused POST is a GatewayError with the gateway\'s code', async () => {
  const fake = await startFakeGateway();
  globalThis.EventSource = fakeEventSourceClass(createSSEParser);
  try {
    const err = await stream({ transport: 'sse', baseUrl: fake.url, body: { ...BODY, model: 'nope' } })
      .catch((e) => e);
    assert.equal(err.code, 'model_not_found');
    assert.equal(err.status, 404);
    assert.equal(fake.requests.length, 1);
  } finally {
    delete globalThis.EventSource;
    fake.close();
  }
});

test('EventSource mode: a refused events GET fails fast and cancels the generation', async () => {
  const fake = await startFakeGateway({ refuseEvents: true });
  globalThis.EventSource = fakeEventSourceClass(createSSEParser);
  try {
    const err = await stream({ transport: 'sse', baseUrl: fake.url, body: BODY, baseDelayMs: 5 })
      .catch((e) => e);
    assert.equal(err.code, 'connection_failed');
    assert.equal(err.generationId, 'gen_fake0001');
    await new Promise((resolve) => setTimeout(resolve, 20)); // the DELETE is fire-and-forget
    assert.deepEqual(
      fake.requests.map((r) => `${r.method} ${r.url}`),
      [
        'POST /v1/generations',
        'GET /v1/generations/gen_fake0001/events',
        'GET /v1/generations/gen_fake0001/events?after=-1',
        'GET /v1/generations/gen_fake0001/events?after=-1',
        'DELETE /v1/generations/gen_fake0001',
      ],
    );
  } finally {
    delete globalThis.EventSource;
    fake.close();
  }
});
