"""The openai provider against a fake OpenAI-compatible upstream on a real socket."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import TEST_API_KEY, StartGateway
from tests.fake_openai import FakeOpenAI
from tests.helpers import read_ndjson, read_sse, text_of

SECRET = "sk-test-secret-1234567890"
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
BODY = {"model": "gpt", "prompt": "Say hello"}


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[FakeOpenAI, str]:
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("/v1"))


def openai_model(base_url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "gpt",
        "provider": "openai",
        "base_url": base_url,
        "api_key": SECRET,
        "upstream_model": "fake-model",
        "timeout_s": 2,
        "max_retries": 0,
        **overrides,
    }


SIM = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 2000, "first_token_ms": 0}


async def gateway(
    start_gateway: StartGateway, base_url: str, grace_s: float = 0, **model: Any
) -> TestServer:
    return await start_gateway(
        models=[openai_model(base_url, **model), SIM], streams={"resume_grace_s": grace_s}
    )


async def chunked(server: TestServer, body: dict[str, Any] = BODY) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
            assert response.status == 200
            return await read_ndjson(response)


async def websocket(server: TestServer, body: dict[str, Any] = BODY) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
            await ws.send_json({"type": "generate", "request_id": "r", **body})
            while not events or events[-1]["type"] not in {"done", "error"}:
                events.append(orjson.loads((await ws.receive()).data))
    return events


async def sse(server: TestServer, body: dict[str, Any] = BODY) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/sse"), json=body) as response:
            return (await read_sse(response))[0]


TRANSPORTS = {"chunked": chunked, "sse": sse, "ws": websocket}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_transport_streams_the_upstream(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str], transport: str
) -> None:
    fake, base_url = upstream
    server = await gateway(start_gateway, base_url)
    events = await TRANSPORTS[transport](server)
    assert text_of(events) == "Hello, world!"
    done = events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert len(fake.requests) == 1


async def test_chat_completions_and_the_sdk_stream_the_upstream(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    fake.finish_reason = "length"
    server = await gateway(start_gateway, base_url)
    sdk = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=TEST_API_KEY)
    try:
        stream = await sdk.chat.completions.create(
            model="gpt",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = "", None, None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        assert (text, finish) == ("Hello, world!", "length")
        assert usage is not None and usage.completion_tokens == 5
        whole = await sdk.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}]
        )
        assert whole.choices[0].message.content == "Hello, world!"
    finally:
        await sdk.close()


async def wait_closed(fake: FakeOpenAI, timeout: float = 2.0) -> float:
    deadline = time.monotonic() + timeout
    while fake.requests[-1].closed_at is None:
        assert time.monotonic() < deadline, "the upstream connection was never closed"
        await asyncio.sleep(0.002)
    closed_at = fake.requests[-1].closed_at
    assert closed_at is not None
    return closed_at


async def test_client_disconnect_closes_the_upstream_connection_within_100_ms(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    fake.tokens, fake.token_delay_s = ["tok "] * 200, 0.02
    server = await gateway(start_gateway, base_url)
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.make_url("/v1/stream/chunked"), json=BODY)
        while b'"token"' not in await response.content.readline():
            pass
        gone_at = time.monotonic()
        response.close()
    assert await wait_closed(fake) - gone_at < 0.1


async def test_delete_closes_the_upstream_connection_within_100_ms(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    fake.tokens, fake.token_delay_s = ["tok "] * 200, 0.02
    server = await gateway(start_gateway, base_url, grace_s=30)  # detached: nobody attached
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/generations"), json=BODY) as created:
            generation_id = (await created.json())["id"]
        await asyncio.sleep(0.1)
        cancelled_at = time.monotonic()
        url = server.make_url(f"/v1/generations/{generation_id}")
        async with session.delete(url) as deleted:
            assert deleted.status == 204
    assert await wait_closed(fake) - cancelled_at < 0.1


async def test_retryable_statuses_are_retried_before_the_first_token(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    fake.fail_status, fake.fail_times, fake.retry_after = 503, 2, "0"
    server = await gateway(start_gateway, base_url, max_retries=2)
    events = await chunked(server)
    assert text_of(events) == "Hello, world!"
    assert len(fake.requests) == 3


async def test_retry_after_is_honoured(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    fake.fail_status, fake.fail_times, fake.retry_after = 429, 1, "0.4"
    server = await gateway(start_gateway, base_url, max_retries=1)
    started = time.monotonic()
    events = await chunked(server)
    assert text_of(events) == "Hello, world!"
    assert time.monotonic() - started >= 0.4


async def test_fallback_model_takes_over_when_retries_are_spent(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    fake.fail_status, fake.fail_times, fake.retry_after = 500, 100, "0"
    server = await gateway(start_gateway, base_url, max_retries=1, fallbacks=["sim-1"])
    events = await chunked(server, {**BODY, "max_tokens": 5})
    assert events[-1]["type"] == "done"
    assert len(text_of(events)) > 0
    assert len(fake.requests) == 2  # one try and one retry, then the simulated model


async def test_exhausted_retries_end_in_a_retryable_upstream_error(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    fake.fail_status, fake.fail_times, fake.retry_after = 502, 100, "0"
    server = await gateway(start_gateway, base_url, max_retries=1)
    events = await chunked(server)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "upstream_error"
    assert error["retryable"] is True
    assert len(fake.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_refusals_are_not_retried_and_never_leak_the_key(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str], status: int
) -> None:
    fake, base_url = upstream
    fake.fail_status, fake.fail_times = status, 100
    fake.fail_message = f"Incorrect API key provided: {SECRET}"
    server = await gateway(start_gateway, base_url, max_retries=3)
    events = await chunked(server)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "upstream_error"
    assert "'gpt'" in error["message"] and str(status) in error["message"]
    assert SECRET not in error["message"] and "1234567890" not in error["message"]
    assert len(fake.requests) == 1


async def test_the_key_and_request_id_and_unknown_fields_reach_the_upstream(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    server = await gateway(start_gateway, base_url, passthrough=["logprobs"])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {
        "model": "gpt",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "tools": tools,
        "response_format": {"type": "json_object"},
        "logprobs": True,
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/chat/completions"),
            json=body,
            headers={**AUTH, "X-Request-ID": "req-42"},
        ) as response:
            assert response.status == 200
            await response.read()
    sent = fake.requests[0]
    assert sent.body["tools"] == tools
    assert sent.body["response_format"] == {"type": "json_object"}
    assert sent.body["logprobs"] is True
    assert sent.body["model"] == "fake-model"
    assert sent.body["stream"] is True and sent.body["stream_options"]["include_usage"] is True
    assert sent.headers["X-Request-ID"] == "req-42"
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"


async def test_first_token_timeout(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    fake.first_token_delay_s = 5
    server = await gateway(start_gateway, base_url, timeout_s=0.3)
    events = await chunked(server)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_timeout"
    assert text_of(events) == ""


async def test_idle_timeout_between_tokens(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake, base_url = upstream
    fake.hang_after = 2
    server = await gateway(start_gateway, base_url, timeout_s=0.3)
    events = await chunked(server)
    assert text_of(events) == "Hello,"
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_timeout"


async def test_an_unreachable_upstream_is_an_upstream_error(start_gateway: StartGateway) -> None:
    from tests.redis_server import free_port

    server = await gateway(start_gateway, f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    events = await chunked(server)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_error"
    assert "connection failed" in events[-1]["message"]


@pytest.mark.parametrize("failure", ["drop_after", "error_after", "malformed_after", "omit_finish"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_mid_stream_failures_end_in_an_error_event_and_are_not_retried(
    start_gateway: StartGateway, upstream: tuple[FakeOpenAI, str], failure: str, transport: str
) -> None:
    fake, base_url = upstream
    setattr(fake, failure, True if failure == "omit_finish" else 2)
    server = await gateway(start_gateway, base_url, max_retries=3, fallbacks=["sim-1"])
    events = await TRANSPORTS[transport](server)
    assert text_of(events) == ("Hello, world!" if failure == "omit_finish" else "Hello,")
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "upstream_error"
    assert error["retryable"] is True
    assert len(fake.requests) == 1
