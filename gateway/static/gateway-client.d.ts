// Type declarations for gateway-client.js, the browser client of the streaming gateway.
//
//   npm install /path/to/repo/gateway/static        (or "gateway-client": "file:…")
//   import { stream, runAgent, stopChat, ToolRegistry } from 'gateway-client';
//
// Every runtime export of gateway-client.js is declared here, and nothing else is
// (tests/test_js_package.py compares the two). The event and error vocabulary is the
// gateway's public contract (docs/ and DESIGN.md): one event log per stream, `start`
// (seq 0), then `token`, `reasoning` and `tool_call` events on one seq sequence, then
// exactly one terminal `done` or `error`.

// ------------------------------------------------------------ vocabulary --

/** How `stream` reaches the gateway: SSE, the shared WebSocket, or HTTP chunked NDJSON. */
export type Transport = 'sse' | 'ws' | 'chunked';

/**
 * SSE by the browser's `EventSource` (`POST /v1/generations`, then its `events_url`)
 * or by `fetch` (`POST /v1/stream/sse`); `auto` takes EventSource unless `headers` are set.
 */
export type SSEMode = 'auto' | 'eventsource' | 'fetch';

/** Why a generation ended (`done.finish_reason`). */
export type FinishReason = 'stop' | 'length' | 'tool_calls' | 'content_filter' | 'cancelled';

/**
 * The contract's error codes: in `error` events, and in HTTP error bodies
 * (`{"error": {"type", "code", "message"}}`).
 */
export type ErrorCode =
  | 'invalid_request'
  | 'model_not_found'
  | 'unauthorized'
  | 'rate_limited'
  | 'upstream_error'
  | 'upstream_timeout'
  | 'shutting_down'
  | 'internal_error';

/**
 * Codes the client itself gives a GatewayError:
 * - `http_error`: an HTTP error answer without the gateway's JSON error body (a proxy's);
 * - `connection_lost`: gave up reconnecting (`maxAttempts` in a row without an event);
 * - `connection_failed`: the stream could not be opened (a refused EventSource, a
 *   network that never answered `POST /v1/generations`);
 * - `bad_event`: the server sent something that is not an event (SSE data not JSON …);
 * - `too_many_steps`: `runAgent` reached `maxSteps` and the model still asks for tools.
 */
export type ClientErrorCode =
  | 'http_error'
  | 'connection_lost'
  | 'connection_failed'
  | 'bad_event'
  | 'too_many_steps';

/** `GatewayError.code`: a contract code, or one of the client's own. */
export type GatewayErrorCode = ErrorCode | ClientErrorCode;

/** What `onStatus` reports as a stream goes on. */
export type StreamStatus = 'connecting' | 'streaming' | 'reconnecting' | 'resuming' | 'cancelling';

/** The second argument of `onStatus`: the reconnect attempt, and why, when there is one. */
export interface StatusInfo {
  attempt?: number;
  error?: string;
}

/** Token counts of a generation (`done.usage`). */
export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

// ---------------------------------------------------------------- events --

/** Fields every event of the log has. */
export interface EventBase {
  /** 0 for `start`, then 1, 2, … for each event, the terminal one last. */
  seq: number;
  /** On every WebSocket event (and always on `start`). */
  generation_id?: string;
  /** On WebSocket events: the `request_id` of the `generate` or `resume` message. */
  request_id?: string;
}

export interface StartEvent extends EventBase {
  type: 'start';
  generation_id: string;
  model: string;
  /** Unix seconds. */
  created: number;
}

/** A delta of the answer (any Unicode, may contain newlines). */
export interface TokenEvent extends EventBase {
  type: 'token';
  text: string;
}

/** A delta of the model's visible thinking. */
export interface ReasoningEvent extends EventBase {
  type: 'reasoning';
  text: string;
}

/**
 * A fragment of a tool call: `id` and `name` on the first fragment of each `index`;
 * the `arguments` fragments of one index concatenate to the call's JSON arguments.
 */
export interface ToolCallEvent extends EventBase {
  type: 'tool_call';
  index: number;
  id?: string;
  name?: string;
  arguments: string;
}

export interface DoneEvent extends EventBase {
  type: 'done';
  finish_reason: FinishReason;
  usage: Usage;
  /** Absent on the server's `done`; `true` on a `LocalDoneEvent`. */
  local?: undefined;
}

/** The terminal `error` event (named so as not to shadow the DOM's `ErrorEvent`). */
export interface StreamErrorEvent extends EventBase {
  type: 'error';
  code: ErrorCode;
  message: string;
  retryable: boolean;
}

/** One event of a generation's log, discriminated by `type`. */
export type StreamEvent =
  | StartEvent
  | TokenEvent
  | ReasoningEvent
  | ToolCallEvent
  | DoneEvent
  | StreamErrorEvent;

export type StreamEventType = StreamEvent['type'];

/**
 * The end of a stream the server did not confirm: a cancel whose `done{cancelled}` did
 * not arrive within `cancelTimeoutMs` (or came before the generation existed), or a
 * resume answered 204 (`unknown`: the terminal event had been delivered, and lost).
 */
export interface LocalDoneEvent {
  type: 'done';
  finish_reason: 'cancelled' | 'unknown';
  local: true;
  seq?: undefined;
  usage?: undefined;
}

// --------------------------------------------------------------- request --

/** A part of an array `content` (OpenAI's shape); parts other than text go as given. */
export interface ContentPart {
  type: string;
  text?: string;
  [field: string]: unknown;
}

export type MessageContent = string | ContentPart[];

/** A call an assistant message made (OpenAI's chat shape), sent back with the conversation. */
export interface AssistantToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

export interface SystemMessage {
  role: 'system' | 'developer';
  content: MessageContent;
  name?: string;
}

export interface UserMessage {
  role: 'user';
  content: MessageContent;
  name?: string;
}

export interface AssistantMessage {
  role: 'assistant';
  /** `null` (or absent) when the message only carries `tool_calls`. */
  content?: MessageContent | null;
  name?: string;
  tool_calls?: AssistantToolCall[];
  refusal?: string | null;
  reasoning_content?: string | null;
  reasoning?: string | null;
}

export interface ToolMessage {
  role: 'tool';
  tool_call_id: string;
  content: MessageContent;
  name?: string;
}

/** A message of the conversation (OpenAI's chat shape). */
export type ChatMessage = SystemMessage | UserMessage | AssistantMessage | ToolMessage;

/** A JSON schema (what a tool's `parameters` holds). */
export type JSONSchema = Record<string, unknown>;

/** A tool offered to the model (OpenAI's `tools` entries). */
export interface ToolDefinition {
  type: 'function';
  function: {
    name: string;
    description?: string;
    parameters?: JSONSchema;
    strict?: boolean;
  };
}

export type ToolChoice =
  | 'none'
  | 'auto'
  | 'required'
  | { type: 'function'; function: { name: string } };

export type ResponseFormat =
  | { type: 'text' | 'json_object' }
  | { type: 'json_schema'; json_schema: Record<string, unknown> };

export type ReasoningEffort = 'none' | 'minimal' | 'low' | 'medium' | 'high' | 'xhigh';

/** The request fields besides the input (`prompt` or `messages`). */
export interface GenerationSettings {
  /** Default: the gateway's first configured model. */
  model?: string;
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  /** Up to 4 non-empty stop sequences. */
  stop?: string | string[];
  seed?: number;
  /** What happens when the last client leaves an unfinished generation. */
  on_disconnect?: 'cancel' | 'finish';
  tools?: ToolDefinition[];
  tool_choice?: ToolChoice;
  parallel_tool_calls?: boolean;
  response_format?: ResponseFormat;
  reasoning_effort?: ReasoningEffort;
}

/** A request body: the settings and exactly one of `prompt` (one user message) and `messages`. */
export type GenerationRequest = GenerationSettings &
  (
    | { prompt: string; messages?: undefined }
    | { messages: ChatMessage[]; prompt?: undefined }
  );

// --------------------------------------------------------------- options --

/**
 * A credential, or a function giving one (called on every use, so it may refresh a JWT).
 * Empty, `null` and `undefined` mean none.
 */
export type Credential =
  | string
  | null
  | undefined
  | (() => string | null | undefined | Promise<string | null | undefined>);

/** Where the gateway is and how to authenticate (every function that talks to it takes these). */
export interface ConnectionOptions {
  /** The gateway's origin (and path prefix); default: this page's origin. */
  baseUrl?: string;
  /**
   * An API key or JWT, sent as `Authorization: Bearer` on fetch requests; EventSource
   * and WebSocket URLs get a stream ticket minted with it (`POST /v1/tickets`) before
   * each (re)connect. A page that holds only a ticket passes it here (and uses `ws`).
   */
  token?: Credential;
  /** Extra headers for fetch requests (they make `sse: 'auto'` use fetch). */
  headers?: Record<string, string>;
  /** Send cookies cross-origin (cookie auth). */
  withCredentials?: boolean;
}

/** Reconnect and cancel tuning (defaults in parentheses). */
export interface RetryOptions {
  /** Reconnects in a row without receiving an event before giving up (8). */
  maxAttempts?: number;
  /** First backoff delay, doubled per attempt, with jitter (250). */
  baseDelayMs?: number;
  /** Backoff ceiling (5000). */
  maxDelayMs?: number;
  /** How long to wait for the server's `done{cancelled}` after a cancel (3000). */
  cancelTimeoutMs?: number;
  /** A shared WebSocket with no stream left closes after this (30000). */
  wsIdleMs?: number;
}

/** The callbacks of `stream` (and `runAgent`, `streamEvents`). */
export interface StreamCallbacks {
  onToken?: (text: string, ev: TokenEvent) => void;
  /** A delta of the model's visible thinking. */
  onReasoning?: (text: string, ev: ReasoningEvent) => void;
  /** A `tool_call` fragment arrived; `call` is its call as assembled so far. */
  onToolCallDelta?: (call: ToolCallSoFar, ev: ToolCallEvent) => void;
  /** A complete call, once per index, when `done{finish_reason: "tool_calls"}` arrives. */
  onToolCall?: (call: ToolCall, ev: DoneEvent) => void;
  onDone?: (ev: DoneEvent | LocalDoneEvent) => void;
  onError?: (err: GatewayError) => void;
  /** Every event, once (duplicates after a resume are dropped). */
  onEvent?: (ev: StreamEvent) => void;
  onStatus?: (state: StreamStatus, info: StatusInfo) => void;
}

export interface StreamOptions extends ConnectionOptions, RetryOptions, StreamCallbacks {
  /** Default `sse`. */
  transport?: Transport;
  /** Default `auto`. */
  sse?: SSEMode;
  body: GenerationRequest;
  /** Aborting cancels the generation on the server; the stream resolves with `cancelled`. */
  signal?: AbortSignal;
  /** A stream ticket for EventSource and WebSocket URLs (default: minted with `token`). */
  ticket?: Credential;
}

/** What `stream` resolves with. */
export interface StreamResult {
  /** The answer's text. */
  text: string;
  /** The model's visible thinking. */
  reasoning: string;
  /** The complete calls when `finishReason` is `tool_calls`, else `[]`. */
  toolCalls: ToolCall[];
  generationId: string | null;
  /** `unknown` only when a resume found the terminal event delivered already (204). */
  finishReason: FinishReason | 'unknown';
  usage: Usage | null;
  /** Events received (duplicates not counted). */
  events: number;
  /** `token` events received. */
  tokens: number;
  /** How many times the stream was resumed after a drop. */
  resumes: number;
  /** False when the end is the client's own (`LocalDoneEvent`), not the server's `done`. */
  confirmed: boolean;
}

// ----------------------------------------------------------------- errors --

export interface GatewayErrorInfo {
  retryable?: boolean;
  status?: number | null;
  event?: StreamErrorEvent | null;
}

/** Every failure `stream`, `runAgent` and the HTTP helpers report. */
export declare class GatewayError extends Error {
  constructor(code: GatewayErrorCode, message: string, info?: GatewayErrorInfo);
  name: 'GatewayError';
  code: GatewayErrorCode;
  /** Asking again may succeed (429, 5xx, `shutting_down`, lost connections). */
  retryable: boolean;
  /** The HTTP status, when the error was an HTTP answer. */
  status: number | null;
  /** The `error` event, when the error arrived as one. */
  event: StreamErrorEvent | null;
  /** The text received before the failure (set by `stream`). */
  text: string;
  generationId: string | null;
  /** Set by `runAgent`: the conversation up to the failure. */
  messages?: ChatMessage[];
  /** Set by `runAgent`: the model call that failed (or the last one, `too_many_steps`). */
  steps?: number;
  /** Set by `runAgent` with `too_many_steps`: the calls the model asked for last. */
  toolCalls?: ToolCall[];
}

// ---------------------------------------------------------------- parsers --

/** One dispatched Server-Sent Event. */
export interface SSEMessage {
  /** The `event:` field, `message` by default. */
  type: string;
  /** The `data:` lines joined with "\n". */
  data: string;
  /** The last event id (it persists across events). */
  id: string;
}

export interface SSEParserHandlers {
  onEvent?: (ev: SSEMessage) => void;
  onRetry?: (ms: number) => void;
  onComment?: (text: string) => void;
}

export interface SSEParser {
  /** Feed text or bytes (streaming UTF-8); returns the events completed by them. */
  push(chunk: string | Uint8Array): SSEMessage[];
  /** End of stream: flushes the decoder; an unterminated event is discarded. */
  end(): SSEMessage[];
  readonly lastEventId: string;
  readonly retry: number | null;
}

/** A WHATWG-conformant Server-Sent Events parser. */
export declare function createSSEParser(handlers?: SSEParserHandlers): SSEParser;

export interface NDJSONSplitterHandlers<T = unknown> {
  onValue?: (value: T) => void;
}

export interface NDJSONSplitter<T = unknown> {
  /** Feed text or bytes; returns the values of the lines completed. Throws SyntaxError on a non-JSON line. */
  push(chunk: string | Uint8Array): T[];
  /** Clean end of stream: a last line without a newline is still a value. */
  end(): T[];
}

/**
 * Splits an NDJSON stream into parsed values (blank heartbeat lines skipped).
 * `T` is what the lines are trusted to hold (nothing is validated).
 */
export declare function createNDJSONSplitter<T = unknown>(
  handlers?: NDJSONSplitterHandlers<T>,
): NDJSONSplitter<T>;

// ------------------------------------------------------------- tool calls --

/**
 * A tool call's parsed arguments: a JSON object. Values are whatever the model sent
 * (only the schema's `required` keys are checked, by `ToolRegistry.call`).
 */
export type ToolArgs = Record<string, any>;

export type ParsedToolArguments =
  | { args: ToolArgs; error?: undefined }
  | { args?: undefined; error: string };

/** `{args}` (an empty string is `{}`), or `{error}` when not JSON or not an object. */
export declare function parseToolArguments(text: string | null | undefined): ParsedToolArguments;

/** A call as assembled so far from its fragments (`id`, `name` null until seen). */
export interface ToolCallSoFar {
  index: number;
  id: string | null;
  name: string | null;
  /** The arguments' JSON text so far. */
  arguments: string;
}

/** A complete call: its arguments parsed (`args`), or why they could not be (`error`). */
export type ToolCall = {
  index: number;
  /** The model's id, or `call_<index>` if it gave none. */
  id: string;
  /** Null only for a call without a name (then `error` says so). */
  name: string | null;
  /** The arguments' JSON text. */
  arguments: string;
} & ParsedToolArguments;

/** What the assembler takes: a `tool_call` event, or any fragment of that shape. */
export interface ToolCallFragment {
  index?: number;
  id?: string | null;
  name?: string | null;
  arguments?: string;
}

export interface ToolCallAssembler {
  /** Take one fragment; returns a copy of its call as assembled so far. */
  push(ev: ToolCallFragment): ToolCallSoFar;
  /** Copies of the calls so far, in index order. */
  readonly calls: ToolCallSoFar[];
  /** How many calls (indexes) were seen. */
  readonly size: number;
  /** The complete calls, in index order, with their arguments parsed or an `error`. */
  finish(): ToolCall[];
}

/** Assembles `tool_call` fragments per `index` (fragments of several calls may interleave). */
export declare function createToolCallAssembler(): ToolCallAssembler;

// --------------------------------------------------------------- streams --

/**
 * Stream one generation, resumed after drops, de-duplicated by seq.
 * Rejects with a GatewayError (`err.text` holds the partial text); with a TypeError for
 * a missing `body` or an unknown transport; with a DOMException `AbortError` when
 * `signal` was aborted before the start.
 */
export declare function stream(options: StreamOptions): Promise<StreamResult>;

/**
 * The same stream as an async iterator of events (`start`, …, `done`); an `error` event
 * is yielded, then thrown as a GatewayError. Leaving the loop early cancels the generation.
 */
export declare function streamEvents(
  options: StreamOptions,
): AsyncGenerator<StreamEvent, void, undefined>;

/** `DELETE /v1/generations/{id}`: cancel a generation (idempotent: 404 is fine too). */
export declare function deleteGeneration(
  options: ConnectionOptions,
  generationId: string,
): Promise<void>;

/**
 * `DELETE /v1/stream/ui/{chatId}/stream`: the explicit stop of the AI SDK UI stream route
 * (`POST /v1/stream/ui`, what `useChat` talks to), which `useChat`'s `stop()`, a mere
 * fetch abort, cannot express. Resolves `true` when the chat's running generation was
 * cancelled (200), `false` when nothing was running (204); rejects with a GatewayError
 * (the gateway's error code and HTTP status) for any other answer, and with a TypeError
 * for an empty `chatId`.
 */
export declare function stopChat(options: ConnectionOptions, chatId: string): Promise<boolean>;

/** `GET /v1/models`: the model ids. */
export declare function listModels(options?: ConnectionOptions): Promise<string[]>;

/** Close every shared WebSocket (their streams are resumed if used again). */
export declare function closeSockets(): void;

// ----------------------------------------------------------- agent loop --

/** What a tool's `run` gets besides its arguments. */
export interface ToolContext {
  /** The run's signal: aborted when the user stops. */
  signal?: AbortSignal;
  /** The call being run. */
  call: ToolCallInput;
}

/**
 * A tool: its name (1 to 64 of `[A-Za-z0-9_-]`), what the model is told, and the function
 * that runs it. `run` may be async; its JSON-serializable result goes back to the model.
 * Annotate `run`'s parameter to narrow `Args`.
 */
export interface ToolSpec<Args extends ToolArgs = ToolArgs> {
  name: string;
  description?: string;
  /** A JSON schema; default: an object without properties. */
  parameters?: JSONSchema;
  run: (args: Args, context: ToolContext) => unknown;
}

/** A registered tool (`description` and `parameters` filled in). */
export interface RegisteredTool {
  name: string;
  description: string;
  parameters: JSONSchema;
  run: (args: ToolArgs, context: ToolContext) => unknown;
}

/** What `ToolRegistry.call` takes: a complete call (as `onToolCall` gives it) or its like. */
export interface ToolCallInput {
  index?: number;
  id?: string | null;
  name?: string | null;
  /** The JSON arguments, parsed when `args` is absent. */
  arguments?: string;
  args?: ToolArgs;
  error?: string;
}

/** A tool's outcome; `content` (the JSON of the result, or of `{error}`) goes to the model. */
export type ToolOutcome =
  | { result: unknown; error?: undefined; content: string }
  | { result?: undefined; error: string; content: string };

/** The app's tool functions, by name. */
export declare class ToolRegistry {
  constructor(tools?: ReadonlyArray<ToolSpec<any>>);
  readonly tools: Map<string, RegisteredTool>;
  /** Throws a TypeError for a bad name or a missing `run`. */
  register<Args extends ToolArgs = ToolArgs>(tool: ToolSpec<Args>): this;
  readonly size: number;
  has(name: string): boolean;
  /** OpenAI's `tools` field. */
  definitions(): ToolDefinition[];
  /** Run one call. Never rejects: a failure is `{error}`. */
  call(call: ToolCallInput, options?: { signal?: AbortSignal }): Promise<ToolOutcome>;
}

/** The assistant message that records a step's tool calls (OpenAI's chat shape). */
export declare function assistantToolMessage(
  text: string | null | undefined,
  calls: ReadonlyArray<{ id: string; name: string | null; arguments?: string }>,
): AssistantMessage & { content: string | null; tool_calls: AssistantToolCall[] };

/** The options of `runAgent` besides the conversation and `body`. */
export interface RunAgentCommonOptions extends Omit<StreamOptions, 'body'> {
  /** The app's tools: a registry, or specs for one. */
  tools?: ToolRegistry | ReadonlyArray<ToolSpec<any>>;
  /** Model calls at most (5); a model still asking for tools at the last ends with `too_many_steps`. */
  maxSteps?: number;
  /** A model call starts (step 1, 2, …). */
  onStep?: (info: { step: number; messages: ChatMessage[] }) => void;
  /** A tool has run. */
  onToolResult?: (call: ToolCall, outcome: ToolOutcome, step: number) => void;
}

/**
 * The options of `runAgent`: everything `stream` takes, and the conversation, either as
 * `messages` (then `body` holds only settings) or in `body` (`messages` or `prompt`).
 */
export type RunAgentOptions = RunAgentCommonOptions &
  (
    | {
        /** The conversation so far; the caller's array is not changed. */
        messages: ChatMessage[];
        body?: GenerationSettings & { prompt?: string; messages?: ChatMessage[] };
      }
    | { messages?: undefined; body: GenerationRequest }
  );

/** What `runAgent` resolves with. */
export interface RunAgentResult {
  /** The final answer's text. */
  text: string;
  /** The conversation with this turn appended (tool calls, tool results, the answer). */
  messages: ChatMessage[];
  /** Model calls made. */
  steps: number;
  finishReason: FinishReason | 'unknown';
  /** Summed over the steps. */
  usage: Usage | null;
  /** Each step's `stream` result. */
  results: StreamResult[];
  events: number;
  tokens: number;
  resumes: number;
  /** Every tool call of the turn, in order. */
  toolCalls: ToolCall[];
}

/**
 * The agent loop: stream with the tools; when the model answers with tool calls, run
 * them, append the assistant message and one `tool` message per call, and call the model
 * again, until it answers in text (at most `maxSteps` calls). Rejects with a GatewayError
 * whose `messages` holds the conversation up to the failure.
 */
export declare function runAgent(options: RunAgentOptions): Promise<RunAgentResult>;
