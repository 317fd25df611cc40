"""The generations resource: POST, GET …/events (SSE or NDJSON, from any seq), DELETE."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from gateway.errors import GenerationNotFound
from gateway.keys import registry_key
from tests.conftest import StartGateway
from tests.helpers import assert_well_formed, read_ndjson, read_sse, text_of

BODY = {"prompt": "Tell me about caching.", "max_tokens": 30, "seed": 4}
SLOW = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 40, "first_token_ms": 0}


async def create(session: aiohttp.ClientSession, server, body=BODY) -> dict:
    async with session.post(server.make_url("/v1/generations"), json=body) as response:
        assert response.status == 201
        created = await response.json()
        assert response.headers["Location"] == created["events_url"]
        return created


async def test_create_then_attach_over_sse_and_ndjson(start_gateway: StartGateway) -> None:
    server = await start_gateway(streams={"resume_grace_s": 5})
    async with aiohttp.ClientSession() as session:
        created = await create(session, server)
        assert created["id"].startswith("gen_") and len(created["id"]) >= 26
        assert created["events_url"] == f"/v1/generations/{created['id']}/events"
        async with session.get(server.make_url(created["events_url"])) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            sse_events, _ = await read_sse(response)
        accept = {"Accept": "application/x-ndjson"}
        async with session.get(server.make_url(created["events_url"]), headers=accept) as response:
            assert response.headers["Content-Type"] == "application/x-ndjson"
            ndjson_events = await read_ndjson(response)
        url = server.make_url(created["events_url"]).with_query(after="10")
        async with session.get(url, headers=accept) as response:
            tail = await read_ndjson(response)
        async with session.get(
            server.make_url(created["events_url"]), headers={"Last-Event-ID": f"{created['id']}:10"}
        ) as response:
            sse_tail, _ = await read_sse(response)
    assert_well_formed(sse_events)
    assert sse_events == ndjson_events
    assert tail == ndjson_events[11:] == sse_tail


async def test_ndjson_resume_with_after_is_exact(start_gateway: StartGateway) -> None:
    """Drop a chunked stream mid-way; re-attach with ?after=; nothing lost or repeated."""
    model = {**SLOW, "tokens_per_second": 300}
    server = await start_gateway(models=[model], streams={"resume_grace_s": 5})
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/chunked"), json=BODY) as response:
            reference = await read_ndjson(response)
        for keep in (1, 7, 19):
            response = await session.post(server.make_url("/v1/stream/chunked"), json=BODY)
            seen = []
            async for line in response.content:
                if line.strip():
                    seen.append(orjson.loads(line))
                if len(seen) == keep:
                    break
            response.close()
            url = server.make_url(f"/v1/generations/{seen[0]['generation_id']}/events")
            async with session.get(
                url.with_query(after=str(seen[-1]["seq"])),
                headers={"Accept": "application/x-ndjson"},
            ) as resumed:
                rest = await read_ndjson(resumed)
            assert_well_formed(seen + rest)
            assert text_of(seen + rest) == text_of(reference)


async def test_delete_cancels_and_log_ends_cancelled(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=[SLOW], streams={"resume_grace_s": 5})
    async with aiohttp.ClientSession() as session:
        created = await create(session, server, {**BODY, "max_tokens": 200})
        await asyncio.sleep(0.1)
        async with session.delete(server.make_url(f"/v1/generations/{created['id']}")) as response:
            assert response.status == 204
        async with session.get(
            server.make_url(created["events_url"]), headers={"Accept": "application/x-ndjson"}
        ) as response:
            events = await read_ndjson(response)
        async with session.delete(server.make_url(f"/v1/generations/{created['id']}")) as response:
            assert response.status == 204  # idempotent once ended
    assert_well_formed(events)
    assert events[-1]["finish_reason"] == "cancelled"
    assert events[-1]["usage"]["completion_tokens"] == len(events) - 2 < 200


async def test_attach_after_the_end_is_204(start_gateway: StartGateway) -> None:
    server = await start_gateway(streams={"resume_grace_s": 5})
    async with aiohttp.ClientSession() as session:
        created = await create(session, server)
        async with session.get(server.make_url(created["events_url"])) as response:
            events, _ = await read_sse(response)
        url = server.make_url(created["events_url"]).with_query(after=str(events[-1]["seq"]))
        async with session.get(url) as response:
            assert response.status == 204


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_unknown_generation_is_404(start_gateway: StartGateway, method: str) -> None:
    server = await start_gateway()
    path = "/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA" + ("/events" if method == "GET" else "")
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.make_url(path)) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "invalid_request"


async def test_other_principals_get_404(start_gateway: StartGateway) -> None:
    """Ownership is checked by the registry, whatever route asks."""
    server = await start_gateway(streams={"resume_grace_s": 5})
    async with aiohttp.ClientSession() as session:
        created = await create(session, server)
    registry = server.app[registry_key]
    assert registry.get(created["id"], "anonymous").id == created["id"]
    with pytest.raises(GenerationNotFound):
        registry.get(created["id"], "someone-else")


async def test_bad_after_is_400(start_gateway: StartGateway) -> None:
    server = await start_gateway(streams={"resume_grace_s": 5})
    async with aiohttp.ClientSession() as session:
        created = await create(session, server)
        for after in ("x", "-5", "99999999999999"):
            url = server.make_url(created["events_url"]).with_query(after=after)
            async with session.get(url) as response:
                assert response.status == 400, after
