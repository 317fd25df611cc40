// A frontend's use of the client, type-checked against gateway-client.d.ts by
// `tsc -p tests/js/types` (tests/test_js_package.py; also in a temporary project
// where the package was installed from the repo path). Never run: it only has to
// compile. Each `@ts-expect-error` proves a wrong use is rejected: were the types
// `any` (or the import unresolved), the unused directive would fail the check.
import {
  assistantToolMessage,
  closeSockets,
  createNDJSONSplitter,
  createSSEParser,
  createToolCallAssembler,
  deleteGeneration,
  GatewayError,
  listModels,
  parseToolArguments,
  runAgent,
  stopChat,
  stream,
  streamEvents,
  ToolRegistry,
} from 'gateway-client';
import type {
  ChatMessage,
  ConnectionOptions,
  FinishReason,
  GatewayErrorCode,
  GenerationRequest,
  StreamEvent,
  StreamResult,
  ToolCall,
  ToolOutcome,
  Transport,
  Usage,
} from 'gateway-client';

const connection: ConnectionOptions = {
  baseUrl: 'https://gateway.example.com',
  token: async () => 'a-jwt',
};

function assertNever(value: never): never {
  throw new Error(`unexpected ${JSON.stringify(value)}`);
}

/** Exhaustive over the event union: a new event type without a case fails here. */
function describe(ev: StreamEvent): string {
  switch (ev.type) {
    case 'start':
      return `${ev.generation_id} on ${ev.model} at ${ev.created}`;
    case 'token':
    case 'reasoning':
      return ev.text;
    case 'tool_call':
      return `${ev.index}: ${ev.name ?? '…'}(${ev.arguments})`;
    case 'done': {
      const reason: FinishReason = ev.finish_reason;
      const usage: Usage = ev.usage;
      return `${reason} after ${usage.total_tokens} tokens`;
    }
    case 'error': {
      const retry: boolean = ev.retryable;
      return `${ev.code}: ${ev.message}${retry ? ' (retryable)' : ''}`;
    }
    default:
      return assertNever(ev);
  }
}

export async function chat(out: HTMLElement, stop: AbortController): Promise<StreamResult> {
  const transport: Transport = 'ws';
  const body: GenerationRequest = {
    messages: [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: [{ type: 'text', text: 'Explain vector databases.' }] },
    ],
    max_tokens: 200,
    seed: 7,
    stop: ['\n\n'],
    on_disconnect: 'finish',
    reasoning_effort: 'low',
    response_format: { type: 'json_schema', json_schema: { name: 'x' } },
  };
  try {
    const result = await stream({
      ...connection,
      transport,
      sse: 'fetch',
      body,
      signal: stop.signal,
      maxAttempts: 3,
      onToken: (text, ev) => out.append(text, String(ev.seq)),
      onReasoning: (text) => out.append(text),
      onToolCallDelta: (call, ev) => out.append(`${call.index}${call.id ?? ''}${ev.arguments}`),
      onToolCall: (call, ev) => out.append(`${call.name}: ${ev.finish_reason}`),
      onStatus: (state, info) => out.append(`${state} ${info.attempt ?? 0}`),
      onEvent: (ev) => out.append(describe(ev)),
      onDone: (ev) => out.append(ev.local ? 'unconfirmed' : `${ev.usage.completion_tokens}`),
      onError: (err) => out.append(err.code),
    });
    const reason: FinishReason | 'unknown' = result.finishReason;
    const text: string = result.text + result.reasoning;
    const id: string | null = result.generationId;
    out.append(reason, text, id ?? '', String(result.usage?.prompt_tokens ?? 0));
    return result;
  } catch (err) {
    if (err instanceof GatewayError) {
      const code: GatewayErrorCode = err.code;
      if (code === 'rate_limited' || code === 'connection_lost') out.append(err.text);
      out.append(String(err.status ?? ''), err.event?.message ?? '', String(err.retryable));
      // @ts-expect-error: not an error code of the contract nor of the client
      if (err.code === 'rate_limit') out.append('never');
    }
    throw err;
  }
}

export async function iterate(): Promise<string> {
  let text = '';
  for await (const ev of streamEvents({ ...connection, transport: 'chunked', body: { prompt: 'Hi' } })) {
    if (ev.type === 'token') text += ev.text;
    // @ts-expect-error: `text` is only on token and reasoning events (narrow by `type` first)
    text += ev.text;
  }
  return text;
}

const calculate = {
  name: 'calculate',
  description: 'Evaluate arithmetic.',
  parameters: {
    type: 'object',
    properties: { expression: { type: 'string' } },
    required: ['expression'],
  },
  run: ({ expression }: { expression: string }) => ({ value: expression.length }),
};

export async function agent(history: ChatMessage[], signal: AbortSignal): Promise<ChatMessage[]> {
  const tools = new ToolRegistry([calculate]).register({
    name: 'get_current_time',
    description: 'The current time',
    parameters: { type: 'object', properties: { timezone: { type: 'string' } } },
    run: async ({ timezone }, { signal: toolSignal, call }) => ({
      time: new Date().toLocaleString('en-GB', { timeZone: timezone }),
      aborted: toolSignal?.aborted ?? false,
      id: call.id,
    }),
  });
  const names: string[] = tools.definitions().map((d) => d.function.name);
  if (!tools.has(names[0] ?? '') || tools.size === 0) throw new Error('no tools');

  const turn = await runAgent({
    transport: 'sse',
    messages: history,
    body: { model: 'sim-1', max_tokens: 80 },
    tools,
    maxSteps: 5,
    signal,
    onStep: ({ step, messages }) => console.log(step, messages.length),
    onToolCall: (call: ToolCall) => console.log(call.name, call.args ?? call.error),
    onToolResult: (call, outcome: ToolOutcome, step) =>
      console.log(call.id, step, outcome.error ?? outcome.result, outcome.content),
  });
  console.log(turn.steps, turn.finishReason, turn.usage?.total_tokens, turn.results.length);
  // A conversation in `body` works too, and so do plain tool specs.
  await runAgent({ body: { prompt: 'What time is it?' }, tools: [calculate] });
  // @ts-expect-error: the conversation is required (`messages`, or `body` with prompt/messages)
  await runAgent({ transport: 'ws', tools });
  return turn.messages;
}

export async function stopUiChat(chatId: string): Promise<boolean> {
  // The explicit stop for the AI SDK UI stream route (useChat's stop() only aborts a fetch).
  const cancelled: boolean = await stopChat(connection, chatId);
  // @ts-expect-error: stopChat resolves to a boolean
  const wrong: string = await stopChat(connection, chatId);
  // @ts-expect-error: the chat id is a string
  await stopChat(connection, 42);
  return cancelled || wrong === '';
}

export async function helpers(bytes: Uint8Array): Promise<void> {
  const models: string[] = await listModels({ token: 'key' });
  await deleteGeneration(connection, 'gen_abc');
  closeSockets();

  const sse = createSSEParser({ onRetry: (ms) => console.log(ms + 1) });
  for (const msg of sse.push(bytes)) console.log(msg.type, msg.data, msg.id);
  const last: string = sse.lastEventId;
  const retry: number | null = sse.retry;

  const lines = createNDJSONSplitter<StreamEvent>({ onValue: (ev) => console.log(ev.seq) });
  const events: StreamEvent[] = [...lines.push('{"type":"start"}\n'), ...lines.end()];

  const parsed = parseToolArguments('{"a": 1}');
  if (parsed.error === undefined) console.log(parsed.args.a);
  else console.log(parsed.error.toUpperCase());

  const assembler = createToolCallAssembler();
  for (const ev of events) if (ev.type === 'tool_call') assembler.push(ev);
  const calls: ToolCall[] = assembler.finish();
  const message: ChatMessage = assistantToolMessage('', calls);
  console.log(models, last, retry, assembler.size, assembler.calls.length, message);
}

// Wrong uses the declarations must reject.
// @ts-expect-error: not a transport
void stream({ transport: 'http', body: { prompt: 'x' } });
// @ts-expect-error: `body` is required
void stream({ transport: 'sse' });
const conversation: ChatMessage[] = [{ role: 'user', content: 'y' }];
// @ts-expect-error: exactly one of `prompt` and `messages`
void stream({ body: { prompt: 'x', messages: conversation } });
// @ts-expect-error: a tool message needs its tool_call_id
void stream({ body: { messages: [{ role: 'tool', content: 'z' }] } });
// @ts-expect-error: not a status the client reports
void stream({ body: { prompt: 'x' }, onStatus: (state) => state === 'failed' });
// @ts-expect-error: not a finish reason
void stream({ body: { prompt: 'x' } }).then((r) => r.finishReason === 'timeout');
// @ts-expect-error: a tool's name is a string
new ToolRegistry().register({ name: 7, run: () => null });
// @ts-expect-error: error codes are a closed set
new GatewayError('oops', 'message');
