import { useChat } from '@ai-sdk/react';
import {
  DefaultChatTransport,
  generateId,
  getToolName,
  isReasoningUIPart,
  isTextUIPart,
  isToolUIPart,
  lastAssistantMessageIsCompleteWithToolCalls,
} from 'ai';
// The gateway's own browser client (gateway/static), for its explicit stop.
import { stopChat } from 'gateway-client';
import { useEffect, useState } from 'react';

// One tool, run here in the browser: the model asks for it (the simulated model
// does when the question mentions the time), the page adds its output and useChat
// sends the conversation back for the model to go on.
const TOOLS = {
  get_current_time: {
    description: 'The current date and time where the user is',
    parameters: { type: 'object', properties: {} },
    run: () => ({ time: new Date().toString() }),
  },
};

// Gateway request fields (model, max_tokens, seed, tools in OpenAI's shape, …)
// ride along in every POST through the transport's `body`. `?model=…&max_tokens=…
// &seed=…` in the page's URL sets them, as on the gateway's own demo page.
const query = new URLSearchParams(location.search);
const requestFields = {
  model: query.get('model') ?? 'sim-1',
  tools: Object.entries(TOOLS).map(([name, { description, parameters }]) => ({
    type: 'function',
    function: { name, description, parameters },
  })),
};
for (const name of ['max_tokens', 'seed']) {
  if (query.has(name)) requestFields[name] = Number(query.get(name));
}

// POST /v1/stream/ui answers with the AI SDK's UI message stream. With
// `resume: true`, useChat also calls GET /v1/stream/ui/{chatId}/stream when it
// mounts: the gateway replays the chat's running generation from its start
// (the transport's default `resumeStreamIsReplay: true` says so), or answers
// 204 when nothing is running.
const transport = new DefaultChatTransport({ api: '/v1/stream/ui', body: requestFields });

// A reload must find the same chat id (that is what the resume request names)
// and the messages so far (the AI SDK keeps them in memory only). sessionStorage
// is per tab and survives reloads.
const CHAT_ID_KEY = 'react-chat:id';
const messagesKey = (chatId) => `react-chat:messages:${chatId}`;

function currentChatId() {
  let chatId = sessionStorage.getItem(CHAT_ID_KEY);
  if (!chatId) {
    chatId = generateId();
    sessionStorage.setItem(CHAT_ID_KEY, chatId);
  }
  return chatId;
}

function storedMessages(chatId) {
  return JSON.parse(sessionStorage.getItem(messagesKey(chatId)) ?? '[]');
}

export default function App() {
  const [chatId, setChatId] = useState(currentChatId);
  const newChat = () => {
    sessionStorage.removeItem(messagesKey(chatId));
    sessionStorage.removeItem(CHAT_ID_KEY);
    setChatId(currentChatId());
  };
  // A new id is a new useChat (it keys its Chat on `id`); `key` gives it fresh state too.
  return <Chat key={chatId} chatId={chatId} onNewChat={newChat} />;
}

function Chat({ chatId, onNewChat }) {
  const [initialMessages] = useState(() => storedMessages(chatId));
  const { messages, sendMessage, status, error, stop, addToolOutput } = useChat({
    id: chatId,
    messages: initialMessages,
    transport,
    resume: true,
    onToolCall: ({ toolCall: { toolName, toolCallId, input } }) => {
      const tool = TOOLS[toolName];
      // Not awaited: useChat calls this from inside its own update queue.
      if (tool) addToolOutput({ tool: toolName, toolCallId, output: tool.run(input) });
      else addToolOutput({ tool: toolName, toolCallId, state: 'output-error', errorText: 'no such tool' });
    },
    // Once every call has its output, send the conversation back for the answer.
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
  });
  const [input, setInput] = useState('');
  const busy = status === 'submitted' || status === 'streaming';

  // Saved as it streams, so a reload mid-answer still shows the question and the
  // answer so far. No duplicate when the resumed stream arrives: the assistant
  // message's id is the gateway's generation id (the stream's `start.messageId`),
  // and the replay starts with the same `start`, so the AI SDK resets that message
  // and rebuilds it in place from the replayed chunks instead of appending another.
  useEffect(() => {
    sessionStorage.setItem(messagesKey(chatId), JSON.stringify(messages));
  }, [chatId, messages]);

  const send = (event) => {
    event.preventDefault();
    if (!input.trim() || busy) return;
    sendMessage({ text: input });
    setInput('');
  };

  // useChat's stop() only aborts the fetch, and the gateway cannot tell that from
  // a dropped connection (a reload, a network blip), which it keeps running for
  // `streams.resume_grace_s` so the page can resume. stopChat sends the explicit
  // stop, DELETE /v1/stream/ui/{chatId}/stream, which cancels the generation: a
  // reload after Stop finds nothing to resume.
  const onStop = async () => {
    stop();
    try {
      await stopChat({}, chatId); // {} : same origin, no token; see gateway-client.js
    } catch (err) {
      console.warn('stop: the gateway refused it', err);
    }
  };

  return (
    <main>
      <header>
        <h1>useChat → gateway</h1>
        <span id="status" data-status={status}>
          {status}
        </span>
        <button type="button" id="new-chat" onClick={onNewChat} disabled={busy}>
          New chat
        </button>
      </header>

      <ol id="messages">
        {messages.map((message) => (
          <li key={message.id} className={`message ${message.role}`} data-role={message.role}>
            {message.parts.map((part, index) => (
              <Part key={index} part={part} />
            ))}
          </li>
        ))}
      </ol>

      {error && (
        <p id="error" role="alert">
          {error.message}
        </p>
      )}

      <form onSubmit={send}>
        <input
          id="prompt"
          value={input}
          onChange={(event) => setInput(event.target.value)}
          placeholder="Ask something…"
          autoFocus
        />
        <button id="send" type="submit" disabled={busy || !input.trim()}>
          Send
        </button>
        <button id="stop" type="button" onClick={onStop} disabled={!busy}>
          Stop
        </button>
      </form>
    </main>
  );
}

// React renders strings as text, never as HTML: model output cannot inject markup.
function Part({ part }) {
  if (isTextUIPart(part)) {
    return <p className="text">{part.text}</p>;
  }
  if (isReasoningUIPart(part)) {
    // Collapsed: the thinking is there to inspect, the answer is what matters.
    return (
      <details className="reasoning" data-state={part.state}>
        <summary>{part.state === 'streaming' ? 'Thinking…' : 'Thoughts'}</summary>
        <p>{part.text}</p>
      </details>
    );
  }
  if (isToolUIPart(part)) {
    // The gateway streams the model's tool calls (tool-input-* chunks); the page
    // runs them (onToolCall above) and the output shows up here.
    return (
      <div className="tool" data-state={part.state}>
        <code className="tool-name">{getToolName(part)}</code>{' '}
        <span className="tool-state">{part.state}</span>
        <pre className="tool-input">{JSON.stringify(part.input, null, 2)}</pre>
        {part.state === 'output-available' && (
          <pre className="tool-output">{JSON.stringify(part.output, null, 2)}</pre>
        )}
        {part.state === 'output-error' && <p className="tool-error">{part.errorText}</p>}
      </div>
    );
  }
  return null; // step-start and other parts carry nothing to show
}
