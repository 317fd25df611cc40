// The demo page's browser tools and its safe text rendering (no DOM needed).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { splitFences } from '../../gateway/static/chat-render.js';
import { currentTime, DEMO_TOOLS, evaluateArithmetic } from '../../gateway/static/demo-tools.js';
import { ToolRegistry } from '../../gateway/static/gateway-client.js';

test('calculate: precedence, parentheses, unary signs, decimals', () => {
  const cases = [
    ['17 * 23', 391],
    ['1 + 2 * 3', 7],
    ['(1 + 2) * 3', 9],
    ['10 / 4', 2.5],
    ['8 - 3 - 2', 3], // left to right
    ['2 * -3', -6],
    ['-(2 + 3) * +2', -10],
    ['.5 + 1.25', 1.75],
    ['0.1 + 0.2', 0.3],
    ['((((7))))', 7],
    ['  42  ', 42],
    ['6 × 7 ÷ 2', 21],
    ['100 / 8 / 5', 2.5],
  ];
  for (const [expression, value] of cases) {
    assert.equal(evaluateArithmetic(expression), value, expression);
  }
});

test('calculate refuses anything but arithmetic, with a reason', () => {
  const cases = [
    ['', /empty/],
    ['1 / 0', /division by zero/],
    ['1 / (2 - 2)', /division by zero/],
    ['2 +', /ends too early/],
    ['(1 + 2', /closing parenthesis/],
    ['1 + 2)', /unexpected "\)"/],
    ['1 2', /unexpected 2/],
    ['alert(1)', /unexpected "a"/],
    ['constructor', /unexpected "c"/],
    ['1; process.exit()', /unexpected ";"/],
    ['2 ** 3', /unexpected "\*"/],
    ['1e308 * 10', /unexpected "e"/],
    ['('.repeat(100) + '1' + ')'.repeat(100), /nested too deeply/],
    ['1+'.repeat(300) + '1', /longer than 500/],
  ];
  for (const [expression, reason] of cases) {
    assert.throws(() => evaluateArithmetic(expression), reason, expression);
  }
  assert.throws(() => evaluateArithmetic(42), /must be a string/);
});

test('the tools never use eval or Function', () => {
  const source = readFileSync(new URL('../../gateway/static/demo-tools.js', import.meta.url), 'utf8');
  assert.doesNotMatch(source, /\beval\s*\(|\bnew\s+Function\b|\bFunction\s*\(/);
});

test('get_current_time: the time in a named zone; an unknown zone is an error', () => {
  const now = new Date('2025-01-02T03:04:05Z');
  const tokyo = currentTime({ timezone: 'Asia/Tokyo' }, now);
  assert.equal(tokyo.iso, '2025-01-02T03:04:05.000Z');
  assert.equal(tokyo.timezone, 'Asia/Tokyo');
  assert.match(tokyo.local, /January 2, 2025 at 12:04:05/);
  assert.ok(currentTime({}).timezone); // the runtime's own zone
  assert.throws(() => currentTime({ timezone: 'Mars/Olympus' }), /unknown time zone: Mars/);
});

test('the demo tools register, and calculate runs through the registry', async () => {
  const registry = new ToolRegistry(DEMO_TOOLS);
  const names = registry.definitions().map((d) => d.function.name);
  assert.deepEqual(names, ['get_current_time', 'calculate']);
  const [clock, calculate] = registry.definitions();
  assert.deepEqual(clock.function.parameters.required, []);
  assert.deepEqual(calculate.function.parameters.required, ['expression']);
  assert.equal(calculate.function.parameters.properties.expression.type, 'string');
  const outcome = await registry.call({ name: 'calculate', arguments: '{"expression":"17 * 23"}' });
  assert.deepEqual(outcome, { result: 391, content: '391' });
  const time = await registry.call({ name: 'get_current_time', arguments: '{"timezone":"UTC"}' });
  assert.match(time.result, /^\w+day, \w+ \d+, \d{4} at .* \(UTC\)$/);
  assert.equal(time.content, JSON.stringify(time.result));
  const refused = await registry.call({ name: 'calculate', arguments: '{"expression":"x"}' });
  assert.equal(refused.content, '{"error":"unexpected \\"x\\" at position 0"}');
});

test('splitFences: text without fences is one text segment, exactly', () => {
  for (const text of ['Hello', 'a\n\nb\n', '    indented code stays text', 'inline ```x``` too']) {
    assert.deepEqual(splitFences(text), [{ type: 'text', text }]);
  }
  assert.deepEqual(splitFences(''), []);
});

test('splitFences: fenced blocks with a language, closed or still streaming', () => {
  assert.deepEqual(splitFences('Example:\n```js\nlet a = 1;\n\nf(a);\n```\nDone.'), [
    { type: 'text', text: 'Example:' },
    { type: 'code', lang: 'js', text: 'let a = 1;\n\nf(a);', closed: true },
    { type: 'text', text: 'Done.' },
  ]);
  // streaming: an open fence runs to the end; a half-typed fence is still text
  assert.deepEqual(splitFences('Run:\n```sh\ncurl -N'), [
    { type: 'text', text: 'Run:' },
    { type: 'code', lang: 'sh', text: 'curl -N', closed: false },
  ]);
  assert.deepEqual(splitFences('Run:\n``'), [{ type: 'text', text: 'Run:\n``' }]);
  // a shorter fence does not close a longer one; ~~~ fences work too
  assert.deepEqual(splitFences('````\n```\n````'), [
    { type: 'code', lang: '', text: '```', closed: true },
  ]);
  assert.deepEqual(splitFences('~~~ python extra\nprint(1)\n~~~'), [
    { type: 'code', lang: 'python', text: 'print(1)', closed: true },
  ]);
  // HTML in a code block is just text for textContent
  assert.deepEqual(splitFences('```html\n<script>x()</script>\n```'), [
    { type: 'code', lang: 'html', text: '<script>x()</script>', closed: true },
  ]);
});
