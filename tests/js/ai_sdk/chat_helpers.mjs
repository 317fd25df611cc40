// Shared by the AI SDK scenarios: a `Chat` (the React package's, used without
// rendering: the same client state machine `useChat` runs) pointed at the
// gateway with nothing but its `api` URL and a request `body`.
import { DefaultChatTransport } from 'ai';
import { Chat } from '@ai-sdk/react';

export const GATEWAY = process.env.GATEWAY_URL;
export const GATEWAY_B = process.env.GATEWAY_B_URL;
if (!GATEWAY) throw new Error('GATEWAY_URL is not set (pytest starts the gateway and sets it)');

export function newChat({ body, fetch, reconnectTo, ...options } = {}) {
  const finishes = [];
  const errors = [];
  const transport = new DefaultChatTransport({
    api: `${GATEWAY}/v1/stream/ui`,
    body,
    fetch,
    // The SDK's own option for a reconnect that goes elsewhere (another replica here).
    prepareReconnectToStreamRequest: reconnectTo
      ? ({ id }) => ({ api: `${reconnectTo}/v1/stream/ui/${encodeURIComponent(id)}/stream` })
      : undefined,
  });
  const chat = new Chat({
    transport,
    onFinish: (info) => finishes.push(info),
    onError: (error) => errors.push(error),
    ...options,
  });
  return { chat, finishes, errors };
}

export function textOf(message) {
  return message.parts.filter((p) => p.type === 'text').map((p) => p.text).join('');
}

/** The text of the chat's (first) assistant message so far; '' before it exists. */
export function answerText(chat) {
  const [answer] = assistants(chat);
  return answer ? textOf(answer) : '';
}

export function assistants(chat) {
  return chat.messages.filter((m) => m.role === 'assistant');
}

/** The generation's own log (NDJSON), read back from the gateway: what the model said. */
export async function generationLog(generationId, base = GATEWAY) {
  const response = await fetch(`${base}/v1/generations/${generationId}/events`, {
    headers: { Accept: 'application/x-ndjson' },
  });
  if (!response.ok) throw new Error(`events: HTTP ${response.status}`);
  const events = (await response.text()).split('\n').filter(Boolean).map((l) => JSON.parse(l));
  return {
    events,
    text: events.filter((e) => e.type === 'token').map((e) => e.text).join(''),
    reasoning: events.filter((e) => e.type === 'reasoning').map((e) => e.text).join(''),
  };
}

/**
 * A `fetch` whose `post`-th POST body fails with a network error (what a
 * dropped connection looks like to the SDK: a TypeError) after `afterDeltas`
 * text deltas have arrived. Other requests go through untouched.
 */
export function droppingFetch(afterDeltas, { post = 1 } = {}) {
  let posts = 0;
  return async (url, init) => {
    const response = await fetch(url, init);
    if (init?.method !== 'POST' || !response.body || ++posts !== post) return response;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let seen = 0;
    const body = new ReadableStream({
      async pull(controller) {
        const { done, value } = await reader.read();
        if (done) return controller.close();
        seen += decoder.decode(value, { stream: true }).split('"text-delta"').length - 1;
        controller.enqueue(value);
        if (seen >= afterDeltas) {
          await reader.cancel(); // the gateway sees the connection go away
          controller.error(new TypeError('network error'));
        }
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}
