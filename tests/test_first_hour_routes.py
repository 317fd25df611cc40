"""Routes a newcomer reaches for: `GET /v1/models/{id}` (the SDK's `models.retrieve`),
`GET /v1/generations/{id}` (where a generation stands), and a plain GET of the
WebSocket route, which must say what it is."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.auth_helpers import CLOSED, KEY_A, KEY_B, WRONG_KEY, assert_unauthorized
from tests.conftest import TEST_API_KEY, StartGateway
from tests.helpers import bearer, fetch, raw_exchange, read_ndjson
from tests.redis_server import RedisProcess

PACED = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 40, "first_token_ms": 0}
BODY = {"prompt": "Tell me about caching.", "max_tokens": 5, "seed": 3}


async def status_of(server: TestServer, generation_id: str, key: str = KEY_A) -> dict[str, Any]:
    status, headers, raw = await fetch(
        server, "GET", f"/v1/generations/{generation_id}", headers=bearer(key)
    )
    assert status == 200, raw
    assert headers["Content-Type"] == "application/json"
    document: dict[str, Any] = orjson.loads(raw)
    return document


async def create(server: TestServer, body: dict[str, Any] = BODY) -> str:
    status, _, raw = await fetch(
        server, "POST", "/v1/generations", headers=bearer(KEY_A), body=body
    )
    assert status == 201, raw
    return str(orjson.loads(raw)["id"])


async def follow_to_end(server: TestServer, generation_id: str) -> list[dict[str, Any]]:
    headers = {**bearer(KEY_A), "Accept": "application/x-ndjson"}
    async with aiohttp.ClientSession() as session:
        url = server.make_url(f"/v1/generations/{generation_id}/events")
        async with session.get(url, headers=headers) as response:
            return await read_ndjson(response)


def assert_not_found(status: int, raw: bytes, code: str) -> None:
    assert status == 404, raw
    assert orjson.loads(raw)["error"]["code"] == code


# -- GET /v1/models/{model_id} ---------------------------------------------------------


async def test_the_sdk_retrieves_a_model_and_gets_404_for_an_unknown_one(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(auth=CLOSED)
    client = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key=TEST_API_KEY, max_retries=0
    )
    async with client:
        model = await client.models.retrieve("sim-1")
        listed = [m.id async for m in client.models.list()]
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.models.retrieve("gpt-4.1-mini")
    assert model.model_dump(exclude_unset=True) == {
        "id": "sim-1",
        "object": "model",
        "created": 0,
        "owned_by": "gateway",
    }
    assert listed == ["sim-1"]
    assert unknown.value.body == {
        "type": "invalid_request_error",
        "code": "model_not_found",
        "message": "model 'gpt-4.1-mini' is not served here; see GET /v1/models",
    }


async def test_a_model_needs_the_same_credential_as_the_model_list(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(auth=CLOSED)
    for headers in ({}, bearer(WRONG_KEY)):
        for path in ("/v1/models", "/v1/models/sim-1"):
            status, response_headers, raw = await fetch(server, "GET", path, headers=headers)
            assert_unauthorized(status, response_headers, raw)
    status, _, raw = await fetch(server, "GET", "/v1/models/sim-1", headers=bearer(KEY_B))
    assert status == 200, raw


# -- GET /v1/generations/{generation_id} ------------------------------------------------


async def test_a_running_generation_then_the_same_one_finished(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(auth=CLOSED, models=[PACED], streams={"resume_grace_s": 5})
    generation_id = await create(server, {**BODY, "max_tokens": 20, "on_disconnect": "finish"})
    await asyncio.sleep(0.2)
    running = await status_of(server, generation_id)
    created = running.pop("created")
    assert isinstance(created, int) and created > 0
    assert 0 <= running.pop("last_seq") < 21
    assert running == {
        "id": generation_id,
        "object": "generation",
        "state": "running",
        "model": "sim-1",
        "finish_reason": None,
        "events_url": f"/v1/generations/{generation_id}/events",
    }
    events = await follow_to_end(server, generation_id)
    assert events[-1]["seq"] == 21
    assert await status_of(server, generation_id) == {
        **running,
        "created": created,
        "state": "done",
        "last_seq": 21,
        "finish_reason": "length",
        "usage": events[-1]["usage"],
    }


async def test_polling_the_status_does_not_keep_an_unfollowed_generation_alive(
    start_gateway: StartGateway,
) -> None:
    """Nobody follows it: the grace timer cancels it, polls or not; then it says `cancelled`."""
    server = await start_gateway(auth=CLOSED, models=[PACED], streams={"resume_grace_s": 0.3})
    generation_id = await create(server, {**BODY, "max_tokens": 200})
    for _ in range(12):
        document = await status_of(server, generation_id)
        await asyncio.sleep(0.05)
    assert document["state"] == "cancelled", document
    assert document["finish_reason"] == "cancelled"
    assert document["usage"]["completion_tokens"] == document["last_seq"] - 1 < 200


async def test_a_deleted_and_a_failed_generation(start_gateway: StartGateway) -> None:
    failing = {**PACED, "name": "flaky", "fail_after_tokens": 2, "tokens_per_second": 1000}
    server = await start_gateway(
        auth=CLOSED, models=[PACED, failing], streams={"resume_grace_s": 5}
    )
    deleted = await create(server, {**BODY, "max_tokens": 200})
    status, _, raw = await fetch(
        server, "DELETE", f"/v1/generations/{deleted}", headers=bearer(KEY_A)
    )
    assert status == 204, raw
    await follow_to_end(server, deleted)
    document = await status_of(server, deleted)
    assert (document["state"], document["finish_reason"]) == ("cancelled", "cancelled")
    failed = await create(server, {**BODY, "model": "flaky"})
    events = await follow_to_end(server, failed)
    document = await status_of(server, failed)
    assert document["state"] == "error" and document["finish_reason"] is None
    assert document["error"] == {k: events[-1][k] for k in ("code", "message", "retryable")}
    assert document["error"]["code"] == "upstream_error" and "usage" not in document


async def test_an_unknown_or_foreign_generation_is_404_and_a_stranger_401(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(auth=CLOSED)
    generation_id = await create(server)
    for path, key in (
        (f"/v1/generations/{generation_id}", KEY_B),
        ("/v1/generations/gen_x", KEY_A),
    ):
        status, _, raw = await fetch(server, "GET", path, headers=bearer(key))
        assert_not_found(status, raw, "invalid_request")
    status, headers, raw = await fetch(server, "GET", f"/v1/generations/{generation_id}")
    assert_unauthorized(status, headers, raw)


async def test_the_status_of_a_generation_another_replica_runs(
    start_gateway: StartGateway, redis_server: RedisProcess
) -> None:
    a, b = [
        await start_gateway(
            auth=CLOSED,
            models=[PACED],
            streams={"backend": "redis", "resume_grace_s": 5},
            redis={"url": redis_server.url},
        )
        for _ in range(2)
    ]
    generation_id = await create(a, {**BODY, "max_tokens": 60, "on_disconnect": "finish"})
    await asyncio.sleep(0.3)
    running = await status_of(b, generation_id)
    assert running["state"] == "running" and running["model"] == "sim-1"
    assert 0 <= running["last_seq"] < 61
    await follow_to_end(a, generation_id)
    async with asyncio.timeout(5):  # the owner flushes its log to Redis every few ms
        while (finished := await status_of(b, generation_id))["state"] == "running":
            await asyncio.sleep(0.02)
    assert finished == await status_of(a, generation_id)
    assert finished["last_seq"] == 61 and finished["finish_reason"] == "length"
    status, _, raw = await fetch(
        b, "GET", f"/v1/generations/{generation_id}", headers=bearer(KEY_B)
    )
    assert_not_found(status, raw, "invalid_request")


# -- a plain GET of the WebSocket route -------------------------------------------------


async def test_a_plain_get_of_the_websocket_route_says_how_to_connect(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway()
    status, headers, raw = await fetch(server, "GET", "/v1/stream/ws")
    assert status == 426, raw
    assert headers["Upgrade"] == "websocket" and headers["Connection"].lower() == "upgrade"
    error = orjson.loads(raw)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")
    assert "WebSocket route" in error["message"] and "ws://" in error["message"]
    # `Connection: Upgrade` ends no connection: the next request on it is served.
    plain = b"GET /v1/stream/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    last = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    answers = await raw_exchange(server.host, server.port, plain + last)
    assert answers.startswith(b"HTTP/1.1 426 ") and b"}HTTP/1.1 200 OK\r\n" in answers
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
            await ws.send_json({"type": "generate", "request_id": "r", **BODY})
            async with asyncio.timeout(5):
                while (event := await ws.receive_json())["type"] not in ("done", "error"):
                    pass
    assert event["finish_reason"] == "length"
