"""Server-Sent Events, on aiohttp-sse's `EventSourceResponse`.

aiohttp-sse gives the response headers (including `X-Accel-Buffering: no`).
Its `TCP_USER_TIMEOUT` handling is not used: the listening socket carries
the option for every connection (`gateway/server.py`), where aiohttp-sse
read, set and restored it per response. Its ping task is not started:
the stream's sink (`sink.py`) already writes `: ping` after
`streams.heartbeat_s` without output (the contract's heartbeat; the task
pinged on a clock, between tokens too) and cuts off a stalled client, on
one timer, as on every HTTP transport. A task
per stream, with its sleeps, its cancellation and the wait for it, was a cost
of every SSE start. Frames are encoded here once per event and written as
bytes, because `EventSourceResponse.send()` would re-encode each frame for
every subscriber; a test checks that our bytes equal what `send()` writes.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse
from multidict import MultiMapping

from gateway.admission import admit_generation
from gateway.config import StreamSettings
from gateway.errors import InvalidRequest
from gateway.events import Event
from gateway.keys import settings_key
from gateway.metrics import Transport
from gateway.schema import parse_generation_request
from gateway.transports.body import read_generation_body
from gateway.transports.pump import HttpWire, follow, serve_stream
from gateway.transports.resume import parse_event_id

WIRE_FORMAT = "sse"
SEPARATOR = "\n"
_QUERY_INTS = frozenset({"max_tokens", "seed"})
_QUERY_STRINGS = frozenset({"prompt", "model", "on_disconnect"})
#: Read by the auth layer, not part of the generation request.
_QUERY_IGNORED = frozenset({"access_token"})


def encode_sse(event: Event) -> bytes:
    """`id: <generation_id>:<seq>`, `event: <type>`, `data: <JSON>` (JSON has no raw newlines).

    A `shutting_down` error has no `id:`: the browser keeps the id of the last
    token as its `Last-Event-ID`, and resumes from there on another replica.
    """
    if event.type == "error" and event.fields.get("code") == "shutting_down":
        return b"event: error\ndata: %s\n\n" % event.json
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        event.event_id.encode(),
        event.type.encode(),
        event.json,
    )


class _EventStream(EventSourceResponse):
    """aiohttp-sse's response, prepared without its ping task and its socket
    options (see above)."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        writer = await web.StreamResponse.prepare(self, request)
        self.enable_chunked_encoding()  # as aiohttp-sse does
        return writer


class SseWire(HttpWire):
    """The first frame also sets the client's reconnection delay (`retry:`)."""

    transport: Transport = "sse"
    heartbeat = b": ping" + (SEPARATOR * 2).encode()

    def __init__(self, retry_ms: int) -> None:
        self._retry = b"retry: %d\n" % retry_ms

    def response(self, streams: StreamSettings) -> web.StreamResponse:
        return _EventStream(sep=SEPARATOR, allow_all_methods=True)

    def preamble(self, first: list[Event] | None) -> bytes:
        return self._retry

    def encode(self, event: Event) -> bytes:
        return event.encoded(WIRE_FORMAT, encode_sse)


def sse_wire(request: web.Request) -> SseWire:
    return SseWire(request.app[settings_key].streams.sse_retry_ms)


def body_from_query(query: MultiMapping[str]) -> dict[str, object]:
    """The request body of `GET /v1/stream/sse?prompt=…` (EventSource can only GET)."""
    body: dict[str, object] = {}
    for name, value in query.items():
        if name in _QUERY_IGNORED:
            continue
        if name in _QUERY_STRINGS:
            body[name] = value
        elif name in _QUERY_INTS:
            try:
                body[name] = int(value)
            except ValueError:
                raise InvalidRequest(f"{name}: must be an integer") from None
        else:
            raise InvalidRequest(f"{name}: unknown query parameter")
    if "prompt" not in body:
        raise InvalidRequest("prompt: query parameter required")
    return body


async def stream_sse(request: web.Request) -> web.StreamResponse:
    """GET|POST /v1/stream/sse: a new generation, or a resume by `Last-Event-ID`."""
    last_event_id = request.headers.get("Last-Event-ID", "").strip()
    if last_event_id:
        generation_id, seq = parse_event_id(last_event_id)
        return await follow(request, generation_id, seq, sse_wire(request))
    if request.method == "POST":
        data = await read_generation_body(request)
    else:
        data = body_from_query(request.query)
    generation = await admit_generation(request, parse_generation_request(data))
    return await serve_stream(request, generation, -1, sse_wire(request), new=True)
