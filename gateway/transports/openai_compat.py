"""`POST /v1/chat/completions`, wire-compatible with OpenAI, so SDKs work unchanged.

Unlike our own transports it holds its headers until the first token (or the
end): an upstream failure before that reaches the SDK as an HTTP status it
maps to an exception class (429 RateLimitError, 502 InternalServerError …).
After that a failure is sent the way OpenAI does, as a `data: {"error": …}`
frame, which the SDK raises as `APIError`. A client that leaves cancels the
upstream at once on this route (grace 0): SDK users have no way to resume.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import GatewayError, InternalError, InvalidRequest, UpstreamError
from gateway.events import Event
from gateway.generation import Generation, Subscription
from gateway.keys import settings_key
from gateway.middleware import json_response
from gateway.observe import end_stream, track_stream
from gateway.schema import GenerationRequest, parse_generation_request
from gateway.transports.common import (
    STREAM_HEADERS,
    finish_response,
    read_generation_body,
    start_generation,
)
from gateway.transports.push import http_pusher
from gateway.transports.sink import ClientGone, ClientSink

WIRE_FORMAT = "openai"
HEARTBEAT = b": ping\n\n"
DONE_FRAME = b"data: [DONE]\n\n"
#: Fields we interpret; everything else goes to an OpenAI-compatible upstream as is.
_OWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "n",
    }
)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _text_of(content: Any) -> str:
    """The text of an OpenAI message `content`: a string, null, or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text", ""), str)
        )
    raise InvalidRequest("messages: content must be a string, null or a list of parts")


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages: a non-empty list is required")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages.{index}: an object with a string `role` is required")
        role = message["role"] if message["role"] in _ROLES else "tool"
        messages.append({"role": role, "content": _text_of(message.get("content"))})
    return messages


def parse_chat_request(data: dict[str, Any]) -> tuple[GenerationRequest, bool, bool]:
    """Our request, `stream`, and `stream_options.include_usage`, from an OpenAI body."""
    if data.get("n", 1) != 1:
        raise InvalidRequest("n: only 1 choice per request is supported")
    stream = data.get("stream", False)
    options = data.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise InvalidRequest("stream: must be a boolean; stream_options: an object")
    body: dict[str, Any] = {"messages": _messages(data.get("messages"))}
    for name in ("model", "temperature", "top_p", "stop", "seed"):
        if data.get(name) is not None:
            body[name] = data[name]
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    request = parse_generation_request(body)
    passthrough = {k: v for k, v in data.items() if k not in _OWN_FIELDS}
    passthrough["messages"] = data["messages"]
    request.for_upstream(request_id=None, passthrough=passthrough)
    return request, stream, bool(options.get("include_usage"))


def _finish_reason(event: Event) -> str:
    """OpenAI's reasons; our `cancelled` (the caller went away) has no equivalent."""
    reason = event.fields.get("finish_reason")
    return reason if reason in ("length", "content_filter") else "stop"


class ChunkEncoder:
    """`chat.completion.chunk` frames of one generation; the shared prefix is built once."""

    def __init__(self, generation: Generation) -> None:
        self._head = (
            b'{"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,"model":%s'
            % (
                generation.id.removeprefix("gen_").encode(),
                generation.created,
                orjson.dumps(generation.model),
            )
        )

    def _frame(self, tail: bytes) -> bytes:
        return b"data: " + self._head + tail + b"\n\n"

    def role(self) -> bytes:
        return self._frame(
            b',"system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant",'
            b'"content":""},"logprobs":null,"finish_reason":null}]}'
        )

    def token(self, event: Event) -> bytes:
        return self._frame(
            b',"system_fingerprint":null,"choices":[{"index":0,"delta":{"content":%s},'
            b'"logprobs":null,"finish_reason":null}]}' % event.text_json
        )

    def token_frame(self, event: Event) -> bytes:
        """`token(event)`, cached on the event for the other readers of this generation."""
        return event.encoded(WIRE_FORMAT, self.token)

    def finish(self, event: Event) -> bytes:
        return self._frame(
            b',"system_fingerprint":null,"choices":[{"index":0,"delta":{},"logprobs":null,'
            b'"finish_reason":"%s"}]}' % _finish_reason(event).encode()
        )

    def usage(self, event: Event) -> bytes:
        return self._frame(b',"choices":[],"usage":%s}' % orjson.dumps(event.fields["usage"]))


def error_frame(event: Event) -> bytes:
    """How OpenAI reports a failure after the 200: the SDK raises `APIError`."""
    error = {"message": event.fields["message"], "type": "api_error", "code": event.fields["code"]}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


async def _first_batch(subscription: Subscription) -> list[Event]:
    """Wait past `start` until a token or the terminal event."""
    batch: list[Event] = []
    while not any(e.type != "start" for e in batch):
        more = await subscription.next_batch()
        if more is None:
            break
        batch.extend(more)
    return [e for e in batch if e.type != "start"]


def _raise_failure(generation: Generation) -> None:
    """Re-raise the generation's failure as an HTTP error (headers not sent yet)."""
    failure: GatewayError = generation.failure or InternalError("generation failed")
    if isinstance(failure, UpstreamError) and failure.retry_after_s is not None:
        failure.headers.setdefault("Retry-After", str(math.ceil(failure.retry_after_s)))
    raise failure


async def _stream(
    request: web.Request, generation: Generation, include_usage: bool
) -> web.StreamResponse:
    streams = request.app[settings_key].streams
    encoder = ChunkEncoder(generation)
    tracker = track_stream(request, WIRE_FORMAT, generation, new=True)
    sink: ClientSink | None = None
    try:
        with generation.subscribe() as subscription:
            batch = await _first_batch(subscription)
            if batch and batch[0].type == "error":
                tracker.saw(batch[0])
                _raise_failure(generation)
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", **STREAM_HEADERS}
            )
            await response.prepare(request)
            sink = ClientSink(
                request,
                response.write,
                write_timeout_s=streams.write_timeout_s,
                heartbeat=HEARTBEAT,
                heartbeat_s=streams.heartbeat_s,
            )
            push = http_pusher(response, sink, tracker, encoder.token_frame)
            try:
                async with sink:
                    out = [encoder.role()]
                    while True:
                        for event in batch:
                            out.append(_encode(encoder, event, include_usage))
                        data = b"".join(out)
                        await sink.write(data)
                        if batch:
                            tracker.wrote(batch, len(data))
                        out = []
                        subscription.push_tokens(push)  # the headers are out now
                        next_batch = await subscription.next_batch()
                        if next_batch is None:
                            break
                        batch = next_batch
                await finish_response(response)
            except ClientGone:
                pass
    finally:
        end_stream(request, tracker, stalled=sink is not None and sink.stalled)
    return response


def _encode(encoder: ChunkEncoder, event: Event, include_usage: bool) -> bytes:
    if event.type == "token":
        return encoder.token_frame(event)
    if event.type == "error":
        return error_frame(event)
    frames = encoder.finish(event)
    if include_usage:
        frames += encoder.usage(event)
    return frames + DONE_FRAME


async def _complete(request: web.Request, generation: Generation) -> web.Response:
    """Non-streaming: wait for the end (a client that leaves still cancels at once)."""
    tracker = track_stream(request, WIRE_FORMAT, generation, new=True)
    try:
        with generation.subscribe() as subscription:
            while await subscription.next_batch() is not None:
                pass
        terminal = generation.events[-1]
        if terminal.type == "error":
            tracker.saw(terminal)
            _raise_failure(generation)
        text = "".join(e.text for e in generation.events if e.type == "token")
        response = json_response(
            {
                "id": "chatcmpl-" + generation.id.removeprefix("gen_"),
                "object": "chat.completion",
                "created": generation.created,
                "model": generation.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": _finish_reason(terminal),
                    }
                ],
                "usage": terminal.fields["usage"],
                "system_fingerprint": None,
            }
        )
        # The whole answer goes out at once: its first token is written now.
        tracker.wrote(generation.events, len(response.body or b""))
        return response
    finally:
        end_stream(request, tracker, stalled=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    chat, stream, include_usage = parse_chat_request(await read_generation_body(request))
    generation = await start_generation(request, chat, resume_grace_s=0)
    if stream:
        return await _stream(request, generation, include_usage)
    return await _complete(request, generation)
