"""POST /v1/stream/chunked end to end over a real socket."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import orjson
import pytest

from gateway.errors import GenerationNotFound
from gateway.keys import registry_key
from tests.conftest import FAST_MODEL, StartGateway
from tests.helpers import assert_well_formed, ndjson_events, raw_exchange, stream, text_of

BODY = {"prompt": "Explain vector databases.", "max_tokens": 40, "seed": 7}


async def test_streams_a_whole_generation(start_gateway: StartGateway) -> None:
    streamed = await stream(await start_gateway(), "chunked", BODY)
    unbuffered = {"Content-Type": "application/x-ndjson", "X-Accel-Buffering": "no"}
    assert streamed.status == 200 and unbuffered.items() <= streamed.headers.items(), streamed
    assert streamed.headers["Transfer-Encoding"] == "chunked" and streamed.headers["X-Request-ID"]
    events = streamed.events
    assert_well_formed(events)
    start, done = events[0], events[-1]
    assert start["type"] == "start" and start["model"] == "sim-1"
    assert start["generation_id"].startswith("gen_") and len(start["generation_id"]) >= 26
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 40 == len(events) - 2
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 40


async def test_same_seed_same_text(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    texts = [
        text_of((await stream(server, "chunked", {**BODY, "seed": seed})).events)
        for seed in (7, 7, 8)
    ]
    assert texts[0] == texts[1] != texts[2]


async def test_tokens_arrive_as_they_are_generated(start_gateway: StartGateway) -> None:
    """Each token is flushed on its own: no buffering until the end."""
    model = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 20, "first_token_ms": 0}
    server = await start_gateway(models=[model])
    loop = asyncio.get_running_loop()
    arrivals = []
    async with aiohttp.ClientSession() as session:
        body = {**BODY, "max_tokens": 6}
        async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
            async for line in response.content:
                if line.strip():
                    arrivals.append((loop.time(), orjson.loads(line)["type"]))
    token_times = [t for t, kind in arrivals if kind == "token"]
    gaps = [b - a for a, b in itertools.pairwise(token_times)]
    assert len(token_times) == 6
    assert all(gap > 0.02 for gap in gaps), gaps


async def test_upstream_failure_mid_stream_is_an_error_event(start_gateway: StartGateway) -> None:
    model = {**FAST_MODEL, "tokens_per_second": 1000, "first_token_ms": 0, "fail_after_tokens": 5}
    streamed = await stream(await start_gateway(models=[model]), "chunked", BODY)
    assert streamed.status == 200
    events = streamed.events
    assert_well_formed(events)
    assert [e["type"] for e in events].count("token") == 5
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "upstream_error" and events[-1]["retryable"] is True
    assert "message" in events[-1]


async def test_blank_line_heartbeats_while_waiting_for_the_first_token(
    start_gateway: StartGateway,
) -> None:
    model = {
        "name": "sim-1",
        "provider": "simulated",
        "tokens_per_second": 1000,
        "first_token_ms": 700,
    }
    server = await start_gateway(models=[model], streams={"heartbeat_s": 0.2})
    async with aiohttp.ClientSession() as session:
        body = {**BODY, "max_tokens": 2}
        async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
            raw = await response.read()
    lines = raw.split(b"\n")
    first_token = next(i for i, line in enumerate(lines) if b'"token"' in line)
    blanks_before_token = [line for line in lines[1:first_token] if line == b""]
    assert len(blanks_before_token) >= 2, raw
    assert orjson.loads(lines[0])["type"] == "start"


async def test_finished_generation_is_kept_for_resume(start_gateway: StartGateway) -> None:
    server = await start_gateway(streams={"retention_s": 30})
    events = (await stream(server, "chunked", BODY)).events
    registry = server.app[registry_key]
    generation = registry.get(events[0]["generation_id"], "anonymous")
    assert generation.finished and len(generation.events) == len(events)


async def test_finished_generations_are_forgotten_in_order_after_the_retention(
    start_gateway: StartGateway,
) -> None:
    """One timer sweeps the finished logs: each goes `retention_s` after it finished,
    the first before the second, and nothing is left after both."""
    server = await start_gateway(streams={"retention_s": 1.0})
    registry = server.app[registry_key]
    first = (await stream(server, "chunked", BODY)).events[0]["generation_id"]
    await asyncio.sleep(0.5)
    second = (await stream(server, "chunked", BODY)).events[0]["generation_id"]
    await asyncio.sleep(0.75)  # the first's retention is over, not the second's
    with pytest.raises(GenerationNotFound):
        registry.get(first, "anonymous")
    assert registry.get(second, "anonymous").finished
    await asyncio.sleep(0.5)
    with pytest.raises(GenerationNotFound):
        registry.get(second, "anonymous")
    assert len(registry) == 0


async def test_an_http_1_0_client_gets_the_same_stream_unchunked(
    start_gateway: StartGateway,
) -> None:
    """HTTP/1.0 has no chunked encoding: the body ends with the connection. Tokens
    written straight from the generation's task must not be chunk-framed then."""
    model = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 400}
    server = await start_gateway(models=[model])
    body = {**BODY, "max_tokens": 30}
    reference = text_of((await stream(server, "chunked", body)).events)
    payload = orjson.dumps(body)
    request = (
        b"POST /v1/stream/chunked HTTP/1.0\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    raw = await raw_exchange(server.host, server.port, request)  # to EOF
    head, _, answer = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding" not in head.lower()
    events = ndjson_events(answer)
    assert_well_formed(events)
    assert text_of(events) == reference
