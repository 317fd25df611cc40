"""`reasoning` and `tool_call` events on our own transports.

NDJSON, SSE POST, WebSocket `generate`, and `POST /v1/generations` read back
as SSE and as NDJSON, from the fake upstream (OpenAI's wire) and from the
simulated model (`reasoning_tokens`, `tool_choice`). They share the one seq
with tokens, so resume works in the middle of a call's arguments, on one
replica and, with the Redis backend, on another. Request validation of the
chat shapes is a 400 on every route (an `error` frame on the WebSocket).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import StartGateway
from tests.fake_upstream import (
    Call,
    FakeUpstream,
    reasoning_deltas,
    text_deltas,
    tool_call_deltas,
)
from tests.helpers import assert_well_formed, read_ndjson, read_sse, text_of
from tests.redis_server import RedisProcess
from tests.tool_helpers import (
    OSLO,
    SIM,
    TOKYO_TIME,
    TOOLS,
    WEATHER_TOOL,
    Events,
    assistant_calls,
    calls_from_events,
    function_tool,
    gateway,
    parsed,
    strip,
)

USER = [{"role": "user", "content": "What's the weather in Oslo, and the time in Tokyo?"}]
THINKING = ("Two ", "lookups: ", "weather, then time.")
THINKER = {**SIM, "reasoning_tokens": 4}

BOOK_TRIP = function_tool(
    "book_trip",
    {
        "destination": {"type": "string"},
        "cabin": {"type": "string", "enum": ["economy", "business"]},
        "nights": {"type": "integer", "minimum": 3},
        "travellers": {"type": "integer"},
        "budget": {"type": "number", "minimum": 99.5},
        "refundable": {"type": "boolean"},
        "stops": {"type": "array", "items": {"type": "string"}},
        "contact": {
            "type": "object",
            "properties": {
                "email": {"type": "string"},
                "phone": {"type": "string"},
                "age": {"type": "integer", "minimum": 18},
            },
            "required": ["email", "age"],
        },
        "note": {"type": "string"},
    },
    required=[
        "destination",
        "cabin",
        "nights",
        "travellers",
        "budget",
        "refundable",
        "stops",
        "contact",
    ],
)


# -- clients: each returns the events of one generation ---------------------------


async def chunked(server: TestServer, body: dict[str, Any]) -> Events:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
            assert response.status == 200, await response.text()
            return await read_ndjson(response)


async def sse(server: TestServer, body: dict[str, Any]) -> Events:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/sse"), json=body) as response:
            assert response.status == 200, await response.text()
            events, parser = await read_sse(response)
    ids = [e.id for e in parser.events]
    assert ids == [f"{events[0]['generation_id']}:{e['seq']}" for e in events]
    assert [e.event for e in parser.events] == [e["type"] for e in events]
    return events


async def websocket(server: TestServer, body: dict[str, Any]) -> Events:
    events: Events = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
            await ws.send_json({"type": "generate", "request_id": "r1", **body})
            while not events or events[-1]["type"] not in {"done", "error"}:
                events.append(await ws.receive_json(timeout=5))
    assert {e["request_id"] for e in events} == {"r1"}
    return [strip(e) for e in events]


async def create(server: TestServer, body: dict[str, Any]) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/generations"), json=body) as response:
            assert response.status == 201, await response.text()
            return str((await response.json())["events_url"])


async def generations_sse(server: TestServer, body: dict[str, Any]) -> Events:
    url = await create(server, body)
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url(url)) as response:
            return (await read_sse(response))[0]


async def generations_ndjson(server: TestServer, body: dict[str, Any]) -> Events:
    url = await create(server, body)
    async with aiohttp.ClientSession() as session:
        accept = {"Accept": "application/x-ndjson"}
        async with session.get(server.make_url(url), headers=accept) as response:
            return await read_ndjson(response)


Client = Callable[[TestServer, dict[str, Any]], Awaitable[Events]]
TRANSPORTS: dict[str, Client] = {
    "chunked": chunked,
    "sse": sse,
    "ws": websocket,
    "generations-sse": generations_sse,
    "generations-ndjson": generations_ndjson,
}


def reasoning_text(events: Events) -> str:
    return "".join(e["text"] for e in events if e["type"] == "reasoning")


def assert_thinks_then_calls(events: Events) -> None:
    """Well formed; start, reasoning, then tool calls, then `done` with `tool_calls`."""
    assert_well_formed(events)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start"
    middle = kinds[1:-1]
    assert set(middle) == {"reasoning", "tool_call"}, kinds
    assert middle == sorted(middle, key=["reasoning", "tool_call"].index), kinds
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "tool_calls"
    for event in events:
        if event["type"] == "reasoning":
            assert isinstance(event["text"], str) and event["text"], event


def scripted(fake: FakeUpstream, *, pieces: int = 3) -> None:
    fake.script = reasoning_deltas(*THINKING, style="vllm") + tool_call_deltas(
        [OSLO, TOKYO_TIME], role=False, pieces=pieces
    )
    fake.finish_reason = "tool_calls"


# -- every transport, both sources ----------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_upstream_reasoning_and_parallel_tool_calls_on_every_transport(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> None:
    scripted(fake_upstream)
    server = await gateway(start_gateway, fake_upstream, resume_grace_s=5)
    events = await TRANSPORTS[transport](server, {"model": "gpt", "messages": USER, "tools": TOOLS})
    assert_thinks_then_calls(events)
    assert reasoning_text(events) == "".join(THINKING)
    calls = calls_from_events(events)
    assert [(c["id"], c["name"], c["arguments"]) for c in calls.values()] == [
        (OSLO.id, OSLO.name, OSLO.arguments),
        (TOKYO_TIME.id, TOKYO_TIME.name, TOKYO_TIME.arguments),
    ]
    assert sorted(calls) == [0, 1]
    assert text_of(events) == ""


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_simulated_reasoning_and_required_tool_call_on_every_transport(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> None:
    server = await gateway(start_gateway, fake_upstream, sim=THINKER, resume_grace_s=5)
    body = {
        "model": "sim-1",
        "messages": [{"role": "user", "content": "Plan a weekend trip."}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "seed": 3,
    }
    events = await TRANSPORTS[transport](server, body)
    assert_thinks_then_calls(events)
    assert sum(e["type"] == "reasoning" for e in events) == 4
    ((name, arguments),) = parsed(calls_from_events(events))
    assert name == "get_weather"
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and arguments["city"]
    assert calls_from_events(events)[0]["id"].startswith("call_")


async def test_the_simulated_model_is_deterministic_for_a_seed(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    server = await gateway(start_gateway, fake_upstream, sim=THINKER)
    body = {"model": "sim-1", "prompt": "Book me a trip.", "tools": [BOOK_TRIP], "seed": 9}
    body["tool_choice"] = "required"
    first, second = await chunked(server, body), await chunked(server, body)
    assert [strip_ids(e) for e in first[1:]] == [strip_ids(e) for e in second[1:]]


def strip_ids(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("generation_id", "created")}


async def test_a_call_without_an_upstream_id_gets_one_on_our_transports(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """A client answers a call with `tool_call_id`: every call needs an id."""
    fake_upstream.script = tool_call_deltas([OSLO, TOKYO_TIME], ids=False)
    fake_upstream.finish_reason = "tool_calls"
    server = await gateway(start_gateway, fake_upstream)
    events = await chunked(server, {"model": "gpt", "messages": USER, "tools": TOOLS})
    assert_well_formed(events)
    calls = calls_from_events(events)
    ids = [call["id"] for call in calls.values()]
    assert all(i.startswith("call_") and len(i) > 5 for i in ids) and len(set(ids)) == 2, ids
    assert parsed(calls) == [
        ("get_weather", {"city": "Oslo", "unit": "celsius"}),
        ("get_time", {"timezone": "Asia/Tokyo"}),
    ]


# -- the simulated model's choices ---------------------------------------------------


async def test_simulated_arguments_fill_the_schemas_required_properties(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    server = await gateway(start_gateway, fake_upstream)
    body = {
        "model": "sim-1",
        "prompt": "I need a holiday somewhere warm.",
        "tools": [WEATHER_TOOL, BOOK_TRIP],
        "tool_choice": {"type": "function", "function": {"name": "book_trip"}},
    }
    events = await chunked(server, body)
    assert_well_formed(events)
    assert events[-1]["finish_reason"] == "tool_calls"
    ((name, arguments),) = parsed(calls_from_events(events))
    assert name == "book_trip"
    destination, email = arguments.pop("destination"), arguments["contact"].pop("email")
    assert isinstance(destination, str) and destination
    assert isinstance(email, str) and email
    assert arguments == {
        "cabin": "economy",
        "nights": 3,
        "travellers": 1,
        "budget": 99.5,
        "refundable": True,
        "stops": [],
        "contact": {"age": 18},
    }


AUTO_CASES = {
    "mentions-a-word-of-the-name": ("Is the weather nice in Oslo today?", ["get_weather"]),
    "mentions-the-name": ("Please call get_time for me.", ["get_time"]),
    "mentions-nothing": ("Tell me a story about a lighthouse.", []),
    "a-short-word-is-no-mention": ("Can you get me a poem?", []),
}


@pytest.mark.parametrize(("prompt", "expected"), AUTO_CASES.values(), ids=AUTO_CASES)
async def test_simulated_auto_calls_a_tool_only_when_the_user_mentions_it(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, prompt: str, expected: list[str]
) -> None:
    server = await gateway(start_gateway, fake_upstream)
    body = {"model": "sim-1", "prompt": prompt, "tools": TOOLS, "tool_choice": "auto"}
    events = await chunked(server, body)
    assert_well_formed(events)
    assert [name for name, _ in parsed(calls_from_events(events))] == expected
    if expected:
        assert events[-1]["finish_reason"] == "tool_calls" and text_of(events) == ""
    else:
        assert events[-1]["finish_reason"] == "stop" and text_of(events)


async def test_simulated_tool_choice_none_answers_in_text(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    server = await gateway(start_gateway, fake_upstream)
    body = {"model": "sim-1", "prompt": "What's the weather?", "tools": TOOLS}
    events = await chunked(server, {**body, "tool_choice": "none"})
    assert not calls_from_events(events) and events[-1]["finish_reason"] == "stop"


async def test_simulated_answers_in_text_from_a_tool_result(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    server = await gateway(start_gateway, fake_upstream, sim=THINKER)
    messages = [
        {"role": "user", "content": "Is the weather nice in Oslo?"},
        assistant_calls(Call("get_weather", '{"city":"Oslo"}', "call_1")),
        {"role": "tool", "tool_call_id": "call_1", "content": "14 degrees and sunny"},
    ]
    body = {"model": "sim-1", "messages": messages, "tools": TOOLS, "tool_choice": "auto"}
    events = await websocket(server, body)
    assert_well_formed(events)
    assert not calls_from_events(events)
    assert events[-1]["finish_reason"] == "stop"
    assert "14 degrees and sunny" in text_of(events)


# -- request validation -----------------------------------------------------------------

BAD_BODIES: dict[str, dict[str, Any]] = {
    "tool-without-a-name": {"tools": [{"type": "function", "function": {"parameters": {}}}]},
    "tool-choice-unknown-word": {"tools": TOOLS, "tool_choice": "sometimes"},
    "tool-choice-without-function": {"tools": TOOLS, "tool_choice": {"type": "function"}},
    "tool-choice-without-name": {
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {}},
    },
    "tool-message-without-tool_call_id": {
        "messages": [*USER, {"role": "tool", "content": "12 degrees"}]
    },
    "unknown-role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "user-without-content": {"messages": [{"role": "user"}]},
    "system-without-content": {"messages": [{"role": "system"}, *USER]},
}
HTTP_ROUTES = ["/v1/stream/chunked", "/v1/stream/sse", "/v1/generations"]


@pytest.mark.parametrize("bad", BAD_BODIES.values(), ids=BAD_BODIES)
async def test_bad_chat_shapes_are_a_400_on_every_route(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, bad: dict[str, Any]
) -> None:
    server = await gateway(start_gateway, fake_upstream)
    body = {"model": "gpt", "messages": USER, **bad}
    async with aiohttp.ClientSession() as session:
        for route in HTTP_ROUTES:
            async with session.post(server.make_url(route), json=body) as response:
                assert response.status == 400, (route, await response.text())
                error = (await response.json())["error"]
                assert error["code"] == "invalid_request", (route, error)
        async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
            await ws.send_json({"type": "generate", "request_id": "bad", **body})
            frame = await ws.receive_json(timeout=5)
            assert frame["type"] == "error" and frame["code"] == "invalid_request", frame
            assert frame.get("request_id") == "bad"
            # The socket stays open, and takes tools in a good request.
            good = {"model": "sim-1", "prompt": "Weather in Oslo?", "tools": TOOLS}
            await ws.send_json({"type": "generate", "request_id": "good", **good})
            events = []
            while not events or events[-1]["type"] not in {"done", "error"}:
                events.append(await ws.receive_json(timeout=5))
    assert events[-1]["type"] == "done" and calls_from_events(events), events[-1]
    assert fake_upstream.requests == []


FULL_SHAPE: dict[str, Any] = {
    "model": "gpt",
    "messages": [
        {"role": "developer", "content": "Use the tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        assistant_calls(OSLO),
        {"role": "tool", "tool_call_id": "call_w1", "content": "12 °C, rain"},
    ],
    "tools": TOOLS,
    "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    "parallel_tool_calls": False,
    "response_format": {"type": "json_object"},
    "reasoning_effort": "medium",
}
FORWARDED = ["messages", "tools", "tool_choice", "parallel_tool_calls", "response_format"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_full_chat_shape_is_accepted_and_forwarded_unchanged(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, transport: str
) -> None:
    fake_upstream.script = text_deltas("Rain ", "in Oslo.")
    server = await gateway(start_gateway, fake_upstream, resume_grace_s=5)
    events = await TRANSPORTS[transport](server, FULL_SHAPE)
    assert_well_formed(events)
    assert text_of(events) == "Rain in Oslo." and events[-1]["finish_reason"] == "stop"
    (sent,) = fake_upstream.requests
    for name in [*FORWARDED, "reasoning_effort"]:
        assert sent.body.get(name) == FULL_SHAPE[name], name


# -- what the gateway cannot forward ends the stream explicitly -----------------------------


@pytest.mark.parametrize(
    "delta",
    [
        {"refusal": "I can't help with that."},
        {"function_call": {"name": "get_weather", "arguments": "{}"}},
    ],
    ids=["refusal", "function_call"],
)
async def test_unsupported_upstream_content_is_an_error_event(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, delta: dict[str, Any]
) -> None:
    fake_upstream.script = [*text_deltas("Hel", "lo"), {"content": None, **delta}]
    server = await gateway(start_gateway, fake_upstream)
    events = await chunked(server, {"model": "gpt", "messages": USER})
    assert_well_formed(events)
    assert text_of(events) == "Hello"
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_error"


# -- resume in the middle of a call's arguments -------------------------------------------

PACED_ARGUMENTS = Call.of(
    "get_weather", {"city": "Oslo", "unit": "celsius", "when": "tomorrow morning"}, "call_p"
)


async def start_and_drop_mid_arguments(
    server: TestServer, body: dict[str, Any]
) -> tuple[str, Events]:
    """Start on chunked; read until an argument fragment (after a call's first one); hang up."""
    seen: Events = []
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
            while True:
                line = await response.content.readline()
                assert line, f"ended before an argument fragment: {seen}"
                if not line.strip():
                    continue
                seen.append(orjson.loads(line))
                event = seen[-1]
                if event["type"] == "tool_call" and "id" not in event and event["arguments"]:
                    break
    return seen[0]["generation_id"], seen


async def resume_rest(server: TestServer, how: str, generation_id: str, after: int) -> Events:
    """The events after seq `after`, by one of the resume routes, to the terminal one."""
    async with aiohttp.ClientSession() as session:
        if how == "sse-last-event-id":
            headers = {"Last-Event-ID": f"{generation_id}:{after}"}
            async with session.get(server.make_url("/v1/stream/sse"), headers=headers) as response:
                assert response.status == 200
                return (await read_sse(response))[0]
        if how in ("after-sse", "after-ndjson"):
            url = server.make_url(f"/v1/generations/{generation_id}/events")
            url = url.with_query(after=str(after))
            headers = {"Accept": "application/x-ndjson"} if how == "after-ndjson" else {}
            async with session.get(url, headers=headers) as response:
                assert response.status == 200
                if how == "after-ndjson":
                    return await read_ndjson(response)
                return (await read_sse(response))[0]
        assert how == "ws-resume"
        rest: Events = []
        async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
            resume = {"type": "resume", "request_id": "again"}
            await ws.send_json({**resume, "generation_id": generation_id, "after_seq": after})
            while not rest or rest[-1]["type"] not in {"done", "error"}:
                rest.append(await ws.receive_json(timeout=5))
        return [strip(e) for e in rest]


async def whole_log(server: TestServer, generation_id: str) -> Events:
    async with aiohttp.ClientSession() as session:
        url = server.make_url(f"/v1/generations/{generation_id}/events")
        async with session.get(url, headers={"Accept": "application/x-ndjson"}) as response:
            return await read_ndjson(response)


def assert_exactly_the_rest(seen: Events, rest: Events, full: Events) -> None:
    assert rest, "nothing after the resume"
    assert rest[0]["seq"] == seen[-1]["seq"] + 1
    first = rest[0]
    assert first["type"] == "tool_call" and "id" not in first and "name" not in first, first
    assert first["index"] == seen[-1]["index"]
    assert seen + rest == full
    assert_well_formed(full)


RESUMES = ["sse-last-event-id", "after-sse", "after-ndjson", "ws-resume"]


@pytest.mark.parametrize("how", RESUMES)
async def test_resume_in_the_middle_of_a_tool_calls_arguments(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, how: str
) -> None:
    fake_upstream.script = reasoning_deltas(*THINKING) + tool_call_deltas(
        [PACED_ARGUMENTS], role=False, pieces=12
    )
    fake_upstream.finish_reason = "tool_calls"
    fake_upstream.token_delay_s = 0.02
    server = await gateway(start_gateway, fake_upstream, resume_grace_s=5)
    body = {"model": "gpt", "messages": USER, "tools": TOOLS}
    generation_id, seen = await start_and_drop_mid_arguments(server, body)
    rest = await resume_rest(server, how, generation_id, seen[-1]["seq"])
    full = await whole_log(server, generation_id)
    assert_exactly_the_rest(seen, rest, full)
    assert full[-1]["finish_reason"] == "tool_calls"
    assert parsed(calls_from_events(full)) == [
        (PACED_ARGUMENTS.name, json.loads(PACED_ARGUMENTS.arguments))
    ]
    assert reasoning_text(full) == "".join(THINKING)
    assert len(fake_upstream.requests) == 1


# -- the Redis backend: resume on another replica ---------------------------------------

PACED_THINKER = {**SIM, "tokens_per_second": 150, "reasoning_tokens": 3}


@pytest.mark.parametrize("how", ["sse-last-event-id", "after-ndjson", "ws-resume"])
async def test_tool_events_resume_on_another_replica_with_redis(
    start_gateway: StartGateway, redis_server: RedisProcess, how: str
) -> None:
    shared = {
        "models": [PACED_THINKER],
        "streams": {"backend": "redis", "resume_grace_s": 10},
        "redis": {"url": redis_server.url},
    }
    a, b = [await start_gateway(**shared) for _ in range(2)]
    body = {"prompt": "Book me a trip.", "tools": [BOOK_TRIP], "tool_choice": "required"}
    generation_id, seen = await start_and_drop_mid_arguments(a, {**body, "seed": 5})
    rest = await resume_rest(b, how, generation_id, seen[-1]["seq"])
    full = await whole_log(b, generation_id)
    assert_exactly_the_rest(seen, rest, full)
    assert full[-1]["finish_reason"] == "tool_calls"
    assert sum(e["type"] == "reasoning" for e in full) == 3
    ((name, arguments),) = parsed(calls_from_events(full))
    assert name == "book_trip" and arguments["nights"] == 3
