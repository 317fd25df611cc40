"""The one fake OpenAI-compatible upstream, for the tests and the benchmarks.

It speaks OpenAI's wire for `POST /v1/chat/completions` with `stream: true`:
`data: {chat.completion.chunk}` frames (the role chunk, content deltas, a
chunk with `finish_reason` and an empty delta, then, when the request asks
for `stream_options.include_usage`, a chunk with `choices: []` and `usage`),
then `data: [DONE]`. Without `stream` it answers one `chat.completion`.
Failures before the stream are OpenAI's error body with the knob's status;
after it, the knobs drop the connection, stall, send an in-stream error or a
line that is not JSON.

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

The benchmarks run the same fake as a process (`main`). With `paced_models`
a request whose model is `fast` or `paced-<ms>[-first-<ms>]` takes the fast
path, `PacedStreams`: its frames are encoded once, at import, so that the
upstream spends as little CPU per token as it can and what the gateway costs
stands out; any other model gets the knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

if TYPE_CHECKING:
    from aiohttp.test_utils import TestServer

# -- the wire: one encoder for the knobs and the pre-encoded fast path --------

DONE = b"data: [DONE]"


def data(event: dict[str, Any]) -> bytes:
    """The `data:` line of one SSE frame (the caller ends it with a blank line)."""
    return b"data: " + orjson.dumps(event)


def chunk(
    fields: dict[str, Any],
    *,
    model: Any,
    id: str = "chatcmpl-fake",
    created: int = 1,
    fingerprint: str | None = "fp_fake",
) -> dict[str, Any]:
    """A `chat.completion.chunk` carrying `fields` (`choices`, `usage`), keys in OpenAI's order."""
    head: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if fingerprint is not None:
        head["system_fingerprint"] = fingerprint
    return {**head, **fields}


def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """A chunk's `choices`: the one choice with `delta`."""
    return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


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
    #: The client's address and port: one per connection it used.
    peer: Any = None


# -- the fast path: what the benchmarks measure against -----------------------

_PACING = re.compile(r"^paced-(\d+)(?:-first-(\d+))?$")
#: The fast path's chunks: the same bytes whatever the request, so encoded once.
_BENCH: dict[str, Any] = {
    "model": "bench",
    "id": "chatcmpl-bench",
    "created": 1_700_000_000,
    "fingerprint": None,
}
ROLE_FRAME = data(chunk(choice({"role": "assistant", "content": ""}), **_BENCH)) + b"\n\n"
TOKEN_FRAME = data(chunk(choice({"content": "tok "}), **_BENCH)) + b"\n\n"


def pacing(model: Any) -> tuple[float, float] | None:
    """(first token after, then one every) in seconds for `fast` and `paced-<ms>[-first-<ms>]`;
    None for any other model name."""
    if model == "fast":
        return 0.0, 0.0
    match = _PACING.match(str(model))
    if match is None:
        return None
    gap_s = int(match.group(1)) / 1000
    return (int(match.group(2)) / 1000 if match.group(2) else gap_s), gap_s


def _tail(tokens: int) -> bytes:
    finish = data(chunk(choice({}, "length"), **_BENCH))
    counted = data(chunk({"choices": [], "usage": usage(8, tokens)}, **_BENCH))
    return finish + b"\n\n" + counted + b"\n\n" + DONE + b"\n\n"


@dataclass
class Record:
    """One request's token write times and how it ended."""

    token_times: list[float] = field(default_factory=list)
    ended_at: float | None = None
    outcome: str = "running"


class PacedStreams:
    """`max_tokens` chunks of `tok `, pre-encoded, at the pacing the model name says.

    Unpaced (`fast`), 32 tokens go in each write, as a fast server's socket
    would carry them. A request whose `X-Request-ID` starts with `rec-` is
    recorded with the `time.monotonic()` (system-wide on Linux, so comparable
    with the load generator's) of every token written and of the end: `GET
    /stats?ids=a,b` returns them, `DELETE /stats` forgets them, and the
    disconnect scenario compares them with the moment the client dropped.
    """

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}

    async def stream(
        self, request: web.Request, body: dict[str, Any], first_s: float, gap_s: float
    ) -> web.StreamResponse:
        tokens = int(body.get("max_tokens") or 64)
        request_id = request.headers.get("X-Request-ID", "")
        if not request_id.startswith("rec-"):
            request_id = ""  # only the requests that ask for it are recorded
        record = Record()
        if request_id:
            self.records[request_id] = record
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            await response.write(ROLE_FRAME)
            if gap_s == 0:
                for start in range(0, tokens, 32):
                    count = min(32, tokens - start)
                    await response.write(TOKEN_FRAME * count)
                    if request_id:
                        record.token_times.extend([time.monotonic()] * count)
            else:
                await asyncio.sleep(first_s)
                for _ in range(tokens):
                    await response.write(TOKEN_FRAME)
                    if request_id:
                        record.token_times.append(time.monotonic())
                    await asyncio.sleep(gap_s)
            await response.write(_tail(tokens))
            await response.write_eof()
            record.outcome = "completed"
        except (asyncio.CancelledError, ConnectionError):
            record.outcome = "disconnected"
            raise
        finally:
            record.ended_at = time.monotonic()
        return response

    async def stats(self, request: web.Request) -> web.Response:
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        chosen = {i: self.records[i] for i in ids if i in self.records}
        return web.json_response(
            {
                i: {"token_times": r.token_times, "ended_at": r.ended_at, "outcome": r.outcome}
                for i, r in chosen.items()
            },
            dumps=lambda data: orjson.dumps(data).decode(),
        )

    async def forget(self, request: web.Request) -> web.Response:
        self.records.clear()
        return web.Response(status=204)


# -- the knobs: what the tests set ---------------------------------------------


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
    #: During `first_token_delay_s`, an SSE comment this often (as OpenRouter's
    #: `: OPENROUTER PROCESSING`): bytes flow, but no token.
    keepalive_s: float | None = None
    #: Between content deltas; None: back to back, 0: a turn of the event loop
    #: between them, as a server that writes each token as its own event.
    token_delay_s: float | None = None
    #: Send the response headers only with the first chunk, as a queueing server does.
    hold_headers: bool = False
    #: The whole body in one write at its end, as a server that flushes late:
    #: the gateway reads the first token together with all the rest.
    burst: bool = False
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
    #: False: keep no history in `requests` (a long-running process, a benchmark).
    record: bool = True
    #: Models `fast` and `paced-…` take the pre-encoded fast path (`PacedStreams`).
    paced_models: bool = False
    paced: PacedStreams = field(default_factory=PacedStreams)
    requests: list[UpstreamRequest] = field(default_factory=list)
    base_url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/stats", self.paced.stats)
        app.router.add_delete("/stats", self.paced.forget)
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

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": "fake-model", "object": "model", "created": 1, "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if self.paced_models and (paced := pacing(body.get("model"))) is not None:
            return await self.paced.stream(request, body, *paced)
        loop = asyncio.get_running_loop()
        record = UpstreamRequest(body, CIMultiDict(request.headers), loop.time())
        record.peer = request.transport.get_extra_info("peername") if request.transport else None
        if self.record:
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
        return usage(self.prompt_tokens, completion)

    def _whole(self, body: dict[str, Any]) -> web.Response:
        reply = self.reply(body)
        if self.script is None and self.responder is None:
            message = {"role": "assistant", "content": "".join(self.tokens), "refusal": None}
        else:
            message = assemble(reply.deltas)
        answer = {
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
                "choices": [answer],
                "usage": self._usage(reply),
            }
        )


@dataclass
class _Stream:
    """One streaming response, written frame by frame as the knobs say."""

    fake: FakeUpstream
    request: web.Request
    response: web.StreamResponse
    body: dict[str, Any]
    record: UpstreamRequest

    def __post_init__(self) -> None:
        self.model = self.body.get("model")
        options = self.body.get("stream_options") or {}
        self.include_usage = self.fake.send_usage and bool(options.get("include_usage"))
        self.reply = self.fake.reply(self.body)
        #: The frames a `burst` answer holds back for its one write.
        self.held: list[bytes] = []

    async def run(self) -> None:
        fake = self.fake
        if not fake.hold_headers:
            await self.response.prepare(self.request)
        waited = 0.0
        while fake.keepalive_s is not None and waited < fake.first_token_delay_s:
            step = min(fake.keepalive_s, fake.first_token_delay_s - waited)
            await asyncio.sleep(step)
            waited += step
            await self.response.write(b": keep-alive" + fake.line_end * 2)
        await asyncio.sleep(fake.first_token_delay_s - waited)
        await self.response.prepare(self.request)  # no-op once prepared
        deltas = self.reply.deltas
        if fake.role_chunk and not (deltas and "role" in deltas[0]):
            # OpenAI's role delta has `content: ""` before text, null before a
            # tool call (DeepSeek's likewise before its thinking).
            text_first = not deltas or isinstance(deltas[0].get("content"), str)
            content = "" if text_first else None
            await self.chunk(choice({"role": "assistant", "content": content}))
        for index, delta in enumerate(deltas):
            if index and fake.token_delay_s is not None:
                await asyncio.sleep(fake.token_delay_s)
            if await self.fail_at(index):
                return
            await self.chunk(choice(delta))
        if await self.fail_at(len(deltas)):
            return
        if not fake.omit_finish:
            await self.chunk(choice({}, self.reply.finish_reason))
            if self.include_usage:
                await self.chunk({"choices": [], "usage": fake._usage(self.reply)})
        if not fake.omit_done:
            await self.write(DONE)
        await self.response.write_eof(b"".join(self.held))

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
            await self.write(data({"error": error}))
            await self.response.write_eof()
            return True
        if index == fake.tool_call_after:
            call = {"index": 0, "id": "call_1", "type": "function"}
            call["function"] = {"name": "get_weather", "arguments": ""}
            await self.chunk(choice({"tool_calls": [call]}))
            arguments = {"index": 0, "function": {"arguments": '{"city":"Oslo"}'}}
            await self.chunk(choice({"tool_calls": [arguments]}))
            await self.chunk(choice({}, "tool_calls"))
            await self.write(DONE)
            await self.response.write_eof()
            return True
        if index == fake.malformed_after:
            await self.write(b'data: {"id": "chatcmpl-fake", "choices": [')
            await self.response.write_eof()
            return True
        return False

    async def chunk(self, fields: dict[str, Any]) -> None:
        frame = chunk(fields, model=self.model)
        if self.include_usage:
            frame.setdefault("usage", None)  # as OpenAI does on every chunk but the last
        await self.write(data(frame))

    async def write(self, line: bytes) -> None:
        frame = line + self.fake.line_end * 2
        if self.fake.burst:
            self.held.append(frame)
            return
        if not self.fake.fragment:
            await self.response.write(frame)
            return
        cut = next((i for i, byte in enumerate(frame) if byte >= 0x80), len(frame) // 2) + 1
        await self.response.write(frame[:cut])
        await asyncio.sleep(0.001)
        await self.response.write(frame[cut:])


StartFakeUpstream = Callable[[], Awaitable[FakeUpstream]]


# -- as a process, for the benchmarks ------------------------------------------

#: What `--tokens` repeats for a model that is not paced: words of 1- to 3-byte UTF-8.
BENCH_WORDS = ("Latency ", "adds ", "up ", "quickly: ", "a ", "request ", "from ", "東京 ")


def serve(app: web.Application, port: int, backlog: int = 128) -> None:
    """Run `app` on 127.0.0.1:`port` as `gateway serve` runs: on uvloop, with a
    handler cancelled when its client goes, so that bench servers compare like with like."""
    from gateway.server import new_event_loop

    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        backlog=backlog,
        loop=new_event_loop(),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.fake_upstream --port 9100 [--tokens 200 --token-delay-s 0.02]`."""
    parser = argparse.ArgumentParser(description="The fake OpenAI upstream, as a process.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=200, help="deltas for an unpaced model")
    parser.add_argument("--token-delay-s", type=float, default=0.02)
    args = parser.parse_args(argv)
    words = [BENCH_WORDS[i % len(BENCH_WORDS)] for i in range(args.tokens)]
    fake = FakeUpstream(
        tokens=words, token_delay_s=args.token_delay_s, record=False, paced_models=True
    )
    serve(fake.app(), args.port, backlog=4096)  # S5 opens 10,000 streams in 10 s
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
