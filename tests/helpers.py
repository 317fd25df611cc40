"""How a test talks to a gateway: requests, NDJSON, SSE and WebSocket streams, raw sockets.

One set of clients for every test, whether the gateway is an in-process
`TestServer`, a `gateway serve` process or a bare base URL (`Target`). The SSE
parser follows the WHATWG spec and is independent of our encoder on purpose:
it reads the stream the way a browser does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from tests.gateway_process import GatewayProcess

#: The upstream key of test models: it must never reach a client or a log.
SECRET = "sk-test-secret-123456"
#: The event types that end a generation's stream.
TERMINAL = frozenset({"done", "error"})

#: A gateway to talk to: an in-process server, a `gateway serve` process or a base URL.
Target = TestServer | GatewayProcess | str

Events = list[dict[str, Any]]


def openai_model(base_url: str, name: str = "gpt", **overrides: Any) -> dict[str, Any]:
    """An `openai` model on a fake upstream: fast timeouts, no retries unless asked."""
    return {
        "name": name,
        "provider": "openai",
        "base_url": base_url,
        "api_key": SECRET,
        "upstream_model": f"{name}-upstream",
        "timeout_s": 1,
        "max_retries": 0,
        **overrides,
    }


# -- events ----------------------------------------------------------------------------


def text_of(events: Events) -> str:
    """The generated text: the token events' text, in order."""
    return "".join(e["text"] for e in events if e["type"] == "token")


def whole_deltas(texts: list[str], deltas: list[str] | tuple[str, ...]) -> bool:
    """`texts` are `deltas` in order, each a run of whole deltas: the gateway may put
    the deltas of one upstream read in one event, never split or reorder one."""
    index = 0
    for text in texts:
        run = ""
        while len(run) < len(text) and index < len(deltas):
            run += deltas[index]
            index += 1
        if run != text:
            return False
    return index == len(deltas)


def token_texts(events: Events) -> list[str]:
    return [e["text"] for e in events if e["type"] == "token"]


def assert_well_formed(events: Events, first_seq: int = 0) -> None:
    """Seqs contiguous from `first_seq`; exactly one terminal event, last."""
    assert [e["seq"] for e in events] == list(range(first_seq, first_seq + len(events)))
    assert events[-1]["type"] in TERMINAL
    assert all(e["type"] not in TERMINAL for e in events[:-1])


def scrape_value(scrape: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus scrape's samples called `name` that carry `labels`."""
    samples = (s for family in text_string_to_metric_families(scrape) for s in family.samples)
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


# -- HTTP ------------------------------------------------------------------------------


def url_for(target: Target, path: str, query: Mapping[str, str] | None = None) -> URL:
    """`path` on `target`, its query extended by `query`."""
    if isinstance(target, TestServer):
        url = target.make_url(path)
    else:
        url = URL((target.url if isinstance(target, GatewayProcess) else target) + path)
    return url.update_query(query) if query else url


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def preflight(origin: str) -> dict[str, str]:
    """What a browser sends before a cross-origin POST of JSON with a bearer."""
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def fetch(
    target: Target,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    query: Mapping[str, str] | None = None,
    data: Any = None,
) -> tuple[int, Mapping[str, str], bytes]:
    """One request on a fresh session (`body` as JSON, `data` as is): status, headers, body."""
    url = url_for(target, path, query)
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, json=body, data=data) as response:
            return response.status, response.headers, await response.read()


# -- NDJSON and SSE --------------------------------------------------------------------


def ndjson_events(raw: bytes) -> Events:
    """The events of an NDJSON body (blank heartbeat lines skipped)."""
    return [orjson.loads(line) for line in raw.split(b"\n") if line.strip()]


async def read_ndjson(response: aiohttp.ClientResponse) -> Events:
    return ndjson_events(await response.read())


def sse_events(raw: bytes) -> Events:
    """The events of a whole SSE body."""
    parser = SseParser()
    parser.feed(raw)
    return [orjson.loads(event.data) for event in parser.events]


async def read_sse_frames(response: aiohttp.ClientResponse, until: int | None = None) -> SseParser:
    """The response's SSE frames to its end, or only until `until` events have arrived."""
    parser = SseParser()
    async for chunk in response.content.iter_any():
        parser.feed(chunk)
        if until is not None and len(parser.events) >= until:
            break
    return parser


async def read_sse(response: aiohttp.ClientResponse) -> tuple[Events, SseParser]:
    """The response's SSE events decoded, and the frames they came in."""
    parser = await read_sse_frames(response)
    return [orjson.loads(e.data) for e in parser.events], parser


_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


@dataclass
class SseParser:
    """Feed bytes in any chunking; collect dispatched events and comments."""

    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    last_event_id: str = ""
    retry: int | None = None
    _buffer: str = ""
    _pending: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _saw_cr: bool = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        start = len(self.events)
        raw = self._pending + chunk
        # Keep an incomplete UTF-8 sequence for the next chunk.
        cut = len(raw)
        for back in range(1, min(4, len(raw)) + 1):
            byte = raw[-back]
            if byte & 0xC0 == 0x80:
                continue
            if byte & 0x80:
                need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
                if back < need:
                    cut = len(raw) - back
            break
        text, self._pending = raw[:cut].decode("utf-8", "replace"), raw[cut:]
        if not text:
            return []
        # A CRLF split across chunks: the LF ends no second line.
        position = 1 if self._saw_cr and text[0] == "\n" else 0
        self._saw_cr = text[-1] == "\r"
        # Whole lines at a time (not char by char), so a large event stays linear.
        for end in _LINE_END.finditer(text, position):
            self._line(self._buffer + text[position : end.start()])
            self._buffer = ""
            position = end.end()
        self._buffer += text[position:]
        return self.events[start:]

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments.append(line[1:].lstrip(" "))
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)

    def _dispatch(self) -> None:
        if not self._data:
            self._event = ""
            return
        self.events.append(
            SseEvent(
                self._event or "message", "\n".join(self._data), self.last_event_id, self.retry
            )
        )
        self._data, self._event = [], ""


# -- WebSocket -------------------------------------------------------------------------


async def ws_next(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next frame; the socket must not have ended."""
    message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.TEXT, f"socket ended: {message}"
    frame: dict[str, Any] = orjson.loads(message.data)
    return frame


async def ws_frames(
    ws: aiohttp.ClientWebSocketResponse, request_id: str | None = None, timeout: float = 10
) -> Events:
    """Frames up to a terminal one; with `request_id`, that request's frames only."""
    frames: Events = []
    async with asyncio.timeout(timeout):
        while not frames or frames[-1]["type"] not in TERMINAL:
            frame = await ws_next(ws)
            if request_id is None or frame.get("request_id") == request_id:
                frames.append(frame)
    return frames


async def ws_streams(
    ws: aiohttp.ClientWebSocketResponse, request_ids: set[str], timeout: float = 10
) -> dict[str, Events]:
    """Frames by request id, until each of `request_ids` has had its terminal one."""
    streams: dict[str, Events] = {}
    pending = set(request_ids)
    async with asyncio.timeout(timeout):
        while pending:
            frame = await ws_next(ws)
            streams.setdefault(frame.get("request_id", ""), []).append(frame)
            if frame["type"] in TERMINAL:
                pending.discard(frame.get("request_id", ""))
    return streams


async def ws_exchange(
    target: Target,
    message: dict[str, Any] | str,
    *,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
    origin: str | None = None,
    timeout: float = 10,
) -> Events:
    """Open /v1/stream/ws, send one message, read to the terminal frame (of the
    message's `request_id`; a message sent as text is not read for one)."""
    url = url_for(target, "/v1/stream/ws", query)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers=headers, origin=origin) as ws,
    ):
        if isinstance(message, str):
            await ws.send_str(message)
            return await ws_frames(ws, timeout=timeout)
        await ws.send_json(message)
        return await ws_frames(ws, message.get("request_id"), timeout)


async def ws_refusal(
    target: Target,
    *,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
    origin: str | None = None,
) -> int:
    """The status of a refused WebSocket handshake; an accepted one fails the test."""
    url = url_for(target, "/v1/stream/ws", query)
    try:
        async with aiohttp.ClientSession() as session:
            await (await session.ws_connect(url, headers=headers, origin=origin)).close()
    except aiohttp.WSServerHandshakeError as refused:
        return refused.status
    raise AssertionError(f"the WebSocket handshake was accepted: {headers} {query} {origin}")


# -- one generation on any transport ---------------------------------------------------


@dataclass
class Streamed:
    """What a client of one stream saw, kept whole so a test can check any part of it."""

    status: int
    headers: Mapping[str, str]
    events: Events
    #: The SSE frames as a browser read them (ids, event names, retry, comments).
    frames: SseParser = field(default_factory=SseParser)


@contextlib.asynccontextmanager
async def _session(session: aiohttp.ClientSession | None) -> AsyncIterator[aiohttp.ClientSession]:
    if session is not None:
        yield session
        return
    async with aiohttp.ClientSession() as own:
        yield own


async def stream(
    target: Target,
    transport: str,
    body: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> Streamed:
    """One generation of `body` over `transport` (`chunked`, `sse` or `ws`), read to its end.

    Over `ws` the request id is `r`, the status is the upgrade's 101 and no headers are kept.
    """
    if transport == "ws":
        message = {"type": "generate", "request_id": "r", **body}
        return Streamed(101, {}, await ws_exchange(target, message, headers=headers))
    url = url_for(target, f"/v1/stream/{transport}")
    async with _session(session) as client, client.post(url, json=body, headers=headers) as r:
        if transport == "sse":
            events, frames = await read_sse(r)
            return Streamed(r.status, r.headers, events, frames)
        return Streamed(r.status, r.headers, await read_ndjson(r))


# -- raw sockets -----------------------------------------------------------------------


async def open_stream(
    port: int,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    headers: dict[str, str] | None = None,
    rcvbuf: int | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a request and return the open connection (response unread), for dropping
    it at an exact point; `rcvbuf` shrinks the socket's receive buffer."""
    sock = None
    if rcvbuf is not None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = orjson.dumps(body) if body is not None else b""
    method = "POST" if body is not None else "GET"
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append("Content-Type: application/json")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    return reader, writer


async def read_generation_id(reader: asyncio.StreamReader) -> str:
    """Skip headers and read until the `start` event names the generation."""
    buffer = b""
    while b'"generation_id":"' not in buffer:
        chunk = await reader.read(4096)
        if not chunk:
            raise ConnectionError(f"closed before start: {buffer!r}")
        buffer += chunk
    start = buffer.index(b'"generation_id":"') + len(b'"generation_id":"')
    return buffer[start : buffer.index(b'"', start)].decode()


async def connect_with_small_window(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose receive buffer is 4 KiB, set before the handshake so
    the window stays small: a reader that pauses fills the server's buffers fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    return await asyncio.open_connection(sock=sock, limit=2**24)


async def raw_exchange(host: str, port: int, request: bytes, timeout: float = 10) -> bytes:
    """Write `request` byte for byte (what aiohttp's client would not send) and read
    the whole answer, to the connection's end."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()
