// demo-tools.js: the demo page's two browser-side tools, for runAgent.
//
// Dependency-free, no DOM: importable in Node (tests/js/demo_tools.test.mjs).

const MAX_EXPRESSION = 500;
const MAX_DEPTH = 64;

/**
 * Evaluates arithmetic: numbers (decimals like `3`, `2.5`, `.5`), `+ - * /`,
 * unary `+`/`-` and parentheses, with the usual precedence, left to right.
 * A tiny recursive-descent parser: never `eval` or `Function`, so nothing but
 * arithmetic can run. Throws an Error naming what is wrong.
 *
 * @param {string} expression
 * @returns {number}
 */
export function evaluateArithmetic(expression) {
  if (typeof expression !== 'string') throw new Error('the expression must be a string');
  if (expression.length > MAX_EXPRESSION) {
    throw new Error(`the expression is longer than ${MAX_EXPRESSION} characters`);
  }
  const tokens = [];
  const pattern = /\s*(?:(\d+(?:\.\d*)?|\.\d+)|([-+*/()×÷]))/y;
  let at = 0;
  while (at < expression.length) {
    if (/^\s*$/.test(expression.slice(at))) break;
    pattern.lastIndex = at;
    const match = pattern.exec(expression);
    if (!match) {
      const rest = expression.slice(at).trimStart();
      const position = expression.length - rest.length;
      throw new Error(`unexpected ${JSON.stringify(rest[0])} at position ${position}`);
    }
    if (match[1] !== undefined) tokens.push({ number: Number(match[1]) });
    else tokens.push({ op: { '×': '*', '÷': '/' }[match[2]] || match[2] });
    at = pattern.lastIndex;
  }
  if (tokens.length === 0) throw new Error('the expression is empty');

  let i = 0;
  const peek = () => tokens[i] && tokens[i].op;
  function expr(depth) {
    let value = term(depth);
    while (peek() === '+' || peek() === '-') {
      const op = tokens[i++].op;
      const right = term(depth);
      value = op === '+' ? value + right : value - right;
    }
    return value;
  }
  function term(depth) {
    let value = unary(depth);
    while (peek() === '*' || peek() === '/') {
      const op = tokens[i++].op;
      const right = unary(depth);
      if (op === '/' && right === 0) throw new Error('division by zero');
      value = op === '*' ? value * right : value / right;
    }
    return value;
  }
  function unary(depth) {
    if (depth > MAX_DEPTH) throw new Error('the expression is nested too deeply');
    if (peek() === '-') {
      i++;
      return -unary(depth + 1);
    }
    if (peek() === '+') {
      i++;
      return unary(depth + 1);
    }
    return primary(depth);
  }
  function primary(depth) {
    const token = tokens[i];
    if (!token) throw new Error('the expression ends too early');
    if (token.number !== undefined) {
      i++;
      return token.number;
    }
    if (token.op === '(') {
      i++;
      const value = expr(depth + 1);
      if (peek() !== ')') throw new Error('a closing parenthesis is missing');
      i++;
      return value;
    }
    throw new Error(`unexpected ${JSON.stringify(token.op)}`);
  }

  const value = expr(0);
  if (i < tokens.length) {
    throw new Error(`unexpected ${JSON.stringify(tokens[i].op ?? tokens[i].number)}`);
  }
  if (!Number.isFinite(value)) throw new Error('the result is not a finite number');
  // 0.1 + 0.2 is 0.3 here: 15 significant digits drop binary noise.
  return Number(value.toPrecision(15));
}

/**
 * The current time, in `timezone` (an IANA name such as `Europe/Berlin`) or
 * the browser's own.
 *
 * @param {{timezone?: string}} [args]
 * @param {Date} [now]
 * @returns {{iso: string, timezone: string, local: string}}
 */
export function currentTime({ timezone } = {}, now = new Date()) {
  let format;
  try {
    format = new Intl.DateTimeFormat('en-US', {
      dateStyle: 'full',
      timeStyle: 'long',
      timeZone: timezone || undefined,
    });
  } catch {
    throw new Error(`unknown time zone: ${timezone}`);
  }
  return {
    iso: now.toISOString(),
    timezone: format.resolvedOptions().timeZone,
    local: format.format(now),
  };
}

/** The tools as `ToolRegistry.register` takes them. */
export const DEMO_TOOLS = [
  {
    name: 'get_current_time',
    description: "The current date and time, in the user's time zone or the one given.",
    parameters: {
      type: 'object',
      properties: {
        timezone: {
          type: 'string',
          description: 'An IANA time zone such as Europe/Berlin; default: the user\u2019s',
        },
      },
      required: [],
    },
    // One readable string: "Thursday, January 2, 2025 at 3:04:05 AM UTC (UTC)".
    run: (args) => {
      const { local, timezone } = currentTime(args);
      return `${local} (${timezone})`;
    },
  },
  {
    name: 'calculate',
    description: 'Evaluate an arithmetic expression: numbers, + - * / and parentheses.',
    parameters: {
      type: 'object',
      properties: {
        expression: { type: 'string', description: 'For example (17 * 23) / 2' },
      },
      required: ['expression'],
    },
    run: ({ expression }) => evaluateArithmetic(expression),
  },
];
