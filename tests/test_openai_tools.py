"""Tool calls and reasoning on `POST /v1/chat/completions`, read by the official SDK.

The gateway's model is `provider: openai` pointing at `FakeUpstream`, which
streams OpenAI's real tool-call and reasoning wire (tests/fake_upstream.py).
Most tests run the same SDK code twice, against the fake directly and
through the gateway, and compare: it must work exactly as it does against
OpenAI. The regression tests are named after bugs other gateways shipped.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import StartGateway
from tests.fake_upstream import (
    Call,
    FakeUpstream,
    Reply,
    assemble,
    reasoning_deltas,
    text_deltas,
    tool_call_deltas,
)
from tests.tool_helpers import (
    OSLO,
    TOKYO_TIME,
    TOOLS,
    assistant_calls,
    calls_from_chunks,
    deltas_of,
    direct,
    finish_of,
    gateway,
    openai_model,
    post_chat,
    raw_chunks,
    through,
)

USER = [{"role": "user", "content": "What's the weather in Oslo?"}]
THOUGHT = "The user wants the weather; I should call get_weather for Oslo."


def tool_script(fake: FakeUpstream, *calls: Call, **options: Any) -> None:
    fake.script = tool_call_deltas(calls or [OSLO], **options)
    fake.finish_reason = "tool_calls"


async def stream_final(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[Any, list[Any]]:
    """The SDK's `chat.completions.stream()` helper: its final completion and its
    `tool_calls.function.arguments.done` events."""
    async with client.chat.completions.stream(model="gpt", **kwargs) as stream:
        done = [e async for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = await stream.get_final_completion()
    return final, done


async def both(fake: FakeUpstream, server: Any, run: Any) -> tuple[Any, Any]:
    """`run(client)` against the fake directly, then through the gateway."""
    results = []
    for client in (direct(fake), through(server)):
        async with client:
            results.append(await run(client))
    return results[0], results[1]


def dump_calls(message: Any) -> list[dict[str, Any]]:
    return [call.model_dump() for call in message.tool_calls or ()]


# -- the SDK, directly and through the gateway -----------------------------------


async def test_the_fake_streams_tool_calls_the_sdk_assembles(fake_upstream: FakeUpstream) -> None:
    """The fake itself, read by the SDK's stream helper: a faithful upstream."""
    fake_upstream.script = reasoning_deltas("Think", "ing.") + tool_call_deltas(
        [OSLO, TOKYO_TIME], role=False
    )
    fake_upstream.finish_reason = "tool_calls"
    async with direct(fake_upstream) as client:
        final, done = await stream_final(client, messages=USER, tools=TOOLS)
        whole = await client.chat.completions.create(model="gpt", messages=USER, tools=TOOLS)
    expected = [(c.id, c.name, c.arguments) for c in (OSLO, TOKYO_TIME)]
    message = final.choices[0].message
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == expected
    assert [(e.index, e.name, e.arguments) for e in done] == [
        (0, OSLO.name, OSLO.arguments),
        (1, TOKYO_TIME.name, TOKYO_TIME.arguments),
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.reasoning_content == "Thinking."  # type: ignore[attr-defined]
    calls = whole.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == expected
    assert whole.choices[0].message.content is None
    assert whole.choices[0].message.reasoning_content == "Thinking."  # type: ignore[attr-defined]


async def test_the_stream_helper_assembles_the_same_tool_calls_through_the_gateway(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script = reasoning_deltas("Oslo, ", "weather.") + tool_call_deltas(
        [OSLO], pieces=5, role=False
    )
    fake_upstream.finish_reason = "tool_calls"
    server = await gateway(start_gateway, fake_upstream)

    async def run(client: openai.AsyncOpenAI) -> Any:
        final, done = await stream_final(client, messages=USER, tools=TOOLS)
        choice = final.choices[0]
        return (
            dump_calls(choice.message),
            [(e.index, e.name, e.arguments, e.parsed_arguments) for e in done],
            choice.finish_reason,
            choice.message.role,
            getattr(choice.message, "reasoning_content", None),
            choice.message.content,  # null, as OpenAI's role delta before a call says
        )

    at_upstream, at_gateway = await both(fake_upstream, server, run)
    assert at_gateway == at_upstream
    assert at_gateway[0][0]["id"] == "call_w1"
    assert json.loads(at_gateway[0][0]["function"]["arguments"]) == {
        "city": "Oslo",
        "unit": "celsius",
    }
    assert at_gateway[2:] == ("tool_calls", "assistant", "Oslo, weather.", None)


async def test_non_streaming_answers_message_tool_calls_with_null_content(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    tool_script(fake_upstream, OSLO, TOKYO_TIME)
    server = await gateway(start_gateway, fake_upstream)

    async def run(client: openai.AsyncOpenAI) -> Any:
        completion = await client.chat.completions.create(model="gpt", messages=USER, tools=TOOLS)
        choice = completion.choices[0]
        return dump_calls(choice.message), choice.message.content, choice.finish_reason

    at_upstream, at_gateway = await both(fake_upstream, server, run)
    assert at_gateway == at_upstream
    calls, content, finish = at_gateway
    assert content is None and finish == "tool_calls"
    assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
        ("call_w1", "function", "get_weather"),
        ("call_t2", "function", "get_time"),
    ]
    assert [c["function"]["arguments"] for c in calls] == [OSLO.arguments, TOKYO_TIME.arguments]


@pytest.mark.parametrize("interleave", [False, True], ids=["sequential", "interleaved"])
async def test_parallel_tool_calls_both_arrive(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, interleave: bool
) -> None:
    tool_script(fake_upstream, OSLO, TOKYO_TIME, interleave=interleave, pieces=4)
    server = await gateway(start_gateway, fake_upstream)

    async def run(client: openai.AsyncOpenAI) -> Any:
        # (The helper's `arguments.done` events assume OpenAI's one-call-after-the-other.)
        final, _ = await stream_final(client, messages=USER, tools=TOOLS)
        return dump_calls(final.choices[0].message), final.choices[0].finish_reason

    at_upstream, at_gateway = await both(fake_upstream, server, run)
    assert at_gateway == at_upstream
    assert at_gateway[1] == "tool_calls"
    assert [(c["index"], c["id"], c["function"]["name"]) for c in at_gateway[0]] == [
        (0, "call_w1", "get_weather"),
        (1, "call_t2", "get_time"),
    ]
    assert [json.loads(c["function"]["arguments"]) for c in at_gateway[0]] == [
        {"city": "Oslo", "unit": "celsius"},
        {"timezone": "Asia/Tokyo"},
    ]


# -- the exact chunks on the wire ---------------------------------------------------


async def test_tool_call_chunks_have_openais_exact_shape(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    tool_script(fake_upstream, OSLO, pieces=4)
    server = await gateway(start_gateway, fake_upstream)
    body = {
        "model": "gpt",
        "messages": USER,
        "tools": TOOLS,
        "stream_options": {"include_usage": True},
    }
    chunks = await raw_chunks(server, body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    items = [item for delta in deltas_of(chunks) for item in delta.get("tool_calls") or ()]
    first, *rest = items
    assert first == {
        "index": 0,
        "id": "call_w1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert rest, "no argument fragment"
    for item in rest:
        assert set(item) == {"index", "function"} and item["index"] == 0, item
        assert set(item["function"]) == {"arguments"} and item["function"]["arguments"], item
    assert "".join(i["function"]["arguments"] for i in items) == OSLO.arguments
    assert not any(delta.get("content") for delta in deltas_of(chunks))
    assert finish_of(chunks) == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 11


@pytest.mark.parametrize("upstream_index", [True, False], ids=["upstream-index", "no-index"])
async def test_regression_every_fragment_carries_its_index_tensorzero_1266(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, upstream_index: bool
) -> None:
    """TensorZero #1266: tool-call deltas without `index` break every OpenAI client
    (the SDK's accumulator keys on it), also when the upstream left it out."""
    tool_script(fake_upstream, OSLO, TOKYO_TIME, pieces=3, index=upstream_index)
    server = await gateway(start_gateway, fake_upstream)
    chunks = await raw_chunks(server, {"model": "gpt", "messages": USER, "tools": TOOLS})
    items = [item for delta in deltas_of(chunks) for item in delta.get("tool_calls") or ()]
    assert len(items) >= 4
    assert all(isinstance(item.get("index"), int) for item in items), items
    assert calls_from_chunks(chunks) == {
        0: {"id": OSLO.id, "name": OSLO.name, "arguments": OSLO.arguments},
        1: {"id": TOKYO_TIME.id, "name": TOKYO_TIME.name, "arguments": TOKYO_TIME.arguments},
    }


async def test_regression_a_missing_upstream_id_is_synthesised_litellm_11407(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """LiteLLM #11407: a call without `id` reached clients, which cannot answer it
    (a tool message needs `tool_call_id`). The gateway makes one: `call_…`."""
    tool_script(fake_upstream, OSLO, TOKYO_TIME, ids=False)
    server = await gateway(start_gateway, fake_upstream)
    chunks = await raw_chunks(server, {"model": "gpt", "messages": USER, "tools": TOOLS})
    items = [item for delta in deltas_of(chunks) for item in delta.get("tool_calls") or ()]
    firsts = [item for item in items if "function" in item and "name" in item["function"]]
    assert [f["index"] for f in firsts] == [0, 1]
    ids = [f.get("id") for f in firsts]
    assert all(isinstance(i, str) and i.startswith("call_") and len(i) > 5 for i in ids), ids
    assert len(set(ids)) == 2
    later = [item for item in items if item not in firsts]
    assert all(item.get("id") in (None, ids[item["index"]]) for item in later), later
    async with through(server) as client:
        final, _ = await stream_final(client, messages=USER, tools=TOOLS)
        whole = await client.chat.completions.create(model="gpt", messages=USER, tools=TOOLS)
    for message in (final.choices[0].message, whole.choices[0].message):
        got = [c.id for c in message.tool_calls or ()]
        assert len(got) == 2 and all(i.startswith("call_") for i in got) and got[0] != got[1]


@pytest.mark.parametrize("upstream_role", ["with-the-call", "none"])
async def test_regression_the_opening_role_delta_is_sent_bifrost_6523(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, upstream_role: str
) -> None:
    """Bifrost #6523: the opening `role: assistant` delta was dropped when the
    upstream put it on the first tool-call chunk (as OpenAI does) or sent none."""
    tool_script(fake_upstream, OSLO, role=upstream_role == "with-the-call")
    fake_upstream.role_chunk = False
    server = await gateway(start_gateway, fake_upstream)
    chunks = await raw_chunks(server, {"model": "gpt", "messages": USER, "tools": TOOLS})
    first = chunks[0]["choices"][0]["delta"]
    assert first.get("role") == "assistant", chunks[0]
    roles = [d["role"] for d in deltas_of(chunks) if d.get("role")]
    assert roles == ["assistant"], "the role once, first"
    async with through(server) as client:
        final, _ = await stream_final(client, messages=USER, tools=TOOLS)
    assert final.choices[0].message.role == "assistant"
    assert [c.id for c in final.choices[0].message.tool_calls or ()] == ["call_w1"]


@pytest.mark.parametrize("interleave", [False, True], ids=["sequential", "interleaved"])
async def test_regression_parallel_calls_are_not_dropped_bifrost_pr_7235(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, interleave: bool
) -> None:
    """Bifrost PR #7235: only the first of parallel tool calls reached the client."""
    third = Call.of("get_weather", {"city": "Lima"}, "call_w3")
    tool_script(fake_upstream, OSLO, TOKYO_TIME, third, interleave=interleave)
    server = await gateway(start_gateway, fake_upstream)
    body = {"model": "gpt", "messages": USER, "tools": TOOLS, "parallel_tool_calls": True}
    chunks = await raw_chunks(server, body)
    assert calls_from_chunks(chunks) == {
        i: {"id": c.id, "name": c.name, "arguments": c.arguments}
        for i, c in enumerate([OSLO, TOKYO_TIME, third])
    }
    assert finish_of(chunks) == "tool_calls"


@pytest.mark.parametrize(
    "options",
    [{"pieces": 1000}, {"arguments_in_first": True, "pieces": 3}, {"pieces": 1}],
    ids=["one-char-fragments", "arguments-with-the-name", "all-at-once"],
)
async def test_regression_argument_fragments_are_not_dropped_litellm_20711(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, options: dict[str, Any]
) -> None:
    """LiteLLM #20711: argument deltas after the first were dropped, leaving `{"`."""
    nested = Call.of(
        "get_weather", {"city": "Zürich", "unit": "celsius", "hint": 'say "hi"\n'}, "call_n"
    )
    tool_script(fake_upstream, nested, **options)
    server = await gateway(start_gateway, fake_upstream)
    chunks = await raw_chunks(server, {"model": "gpt", "messages": USER, "tools": TOOLS})
    assert calls_from_chunks(chunks)[0]["arguments"] == nested.arguments

    async def run(client: openai.AsyncOpenAI) -> Any:
        final, done = await stream_final(client, messages=USER, tools=TOOLS)
        return dump_calls(final.choices[0].message), [e.arguments for e in done]

    at_upstream, at_gateway = await both(fake_upstream, server, run)
    assert at_gateway == at_upstream and at_gateway[1] == [nested.arguments]


async def test_regression_reasoning_is_kept_when_tools_are_sent_litellm_19849(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """LiteLLM #19849: with `tools` in the request the reasoning deltas were lost."""
    pieces = ("The user wants ", "the weather; ", "call get_weather.")
    fake_upstream.script = reasoning_deltas(*pieces) + tool_call_deltas([OSLO], role=False)
    fake_upstream.finish_reason = "tool_calls"
    server = await gateway(start_gateway, fake_upstream)
    body = {"model": "gpt", "messages": USER, "tools": TOOLS, "reasoning_effort": "high"}
    chunks = await raw_chunks(server, body)
    kinds = []
    for delta in deltas_of(chunks):
        if delta.get("reasoning_content"):
            kinds.append("reasoning")
        if delta.get("tool_calls"):
            kinds.append("tool_call")
    assert "".join(d.get("reasoning_content") or "" for d in deltas_of(chunks)) == "".join(pieces)
    assert kinds.index("tool_call") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert calls_from_chunks(chunks)[0]["name"] == "get_weather"
    status, whole = await post_chat(server, body)
    assert status == 200, whole
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == "".join(pieces)
    assert message["content"] is None and message["tool_calls"][0]["id"] == "call_w1"
    assert whole["choices"][0]["finish_reason"] == "tool_calls"


# -- reasoning -------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["deepseek", "vllm", "openrouter"])
async def test_reasoning_content_streaming_and_not(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, style: str
) -> None:
    thinking, answer = ("Two ", "plus two ", "is four."), ("It is ", "4.")
    fake_upstream.script = reasoning_deltas(*thinking, style=style) + text_deltas(*answer)
    server = await gateway(start_gateway, fake_upstream)
    chunks = await raw_chunks(server, {"model": "gpt", "messages": USER})
    deltas = deltas_of(chunks)
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "".join(thinking)
    assert "".join(d.get("content") or "" for d in deltas) == "".join(answer)
    last_reasoning = max(i for i, d in enumerate(deltas) if d.get("reasoning_content"))
    first_text = min(i for i, d in enumerate(deltas) if d.get("content"))
    assert last_reasoning < first_text
    assert finish_of(chunks) == "stop"
    status, whole = await post_chat(server, {"model": "gpt", "messages": USER})
    assert status == 200, whole
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == "".join(thinking)
    assert message["content"] == "".join(answer)
    assert "tool_calls" not in message or not message["tool_calls"]


async def test_the_sdk_reads_reasoning_content_as_from_a_reasoning_server(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script = reasoning_deltas("Hmm, ", "easy.") + text_deltas("Four", ".")
    server = await gateway(start_gateway, fake_upstream)

    async def run(client: openai.AsyncOpenAI) -> Any:
        stream = await client.chat.completions.create(model="gpt", messages=USER, stream=True)
        thinking = [
            getattr(c.choices[0].delta, "reasoning_content", None) or ""
            async for c in stream
            if c.choices
        ]
        whole = await client.chat.completions.create(model="gpt", messages=USER)
        message = whole.choices[0].message
        return "".join(thinking), message.content, getattr(message, "reasoning_content", None)

    at_upstream, at_gateway = await both(fake_upstream, server, run)
    assert at_gateway == at_upstream == ("Hmm, easy.", "Four.", "Hmm, easy.")


# -- what reaches the upstream --------------------------------------------------------

ROUND_TRIP = [
    {"role": "developer", "content": "Answer with tools when you can."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo and time in Tokyo?"}]},
    assistant_calls(OSLO, TOKYO_TIME),
    {"role": "tool", "tool_call_id": "call_w1", "content": "12 °C, rain"},
    {"role": "tool", "tool_call_id": "call_t2", "content": [{"type": "text", "text": "21:04"}]},
]


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
async def test_a_tool_result_round_trip_reaches_the_upstream_unchanged(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, stream: bool
) -> None:
    fake_upstream.script = text_deltas("Rain in Oslo; ", "21:04 in Tokyo.")
    server = await gateway(start_gateway, fake_upstream)

    async def run(client: openai.AsyncOpenAI) -> Any:
        if stream:
            response = await client.chat.completions.create(
                model="gpt", messages=ROUND_TRIP, tools=TOOLS, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in response if c.choices])
        whole = await client.chat.completions.create(model="gpt", messages=ROUND_TRIP, tools=TOOLS)
        return whole.choices[0].message.content

    at_upstream, at_gateway = await both(fake_upstream, server, run)
    assert at_gateway == at_upstream == "Rain in Oslo; 21:04 in Tokyo."
    sent_directly, sent_by_gateway = fake_upstream.requests
    assert sent_by_gateway.body["messages"] == sent_directly.body["messages"] == ROUND_TRIP
    assert sent_by_gateway.body["tools"] == sent_directly.body["tools"] == TOOLS


async def test_tool_and_reasoning_fields_are_forwarded_unchanged(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    server = await gateway(start_gateway, fake_upstream)
    fields: dict[str, Any] = {
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "weather",
                "strict": True,
                "schema": {
                    "type": "object",
                    "properties": {"summary": {"type": "string"}},
                    "required": ["summary"],
                    "additionalProperties": False,
                },
            },
        },
        "reasoning_effort": "low",
    }

    async def run(client: openai.AsyncOpenAI) -> Any:
        await client.chat.completions.create(model="gpt", messages=USER, **fields)
        stream = await client.chat.completions.create(
            model="gpt", messages=USER, stream=True, **fields
        )
        return [chunk async for chunk in stream][-1].choices[0].finish_reason

    await both(fake_upstream, server, run)
    assert len(fake_upstream.requests) == 4
    for sent in fake_upstream.requests:
        assert {name: sent.body.get(name) for name in fields} == fields


async def test_an_unknown_field_is_a_400_naming_it(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    server = await gateway(start_gateway, fake_upstream)
    status, body = await post_chat(
        server, {"model": "gpt", "messages": USER, "frobnicate_level": 3}
    )
    assert status == 400, body
    assert body["error"]["code"] == "invalid_request"
    assert "frobnicate_level" in body["error"]["message"]
    async with through(server) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(
                model="gpt", messages=USER, stream=True, extra_body={"frobnicate_level": 3}
            )
    assert "frobnicate_level" in error.value.message
    assert fake_upstream.requests == []


ACCOUNT_FIELDS: dict[str, Any] = {
    "store": True,
    "metadata": {"team": "search"},
    "service_tier": "flex",
    "user": "user-7",
}


async def test_account_fields_are_dropped_unless_the_model_passes_them_through(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    passing = openai_model(
        fake_upstream.base_url, name="gpt-pass", passthrough=[*ACCOUNT_FIELDS, "frobnicate_level"]
    )
    server = await gateway(start_gateway, fake_upstream, passing)
    for model in ("gpt", "gpt-pass"):
        status, body = await post_chat(
            server, {"model": model, "messages": USER, "stream": True, **ACCOUNT_FIELDS}
        )
        assert status == 200, body
    status, body = await post_chat(
        server, {"model": "gpt-pass", "messages": USER, "frobnicate_level": 3}
    )
    assert status == 200, body
    status, body = await post_chat(
        server, {"model": "gpt", "messages": USER, "frobnicate_level": 3}
    )
    assert status == 400 and "frobnicate_level" in body["error"]["message"]
    dropped, kept, listed = (r.body for r in fake_upstream.requests)
    assert not set(ACCOUNT_FIELDS) & set(dropped), dropped
    assert {name: kept.get(name) for name in ACCOUNT_FIELDS} == ACCOUNT_FIELDS
    assert listed["frobnicate_level"] == 3


async def test_n_other_than_1_is_a_400(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    server = await gateway(start_gateway, fake_upstream)
    async with through(server) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(model="gpt", messages=USER, n=2)
        assert error.value.status_code == 400 and error.value.code == "invalid_request"
        assert "n" in error.value.message
        one = await client.chat.completions.create(model="gpt", messages=USER, n=1)
    assert one.choices[0].message.content == "Hello,\n wörld 👋!"
    assert len(fake_upstream.requests) == 1


BAD_MESSAGES = {
    "unknown-role": [{"role": "wizard", "content": "hi"}],
    "user-without-content": [{"role": "user"}],
    "system-without-content": [{"role": "system"}, *USER],
    "tool-without-tool_call_id": [*USER, {"role": "tool", "content": "12 °C"}],
}
BAD_TOOLS: dict[str, dict[str, Any]] = {
    "tool-without-a-name": {"tools": [{"type": "function", "function": {"parameters": {}}}]},
    "tool-choice-unknown-word": {"tools": TOOLS, "tool_choice": "sometimes"},
    "tool-choice-without-a-name": {
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {}},
    },
}


@pytest.mark.parametrize("messages", BAD_MESSAGES.values(), ids=BAD_MESSAGES)
async def test_bad_messages_are_a_400_on_the_openai_route(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, messages: list[dict[str, Any]]
) -> None:
    server = await gateway(start_gateway, fake_upstream)
    for stream in (True, False):
        status, body = await post_chat(
            server, {"model": "gpt", "messages": messages, "stream": stream}
        )
        assert status == 400, body
        assert body["error"]["code"] == "invalid_request"
    assert fake_upstream.requests == []


@pytest.mark.parametrize("fields", BAD_TOOLS.values(), ids=BAD_TOOLS)
async def test_bad_tools_are_a_400_on_the_openai_route(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, fields: dict[str, Any]
) -> None:
    server = await gateway(start_gateway, fake_upstream)
    async with through(server) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(model="gpt", messages=USER, stream=True, **fields)
    assert error.value.code == "invalid_request"
    assert fake_upstream.requests == []


# -- what the gateway cannot forward is an error, never silence ----------------------

#: (script, the text before the failure, a word the error names). A refusal
#: comes instead of content (OpenAI streams no text with it); the others cut in.
UNSUPPORTED: dict[str, tuple[list[dict[str, Any]], str, str]] = {
    "refusal": (
        [
            {"role": "assistant", "content": None, "refusal": ""},
            {"refusal": "I'm sorry, "},
            {"refusal": "I can't help with that."},
        ],
        "",
        "refus",
    ),
    "function_call": (
        [
            *text_deltas("Hel", "lo"),
            {"function_call": {"name": "get_weather", "arguments": "{}"}},
            *text_deltas(" there"),
        ],
        "Hello",
        "function_call",
    ),
    "audio": (
        [
            *text_deltas("Hel", "lo"),
            {"audio": {"id": "audio_1", "data": "UklGRg==", "transcript": "Hi"}},
            *text_deltas(" there"),
        ],
        "Hello",
        "audio",
    ),
}


@pytest.mark.parametrize("case", UNSUPPORTED.values(), ids=UNSUPPORTED)
async def test_an_unsupported_upstream_delta_is_an_explicit_error(
    start_gateway: StartGateway,
    fake_upstream: FakeUpstream,
    case: tuple[list[dict[str, Any]], str, str],
) -> None:
    """Dropping it would end the answer as a plain `stop` (or silently shorter)."""
    fake_upstream.script, before, word = case
    server = await gateway(start_gateway, fake_upstream)
    texts: list[str] = []
    async with through(server) as client:
        # Before any text it is an HTTP status; after some, an error frame: both APIError.
        with pytest.raises(openai.APIError) as streaming:
            stream = await client.chat.completions.create(model="gpt", messages=USER, stream=True)
            async for chunk in stream:
                texts += [c.delta.content for c in chunk.choices if c.delta.content]
        with pytest.raises(openai.APIStatusError) as whole:
            await client.chat.completions.create(model="gpt", messages=USER)
    assert "".join(texts) == before, "the text before it arrives, nothing after"
    assert streaming.value.code == "upstream_error"
    assert word in streaming.value.message.lower()
    assert whole.value.status_code == 502 and whole.value.code == "upstream_error"
    assert word in whole.value.message.lower()


async def test_null_fields_in_a_delta_are_not_content(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """LiteLLM-fronted servers send every delta field, null when unused: that is
    plain text, not a refusal or a function call."""
    nulls = {"function_call": None, "tool_calls": None, "audio": None, "refusal": None}
    fake_upstream.script = [
        {"role": "assistant", "content": "Hel", **nulls},
        {"content": "lo", **nulls},
        {"content": "!", "reasoning_content": None, **nulls},
    ]
    server = await gateway(start_gateway, fake_upstream)

    async def run(client: openai.AsyncOpenAI) -> Any:
        stream = await client.chat.completions.create(model="gpt", messages=USER, stream=True)
        text, finish = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, finish

    at_upstream, at_gateway = await both(fake_upstream, server, run)
    assert at_gateway == at_upstream == ("Hello!", "stop")


# -- an agent loop ---------------------------------------------------------------------------


def weather_model(body: dict[str, Any]) -> Reply:
    """A scripted model: call tools for the question, answer from their results."""
    messages = body["messages"]
    if messages[-1]["role"] == "tool":
        results = [m["content"] for m in messages if m["role"] == "tool"]
        thinking = reasoning_deltas("I have ", "the results.")
        return Reply(thinking + text_deltas("Oslo: ", results[0], "; Tokyo: ", results[1]), "stop")
    thinking = reasoning_deltas("Two ", "lookups.")
    calls = tool_call_deltas([OSLO, TOKYO_TIME], role=False, pieces=4)
    return Reply(thinking + calls, "tool_calls")


FUNCTIONS = {
    "get_weather": lambda city, unit="celsius": f"12 °C in {city}, rain ({unit})",
    "get_time": lambda timezone: f"21:04 ({timezone})",
}


async def agent(client: openai.AsyncOpenAI, stream: bool) -> list[dict[str, Any]]:
    """Call the model, run the functions it asks for, send their results, until it
    answers; the transcript is the messages plus, per answer, {finish, reasoning}."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Oslo and the time in Tokyo?"},
    ]
    transcript = list(messages)
    for _ in range(4):
        if stream:
            completion, _ = await stream_final(client, messages=messages, tools=TOOLS)
        else:
            completion = await client.chat.completions.create(
                model="gpt", messages=messages, tools=TOOLS
            )
        choice = completion.choices[0]
        message = choice.message
        turn: dict[str, Any] = {"role": "assistant", "content": message.content}
        if message.tool_calls:
            turn["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in message.tool_calls
            ]
        messages.append(turn)
        reasoning = getattr(message, "reasoning_content", None)
        transcript += [turn, {"finish": choice.finish_reason, "reasoning": reasoning}]
        if choice.finish_reason != "tool_calls":
            return transcript
        for call in message.tool_calls or ():
            result = FUNCTIONS[call.function.name](**json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
            transcript.append(messages[-1])
    raise AssertionError("the agent did not finish")


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
async def test_an_agent_loop_gives_the_same_transcript_directly_and_through_the_gateway(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, stream: bool
) -> None:
    fake_upstream.responder = weather_model
    server = await gateway(start_gateway, fake_upstream)

    at_upstream, at_gateway = await both(fake_upstream, server, lambda c: agent(c, stream))
    assert at_gateway == at_upstream
    assert (
        at_gateway[-2]["content"]
        == "Oslo: 12 °C in Oslo, rain (celsius); Tokyo: 21:04 (Asia/Tokyo)"
    )
    assert [m["finish"] for m in at_gateway if "finish" in m] == ["tool_calls", "stop"]
    assert [m["reasoning"] for m in at_gateway if "finish" in m] == [
        "Two lookups.",
        "I have the results.",
    ]
    half = len(fake_upstream.requests) // 2
    assert half == 2
    for directly, by_gateway in zip(
        fake_upstream.requests[:half], fake_upstream.requests[half:], strict=True
    ):
        assert by_gateway.body["messages"] == directly.body["messages"]


def test_assemble_matches_what_openai_answers_without_stream() -> None:
    """The fake's non-streaming answer is the sum of its deltas."""
    deltas = reasoning_deltas("a", "b") + tool_call_deltas([OSLO, TOKYO_TIME], role=False)
    message = assemble(deltas)
    assert message["content"] is None and message["reasoning_content"] == "ab"
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == [
        OSLO.arguments,
        TOKYO_TIME.arguments,
    ]
