"""A fake OpenAI-compatible upstream on a real loopback socket, with knobs per test.

It speaks OpenAI's wire for `POST /v1/chat/completions` with `stream: true`:
`data: {chat.completion.chunk}` frames (the role chunk, content deltas, a
chunk with `finish_reason` and an empty delta, then, when the request asks
for `stream_options.include_usage`, a chunk with `choices: []` and `usage`),
then `data: [DONE]`. Without `stream` it answers one `chat.completion`.
Failures before the stream are OpenAI's error body with the knob's status.

Beyond plain text, a `script` of deltas (or a `responder` that picks one per
request) streams whatever a real server sends: tool calls as OpenAI streams
them (`tool_call_deltas`: the first fragment of each call with `index`, `id`,
`type` and `function.name`, then `function.arguments` fragments; parallel
calls one after the other or interleaved), reasoning as vLLM and DeepSeek
(`delta.reasoning_content`) or OpenRouter (`delta.reasoning`) send it, and
the deltas servers should not send a gateway that cannot forward them
(`refusal`, the legacy `function_call`, `audio`). Without `stream` the same
script is answered as one `chat.completion` (`assemble`): `message.tool_calls`,
`content: null` when there is no text, `reasoning_content`. So the official
SDK can be run against the fake directly and through the gateway, and the
two compared.

Every request is recorded (body, headers, loop time of arrival), and so is
the loop time at which a streaming client hung up before the response ended.
That is seen at once, not at the next write: aiohttp's `TestServer` runs with
`handler_cancellation=True` (tests/conftest.py), so the handler is cancelled
as soon as the connection is lost, even while it sleeps. A write that fails
on a closing transport counts too. The times are `loop.time()` of the one
event loop the tests, the gateway and this server share, so a test can
subtract them from its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

#: The tokens a fresh fake streams: multi-byte text and a newline inside a delta.
DEFAULT_TOKENS = ("Hel", "lo", ",\n", " wörld", " 👋", "!")


def large_delta(chars: int) -> str:
    """A deterministic delta of `chars` characters, mixing 1- to 4-byte UTF-8."""
    pattern = 'ab\u00e9\u4e2d\U0001f600\n"\\'
    return (pattern * (chars // len(pattern) + 1))[:chars]


# -- scripts: what real servers stream besides plain text --------------------

#: One `choices[0].delta` object, as sent.
Delta = dict[str, Any]


@dataclass(frozen=True)
class Call:
    """A function call a scripted model makes: `arguments` is its JSON text."""

    name: str
    arguments: str
    id: str | None = None

    @classmethod
    def of(cls, name: str, arguments: dict[str, Any], id: str | None = None) -> Call:
        return cls(name, json.dumps(arguments, separators=(",", ":")), id)


@dataclass(frozen=True)
class Reply:
    """What a `responder` answers one request with."""

    deltas: list[Delta]
    finish_reason: str = "stop"


def split(text: str, pieces: int) -> list[str]:
    """`text` cut into `pieces` non-empty fragments (fewer when it is shorter)."""
    pieces = max(1, min(pieces, len(text)))
    size, extra = divmod(len(text), pieces)
    out, start = [], 0
    for piece in range(pieces):
        end = start + size + (1 if piece < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def text_deltas(*pieces: str) -> list[Delta]:
    return [{"content": piece} for piece in pieces]


def reasoning_deltas(*pieces: str, style: str = "deepseek") -> list[Delta]:
    """Reasoning as servers stream it.

    `deepseek` (DeepSeek's API): `{"content": null, "reasoning_content": …}`;
    `vllm` (its reasoning parsers): `{"reasoning_content": …}` alone;
    `openrouter`: `{"role": "assistant", "content": "", "reasoning": …}`.
    """
    if style == "deepseek":
        return [{"content": None, "reasoning_content": piece} for piece in pieces]
    if style == "vllm":
        return [{"reasoning_content": piece} for piece in pieces]
    if style == "openrouter":
        return [{"role": "assistant", "content": "", "reasoning": piece} for piece in pieces]
    raise ValueError(f"unknown reasoning style {style!r}")


def tool_call_deltas(
    calls: Sequence[Call],
    *,
    pieces: int = 3,
    interleave: bool = False,
    role: bool = True,
    index: bool = True,
    ids: bool = True,
    arguments_in_first: bool = False,
) -> list[Delta]:
    """The deltas of `calls` as OpenAI streams them.

    Each call's first fragment is `{index, id, type: "function", function:
    {name, arguments: ""}}`, then its arguments follow in `pieces` fragments
    `{index, function: {arguments}}`. Parallel calls come one after the
    other (OpenAI) or, with `interleave`, fragment by fragment in turn (as
    some servers batch them). `role` puts `role: assistant, content: null`
    on the first delta, as OpenAI does when the answer starts with a call.
    Non-conforming servers: `index=False` omits `index`, `ids=False` omits
    `id`, `arguments_in_first` sends the first argument fragment along with
    the name instead of `""`.
    """
    per_call: list[list[dict[str, Any]]] = []
    for number, call in enumerate(calls):
        fragments = split(call.arguments, pieces) if call.arguments else []
        first: dict[str, Any] = {"index": number}
        if ids:
            first["id"] = call.id or f"call_fake{number}"
        first["type"] = "function"
        first["function"] = {"name": call.name, "arguments": ""}
        if arguments_in_first and fragments:
            first["function"]["arguments"] = fragments.pop(0)
        items = [first] + [{"index": number, "function": {"arguments": f}} for f in fragments]
        if not index:
            for item in items:
                del item["index"]
        per_call.append(items)
    ordered: list[dict[str, Any]] = []
    if interleave:
        for row in range(max((len(items) for items in per_call), default=0)):
            ordered += [items[row] for items in per_call if row < len(items)]
    else:
        ordered = [item for items in per_call for item in items]
    deltas: list[Delta] = [{"tool_calls": [item]} for item in ordered]
    if role and deltas:
        deltas[0] = {"role": "assistant", "content": None, **deltas[0]}
    return deltas


def assemble(deltas: Iterable[Delta]) -> dict[str, Any]:
    """The `chat.completion` message the deltas add up to, as OpenAI answers
    without `stream`: `content` null when there is no text, `tool_calls` in
    index order, `reasoning_content` / `reasoning` joined, `refusal` or null."""
    content: list[str] = []
    reasoning: dict[str, list[str]] = {}
    refusal: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    function_call: dict[str, Any] | None = None
    position = 0  # a fragment without `index` continues the last call, or starts one with `id`
    for delta in deltas:
        if isinstance(delta.get("content"), str) and delta["content"]:
            content.append(delta["content"])
        for key in ("reasoning_content", "reasoning"):
            if isinstance(delta.get(key), str):
                reasoning.setdefault(key, []).append(delta[key])
        if isinstance(delta.get("refusal"), str):
            refusal.append(delta["refusal"])
        if isinstance(delta.get("function_call"), dict):
            function_call = delta["function_call"]
        for item in delta.get("tool_calls") or ():
            if "index" in item:
                position = item["index"]
            elif "id" in item and calls:
                position = max(calls) + 1
            empty = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            call = calls.setdefault(position, empty)
            if item.get("id"):
                call["id"] = item["id"]
            function = item.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(content) if content else None,
        "refusal": "".join(refusal) if refusal else None,
    }
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    if function_call is not None:
        message["function_call"] = function_call
    for key, parts in reasoning.items():
        message[key] = "".join(parts)
    return message


@dataclass
class UpstreamRequest:
    """One request as the fake saw it."""

    body: dict[str, Any]
    headers: CIMultiDict[str]
    #: loop.time() when the request arrived.
    received_at: float
    #: loop.time() when the client hung up before the response ended.
    closed_at: float | None = None
    #: The fake cut the connection itself (`drop_after`).
    aborted: bool = False
    #: The whole response was written.
    completed: bool = False


@dataclass
class FakeUpstream:
    """The knobs are plain attributes: set them in a test before the request."""

    tokens: list[str] = field(default_factory=lambda: list(DEFAULT_TOKENS))
    #: Deltas to stream instead of `tokens` (`text_deltas`, `reasoning_deltas`,
    #: `tool_call_deltas` …), then `finish_reason`. The role chunk is sent
    #: first unless the script's first delta carries `role` itself (its
    #: `content` is null when the script does not start with text).
    script: list[Delta] | None = None
    #: Per request, instead of `script` and `finish_reason`: body -> `Reply`.
    responder: Callable[[dict[str, Any]], Reply] | None = None
    #: False: no role chunk of its own before the deltas (a server that sends no role).
    role_chunk: bool = True
    #: Before the role chunk (headers are sent at once unless `hold_headers`).
    first_token_delay_s: float = 0.0
    #: Between content deltas.
    token_delay_s: float = 0.0
    #: Send the response headers only with the first chunk, as a queueing server does.
    hold_headers: bool = False
    finish_reason: str = "stop"
    prompt_tokens: int = 11
    #: `usage.completion_tokens` (default: the number of deltas sent).
    completion_tokens: int | None = None
    #: False: ignore `stream_options.include_usage`, as some servers do.
    send_usage: bool = True
    #: Answer the next `fail_times` requests with this status and an OpenAI error body.
    fail_status: int | None = None
    fail_times: int = 0
    #: How many failures have been answered so far.
    failures_sent: int = 0
    retry_after: str | None = None
    fail_message: str = "The server had an error while processing your request."
    #: Abort the TCP connection (RST) after N deltas.
    drop_after: int | None = None
    #: Stop sending after N deltas and keep the connection open (0: never a token).
    hang_after: int | None = None
    #: Send an in-stream `data: {"error": …}` after N deltas, then end the body.
    error_after: int | None = None
    error_message: str = "The model crashed"
    #: Send a line that is not JSON after N deltas, then end the body.
    malformed_after: int | None = None
    #: End the body without the finish chunk (and usage), but with `[DONE]`.
    omit_finish: bool = False
    #: End the body without `data: [DONE]`.
    omit_done: bool = False
    #: Line terminator of the SSE frames (some servers use CRLF).
    line_end: bytes = b"\n"
    #: Write each frame in two pieces, cut inside a UTF-8 sequence when there is one.
    fragment: bool = False
    #: After N deltas, stream a tool call (OpenAI's `delta.tool_calls`) and
    #: finish with `tool_calls`, as a model that decided to call a function.
    tool_call_after: int | None = None
    #: A `Set-Cookie` on every answer, as load balancers with sticky sessions send.
    set_cookie: str | None = None
    requests: list[UpstreamRequest] = field(default_factory=list)
    base_url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        return app

    async def start(self, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeUpstream:
        server = await aiohttp_server(self.app())
        self.base_url = str(server.make_url("/v1"))
        return self

    # -- what tests read --------------------------------------------------

    async def wait_closed(self, index: int = -1, timeout: float = 2.0) -> float:
        """The loop time at which request `index`'s client hung up (fails after `timeout`)."""
        async with asyncio.timeout(timeout):
            while (closed_at := self.requests[index].closed_at) is None:
                await asyncio.sleep(0.001)
        return closed_at

    async def wait_requests(self, count: int, timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                await asyncio.sleep(0.001)

    # -- handlers ---------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": "fake-model", "object": "model", "created": 1, "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        body = await request.json()
        record = UpstreamRequest(body, CIMultiDict(request.headers), loop.time())
        self.requests.append(record)
        if self.fail_status is not None and self.failures_sent < self.fail_times:
            self.failures_sent += 1
            return self._failure()
        if not body.get("stream"):
            return self._whole(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if self.set_cookie is not None:
            response.set_cookie("upstream_session", self.set_cookie)
        try:
            await _Stream(self, request, response, body, record).run()
        except (asyncio.CancelledError, ConnectionError):
            if not record.aborted:
                record.closed_at = loop.time()
            raise
        record.completed = not record.aborted
        return response

    def _failure(self) -> web.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
        error_type = {
            400: "invalid_request_error",
            401: "invalid_request_error",
            403: "permission_denied",
            429: "rate_limit_exceeded",
        }.get(self.fail_status or 500, "server_error")
        error = {"message": self.fail_message, "type": error_type, "param": None, "code": None}
        return web.json_response({"error": error}, status=self.fail_status or 500, headers=headers)

    def reply(self, body: dict[str, Any]) -> Reply:
        """The deltas and finish reason request `body` gets, as the knobs say."""
        if self.responder is not None:
            return self.responder(body)
        if self.script is not None:
            return Reply(list(self.script), self.finish_reason)
        return Reply(text_deltas(*self.tokens), self.finish_reason)

    def _usage(self, reply: Reply | None = None) -> dict[str, int]:
        sent = len(self.tokens) if reply is None else len(reply.deltas)
        completion = sent if self.completion_tokens is None else self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _whole(self, body: dict[str, Any]) -> web.Response:
        reply = self.reply(body)
        if self.script is None and self.responder is None:
            message = {"role": "assistant", "content": "".join(self.tokens), "refusal": None}
        else:
            message = assemble(reply.deltas)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1,
                "model": body.get("model"),
                "choices": [choice],
                "usage": self._usage(reply),
            }
        )


class _Stream:
    """One streaming response, written frame by frame as the knobs say."""

    def __init__(
        self,
        fake: FakeUpstream,
        request: web.Request,
        response: web.StreamResponse,
        body: dict[str, Any],
        record: UpstreamRequest,
    ) -> None:
        self.fake = fake
        self.request = request
        self.response = response
        self.record = record
        self.model = body.get("model")
        options = body.get("stream_options") or {}
        self.include_usage = fake.send_usage and bool(options.get("include_usage"))
        self.reply = fake.reply(body)

    async def run(self) -> None:
        fake = self.fake
        if not fake.hold_headers:
            await self.response.prepare(self.request)
        await asyncio.sleep(fake.first_token_delay_s)
        await self.response.prepare(self.request)  # no-op once prepared
        deltas = self.reply.deltas
        if fake.role_chunk and not (deltas and "role" in deltas[0]):
            # OpenAI's role delta has `content: ""` before text, null before a
            # tool call (DeepSeek's likewise before its thinking).
            text_first = not deltas or isinstance(deltas[0].get("content"), str)
            content = "" if text_first else None
            await self.chunk(self.choice({"role": "assistant", "content": content}))
        for index, delta in enumerate(deltas):
            if index and fake.token_delay_s:
                await asyncio.sleep(fake.token_delay_s)
            if await self.fail_at(index):
                return
            await self.chunk(self.choice(delta))
        if await self.fail_at(len(deltas)):
            return
        if not fake.omit_finish:
            await self.chunk(self.choice({}, self.reply.finish_reason))
            if self.include_usage:
                await self.chunk({"choices": [], "usage": fake._usage(self.reply)})
        if not fake.omit_done:
            await self.write(b"data: [DONE]")
        await self.response.write_eof()

    async def fail_at(self, index: int) -> bool:
        """Apply a failure knob due after `index` deltas; True when the body must end."""
        fake = self.fake
        if index == fake.hang_after:
            await asyncio.sleep(3600)
        if index == fake.drop_after:
            assert self.request.transport is not None
            self.record.aborted = True
            self.request.transport.abort()
            return True
        if index == fake.error_after:
            error = {"message": fake.error_message, "type": "server_error", "code": None}
            await self.write(b"data: " + orjson.dumps({"error": error}))
            await self.response.write_eof()
            return True
        if index == fake.tool_call_after:
            call = {"index": 0, "id": "call_1", "type": "function"}
            call["function"] = {"name": "get_weather", "arguments": ""}
            await self.chunk(self.choice({"tool_calls": [call]}))
            arguments = {"index": 0, "function": {"arguments": '{"city":"Oslo"}'}}
            await self.chunk(self.choice({"tool_calls": [arguments]}))
            await self.chunk(self.choice({}, "tool_calls"))
            await self.write(b"data: [DONE]")
            await self.response.write_eof()
            return True
        if index == fake.malformed_after:
            await self.write(b'data: {"id": "chatcmpl-fake", "choices": [')
            await self.response.write_eof()
            return True
        return False

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        }

    async def chunk(self, fields: dict[str, Any]) -> None:
        frame: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            **fields,
        }
        if self.include_usage:
            frame.setdefault("usage", None)  # as OpenAI does on every chunk but the last
        await self.write(b"data: " + orjson.dumps(frame))

    async def write(self, line: bytes) -> None:
        data = line + self.fake.line_end * 2
        if not self.fake.fragment:
            await self.response.write(data)
            return
        cut = next((i for i, byte in enumerate(data) if byte >= 0x80), len(data) // 2) + 1
        await self.response.write(data[:cut])
        await asyncio.sleep(0.001)
        await self.response.write(data[cut:])


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> FakeUpstream:
    """A started fake upstream; `fake_upstream.base_url` is `http://127.0.0.1:PORT/v1`."""
    return await FakeUpstream().start(aiohttp_server)


StartFakeUpstream = Callable[[], Awaitable[FakeUpstream]]


@pytest.fixture
def start_fake_upstream(aiohttp_server: Any) -> StartFakeUpstream:
    """Start another fake upstream (a fallback, say)."""

    async def start() -> FakeUpstream:
        return await FakeUpstream().start(aiohttp_server)

    return start
