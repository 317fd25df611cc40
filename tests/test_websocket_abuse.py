"""A WebSocket outlives the request that opened it: flood, socket count and
credential expiry are checked per message or per socket, not once."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt
import orjson
import pytest

from tests.conftest import TEST_API_KEY, UNLIMITED, StartGateway
from tests.helpers import bearer, url_for, ws_frames

SECRET = "ws-abuse-jwt-secret-0123456789abcdef"
JWT = {"algorithms": ["HS256"], "secret": SECRET, "audience": "gw", "leeway_s": 0}
BEARER = bearer(TEST_API_KEY)
WS = "/v1/stream/ws"


def token(exp_in_s: float) -> str:
    now = time.time()
    claims = {"sub": "carol", "aud": "gw", "iat": int(now), "exp": int(now + exp_in_s)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_a_message_flood_is_closed_with_1008_and_a_paced_client_is_not(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(streams={"ws_messages_per_s": 20, "ws_message_burst": 40})
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url_for(server, WS), headers=BEARER) as ws:
            for _ in range(200):
                await ws.send_str('{"type": 5}')
            codes = []
            while True:
                message = await ws.receive(timeout=5)
                if message.type is not aiohttp.WSMsgType.TEXT:
                    break
                codes.append(orjson.loads(message.data)["code"])
            assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008
            assert 30 <= len(codes) <= 60, "the burst is answered, the flood is not"
        # Within the rate, a socket lives on.
        async with session.ws_connect(url_for(server, WS), headers=BEARER) as ws:
            for index in range(10):
                body = {"prompt": "hi", "max_tokens": 2, "seed": index}
                await ws.send_json({"type": "generate", "request_id": f"r{index}", **body})
                assert (await ws_frames(ws, f"r{index}"))[-1]["type"] == "done"
                await asyncio.sleep(0.06)


async def test_open_sockets_per_principal_are_capped(start_gateway: StartGateway) -> None:
    server = await start_gateway(streams={"max_sockets_per_principal": 2})
    async with aiohttp.ClientSession() as session:
        first = await session.ws_connect(url_for(server, WS), headers=BEARER)
        second = await session.ws_connect(url_for(server, WS), headers=BEARER)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url_for(server, WS), headers=BEARER)
        assert refused.value.status == 429
        assert refused.value.headers is not None and refused.value.headers["Retry-After"] == "1"
        # Another principal (here: anonymous) is not affected.
        other = await session.ws_connect(url_for(server, WS))
        await other.close()
        await first.close()
        # A closed socket frees its place (the count drops when its handler ends).
        async with asyncio.timeout(3):
            while True:
                try:
                    third = await session.ws_connect(url_for(server, WS), headers=BEARER)
                    break
                except aiohttp.WSServerHandshakeError:
                    await asyncio.sleep(0.02)
        await third.close()
        await second.close()


async def test_an_expired_credential_starts_nothing_new_but_running_answers_finish(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(
        auth={"anonymous": False, "api_keys": [], "jwt": JWT},
        rate_limit={"default": UNLIMITED},
        models=[{"name": "sim-1", "provider": "simulated", "tokens_per_second": 40}],
    )
    headers = {"Authorization": f"Bearer {token(exp_in_s=1.5)}"}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url_for(server, WS), headers=headers) as ws:
            body = {"prompt": "a long one", "max_tokens": 100, "seed": 1}
            await ws.send_json({"type": "generate", "request_id": "before", **body})
            await asyncio.sleep(2.1)  # the JWT expires while "before" streams
            await ws.send_json({"type": "generate", "request_id": "after", "prompt": "hi"})
            refused = await ws_frames(ws, "after")
            assert refused == [
                {
                    "type": "error",
                    "request_id": "after",
                    "code": "unauthorized",
                    "message": refused[0]["message"],
                    "retryable": False,
                }
            ]
            assert "expired" in refused[0]["message"]
            finished = await ws_frames(ws, "before")
            assert finished[-1]["type"] == "done" and finished[-1]["finish_reason"] == "length"
