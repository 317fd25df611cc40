"""HTTP chunked transfer: one JSON event per line (`application/x-ndjson`).

Heartbeats are blank lines, which NDJSON readers skip.
"""

from __future__ import annotations

from aiohttp import web

from gateway.events import Event
from gateway.generation import Generation
from gateway.keys import settings_key
from gateway.observe import end_stream, track_stream
from gateway.transports.common import (
    STREAM_HEADERS,
    finish_response,
    follow_admitted,
    read_generation_body,
    start_from_dict,
)
from gateway.transports.push import http_pusher
from gateway.transports.sink import ClientGone, ClientSink

WIRE_FORMAT = "ndjson"
CONTENT_TYPE = "application/x-ndjson"
HEARTBEAT = b"\n"


def encode_ndjson(event: Event) -> bytes:
    return event.json + b"\n"


def _encoded(event: Event) -> bytes:
    return event.encoded(WIRE_FORMAT, encode_ndjson)


async def serve_ndjson(
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
        return await _stream_ndjson(request, generation, after_seq, new=new, resumed=resumed)


async def _stream_ndjson(
    request: web.Request,
    generation: Generation,
    after_seq: int,
    *,
    new: bool = False,
    resumed: bool = False,
) -> web.StreamResponse:
    """Stream the log after `after_seq` until its terminal event or the client leaves."""
    streams = request.app[settings_key].streams
    response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE, **STREAM_HEADERS})
    tracker = track_stream(request, "chunked", generation, new=new, resumed=resumed)
    sink = ClientSink(
        request,
        response.write,
        write_timeout_s=streams.write_timeout_s,
        heartbeat=HEARTBEAT,
        heartbeat_s=streams.heartbeat_s,
    )
    try:
        with generation.subscribe(after_seq) as subscription:
            await response.prepare(request)
            push = http_pusher(response, sink, tracker, _encoded)
            async with sink:
                while (batch := await subscription.next_batch()) is not None:
                    data = b"".join(map(_encoded, batch))
                    await sink.write(data)
                    tracker.wrote(batch, len(data))
                    subscription.push_tokens(push)  # the headers are out now
            await finish_response(response)
    except ClientGone:
        pass
    finally:
        end_stream(request, tracker, stalled=sink.stalled)
    return response


async def stream_chunked(request: web.Request) -> web.StreamResponse:
    """POST /v1/stream/chunked"""
    generation = await start_from_dict(request, await read_generation_body(request))
    return await serve_ndjson(request, generation, after_seq=-1, new=True)
