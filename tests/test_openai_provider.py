"""The `openai` provider through the whole gateway, against a fake upstream on a real socket.

Each test starts the real app with a model `provider: openai` whose
`base_url` is a `FakeUpstream` (tests/fake_upstream.py), drives one of the
transports as a client would, and checks both ends: what the client got and
what the upstream saw (requests, bodies, headers, when its connection closed).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import StartGateway
from tests.fake_upstream import (
    DEFAULT_TOKENS,
    Call,
    FakeUpstream,
    StartFakeUpstream,
    large_delta,
)
from tests.helpers import (
    SECRET,
    assert_well_formed,
    openai_model,
    read_ndjson,
    read_sse,
    text_of,
    token_texts,
    whole_deltas,
)
from tests.redis_server import free_port
from tests.sse_parser import SseParser
from tests.tool_helpers import (
    AUTH,
    SIM,
    Events,
    assistant_calls,
    direct,
    function_tool,
    post_chat,
    through,
)

TEXT = "".join(DEFAULT_TOKENS)
BODY: dict[str, Any] = {"model": "gpt", "prompt": "Say hello"}


async def gateway(
    start_gateway: StartGateway, *models: dict[str, Any], grace_s: float = 0
) -> TestServer:
    """The gateway serving `models` (the first is the default) and a simulated `sim-1`."""
    return await start_gateway(models=[*models, SIM], streams={"resume_grace_s": grace_s})


async def sdk_through_gateway(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> openai.AsyncOpenAI:
    """The official SDK, pointed at a gateway whose `gpt` is `fake_upstream`."""
    return through(await gateway(start_gateway, openai_model(fake_upstream.base_url)))


def now() -> float:
    return asyncio.get_running_loop().time()


# -- clients: each returns our event vocabulary ------------------------------


async def chunked(server: TestServer, body: dict[str, Any] = BODY) -> Events:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
            assert response.status == 200
            return await read_ndjson(response)


async def sse(server: TestServer, body: dict[str, Any] = BODY) -> Events:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/sse"), json=body) as response:
            assert response.status == 200
            return (await read_sse(response))[0]


async def websocket(server: TestServer, body: dict[str, Any] = BODY) -> Events:
    events: Events = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.make_url("/v1/stream/ws"), max_msg_size=0) as ws:
            await ws.send_json({"type": "generate", "request_id": "r1", **body})
            while not events or events[-1]["type"] not in {"done", "error"}:
                events.append(orjson.loads((await ws.receive()).data))
    assert {e["request_id"] for e in events} == {"r1"}
    return events


def chat_body(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    chat: dict[str, Any] = {
        "model": body["model"],
        "messages": [{"role": "user", "content": body["prompt"]}],
        "stream": stream,
    }
    if stream:
        chat["stream_options"] = {"include_usage": True}
    return chat


def chunks_as_events(parser: SseParser) -> Events:
    """OpenAI chunks as our events: content deltas are tokens, errors are `error` events."""
    events: Events = []
    finish, usage, done = None, None, False
    for frame in parser.events:
        assert not done, "a frame after [DONE]"
        if frame.data == "[DONE]":
            done = True
            continue
        chunk = orjson.loads(frame.data)
        if "error" in chunk:
            events.append({**chunk["error"], "type": "error"})
            continue
        assert chunk["object"] == "chat.completion.chunk"
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                events.append({"type": "reasoning", "text": delta["reasoning_content"]})
            if delta.get("content"):
                events.append({"type": "token", "text": delta["content"]})
            for call in delta.get("tool_calls") or ():
                function = call.get("function", {})
                fields = {"index": call["index"], "arguments": function.get("arguments", "")}
                if "id" in call:
                    fields |= {"id": call["id"], "name": function["name"]}
                events.append({"type": "tool_call", **fields})
            finish = choice["finish_reason"] or finish
        usage = chunk.get("usage") or usage
    if finish is not None:
        assert done, "finished without [DONE]"
        events.append({"type": "done", "finish_reason": finish, "usage": usage})
    return events


async def openai_stream(server: TestServer, body: dict[str, Any] = BODY) -> Events:
    url = server.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=chat_body(body, True), headers=AUTH) as response:
            assert response.status == 200, await response.text()
            parser = SseParser()
            async for data in response.content.iter_any():
                parser.feed(data)
    return chunks_as_events(parser)


async def openai_whole(server: TestServer, body: dict[str, Any] = BODY) -> Events:
    url = server.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=chat_body(body, False), headers=AUTH) as response:
            assert response.status == 200, await response.text()
            data = await response.json()
    assert data["object"] == "chat.completion"
    choice = data["choices"][0]
    return [
        {"type": "token", "text": choice["message"]["content"]},
        {"type": "done", "finish_reason": choice["finish_reason"], "usage": data["usage"]},
    ]


STREAMING = {"chunked": chunked, "sse": sse, "ws": websocket, "openai": openai_stream}
EVERY_TRANSPORT = {**STREAMING, "openai-whole": openai_whole}


# -- streaming the upstream's exact output ----------------------------------


@pytest.mark.parametrize("finish_reason", ["stop", "length", "content_filter"])
@pytest.mark.parametrize("transport", EVERY_TRANSPORT)
async def test_every_transport_streams_the_upstream_text_finish_and_usage(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str, finish_reason: str
) -> None:
    fake_upstream.finish_reason = finish_reason
    fake_upstream.completion_tokens = 42  # not what the gateway would estimate
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    events = await EVERY_TRANSPORT[transport](server)
    assert text_of(events) == TEXT
    if transport in {"chunked", "sse", "ws"}:
        assert_well_formed(events)
        assert whole_deltas(token_texts(events), DEFAULT_TOKENS)
    done = events[-1]
    assert done["type"] == "done" and done["finish_reason"] == finish_reason
    assert done["usage"] == {"prompt_tokens": 11, "completion_tokens": 42, "total_tokens": 53}
    assert len(fake_upstream.requests) == 1 and fake_upstream.requests[0].completed


@pytest.mark.parametrize("token_delay_s", [None, 0.01], ids=["back-to-back", "paced"])
async def test_streams_one_after_another_reuse_one_upstream_connection(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, token_delay_s: float | None
) -> None:
    """A connect (and, to a real upstream, a TLS handshake) per stream would
    cost every stream start; the answer's `[DONE]` comes before the body's end,
    so the connection is pooled once that end arrives."""
    fake_upstream.token_delay_s = token_delay_s
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    for _ in range(4):
        events = await EVERY_TRANSPORT["chunked"](server)
        assert events[-1]["type"] == "done"
        await asyncio.sleep(0.05)
    peers = {request.peer for request in fake_upstream.requests}
    assert len(fake_upstream.requests) == 4 and len(peers) == 1


@pytest.mark.parametrize("transport", EVERY_TRANSPORT)
async def test_a_stream_leaves_no_async_generator_to_the_garbage_collector(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> None:
    """An unclosed async generator is finalised by the GC through the loop's
    hook (`call_soon_threadsafe`, a wake-up and an `aclose` task): per stream,
    that is cost on the start path and `finally` blocks run at a random time."""
    finalised: list[str] = []
    firstiter, finalizer = sys.get_asyncgen_hooks()

    def record(agen: Any) -> None:
        finalised.append(agen.__qualname__)
        assert finalizer is not None
        finalizer(agen)

    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=record)
    try:
        for _ in range(3):
            events = await EVERY_TRANSPORT[transport](server)
            assert text_of(events) == TEXT
        gc.collect()
        await asyncio.sleep(0)
    finally:
        sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=finalizer)
    assert finalised == []


@pytest.mark.parametrize("transport", STREAMING)
async def test_the_first_token_of_a_long_read_goes_out_on_its_own(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> None:
    """A read that brings the first token with much more: the first token is its
    own event, written before the rest of the read is parsed (S1's added TTFT:
    parsing 63 more chunks first took 0.2 ms); the rest is still one event."""
    fake_upstream.tokens = [f"t{i} " for i in range(40)]
    fake_upstream.burst = True  # the whole answer in one write: one read
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    events = await STREAMING[transport](server)
    texts = token_texts(events)
    assert texts == ["t0 ", "".join(fake_upstream.tokens[1:])], texts
    assert events[-1]["type"] == "done"


@pytest.mark.parametrize("transport", STREAMING)
async def test_the_deltas_of_one_read_are_one_event_and_still_count_as_tokens(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> None:
    """A fast upstream packs many deltas into one read: they become one event (one
    encoding, one wake-up, one write), and the usage still counts every delta."""
    fake_upstream.tokens = [f"t{i} " for i in range(40)]
    fake_upstream.token_delay_s = None  # back to back: they share reads
    fake_upstream.send_usage = False  # the gateway counts the completion itself
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    events = await STREAMING[transport](server)
    texts = token_texts(events)
    assert whole_deltas(texts, fake_upstream.tokens)
    assert len(texts) < len(fake_upstream.tokens)
    assert events[-1]["usage"]["completion_tokens"] == 40


@pytest.mark.parametrize("transport", STREAMING)
async def test_a_very_large_delta_arrives_intact(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> None:
    big = large_delta(300_000)
    fake_upstream.tokens = ["<", big, ">"]
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    events = await STREAMING[transport](server)
    assert text_of(events) == f"<{big}>"
    assert events[-1]["type"] == "done"


@pytest.mark.parametrize(
    "knobs",
    [{"line_end": b"\r\n"}, {"fragment": True}, {"omit_done": True}, {"token_delay_s": 0.01}],
    ids=["crlf", "fragmented", "no-done-after-finish", "paced"],
)
async def test_wire_variants_of_real_servers_are_read(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, knobs: dict[str, Any]
) -> None:
    for name, value in knobs.items():
        setattr(fake_upstream, name, value)
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    events = await chunked(server)
    assert text_of(events) == TEXT
    assert events[-1]["type"] == "done" and events[-1]["usage"]["prompt_tokens"] == 11


async def test_usage_is_estimated_when_the_upstream_sends_none(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.send_usage = False
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    events = await chunked(server)
    assert text_of(events) == TEXT
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == len(DEFAULT_TOKENS)
    assert usage["prompt_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_the_official_sdk_streams_through_the_gateway(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.token_delay_s = 0.005
    async with await sdk_through_gateway(start_gateway, fake_upstream) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        deltas, finish, usage = [], None, None
        async for chunk in stream:
            for choice in chunk.choices:
                deltas.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        whole = await sdk.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}]
        )
    assert "".join(deltas) == TEXT and finish == "stop"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (11, 6)
    assert whole.choices[0].message.content == TEXT
    assert len(fake_upstream.requests) == 2


async def test_the_fake_speaks_the_wire_the_sdk_parses(fake_upstream: FakeUpstream) -> None:
    """The fake itself, read by the official SDK's typed parser: it is a faithful upstream."""
    async with direct(fake_upstream) as sdk:
        stream = await sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        models = [m.id async for m in sdk.models.list()]
        fake_upstream.fail_status, fake_upstream.fail_times = 429, 1
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(model="m", messages=[], stream=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert models == ["fake-model"]


# -- cancellation closes the upstream connection ----------------------------


async def read_until(response: aiohttp.ClientResponse, marker: bytes) -> None:
    buffer = b""
    while marker not in buffer:
        data = await response.content.readany()
        assert data, f"stream ended before {marker!r}"
        buffer += data


@pytest.mark.parametrize("before_first_token", [False, True], ids=["streaming", "thinking"])
@pytest.mark.parametrize("path", ["/v1/stream/chunked", "/v1/stream/sse"])
async def test_client_disconnect_closes_the_upstream_within_100_ms(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, path: str, before_first_token: bool
) -> None:
    fake_upstream.tokens, fake_upstream.token_delay_s = ["tok "] * 500, 0.01
    if before_first_token:
        fake_upstream.first_token_delay_s = 30
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, timeout_s=60))
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.make_url(path), json=BODY)
        await read_until(response, b"start" if before_first_token else b"tok ")
        await fake_upstream.wait_requests(1)
        gone_at = now()
        response.close()
    assert await fake_upstream.wait_closed() - gone_at < 0.1


@pytest.mark.parametrize("hold_headers", [False, True])
async def test_chat_completions_disconnect_closes_the_upstream_at_once_despite_a_grace(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, hold_headers: bool
) -> None:
    fake_upstream.tokens, fake_upstream.token_delay_s = ["tok "] * 500, 0.01
    fake_upstream.hold_headers = hold_headers
    fake_upstream.first_token_delay_s = 30 if hold_headers else 0
    model = openai_model(fake_upstream.base_url, timeout_s=60)
    server = await gateway(start_gateway, model, grace_s=30)
    url = server.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        request = session.post(url, json=chat_body(BODY, True), headers=AUTH)
        if hold_headers:  # the gateway holds its headers too: nothing to read yet
            pending = asyncio.ensure_future(request)
            await fake_upstream.wait_requests(1)
            await asyncio.sleep(0.02)
            gone_at = now()
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
        else:
            response = await request
            await read_until(response, b"tok ")
            gone_at = now()
            response.close()
    assert await fake_upstream.wait_closed() - gone_at < 0.1


async def test_websocket_cancel_and_socket_close_close_the_upstream_within_100_ms(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.tokens, fake_upstream.token_delay_s = ["tok "] * 500, 0.01
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, timeout_s=60))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
            await ws.send_json({"type": "generate", "request_id": "r1", **BODY})
            while (await ws.receive_json())["type"] != "token":
                pass
            await ws.send_json({"type": "generate", "request_id": "r2", **BODY})
            await fake_upstream.wait_requests(2)
            cancelled_at = now()
            await ws.send_json({"type": "cancel", "request_id": "r1"})
            r1_closed_at = await fake_upstream.wait_closed(0)
            while not (
                (frame := await ws.receive_json())["request_id"] == "r1" and frame["type"] == "done"
            ):
                pass
            assert frame["finish_reason"] == "cancelled"
            assert fake_upstream.requests[1].closed_at is None, "r2 streams on"
            left_at = now()
        # Leaving the socket (grace 0) closes the other generation's upstream.
        r2_closed_at = await fake_upstream.wait_closed(1)
    assert r1_closed_at - cancelled_at < 0.1
    assert r2_closed_at - left_at < 0.1


async def test_delete_closes_the_upstream_within_100_ms(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.tokens, fake_upstream.token_delay_s = ["tok "] * 500, 0.01
    model = openai_model(fake_upstream.base_url, timeout_s=60)
    server = await gateway(start_gateway, model, grace_s=30)  # detached, so only DELETE stops it
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/generations"), json=BODY) as created:
            generation_id = (await created.json())["id"]
        await fake_upstream.wait_requests(1)
        await asyncio.sleep(0.05)
        assert fake_upstream.requests[0].closed_at is None
        cancelled_at = now()
        async with session.delete(server.make_url(f"/v1/generations/{generation_id}")) as deleted:
            assert deleted.status == 204
    assert await fake_upstream.wait_closed() - cancelled_at < 0.1


async def test_within_the_grace_a_resume_keeps_the_one_upstream_request(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    tokens = [f"t{i} " for i in range(60)]
    fake_upstream.tokens, fake_upstream.token_delay_s = tokens, 0.005
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url), grace_s=0.3)
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.make_url("/v1/stream/chunked"), json=BODY)
        first = [orjson.loads(await response.content.readline()) for _ in range(3)]
        response.close()
        await asyncio.sleep(0.05)
        url = server.make_url(f"/v1/generations/{first[0]['generation_id']}/events")
        headers = {"Accept": "application/x-ndjson"}
        async with session.get(url, params={"after": "2"}, headers=headers) as resumed:
            rest = await read_ndjson(resumed)
    events = first + rest
    assert_well_formed(events)
    assert text_of(events) == "".join(tokens)
    assert len(fake_upstream.requests) == 1 and fake_upstream.requests[0].completed


async def test_after_the_grace_the_upstream_is_closed(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.tokens, fake_upstream.token_delay_s = ["tok "] * 500, 0.01
    model = openai_model(fake_upstream.base_url, timeout_s=60)
    server = await gateway(start_gateway, model, grace_s=0.3)
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.make_url("/v1/stream/chunked"), json=BODY)
        await read_until(response, b"tok ")
        gone_at = now()
        response.close()
    closed_at = await fake_upstream.wait_closed()
    assert 0.3 <= closed_at - gone_at < 0.4


# -- retries and fallbacks, before the first token ---------------------------


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retryable_statuses_are_retried_and_then_stream(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, status: int
) -> None:
    fake_upstream.fail_status, fake_upstream.fail_times, fake_upstream.retry_after = status, 2, "0"
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, max_retries=2))
    events = await chunked(server)
    assert_well_formed(events)
    assert text_of(events) == TEXT and events[-1]["type"] == "done"
    assert len(fake_upstream.requests) == 3
    bodies = [r.body for r in fake_upstream.requests]
    assert bodies[0] == bodies[1] == bodies[2]


async def test_retries_back_off_without_retry_after(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.fail_status, fake_upstream.fail_times = 503, 1
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, max_retries=1))
    assert text_of(await chunked(server)) == TEXT
    first, second = fake_upstream.requests
    assert 0.37 <= second.received_at - first.received_at < 0.65  # 0.5 s minus ≤25% jitter


@pytest.mark.parametrize(("retry_after", "wait_s"), [("1", 1.0), ("0.8", 0.8)])
async def test_retry_after_is_honoured(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, retry_after: str, wait_s: float
) -> None:
    """In seconds, fractional ones too; 0.8 s is longer than the first backoff
    (0.5 s at most), so a value that was ignored could not pass for one kept."""
    fake_upstream.fail_status, fake_upstream.fail_times = 429, 1
    fake_upstream.retry_after = retry_after
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, max_retries=1))
    assert text_of(await chunked(server)) == TEXT
    first, second = fake_upstream.requests
    assert wait_s <= second.received_at - first.received_at < wait_s + 0.3


async def test_a_second_upstream_takes_over_when_retries_are_spent(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, start_fake_upstream: StartFakeUpstream
) -> None:
    backup = await start_fake_upstream()
    backup.tokens = ["from ", "the ", "backup"]
    fake_upstream.fail_status, fake_upstream.fail_times, fake_upstream.retry_after = 503, 99, "0"
    primary = openai_model(fake_upstream.base_url, max_retries=2, fallbacks=["backup"])
    server = await gateway(start_gateway, primary, openai_model(backup.base_url, name="backup"))
    for transport in (chunked, openai_stream):
        events = await transport(server)
        assert text_of(events) == "from the backup" and events[-1]["type"] == "done"
    assert len(fake_upstream.requests) == 6  # 1 + 2 retries, for each of the two requests
    assert [r.body["model"] for r in backup.requests] == ["backup-upstream"] * 2


async def test_the_simulated_model_can_be_the_fallback(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.fail_status, fake_upstream.fail_times, fake_upstream.retry_after = 502, 99, "0"
    model = openai_model(fake_upstream.base_url, max_retries=1, fallbacks=["sim-1"])
    server = await gateway(start_gateway, model)
    events = await chunked(server, {**BODY, "max_tokens": 5})
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 5
    assert events[0]["model"] == "gpt"
    assert len(fake_upstream.requests) == 2


@pytest.mark.parametrize("transport", ["chunked", "sse", "ws"])
async def test_exhausted_retries_and_fallbacks_end_in_a_retryable_upstream_error(
    start_gateway: StartGateway,
    fake_upstream: FakeUpstream,
    start_fake_upstream: StartFakeUpstream,
    transport: str,
) -> None:
    backup = await start_fake_upstream()
    for fake in (fake_upstream, backup):
        fake.fail_status, fake.fail_times, fake.retry_after = 503, 99, "0"
    primary = openai_model(fake_upstream.base_url, max_retries=1, fallbacks=["backup"])
    backup_model = openai_model(backup.base_url, name="backup", max_retries=1)
    server = await gateway(start_gateway, primary, backup_model)
    events = await STREAMING[transport](server)
    assert_well_formed(events)
    assert [e["type"] for e in events] == ["start", "error"]
    assert events[-1]["code"] == "upstream_error" and events[-1]["retryable"] is True
    assert "503" in events[-1]["message"]
    assert (len(fake_upstream.requests), len(backup.requests)) == (2, 2)


@pytest.mark.parametrize(("upstream_status", "status"), [(503, 502), (429, 429)])
async def test_exhausted_retries_are_an_http_status_on_chat_completions(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, upstream_status: int, status: int
) -> None:
    fake_upstream.fail_status, fake_upstream.fail_times = upstream_status, 99
    fake_upstream.retry_after = "0"
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, max_retries=1))
    url = server.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        for stream in (True, False):
            async with session.post(url, json=chat_body(BODY, stream), headers=AUTH) as response:
                assert response.status == status
                error = (await response.json())["error"]
                assert error["code"] == "upstream_error"
                if status == 429:
                    assert response.headers["Retry-After"] == "0"
    assert len(fake_upstream.requests) == 4


async def test_the_sdk_sees_an_upstream_rate_limit_as_rate_limit_error(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.fail_status, fake_upstream.fail_times, fake_upstream.retry_after = 429, 99, "0"
    async with await sdk_through_gateway(start_gateway, fake_upstream) as sdk:
        with pytest.raises(openai.RateLimitError) as error:
            await sdk.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "hi"}], stream=True
            )
    assert error.value.code == "upstream_error"
    assert len(fake_upstream.requests) == 1


# -- refusals: not retried, named, and never leaking the key -----------------


@pytest.mark.parametrize(("status", "chat_status"), [(400, 400), (401, 502), (403, 502)])
async def test_refusals_are_not_retried_and_never_leak_the_key(
    start_gateway: StartGateway,
    fake_upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    status: int,
    chat_status: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_upstream.fail_status, fake_upstream.fail_times = status, 99
    fake_upstream.fail_message = (
        f"Incorrect API key provided: {SECRET}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."
    )
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, max_retries=3))
    events = await chunked(server)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "upstream_error"
    assert "'gpt'" in error["message"] and f"answered {status}" in error["message"]
    assert "127.0.0.1" not in error["message"]  # the model's name, never its URL
    assert len(fake_upstream.requests) == 1
    url = server.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=chat_body(BODY, True), headers=AUTH) as response:
            assert response.status == chat_status
            body = await response.text()
    assert len(fake_upstream.requests) == 2
    assert fake_upstream.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    for text in (error["message"], body, caplog.text):
        assert SECRET not in text and "secret-123456" not in text


async def test_an_upstream_refusing_our_key_falls_back_but_a_bad_request_does_not(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, start_fake_upstream: StartFakeUpstream
) -> None:
    backup = await start_fake_upstream()
    primary = openai_model(fake_upstream.base_url, max_retries=2, fallbacks=["backup"])
    server = await gateway(start_gateway, primary, openai_model(backup.base_url, name="backup"))
    fake_upstream.fail_status, fake_upstream.fail_times = 401, 99
    assert text_of(await chunked(server)) == TEXT
    assert (len(fake_upstream.requests), len(backup.requests)) == (1, 1)
    fake_upstream.fail_status = 400  # the same body would be refused anywhere
    events = await chunked(server)
    assert events[-1]["type"] == "error" and events[-1]["retryable"] is False
    assert (len(fake_upstream.requests), len(backup.requests)) == (2, 1)


# -- timeouts and connection failures ---------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [
        {"first_token_delay_s": 30},
        {"hang_after": 0},
        {"hold_headers": True, "first_token_delay_s": 30},
        {"first_token_delay_s": 30, "keepalive_s": 0.1},
    ],
    ids=["slow", "role-chunk-only", "no-headers", "comments-only"],
)
@pytest.mark.parametrize("transport", ["chunked", "ws"])
async def test_first_token_timeout(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, knobs: dict[str, Any], transport: str
) -> None:
    for name, value in knobs.items():
        setattr(fake_upstream, name, value)
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, timeout_s=0.5))
    began = now()
    events = await STREAMING[transport](server)
    assert 0.5 <= now() - began < 1.0
    assert [e["type"] for e in events] == ["start", "error"]
    assert events[-1]["code"] == "upstream_timeout" and events[-1]["retryable"] is True
    assert "0.5 s" in events[-1]["message"]
    # And the upstream request was closed. On a loaded machine the timeout can
    # fire before the fake's handler has even read the request (CI saw it once:
    # no request recorded); then the connection is gone before it was served.
    if fake_upstream.requests:
        await fake_upstream.wait_closed(timeout=0.2)


async def test_first_token_timeout_is_retried_and_is_504_on_chat_completions(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.first_token_delay_s = 30
    model = openai_model(fake_upstream.base_url, timeout_s=0.3, max_retries=1)
    server = await gateway(start_gateway, model)
    status, answer = await post_chat(server, chat_body(BODY, True))
    assert status == 504 and answer["error"]["code"] == "upstream_timeout"
    assert len(fake_upstream.requests) == 2
    assert all(r.closed_at is not None for r in fake_upstream.requests)


@pytest.mark.parametrize("transport", STREAMING)
async def test_idle_timeout_between_tokens(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> None:
    fake_upstream.hang_after = 2
    model = openai_model(fake_upstream.base_url, timeout_s=0.5, max_retries=2)
    server = await gateway(start_gateway, model)
    events = await STREAMING[transport](server)
    assert text_of(events) == "Hello"
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_timeout"
    assert len(fake_upstream.requests) == 1
    await fake_upstream.wait_closed(timeout=0.2)


async def test_a_slow_but_steady_upstream_is_not_timed_out(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """`timeout_s` bounds the wait for each token, not the whole answer."""
    fake_upstream.tokens, fake_upstream.token_delay_s = ["tok "] * 8, 0.1
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, timeout_s=0.4))
    events = await chunked(server)
    assert text_of(events) == "tok " * 8 and events[-1]["type"] == "done"


async def test_a_silence_late_in_a_followed_body_is_timed_out_on_time(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """Past the first read the body is read in the connection's callback, where
    the gateway, not aiohttp's per-read timer, bounds the silence: it is still
    `timeout_s` after the last byte, give or take a timer's delay."""
    fake_upstream.tokens, fake_upstream.token_delay_s = ["tok "] * 8, 0.1
    fake_upstream.hang_after = 6
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, timeout_s=0.4))
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/chunked"), json=BODY) as response:
            events, times = [], []
            async for line in response.content:
                events.append(orjson.loads(line))
                times.append(now())
    assert text_of(events) == "tok " * 6
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_timeout"
    silence = times[-1] - times[-2]
    assert 0.4 <= silence < 0.4 + 0.25, silence
    await fake_upstream.wait_closed(timeout=0.2)


async def test_a_closed_port_is_an_upstream_error_after_retries(
    start_gateway: StartGateway,
) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    server = await gateway(start_gateway, openai_model(base_url, max_retries=1))
    began = now()
    events = await chunked(server)
    assert now() - began >= 0.37  # one backoff: it was retried
    assert [e["type"] for e in events] == ["start", "error"]
    assert events[-1]["code"] == "upstream_error" and events[-1]["retryable"] is True
    assert "connection failed" in events[-1]["message"] and "127.0.0.1" not in events[-1]["message"]


async def test_clients_see_the_models_name_and_logs_the_url_without_its_credentials(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream URL names internal hosts and may carry a password: it is for
    operators (the log), never for clients (events, HTTP errors)."""
    caplog.set_level(logging.INFO)
    fake_upstream.fail_status, fake_upstream.fail_times = 400, 99
    base_url = fake_upstream.base_url.replace("http://", "http://ops:hunter2-secret@")
    server = await gateway(start_gateway, openai_model(base_url, api_key=None))
    events = await chunked(server)
    url = server.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=chat_body(BODY, True), headers=AUTH) as response:
            body = await response.text()
    host = fake_upstream.base_url.removeprefix("http://").split("/")[0]
    for seen_by_client in (events[-1]["message"], body):
        assert "'gpt'" in seen_by_client
        assert host not in seen_by_client and "hunter2" not in seen_by_client
    logged = [r for r in caplog.records if r.getMessage() == "upstream failed"]
    assert logged and all(vars(r)["upstream"] == fake_upstream.base_url for r in logged)
    assert "hunter2" not in caplog.text
    # The URL's credentials went to the upstream as Basic auth, not as part of the URL.
    sent = fake_upstream.requests[0].headers["Authorization"]
    assert sent == aiohttp.encode_basic_auth("ops", "hunter2-secret")


async def test_a_closed_port_falls_back(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    dead = openai_model(f"http://127.0.0.1:{free_port()}/v1", fallbacks=["live"])
    server = await gateway(start_gateway, dead, openai_model(fake_upstream.base_url, name="live"))
    assert text_of(await chunked(server)) == TEXT
    assert len(fake_upstream.requests) == 1


# -- failures after the first token: final, never retried -------------------

MID_STREAM = {
    "drop": {"drop_after": 2},
    "in-stream-error": {"error_after": 2},
    "malformed": {"malformed_after": 2},
    # Valid JSON of the wrong shape (a `delta` that is not an object).
    "wrong-shape": {"script": [{"content": "Hel"}, {"content": "lo"}, "x"]},
    "no-finish": {"omit_finish": True, "tokens": ["Hel", "lo"]},
    "no-finish-no-done": {"omit_finish": True, "omit_done": True, "tokens": ["Hel", "lo"]},
}


@pytest.mark.parametrize("failure", MID_STREAM)
@pytest.mark.parametrize("transport", STREAMING)
async def test_mid_stream_failures_deliver_the_tokens_then_an_error_and_are_not_retried(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, failure: str, transport: str
) -> None:
    for name, value in MID_STREAM[failure].items():
        setattr(fake_upstream, name, value)
    events, error = await two_tokens_then_an_error(start_gateway, fake_upstream, transport)
    if transport != "openai":  # OpenAI's error frame has no `retryable`
        assert_well_formed(events)
        assert error["retryable"] is True
    assert len(fake_upstream.requests) == 1


async def two_tokens_then_an_error(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> tuple[Events, dict[str, Any]]:
    """One stream from a model with retries and a fallback; its text is `Hel`, `lo`,
    then an `upstream_error`."""
    model = openai_model(fake_upstream.base_url, max_retries=3, fallbacks=["sim-1"])
    server = await gateway(start_gateway, model)
    events = await STREAMING[transport](server)
    assert whole_deltas(token_texts(events), ["Hel", "lo"])
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "upstream_error"
    return events, error


def tool_calls_of(events: Events) -> dict[int, dict[str, str]]:
    """The calls assembled from `tool_call` fragments, by index."""
    calls: dict[int, dict[str, str]] = {}
    for event in events:
        if event["type"] == "tool_call":
            call = calls.setdefault(event["index"], {"arguments": ""})
            for name in ("id", "name"):
                if name in event:
                    assert name not in call, f"{name} on a later fragment"
                    call[name] = event[name]
            call["arguments"] += event["arguments"]
    return calls


@pytest.mark.parametrize("transport", STREAMING)
async def test_text_then_a_tool_call_reach_every_transport_in_order(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> None:
    """The model writes, then calls a function: the client gets both, and a
    `tool_calls` finish that tells it to run the function (not `stop`)."""
    fake_upstream.tool_call_after = 2
    model = openai_model(fake_upstream.base_url, max_retries=3, fallbacks=["sim-1"])
    events = await STREAMING[transport](await gateway(start_gateway, model))
    assert [e["type"] for e in events[-4:]] == ["token", "tool_call", "tool_call", "done"]
    assert whole_deltas(token_texts(events), ["Hel", "lo"])
    call = {"id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'}
    assert tool_calls_of(events) == {0: call}
    assert events[-1]["finish_reason"] == "tool_calls"
    if transport != "openai":
        assert_well_formed(events)
    assert len(fake_upstream.requests) == 1


async def test_a_tool_call_before_any_text_streams_on_the_openai_route(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """It was a 502 while tool calls were not forwarded: now the SDK gets the call."""
    fake_upstream.tool_call_after = 0
    async with await sdk_through_gateway(start_gateway, fake_upstream) as sdk:
        hello = [{"role": "user", "content": "Say hello"}]
        answer = await sdk.chat.completions.create(model="gpt", messages=hello)  # type: ignore[arg-type]
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city":"Oslo"}'  # type: ignore[union-attr]


async def test_a_mid_stream_failure_fails_a_non_streaming_completion(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.drop_after = 2
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url, max_retries=2))
    status, answer = await post_chat(server, chat_body(BODY, False))
    assert status == 502 and answer["error"]["code"] == "upstream_error"
    assert len(fake_upstream.requests) == 1


async def test_an_in_stream_error_is_redacted_and_raised_by_the_sdk(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.error_after = 2
    fake_upstream.error_message = f"upstream exploded (key {SECRET})"
    deltas = []
    async with await sdk_through_gateway(start_gateway, fake_upstream) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError) as error:
            async for chunk in stream:
                deltas += [c.delta.content for c in chunk.choices if c.delta.content]
    assert whole_deltas(deltas, ["Hel", "lo"])
    assert "upstream exploded" in error.value.message
    assert SECRET not in error.value.message and "123456" not in error.value.message


# -- what reaches the upstream ------------------------------------------------


async def test_the_chat_body_reaches_the_upstream_with_unknown_fields_unchanged(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    headers = {"OpenAI-Organization": "org-test"}
    passthrough = ["logprobs", "top_logprobs", "user", "metadata"]
    model = openai_model(fake_upstream.base_url, headers=headers, passthrough=passthrough)
    server = await gateway(start_gateway, model)
    tools = [function_tool("get_weather", {"city": {"type": "string"}})]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        assistant_calls(Call("get_weather", '{"city":"Oslo"}', "c1")),
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ]
    unknown = {
        "tools": tools,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 2,
        "user": "user-7",
        "metadata": {"a": "b"},
        "logit_bias": {"50256": -100},
    }
    body = {
        "model": "gpt",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": False},
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n\n"],
        "max_tokens": 50,
        **unknown,
    }
    url = server.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url, json=body, headers={**AUTH, "X-Request-ID": "req-42"}
        ) as response:
            assert response.status == 200
            parser = SseParser()
            parser.feed(await response.read())
    assert not any('"usage":{' in e.data for e in parser.events), "the client asked for no usage"
    assert text_of(chunks_as_events(parser)) == TEXT
    (sent,) = fake_upstream.requests
    assert {k: sent.body[k] for k in unknown} == unknown
    assert sent.body["messages"] == messages
    assert sent.body["model"] == "gpt-upstream"
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert (sent.body["temperature"], sent.body["top_p"], sent.body["seed"]) == (0.2, 0.9, 7)
    assert (sent.body["stop"], sent.body["max_tokens"]) == (["\n\n"], 50)
    assert sent.headers["X-Request-ID"] == "req-42"
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"
    assert sent.headers["OpenAI-Organization"] == "org-test"


async def test_a_cookie_the_upstream_sets_for_one_caller_never_reaches_it_again(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """The gateway's one upstream session serves every caller: no cookie jar.

    By host name: aiohttp's default jar ignores cookies from IP addresses."""
    by_name = fake_upstream.base_url.replace("127.0.0.1", "localhost")
    assert by_name != fake_upstream.base_url
    server = await gateway(start_gateway, openai_model(by_name))
    fake_upstream.set_cookie = "alice-affinity"
    for _ in range(2):
        events = await STREAMING["chunked"](server)
        assert text_of(events) == TEXT
    first, second = fake_upstream.requests
    assert "Cookie" not in first.headers and "Cookie" not in second.headers


async def test_sampling_defaults_are_left_to_the_upstream(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """Unset `temperature`/`top_p` are not sent: reasoning models refuse any but their own."""
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    await openai_stream(server)
    await chunked(server)
    for sent in fake_upstream.requests:
        assert "temperature" not in sent.body and "top_p" not in sent.body
        assert "max_tokens" not in sent.body and "seed" not in sent.body


async def test_our_transports_send_the_prompt_and_the_request_id(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    server = await gateway(start_gateway, openai_model(fake_upstream.base_url))
    body = {**BODY, "max_tokens": 9, "temperature": 0.1, "seed": 3}
    async with aiohttp.ClientSession() as session:
        url = server.make_url("/v1/stream/chunked")
        async with session.post(url, json=body) as response:  # no X-Request-ID: one is made
            await response.read()
            made = response.headers["X-Request-ID"]
    (sent,) = fake_upstream.requests
    assert sent.headers["X-Request-ID"] == made
    assert sent.body["messages"] == [{"role": "user", "content": "Say hello"}]
    assert sent.body["model"] == "gpt-upstream" and sent.body["stream"] is True
    assert (sent.body["max_tokens"], sent.body["temperature"], sent.body["seed"]) == (9, 0.1, 3)
    assert sent.body["stream_options"] == {"include_usage": True}
