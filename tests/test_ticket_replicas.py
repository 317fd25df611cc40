"""A single-use ticket opens one stream across all replicas, not one on each.

Issue 16 item 5: spent ticket ids were kept in each replica's memory, so with
N replicas behind a load balancer a leaked single-use ticket opened N streams.
With Redis in use they are shared (`SET … NX EXAT`); two real gateway apps and
one real redis-server here.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import redis.asyncio as redis
from aiohttp.test_utils import TestServer

from tests.conftest import TEST_API_KEY, TEST_KEY_CONFIG, UNLIMITED, StartGateway
from tests.redis_server import RedisProcess

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
MODEL = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 1000, "first_token_ms": 0}


async def single_use_replicas(
    start_gateway: StartGateway, redis_server: RedisProcess, backend: str
) -> list[TestServer]:
    auth: dict[str, Any] = {
        "anonymous": False,
        "api_keys": [{**TEST_KEY_CONFIG, "limits": UNLIMITED}],
        "ticket_secret": "one-secret-shared-by-every-replica-of-it",
        "tickets_single_use": True,
    }
    sections: dict[str, Any] = {"auth": auth, "models": [MODEL], "redis": {"url": redis_server.url}}
    if backend == "streams":
        sections["streams"] = {"backend": "redis"}
    else:
        sections["rate_limit"] = {"backend": "redis", "default": UNLIMITED}
    return [await start_gateway(**sections) for _ in range(2)]


async def mint(session: aiohttp.ClientSession, server: TestServer) -> dict[str, Any]:
    async with session.post(server.make_url("/v1/tickets"), headers=AUTH) as response:
        assert response.status in (200, 201), await response.text()
        ticket: dict[str, Any] = await response.json()
        return ticket


async def open_sse(session: aiohttp.ClientSession, server: TestServer, ticket: str) -> int:
    url = server.make_url("/v1/stream/sse")
    query = {"prompt": "hi", "max_tokens": "3", "access_token": ticket}
    async with session.get(url, params=query) as response:
        body = await response.text()
        if response.status == 401:
            assert "already used" in body, body
        return response.status


async def check_one_stream_per_ticket(
    start_gateway: StartGateway, redis_server: RedisProcess, backend: str
) -> None:
    a, b = await single_use_replicas(start_gateway, redis_server, backend)
    client = redis.Redis.from_url(redis_server.url)
    try:
        async with aiohttp.ClientSession() as session:
            for first, second in ((a, b), (b, a)):
                minted = await mint(session, first)
                assert await open_sse(session, first, minted["ticket"]) == 200
                assert await open_sse(session, second, minted["ticket"]) == 401
                assert await open_sse(session, first, minted["ticket"]) == 401
            # Kept in Redis no longer than the ticket could be used (plus a margin).
            keys = [key async for key in client.scan_iter("gateway:ticket-used:*")]
            assert len(keys) == 2
            for key in keys:
                expires_at = await client.expiretime(key)
                assert time.time() < expires_at <= minted["expires_at"] + 6, (key, minted)
    finally:
        await client.aclose()


async def test_a_single_use_ticket_opens_one_stream_across_replicas_sharing_streams(
    start_gateway: StartGateway, redis_server: RedisProcess
) -> None:
    await check_one_stream_per_ticket(start_gateway, redis_server, "streams")


async def test_a_single_use_ticket_opens_one_stream_across_replicas_sharing_limits(
    start_gateway: StartGateway, redis_server: RedisProcess
) -> None:
    await check_one_stream_per_ticket(start_gateway, redis_server, "rate_limit")
