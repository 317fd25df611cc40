// The agent loop (runAgent, ToolRegistry) against a fake gateway whose
// scripted model calls the tools a user message names.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  assistantToolMessage,
  createSSEParser,
  GatewayError,
  runAgent,
  ToolRegistry,
} from '../../gateway/static/gateway-client.js';
import { fakeEventSourceClass, startFakeGateway } from './fake_gateway.mjs';

const CALCULATE = {
  name: 'calculate',
  description: 'Evaluate arithmetic.',
  parameters: {
    type: 'object',
    properties: { expression: { type: 'string' } },
    required: ['expression'],
  },
  run: ({ expression }) => (expression === '17 * 23' ? 391 : Number.NaN),
};
const CLOCK = {
  name: 'get_current_time',
  description: 'The time.',
  parameters: { type: 'object', properties: { timezone: { type: 'string' } }, required: [] },
  run: async () => ({ iso: '2025-01-02T03:04:05.000Z', timezone: 'UTC' }),
};

test('ToolRegistry: definitions in OpenAI shape; bad names and missing run are refused', () => {
  const registry = new ToolRegistry([CALCULATE]).register({ name: 'noop', run: () => null });
  assert.deepEqual(registry.definitions(), [
    {
      type: 'function',
      function: {
        name: 'calculate',
        description: 'Evaluate arithmetic.',
        parameters: CALCULATE.parameters,
      },
    },
    {
      type: 'function',
      function: { name: 'noop', description: '', parameters: { type: 'object', properties: {} } },
    },
  ]);
  assert.throws(() => registry.register({ name: 'has space', run: () => 1 }), TypeError);
  assert.throws(() => registry.register({ name: 'x'.repeat(65), run: () => 1 }), TypeError);
  assert.throws(() => registry.register({ name: 'nofn' }), TypeError);
});

test('ToolRegistry.call: result JSON, or {error} for unknown tools, bad args, throws', async () => {
  const registry = new ToolRegistry([
    CALCULATE,
    CLOCK,
    { name: 'boom', run: () => Promise.reject(new Error('kaput')) },
    { name: 'cyclic', run: () => { const a = {}; a.a = a; return a; } },
    { name: 'nothing', run: () => undefined },
  ]);
  const call = (name, args) => registry.call({ id: 'c', name, arguments: JSON.stringify(args) });
  assert.deepEqual(await call('calculate', { expression: '17 * 23' }), {
    result: 391,
    content: '391',
  });
  const clock = await call('get_current_time', {});
  assert.equal(clock.content, '{"iso":"2025-01-02T03:04:05.000Z","timezone":"UTC"}');
  assert.deepEqual(await call('nothing', {}), { result: undefined, content: 'null' });
  const errorOf = async (c) => {
    const outcome = await registry.call(c);
    assert.equal(outcome.content, JSON.stringify({ error: outcome.error }));
    return outcome.error;
  };
  assert.match(await errorOf({ name: 'nope', arguments: '{}' }), /unknown tool: nope/);
  assert.match(await errorOf({ name: 'calculate', arguments: '{}' }), /missing required.*expression/);
  assert.match(await errorOf({ name: 'calculate', arguments: '{"expr' }), /not valid JSON/);
  assert.match(await errorOf({ name: 'calculate', error: 'bad', args: undefined }), /^bad$/);
  assert.match(await errorOf({ name: 'boom', arguments: '' }), /^kaput$/);
  assert.match(await errorOf({ name: 'cyclic', arguments: '' }), /not JSON-serializable/);
});

test('assistantToolMessage: OpenAI shape, content null without text, {} for empty arguments', () => {
  assert.deepEqual(
    assistantToolMessage('', [{ id: 'call_1', name: 'get_current_time', arguments: '' }]),
    {
      role: 'assistant',
      content: null,
      tool_calls: [
        { id: 'call_1', type: 'function', function: { name: 'get_current_time', arguments: '{}' } },
      ],
    },
  );
});

/** The conversation a calculate round trip must leave, given the fake's call ids. */
function expectedRoundTrip(question, callId) {
  return [
    { role: 'user', content: question },
    {
      role: 'assistant',
      content: null,
      tool_calls: [
        {
          id: callId,
          type: 'function',
          function: { name: 'calculate', arguments: '{"expression":"17 * 23"}' },
        },
      ],
    },
    { role: 'tool', tool_call_id: callId, content: '391' },
    { role: 'assistant', content: 'The calculate tool returned 391.' },
  ];
}

for (const [label, transport, extra] of [
  ['chunked', 'chunked', {}],
  ['SSE by fetch', 'sse', { sse: 'fetch' }],
  ['SSE by EventSource', 'sse', { sse: 'eventsource' }],
]) {
  test(`runAgent over ${label}: a tool round trip, then a second turn with the history`, async () => {
    const fake = await startFakeGateway();
    const opened = [];
    globalThis.EventSource = fakeEventSourceClass(createSSEParser, opened);
    try {
      const steps = [];
      const results = [];
      const reasoning = [];
      const options = {
        transport,
        ...extra,
        baseUrl: fake.url,
        body: { model: 'fake', max_tokens: 50 },
        tools: new ToolRegistry([CLOCK, CALCULATE]),
        onStep: ({ step }) => steps.push(step),
        onReasoning: (text) => reasoning.push(text),
        onToolResult: (call, outcome, step) => results.push([call.name, outcome.content, step]),
      };
      const first = await runAgent({
        ...options,
        messages: [{ role: 'user', content: 'Calculate 17 * 23' }],
      });
      assert.equal(first.text, 'The calculate tool returned 391.');
      assert.equal(first.finishReason, 'stop');
      assert.equal(first.steps, 2);
      assert.deepEqual(steps, [1, 2]);
      assert.deepEqual(results, [['calculate', '391', 1]]);
      assert.equal(reasoning.join(''), 'Let me think.Let me think.');
      assert.deepEqual(first.messages, expectedRoundTrip('Calculate 17 * 23', 'call_0001_0'));
      assert.equal(first.toolCalls.length, 1);
      // usage adds up the steps: 9 completion tokens each (2 thinking + 7 deltas)
      assert.deepEqual(first.usage, { prompt_tokens: 10, completion_tokens: 18, total_tokens: 28 });
      assert.equal(first.events, first.results[0].events + first.results[1].events);

      // Each request carried the tools and the conversation so far (never a prompt).
      const posts = fake.requests.filter((r) => r.method === 'POST');
      assert.equal(posts.length, 2);
      for (const post of posts) {
        assert.equal(post.body.prompt, undefined);
        assert.equal(post.body.max_tokens, 50);
        assert.deepEqual(
          post.body.tools.map((t) => t.function.name),
          ['get_current_time', 'calculate'],
        );
      }
      assert.deepEqual(posts[1].body.messages, first.messages.slice(0, 3));

      // Turn 2: the whole history goes again, plus the new question.
      const second = await runAgent({
        ...options,
        messages: [...first.messages, { role: 'user', content: 'What time is it now?' }],
      });
      assert.equal(
        second.text,
        'The get_current_time tool returned {"iso":"2025-01-02T03:04:05.000Z","timezone":"UTC"}.',
      );
      const sent = fake.requests.filter((r) => r.method === 'POST').at(-1).body.messages;
      assert.deepEqual(
        sent.map((m) => m.role),
        ['user', 'assistant', 'tool', 'assistant', 'user', 'assistant', 'tool'],
      );
      assert.deepEqual(second.messages.slice(0, 4), first.messages);
      assert.equal(second.messages.length, 8);
      if (extra.sse === 'eventsource') {
        assert.equal(opened.length, 4); // one EventSource per model call
        for (const url of opened) assert.match(url, /\/v1\/generations\/gen_fake\d+\/events$/);
      } else {
        assert.equal(opened.length, 0);
      }
    } finally {
      delete globalThis.EventSource;
      fake.close();
    }
  });
}

test('runAgent: two tools named in one message are both called, results in call order', async () => {
  const fake = await startFakeGateway();
  try {
    const result = await runAgent({
      transport: 'chunked',
      baseUrl: fake.url,
      body: {},
      messages: [{ role: 'user', content: 'Calculate 17 * 23 and tell me the current time' }],
      tools: [CLOCK, CALCULATE],
    });
    const [, assistant, toolA, toolB, answer] = result.messages;
    assert.deepEqual(
      assistant.tool_calls.map((c) => c.function.name),
      ['get_current_time', 'calculate'],
    );
    assert.equal(toolA.tool_call_id, assistant.tool_calls[0].id);
    assert.equal(toolB.tool_call_id, assistant.tool_calls[1].id);
    assert.equal(toolB.content, '391');
    assert.equal(answer.role, 'assistant');
    assert.equal(result.steps, 2);
  } finally {
    fake.close();
  }
});

test('runAgent: a failing tool goes back as {error}, and the loop goes on', async () => {
  const fake = await startFakeGateway();
  try {
    const outcomes = [];
    const result = await runAgent({
      transport: 'chunked',
      baseUrl: fake.url,
      body: { prompt: 'Calculate 1 / 0' },
      tools: [{ ...CALCULATE, run: () => { throw new Error('division by zero'); } }],
      onToolResult: (call, outcome) => outcomes.push(outcome),
    });
    assert.deepEqual(outcomes, [{ error: 'division by zero', content: '{"error":"division by zero"}' }]);
    assert.equal(result.messages[2].content, '{"error":"division by zero"}');
    assert.equal(result.text, 'The calculate tool returned {"error":"division by zero"}.');
  } finally {
    fake.close();
  }
});

test('runAgent: past maxSteps it stops with too_many_steps and the history so far', async () => {
  const fake = await startFakeGateway();
  try {
    // tool_choice "required": the fake calls a tool at every step.
    const err = await runAgent({
      transport: 'chunked',
      baseUrl: fake.url,
      body: { tool_choice: 'required' },
      messages: [{ role: 'user', content: 'Hi' }],
      tools: [CALCULATE],
      maxSteps: 1,
    }).catch((e) => e);
    assert.ok(err instanceof GatewayError);
    assert.equal(err.code, 'too_many_steps');
    assert.match(err.message, /after 1 model calls/);
    assert.deepEqual(err.messages, [{ role: 'user', content: 'Hi' }]); // no unanswered calls
    assert.equal(err.toolCalls.length, 1);
    assert.equal(fake.requests.length, 1);
  } finally {
    fake.close();
  }
});

test('runAgent: the default step limit is 5 model calls', async () => {
  const fake = await startFakeGateway({ alwaysTools: true }); // a model that never stops
  try {
    let runs = 0;
    const err = await runAgent({
      transport: 'chunked',
      baseUrl: fake.url,
      body: {},
      messages: [{ role: 'user', content: 'Calculate 2 * 2' }],
      tools: [{ ...CALCULATE, run: () => ++runs }],
    }).catch((e) => e);
    assert.equal(err.code, 'too_many_steps');
    assert.equal(fake.requests.length, 5);
    assert.equal(runs, 4); // the fifth call's tools were not run
    assert.equal(err.steps, 5);
    assert.deepEqual(
      err.messages.map((m) => m.role),
      ['user', ...Array(4).fill(['assistant', 'tool']).flat()],
    );
  } finally {
    fake.close();
  }
});

test('runAgent: Stop while a tool runs ends the turn as cancelled, with the results kept', async () => {
  const fake = await startFakeGateway();
  try {
    const controller = new AbortController();
    const result = await runAgent({
      transport: 'chunked',
      baseUrl: fake.url,
      body: {},
      messages: [{ role: 'user', content: 'Calculate 17 * 23' }],
      tools: [{ ...CALCULATE, run: () => { controller.abort(); return 391; } }],
      signal: controller.signal,
    });
    assert.equal(result.finishReason, 'cancelled');
    assert.equal(result.steps, 1);
    assert.deepEqual(
      result.messages.map((m) => m.role),
      ['user', 'assistant', 'tool'],
    );
    assert.equal(fake.requests.length, 1); // no second model call
  } finally {
    fake.close();
  }
});

test('runAgent without tools is one plain stream; messages default from body.prompt', async () => {
  const fake = await startFakeGateway();
  try {
    const result = await runAgent({
      transport: 'chunked',
      baseUrl: fake.url,
      body: { prompt: 'Calculate 17 * 23' },
    });
    assert.equal(result.text, 'Hello there.');
    assert.equal(result.steps, 1);
    assert.equal(fake.requests[0].body.tools, undefined);
    assert.deepEqual(fake.requests[0].body.messages, [{ role: 'user', content: 'Calculate 17 * 23' }]);
    assert.deepEqual(result.messages.at(-1), { role: 'assistant', content: 'Hello there.' });
  } finally {
    fake.close();
  }
});
