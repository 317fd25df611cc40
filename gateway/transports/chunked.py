"""HTTP chunked transfer: one JSON event per line (`application/x-ndjson`).

Heartbeats are blank lines, which NDJSON readers skip.
"""

from __future__ import annotations

from aiohttp import web

from gateway.admission import admit_generation
from gateway.events import Event
from gateway.metrics import Transport
from gateway.schema import parse_generation_request
from gateway.transports.body import read_generation_body
from gateway.transports.pump import HttpWire, serve_stream

WIRE_FORMAT = "ndjson"
CONTENT_TYPE = "application/x-ndjson"


def encode_ndjson(event: Event) -> bytes:
    return event.json + b"\n"


class NdjsonWire(HttpWire):
    transport: Transport = "chunked"
    content_type = CONTENT_TYPE
    heartbeat = b"\n"

    def encode(self, event: Event) -> bytes:
        return event.encoded(WIRE_FORMAT, encode_ndjson)


NDJSON = NdjsonWire()


async def stream_chunked(request: web.Request) -> web.StreamResponse:
    """POST /v1/stream/chunked"""
    body = parse_generation_request(await read_generation_body(request))
    generation = await admit_generation(request, body)
    return await serve_stream(request, generation, -1, NDJSON, new=True)
