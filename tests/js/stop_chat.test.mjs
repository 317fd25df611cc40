// stopChat: the explicit stop of the AI SDK UI stream route, against a tiny
// node:http fake of `DELETE /v1/stream/ui/{chat_id}/stream` (200 with
// {"cancelled": true, "generation_id"} when it cancelled a running
// generation, 204 when the chat had nothing running, the contract's error
// body otherwise).
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { after, before, test } from 'node:test';

import { GatewayError, stopChat } from '../../gateway/static/gateway-client.js';

const KEY = 'gw_key_for_stop';
let server;
let base;
const requests = [];

function errorBody(status, code, message) {
  return [status, { error: { type: 'invalid_request_error', code, message } }];
}

// What the fake answers, by chat id (decoded from the path).
const ANSWERS = {
  running: [200, { cancelled: true, generation_id: 'gen_running' }],
  idle: [204, null],
  'no json': [200, 'cancelled'],
  refused: errorBody(401, 'unauthorized', 'a bearer is required'),
  draining: errorBody(503, 'shutting_down', 'the gateway is draining'),
  bad: errorBody(400, 'invalid_request', 'chat id too long'),
  proxy: [502, '<html>bad gateway</html>'],
};

before(async () => {
  server = createServer((req, res) => {
    requests.push({ method: req.method, url: req.url, headers: req.headers });
    const match = /^(?:\/gw)?\/v1\/stream\/ui\/([^/]+)\/stream$/.exec(req.url);
    if (req.method !== 'DELETE' || !match) return res.writeHead(404).end();
    const chatId = decodeURIComponent(match[1]);
    const bearer = req.headers.authorization;
    if (bearer && bearer !== `Bearer ${KEY}`) {
      const [status, body] = errorBody(401, 'unauthorized', 'wrong key');
      res.writeHead(status, { 'Content-Type': 'application/json' });
      return res.end(JSON.stringify(body));
    }
    const [status, body] = ANSWERS[chatId] || ANSWERS.running;
    if (body === null) return res.writeHead(status).end();
    const json = typeof body !== 'string';
    res.writeHead(status, { 'Content-Type': json ? 'application/json' : 'text/html' });
    res.end(json ? JSON.stringify(body) : body);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(() => {
  server.closeAllConnections();
  server.close();
});

function lastRequest() {
  return requests[requests.length - 1];
}

test('stopChat: DELETE /v1/stream/ui/{id}/stream, true when a generation was cancelled', async () => {
  const cancelled = await stopChat({ baseUrl: base, token: async () => KEY }, 'running');
  assert.equal(cancelled, true);
  const req = lastRequest();
  assert.equal(req.method, 'DELETE');
  assert.equal(req.url, '/v1/stream/ui/running/stream');
  assert.equal(req.headers.authorization, `Bearer ${KEY}`);
});

test('stopChat: false when the chat had nothing running (204)', async () => {
  assert.equal(await stopChat({ baseUrl: base, token: KEY }, 'idle'), false);
});

test('stopChat: a 200 without a JSON body still means cancelled', async () => {
  assert.equal(await stopChat({ baseUrl: base }, 'no json'), true);
  assert.equal(lastRequest().url, '/v1/stream/ui/no%20json/stream');
});

test('stopChat: the chat id is one encoded path segment; base URL prefixes and headers kept', async () => {
  const id = 'chat/1 ?#%';
  assert.equal(await stopChat({ baseUrl: `${base}/gw/`, headers: { 'X-Tenant': 't1' } }, id), true);
  const req = lastRequest();
  assert.equal(req.url, `/gw/v1/stream/ui/${encodeURIComponent(id)}/stream`);
  assert.equal(req.url, '/gw/v1/stream/ui/chat%2F1%20%3F%23%25/stream');
  assert.equal(req.headers['x-tenant'], 't1');
  assert.equal(req.headers.authorization, undefined); // anonymous: no bearer
});

test('stopChat: an error answer rejects with the gateway code, status and retry hint', async () => {
  const cases = [
    ['refused', 'unauthorized', 401, false],
    ['draining', 'shutting_down', 503, true],
    ['bad', 'invalid_request', 400, false],
    ['proxy', 'http_error', 502, true], // not our JSON body
  ];
  for (const [chatId, code, status, retryable] of cases) {
    await assert.rejects(stopChat({ baseUrl: base }, chatId), (err) => {
      assert.ok(err instanceof GatewayError, String(err));
      assert.deepEqual([err.code, err.status, err.retryable], [code, status, retryable], chatId);
      return true;
    });
  }
  await assert.rejects(stopChat({ baseUrl: base, token: 'wrong' }, 'running'), (err) => {
    assert.equal(err.code, 'unauthorized');
    assert.equal(err.message, 'wrong key');
    return true;
  });
});

test('stopChat: an empty chat id is a TypeError, and no request is sent', async () => {
  const count = requests.length;
  await assert.rejects(stopChat({ baseUrl: base }, ''), TypeError);
  await assert.rejects(stopChat({ baseUrl: base }, undefined), TypeError);
  assert.equal(requests.length, count);
});
