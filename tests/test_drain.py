"""Graceful drain: the real `python -m gateway` process, real signals, real clients.

On SIGTERM `/readyz` answers 503 at once and new streams 503 with
`Retry-After`; running streams get `server.shutdown_grace_s` to finish, the
rest end with a retryable `shutting_down` error on their own transport
(WebSockets then close with 1012); the process exits 0 within the grace plus
a second. A second signal cuts the grace short.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest

from tests.gateway_process import start_process
from tests.helpers import assert_well_formed, fetch, read_ndjson, read_sse, text_of, ws_refusal
from tests.redis_server import free_port

StartProcess = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def start() -> AsyncIterator[StartProcess]:
    """`start_process`, and a kill of any gateway a failed test left running."""
    started: list[asyncio.subprocess.Process] = []

    async def start_tracked(port: int, **overrides: str) -> asyncio.subprocess.Process:
        started.append(await start_process(port, **overrides))
        return started[-1]

    yield start_tracked
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.communicate()


LONG = {"prompt": "Explain vector databases.", "max_tokens": 400, "seed": 3}


async def exit_status(process: asyncio.subprocess.Process, within_s: float) -> tuple[int, float]:
    """The exit status, and how long it took from now."""
    started = time.monotonic()
    async with asyncio.timeout(within_s):
        await process.communicate()
    assert process.returncode is not None
    return process.returncode, time.monotonic() - started


async def test_running_streams_finish_within_the_grace_and_new_ones_are_refused(
    start: StartProcess,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = await start(port, GATEWAY__SERVER__SHUTDOWN_GRACE_S="10")
    body = {"prompt": "Explain vector databases.", "max_tokens": 40, "seed": 3}  # ~0.8 s
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/stream/chunked", json=body) as stream:
            first = await stream.content.readline()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            ready, headers, _ = await fetch(base, "GET", "/readyz")
            assert ready == 503 and headers.get("Retry-After") == "1"
            assert (await fetch(base, "GET", "/healthz"))[0] == 200
            refused, headers, raw = await fetch(base, "POST", "/v1/stream/chunked", body=body)
            assert refused == 503 and headers.get("Retry-After") == "1"
            assert orjson.loads(raw)["error"]["code"] == "shutting_down"
            assert await ws_refusal(base) == 503
            events = [orjson.loads(first), *await read_ndjson(stream)]
    # The running stream was not cut: it ended on its own, complete.
    assert_well_formed(events)
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "length"
    code, took = await exit_status(process, 5)
    assert code == 0 and took < 2


async def test_the_grace_ends_every_transport_with_a_retryable_error(start: StartProcess) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    grace = 1.0
    process = await start(port, GATEWAY__SERVER__SHUTDOWN_GRACE_S=str(grace))
    async with aiohttp.ClientSession() as session:
        chunked = await session.post(f"{base}/v1/stream/chunked", json=LONG)
        sse = await session.post(f"{base}/v1/stream/sse", json=LONG)
        ws = await session.ws_connect(f"{base}/v1/stream/ws")
        await ws.send_json({"type": "generate", "request_id": "r1", **LONG})
        await chunked.content.readline()
        await sse.content.readuntil(b"\n\n")
        assert (await ws.receive_json(timeout=5))["type"] == "start"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # All three read at once, as three real clients would: a WebSocket
        # client that does not read cannot answer the close handshake in time.
        chunked_read = asyncio.ensure_future(read_ndjson(chunked))
        sse_read = asyncio.ensure_future(read_sse(sse))
        ws_events = []
        while (message := await ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT:
            ws_events.append(orjson.loads(message.data))
        ended = time.monotonic() - signalled
        chunked_events = await chunked_read
        sse_events, parser = await sse_read
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        assert message.data == 1012
        await ws.close()
        chunked.release()
        sse.release()
    for events in (chunked_events, sse_events, ws_events):
        assert events[-1]["type"] == "error", events[-1]
        assert events[-1]["code"] == "shutting_down" and events[-1]["retryable"] is True
        assert text_of(events)  # tokens went out during the grace
    # The SSE error carries no id: the browser's Last-Event-ID stays on the last token.
    assert parser.last_event_id.endswith(f":{sse_events[-2]['seq']}")
    assert grace - 0.2 < ended < grace + 1
    code, took = await exit_status(process, 5)
    assert code == 0 and ended + took < grace + 1.5


async def test_a_second_signal_stops_at_once(start: StartProcess) -> None:
    port = free_port()
    process = await start(port, GATEWAY__SERVER__SHUTDOWN_GRACE_S="30")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/stream/chunked", json=LONG) as r:
            await r.content.readline()
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGINT)
            events = await read_ndjson(r)
    assert events[-1]["code"] == "shutting_down"
    code, _ = await exit_status(process, 5)
    assert code == 0
    assert time.monotonic() - signalled < 2.5
