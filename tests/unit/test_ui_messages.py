"""UIMessages (what `useChat` sends) to OpenAI's chat messages, as the AI SDK's
`convertToModelMessages` does it: steps, tool outputs, what stays in the UI."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.ui_messages import parse_ui_chat


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def weather(state: str, **more: Any) -> dict[str, Any]:
    return {
        "type": "tool-get_weather",
        "toolCallId": "call_1",
        "state": state,
        "input": {"city": "Oslo"},
        **more,
    }


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": "c1", "messages": list(messages), "trigger": "submit-message", **fields}


def converted(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    request = parse_ui_chat(chat(*messages)).request
    # As JSON: the upstream gets lists where the model holds tuples.
    return list(orjson.loads(orjson.dumps([m.for_upstream() for m in request.chat])))


def test_text_parts_of_system_and_user_messages_become_content() -> None:
    assert converted(
        {"id": "s", "role": "system", "parts": [text("Be brief.")]},
        {
            "id": "u",
            "role": "user",
            "parts": [text("Hello"), {"type": "step-start"}, text("there")],
        },
    ) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello\n\nthere"},
    ]


def test_an_image_file_becomes_an_image_url_part_and_app_data_stays_in_the_ui() -> None:
    image = {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAAA"}
    pdf = {"type": "file", "mediaType": "application/pdf", "url": "https://x/y.pdf"}
    data = {"type": "data-weather", "data": {"anything": 1}}
    assert converted(
        {"id": "u", "role": "user", "parts": [text("What is this?"), image, pdf, data]}
    ) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]


def test_an_assistant_tool_round_trip_is_split_into_steps() -> None:
    assistant = {
        "id": "a1",
        "role": "assistant",
        "parts": [
            {"type": "step-start"},
            {"type": "reasoning", "text": "I need the weather."},
            text("Let me look."),
            weather("output-available", output={"celsius": 21}),
            {"type": "step-start"},
            text("It is 21 degrees."),
        ],
    }
    assert converted({"id": "u", "role": "user", "parts": [text("Weather?")]}, assistant)[1:] == [
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius":21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]


def test_text_after_a_call_starts_a_new_step_even_without_step_start() -> None:
    parts = [weather("output-available", output="sunny"), text("Sunny.")]
    out = converted(
        {"id": "u", "role": "user", "parts": [text("Weather?")]},
        {"id": "a1", "role": "assistant", "parts": parts},
    )
    assert [m["role"] for m in out] == ["user", "assistant", "tool", "assistant"]
    assert out[2]["content"] == "sunny"  # a string output is sent as it is


@pytest.mark.parametrize(
    ("part", "content"),
    [
        (weather("output-error", errorText="no network"), "no network"),
        (weather("output-denied"), "the user denied this tool call"),
        (
            {
                **weather("output-available", output=1),
                "type": "dynamic-tool",
                "toolName": "get_weather",
            },
            "1",
        ),
    ],
)
def test_failed_denied_and_dynamic_tool_calls_are_answered(
    part: dict[str, Any], content: str
) -> None:
    out = converted(
        {"id": "u", "role": "user", "parts": [text("Weather?")]},
        {"id": "a1", "role": "assistant", "parts": [part]},
    )
    assert out[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert out[2] == {"role": "tool", "tool_call_id": "call_1", "content": content}


def test_a_call_without_output_is_left_out() -> None:
    out = converted(
        {"id": "u", "role": "user", "parts": [text("Weather?")]},
        {"id": "a1", "role": "assistant", "parts": [text("Checking."), weather("input-available")]},
        {"id": "u2", "role": "user", "parts": [text("Never mind.")]},
    )
    assert out == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "user", "content": "Never mind."},
    ]


def test_a_tool_output_sent_back_continues_the_assistant_message() -> None:
    parsed = parse_ui_chat(
        chat(
            {"id": "u", "role": "user", "parts": [text("Weather?")]},
            {"id": "a1", "role": "assistant", "parts": [weather("output-available", output=2)]},
            messageId="a1",
        )
    )
    assert parsed.continues_message == "a1" and parsed.chat_id == "c1"
    fresh = parse_ui_chat(chat({"id": "u", "role": "user", "parts": [text("Hi")]}))
    assert fresh.continues_message is None


def test_our_request_fields_ride_along() -> None:
    body = chat({"id": "u", "role": "user", "parts": [text("Hi")]}, model="sim-1", max_tokens=5)
    request = parse_ui_chat(body).request
    assert (request.model, request.max_tokens) == ("sim-1", 5)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "parts": [text("Hi")]}]},  # no id
        chat({"role": "user", "parts": [text("Hi")]}, messages=[]),
        chat({"role": "user", "parts": [{"type": "reasoning", "text": "x"}]}),
        chat({"role": "user", "parts": "Hi"}),
        chat({"role": "user", "parts": [text("Hi")]}, unknown_field=1),
        chat({"role": "user", "parts": [text("Hi")]}, messages_extra=None),
    ],
)
def test_bad_bodies_are_invalid_requests(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        parse_ui_chat(body)
