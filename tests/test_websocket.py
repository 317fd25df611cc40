"""GET /v1/stream/ws: generate, multiplex, cancel, resume, and bad input."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from tests.conftest import StartGateway
from tests.helpers import assert_well_formed, stream, text_of, ws_streams

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
