"""The simulated provider: determinism, lengths, stop sequences, pacing, failures."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import pytest

from gateway.config import SimulatedModel
from gateway.errors import UpstreamError
from gateway.providers.base import Finish, Reasoning, ToolCallDelta
from gateway.providers.simulated import SimulatedProvider, _tokenize
from gateway.schema import GenerationRequest
from tests.tool_helpers import function_tool

PROMPT = "How do vector databases scale?"
EMOJI = ("🚀", "✨", "👍🏽")


def model(**overrides: Any) -> SimulatedModel:
    fields: dict[str, Any] = {"tokens_per_second": 1e9, "first_token_ms": 0}
    fields.update(overrides)
    return SimulatedModel(name="sim", provider="simulated", **fields)


def request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {"prompt": PROMPT, "seed": 7}
    fields.update(overrides)
    return GenerationRequest(**fields)


async def collect(
    req: GenerationRequest, sim: SimulatedModel | None = None
) -> tuple[list[str], Finish]:
    items = [item async for item in SimulatedProvider(sim or model()).stream(req)]
    *deltas, finish = items
    assert isinstance(finish, Finish)
    assert all(isinstance(d, str) and d for d in deltas)
    return deltas, finish


async def test_same_seed_same_deltas_and_different_seed_differs() -> None:
    first, _ = await collect(request(seed=1))
    again, _ = await collect(request(seed=1))
    other, _ = await collect(request(seed=2))
    assert first == again
    assert first != other


async def test_no_seed_is_random() -> None:
    first, _ = await collect(request(seed=None, max_tokens=50))
    second, _ = await collect(request(seed=None, max_tokens=50))
    assert first != second


async def test_answer_talks_about_the_last_user_message() -> None:
    messages = [
        {"role": "user", "content": "Tell me about Redis"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "How do Kubernetes operators work?"},
    ]
    deltas, _ = await collect(request(prompt=None, messages=messages))
    text = "".join(deltas)
    assert "Kubernetes operators" in text
    assert "vector databases" in "".join((await collect(request()))[0])


@pytest.mark.parametrize("max_tokens", [1, 7, 150, 3000])
async def test_max_tokens_is_exact_and_finishes_with_length(max_tokens: int) -> None:
    deltas, finish = await collect(request(max_tokens=max_tokens))
    assert len(deltas) == max_tokens
    assert finish.finish_reason == "length"
    assert finish.usage.completion_tokens == max_tokens


async def test_max_tokens_output_is_a_prefix_of_a_longer_one() -> None:
    short, _ = await collect(request(max_tokens=40))
    long, _ = await collect(request(max_tokens=400))
    assert long[:40] == short


@pytest.mark.parametrize("seed", range(8))
async def test_natural_length_ends_with_a_full_sentence(seed: int) -> None:
    deltas, finish = await collect(request(seed=seed))
    assert 100 <= len(deltas) <= 400
    assert finish.finish_reason == "stop"
    assert finish.usage.completion_tokens == len(deltas)
    assert "".join(deltas).endswith((".", *EMOJI))


async def test_natural_lengths_vary() -> None:
    lengths = {len((await collect(request(seed=seed)))[0]) for seed in range(8)}
    assert len(lengths) > 3


async def test_deltas_look_like_word_pieces_with_unicode_and_emoji() -> None:
    deltas = [d for seed in range(5) for d in (await collect(request(seed=seed)))[0]]
    assert any(d.startswith(" ") and d[1:].isalpha() for d in deltas)
    assert any(d.isalpha() and not d.startswith(" ") for d in deltas)  # a word continuation
    assert "\n\n" in deltas
    assert {",", "."} <= set(deltas)
    assert any(not d.isascii() and d.strip().isalpha() for d in deltas)
    assert any(d.strip() in EMOJI for d in deltas)


def test_tokenize_round_trips_any_text() -> None:
    text = "snake_case\tx  y\n\n  déjà vu (e\u0301) 東京… 👍🏽!! it's 12345 — naïve\n"
    assert "".join(_tokenize(text)) == text
    assert _tokenize(" databases") == [" data", "base", "s"]


@pytest.mark.parametrize("stop", ["\n\n", ".", ", ", "tabas", "vector databases", "—"])
async def test_stop_cuts_right_before_the_stop_sequence(stop: str) -> None:
    full = "".join((await collect(request(seed=3)))[0])
    assert stop in full
    deltas, finish = await collect(request(seed=3, stop=[stop]))
    assert "".join(deltas) == full[: full.index(stop)]
    assert finish.finish_reason == "stop"
    assert finish.usage.completion_tokens == len(deltas)


async def test_random_stop_sequences_never_leak() -> None:
    rng = random.Random(0)
    for seed in range(40):
        full = "".join((await collect(request(seed=seed)))[0])
        start = rng.randrange(len(full) - 8)
        stops = [full[start : start + rng.randint(1, 8)], "zz-never-zz"]
        deltas, finish = await collect(request(seed=seed, stop=stops))
        assert "".join(deltas) == full[: full.index(stops[0])]
        assert finish.finish_reason == "stop"


async def test_earliest_of_several_stops_wins() -> None:
    full = "".join((await collect(request(seed=5)))[0])
    deltas, _ = await collect(request(seed=5, stop=["\n\n", "."]))
    assert "".join(deltas) == full[: min(full.index("\n\n"), full.index("."))]


async def test_unmatched_stop_prefixes_are_flushed_unchanged() -> None:
    plain, _ = await collect(request(max_tokens=300))
    held, finish = await collect(request(max_tokens=300, stop=["s!?", "the end of it"]))
    assert held == plain
    assert finish.finish_reason == "length"
    natural, _ = await collect(request())
    held, finish = await collect(request(stop=["s!?"]))
    assert held == natural
    assert finish.finish_reason == "stop"


async def test_pacing_follows_first_token_delay_and_rate() -> None:
    sim = model(first_token_ms=100, tokens_per_second=100)
    started = time.monotonic()
    stamps = [
        time.monotonic() - started
        async for _ in SimulatedProvider(sim).stream(request(max_tokens=20))
    ]
    assert 0.09 <= stamps[0] < 0.2
    assert 0.25 <= stamps[-1] <= 0.8


async def test_fast_model_streams_at_once_without_starving_the_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    deltas, _ = await collect(request(max_tokens=2000))
    elapsed = time.monotonic() - started
    task.cancel()
    assert len(deltas) == 2000
    assert elapsed < 1.0
    assert ticks >= 10


@pytest.mark.parametrize("fail_after", [0, 1, 5])
async def test_fail_after_tokens(fail_after: int) -> None:
    sim = model(fail_after_tokens=fail_after, first_token_ms=30)
    deltas: list[str | Finish] = []
    started = time.monotonic()
    with pytest.raises(UpstreamError, match=f"failure after {fail_after} tokens"):
        async for item in SimulatedProvider(sim).stream(request()):
            deltas.append(item)
    assert len(deltas) == fail_after
    assert all(isinstance(d, str) for d in deltas)
    assert time.monotonic() - started >= 0.025


async def test_fail_after_more_tokens_than_the_answer_finishes_normally() -> None:
    deltas, finish = await collect(request(max_tokens=3), model(fail_after_tokens=10))
    assert len(deltas) == 3
    assert finish.finish_reason == "length"


async def test_cancellation_stops_promptly() -> None:
    received: list[str | Finish] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for item in SimulatedProvider(model(tokens_per_second=0.5)).stream(request()):
            received.append(item)
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    await asyncio.sleep(0.01)  # let the stream go back to sleeping on its next deadline
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.05
    assert len(received) == 1


async def test_usage_estimates_prompt_tokens_per_message() -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},  # 16 chars -> 4
        {"role": "user", "content": ""},  # at least 1
        {"role": "user", "content": "abcde"},  # 5 chars -> 2
    ]
    deltas, finish = await collect(request(prompt=None, messages=messages, max_tokens=9))
    assert finish.usage.prompt_tokens == 7
    assert finish.usage.completion_tokens == len(deltas) == 9
    assert finish.usage.total_tokens == 16


async def test_kind_and_aclose() -> None:
    provider = SimulatedProvider(model())
    assert provider.kind == "simulated"
    await provider.aclose()


# -- thinking and tool calls -----------------------------------------------------


CALCULATE = function_tool("calculate", {"expression": {"type": "string"}}, ["expression"])
CLOCK = function_tool("get_current_time", {"timezone": {"type": "string"}}, [])
#: An argument of each JSON schema kind, all required, for the simulated model to fill.
WEATHER_ARGUMENTS = {
    "city": {"type": "string"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 3},
    "hourly": {"type": "boolean"},
    "where": {
        "type": "object",
        "properties": {"lat": {"type": "number"}, "note": {"type": "string"}},
        "required": ["lat"],
    },
    "tags": {"type": "array"},
}
WEATHER = function_tool("getCurrentWeather", WEATHER_ARGUMENTS, list(WEATHER_ARGUMENTS))


async def items_of(req: GenerationRequest, sim: SimulatedModel | None = None) -> list[Any]:
    return [item async for item in SimulatedProvider(sim or model()).stream(req)]


def calls_of(items: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, parsed arguments) of each call, from its fragments."""
    calls: dict[int, list[Any]] = {}
    for item in items:
        if isinstance(item, ToolCallDelta):
            if item.id is not None:
                assert item.id.startswith("call_") and item.arguments == ""
                calls[item.index] = [item.name, ""]
            else:
                calls[item.index][1] += item.arguments
    return [(name, json.loads(arguments)) for name, arguments in calls.values()]


async def test_thinking_comes_first_and_counts_against_max_tokens() -> None:
    thinker = model(reasoning_tokens=12)
    items = await items_of(request(max_tokens=20), thinker)
    *deltas, finish = items
    assert [type(d) for d in deltas] == [Reasoning] * 12 + [str] * 8
    assert finish.finish_reason == "length" and finish.usage.completion_tokens == 20
    assert "vector" in "".join(d.text for d in deltas[:12])
    # reasoning_effort "none" (or "minimal") skips it.
    quick = await items_of(request(max_tokens=5, reasoning_effort="none"), thinker)
    assert not any(isinstance(i, Reasoning) for i in quick)


async def test_auto_calls_the_tools_the_last_user_message_mentions() -> None:
    tools = [CALCULATE, CLOCK]
    items = await items_of(request(prompt="Calculate 17 * 23, please", tools=tools))
    assert calls_of(items) == [("calculate", {"expression": "17 * 23"})]
    assert items[-1].finish_reason == "tool_calls"
    both = await items_of(request(prompt="What time is it? And calculate 2+2", tools=tools))
    assert [name for name, _ in calls_of(both)] == ["calculate", "get_current_time"]
    one = await items_of(
        request(prompt="What time is it? And calculate 2+2", tools=tools, parallel_tool_calls=False)
    )
    assert [name for name, _ in calls_of(one)] == ["calculate"]
    # camelCase names are split into words too: "current", "weather".
    weather = await items_of(request(prompt="What is the current weather?", tools=[WEATHER]))
    assert [name for name, _ in calls_of(weather)] == ["getCurrentWeather"]
    # Not mentioned, or tool_choice none: a text answer.
    for unrelated in (request(tools=tools), request(tools=tools, tool_choice="none")):
        text = await items_of(unrelated)
        assert not calls_of(text) and text[-1].finish_reason == "stop"


async def test_required_and_named_choices_always_call_and_fill_the_schema() -> None:
    required = await items_of(request(tools=[WEATHER, CLOCK], tool_choice="required"))
    ((name, arguments),) = calls_of(required)
    assert name == "getCurrentWeather"
    assert arguments["unit"] == "celsius"  # an enum's first value
    assert arguments["days"] == 3 and arguments["hourly"] is True and arguments["tags"] == []
    assert arguments["where"] == {"lat": 1}  # required properties only, recursively
    assert isinstance(arguments["city"], str) and arguments["city"]
    named = {"type": "function", "function": {"name": "get_current_time"}}
    chosen = await items_of(request(tools=[WEATHER, CLOCK], tool_choice=named))
    assert calls_of(chosen) == [("get_current_time", {})]
    # Deterministic for a seed, ids included.
    assert required == await items_of(request(tools=[WEATHER, CLOCK], tool_choice="required"))


async def test_a_tool_result_is_answered_with() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "calculate", "arguments": "{}"},
    }
    messages = [
        {"role": "user", "content": "Calculate 17 * 23"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"result": 391}'},
    ]
    items = await items_of(GenerationRequest(messages=messages, tools=[CALCULATE], seed=1))
    text = "".join(i for i in items if isinstance(i, str))
    assert text.startswith("The calculate tool returned 391.")
    assert items[-1].finish_reason == "stop"
