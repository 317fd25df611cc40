// Unit tests of the SSE parser against the WHATWG "parsing an event stream" rules.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { createSSEParser } from '../../gateway/static/gateway-client.js';

/** Feed `chunks` (strings or bytes) and collect every dispatched event. */
function parseAll(chunks, handlers) {
  const parser = createSSEParser(handlers);
  const events = [];
  for (const chunk of chunks) events.push(...parser.push(chunk));
  events.push(...parser.end());
  return { events, parser };
}

const GATEWAY_STREAM =
  'retry: 1000\nid: gen_abc:0\nevent: start\ndata: {"type":"start","seq":0}\n\n' +
  ': ping\n\n' +
  'id: gen_abc:1\nevent: token\ndata: {"type":"token","seq":1,"text":"Hé\\n🚀"}\n\n' +
  'id: gen_abc:2\nevent: done\ndata: {"type":"done","seq":2,"finish_reason":"stop"}\n\n';

test('a gateway stream: id, event, data, retry and a ping comment', () => {
  const comments = [];
  const retries = [];
  const { events, parser } = parseAll([GATEWAY_STREAM], {
    onComment: (c) => comments.push(c),
    onRetry: (ms) => retries.push(ms),
  });
  assert.deepEqual(
    events.map((e) => [e.type, e.id]),
    [
      ['start', 'gen_abc:0'],
      ['token', 'gen_abc:1'],
      ['done', 'gen_abc:2'],
    ],
  );
  assert.equal(JSON.parse(events[1].data).text, 'Hé\n🚀');
  assert.deepEqual(comments, [' ping']);
  assert.deepEqual(retries, [1000]);
  assert.equal(parser.retry, 1000);
  assert.equal(parser.lastEventId, 'gen_abc:2');
});

test('CRLF, CR and LF line endings give the same events', () => {
  const lf = 'event: a\ndata: 1\n\ndata: 2\ndata: 3\n\n';
  const expected = parseAll([lf]).events;
  assert.equal(expected.length, 2);
  for (const ending of ['\r\n', '\r']) {
    assert.deepEqual(parseAll([lf.replaceAll('\n', ending)]).events, expected, ending);
  }
  // mixed in one stream
  assert.deepEqual(parseAll(['event: a\r\ndata: 1\r\rdata: 2\ndata: 3\r\n\n']).events, expected);
});

test('a CRLF split between two chunks is one line end, not two', () => {
  const { events } = parseAll(['data: x\r', '\ndata: y\r', '\n\r', '\n']);
  assert.deepEqual(events, [{ type: 'message', data: 'x\ny', id: '' }]);
});

test('a CR at the end of a chunk followed by another line is a line end', () => {
  const { events } = parseAll(['data: x\r', 'data: y\r', '\r']);
  assert.deepEqual(events, [{ type: 'message', data: 'x\ny', id: '' }]);
});

test('every split point of the byte stream gives the same events', () => {
  const bytes = new TextEncoder().encode(GATEWAY_STREAM.replaceAll('\n', '\r\n'));
  const whole = parseAll([bytes]).events;
  assert.equal(whole.length, 3);
  for (let i = 0; i <= bytes.length; i++) {
    for (const j of [i, Math.min(bytes.length, i + 1), Math.min(bytes.length, i + 7)]) {
      const chunks = [bytes.slice(0, i), bytes.slice(i, j), bytes.slice(j)];
      assert.deepEqual(parseAll(chunks).events, whole, `split at ${i}/${j}`);
    }
  }
});

test('a UTF-8 character split across chunks is decoded once', () => {
  const bytes = new TextEncoder().encode('data: 🚀é\n\n');
  const chunks = [...bytes].map((b) => Uint8Array.of(b)); // one byte per chunk
  assert.deepEqual(parseAll(chunks).events, [{ type: 'message', data: '🚀é', id: '' }]);
});

test('multi-line data joins with newlines; empty data lines count', () => {
  const { events } = parseAll(['data: a\ndata\ndata:\ndata:  b\n\n']);
  assert.deepEqual(events, [{ type: 'message', data: 'a\n\n\n b', id: '' }]);
  // `data` without a value still dispatches an event with empty data
  assert.deepEqual(parseAll(['data\n\n']).events, [{ type: 'message', data: '', id: '' }]);
});

test('only one space after the colon is removed; a field without colon has an empty value', () => {
  const { events } = parseAll(['event:x\ndata:no space\ndata:  two\n\n']);
  assert.deepEqual(events, [{ type: 'x', data: 'no space\n two', id: '' }]);
});

test('comments are ignored and do not dispatch', () => {
  const comments = [];
  const { events } = parseAll([':hello\n: ping\n\n:x\ndata: 1\n:inner\n\n'], {
    onComment: (c) => comments.push(c),
  });
  assert.deepEqual(events, [{ type: 'message', data: '1', id: '' }]);
  assert.deepEqual(comments, ['hello', ' ping', 'x', 'inner']);
});

test('an event without data is not dispatched, and its type does not leak', () => {
  const { events } = parseAll(['event: lonely\n\ndata: 1\n\n']);
  assert.deepEqual(events, [{ type: 'message', data: '1', id: '' }]);
});

test('the event type resets after each dispatch', () => {
  const { events } = parseAll(['event: token\ndata: 1\n\ndata: 2\n\n']);
  assert.deepEqual(
    events.map((e) => e.type),
    ['token', 'message'],
  );
});

test('id persists across events, an empty id resets it, an id with NUL is ignored', () => {
  const { events } = parseAll([
    'id: 1\ndata: a\n\ndata: b\n\nid: 2\0x\ndata: c\n\nid\ndata: d\n\nid: 3\n\n',
  ]);
  assert.deepEqual(
    events.map((e) => [e.data, e.id]),
    [
      ['a', '1'],
      ['b', '1'],
      ['c', '1'],
      ['d', ''],
    ],
  );
});

test('an id-only block updates the last event id without dispatching', () => {
  const { events, parser } = parseAll(['id: gen_x:5\n\n']);
  assert.deepEqual(events, []);
  assert.equal(parser.lastEventId, 'gen_x:5');
});

test('retry takes ASCII digits only', () => {
  const retries = [];
  const { parser } = parseAll(['retry: 250\nretry: 10a\nretry: -5\nretry: \nretry:1.5\n\n'], {
    onRetry: (ms) => retries.push(ms),
  });
  assert.deepEqual(retries, [250]);
  assert.equal(parser.retry, 250);
});

test('unknown fields are ignored', () => {
  const { events } = parseAll(['foo: bar\ndata: 1\nData: 2\n\n']);
  assert.deepEqual(events, [{ type: 'message', data: '1', id: '' }]);
});

test('an unterminated event at the end of the stream is discarded', () => {
  assert.deepEqual(parseAll(['data: 1\n\ndata: 2\n']).events, [
    { type: 'message', data: '1', id: '' },
  ]);
  assert.deepEqual(parseAll(['data: 1\n\ndata: 2']).events.length, 1);
});

test('a leading byte order mark is dropped, for bytes and for strings', () => {
  const expected = [{ type: 'message', data: 'x', id: '' }];
  assert.deepEqual(parseAll(['\uFEFFdata: x\n\n']).events, expected);
  assert.deepEqual(parseAll([new Uint8Array([0xef, 0xbb, 0xbf]), 'data: x\n\n']).events, expected);
  // only at the start: a later U+FEFF is part of the field name (ignored field)
  assert.deepEqual(parseAll(['data: x\n\n\uFEFFdata: y\n\n']).events, expected);
});

test('onEvent sees the same events push returns', () => {
  const seen = [];
  const parser = createSSEParser({ onEvent: (e) => seen.push(e) });
  const returned = parser.push('data: 1\n\ndata: 2\n\n');
  assert.deepEqual(seen, returned);
  assert.equal(seen.length, 2);
});
