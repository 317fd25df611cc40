"""Running answers cannot hold unbounded memory: per generation and per replica.

`streams.retention_max_bytes` bounds finished logs; these bound running ones,
which a client can keep growing with long answers that run on unread
(`on_disconnect: finish`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.keys import registry_key
from tests.conftest import FAST_MODEL, StartGateway
from tests.helpers import assert_well_formed, read_ndjson, stream

SLOW = {**FAST_MODEL, "name": "slow", "tokens_per_second": 400}


async def ndjson(server: TestServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    streamed = await stream(server, "chunked", body)
    assert streamed.status == 200
    return streamed.events


async def settled(server: TestServer) -> None:
    """Until no generation runs."""
    registry = server.app[registry_key]
    async with asyncio.timeout(10):
        while registry.running:
            await asyncio.sleep(0.01)


async def test_an_answer_past_its_bound_ends_in_an_explicit_error(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(streams={"max_generation_bytes": 8192})
    events = await ndjson(server, {"prompt": "Tell me everything", "max_tokens": 5000, "seed": 1})
    assert_well_formed(events)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "invalid_request"
    assert error["retryable"] is False and "max_generation_bytes" in error["message"]
    # It stopped at the bound (each token event is ~60 bytes of JSON + 170 of overhead).
    assert 20 <= len(events) - 2 <= 45
    await settled(server)
    assert server.app[registry_key].live_bytes == 0


async def test_the_replicas_running_logs_are_bounded_and_accounted_back(
    start_gateway: StartGateway,
) -> None:
    """Unread answers that run on (`on_disconnect: finish`) cannot together pass
    `streams.max_live_bytes`; whichever crosses it ends, retryable elsewhere."""
    server = await start_gateway(models=[SLOW], streams={"max_live_bytes": 16384})
    body = {"prompt": "Go on and on", "max_tokens": 400, "on_disconnect": "finish"}
    async with aiohttp.ClientSession() as session:
        ids = []
        for seed in range(4):
            url = server.make_url("/v1/generations")
            async with session.post(url, json={**body, "seed": seed}) as response:
                assert response.status == 201
                ids.append((await response.json())["id"])
        await settled(server)
        terminals = []
        for generation_id in ids:
            url = server.make_url(f"/v1/generations/{generation_id}/events")
            headers = {"Accept": "application/x-ndjson"}
            async with session.get(url, headers=headers) as response:
                events = await read_ndjson(response)
            assert_well_formed(events)
            terminals.append(events[-1])
    refused = [t for t in terminals if t["type"] == "error"]
    assert refused, "four 400-token answers fit in 16 KiB of running logs"
    for error in refused:
        assert error["code"] == "rate_limited" and error["retryable"] is True
        assert "max_live_bytes" in error["message"]
    assert server.app[registry_key].live_bytes == 0


async def test_ordinary_answers_are_untouched_and_leave_nothing_counted(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway()
    for seed in range(5):
        events = await ndjson(server, {"prompt": "Hi", "max_tokens": 50, "seed": seed})
        assert events[-1]["type"] == "done" and len(events) == 52
    await settled(server)
    assert server.app[registry_key].live_bytes == 0
