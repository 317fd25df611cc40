"""GET and POST /v1/stream/sse end to end, resume by Last-Event-ID, and framing."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import orjson
import pytest
from aiohttp_sse import EventSourceResponse

from gateway.events import Event
from gateway.transports.sse import encode_sse
from tests.conftest import StartGateway
from tests.helpers import assert_well_formed, read_sse, read_sse_frames, stream, text_of

BODY = {"prompt": "Explain vector databases.", "max_tokens": 60, "seed": 11}
PACED = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 400, "first_token_ms": 0}


async def test_post_streams_frames_with_ids_and_retry(start_gateway: StartGateway) -> None:
    streamed = await stream(await start_gateway(), "sse", BODY)
    unbuffered = {"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    assert streamed.status == 200 and unbuffered.items() <= streamed.headers.items(), streamed
    assert streamed.headers["Cache-Control"] == "no-cache"
    events, parser = streamed.events, streamed.frames
    assert_well_formed(events)
    generation_id = events[0]["generation_id"]
    assert [e.id for e in parser.events] == [f"{generation_id}:{e['seq']}" for e in events]
    assert [e.event for e in parser.events] == [e["type"] for e in events]
    assert parser.events[0].retry == 1000


async def test_get_uses_query_parameters(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    query = {"prompt": "Explain vector databases.", "max_tokens": "60", "seed": "11"}
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/v1/stream/sse"), params=query) as response:
            get_events, _ = await read_sse(response)
        async with session.post(server.make_url("/v1/stream/sse"), json=BODY) as response:
            post_events, _ = await read_sse(response)
    assert text_of(get_events) == text_of(post_events)
    assert get_events[-1]["usage"]["completion_tokens"] == 60


async def test_our_frames_equal_aiohttp_sse_send() -> None:
    """We write pre-encoded bytes; they must be exactly what aiohttp-sse would send."""

    class Capture(EventSourceResponse):
        def __init__(self) -> None:
            super().__init__(sep="\n")
            self.written: list[bytes] = []

        async def write(self, data: bytes) -> None:  # type: ignore[override]
            self.written.append(bytes(data))

    for fields in [
        {"text": "a\nb\r\nc\rd"},
        {"text": "é 🚀 \u2028 \x00"},
        {"finish_reason": "stop"},
    ]:
        event = Event.new("gen_abc", "token", 3, fields)
        capture = Capture()
        await capture.send(event.json.decode(), id=event.event_id, event=event.type)
        assert capture.written == [encode_sse(event)]


async def test_pings_while_waiting_for_the_first_token(start_gateway: StartGateway) -> None:
    model = {**PACED, "first_token_ms": 800}
    server = await start_gateway(models=[model], streams={"heartbeat_s": 0.2})
    streamed = await stream(server, "sse", {**BODY, "max_tokens": 2})
    assert streamed.frames.comments.count("ping") >= 2
    assert_well_formed(streamed.events)


async def test_no_ping_while_events_flow(start_gateway: StartGateway) -> None:
    """The contract's heartbeat comes after `heartbeat_s` without an event, not on a
    clock: 60 tokens at 100 a second (0.6 s) with a 0.2 s heartbeat need none."""
    model = {**PACED, "tokens_per_second": 100}
    server = await start_gateway(models=[model], streams={"heartbeat_s": 0.2})
    streamed = await stream(server, "sse", BODY)
    assert_well_formed(streamed.events)
    assert streamed.frames.comments.count("ping") == 0, streamed.frames.comments


async def test_a_stream_runs_no_task_of_its_own(start_gateway: StartGateway) -> None:
    """Heartbeats and the stall cut-off are the sink's timer, as on every HTTP
    transport: no ping task per stream (its start, sleeps and cancellation
    were a cost of every SSE start)."""
    model = {**PACED, "first_token_ms": 600}
    server = await start_gateway(models=[model], streams={"heartbeat_s": 0.2})
    before = asyncio.all_tasks()
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/sse"), json=BODY) as response:
            await response.content.readuntil(b"\n\n")  # the `start` frame
            await asyncio.sleep(0.3)  # a heartbeat is due meanwhile
            names = sorted(
                t.get_coro().__qualname__  # type: ignore[union-attr]
                for t in asyncio.all_tasks() - before
            )
            assert "Generation._run" in names, names  # looked at while it runs
            assert not [n for n in names if "EventSource" in n or "ping" in n.lower()], names
            rest = await response.read()
    assert b": ping" in rest


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_resume_by_last_event_id_is_exact(start_gateway: StartGateway, method: str) -> None:
    """Drop mid-stream at random points; reconnect with Last-Event-ID; no gap, no duplicate."""
    server = await start_gateway(models=[PACED], streams={"resume_grace_s": 5})
    url = server.make_url("/v1/stream/sse")
    query = {k: str(v) for k, v in BODY.items()}
    rng = random.Random(1234)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=BODY) as response:
            reference, _ = await read_sse(response)
        for _ in range(3):
            keep = rng.randint(1, 50)
            if method == "GET":
                response = await session.get(url, params=query)
            else:
                response = await session.post(url, json=BODY)
            parser = await read_sse_frames(response, until=keep)
            response.close()  # the connection drops: no more bytes are read from it
            seen = [orjson.loads(e.data) for e in parser.events]
            headers = {"Last-Event-ID": parser.last_event_id}
            request = (
                session.get(url, params=query, headers=headers)
                if method == "GET"
                else (session.post(url, json=BODY, headers=headers))
            )
            async with request as resumed:
                assert resumed.status == 200
                rest, _ = await read_sse(resumed)
            assert rest[0]["seq"] == seen[-1]["seq"] + 1
            assert_well_formed(seen + rest)
            assert text_of(seen + rest) == text_of(reference)
            # The browser reconnects once more after the end: 204 stops it for good.
            last = {"Last-Event-ID": f"{seen[0]['generation_id']}:{rest[-1]['seq']}"}
            async with session.get(url, params=query, headers=last) as again:
                assert again.status == 204


async def test_unknown_or_malformed_last_event_id(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    url = server.make_url("/v1/stream/sse")
    async with aiohttp.ClientSession() as session:
        async with session.get(
            url, params={"prompt": "x"}, headers={"Last-Event-ID": "gen_doesnotexist0000000000:3"}
        ) as r:
            assert r.status == 404
        async with session.get(
            url, params={"prompt": "x"}, headers={"Last-Event-ID": "garbage"}
        ) as r:
            assert r.status == 400


async def test_slow_first_token_does_not_block_headers(start_gateway: StartGateway) -> None:
    """Headers and `start` go out at once, so the client knows its generation id."""
    model = {**PACED, "first_token_ms": 3000}
    server = await start_gateway(models=[model], streams={"resume_grace_s": 0})
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(1):
            async with session.post(server.make_url("/v1/stream/sse"), json=BODY) as response:
                parser = await read_sse_frames(response, until=1)
    assert parser.events[0].event == "start"
