"""Rate limits per principal, on the memory backend and on a real shared redis-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.config import Limits
from gateway.keys import limiter_key
from gateway.ratelimit import RedisBackend
from tests.conftest import TEST_API_KEY, TEST_KEY_CONFIG, StartGateway
from tests.helpers import read_ndjson
from tests.redis_server import RedisProcess

SLOW = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 20, "first_token_ms": 0}
FAST = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 5000, "first_token_ms": 0}
HOLD = {"prompt": "hold the line", "max_tokens": 2000}
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


def limits(rpm: int = 0, tpm: int = 0, streams: int = 0) -> dict[str, int]:
    return {"requests_per_minute": rpm, "tokens_per_minute": tpm, "concurrent_streams": streams}


def keyed(**limit: int) -> dict[str, Any]:
    """Auth with the suite's test key carrying `limit`."""
    return {"anonymous": True, "api_keys": [{**TEST_KEY_CONFIG, "limits": limits(**limit)}]}


@contextlib.asynccontextmanager
async def open_streams(
    session: aiohttp.ClientSession, urls: list[str], body: dict[str, Any], headers: dict[str, str]
) -> AsyncIterator[list[aiohttp.ClientResponse]]:
    """Open every stream at once; yield the responses (headers read, bodies pending)."""
    responses = await asyncio.gather(*(session.post(u, json=body, headers=headers) for u in urls))
    try:
        yield list(responses)
    finally:
        for response in responses:
            response.close()


def url(server: TestServer, path: str = "/v1/stream/chunked") -> str:
    return str(server.make_url(path))


async def wait_until(predicate: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


# -- memory backend ----------------------------------------------------------


async def test_concurrent_streams_are_capped_and_freed_on_disconnect(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(
        models=[SLOW], auth=keyed(streams=2), streams={"resume_grace_s": 0}
    )
    async with aiohttp.ClientSession() as session:
        async with open_streams(session, [url(server)] * 2, HOLD, AUTH) as held:
            assert [r.status for r in held] == [200, 200]
            async with session.post(url(server), json=HOLD, headers=AUTH) as refused:
                assert refused.status == 429
                body = await refused.json()
                assert body["error"]["code"] == "rate_limited"
                assert "concurrent_streams" in body["error"]["message"]
                assert refused.headers["RateLimit-Limit"] == "2"
                assert refused.headers["RateLimit-Remaining"] == "0"
                assert int(refused.headers["Retry-After"]) >= 1
                assert int(refused.headers["RateLimit-Reset"]) >= 1
            held[0].close()  # the client goes away: grace 0 cancels, the slot is freed

            async def admitted() -> bool:
                async with session.post(url(server), json=HOLD, headers=AUTH) as again:
                    return again.status == 200

            await wait_until(admitted)
    await wait_until(lambda: _async(server.app[limiter_key].held == 0))


async def _async(value: bool) -> bool:
    return value


@pytest.mark.parametrize(
    "model, request_body, ends_with",
    [
        (FAST, {"prompt": "x", "max_tokens": 5}, "done"),
        ({**FAST, "fail_after_tokens": 2}, {"prompt": "x", "max_tokens": 5}, "error"),
    ],
)
async def test_a_stream_slot_is_released_however_the_stream_ends(
    start_gateway: StartGateway, model: dict[str, Any], request_body: dict[str, Any], ends_with: str
) -> None:
    server = await start_gateway(models=[model], auth=keyed(streams=1))
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # one slot, used three times in a row
            async with session.post(url(server), json=request_body, headers=AUTH) as response:
                assert response.status == 200
                events = await read_ndjson(response)
                assert events[-1]["type"] == ends_with
            await wait_until(lambda: _async(server.app[limiter_key].held == 0))


async def test_delete_frees_the_slot(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=[SLOW], auth=keyed(streams=1))
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, "/v1/generations"), json=HOLD, headers=AUTH) as created:
            assert created.status == 201
            generation_id = (await created.json())["id"]
        async with session.post(url(server, "/v1/generations"), json=HOLD, headers=AUTH) as r:
            assert r.status == 429
        async with session.delete(
            url(server, f"/v1/generations/{generation_id}"), headers=AUTH
        ) as deleted:
            assert deleted.status == 204
        await wait_until(lambda: _async(server.app[limiter_key].held == 0))
        async with session.post(url(server, "/v1/generations"), json=HOLD, headers=AUTH) as r:
            assert r.status == 201


async def test_requests_per_minute_token_bucket(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=[FAST], auth=keyed(rpm=3))
    body = {"prompt": "x", "max_tokens": 1}
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(5):
            async with session.post(url(server), json=body, headers=AUTH) as response:
                statuses.append(response.status)
                if response.status == 429:
                    retry_after = int(response.headers["Retry-After"])
                    assert response.headers["RateLimit-Limit"] == "3"
        assert statuses == [200, 200, 200, 429, 429]
        assert 15 <= retry_after <= 21  # one request back every 20 s at 3/min


async def test_tokens_are_reserved_then_refunded_when_a_stream_is_cancelled(
    start_gateway: StartGateway,
) -> None:
    # 1000 tokens/min; each request reserves its prompt (1 token) + 400.
    server = await start_gateway(models=[SLOW], auth=keyed(tpm=1000))
    body = {"prompt": "x", "max_tokens": 400}
    async with aiohttp.ClientSession() as session:
        first = await session.post(url(server, "/v1/generations"), json=body, headers=AUTH)
        second = await session.post(url(server, "/v1/generations"), json=body, headers=AUTH)
        assert (first.status, second.status) == (201, 201)
        async with session.post(url(server), json=body, headers=AUTH) as third:
            assert third.status == 429
            assert "tokens_per_minute" in (await third.json())["error"]["message"]
            assert int(third.headers["RateLimit-Remaining"]) < 401
        # Cancel one almost at once: it is charged only the few tokens it used.
        generation_id = (await first.json())["id"]
        async with session.delete(
            url(server, f"/v1/generations/{generation_id}"), headers=AUTH
        ) as deleted:
            assert deleted.status == 204
        await wait_until(lambda: _async(server.app[limiter_key].held == 1))
        async with session.post(url(server), json=body, headers=AUTH) as fourth:
            assert fourth.status == 200
        first.close()
        second.close()


async def test_websocket_refusal_is_an_error_frame_and_the_socket_stays_open(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(models=[SLOW], auth=keyed(streams=1))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url(server, "/v1/stream/ws"), headers=AUTH) as ws:
            await ws.send_json({"type": "generate", "request_id": "a", **HOLD})
            await ws.send_json({"type": "generate", "request_id": "b", **HOLD})
            refused = None
            while refused is None:
                frame = orjson.loads((await ws.receive()).data)
                if frame["request_id"] == "b":
                    refused = frame
            assert refused["type"] == "error"
            assert refused["code"] == "rate_limited"
            assert refused["retryable"] is True
            await ws.send_json({"type": "cancel", "request_id": "a"})
            await wait_until(lambda: _async(server.app[limiter_key].held == 0))
            await ws.send_json(
                {"type": "generate", "request_id": "c", "prompt": "x", "max_tokens": 2}
            )
            seen = []
            while not seen or seen[-1]["type"] not in {"done", "error"}:
                frame = orjson.loads((await ws.receive()).data)
                if frame["request_id"] == "c":
                    seen.append(frame)
            assert seen[-1]["type"] == "done"


@pytest.mark.parametrize("trusted", [True, False])
async def test_anonymous_budgets_are_per_client_ip(
    start_gateway: StartGateway, trusted: bool
) -> None:
    server = await start_gateway(
        models=[SLOW],
        rate_limit={"default": limits(streams=1)},
        server={"trusted_proxies": ["127.0.0.0/8"] if trusted else []},
    )
    async with aiohttp.ClientSession() as session:
        first = await session.post(url(server), json=HOLD, headers={"X-Forwarded-For": "10.0.0.1"})
        again = await session.post(url(server), json=HOLD, headers={"X-Forwarded-For": "10.0.0.1"})
        other = await session.post(url(server), json=HOLD, headers={"X-Forwarded-For": "10.0.0.2"})
        statuses = [first.status, again.status, other.status]
        for response in (first, again, other):
            response.close()
    # Behind a trusted proxy each client has its own budget; otherwise the
    # header is ignored and all three are the same client (127.0.0.1).
    assert statuses == ([200, 429, 200] if trusted else [200, 429, 429])


# -- redis backend -----------------------------------------------------------


def redis_settings(redis: RedisProcess, fail_open: bool = True, **limit: int) -> dict[str, Any]:
    return {
        "models": [SLOW],
        "auth": keyed(**limit),
        "rate_limit": {"backend": "redis", "fail_open": fail_open, "default": limits()},
        "redis": {"url": redis.url},
        "streams": {"resume_grace_s": 0},
    }


async def test_two_replicas_share_one_concurrency_limit(
    start_gateway: StartGateway, redis_server: RedisProcess
) -> None:
    replicas = [await start_gateway(**redis_settings(redis_server, streams=3)) for _ in range(2)]
    urls = [url(replicas[i % 2]) for i in range(10)]
    async with aiohttp.ClientSession() as session:
        async with open_streams(session, urls, HOLD, AUTH) as responses:
            statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 3 + [429] * 7


async def test_two_replicas_share_one_requests_per_minute_budget(
    start_gateway: StartGateway, redis_server: RedisProcess
) -> None:
    replicas = [await start_gateway(**redis_settings(redis_server, rpm=5)) for _ in range(2)]
    body = {"prompt": "x", "max_tokens": 1}
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> int:
            async with session.post(url(replicas[i % 2]), json=body, headers=AUTH) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(12)))
    assert sorted(statuses) == [200] * 5 + [429] * 7


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_outage_follows_fail_open_and_recovers(
    start_gateway: StartGateway, redis_server: RedisProcess, fail_open: bool
) -> None:
    server = await start_gateway(**redis_settings(redis_server, fail_open=fail_open, streams=1))
    limiter = server.app[limiter_key]
    async with aiohttp.ClientSession() as session:
        held = await session.post(url(server), json=HOLD, headers=AUTH)
        assert held.status == 200
        redis_server.kill()
        async with session.post(url(server), json=HOLD, headers=AUTH) as during:
            if fail_open:
                # This replica's memory decides now: it knows nothing of the stream
                # Redis held, so one is admitted, but never more than the limit.
                assert during.status == 200
                assert limiter.degraded
                async with session.post(url(server), json=HOLD, headers=AUTH) as beyond:
                    assert beyond.status == 429
                    assert (await beyond.json())["error"]["code"] == "rate_limited"
                scrape = await (await session.get(server.make_url("/metrics"))).text()
                assert "gateway_rate_limit_degraded 1.0" in scrape
            else:
                assert during.status == 503
                assert (await during.json())["error"]["code"] == "rate_limited"
                assert during.headers["Retry-After"] == "1"
        assert limiter.backend_errors >= 1
        held.close()
        redis_server.start()  # same port, empty data: the held lease is gone with it

        async def enforced_again() -> bool:
            first = await session.post(url(server), json=HOLD, headers=AUTH)
            second = await session.post(url(server), json=HOLD, headers=AUTH)
            statuses = (first.status, second.status)
            first.close()
            second.close()
            return statuses == (200, 429) and not limiter.degraded  # by Redis again

        await wait_until(enforced_again, timeout=6)


async def test_a_crashed_replicas_leases_expire(redis_server: RedisProcess) -> None:
    one_stream = Limits(requests_per_minute=0, tokens_per_minute=0, concurrent_streams=1)
    crashed = RedisBackend(redis_server.url, lease_ttl_s=0.3)
    survivor = RedisBackend(redis_server.url, lease_ttl_s=0.3)
    try:
        assert await crashed.acquire("key:t", one_stream, 0, "lease-1") is None
        refusal = await survivor.acquire("key:t", one_stream, 0, "lease-2")
        assert refusal is not None and refusal.limit == "concurrent_streams"
        await asyncio.sleep(0.45)  # nobody refreshes lease-1
        assert await survivor.acquire("key:t", one_stream, 0, "lease-2") is None
    finally:
        await crashed.aclose()
        await survivor.aclose()


async def test_scripts_reload_after_script_flush(redis_server: RedisProcess) -> None:
    import redis.asyncio as redis

    backend = RedisBackend(redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    try:
        rpm = Limits(requests_per_minute=2, tokens_per_minute=0, concurrent_streams=0)
        assert await backend.acquire("key:f", rpm, 0, "a") is None
        await client.script_flush()
        assert await backend.acquire("key:f", rpm, 0, "b") is None
        refusal = await backend.acquire("key:f", rpm, 0, "c")
        assert refusal is not None and refusal.limit == "requests_per_minute"
    finally:
        await backend.aclose()
        await client.aclose()
