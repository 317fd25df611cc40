"""A fake OpenAI-compatible upstream on a real loopback socket, with knobs per test.

It speaks OpenAI's wire for `POST /v1/chat/completions` with `stream: true`:
`data: {chat.completion.chunk}` frames (the role chunk, content deltas, a
chunk with `finish_reason` and an empty delta, then, when the request asks
for `stream_options.include_usage`, a chunk with `choices: []` and `usage`),
then `data: [DONE]`. Without `stream` it answers one `chat.completion`.
Failures before the stream are OpenAI's error body with the knob's status.

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
from collections.abc import Awaitable, Callable
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

    def _usage(self) -> dict[str, int]:
        completion = len(self.tokens) if self.completion_tokens is None else self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _whole(self, body: dict[str, Any]) -> web.Response:
        message = {"role": "assistant", "content": "".join(self.tokens), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1,
                "model": body.get("model"),
                "choices": [choice],
                "usage": self._usage(),
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

    async def run(self) -> None:
        fake = self.fake
        if not fake.hold_headers:
            await self.response.prepare(self.request)
        await asyncio.sleep(fake.first_token_delay_s)
        await self.response.prepare(self.request)  # no-op once prepared
        await self.chunk(self.choice({"role": "assistant", "content": ""}))
        for index, token in enumerate(fake.tokens):
            if index and fake.token_delay_s:
                await asyncio.sleep(fake.token_delay_s)
            if await self.fail_at(index):
                return
            await self.chunk(self.choice({"content": token}))
        if await self.fail_at(len(fake.tokens)):
            return
        if not fake.omit_finish:
            await self.chunk(self.choice({}, fake.finish_reason))
            if self.include_usage:
                await self.chunk({"choices": [], "usage": fake._usage()})
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
