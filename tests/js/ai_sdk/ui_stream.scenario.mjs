// The AI SDK's own client against POST /v1/stream/ui and its reconnect and
// stop routes, on one gateway (tests/test_ai_sdk.py starts it: `slow` is the
// simulated model at 50 tokens/s, `scripted` an OpenAI-wire fake that thinks
// or calls `get_weather`, `broken` a fake that fails after 3 tokens).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { lastAssistantMessageIsCompleteWithToolCalls } from 'ai';
import {
  GATEWAY,
  answerText,
  assistants,
  droppingFetch,
  generationLog,
  newChat,
  textOf,
} from './chat_helpers.mjs';

const WEATHER_TOOL = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};

test('a text answer arrives as one assistant message, exactly the generated text', async () => {
  const { chat, finishes } = newChat({ body: { model: 'slow', max_tokens: 30 } });
  await chat.sendMessage({ text: 'Explain vector databases.' });
  assert.equal(chat.status, 'ready');
  assert.equal(chat.error, undefined);
  const [answer, ...more] = assistants(chat);
  assert.equal(more.length, 0);
  const generationId = answer.metadata.generationId;
  assert.equal(answer.id, generationId, 'start.messageId names the generation');
  assert.equal(answer.metadata.model, 'slow');
  const log = await generationLog(generationId);
  assert.ok(log.text.length > 20);
  assert.equal(textOf(answer), log.text);
  assert.equal(answer.metadata.usage.completion_tokens, 30);
  assert.equal(finishes.at(-1).finishReason, 'length');
  assert.equal(finishes.at(-1).isError, false);
});

test('reasoning streams as a reasoning part before the text', async () => {
  const { chat } = newChat({ body: { model: 'scripted' } });
  await chat.sendMessage({ text: 'Think first, then answer.' });
  assert.equal(chat.status, 'ready');
  const [answer] = assistants(chat);
  const kinds = answer.parts.map((p) => p.type).filter((t) => t !== 'step-start');
  assert.deepEqual(kinds, ['reasoning', 'text']);
  const log = await generationLog(answer.metadata.generationId);
  assert.equal(answer.parts.find((p) => p.type === 'reasoning').text, log.reasoning);
  assert.equal(log.reasoning, 'Two lookups: weather, then time.');
  assert.equal(textOf(answer), 'Here is what I found.');
});

test('a tool call runs in the client (onToolCall, addToolOutput) and the answer goes on', async () => {
  const calls = [];
  const { chat } = newChat({
    body: { model: 'scripted', tools: [WEATHER_TOOL] },
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
    onToolCall: ({ toolCall }) => {
      calls.push(toolCall);
      // Not awaited inside onToolCall, as the SDK documents.
      chat.addToolOutput({
        tool: toolCall.toolName,
        toolCallId: toolCall.toolCallId,
        output: { city: toolCall.input.city, celsius: 21 },
      });
    },
  });
  await chat.sendMessage({ text: 'What is the weather in Oslo?' });
  // The automatic follow-up request runs after sendMessage's own.
  for (let i = 0; i < 100 && (chat.status !== 'ready' || answerText(chat) === ''); i++) {
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal(chat.status, 'ready');
  assert.equal(calls.length, 1);
  assert.equal(calls[0].toolName, 'get_weather');
  assert.deepEqual(calls[0].input, { city: 'Oslo' });
  const answers = assistants(chat);
  assert.equal(answers.length, 1, 'the follow-up continues the same assistant message');
  const tool = answers[0].parts.find((p) => p.type === 'tool-get_weather');
  assert.equal(tool.state, 'output-available');
  assert.deepEqual(tool.output, { city: 'Oslo', celsius: 21 });
  assert.equal(textOf(answers[0]), 'It is 21 degrees in Oslo.');
});

test('an upstream error mid-stream is the SDK error, never a finished message', async () => {
  const { chat, finishes, errors } = newChat({ body: { model: 'broken' } });
  await chat.sendMessage({ text: 'Tell me something.' });
  assert.equal(chat.status, 'error');
  assert.ok(chat.error instanceof Error);
  assert.match(chat.error.message, /crashed/);
  assert.equal(errors.length, 1);
  const finish = finishes.at(-1);
  assert.equal(finish.isError, true);
  assert.equal(finish.finishReason, undefined, 'no finish chunk was sent');
  const [answer] = assistants(chat);
  assert.ok(textOf(answer).length > 0, 'the text before the failure stays');
});

test('a dropped answer resumes (resumeStream) with the full text exactly once', async () => {
  const { chat, finishes } = newChat({
    body: { model: 'slow', max_tokens: 60 },
    fetch: droppingFetch(5),
  });
  await chat.sendMessage({ text: 'Explain vector databases.' });
  assert.equal(chat.status, 'error', 'the drop surfaced as an error');
  assert.equal(finishes.at(-1).isDisconnect, true);
  const partial = textOf(assistants(chat)[0]);
  await chat.resumeStream();
  assert.equal(chat.status, 'ready');
  const answers = assistants(chat);
  assert.equal(answers.length, 1);
  const log = await generationLog(answers[0].metadata.generationId);
  assert.ok(log.text.startsWith(partial) && log.text.length > partial.length);
  assert.equal(textOf(answers[0]), log.text);
  assert.equal(answers[0].parts.filter((p) => p.type === 'text').length, 1);
  assert.equal(finishes.at(-1).finishReason, 'length');
});

test('a drop during the answer to a tool output resumes with the earlier steps intact', async () => {
  const calls = [];
  const { chat, finishes } = newChat({
    body: { model: 'slow', max_tokens: 40, tools: [WEATHER_TOOL] },
    fetch: droppingFetch(5, { post: 2 }),
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
    onToolCall: ({ toolCall }) => {
      calls.push(toolCall);
      chat.addToolOutput({ tool: 'get_weather', toolCallId: toolCall.toolCallId, output: 'sunny' });
    },
  });
  await chat.sendMessage({ text: 'What is the weather in Oslo?' });
  for (let i = 0; i < 200 && !finishes.some((f) => f.isDisconnect); i++) {
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.ok(finishes.some((f) => f.isDisconnect), 'the follow-up was dropped');
  await chat.resumeStream();
  assert.equal(chat.status, 'ready');
  assert.equal(calls.length, 1, "the replay did not run the app's tool again");
  const answers = assistants(chat);
  assert.equal(answers.length, 1);
  const tool = answers[0].parts.find((p) => p.type === 'tool-get_weather');
  assert.equal(tool?.state, 'output-available');
  assert.equal(tool.output, 'sunny');
  const log = await generationLog(answers[0].metadata.generationId);
  assert.ok(log.text.length > 20);
  assert.equal(textOf(answers[0]), log.text);
  assert.equal(log.events.at(-1).type, 'done');
  assert.equal(finishes.at(-1).finishReason, log.events.at(-1).finish_reason);
});

test('an explicit stop (DELETE) cancels the answer: a reconnect then finds nothing', async () => {
  const { chat } = newChat({ body: { model: 'slow', max_tokens: 200 } });
  const sending = chat.sendMessage({ text: 'Explain vector databases.' });
  while (answerText(chat).length < 10) await new Promise((r) => setTimeout(r, 10));
  const stop = await fetch(`${GATEWAY}/v1/stream/ui/${chat.id}/stream`, { method: 'DELETE' });
  assert.equal(stop.status, 200);
  const stopped = await stop.json();
  assert.equal(stopped.cancelled, true);
  await chat.stop();
  await sending;
  const reconnect = await fetch(`${GATEWAY}/v1/stream/ui/${chat.id}/stream`);
  assert.equal(reconnect.status, 204);
  const before = answerText(chat);
  await chat.resumeStream();
  assert.equal(chat.status, 'ready');
  assert.equal(answerText(chat), before);
  const log = await generationLog(stopped.generation_id);
  assert.equal(log.events.at(-1).finish_reason, 'cancelled');
});
