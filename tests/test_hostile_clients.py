"""Hostile clients against a real `gateway serve` process: slowloris, floods, junk.

The process runs with `server.idle_timeout_s: 1` and `server.body_timeout_s: 1`
so that the deadlines show within a test; the defaults are 75 s and 10 s.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import socket
import struct
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import pytest_asyncio

from tests.gateway_process import NO_LIMITS, GatewayProcess, start_gateway_process
from tests.helpers import raw_exchange, scrape_value, stream, text_of, ws_frames
from tests.redis_server import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

ERROR_CODES = {"invalid_request", "model_not_found", "rate_limited"}
#: `sim-1` streams at the default 50 tokens/s, long enough to run through a storm.
MODELS = [
    {"name": "sim-1", "provider": "simulated", "first_token_ms": 20},
    {"name": "sim-fast", "provider": "simulated", "first_token_ms": 20, "tokens_per_second": 200},
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayProcess]:
    config = {
        "server": {"port": free_port(), "idle_timeout_s": 1, "body_timeout_s": 1},
        "models": MODELS,
        "rate_limit": {"default": NO_LIMITS},
        "logging": {"level": "warning"},
    }
    gateway = await start_gateway_process(config, tmp_path_factory.mktemp("hostile"))
    yield gateway
    await gateway.stop()
    assert "Traceback" not in gateway.log_text(), gateway.log_text()[-3000:]


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> float:
    """Seconds until the server closed the connection (EOF or reset)."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
    return time.monotonic() - started


# -- slow clients ----------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed(gateway: GatewayProcess) -> None:
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    took = await closed_within(reader, 5)
    writer.close()
    assert 0.8 < took < 3


async def test_slowloris_headers_are_cut_at_the_idle_timeout(gateway: GatewayProcess) -> None:
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = time.monotonic()

    async def trickle() -> None:
        try:
            while True:
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass

    dripping = asyncio.ensure_future(trickle())
    await closed_within(reader, 5)
    dripping.cancel()
    writer.close()
    assert time.monotonic() - started < 3


async def test_a_body_that_trickles_gets_408(gateway: GatewayProcess) -> None:
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(
        b"POST /v1/stream/chunked HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"prompt": "'
    )
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head


# -- many connections dropped at random points -----------------------------------


REQUEST = (
    b"POST /v1/stream/chunked HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 54\r\n\r\n{"model":"sim-fast","prompt":"drop me","max_tokens":50}'
)


async def drop_at_random(gateway: GatewayProcess, rng: random.Random) -> None:
    """Send a random prefix of a valid request (sometimes all of it and read a bit), then go."""
    try:
        reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    except OSError:
        return
    try:
        writer.write(REQUEST[: rng.randint(0, len(REQUEST))])
        await writer.drain()
        if rng.random() < 0.3:
            async with asyncio.timeout(0.05):
                await reader.read(rng.randint(1, 4096))
    except (OSError, TimeoutError):
        pass
    finally:
        if rng.random() < 0.5:  # half of them reset instead of closing
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()


async def healthy_stream(session: aiohttp.ClientSession, gateway: GatewayProcess, seed: int) -> str:
    body = {"model": "sim-1", "prompt": "healthy", "max_tokens": 40, "seed": seed}
    events = (await stream(gateway, "chunked", body, session=session)).events
    assert events[-1]["type"] == "done", events[-1]
    return text_of(events)


async def test_ten_thousand_dropped_connections_leave_healthy_streams_exact(
    gateway: GatewayProcess,
) -> None:
    # force_close: with a 1 s idle timeout, a pooled keep-alive connection
    # could be closed by the server just as it is reused.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        expected = await asyncio.gather(*(healthy_stream(session, gateway, s) for s in range(100)))
        fds_before = gateway.open_fds()
        rng = random.Random(7)
        slots = asyncio.Semaphore(300)

        async def one() -> None:
            async with slots:
                await drop_at_random(gateway, rng)

        storm = asyncio.gather(*(one() for _ in range(10_000)))
        # 40 tokens at 50/s: the healthy streams run through the whole storm.
        healthy = asyncio.gather(*(healthy_stream(session, gateway, s) for s in range(100)))
        got = await healthy
        await storm
        assert got == expected
        async with asyncio.timeout(10):
            while True:  # dropped streams end within the resume grace (10 s) at most
                async with session.get(f"{gateway.url}/metrics") as response:
                    scrape = await response.text()
                if scrape_value(scrape, "gateway_streams_active") == 0:
                    break
                await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    assert gateway.open_fds() <= fds_before + 5


# -- WebSocket abuse ---------------------------------------------------------------


async def test_a_websocket_flood_is_closed_with_1008_and_pings_are_no_flood(
    gateway: GatewayProcess,
) -> None:
    """3,000 junk messages at once: the burst (`streams.ws_message_burst`, 200) gets
    its error frames, then the socket is closed with 1008. 3,000 pings are answered
    by the protocol and leave the socket working."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{gateway.url}/v1/stream/ws") as ws:
            for index in range(3000):
                await ws.send_str("not json" if index % 2 else '{"type": 5}')
            errors = 0
            while (message := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
                frame = orjson.loads(message.data)
                assert frame["type"] == "error" and frame["code"] == "invalid_request"
                errors += 1
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1008
            assert 150 <= errors <= 260, errors
        async with session.ws_connect(f"{gateway.url}/v1/stream/ws", autoping=True) as ws:
            for _ in range(3000):
                await ws.ping()
            body = {"model": "sim-fast", "prompt": "after", "max_tokens": 5, "seed": 1}
            await ws.send_json({"type": "generate", "request_id": "ok", **body})
            assert (await ws_frames(ws, "ok"))[-1]["type"] == "done"


@pytest.mark.parametrize(
    ("payload", "kind", "close_code"),
    [
        (b"x" * (1024 * 1024 + 1), aiohttp.WSMsgType.TEXT, 1009),  # > server.max_body_bytes
        (b'{"type": "generate", "prompt": "\xff\xfe"}', aiohttp.WSMsgType.TEXT, 1007),
    ],
    ids=["oversized", "invalid-utf8"],
)
async def test_websocket_frames_it_cannot_accept_close_the_socket(
    gateway: GatewayProcess, payload: bytes, kind: aiohttp.WSMsgType, close_code: int
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{gateway.url}/v1/stream/ws") as ws:
            try:
                await ws.send_frame(payload, kind)
            except ConnectionError:
                # The server refused the frame from its header and closed
                # while the client was still writing its megabyte.
                assert close_code == 1009
            message = await ws.receive(timeout=5)
            if message.type == aiohttp.WSMsgType.CLOSE:
                assert message.data == close_code
            else:  # the close frame was lost with the connection
                assert close_code == 1009 and message.type in {
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                }, message


def client_frame(opcode: int, payload: bytes, fin: bool) -> bytes:
    """A masked frame as a browser sends it (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_fragmented_message_is_reassembled(gateway: GatewayProcess) -> None:
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET /v1/stream/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    message = orjson.dumps(
        {
            "type": "generate",
            "request_id": "frag",
            "model": "sim-fast",
            "prompt": "p",
            "max_tokens": 3,
        }
    )
    parts = [message[:7], message[7:30], message[30:]]
    writer.write(client_frame(0x1, parts[0], fin=False))
    writer.write(client_frame(0x0, parts[1], fin=False))
    writer.write(client_frame(0x9, b"ping between fragments", fin=True))  # allowed by §5.4
    writer.write(client_frame(0x0, parts[2], fin=True))
    await writer.drain()
    received = b""
    async with asyncio.timeout(5):
        while b'"type":"done"' not in received:
            chunk = await reader.read(65536)
            assert chunk, received
            received += chunk
    writer.close()
    assert b'"request_id":"frag"' in received and b'"type":"token"' in received


# -- junk bodies, request ids, paths ------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 400),
        (b'{"prompt": "' + b"x" * (1024 * 1024) + b'"}', 413),
        (b'{"prompt": "hi", "max_tokens": "many"}', 400),
        (b'{"prompt": "hi", "max_tokens": 1e400}', 400),
        (b'{"messages": 5}', 400),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400),
        (b'{"prompt": null}', 400),
        (b'{"prompt": "hi", "temperature": NaN}', 400),
        (b'{"prompt": "hi", "stop": [' + b'"s",' * 1000 + b'"s"]}', 400),
        (b"\xff\xfe\x00garbage", 400),
        (b"", 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}', 404),
    ],
    ids=[
        "deeply-nested",
        "too-large",
        "wrong-type",
        "huge-number",
        "messages-not-a-list",
        "bad-role",
        "null-prompt",
        "nan",
        "too-many-stops",
        "not-utf8",
        "empty",
        "unknown-model",
    ],
)
async def test_junk_bodies_get_the_contract_error(
    gateway: GatewayProcess, body: bytes, status: int
) -> None:
    async with aiohttp.ClientSession() as session:
        for route in ("/v1/stream/chunked", "/v1/stream/sse", "/v1/chat/completions"):
            headers = {"Content-Type": "application/json"}
            data = io.BytesIO(body)  # aiohttp warns about large raw bytes bodies
            async with session.post(gateway.url + route, data=data, headers=headers) as response:
                assert response.status == status, (route, await response.text())
                error = (await response.json())["error"]
                assert error["code"] in ERROR_CODES and error["message"]


@pytest.mark.parametrize("size", [9_000, 60_000])
async def test_a_too_long_url_gets_a_json_414(gateway: GatewayProcess, size: int) -> None:
    """A chat history in a GET query: the contract's error, not aiohttp's plain-text 400."""
    url = gateway.url + "/v1/stream/sse?prompt=" + "a" * size
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 414, await response.text()
            error = (await response.json())["error"]
    assert error["code"] == "invalid_request" and "JSON body" in error["message"]


@pytest.mark.parametrize(
    "request_id",
    ["<script>alert(1)</script>", "a" * 129, "id with spaces", "naïve", "a;b=c", ""],
)
async def test_unsafe_request_ids_are_replaced(gateway: GatewayProcess, request_id: str) -> None:
    async with aiohttp.ClientSession() as session:
        headers = {"X-Request-ID": request_id}
        async with session.get(f"{gateway.url}/healthz", headers=headers) as response:
            echoed = response.headers["X-Request-ID"]
    assert echoed != request_id
    assert 0 < len(echoed) <= 128 and echoed.replace("-", "").isalnum()


async def test_a_bare_cr_in_a_header_is_refused(gateway: GatewayProcess) -> None:
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: a\rSet-Cookie: x=1\r\n\r\n"
    )
    response = await raw_exchange(gateway.host, gateway.port, request, timeout=5)
    head = response.split(b"\r\n\r\n", 1)[0]
    assert head.split(b" ", 2)[1] == b"400" and b"Set-Cookie" not in head
    # One info line, not an error with a traceback any client could repeat.
    await asyncio.sleep(0.2)
    lines = [line for line in gateway.log_text().splitlines() if "Missing expected LF" in line]
    assert lines and all('"level":"info"' in line for line in lines), lines


@pytest.mark.parametrize(
    "path",
    [
        "/static/../config.yaml",
        "/static/%2e%2e/config.yaml",
        "/static/..%2fconfig.yaml",
        "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/static/....//config.yaml",
        "/static//etc/passwd",
        "/static/%00",
    ],
)
async def test_static_files_do_not_leave_their_folder(gateway: GatewayProcess, path: str) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    response = await raw_exchange(gateway.host, gateway.port, request.encode(), timeout=5)
    status = int(response.split(b" ", 2)[1])
    assert status in {400, 403, 404}, response[:200]
    assert b"models:" not in response and b"root:" not in response and b"[project]" not in response
