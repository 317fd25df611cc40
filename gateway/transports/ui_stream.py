"""The Vercel AI SDK's UI message stream, so `useChat` apps need only an `api` URL.

- `POST /v1/stream/ui` takes `DefaultChatTransport`'s body (`ui_messages.py`)
  and answers with the UI message stream: SSE `data: <chunk>` frames, header
  `x-vercel-ai-ui-message-stream: v1`, `data: [DONE]` at the end.
- `GET /v1/stream/ui/{chat_id}/stream` is where `useChat({resume: true})`
  reconnects: the chat's running generation, replayed from its start (the
  SDK resets the message on the replay's `start`) and then live, on any
  replica with the Redis backend; 204 when nothing runs.
- `DELETE /v1/stream/ui/{chat_id}/stream` cancels it. `useChat`'s `stop()`
  only aborts its fetch, which a server cannot tell from a dropped
  connection: a stop button calls this too, so that a stopped answer is not
  resumed on reload while a dropped one is.

Chunks per event: `start` → `start` (`messageId`: the generation id, or the
assistant message a tool result continues) and `start-step`; tokens →
`text-start/-delta/-end`; reasoning → `reasoning-start/-delta/-end`; a tool
call → `tool-input-start`, `tool-input-delta`s, and `tool-input-available`
with the parsed input once the call is complete (its `onToolCall` runs
then); `done` → `finish-step`, `finish` (OpenAI's reasons in the SDK's
spelling); `error` → `error`, never `finish`, so the SDK shows an error, not
a finished answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.admission import admit_generation
from gateway.chat_index import ChatEntry
from gateway.config import StreamSettings
from gateway.errors import GenerationNotFound, InvalidRequest
from gateway.events import Event
from gateway.generation_log import GenerationLog, Push
from gateway.keys import chat_index_key, principal_of
from gateway.metrics import Transport
from gateway.middleware import json_response
from gateway.shared_log_reader import StoreUnavailable
from gateway.stream_tracker import StreamTracker
from gateway.transports.body import read_generation_body
from gateway.transports.pump import STREAM_HEADERS, HttpWire, serve_stream
from gateway.transports.resume import find_generation
from gateway.transports.sink import ClientSink
from gateway.ui_messages import MAX_CHAT_ID_CHARS, UIPart, parse_ui_chat, tool_name

log = logging.getLogger(__name__)

UI_STREAM_HEADER = {"x-vercel-ai-ui-message-stream": "v1"}
HEARTBEAT = b": ping\n\n"
DONE_FRAME = b"data: [DONE]\n\n"
#: Our finish reasons in the AI SDK's spelling; anything else (`cancelled`) is "other".
FINISH_REASONS: Mapping[str, str] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "content_filter": "content-filter",
}

#: A tool call being streamed: its id, its function's name, its arguments so far.
_Call = tuple[str, str, str]


def chunk(value: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


def _parsed_input(arguments: str) -> tuple[bool, Any]:
    try:
        return True, orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return False, arguments


class UiWire(HttpWire):
    """The SDK's chunks of one reader; they open and close parts, so the wire
    keeps which are open (a new wire per response, never shared)."""

    transport: Transport = "ui"
    content_type = "text/event-stream"
    heartbeat = HEARTBEAT

    def __init__(
        self, generation: GenerationLog, message_id: str, earlier_parts: bytes = b""
    ) -> None:
        self._generation_id = generation.id
        self._model = generation.model
        self._message_id = message_id
        self._earlier_parts = earlier_parts
        # Replaced, never mutated, so that a refused push can restore them.
        self._text: bytes | None = None  # the open text part's id
        self._reasoning: bytes | None = None  # the open reasoning part's id
        self._calls: dict[int, _Call] = {}  # calls not yet announced as available

    def response(self, streams: StreamSettings) -> web.StreamResponse:
        headers = {"Content-Type": self.content_type, **STREAM_HEADERS, **UI_STREAM_HEADER}
        return web.StreamResponse(headers=headers)

    def pusher(
        self, response: web.StreamResponse, sink: ClientSink, tracker: StreamTracker
    ) -> Push:
        push = super().pusher(response, sink, tracker)

        def push_or_undo(events: list[Event]) -> bool:
            saved = self._text, self._reasoning, self._calls
            if push(events):
                return True
            self._text, self._reasoning, self._calls = saved
            return False

        return push_or_undo

    def encode(self, event: Event) -> bytes:
        kind = event.type
        if kind == "token":
            out = b"" if self._text is not None else self._open_text(event.seq)
            return out + b'data: {"type":"text-delta","id":"%s","delta":%s}\n\n' % (
                self._text,
                event.text_json,
            )
        if kind == "reasoning":
            out = b"" if self._reasoning is not None else self._open_reasoning(event.seq)
            return out + b'data: {"type":"reasoning-delta","id":"%s","delta":%s}\n\n' % (
                self._reasoning,
                event.text_json,
            )
        if kind == "tool_call":
            return self._tool_call(event.fields)
        if kind == "start":
            metadata = {"generationId": self._generation_id, "model": self._model}
            start = {"type": "start", "messageId": self._message_id, "messageMetadata": metadata}
            return chunk(start) + self._earlier_parts + chunk({"type": "start-step"})
        fields = event.fields
        if kind == "done":
            reason = FINISH_REASONS.get(fields.get("finish_reason", ""), "other")
            finish: dict[str, Any] = {"type": "finish", "finishReason": reason}
            if fields.get("usage"):
                finish["messageMetadata"] = {"usage": fields["usage"]}
            return self._close_parts() + chunk({"type": "finish-step"}) + chunk(finish) + DONE_FRAME
        return chunk({"type": "error", "errorText": fields.get("message", "")}) + DONE_FRAME

    def _open_text(self, seq: int) -> bytes:
        out = self._close_reasoning() + self._calls_available()
        self._text = b"text-%d" % seq
        return out + b'data: {"type":"text-start","id":"%s"}\n\n' % self._text

    def _open_reasoning(self, seq: int) -> bytes:
        out = self._close_text() + self._calls_available()
        self._reasoning = b"reasoning-%d" % seq
        return out + b'data: {"type":"reasoning-start","id":"%s"}\n\n' % self._reasoning

    def _close_text(self) -> bytes:
        if self._text is None:
            return b""
        out = b'data: {"type":"text-end","id":"%s"}\n\n' % self._text
        self._text = None
        return out

    def _close_reasoning(self) -> bytes:
        if self._reasoning is None:
            return b""
        out = b'data: {"type":"reasoning-end","id":"%s"}\n\n' % self._reasoning
        self._reasoning = None
        return out

    def _close_parts(self) -> bytes:
        return self._close_text() + self._close_reasoning() + self._calls_available()

    def _tool_call(self, fields: dict[str, Any]) -> bytes:
        """A fragment of call `index`: the first names it, the rest extend its arguments."""
        out = self._close_text() + self._close_reasoning()
        index, arguments = fields["index"], fields["arguments"]
        call = self._calls.get(index)
        if call is None:
            call_id, name = str(fields.get("id") or f"call_{index}"), fields.get("name", "")
            out += chunk({"type": "tool-input-start", "toolCallId": call_id, "toolName": name})
            call = (call_id, name, "")
        if arguments:
            out += chunk(
                {"type": "tool-input-delta", "toolCallId": call[0], "inputTextDelta": arguments}
            )
        self._calls = {**self._calls, index: (call[0], call[1], call[2] + arguments)}
        return out

    def _calls_available(self) -> bytes:
        """Complete calls, handed to the SDK (its `onToolCall`) with their parsed input."""
        if not self._calls:
            return b""
        out = b""
        for call_id, name, arguments in self._calls.values():
            ok, value = _parsed_input(arguments)
            if ok:
                out += chunk(
                    {
                        "type": "tool-input-available",
                        "toolCallId": call_id,
                        "toolName": name,
                        "input": value,
                    }
                )
            else:
                error = f"the model's arguments for {name} are not valid JSON"
                out += chunk(
                    {
                        "type": "tool-input-error",
                        "toolCallId": call_id,
                        "toolName": name,
                        "input": value,
                        "errorText": error,
                    }
                )
        self._calls = {}
        return out


def earlier_parts_chunks(parts: tuple[UIPart, ...]) -> bytes:
    """A continued message's parts as chunks, for a replay of its answer.

    A reconnect's replay starts with `start`, on which the SDK rebuilds the
    message from nothing: without these, the steps before a tool's output
    was sent back would vanish from the page. Tool calls are rebuilt with
    `tool-input-start`/`-delta` and their output chunk, never with
    `tool-input-available`, which would run the app's `onToolCall` again.
    """
    out: list[bytes] = []
    for number, part in enumerate(parts):
        kind, name = part.type, tool_name(part)
        if kind == "step-start":
            if out:
                out.append(chunk({"type": "finish-step"}))
            out.append(chunk({"type": "start-step"}))
        elif kind in ("text", "reasoning") and part.text:
            part_id = f"earlier-{number}"
            out.append(chunk({"type": f"{kind}-start", "id": part_id}))
            out.append(chunk({"type": f"{kind}-delta", "id": part_id, "delta": part.text}))
            out.append(chunk({"type": f"{kind}-end", "id": part_id}))
        elif name and part.toolCallId and part.state in ("output-available", "output-error"):
            call = {"toolCallId": part.toolCallId}
            start: dict[str, Any] = {"type": "tool-input-start", **call, "toolName": name}
            if part.type == "dynamic-tool":
                start["dynamic"] = True
            out.append(chunk(start))
            arguments = orjson.dumps(part.input).decode()
            out.append(chunk({"type": "tool-input-delta", **call, "inputTextDelta": arguments}))
            if part.state == "output-available":
                out.append(chunk({"type": "tool-output-available", **call, "output": part.output}))
            else:
                error = part.errorText or "the tool failed"
                out.append(chunk({"type": "tool-output-error", **call, "errorText": error}))
    if out:
        out.append(chunk({"type": "finish-step"}))
    return b"".join(out)


async def _remember(request: web.Request, chat_id: str, entry: ChatEntry) -> None:
    """Register the chat's answer; without the store the stream still goes on,
    only a reconnect will not find it."""
    try:
        await request.app[chat_index_key].put(principal_of(request), chat_id, entry)
    except StoreUnavailable:
        log.warning("chat not registered for resume: the shared store is unreachable")


def _chat_id(request: web.Request) -> str:
    chat_id = request.match_info["chat_id"]
    if len(chat_id) > MAX_CHAT_ID_CHARS:
        raise InvalidRequest(f"chat id: at most {MAX_CHAT_ID_CHARS} characters")
    return chat_id


async def _running(request: web.Request) -> tuple[GenerationLog, ChatEntry] | None:
    """The chat's generation of this principal while it runs, else None."""
    entry = await request.app[chat_index_key].get(principal_of(request), _chat_id(request))
    if entry is None:
        return None
    try:
        generation = await find_generation(request, entry.generation_id)
    except GenerationNotFound:
        return None
    if generation.terminal_seq is not None:
        return None
    return generation, entry


async def stream_ui(request: web.Request) -> web.StreamResponse:
    """POST /v1/stream/ui"""
    chat = parse_ui_chat(await read_generation_body(request))
    generation = await admit_generation(request, chat.request)
    entry = ChatEntry(
        generation.id,
        chat.continues_message or generation.id,
        earlier_parts_chunks(chat.earlier_parts),
    )
    await _remember(request, chat.chat_id, entry)
    # This reader has the earlier parts: only a replay sends them again.
    wire = UiWire(generation, entry.message_id)
    return await serve_stream(request, generation, -1, wire, new=True)


async def resume_ui(request: web.Request) -> web.StreamResponse:
    """GET /v1/stream/ui/{chat_id}/stream"""
    found = await _running(request)
    if found is None:
        return web.Response(status=204)
    generation, entry = found
    wire = UiWire(generation, entry.message_id, entry.earlier_parts)
    return await serve_stream(request, generation, -1, wire, resumed=True)


async def stop_ui(request: web.Request) -> web.Response:
    """DELETE /v1/stream/ui/{chat_id}/stream"""
    found = await _running(request)
    if found is None:
        return web.Response(status=204)
    generation, _ = found
    await generation.request_cancel()
    return json_response({"cancelled": True, "generation_id": generation.id})
