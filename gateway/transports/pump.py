"""The one stream pump of the HTTP transports.

Every HTTP stream does the same: admit a reader of a remote log as a stream,
subscribe from a seq, send the headers, write each batch of events through
the sink (heartbeats and the stall watchdog), let the generation push tokens
synchronously once the reader is caught up, and end the body after the
terminal event. A transport contributes only an `HttpWire`: its response,
its encoder and what it writes first. After the headers have gone out a
failure is an event in the stream (the log's terminal `error`), never a
second response: nothing here raises past `prepare()` but a cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from gateway.admission import Following
from gateway.config import StreamSettings
from gateway.events import Event
from gateway.generation_log import GenerationLog, LogSubscription, Push
from gateway.keys import settings_key
from gateway.metrics import Transport
from gateway.stream_tracker import StreamTracker, end_stream, track_stream
from gateway.transports.push import http_pusher
from gateway.transports.resume import already_delivered, find_generation
from gateway.transports.sink import ClientGone, ClientSink

#: Response headers for streams: no caching, and no buffering in nginx
#: (`X-Accel-Buffering: no`: nginx buffers proxied responses by default).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpWire:
    """How one HTTP transport puts a log on the wire; the defaults suit a plain body."""

    #: The `transport` label of its metrics.
    transport: Transport
    content_type = "application/octet-stream"
    #: Written by the sink after a quiet spell; None: the response has its own.
    heartbeat: bytes | None = None

    def response(self, streams: StreamSettings) -> web.StreamResponse:
        return web.StreamResponse(headers={"Content-Type": self.content_type, **STREAM_HEADERS})

    async def before_headers(
        self, subscription: LogSubscription, tracker: StreamTracker
    ) -> list[Event] | None:
        """Events read before the headers go out (a failure here is still an HTTP error)."""
        return None

    def preamble(self, first: list[Event] | None) -> bytes:
        """Bytes written ahead of the first batch."""
        return b""

    def encode(self, event: Event) -> bytes:
        """One event; also what a push writes for a token."""
        raise NotImplementedError

    def frames(self, batch: list[Event]) -> bytes:
        return b"".join(map(self.encode, batch))

    def pusher(
        self, response: web.StreamResponse, sink: ClientSink, tracker: StreamTracker
    ) -> Push:
        """How the generation writes tokens to a caught-up reader (`push.py`).

        A refused push hands the same events to `frames` next: a wire whose
        encoding has state must undo what the refused encoding changed.
        """
        return http_pusher(response, sink, tracker, self.encode)


async def finish_response(response: web.StreamResponse) -> None:
    """End a chunked body. The terminal event is out already: a client that
    hung up the moment it read it has the whole stream, so a reset is fine."""
    with contextlib.suppress(ConnectionError):  # aiohttp's ClientConnectionResetError is one
        await response.write_eof()


async def serve_stream(
    request: web.Request,
    generation: GenerationLog,
    after_seq: int,
    wire: HttpWire,
    *,
    new: bool = False,
    resumed: bool = False,
) -> web.StreamResponse:
    """Stream the log after `after_seq` until its terminal event or the client leaves.

    A reader of another replica's generation is admitted as a stream first:
    a refusal is an HTTP error, not a stream.
    """
    async with Following(request, generation):
        streams = request.app[settings_key].streams
        tracker = track_stream(request, wire.transport, generation, new=new, resumed=resumed)
        sink: ClientSink | None = None
        try:
            with generation.subscribe(after_seq) as subscription:
                if new:
                    # One loop turn for the generation's task first: its
                    # upstream request goes out now, and the response set-up
                    # and first write below overlap with the upstream's
                    # thinking instead of delaying its first token.
                    await asyncio.sleep(0)
                first = await wire.before_headers(subscription, tracker)
                response = wire.response(streams)
                if new:
                    # A new generation's `start` is in its log already, so the
                    # headers can wait for it and go out in the same send (one
                    # system call a stream fewer). aiohttp's opt-in to buffered
                    # headers; were it gone, they would only go out on their own.
                    response._send_headers_immediately = False
                sink = ClientSink(
                    request,
                    response.write,
                    write_timeout_s=streams.write_timeout_s,
                    heartbeat=wire.heartbeat,
                    heartbeat_s=streams.heartbeat_s,
                    end=response.write_eof,
                )
                try:
                    await response.prepare(request)
                    await _pump(response, sink, subscription, tracker, wire, first)
                except (ClientGone, ConnectionError):
                    pass
        finally:
            end_stream(request, tracker, stalled=sink is not None and sink.stalled)
        return response


async def _pump(
    response: web.StreamResponse,
    sink: ClientSink,
    subscription: LogSubscription,
    tracker: StreamTracker,
    wire: HttpWire,
    first: list[Event] | None,
) -> None:
    push = wire.pusher(response, sink, tracker)
    async with sink:
        out = wire.preamble(first)
        batch = first if first is not None else await subscription.next_batch()
        while batch is not None:
            data = out + wire.frames(batch) if batch else out
            out = b""
            # The terminal event and the body's end go out in one send.
            last = bool(batch) and batch[-1].terminal
            await sink.write(data, last=last)
            if batch:
                tracker.wrote(batch, len(data))
            if last:
                break
            subscription.push_tokens(push)  # the headers are out now
            batch = await subscription.next_batch()
    await finish_response(response)  # a no-op after a `last` write


async def follow(
    request: web.Request, generation_id: str, after_seq: int, wire: HttpWire
) -> web.StreamResponse:
    """A returning (or late) reader: 204 if it has seen the end, else the log after `after_seq`."""
    generation = await find_generation(request, generation_id)
    if already_delivered(generation, after_seq):
        return web.Response(status=204)
    # Attaching from the start is not a resume; any later seq is.
    return await serve_stream(request, generation, after_seq, wire, resumed=after_seq >= 0)
