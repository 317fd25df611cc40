"""`streams.backend: redis`: two gateway apps and one real redis-server.

A generation starts on replica A; its client drops and comes back on B (as
behind a load balancer), by every transport's resume; the text must equal
an uninterrupted run. Cancels and the grace timer work across replicas;
Redis going away never touches streams served from memory.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestServer

from gateway import shared_log, shared_log_reader
from gateway.keys import registry_key, shared_log_key
from tests.conftest import TEST_API_KEY, StartGateway
from tests.helpers import bearer, ndjson_events, read_ndjson, read_sse, stream, text_of, ws_frames
from tests.redis_server import RedisProcess

PACED = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 100, "first_token_ms": 0}
BODY = {"prompt": "Explain vector databases.", "max_tokens": 60, "seed": 11}


async def replicas(
    start_gateway: StartGateway, redis: RedisProcess, count: int = 2, **streams: Any
) -> list[TestServer]:
    settings = {"backend": "redis", "resume_grace_s": 10, **streams}
    return [
        await start_gateway(models=[PACED], streams=settings, redis={"url": redis.url})
        for _ in range(count)
    ]


Pair = tuple[TestServer, TestServer]


@pytest.fixture
async def pair(start_gateway: StartGateway, redis_server: RedisProcess) -> Pair:
    """Replicas A and B on `redis_server`, with the module's defaults."""
    a, b = await replicas(start_gateway, redis_server)
    return a, b


async def reference_text(server: TestServer) -> str:
    return text_of((await stream(server, "chunked", BODY)).events)


async def start_and_drop(server: TestServer, tokens: int = 5) -> tuple[str, list[dict[str, Any]]]:
    """Start a generation on `server`, read `tokens` tokens, and hang up."""
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/chunked"), json=BODY) as response:
            events = []
            while len(events) < tokens + 1:
                events.append(orjson.loads(await response.content.readline()))
    return events[0]["generation_id"], events


async def test_resume_on_another_replica_by_every_transport(pair: Pair) -> None:
    a, b = pair
    expected = await reference_text(a)
    async with aiohttp.ClientSession() as session:
        # SSE: Last-Event-ID of the last event seen on A.
        generation_id, seen = await start_and_drop(a)
        headers = {"Last-Event-ID": f"{generation_id}:{seen[-1]['seq']}"}
        async with session.get(b.make_url("/v1/stream/sse"), headers=headers) as response:
            assert response.status == 200
            rest, _ = await read_sse(response)
        assert text_of(seen) + text_of(rest) == expected
        assert rest[0]["seq"] == seen[-1]["seq"] + 1 and rest[-1]["type"] == "done"
        # NDJSON: ?after= on the generation's events URL.
        generation_id, seen = await start_and_drop(a)
        url = b.make_url(f"/v1/generations/{generation_id}/events").with_query(
            after=str(seen[-1]["seq"])
        )
        async with session.get(url, headers={"Accept": "application/x-ndjson"}) as response:
            rest = await read_ndjson(response)
        assert text_of(seen) + text_of(rest) == expected
        # WebSocket: resume.
        generation_id, seen = await start_and_drop(a)
        async with session.ws_connect(b.make_url("/v1/stream/ws")) as ws:
            await ws.send_json(
                {
                    "type": "resume",
                    "request_id": "r",
                    "generation_id": generation_id,
                    "after_seq": seen[-1]["seq"],
                }
            )
            rest = await ws_frames(ws, "r", timeout=5)
        assert text_of(seen) + text_of(rest) == expected
        # A finished log is resumable on B too, and a resume past its end is 204.
        headers = {"Last-Event-ID": f"{generation_id}:0"}
        async with session.get(b.make_url("/v1/stream/sse"), headers=headers) as response:
            replay, _ = await read_sse(response)
        assert text_of(replay) == expected
        headers = {"Last-Event-ID": f"{generation_id}:{rest[-1]['seq']}"}
        async with session.get(b.make_url("/v1/stream/sse"), headers=headers) as response:
            assert response.status == 204


async def test_another_principal_gets_404_on_the_other_replica(pair: Pair) -> None:
    a, b = pair
    generation_id, _ = await start_and_drop(a)
    # key:test, not anonymous
    async with aiohttp.ClientSession(headers=bearer(TEST_API_KEY)) as session:
        url = b.make_url(f"/v1/generations/{generation_id}/events")
        async with session.get(url) as response:
            assert response.status == 404
        async with session.delete(b.make_url(f"/v1/generations/{generation_id}")) as response:
            assert response.status == 404


async def test_cancel_from_another_replica_stops_the_owner(pair: Pair) -> None:
    a, b = pair
    app_a = a.app
    assert app_a is not None
    async with aiohttp.ClientSession() as session:
        async with session.post(a.make_url("/v1/stream/chunked"), json=BODY) as response:
            start = orjson.loads(await response.content.readline())
            await response.content.readline()  # a token: it is running
            generation_id = start["generation_id"]
            began = asyncio.get_running_loop().time()
            async with session.delete(b.make_url(f"/v1/generations/{generation_id}")) as deleted:
                assert deleted.status == 204
            events = await read_ndjson(response)
            stopped = asyncio.get_running_loop().time() - began
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "cancelled"
    assert stopped < 1.0
    assert app_a[registry_key].running == 0


async def test_a_reader_on_another_replica_counts_as_attached(
    start_gateway: StartGateway, redis_server: RedisProcess
) -> None:
    slow = {"max_tokens": 80}  # 0.8 s at 100 tokens/s: longer than the grace
    a, b = await replicas(start_gateway, redis_server, resume_grace_s=0.3)
    async with aiohttp.ClientSession() as session:
        async with session.post(a.make_url("/v1/stream/chunked"), json={**BODY, **slow}) as r:
            start = orjson.loads(await r.content.readline())
        headers = {"Last-Event-ID": f"{start['generation_id']}:0"}
        async with session.get(b.make_url("/v1/stream/sse"), headers=headers) as response:
            rest, _ = await read_sse(response)
    # B read it to its end, well past A's grace: not cancelled.
    assert rest[-1]["type"] == "done" and rest[-1]["finish_reason"] == "length"
    # Nobody anywhere: the grace cancels it.
    async with aiohttp.ClientSession() as session:
        async with session.post(a.make_url("/v1/stream/chunked"), json={**BODY, **slow}) as r:
            start = orjson.loads(await r.content.readline())
        await asyncio.sleep(0.6)
        headers = {"Last-Event-ID": f"{start['generation_id']}:0"}
        async with session.get(b.make_url("/v1/stream/sse"), headers=headers) as response:
            rest, _ = await read_sse(response)
    assert rest[-1]["finish_reason"] == "cancelled"


async def test_redis_down_leaves_local_streams_alone_and_recovers(
    pair: Pair, redis_server: RedisProcess
) -> None:
    a, b = pair
    expected = await reference_text(a)
    async with aiohttp.ClientSession() as session:
        async with session.post(a.make_url("/v1/stream/chunked"), json=BODY) as response:
            first = orjson.loads(await response.content.readline())
            redis_server.kill()
            rest = await read_ndjson(response)
        # The live stream on its own replica went on untouched.
        assert text_of([first, *rest]) == expected
        headers = {"Last-Event-ID": f"{first['generation_id']}:0"}
        async with session.get(b.make_url("/v1/stream/sse"), headers=headers) as response:
            assert response.status == 503
            error = (await response.json())["error"]
            assert error["code"] == "internal_error"
        redis_server.start()
        # Recovery is automatic: a new generation is shared again.
        generation_id, seen = await start_and_drop(a)

        async def resumed() -> list[dict[str, Any]]:
            headers = {"Last-Event-ID": f"{generation_id}:{seen[-1]['seq']}"}
            async with session.get(b.make_url("/v1/stream/sse"), headers=headers) as response:
                assert response.status == 200
                events, _ = await read_sse(response)
                return events

        async with asyncio.timeout(5):
            while True:
                try:
                    rest = await resumed()
                    break
                except AssertionError:
                    await asyncio.sleep(0.2)
        assert text_of(seen) + text_of(rest) == expected


async def test_a_replica_that_dies_leaves_a_log_that_ends(
    start_gateway: StartGateway, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_log_reader, "READ_BLOCK_MS", 200)
    a, b = await replicas(start_gateway, redis_server, shared_log_lease_s=0.6, retention_s=1)
    app_a = a.app
    assert app_a is not None
    generation_id, seen = await start_and_drop(a, tokens=2)
    await asyncio.sleep(0.1)  # the first events reach Redis
    # A "dies": its shared log stops flushing and refreshing leases, its upstream keeps going.
    log_a = app_a[shared_log_key]
    for task in log_a._tasks:
        task.cancel()
    log_a.append = lambda generation_id, event: None  # type: ignore[method-assign]
    headers = {"Last-Event-ID": f"{generation_id}:{seen[-1]['seq']}"}
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(5):
            async with session.get(b.make_url("/v1/stream/sse"), headers=headers) as response:
                rest, _ = await read_sse(response)
    assert rest[-1]["type"] == "error" and rest[-1]["retryable"] is True
    # Every key of the dead owner's generation expires: the stream and its meta
    # after the retention, the rest with the lease (three leases at most).
    client = redis.Redis.from_url(redis_server.url)
    try:
        async with asyncio.timeout(5):
            while keys := await client.keys(f"gw:gen:{generation_id}*"):
                await asyncio.sleep(0.1)
        assert keys == []
    finally:
        await client.aclose()


async def test_a_generation_is_resumable_elsewhere_as_soon_as_its_start_arrives(pair: Pair) -> None:
    """The `start` frame reaches the client before the owner's flusher writes the
    meta; the other replica waits for it instead of answering 404 (CI saw that race)."""
    a, b = pair
    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            body = {**BODY, "max_tokens": 5}
            async with session.post(a.make_url("/v1/stream/chunked"), json=body) as r:
                start = orjson.loads(await r.content.readline())
                url = b.make_url(f"/v1/generations/{start['generation_id']}/events")
                ndjson = {"Accept": "application/x-ndjson"}
                async with session.get(url, params={"after": "0"}, headers=ndjson) as resumed:
                    assert resumed.status == 200
                    events = await read_ndjson(resumed)
                assert events[-1]["type"] == "done"
        async with session.get(b.make_url("/v1/generations/gen_unknown/events")) as unknown:
            assert unknown.status == 404


async def test_a_queue_that_cannot_drain_ends_the_answer_with_an_error_not_a_gap(
    start_gateway: StartGateway, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis down long enough that the flush queue fills: the events the queue
    cannot take would be missing from the resumable log, so the generation ends
    with an explicit, retryable error instead; its terminal event is still queued."""
    monkeypatch.setattr(shared_log, "_MAX_PENDING_EVENTS", 20)
    (a,) = await replicas(start_gateway, redis_server, count=1)
    redis_server.kill()
    async with aiohttp.ClientSession() as session:
        body = {**BODY, "max_tokens": 200}
        async with session.post(a.make_url("/v1/stream/chunked"), json=body) as response:
            events = await read_ndjson(response)
    assert events[-1]["type"] == "error", events[-1]
    assert events[-1]["retryable"] is True and "shared log" in events[-1]["message"]
    assert len(events) < 40
    pending = a.app[shared_log_key]._pending
    assert any(queued[-1].terminal for queued in pending.values()), "the end was dropped"


async def test_a_follower_that_loses_redis_gets_an_error_event_not_a_second_response(
    pair: Pair, redis_server: RedisProcess
) -> None:
    """The headers of the follower's stream are out when Redis goes: its failure
    must be the stream's last event (a second HTTP response inside the chunked
    body is a protocol error for every client)."""
    a, b = pair
    async with aiohttp.ClientSession() as session:
        body = {**BODY, "max_tokens": 400, "on_disconnect": "finish"}
        async with session.post(a.make_url("/v1/generations"), json=body) as created:
            generation_id = (await created.json())["id"]
        url = b.make_url(f"/v1/generations/{generation_id}/events")
        async with session.get(url, headers={"Accept": "application/x-ndjson"}) as response:
            assert response.status == 200
            first = await response.content.readline()
            assert orjson.loads(first)["type"] == "start"
            redis_server.kill()
            rest = await response.read()
    assert b"HTTP/1.1" not in rest
    events = [orjson.loads(first), *ndjson_events(rest)]
    assert events[-1]["type"] == "error" and events[-1]["retryable"] is True
    assert [e["seq"] for e in events] == list(range(len(events)))


async def test_a_thousand_followers_on_one_replica_starve_nothing(pair: Pair) -> None:
    """1,000 followers on replica B of 20 generations that A is streaming: on
    redis-py's default pool (100 connections) about half failed and leases
    expired into false errors; each follower must get its generation's whole
    log, exactly, ending as the owner's does."""
    a, b = pair
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        ids = []
        for seed in range(20):
            body = {**BODY, "seed": seed, "max_tokens": 60, "on_disconnect": "finish"}
            async with session.post(a.make_url("/v1/generations"), json=body) as created:
                ids.append((await created.json())["id"])

        async def follow(generation_id: str) -> list[dict[str, Any]]:
            url = b.make_url(f"/v1/generations/{generation_id}/events")
            async with session.get(url, headers={"Accept": "application/x-ndjson"}) as r:
                assert r.status == 200, await r.text()
                return await read_ndjson(r)

        async with asyncio.timeout(60):
            followed = await asyncio.gather(*(follow(ids[i % 20]) for i in range(1000)))
    owners = {g: a.app[registry_key].get(g, "anonymous").events for g in ids}
    for index, events in enumerate(followed):
        expected = [orjson.loads(e.json) for e in owners[ids[index % 20]]]
        assert events == expected, f"follower {index}: {events[-1]}"
        assert events[-1]["type"] == "done"


@pytest.mark.parametrize("limit", ["concurrent_streams", "max_streams"])
async def test_followers_count_as_streams_of_their_replica(
    start_gateway: StartGateway, redis_server: RedisProcess, limit: str
) -> None:
    """A follower holds a socket and a Redis read here: it counts toward the
    principal's concurrent_streams and server.max_streams like a stream it started."""
    (a,) = await replicas(start_gateway, redis_server, count=1)
    two = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent_streams": 2}
    sections: dict[str, Any] = {
        "models": [PACED],
        "streams": {"backend": "redis", "resume_grace_s": 10},
        "redis": {"url": redis_server.url},
    }
    if limit == "concurrent_streams":
        sections["rate_limit"] = {"default": two}
    else:
        sections["server"] = {"max_streams": 2}
    b = await start_gateway(**sections)
    async with aiohttp.ClientSession() as session:
        body = {**BODY, "max_tokens": 200, "on_disconnect": "finish"}
        async with session.post(a.make_url("/v1/generations"), json=body) as created:
            url = b.make_url(f"/v1/generations/{(await created.json())['id']}/events")
        followers = [await session.get(url) for _ in range(2)]
        assert [f.status for f in followers] == [200, 200]
        async with session.get(url) as third:
            assert third.status == (429 if limit == "concurrent_streams" else 503)
            error = (await third.json())["error"]
            assert error["code"] == "rate_limited" and third.headers["Retry-After"]
        for follower in followers:
            follower.close()
        # Their places free up as they leave.
        async with asyncio.timeout(5):
            while True:
                async with session.get(url) as again:
                    if again.status == 200:
                        break
                await asyncio.sleep(0.05)
