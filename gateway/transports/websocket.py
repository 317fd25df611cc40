"""WebSocket: many generations per socket, multiplexed by `request_id`.

The handler task is the only reader (aiohttp allows one). Each generation
or resume gets a forwarding task that writes frames; when the socket ends,
the forwarders are cancelled, which detaches their subscriptions and so
starts the generations' grace timers exactly as a dropped HTTP stream does.

A caught-up forwarder does not write its tokens itself: the generation pushes
them (`push.py` explains why), framed here as unmasked text frames and queued
on the socket through the socket's one sink, which refuses while any awaited
write is in flight, so frames of different generations never interleave.

A socket outlives the request that opened it, so what HTTP checks once per
request is checked here per message or per socket: a message rate (a flood
is closed with 1008), open sockets per principal, and the credential's
expiry (a socket whose JWT or ticket expired starts nothing new; its running
generations finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.access_log import log_stream
from gateway.admission import admit_follower, admit_generation, refuse_if_draining
from gateway.auth import Unauthorized
from gateway.errors import GatewayError, InvalidRequest, TooManyStreams
from gateway.events import Event
from gateway.generation_log import GenerationLog, LogSubscription, Push
from gateway.keys import principal, settings_key, socket_counts_key, websockets_key
from gateway.ratelimit import Lease
from gateway.schema import parse_generation_request, parse_json_object
from gateway.stream_tracker import StreamTracker, end_stream, track_stream
from gateway.transports.resume import find_generation, replay_from
from gateway.transports.sink import ClientGone, ClientSink

WIRE_FORMAT = "ws"
_CONTROL_FIELDS = frozenset({"type", "request_id"})
_MAX_REQUEST_ID = 128


def encode_ws(event: Event) -> bytes:
    """The event JSON with `generation_id` first; ids are URL-safe, so no escaping."""
    return b'{"generation_id":"%s",%s' % (event.generation_id.encode(), event.json[1:])


def with_request_id(request_id: str, encoded: bytes) -> bytes:
    """Splice this socket's `request_id` into a shared encoding without re-serialising."""
    return b'{"request_id":%s,%s' % (orjson.dumps(request_id), encoded[1:])


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (RFC 6455 5.2), as a server sends it.

    aiohttp's writer only has an awaitable send; a pushed token needs the
    bytes, to queue them synchronously like the HTTP transports' chunks.
    """
    size = len(payload)
    if size < 126:
        return b"\x81%c%s" % (size, payload)
    if size < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


class MessageRate:
    """A token bucket over one socket's messages: `burst` at once, `per_s` sustained."""

    __slots__ = ("_at", "_burst", "_per_s", "_tokens")

    def __init__(self, per_s: float, burst: int) -> None:
        self._per_s, self._burst = per_s, float(burst)
        self._tokens, self._at = float(burst), time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._per_s)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _request_id(message: dict[str, Any]) -> str:
    value = message.get("request_id")
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_REQUEST_ID:
        raise InvalidRequest(
            f"request_id: a string of 1 to {_MAX_REQUEST_ID} characters is required"
        )
    return value


class WebSocketSession:
    """The state of one socket: its forwarders, keyed by request id."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self._request = request
        self._ws = ws
        self._max_active = request.app[settings_key].streams.max_per_socket
        self._active: dict[str, tuple[asyncio.Task[None], GenerationLog]] = {}
        #: Follower leases being released (a done callback cannot await).
        self._releasing: set[asyncio.Task[None]] = set()
        self._sink = ClientSink(
            request,
            self._send_text,
            write_timeout_s=request.app[settings_key].streams.write_timeout_s,
        )

    async def close_for_restart(self) -> None:
        """After a drain ended the generations: flush their last frames, close with 1012."""
        tasks = [task for task, _ in self._active.values()]
        if tasks:
            await asyncio.wait(tasks)
        await self._ws.close(code=WSCloseCode.SERVICE_RESTART, message=b"service restart")

    async def __aenter__(self) -> WebSocketSession:
        await self._sink.__aenter__()
        self._request.app[websockets_key].add(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._request.app[websockets_key].discard(self)
        # Cancel everything before the first await: the handler itself may be
        # cancelled (client gone) while it waits below.
        tasks = [task for task, _ in self._active.values()]
        for task in tasks:
            task.cancel()
        beat = self._sink.stop()
        if beat is not None:
            tasks.append(beat)
        if tasks:
            await asyncio.wait(tasks)
        if self._releasing:  # the forwarders' done callbacks started these
            await asyncio.wait(list(self._releasing))

    async def _send_text(self, data: bytes) -> None:
        await self._ws.send_frame(data, WSMsgType.TEXT)

    async def handle(self, raw: bytes | str) -> None:
        """Act on one client message; a bad one gets an `error` frame, never a close."""
        request_id: str | None = None
        arrival = time.monotonic()
        try:
            message = parse_json_object(raw)
            request_id = (
                message.get("request_id") if isinstance(message.get("request_id"), str) else None
            )
            kind = message.get("type")
            if kind in ("generate", "resume"):
                self._check_credential()
            if kind == "generate":
                await self._generate(message, arrival)
            elif kind == "resume":
                await self._resume(message)
            elif kind == "cancel":
                await self._cancel(message)
            else:
                raise InvalidRequest("type: must be one of generate, resume, cancel")
        except GatewayError as exc:
            await self.send_error(request_id, exc)

    def _check_credential(self) -> None:
        """A JWT or ticket that expired while the socket was open starts nothing new."""
        expires_at = principal(self._request).expires_at
        if expires_at is not None and time.time() >= expires_at:
            raise Unauthorized(
                "this socket's credential has expired: reconnect with a new one", "expired"
            )

    async def send_error(self, request_id: str | None, exc: GatewayError) -> None:
        frame = {"type": "error", "request_id": request_id, **exc.event_fields()}
        with contextlib.suppress(ClientGone):
            await self._sink.write(orjson.dumps(frame))

    def _reserve(self, message: dict[str, Any]) -> str:
        request_id = _request_id(message)
        if request_id in self._active:
            raise InvalidRequest(f"request_id {request_id!r} is already streaming on this socket")
        if len(self._active) >= self._max_active:
            raise TooManyStreams(f"at most {self._max_active} streams may run on one socket")
        return request_id

    async def _generate(self, message: dict[str, Any], arrival: float) -> None:
        request_id = self._reserve(message)
        body = {k: v for k, v in message.items() if k not in _CONTROL_FIELDS}
        generation = await admit_generation(self._request, parse_generation_request(body))
        tracker = track_stream(self._request, "websocket", generation, new=True, arrival=arrival)
        self._forward(request_id, generation, -1, tracker, None)

    async def _resume(self, message: dict[str, Any]) -> None:
        request_id = self._reserve(message)
        generation_id, after_seq = message.get("generation_id"), message.get("after_seq", -1)
        if not isinstance(generation_id, str):
            raise InvalidRequest("generation_id: a string is required")
        if not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < -1:
            raise InvalidRequest("after_seq: an integer >= -1 is required")
        generation = await find_generation(self._request, generation_id)
        lease = await admit_follower(self._request, generation)
        tracker = track_stream(self._request, "websocket", generation, new=False, resumed=True)
        self._forward(request_id, generation, replay_from(generation, after_seq), tracker, lease)

    async def _cancel(self, message: dict[str, Any]) -> None:
        request_id = _request_id(message)
        active = self._active.get(request_id)
        if active is None:
            raise InvalidRequest(f"request_id {request_id!r} is not streaming on this socket")
        await active[1].request_cancel()

    def _forward(
        self,
        request_id: str,
        generation: GenerationLog,
        after_seq: int,
        tracker: StreamTracker,
        lease: Lease | None,
    ) -> None:
        """Follow `generation` for `request_id`; `lease` (a remote log's reader) ends with it."""
        # Attach now, synchronously, so a grace of 0 never sees zero subscribers.
        subscription = generation.subscribe(after_seq).__enter__()
        task = asyncio.get_running_loop().create_task(self._pump(request_id, subscription, tracker))
        self._active[request_id] = (task, generation)
        # A done callback, not the task's `finally`: a task cancelled before its
        # first step never runs its body, and the stream must still end once.
        task.add_done_callback(lambda _: self._ended(request_id, subscription, tracker, lease))

    def _ended(
        self,
        request_id: str,
        subscription: LogSubscription,
        tracker: StreamTracker,
        lease: Lease | None,
    ) -> None:
        self._active.pop(request_id, None)
        subscription.close()
        end_stream(self._request, tracker, stalled=self._sink.stalled)
        log_stream(self._request, tracker, ws_request_id=request_id)
        if lease is not None:
            release = asyncio.get_running_loop().create_task(lease.release(0))
            self._releasing.add(release)
            release.add_done_callback(self._releasing.discard)

    async def _pump(
        self, request_id: str, subscription: LogSubscription, tracker: StreamTracker
    ) -> None:
        push = self._pusher(request_id, tracker)
        try:
            while (batch := await subscription.next_batch()) is not None:
                nbytes = 0
                for event in batch:
                    frame = with_request_id(request_id, event.encoded(WIRE_FORMAT, encode_ws))
                    await self._sink.write(frame)
                    nbytes += len(frame)
                tracker.wrote(batch, nbytes)
                subscription.push_tokens(push)
        except ClientGone:
            pass

    def _pusher(self, request_id: str, tracker: StreamTracker) -> Push:
        """Token frames for `request_id`, queued from the generation's task while
        the socket keeps up; refused once the socket has begun to close."""
        ws, sink = self._ws, self._sink

        def push(events: list[Event]) -> bool:
            if ws.closed:
                return False
            payloads = [
                with_request_id(request_id, event.encoded(WIRE_FORMAT, encode_ws))
                for event in events
            ]
            if not sink.write_now(b"".join(map(text_frame, payloads))):
                return False
            tracker.wrote(events, sum(map(len, payloads)))
            return True

        return push


#: What a plain GET of the WebSocket route is told.
NOT_A_WEBSOCKET = (
    "/v1/stream/ws is a WebSocket route: connect with a WebSocket client (a browser's "
    "new WebSocket('ws://HOST/v1/stream/ws'), aiohttp's session.ws_connect) and send "
    '{"type": "generate", "request_id": "r1", "prompt": "Hi"}; over plain HTTP, '
    "POST /v1/stream/chunked or /v1/stream/sse"
)


def refuse_plain_get(request: web.Request) -> None:
    """426 Upgrade Required, not aiohttp's bare 400: the request is fine HTTP, for a
    resource served only over another protocol, which is what 426 says (RFC 9110
    15.5.22: it names the protocol in `Upgrade`; 7.8: `Connection` then lists
    `upgrade`). A handshake that is attempted but malformed stays aiohttp's 400
    (RFC 6455 4.2.1)."""
    if request.headers.get("Upgrade", "").strip().lower() != "websocket":
        headers = {"Upgrade": "websocket", "Connection": "Upgrade"}
        raise InvalidRequest(NOT_A_WEBSOCKET, status=426, headers=headers)


async def stream_ws(request: web.Request) -> web.StreamResponse:
    """GET /v1/stream/ws"""
    refuse_plain_get(request)
    refuse_if_draining(request)
    settings = request.app[settings_key]
    streams = settings.streams
    counts = request.app[socket_counts_key]
    owner = principal(request).rate_key
    cap = streams.max_sockets_per_principal
    if cap and counts[owner] >= cap:
        raise TooManyStreams(
            f"at most {cap} WebSockets may be open per principal; close one, or multiplex"
            " generations on one socket",
            headers={
                "Retry-After": "1",
                "RateLimit-Limit": str(cap),
                "RateLimit-Remaining": "0",
                "RateLimit-Reset": "1",
            },
        )
    ws = web.WebSocketResponse(
        heartbeat=streams.heartbeat_s,
        compress=False,  # deflate would hold small token frames back
        max_msg_size=settings.server.max_body_bytes,
    )
    await ws.prepare(request)
    counts[owner] += 1
    try:
        await _serve(request, ws, MessageRate(streams.ws_messages_per_s, streams.ws_message_burst))
    finally:
        counts[owner] -= 1
        if counts[owner] <= 0:
            del counts[owner]
    return ws


async def _serve(request: web.Request, ws: web.WebSocketResponse, rate: MessageRate) -> None:
    async with WebSocketSession(request, ws) as session:
        async for message in ws:
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            if not rate.allow():
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"message rate exceeded")
                break
            if message.type is WSMsgType.TEXT:
                await session.handle(message.data)
            else:
                await session.send_error(
                    None, InvalidRequest("binary frames are not accepted; send JSON text")
                )
