"""Shared setup of the tests of the openai provider, tool calls and reasoning.

A gateway whose default model is `provider: openai` pointing at a
`FakeUpstream`, next to a simulated `sim-1`; the official SDK pointed at
either; clients that read OpenAI's chunks raw; the tools and the messages
requests carry; and what a stream of tool-call fragments adds up to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import openai
import orjson
from aiohttp.test_utils import TestServer

from tests.conftest import TEST_API_KEY, StartGateway
from tests.fake_upstream import Call, FakeUpstream
from tests.helpers import SECRET, openai_model
from tests.sse_parser import SseParser

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
SIM = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 5000, "first_token_ms": 0}
Events = list[dict[str, Any]]


def function_tool(
    name: str,
    properties: dict[str, Any],
    required: Sequence[str] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """A `tools` entry as OpenAI's API takes it: a function and its arguments' JSON schema."""
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = description
    function["parameters"] = {"type": "object", "properties": properties}
    if required is not None:
        function["parameters"]["required"] = list(required)
    return {"type": "function", "function": function}


def assistant_calls(*calls: Call, content: str | None = None) -> dict[str, Any]:
    """The assistant message that made `calls`, as a client sends it back with their results."""
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in calls
        ],
    }


WEATHER_TOOL = function_tool(
    "get_weather",
    {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    required=["city"],
    description="The current weather in a city.",
)
TIME_TOOL = function_tool(
    "get_time",
    {"timezone": {"type": "string"}},
    required=["timezone"],
    description="The local time in a timezone.",
)
TOOLS = [WEATHER_TOOL, TIME_TOOL]
#: The calls a scripted model makes with them.
OSLO = Call.of("get_weather", {"city": "Oslo", "unit": "celsius"}, "call_w1")
TOKYO_TIME = Call.of("get_time", {"timezone": "Asia/Tokyo"}, "call_t2")


async def gateway(
    start_gateway: StartGateway,
    fake: FakeUpstream,
    *more_models: dict[str, Any],
    sim: dict[str, Any] = SIM,
    **streams: Any,
) -> TestServer:
    """The gateway serving `gpt` (the fake upstream, default), `more_models`, then `sim`."""
    return await start_gateway(
        models=[openai_model(fake.base_url, timeout_s=2), *more_models, sim],
        streams={"resume_grace_s": 0, **streams},
    )


def sdk(base_url: str, api_key: str = TEST_API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)


def through(server: TestServer) -> openai.AsyncOpenAI:
    """The official SDK, pointed at the gateway."""
    return sdk(str(server.make_url("/v1")))


def direct(fake: FakeUpstream) -> openai.AsyncOpenAI:
    """The official SDK, pointed at the fake upstream itself."""
    return sdk(fake.base_url, SECRET)


async def post_chat(server: TestServer, body: dict[str, Any]) -> tuple[int, Any]:
    """POST /v1/chat/completions with aiohttp: the status and the JSON body or the raw text."""
    async with aiohttp.ClientSession() as session:
        url = server.make_url("/v1/chat/completions")
        async with session.post(url, json=body, headers=AUTH) as response:
            raw = await response.read()
            if response.content_type == "application/json":
                return response.status, orjson.loads(raw)
            return response.status, raw


async def raw_chunks(server: TestServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The `chat.completion.chunk` objects of one streaming answer, read as bytes;
    checks that `data: [DONE]` ends it and nothing follows."""
    status, raw = await post_chat(server, {**body, "stream": True})
    assert status == 200, raw
    parser = SseParser()
    parser.feed(raw)
    data = [event.data for event in parser.events]
    assert data and data[-1] == "[DONE]", data[-3:]
    assert "[DONE]" not in data[:-1]
    return [orjson.loads(item) for item in data[:-1]]


def deltas_of(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [choice["delta"] for chunk in chunks for choice in chunk.get("choices") or ()]


def finish_of(chunks: list[dict[str, Any]]) -> str | None:
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk.get("choices") or ()]
    present = [r for r in reasons if r is not None]
    assert len(present) <= 1, f"several finish reasons: {present}"
    return present[0] if present else None


def calls_from_chunks(chunks: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """{index: {id, name, arguments}} as a client assembles OpenAI's `delta.tool_calls`."""
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas_of(chunks):
        for item in delta.get("tool_calls") or ():
            call = calls.setdefault(item["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] = item.get("id") or call["id"]
            function = item.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
    return calls


def calls_from_events(events: Events) -> dict[int, dict[str, Any]]:
    """{index: {id, name, arguments}} from our `tool_call` events; checks that `id`
    and `name` come with the first fragment of each index and not again."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["type"] != "tool_call":
            continue
        index = event["index"]
        assert isinstance(index, int) and index >= 0, event
        assert isinstance(event["arguments"], str), event
        if index not in calls:
            assert event.get("id") and event.get("name"), f"first fragment without id/name: {event}"
            calls[index] = {"id": event["id"], "name": event["name"], "arguments": ""}
        else:
            assert event.get("id") in (None, calls[index]["id"]), event
            assert event.get("name") in (None, calls[index]["name"]), event
        calls[index]["arguments"] += event["arguments"]
    return calls


def parsed(calls: dict[int, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments as JSON) of each call in index order; the indexes are 0..n-1."""
    assert sorted(calls) == list(range(len(calls))), sorted(calls)
    return [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]


def strip(event: dict[str, Any]) -> dict[str, Any]:
    """An event without the fields the WebSocket adds (`start` has its own `generation_id`)."""
    added = ("request_id",) if event.get("type") == "start" else ("request_id", "generation_id")
    return {k: v for k, v in event.items() if k not in added}
