"""A WebSocket `resume` of another replica's generation is a stream of this replica.

Issue 16 item 2: HTTP followers (SSE resume, generation events) counted toward
the principal's `concurrent_streams` and `server.max_streams`; a WebSocket
`resume` did not, so one socket could hold any number of Redis reads. Two
real gateway apps and one real redis-server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartGateway
from tests.redis_server import RedisProcess

PACED = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 100, "first_token_ms": 0}
BODY = {"prompt": "Explain vector databases.", "max_tokens": 300, "on_disconnect": "finish"}


async def next_frame(ws: aiohttp.ClientWebSocketResponse, request_id: str) -> dict[str, Any]:
    """The next frame of `request_id` (frames of the other streams are skipped)."""
    async with asyncio.timeout(5):
        while True:
            frame: dict[str, Any] = await ws.receive_json()
            if frame.get("request_id") == request_id:
                return frame


@pytest.mark.parametrize("limit", ["concurrent_streams", "max_streams"])
async def test_websocket_resumes_count_as_streams_of_their_replica(
    start_gateway: StartGateway, redis_server: RedisProcess, limit: str
) -> None:
    shared: dict[str, Any] = {
        "models": [PACED],
        "streams": {"backend": "redis", "resume_grace_s": 10},
        "redis": {"url": redis_server.url},
    }
    owner = await start_gateway(**shared)
    sections = dict(shared)
    if limit == "concurrent_streams":
        two = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent_streams": 2}
        sections["rate_limit"] = {"default": two}
    else:
        sections["server"] = {"max_streams": 2}
    follower = await start_gateway(**sections)
    async with aiohttp.ClientSession() as session:
        async with session.post(owner.make_url("/v1/generations"), json=BODY) as created:
            generation_id = (await created.json())["id"]
        url = follower.make_url("/v1/stream/ws")

        async def resume(ws: aiohttp.ClientWebSocketResponse, request_id: str) -> dict[str, Any]:
            message = {"type": "resume", "request_id": request_id}
            await ws.send_json({**message, "generation_id": generation_id})
            return await next_frame(ws, request_id)

        async with session.ws_connect(url) as ws:
            assert (await resume(ws, "r1"))["type"] == "start"
            assert (await resume(ws, "r2"))["type"] == "start"
            refused = await resume(ws, "r3")
            assert refused["type"] == "error", refused
            assert refused["code"] == "rate_limited", refused
            assert limit in refused["message"] or "maximum" in refused["message"], refused
        # The socket is gone: its followers' places are free again (no lease leaks).
        async with session.ws_connect(url) as ws:
            async with asyncio.timeout(5):
                while (await resume(ws, "again"))["type"] != "start":
                    await asyncio.sleep(0.05)
            assert (await resume(ws, "r2"))["type"] == "start"
