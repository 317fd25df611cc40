"""Upstream faults against a real `gateway serve` process, on every transport.

A chaos upstream (a real HTTP server in the test's loop) injects one fault per
upstream model name; the gateway process has one model per fault. Every fault
must end in the right terminal event (or, on the OpenAI route before its first
byte, the right HTTP error), never a hang, a silent clean end or a crash, and
the metrics must count it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from tests.gateway_process import NO_LIMITS, GatewayProcess, start_gateway_process
from tests.helpers import Events, read_sse_frames, scrape_value, stream, text_of
from tests.redis_server import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKENS = ["Alpha ", "beta ", "gamma ", "delta ", "epsilon"]
HUGE = "x" * (1 << 20)


def _frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-chaos",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "chaos",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class ChaosUpstream:
    """`model` in the request body picks the fault."""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        fault = (await request.json())["model"]
        if fault.startswith("status-"):
            status = int(fault.removeprefix("status-"))
            error = {"error": {"message": f"injected {status}", "type": "server_error"}}
            return web.json_response(error, status=status, headers={"Retry-After": "1"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_frame({"role": "assistant", "content": ""}))
        if fault == "huge-delta":
            await response.write(_frame({"content": HUGE}))
            await response.write(_frame({}, "stop") + b"data: [DONE]\n\n")
            return response
        if fault == "endless-line":
            # A line that never ends: a gateway that buffers it waits, then
            # times out with ~100 MiB held; one that caps lines fails at once.
            await response.write(b"data: ")
            for _ in range(200):
                await response.write(b"y" * (512 * 1024))
            await asyncio.sleep(3600)
        if fault == "garbage":
            await response.write(b"garbage\n\n: comment\n\nevent: what\n\nretry: x\n\n")
            return response
        for index, token in enumerate(TOKENS):
            if index == 2:
                if fault == "drop-mid":
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if fault == "stall-mid":
                    await asyncio.sleep(3600)
                if fault == "bad-json":
                    await response.write(b"data: {not json\n\n")
                    return response
                if fault == "error-object":
                    await response.write(b'data: {"error": {"message": "CUDA out of memory"}}\n\n')
                    return response
            await response.write(_frame({"content": token}))
        if fault == "no-finish":
            await response.write(b"data: [DONE]\n\n")
        elif fault == "no-done":
            await response.write(_frame({}, "stop"))
        else:
            await response.write(_frame({}, "stop") + b"data: [DONE]\n\n")
        return response


@dataclass(frozen=True)
class Expected:
    terminal: str  # done | error
    code: str | None = None
    http_status: int | None = None  # the OpenAI route, when it fails before its first byte


FAULTS: dict[str, Expected] = {
    "refused": Expected("error", "upstream_error", 502),
    "status-500": Expected("error", "upstream_error", 502),
    "status-503": Expected("error", "upstream_error", 502),
    "status-429": Expected("error", "upstream_error", 429),
    "drop-mid": Expected("error", "upstream_error"),
    "stall-mid": Expected("error", "upstream_timeout"),
    "garbage": Expected("error", "upstream_error", 502),
    "bad-json": Expected("error", "upstream_error"),
    "error-object": Expected("error", "upstream_error"),
    "no-done": Expected("done"),
    "no-finish": Expected("error", "upstream_error"),
    "huge-delta": Expected("done"),
    "endless-line": Expected("error", "upstream_error", 502),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayProcess]:
    upstream = web.AppRunner(web.Application(), handler_cancellation=True)
    upstream.app.router.add_post("/v1/chat/completions", ChaosUpstream().chat)
    await upstream.setup()
    upstream_port, dead_port = free_port(), free_port()
    await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()
    models = [
        {
            "name": fault,
            "provider": "openai",
            "base_url": f"http://127.0.0.1:{dead_port if fault == 'refused' else upstream_port}/v1",
            "api_key": "chaos",
            "upstream_model": fault,
            "max_retries": 0,
            "timeout_s": 1.0,
        }
        for fault in FAULTS
    ]
    config = {
        "server": {"port": free_port()},
        "models": models,
        "rate_limit": {"default": NO_LIMITS},
        "streams": {"resume_grace_s": 0},
    }
    gateway = await start_gateway_process(config, tmp_path_factory.mktemp("chaos"))
    yield gateway
    await gateway.stop()
    await upstream.cleanup()


async def events_over(url: str, transport: str, model: str) -> tuple[int, Events]:
    """(HTTP status, events) of one stream; OpenAI chunks are mapped onto our event types."""
    if transport != "openai":
        body = {"model": model, "prompt": "chaos", "max_tokens": 50}
        streamed = await stream(url, transport, body)
        return streamed.status, streamed.events
    chat = {"model": model, "messages": [{"role": "user", "content": "chaos"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json=chat) as response:
            if response.status != 200:
                error = (await response.json())["error"]
                return response.status, [{"type": "error", "code": error["code"]}]
            frames = (await read_sse_frames(response)).events
    events: Events = []
    for data in (frame.data for frame in frames):
        if data == "[DONE]":
            events.append({"type": "done"})
        elif "error" in (chunk := orjson.loads(data)):
            events.append({"type": "error", "code": chunk["error"]["code"]})
        else:
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    events.append({"type": "token", "text": choice["delta"]["content"]})
    return 200, events


@pytest.mark.parametrize("transport", ["chunked", "sse", "ws", "openai"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_every_fault_ends_in_the_right_terminal_event(
    gateway: GatewayProcess, fault: str, transport: str
) -> None:
    expected = FAULTS[fault]
    async with asyncio.timeout(15):
        status, events = await events_over(gateway.url, transport, fault)
    terminal = events[-1]
    if transport == "openai" and expected.http_status is not None:
        assert status == expected.http_status, events
    else:
        assert status in {101, 200}
    assert terminal["type"] == expected.terminal, terminal
    if expected.code is not None:
        assert terminal["code"] == expected.code, terminal
    if fault in {"drop-mid", "stall-mid", "bad-json", "error-object"}:
        assert text_of(events) == "".join(TOKENS[:2])  # what came before the fault was kept
    if fault == "huge-delta":
        assert text_of(events) == HUGE
    if fault == "no-done":
        assert text_of(events) == "".join(TOKENS)


async def test_the_process_survived_and_counted_every_fault(gateway: GatewayProcess) -> None:
    """Runs after the parametrized cases (same module, same gateway)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.url}/metrics") as response:
            scrape = await response.text()
        async with session.get(f"{gateway.url}/readyz") as response:
            assert response.status == 200
    assert gateway.process.returncode is None
    assert scrape_value(scrape, "gateway_streams_active") == 0
    transports = 4
    failing = sum(1 for e in FAULTS.values() if e.terminal == "error")
    upstream_errors = scrape_value(scrape, "gateway_streams_total", outcome="upstream_error")
    timeouts = scrape_value(scrape, "gateway_streams_total", outcome="timeout")
    assert upstream_errors + timeouts == failing * transports
    assert scrape_value(scrape, "gateway_streams_total", outcome="completed") == 2 * transports
    for status in ("500", "503", "429", "connect_error", "timeout", "stream_error"):
        assert scrape_value(scrape, "gateway_upstream_requests_total", status=status) >= transports
    text = gateway.log_text()
    assert "Traceback" not in text and "Unhandled" not in text, text[-3000:]
