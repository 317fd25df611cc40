"""Server-Sent Events, on aiohttp-sse's `EventSourceResponse`.

aiohttp-sse gives the response headers (including `X-Accel-Buffering: no`),
the `: ping` heartbeat task with its send timeout, and `TCP_USER_TIMEOUT`.
Frames are encoded here once per event and written as bytes, because
`EventSourceResponse.send()` would re-encode each frame for every subscriber;
a test checks that our bytes equal what `send()` writes.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from multidict import MultiMapping

from gateway.errors import InvalidRequest
from gateway.events import Event
from gateway.generation import Generation
from gateway.keys import settings_key
from gateway.observe import end_stream, track_stream
from gateway.transports.common import (
    already_delivered,
    find_generation,
    finish_response,
    follow_admitted,
    parse_event_id,
    read_generation_body,
    start_from_dict,
)
from gateway.transports.push import http_pusher
from gateway.transports.sink import ClientGone, ClientSink

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


def _encoded(event: Event) -> bytes:
    return event.encoded(WIRE_FORMAT, encode_sse)


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


async def serve_sse(
    request: web.Request,
    generation: Generation,
    after_seq: int,
    *,
    new: bool = False,
    resumed: bool = False,
) -> web.StreamResponse:
    """Stream the log after `after_seq` until its terminal event or the client leaves.

    A follower of another replica's generation is admitted as a stream first
    (`follow_admitted`): a refusal is an HTTP error, not a stream.
    """
    async with follow_admitted(request, generation):
        return await _stream_sse(request, generation, after_seq, new=new, resumed=resumed)


async def _stream_sse(
    request: web.Request,
    generation: Generation,
    after_seq: int,
    *,
    new: bool = False,
    resumed: bool = False,
) -> web.StreamResponse:
    """Stream the log after `after_seq`; the first frame also sets the client's `retry:`."""
    streams = request.app[settings_key].streams
    response = EventSourceResponse(
        sep=SEPARATOR,
        allow_all_methods=True,
        ping_interval=streams.heartbeat_s,
        send_timeout=streams.write_timeout_s,
    )
    retry = b"retry: %d\n" % streams.sse_retry_ms
    tracker = track_stream(request, "sse", generation, new=new, resumed=resumed)
    sink = ClientSink(request, response.write, write_timeout_s=streams.write_timeout_s)
    try:
        with generation.subscribe(after_seq) as subscription:
            await response.prepare(request)
            push = http_pusher(response, sink, tracker, _encoded)
            async with response, sink:
                while (batch := await subscription.next_batch()) is not None:
                    data = retry + b"".join(map(_encoded, batch))
                    await sink.write(data)
                    tracker.wrote(batch, len(data))
                    retry = b""
                    subscription.push_tokens(push)  # the headers are out now
            await finish_response(response)
    except (ClientGone, ConnectionError):
        pass
    finally:
        end_stream(request, tracker, stalled=sink.stalled)
    return response


async def stream_sse(request: web.Request) -> web.StreamResponse:
    """GET|POST /v1/stream/sse: a new generation, or a resume by `Last-Event-ID`."""
    last_event_id = request.headers.get("Last-Event-ID", "").strip()
    if last_event_id:
        generation_id, seq = parse_event_id(last_event_id)
        generation = await find_generation(request, generation_id)
        if already_delivered(generation, seq):
            # 204 makes a browser EventSource stop reconnecting for good.
            return web.Response(status=204)
        return await serve_sse(request, generation, seq, resumed=True)
    if request.method == "POST":
        body = await read_generation_body(request)
    else:
        body = body_from_query(request.query)
    generation = await start_from_dict(request, body)
    return await serve_sse(request, generation, after_seq=-1, new=True)
