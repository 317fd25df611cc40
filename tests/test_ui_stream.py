"""The UI message stream route on the wire: chunks, headers, errors, resume and stop.

The AI SDK's own client runs against the same route in tests/test_ai_sdk.py;
here the bytes are checked directly: every chunk in the order the SDK's
`processUIMessageStream` needs (a delta only inside its part's start and
end), the answer's text exactly the generation's, HTTP errors in the
contract's shape, and a reader that is not keeping up (so that the
generation's synchronous pushes are refused and the events re-sent the
usual way) still getting a well-formed stream.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import TEST_API_KEY, TEST_KEY_CONFIG, UNLIMITED, StartGateway
from tests.fake_upstream import (
    Call,
    FakeUpstream,
    large_delta,
    reasoning_deltas,
    text_deltas,
    tool_call_deltas,
)
from tests.helpers import (
    bearer,
    connect_with_small_window,
    fetch,
    ndjson_events,
    openai_model,
    scrape_value,
    text_of,
)

Chunks = list[dict[str, Any]]
SLOW = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 50, "first_token_ms": 10}
OTHER_KEY = "gw_other_key_for_the_ui_tests"


def ui_body(
    text: str = "Explain vector databases.", chat_id: str = "chat-1", **ours: Any
) -> dict[str, Any]:
    """What `DefaultChatTransport` posts, plus our request fields."""
    user = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}
    return {"id": chat_id, "messages": [user], "trigger": "submit-message", **ours}


def chunks_of(raw: bytes) -> tuple[Chunks, bool]:
    """The `data:` chunks of a UI message stream and whether it ended with `[DONE]`."""
    chunks: Chunks = []
    done = False
    for frame in raw.decode().split("\n\n"):
        lines = [line for line in frame.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), frame
        payload = lines[0].removeprefix("data: ")
        assert not done, "nothing may follow [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            chunks.append(orjson.loads(payload))
    return chunks, done


def check_parts(chunks: Chunks) -> dict[str, str]:
    """What the SDK would build, checking its rules; returns text and reasoning."""
    assert chunks[0]["type"] == "start"
    open_parts: dict[str, str] = {}
    built = {"text": "", "reasoning": ""}
    calls: dict[str, str] = {}
    for chunk in chunks[1:]:
        kind = chunk["type"]
        if kind in ("text-start", "reasoning-start"):
            assert chunk["id"] not in open_parts
            open_parts[chunk["id"]] = kind.split("-")[0]
        elif kind in ("text-delta", "reasoning-delta"):
            assert open_parts.get(chunk["id"]) == kind.split("-")[0], chunk
            built[kind.split("-")[0]] += chunk["delta"]
        elif kind in ("text-end", "reasoning-end"):
            assert open_parts.pop(chunk["id"]) == kind.split("-")[0]
        elif kind == "tool-input-start":
            calls[chunk["toolCallId"]] = ""
        elif kind == "tool-input-delta":
            calls[chunk["toolCallId"]] += chunk["inputTextDelta"]
        elif kind in ("tool-input-available", "tool-input-error"):
            arguments = calls.pop(chunk["toolCallId"])
            if kind == "tool-input-available":
                assert chunk["input"] == orjson.loads(arguments)
        elif kind in ("tool-output-available", "tool-output-error"):
            calls.pop(chunk["toolCallId"])  # a call rebuilt for a replay
        elif kind == "finish":
            assert not open_parts and not calls, "every part ends before the finish"
    return built


async def post_ui(
    server: TestServer, body: dict[str, Any], **headers: str
) -> tuple[int, Any, bytes]:
    return await fetch(server, "POST", "/v1/stream/ui", body=body, headers=headers or None)


async def generation_log(server: TestServer, generation_id: str) -> list[dict[str, Any]]:
    status, _, raw = await fetch(
        server,
        "GET",
        f"/v1/generations/{generation_id}/events",
        headers={"Accept": "application/x-ndjson"},
    )
    assert status == 200
    return ndjson_events(raw)


async def test_a_text_answer_is_the_sdk_chunk_sequence(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    status, headers, raw = await post_ui(server, ui_body(max_tokens=12))
    assert status == 200
    assert headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Accel-Buffering"] == "no"
    chunks, done = chunks_of(raw)
    assert done
    start = chunks[0]
    generation_id = start["messageId"]
    assert start["messageMetadata"] == {"generationId": generation_id, "model": "sim-1"}
    kinds = [c["type"] for c in chunks]
    assert kinds == [
        "start",
        "start-step",
        "text-start",
        *["text-delta"] * 12,
        "text-end",
        "finish-step",
        "finish",
    ]
    assert chunks[-1]["finishReason"] == "length"
    assert chunks[-1]["messageMetadata"]["usage"]["completion_tokens"] == 12
    built = check_parts(chunks)
    assert built["text"] == text_of(await generation_log(server, generation_id))


async def test_reasoning_and_tool_calls_from_an_openai_upstream(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    calls = [Call.of("get_weather", {"city": "Oslo"}), Call.of("get_time", {"tz": "Asia/Tokyo"})]
    fake_upstream.script = [
        *reasoning_deltas("Two ", "lookups."),
        *text_deltas("Let me ", "check. "),
        *tool_call_deltas(calls, role=False),
    ]
    fake_upstream.finish_reason = "tool_calls"
    server = await start_gateway(models=[openai_model(fake_upstream.base_url)])
    status, _, raw = await post_ui(server, ui_body(model="gpt"))
    assert status == 200
    chunks, done = chunks_of(raw)
    assert done
    built = check_parts(chunks)
    assert built == {"text": "Let me check. ", "reasoning": "Two lookups."}
    available = [c for c in chunks if c["type"] == "tool-input-available"]
    assert [(c["toolName"], c["input"]) for c in available] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "Asia/Tokyo"}),
    ]
    assert [c["toolCallId"] for c in available] == ["call_fake0", "call_fake1"]
    kinds = [c["type"] for c in chunks]
    assert kinds.index("reasoning-end") < kinds.index("text-start")
    assert kinds.index("text-end") < kinds.index("tool-input-start")
    assert chunks[-1] == {
        "type": "finish",
        "finishReason": "tool-calls",
        "messageMetadata": {"usage": chunks[-1]["messageMetadata"]["usage"]},
    }


async def test_arguments_that_are_not_json_are_a_tool_input_error(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script = tool_call_deltas([Call("get_weather", '{"city": "Os')])
    fake_upstream.finish_reason = "tool_calls"
    server = await start_gateway(models=[openai_model(fake_upstream.base_url)])
    _, _, raw = await post_ui(server, ui_body(model="gpt"))
    chunks, _ = chunks_of(raw)
    check_parts(chunks)
    (error,) = [c for c in chunks if c["type"].startswith("tool-input-") and "errorText" in c]
    assert error["type"] == "tool-input-error" and error["input"] == '{"city": "Os'
    assert not any(c["type"] == "tool-input-available" for c in chunks)


async def test_an_upstream_failure_is_an_error_chunk_never_a_finish(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.error_after = 2
    server = await start_gateway(models=[openai_model(fake_upstream.base_url)])
    status, _, raw = await post_ui(server, ui_body(model="gpt"))
    assert status == 200  # the headers went out with `start`
    chunks, done = chunks_of(raw)
    assert done
    assert chunks[-1]["type"] == "error" and "crashed" in chunks[-1]["errorText"]
    assert not any(c["type"] in ("finish", "finish-step") for c in chunks)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"messages": []}, "id"),
        (ui_body() | {"messages": "hi"}, "messages"),
        (ui_body() | {"trigger": "nonsense"}, "trigger"),
        (ui_body() | {"temperature": 9}, "temperature"),
        (ui_body() | {"colour": "blue"}, "colour"),
        (ui_body() | {"prompt": "hi"}, "prompt"),
        (ui_body() | {"id": "x" * 201}, "id"),
        (ui_body() | {"messages": [{"role": "user", "parts": [{"type": "data-x"}]}]}, "nothing"),
        (ui_body() | {"messages": [{"role": "robot", "parts": []}]}, "role"),
    ],
)
async def test_bad_requests_are_400_in_the_contract_shape(
    start_gateway: StartGateway, body: dict[str, Any], says: str
) -> None:
    server = await start_gateway()
    status, _, raw = await post_ui(server, body)
    assert status == 400, raw
    error = orjson.loads(raw)["error"]
    assert error["code"] == "invalid_request" and says in error["message"]


async def test_reconnect_replays_the_running_answer_then_follows_it(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(models=[SLOW], streams={"resume_grace_s": 5})
    async with aiohttp.ClientSession() as session:
        url = server.make_url("/v1/stream/ui")
        async with session.post(url, json=ui_body(max_tokens=40, chat_id="c-resume")) as response:
            seen = b""
            while seen.count(b'"text-delta"') < 3:
                seen += await response.content.readany()
        # The first connection is gone; the generation waits for a reader.
        status, headers, raw = await fetch(server, "GET", "/v1/stream/ui/c-resume/stream")
    assert status == 200 and headers["x-vercel-ai-ui-message-stream"] == "v1"
    chunks, done = chunks_of(raw)
    assert done and chunks[-1]["type"] == "finish"
    built = check_parts(chunks)
    log = await generation_log(server, chunks[0]["messageId"])
    assert built["text"] == text_of(log) and len(log) == 42
    # Finished: nothing to resume.
    status, _, _ = await fetch(server, "GET", "/v1/stream/ui/c-resume/stream")
    assert status == 204


async def test_a_replay_of_a_continued_answer_shows_the_earlier_steps_again(
    start_gateway: StartGateway,
) -> None:
    """A tool's output sent back continues the assistant message; a reconnect
    replays from `start`, on which the SDK rebuilds the message, so the
    steps before it come first (the call rebuilt without `tool-input-available`,
    which would run the app's `onToolCall` again)."""
    server = await start_gateway(models=[SLOW], streams={"resume_grace_s": 5})
    tool_part = {
        "type": "tool-get_weather",
        "toolCallId": "call_1",
        "state": "output-available",
        "input": {"city": "Oslo"},
        "output": {"celsius": 21},
    }
    earlier = [
        {"type": "step-start"},
        {"type": "reasoning", "text": "Weather first."},
        tool_part,
    ]
    body = ui_body("Weather in Oslo?", chat_id="c-cont", max_tokens=30) | {"messageId": "a1"}
    body["messages"].append({"id": "a1", "role": "assistant", "parts": earlier})
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/ui"), json=body) as response:
            live = b""
            while live.count(b'"text-delta"') < 2:
                live += await response.content.readany()
    live_chunks, _ = chunks_of(live)
    assert live_chunks[0]["messageId"] == "a1"
    assert live_chunks[1] == {"type": "start-step"}  # the live reader has the earlier parts
    status, _, raw = await fetch(server, "GET", "/v1/stream/ui/c-cont/stream")
    assert status == 200
    chunks, done = chunks_of(raw)
    assert done and chunks[0]["messageId"] == "a1"
    built = check_parts(chunks)
    assert built["reasoning"] == "Weather first."
    kinds = [c["type"] for c in chunks]
    assert kinds[:10] == [
        "start",
        "start-step",
        "reasoning-start",
        "reasoning-delta",
        "reasoning-end",
        "tool-input-start",
        "tool-input-delta",
        "tool-output-available",
        "finish-step",
        "start-step",
    ]
    assert "tool-input-available" not in kinds
    assert chunks[6]["inputTextDelta"] == '{"city":"Oslo"}'
    assert chunks[7] == {
        "type": "tool-output-available",
        "toolCallId": "call_1",
        "output": {"celsius": 21},
    }
    log = await generation_log(server, chunks[0]["messageMetadata"]["generationId"])
    assert built["text"] == text_of(log)


async def test_stop_cancels_only_the_callers_chat(start_gateway: StartGateway) -> None:
    other = {"id": "other", "sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest()}
    server = await start_gateway(
        models=[SLOW],
        streams={"resume_grace_s": 5},
        auth={
            "anonymous": False,
            "api_keys": [{**TEST_KEY_CONFIG, "limits": UNLIMITED}, {**other, "limits": UNLIMITED}],
        },
    )
    mine, theirs = bearer(TEST_API_KEY), bearer(OTHER_KEY)
    assert (await fetch(server, "GET", "/v1/stream/ui/c-stop/stream"))[0] == 401
    async with aiohttp.ClientSession(headers=mine) as session:
        url = server.make_url("/v1/stream/ui")
        async with session.post(url, json=ui_body(max_tokens=500, chat_id="c-stop")) as response:
            await response.content.readany()
            # Another principal's chat of the same id is not this one.
            for method in ("GET", "DELETE"):
                assert (await fetch(server, method, "/v1/stream/ui/c-stop/stream", headers=theirs))[
                    0
                ] == 204
            status, _, raw = await fetch(
                server, "DELETE", "/v1/stream/ui/c-stop/stream", headers=mine
            )
            assert status == 200
            stopped = orjson.loads(raw)
            assert stopped["cancelled"] is True
            rest = await asyncio.wait_for(response.read(), 5)
    chunks, done = chunks_of(rest)
    assert done and chunks[-1] == {
        "type": "finish",
        "finishReason": "other",
        "messageMetadata": chunks[-1]["messageMetadata"],
    }
    assert (await fetch(server, "GET", "/v1/stream/ui/c-stop/stream", headers=mine))[0] == 204
    assert (await fetch(server, "DELETE", "/v1/stream/ui/c-stop/stream", headers=mine))[0] == 204
    status, _, raw = await fetch(
        server, "GET", "/v1/stream/ui/" + "x" * 201 + "/stream", headers=mine
    )
    assert status == 400


def dechunk(raw: bytes) -> bytes:
    """The body of an HTTP/1.1 chunked response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return out


@pytest.mark.parametrize("shape", ["reasoning-then-text", "text-then-call"])
async def test_a_reader_that_falls_behind_still_gets_a_well_formed_stream(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, shape: str
) -> None:
    """The generation writes tokens to a caught-up reader synchronously; when
    the socket is full that push is refused and the events are written again
    the usual way. A part that opened in the refused push must open again.

    A tiny receive window, one delta bigger than the kernel takes, then the
    next part: its first event is pushed into a full buffer and refused.
    """
    big = large_delta(1_500_000)
    # A small first delta, so the reader is parked (caught up) when the big one comes.
    if shape == "reasoning-then-text":
        after = text_deltas("after", " the thinking")
        fake_upstream.script = [*text_deltas("Hi. "), *reasoning_deltas(big), *after]
    else:
        call = tool_call_deltas([Call.of("f", {"a": 1})], role=False)
        fake_upstream.script = [*text_deltas("Hi. ", big), *call]
        fake_upstream.finish_reason = "tool_calls"
    fake_upstream.token_delay_s = 0.05
    server = await start_gateway(models=[openai_model(fake_upstream.base_url)])
    reader, writer = await connect_with_small_window(server.host, server.port)
    body = orjson.dumps(ui_body(model="gpt"))
    writer.write(
        b"POST /v1/stream/ui HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await asyncio.sleep(1.0)  # fall behind while the upstream streams on
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    chunks, done = chunks_of(dechunk(raw))
    assert done
    built = check_parts(chunks)
    kinds = [c["type"] for c in chunks]
    if shape == "reasoning-then-text":
        assert built == {"reasoning": big, "text": "Hi. after the thinking"}
        assert kinds.count("reasoning-start") == 1 and kinds.count("text-start") == 2
    else:
        assert built == {"reasoning": "", "text": "Hi. " + big}
        assert kinds.count("tool-input-start") == kinds.count("tool-input-available") == 1


async def test_ui_streams_are_counted_under_their_own_transport(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway()
    await post_ui(server, ui_body(max_tokens=3))
    _, _, raw = await fetch(server, "GET", "/metrics")
    scrape = raw.decode()
    assert scrape_value(scrape, "gateway_streams_total", transport="ui") == 1
