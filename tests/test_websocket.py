"""GET /v1/stream/ws: generate, multiplex, cancel, resume, and bad input."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import struct

import aiohttp
import orjson
import pytest

from tests.conftest import StartGateway
from tests.fake_upstream import FakeUpstream, large_delta, text_deltas
from tests.helpers import (
    assert_well_formed,
    connect_with_small_window,
    openai_model,
    stream,
    text_of,
    ws_streams,
)

PACED = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 300, "first_token_ms": 0}


async def test_generate_streams_events_with_ids(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.make_url("/v1/stream/ws")) as ws,
    ):
        await ws.send_json(
            {"type": "generate", "request_id": "r1", "prompt": "hi", "max_tokens": 20, "seed": 3}
        )
        events = (await ws_streams(ws, {"r1"}))["r1"]
    assert_well_formed(events)
    generation_id = events[0]["generation_id"]
    assert all(e["generation_id"] == generation_id and e["request_id"] == "r1" for e in events)
    assert events[-1]["finish_reason"] == "length"


async def test_many_generations_on_one_socket(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=[PACED], streams={"max_per_socket": 4})
    body = {"prompt": "hi", "max_tokens": 30, "seed": 1}
    reference = text_of((await stream(server, "chunked", body)).events)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
            for n in range(4):
                await ws.send_json(
                    {
                        "type": "generate",
                        "request_id": f"r{n}",
                        "prompt": "hi",
                        "max_tokens": 30,
                        "seed": 1 if n == 0 else 100 + n,
                    }
                )
            await ws.send_json({"type": "generate", "request_id": "r4", "prompt": "hi"})
            streams = await ws_streams(ws, {"r0", "r1", "r2", "r3", "r4"})
    assert streams["r4"][0]["type"] == "error" and streams["r4"][0]["code"] == "rate_limited"
    for n in range(4):
        assert_well_formed(streams[f"r{n}"])
    assert text_of(streams["r0"]) == reference
    assert len({e["generation_id"] for n in range(4) for e in streams[f"r{n}"]}) == 4


async def test_cancel_stops_one_generation(start_gateway: StartGateway) -> None:
    model = {**PACED, "tokens_per_second": 50}
    server = await start_gateway(models=[model])
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.make_url("/v1/stream/ws")) as ws,
    ):
        for rid in ("a", "b"):
            await ws.send_json(
                {"type": "generate", "request_id": rid, "prompt": "hi", "max_tokens": 20}
            )
        await asyncio.sleep(0.1)
        await ws.send_json({"type": "cancel", "request_id": "a"})
        streams = await ws_streams(ws, {"a", "b"})
    assert streams["a"][-1]["type"] == "done" and streams["a"][-1]["finish_reason"] == "cancelled"
    assert streams["a"][-1]["usage"]["completion_tokens"] < 20
    assert streams["b"][-1]["finish_reason"] == "length"


async def test_resume_after_reconnect_is_exact(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=[PACED], streams={"resume_grace_s": 5})
    rng = random.Random(99)
    url = server.make_url("/v1/stream/ws")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            await ws.send_json(
                {
                    "type": "generate",
                    "request_id": "ref",
                    "prompt": "hi",
                    "max_tokens": 80,
                    "seed": 5,
                }
            )
            reference = (await ws_streams(ws, {"ref"}))["ref"]
        for _ in range(3):
            keep = rng.randint(1, 70)
            seen = []
            ws = await session.ws_connect(url)
            await ws.send_json(
                {"type": "generate", "request_id": "g", "prompt": "hi", "max_tokens": 80, "seed": 5}
            )
            while len(seen) < keep:
                seen.append(await ws.receive_json())
            await ws.close()
            async with session.ws_connect(url) as ws2:
                await ws2.send_json(
                    {
                        "type": "resume",
                        "request_id": "g2",
                        "generation_id": seen[0]["generation_id"],
                        "after_seq": seen[-1]["seq"],
                    }
                )
                rest = (await ws_streams(ws2, {"g2"}))["g2"]
            assert_well_formed(seen + rest)
            assert text_of(seen + rest) == text_of(reference)


async def test_resume_at_or_past_the_end_gets_the_terminal_event(
    start_gateway: StartGateway,
) -> None:
    """HTTP answers 204 when nothing follows; a socket must still hear an end for the id."""
    server = await start_gateway()
    url = server.make_url("/v1/stream/ws")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            body = {"prompt": "hi", "max_tokens": 5, "seed": 5}
            await ws.send_json({"type": "generate", "request_id": "g", **body})
            events = (await ws_streams(ws, {"g"}))["g"]
            for after_seq in (events[-1]["seq"], events[-1]["seq"] + 10):
                await ws.send_json(
                    {
                        "type": "resume",
                        "request_id": f"r{after_seq}",
                        "generation_id": events[0]["generation_id"],
                        "after_seq": after_seq,
                    }
                )
                (terminal,) = (await ws_streams(ws, {f"r{after_seq}"}))[f"r{after_seq}"]
                assert terminal["type"] == "done" and terminal["seq"] == events[-1]["seq"]


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ("not json", "JSON"),
        ("[]", "object"),
        ('{"type": "dance"}', "type"),
        ('{"type": "generate", "prompt": "hi"}', "request_id"),
        ('{"type": "generate", "request_id": "x", "prompt": "hi", "max_tokens": -1}', "max_tokens"),
        ('{"type": "generate", "request_id": "x", "prompt": "hi", "model": "nope"}', "nope"),
        ('{"type": "cancel", "request_id": "ghost"}', "ghost"),
        ('{"type": "resume", "request_id": "x", "generation_id": "gen_nope"}', "not found"),
        ('{"type": "resume", "request_id": "x", "generation_id": 5}', "generation_id"),
    ],
)
async def test_bad_messages_get_an_error_frame_and_the_socket_stays_open(
    start_gateway: StartGateway, message: str, fragment: str
) -> None:
    server = await start_gateway()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.make_url("/v1/stream/ws")) as ws,
    ):
        await ws.send_str(message)
        error = await ws.receive_json(timeout=5)
        assert error["type"] == "error" and fragment in error["message"]
        assert error["code"] in {"invalid_request", "model_not_found"}
        await ws.send_json(
            {"type": "generate", "request_id": "ok", "prompt": "hi", "max_tokens": 3}
        )
        events = (await ws_streams(ws, {"ok"}))["ok"]
        assert events[-1]["type"] == "done"


async def test_binary_frames_are_refused_politely(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.make_url("/v1/stream/ws")) as ws,
    ):
        await ws.send_bytes(b"\x00\x01")
        error = await ws.receive_json(timeout=5)
        assert error["type"] == "error" and "binary" in error["message"]


async def test_oversized_frame_closes_with_1009(start_gateway: StartGateway) -> None:
    server = await start_gateway(server={"max_body_bytes": 4096})
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.make_url("/v1/stream/ws")) as ws,
    ):
        await ws.send_str('{"type": "generate", "prompt": "' + "x" * 10_000 + '"}')
        message = await ws.receive(timeout=5)
        assert message.type in {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED}
        assert ws.close_code == 1009


def masked_text_frame(payload: bytes) -> bytes:
    """A client's text frame: clients must mask (RFC 6455 5.3)."""
    mask = os.urandom(4)
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    if len(payload) < 126:
        return bytes((0x81, 0x80 | len(payload))) + mask + body
    return struct.pack("!BBH", 0x81, 0x80 | 126, len(payload)) + mask + body


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked frame from the server: (opcode, payload)."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(size)


async def test_a_socket_that_falls_behind_gets_every_stream_whole(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """A caught-up stream's tokens are written from the generation's task
    (pushed); when the socket is full the push is refused and the frames go
    the awaited way. Two generations on one socket that stops reading: every
    frame must arrive whole, not interleaved with the other's, each stream
    in order with nothing lost or repeated.

    A tiny receive window and a delta bigger than the kernels take, so the
    pushes meet a full buffer.
    """
    big = large_delta(1_500_000)
    fake_upstream.script = text_deltas("Hi. ", big, " after", " that")
    fake_upstream.token_delay_s = 0.05
    server = await start_gateway(models=[openai_model(fake_upstream.base_url)])
    reader, writer = await connect_with_small_window(server.host, server.port)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET /v1/stream/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n" % key
    )
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    for request_id in ("a", "b"):
        message = {"type": "generate", "request_id": request_id, "model": "gpt", "prompt": "hi"}
        writer.write(masked_text_frame(orjson.dumps(message)))
    await writer.drain()
    await asyncio.sleep(1.0)  # fall behind while both upstreams stream on
    streams: dict[str, list[dict[str, object]]] = {"a": [], "b": []}
    async with asyncio.timeout(20):
        while not all(s and s[-1]["type"] == "done" for s in streams.values()):
            opcode, payload = await read_server_frame(reader)
            if opcode == 0x1:
                event = orjson.loads(payload)  # a frame cut into by another fails here
                streams[event["request_id"]].append(event)
    writer.close()
    for events in streams.values():
        assert_well_formed(events)
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert text_of(events) == "Hi. " + big + " after that"


async def test_pushed_frames_of_every_length_class_reach_a_client_whole(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """A pushed token is framed by the gateway itself (`text_frame`): a payload
    under 126 bytes, under 64 KiB (16-bit length) and over it (64-bit length)
    must each parse in aiohttp's client, a reader that is not ours."""
    sizes = (10, 300, 70_000)
    fake_upstream.script = text_deltas("Hi. ", *(large_delta(n) for n in sizes))
    fake_upstream.token_delay_s = 0.05  # one read each, to a reader that keeps up
    server = await start_gateway(models=[openai_model(fake_upstream.base_url)])
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.make_url("/v1/stream/ws"), max_msg_size=2**20) as ws,
    ):
        await ws.send_json({"type": "generate", "request_id": "r1", "model": "gpt", "prompt": "x"})
        events = (await ws_streams(ws, {"r1"}))["r1"]
    assert_well_formed(events)
    assert [len(e["text"]) for e in events if e["type"] == "token"] == [4, *sizes]
