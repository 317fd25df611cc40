// Two gateway replicas sharing one redis-server (tests/test_ai_sdk.py):
// the answer starts on A, the connection drops, and `useChat`'s reconnect
// (`GET {api}/{chatId}/stream`) lands on B, which replays and follows A's
// generation through the shared log.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  GATEWAY,
  GATEWAY_B,
  answerText,
  assistants,
  droppingFetch,
  generationLog,
  newChat,
  textOf,
} from './chat_helpers.mjs';

if (!GATEWAY_B) throw new Error('GATEWAY_B_URL is not set');

test('a dropped answer resumes on the other replica with the full text exactly once', async () => {
  const { chat, finishes } = newChat({
    body: { model: 'slow', max_tokens: 60 },
    fetch: droppingFetch(5),
    reconnectTo: GATEWAY_B,
  });
  await chat.sendMessage({ text: 'Explain vector databases.' });
  assert.equal(finishes.at(-1).isDisconnect, true);
  const partial = textOf(assistants(chat)[0]);
  await chat.resumeStream();
  assert.equal(chat.status, 'ready');
  const answers = assistants(chat);
  assert.equal(answers.length, 1);
  const log = await generationLog(answers[0].metadata.generationId, GATEWAY_B);
  assert.ok(log.text.startsWith(partial) && log.text.length > partial.length);
  assert.equal(textOf(answers[0]), log.text);
  assert.equal(finishes.at(-1).finishReason, 'length');
});

test('a stop sent to the other replica cancels the answer; a reconnect then gets 204', async () => {
  const { chat } = newChat({ body: { model: 'slow', max_tokens: 200 } });
  const sending = chat.sendMessage({ text: 'Explain vector databases.' });
  while (answerText(chat).length < 10) await new Promise((r) => setTimeout(r, 10));
  const stop = await fetch(`${GATEWAY_B}/v1/stream/ui/${chat.id}/stream`, { method: 'DELETE' });
  assert.equal(stop.status, 200);
  await sending; // A's stream ends with the cancellation
  const log = await generationLog((await stop.json()).generation_id, GATEWAY_B);
  assert.equal(log.events.at(-1).finish_reason, 'cancelled');
  for (const base of [GATEWAY, GATEWAY_B]) {
    const reconnect = await fetch(`${base}/v1/stream/ui/${chat.id}/stream`);
    assert.equal(reconnect.status, 204);
  }
});
