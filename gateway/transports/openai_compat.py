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
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.admission import admit_generation
from gateway.errors import GatewayError, InternalError, InvalidRequest, UpstreamError
from gateway.events import Event
from gateway.generation import Generation
from gateway.generation_log import LogSubscription
from gateway.keys import catalog_key
from gateway.metrics import Transport
from gateway.middleware import json_response
from gateway.providers.base import FINISH_REASONS
from gateway.schema import FORWARDED_FIELDS, GenerationRequest, parse_generation_request
from gateway.stream_tracker import StreamTracker, end_stream, track_stream
from gateway.transports.body import read_generation_body
from gateway.transports.pump import HttpWire, serve_stream

WIRE_FORMAT = "openai"
HEARTBEAT = b": ping\n\n"
DONE_FRAME = b"data: [DONE]\n\n"
#: OpenAI's chat fields this route interprets or forwards (as `GenerationRequest` fields).
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
        *FORWARDED_FIELDS,
    }
)
#: Generation knobs every OpenAI-compatible server knows: forwarded as given.
_FORWARDED_AS_GIVEN = frozenset({"frequency_penalty", "presence_penalty", "logit_bias"})
#: Fields that act on the operator's upstream account (storage, billing tier,
#: end-user attribution): dropped unless the model's `passthrough` lists them.
ACCOUNT_FIELDS = frozenset({"store", "metadata", "service_tier", "user"})
_KNOWN_FIELDS = _OWN_FIELDS | _FORWARDED_AS_GIVEN | ACCOUNT_FIELDS
_REQUEST_FIELDS = frozenset({"model", "temperature", "top_p", "stop", "seed", *FORWARDED_FIELDS})


def parse_chat_request(
    data: dict[str, Any], passthrough_of: Callable[[Any], tuple[str, ...]]
) -> tuple[GenerationRequest, dict[str, Any], bool, bool]:
    """Our request, the raw fields for the upstream, `stream`, and
    `stream_options.include_usage`, from an OpenAI body.

    `passthrough_of(model)` names the extra fields the model's operator lets
    through. Any other field is a 400 naming it, as OpenAI answers: a field
    silently ignored would change what the caller gets without telling them.
    """
    allowed = passthrough_of(data.get("model"))
    for name in data:
        if name not in _KNOWN_FIELDS and name not in allowed:
            raise InvalidRequest(
                f"{name}: unknown or unsupported request field (an operator may forward it"
                " by listing it in the model's `passthrough`)"
            )
    if data.get("n", 1) != 1:
        raise InvalidRequest("n: only 1 choice per request is supported")
    stream = data.get("stream", False)
    options = data.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise InvalidRequest("stream: must be a boolean; stream_options: an object")
    body: dict[str, Any] = {"messages": data.get("messages")}
    for name in _REQUEST_FIELDS:
        if data.get(name) is not None:
            body[name] = data[name]
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    request = parse_generation_request(body)
    extra = {k: data[k] for k in data if k in _FORWARDED_AS_GIVEN or k in allowed}
    if "max_completion_tokens" in data:
        # Reasoning models refuse `max_tokens`: send the name the client chose.
        extra["max_completion_tokens"] = request.max_tokens
    include_usage = bool(options.get("include_usage"))
    return request, extra, stream, include_usage


def _finish_reason(event: Event) -> str:
    """OpenAI's reasons; our `cancelled` (the caller went away) has no equivalent."""
    reason = event.fields.get("finish_reason")
    return reason if reason in FINISH_REASONS else "stop"


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

    def _delta(self, delta: bytes) -> bytes:
        return self._frame(
            b',"system_fingerprint":null,"choices":[{"index":0,"delta":%s,'
            b'"logprobs":null,"finish_reason":null}]}' % delta
        )

    def role(self, first: Event | None) -> bytes:
        """The opening delta. As OpenAI does, `content` is "" before text and null
        before a tool call or thinking, so SDK helpers assemble the same message."""
        if first is None or first.type == "token":
            return self._delta(b'{"role":"assistant","content":""}')
        return self._delta(b'{"role":"assistant","content":null}')

    def token(self, event: Event) -> bytes:
        # One formatting, not two: this runs once per token of every generation.
        return self._frame(
            b',"system_fingerprint":null,"choices":[{"index":0,"delta":{"content":%s},'
            b'"logprobs":null,"finish_reason":null}]}' % event.text_json
        )

    def reasoning(self, event: Event) -> bytes:
        return self._delta(b'{"reasoning_content":%s}' % event.text_json)

    def tool_call(self, event: Event) -> bytes:
        """OpenAI's shape: the call's first chunk names it with `arguments: ""`, then fragments."""
        fields = event.fields
        index, arguments = fields["index"], fields["arguments"]
        frames = b""
        if "id" in fields:
            call = {
                "index": index,
                "id": fields["id"],
                "type": "function",
                "function": {"name": fields.get("name", ""), "arguments": ""},
            }
            frames = self._delta(orjson.dumps({"tool_calls": [call]}))
            if not arguments:
                return frames
        fragment = {"index": index, "function": {"arguments": arguments}}
        return frames + self._delta(orjson.dumps({"tool_calls": [fragment]}))

    def _encode_delta(self, event: Event) -> bytes:
        kind = event.type
        if kind == "token":
            return self.token(event)
        if kind == "reasoning":
            return self.reasoning(event)
        return self.tool_call(event)

    def delta_frame(self, event: Event) -> bytes:
        """The frame of a token, reasoning or tool-call event, cached on the event
        for the other readers of this generation."""
        return event.encoded(WIRE_FORMAT, self._encode_delta)

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


def _raise_failure(generation: Generation) -> None:
    """Re-raise the generation's failure as an HTTP error (headers not sent yet).

    A failure that would fail the same way again tells OpenAI SDKs not to
    retry (`x-should-retry: false`, which they honour before the status).
    """
    failure: GatewayError = generation.failure or InternalError("generation failed")
    if isinstance(failure, UpstreamError) and failure.retry_after_s is not None:
        failure.headers.setdefault("Retry-After", str(math.ceil(failure.retry_after_s)))
    if not failure.retryable:
        failure.headers.setdefault("x-should-retry", "false")
    raise failure


class OpenAIWire(HttpWire):
    """OpenAI's chunks; the headers wait for the first token so that an early
    failure is an HTTP status the SDK maps to its exception classes."""

    transport: Transport = "openai"
    content_type = "text/event-stream"
    heartbeat = HEARTBEAT

    def __init__(self, generation: Generation, include_usage: bool) -> None:
        self._generation = generation
        self._encoder = ChunkEncoder(generation)
        self._include_usage = include_usage

    def encode(self, event: Event) -> bytes:
        return self._encoder.delta_frame(event)

    async def before_headers(
        self, subscription: LogSubscription, tracker: StreamTracker
    ) -> list[Event] | None:
        """Wait past `start` until a token or the terminal event."""
        batch: list[Event] = []
        while not any(e.type != "start" for e in batch):
            more = await subscription.next_batch()
            if more is None:
                break
            batch.extend(more)
        batch = [e for e in batch if e.type != "start"]
        if batch and batch[0].type == "error":
            tracker.saw(batch[0])
            _raise_failure(self._generation)
        return batch

    def preamble(self, first: list[Event] | None) -> bytes:
        return self._encoder.role(first[0] if first else None)

    def frames(self, batch: list[Event]) -> bytes:
        return b"".join(map(self._frame, batch))

    def _frame(self, event: Event) -> bytes:
        encoder = self._encoder
        if not event.terminal:
            return encoder.delta_frame(event)
        if event.type == "error":
            return error_frame(event)
        frames = encoder.finish(event)
        if self._include_usage:
            frames += encoder.usage(event)
        return frames + DONE_FRAME


async def _complete(request: web.Request, generation: Generation) -> web.Response:
    """Non-streaming: wait for the end (a client that leaves still cancels at once)."""
    tracker = track_stream(request, OpenAIWire.transport, generation, new=True)
    try:
        with generation.subscribe() as subscription:
            while await subscription.next_batch() is not None:
                pass
        terminal = generation.events[-1]
        if terminal.type == "error":
            tracker.saw(terminal)
            _raise_failure(generation)
        response = json_response(
            {
                "id": "chatcmpl-" + generation.id.removeprefix("gen_"),
                "object": "chat.completion",
                "created": generation.created,
                "model": generation.model,
                "choices": [
                    {
                        "index": 0,
                        "message": assembled_message(generation.events),
                        "logprobs": None,
                        "finish_reason": _finish_reason(terminal),
                    }
                ],
                "usage": terminal.fields["usage"],
                "system_fingerprint": None,
            }
        )
        # The whole answer goes out at once: its first token is written now.
        tracker.wrote(generation.events, response.content_length or 0)
        return response
    finally:
        end_stream(request, tracker, stalled=False)


def assembled_message(events: list[Event]) -> dict[str, Any]:
    """The non-streaming `message`: text, reasoning and tool calls joined from the log."""
    text: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.type == "token":
            text.append(event.text)
        elif event.type == "reasoning":
            reasoning.append(event.text)
        elif event.type == "tool_call":
            fields = event.fields
            call = calls.get(fields["index"])
            if call is None:
                function = {"name": fields.get("name", ""), "arguments": ""}
                call = {"id": fields.get("id", ""), "type": "function", "function": function}
                calls[fields["index"]] = call
            call["function"]["arguments"] += fields["arguments"]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text) if text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    return message


def _passthrough_of(request: web.Request) -> Callable[[Any], tuple[str, ...]]:
    catalog = request.app[catalog_key]

    def passthrough_of(model: Any) -> tuple[str, ...]:
        if model is not None and not isinstance(model, str):
            return ()  # the request's validation names the bad `model`
        return catalog.resolve(model).passthrough

    return passthrough_of


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    body = await read_generation_body(request)
    chat, extra, stream, include_usage = parse_chat_request(body, _passthrough_of(request))
    generation = await admit_generation(request, chat, passthrough=extra, resume_grace_s=0)
    if stream:
        wire = OpenAIWire(generation, include_usage)
        return await serve_stream(request, generation, -1, wire, new=True)
    return await _complete(request, generation)
