"""A message goes to the upstream with exactly the fields its client set."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.chat import Message
from gateway.schema import parse_generation_request

MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "hi"},
    {"role": "system", "content": ""},
    {"role": "user", "content": "x", "name": "ann"},
    {"role": "user", "content": "x", "cache_control": {"type": "ephemeral"}},  # an extra
    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]},
    {"role": "assistant", "content": None, "refusal": "no"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]},
    {"role": "tool", "content": "42", "tool_call_id": "c1"},
]  # fmt: skip


@pytest.mark.parametrize("given", MESSAGES)
def test_for_upstream_is_the_dump_of_what_was_set(given: dict[str, Any]) -> None:
    """The usual shape is built without pydantic's serializer: it must equal the dump."""
    message = Message.model_validate(given)
    assert message.for_upstream() == message.model_dump(exclude_unset=True)


def test_a_prompt_becomes_a_user_message() -> None:
    request = parse_generation_request({"prompt": "Hi"})
    assert [m.for_upstream() for m in request.chat] == [{"role": "user", "content": "Hi"}]


def test_for_upstream_leaves_what_the_client_sent() -> None:
    request = parse_generation_request({"messages": MESSAGES[:1], "max_tokens": 5})
    sent = request.model_dump(exclude_unset=True)
    upstream = request.for_upstream(request_id="r1", passthrough={"logprobs": True})
    assert upstream.request_id == "r1" and upstream.passthrough == {"logprobs": True}
    assert upstream.model_dump(exclude_unset=True) == sent
