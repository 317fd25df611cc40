// demo.js: the demo chat page (index.html) over gateway-client.js.
//
// A conversation: every turn sends the whole `messages` history. The model's
// thinking streams into a collapsed <details>, each tool call is a card (name,
// arguments, result) and the two browser tools run here, through runAgent.
// Model text only ever goes in as text nodes (see chat-render.js).
import { listModels, runAgent, ToolRegistry } from '/static/gateway-client.js';
import { renderText } from '/static/chat-render.js';
import { DEMO_TOOLS } from '/static/demo-tools.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
for (const [param, id] of [['transport', 'transport'], ['prompt', 'prompt'],
                           ['max_tokens', 'max-tokens'], ['seed', 'seed']]) {
  if (params.has(param)) $(id).value = params.get(param);
}
if (params.get('tools') === '0') $('tools').checked = false;

const registry = new ToolRegistry(DEMO_TOOLS);
/** The conversation so far, in OpenAI's chat shape (what the next turn sends). */
let conversation = [];
let controller = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(state, detail) {
  const status = $('status');
  status.dataset.state = state;
  status.textContent = detail ? `${state} · ${detail}` : state;
}

let scrollPending = false;
/** Keep the newest text in view while it streams, unless the reader scrolled up. */
function followOutput() {
  if (scrollPending) return;
  const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
  if (!atBottom) return;
  scrollPending = true;
  requestAnimationFrame(() => {
    scrollPending = false;
    window.scrollTo(0, document.body.scrollHeight);
  });
}

/** A tool's arguments or result for its card: strings as they are, the rest as JSON. */
function pretty(value) {
  if (typeof value === 'string') return value;
  return JSON.stringify(value, null, 2) ?? 'null';
}

/** One assistant turn in the chat: its steps (thinking, text, tool cards) and an inline error. */
class TurnView {
  constructor(chat) {
    for (const id of ['output', 'answer', 'error']) {
      const previous = $(id);
      if (previous) previous.removeAttribute('id');
    }
    this.root = el('div', 'msg assistant');
    this.root.id = 'output';
    this.error = el('span', 'error');
    this.error.id = 'error';
    this.error.setAttribute('role', 'alert');
    this.error.hidden = true;
    this.root.append(this.error);
    chat.append(this.root);
    this.answer = null;
    this.cards = new Map();
    this.allCards = [];
  }

  startStep(step) {
    if (this.answer) this.answer.removeAttribute('id');
    this.endThinking();
    this.step = step;
    this.answer = el('div', 'answer');
    this.answer.id = 'answer';
    this.answer.dataset.step = String(step);
    this.text = '';
    this.thinking = null;
    this.cards = new Map();
    this.error.before(this.answer);
  }

  reasoning(delta) {
    if (!this.thinking) {
      const details = el('details', 'thinking');
      const summary = el('summary', null, 'Thinking…');
      const body = el('div', 'reasoning');
      body.append(document.createTextNode(''));
      details.append(summary, body);
      details.dataset.state = 'thinking';
      this.answer.before(details);
      this.thinking = { details, summary, body, started: performance.now(), ended: false };
    }
    this.thinking.body.firstChild.appendData(delta);
  }

  endThinking() {
    const t = this.thinking;
    if (!t || t.ended) return;
    t.ended = true;
    t.details.dataset.state = 'done';
    t.summary.textContent = `Thought for ${((performance.now() - t.started) / 1000).toFixed(1)} s`;
  }

  token(delta) {
    this.endThinking();
    this.text += delta;
    renderText(this.answer, this.text);
  }

  card(index) {
    let card = this.cards.get(index);
    if (card) return card;
    const root = el('div', 'tool-card');
    root.dataset.state = 'calling';
    const head = el('div', 'tool-head');
    const name = el('span', 'tool-name', '…');
    const state = el('span', 'tool-state', 'calling…');
    head.append(el('span', 'tool-icon', 'ƒ'), name, state);
    const args = el('pre', 'tool-args', '');
    const resultBox = el('div', 'tool-section');
    const result = el('pre', 'tool-result');
    resultBox.append(el('span', 'label', 'result'), result);
    resultBox.hidden = true;
    const argsBox = el('div', 'tool-section');
    argsBox.append(el('span', 'label', 'arguments'), args);
    root.append(head, argsBox, resultBox);
    this.error.before(root);
    card = { root, name, state, args, result, resultBox };
    this.cards.set(index, card);
    this.allCards.push(card);
    return card;
  }

  toolDelta(call) {
    this.endThinking();
    const card = this.card(call.index);
    if (call.name) {
      card.name.textContent = call.name;
      card.root.dataset.tool = call.name;
    }
    card.args.textContent = call.arguments;
  }

  toolCall(call) {
    const card = this.card(call.index);
    card.root.dataset.state = 'running';
    card.state.textContent = 'running…';
    card.args.textContent = call.error ? `${call.arguments}\n⚠ ${call.error}` : pretty(call.args);
  }

  toolResult(call, outcome) {
    const card = this.card(call.index);
    card.root.dataset.state = outcome.error === undefined ? 'done' : 'error';
    card.state.textContent = outcome.error === undefined ? 'done' : 'failed';
    card.result.textContent = outcome.error === undefined ? pretty(outcome.result) : outcome.error;
    card.resultBox.hidden = false;
  }

  finish() {
    this.endThinking();
    for (const card of this.allCards) {
      if (card.root.dataset.state === 'calling' || card.root.dataset.state === 'running') {
        card.root.dataset.state = 'incomplete';
        card.state.textContent = 'not run';
      }
    }
  }

  fail(err) {
    this.finish();
    // Inline, right after the text received so far (which stays).
    if (this.answer) this.answer.after(this.error);
    this.error.textContent = ` ⚠ ${err.code || 'error'}: ${err.message}`;
    this.error.hidden = false;
  }
}

function addUserMessage(text) {
  const turn = el('div', 'msg user');
  turn.append(el('div', 'bubble', text));
  $('chat').append(turn);
}

async function loadModels() {
  try {
    const ids = await listModels({ token: $('token').value });
    const select = $('model');
    select.replaceChildren(...ids.map((id) => new Option(id, id)));
    const wanted = params.get('model');
    if (wanted && ids.includes(wanted)) select.value = wanted;
    document.body.dataset.ready = 'true';
  } catch (err) {
    setStatus('error', `models: ${err.message}`);
  }
}

async function send(event) {
  event.preventDefault();
  if (controller) return;
  const prompt = $('prompt').value;
  if (!prompt.trim()) return;
  const hint = $('hint');
  if (hint) hint.remove();
  addUserMessage(prompt);
  const view = new TurnView($('chat'));
  $('prompt').value = '';
  for (const id of ['ttft', 'tps']) $(id).textContent = '–';
  for (const id of ['tokens', 'reasoning-tokens', 'events', 'steps', 'resumes']) {
    $(id).textContent = '0';
  }

  const body = { model: $('model').value || undefined };
  if ($('max-tokens').value) body.max_tokens = Number($('max-tokens').value);
  if ($('seed').value) body.seed = Number($('seed').value);
  const choice = $('transport').value;
  const started = performance.now();
  let firstAt = null; // the turn's first output (thinking, text or a tool call)
  let stepFirstAt = null; // tokens/s is per step: tools run between steps
  let stepDeltas = 0;
  let tokens = 0;
  let thoughts = 0;
  let events = 0;
  const output = () => {
    const now = performance.now();
    if (firstAt === null) {
      firstAt = now;
      $('ttft').textContent = `${Math.round(now - started)} ms`;
    }
    if (stepFirstAt === null) stepFirstAt = now;
    stepDeltas += 1;
    if (now > stepFirstAt) {
      $('tps').textContent = ((stepDeltas - 1) / ((now - stepFirstAt) / 1000)).toFixed(1);
    }
    followOutput();
  };

  controller = new AbortController();
  $('send').disabled = true;
  $('stop').disabled = false;
  $('new-chat').disabled = true;
  setStatus('connecting');
  try {
    const result = await runAgent({
      transport: choice === 'sse-fetch' ? 'sse' : choice,
      sse: choice === 'sse-fetch' ? 'fetch' : 'auto',
      body,
      messages: [...conversation, { role: 'user', content: prompt }],
      tools: $('tools').checked ? registry : [],
      token: $('token').value || undefined,
      signal: controller.signal,
      onStep: ({ step }) => {
        view.startStep(step);
        $('steps').textContent = String(step);
        stepFirstAt = null;
        stepDeltas = 0;
      },
      onStatus: (state, info) => setStatus(state, info.attempt ? `attempt ${info.attempt}` : ''),
      onEvent: () => {
        $('events').textContent = String(++events);
      },
      onReasoning: (delta) => {
        output();
        view.reasoning(delta);
        $('reasoning-tokens').textContent = String(++thoughts);
      },
      onToken: (delta) => {
        output();
        view.token(delta);
        $('tokens').textContent = String(++tokens);
      },
      onToolCallDelta: (call) => {
        if (firstAt === null) output();
        view.toolDelta(call);
      },
      onToolCall: (call) => {
        view.toolCall(call);
        setStatus('tools', `running ${call.name}`);
      },
      onToolResult: (call, outcome) => view.toolResult(call, outcome),
    });
    conversation = result.messages;
    view.finish();
    $('resumes').textContent = String(result.resumes);
    const usage = result.usage ? `, ${result.usage.completion_tokens} tokens` : '';
    const steps = result.steps > 1 ? `, ${result.steps} steps` : '';
    setStatus(result.finishReason === 'cancelled' ? 'cancelled' : 'done',
              `finish_reason ${result.finishReason}${usage}${steps}`);
  } catch (err) {
    // The conversation keeps what was completed, and the text received so far.
    if (Array.isArray(err.messages)) {
      conversation = err.messages;
      if (err.text) conversation.push({ role: 'assistant', content: err.text });
    }
    view.fail(err);
    setStatus('error', err.code || '');
  } finally {
    controller = null;
    $('send').disabled = false;
    $('stop').disabled = true;
    $('new-chat').disabled = false;
  }
}

function newChat() {
  if (controller) return;
  conversation = [];
  $('chat').replaceChildren();
  setStatus('idle');
  $('prompt').focus();
}

$('form').addEventListener('submit', send);
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('form').requestSubmit();
  }
});
$('stop').addEventListener('click', () => controller && controller.abort());
$('new-chat').addEventListener('click', newChat);
$('token').addEventListener('change', loadModels);
loadModels();
