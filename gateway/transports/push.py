"""Token events written from the generation's task, for readers that keep up.

Awaiting each token costs the handler a task switch: the append resolves a
future, the loop schedules the handler, the handler wakes through its
middleware frames, encodes and writes, a loop turn after the token arrived.
A caught-up reader of an HTTP stream instead lets the generation call
`push` right after the append: it encodes, frames the bytes as an HTTP
chunk and queues them on the socket, all synchronously. Whenever that is not
safe (a write in flight, 64 KiB queued, the connection closing) it refuses,
and the handler is woken to write the usual way, with its drain and stall
watchdog. Measured (bench/RESULTS.md, Performance): with per-read batches, S2's
throughput x1.13; alone, no change in CPU per paced token, where the time
goes to the system calls and the upstream read, not to this hop.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import hdrs, web

from gateway.events import Event
from gateway.generation_log import Push
from gateway.stream_tracker import StreamTracker
from gateway.transports.sink import ClientSink


def http_pusher(
    response: web.StreamResponse,
    sink: ClientSink,
    tracker: StreamTracker,
    encode: Callable[[Event], bytes],
) -> Push:
    """A `Push` for a prepared, uncompressed HTTP stream whose headers have gone out."""
    chunked = response.headers.get(hdrs.TRANSFER_ENCODING) == "chunked"
    assert not response.compression, "pushed bytes bypass aiohttp's compressor"

    def push(events: list[Event]) -> bool:
        data = encode(events[0]) if len(events) == 1 else b"".join(map(encode, events))
        if not sink.write_now(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data):
            return False
        tracker.wrote(events, len(data))
        return True

    return push
