"""The official openai SDK, sync and async, as a client of /v1/chat/completions."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.keys import registry_key
from tests.conftest import FAST_MODEL, TEST_API_KEY, TEST_KEY_CONFIG, StartGateway
from tests.helpers import stream, text_of

MESSAGES = [{"role": "user", "content": "Explain vector databases."}]


async def reference_text(server: TestServer, max_tokens: int, seed: int) -> str:
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "seed": seed}
    return text_of((await stream(server, "chunked", body)).events)


def client(server: TestServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key=TEST_API_KEY, max_retries=0
    )


async def test_async_streaming_with_usage(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    sdk = client(server)
    try:
        stream = await sdk.chat.completions.create(
            model="sim-1",
            messages=MESSAGES,
            stream=True,
            max_tokens=30,
            seed=5,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await sdk.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == await reference_text(server, 30, 5)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.object == "chat.completion.chunk" and c.model == "sim-1" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


async def test_async_non_streaming(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    sdk = client(server)
    try:
        completion = await sdk.chat.completions.create(
            model="sim-1", messages=MESSAGES, max_tokens=12, seed=9
        )
    finally:
        await sdk.close()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == await reference_text(server, 12, 9)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 12


async def test_sync_client_streaming_and_not(start_gateway: StartGateway) -> None:
    server = await start_gateway()

    def run() -> tuple[str, str]:
        with openai.OpenAI(base_url=str(server.make_url("/v1")), api_key=TEST_API_KEY) as sdk:
            stream = sdk.chat.completions.create(
                model="sim-1", messages=MESSAGES, stream=True, max_tokens=10, seed=2
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            whole = (
                sdk.chat.completions.create(model="sim-1", messages=MESSAGES, max_tokens=10, seed=2)
                .choices[0]
                .message.content
            )
            return streamed, whole or ""

    streamed, whole = await asyncio.to_thread(run)
    assert streamed == whole == await reference_text(server, 10, 2)


async def test_models_list(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    sdk = client(server)
    try:
        models = [m.id async for m in sdk.models.list()]
    finally:
        await sdk.close()
    assert models == ["sim-1"]


@pytest.mark.parametrize(
    ("kwargs", "exception"),
    [
        ({"model": "nope"}, openai.NotFoundError),
        ({"model": "sim-1", "max_tokens": -3}, openai.BadRequestError),
        ({"model": "sim-1", "n": 2}, openai.BadRequestError),
        ({"model": "sim-1", "temperature": 7}, openai.BadRequestError),
    ],
)
async def test_sdk_exception_types(start_gateway: StartGateway, kwargs, exception) -> None:
    server = await start_gateway()
    sdk = client(server)
    try:
        with pytest.raises(exception):
            await sdk.chat.completions.create(messages=MESSAGES, stream=True, **kwargs)
    finally:
        await sdk.close()


async def test_mid_stream_failure_raises_api_error(start_gateway: StartGateway) -> None:
    model = {**FAST_MODEL, "tokens_per_second": 5000, "first_token_ms": 0, "fail_after_tokens": 3}
    server = await start_gateway(models=[model])
    sdk = client(server)
    received = []
    try:
        stream = await sdk.chat.completions.create(model="sim-1", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError, match="simulated upstream failure"):
            async for chunk in stream:
                received.append(chunk)
    finally:
        await sdk.close()
    assert sum(1 for c in received if c.choices and c.choices[0].delta.content) == 3


async def test_failure_before_first_token_is_an_http_status(start_gateway: StartGateway) -> None:
    model = {"name": "sim-1", "provider": "simulated", "first_token_ms": 0, "fail_after_tokens": 0}
    server = await start_gateway(models=[model])
    sdk = client(server)
    try:
        with pytest.raises(openai.InternalServerError) as error:
            await sdk.chat.completions.create(model="sim-1", messages=MESSAGES, stream=True)
    finally:
        await sdk.close()
    assert error.value.status_code == 502


async def test_content_parts_and_unknown_fields_are_accepted(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    body = {
        "model": "sim-1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Explain vector databases."}]},
        ],
        "max_completion_tokens": 4,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "text"},
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/chat/completions"), json=body) as response:
            assert response.status == 200
            data = await response.json()
    assert data["usage"]["completion_tokens"] == 4


async def test_disconnect_cancels_at_once_even_with_a_grace(start_gateway: StartGateway) -> None:
    model = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 20, "first_token_ms": 0}
    server = await start_gateway(models=[model], streams={"resume_grace_s": 30})
    sdk = client(server)
    try:
        stream = await sdk.chat.completions.create(model="sim-1", messages=MESSAGES, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.close()
    finally:
        await sdk.close()
    registry = server.app[registry_key]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1
    while registry.running and loop.time() < deadline:
        await asyncio.sleep(0.005)
    assert registry.running == 0


async def test_sdk_sees_a_wrong_key_as_authentication_error(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    sdk = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="sk-wrong", max_retries=0
    )
    try:
        with pytest.raises(openai.AuthenticationError) as error:
            await sdk.chat.completions.create(model="sim-1", messages=MESSAGES, stream=True)
        assert error.value.status_code == 401
        assert error.value.code == "unauthorized"
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()
    finally:
        await sdk.close()


async def test_sdk_sees_a_rate_limit_as_rate_limit_error(start_gateway: StartGateway) -> None:
    one_per_minute = {"requests_per_minute": 1, "tokens_per_minute": 0, "concurrent_streams": 0}
    server = await start_gateway(
        auth={"anonymous": True, "api_keys": [{**TEST_KEY_CONFIG, "limits": one_per_minute}]}
    )
    sdk = client(server)
    try:
        await sdk.chat.completions.create(model="sim-1", messages=MESSAGES, max_tokens=3)
        with pytest.raises(openai.RateLimitError) as error:
            await sdk.chat.completions.create(model="sim-1", messages=MESSAGES, max_tokens=3)
        assert error.value.code == "rate_limited"
        assert int(error.value.response.headers["Retry-After"]) >= 1
    finally:
        await sdk.close()
