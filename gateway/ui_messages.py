"""The AI SDK's chat request (`DefaultChatTransport`'s body) as our chat request.

`useChat` sends its whole conversation as UIMessages: each has a role and a
list of `parts` (text, reasoning, tool calls with their outputs, step
boundaries, files, app data). The model needs OpenAI's messages instead:
here each UIMessage becomes one or more of them, following the AI SDK's own
`convertToModelMessages`:

- user and system text parts become the message's content; image files
  become `image_url` parts; other parts (data, sources, files) stay in the UI;
- an assistant message is cut into steps (at `step-start`, or where text
  follows a tool call): each step is an assistant message with its text and
  `tool_calls`, followed by one `tool` message per call with its output;
- reasoning is not sent back (OpenAI-compatible servers refuse it or ignore
  it), and a call without an output yet (the user went on before the tool
  ran, or the answer was stopped mid-call) is left out, as the model would
  otherwise be asked to answer a call nobody answered.

Fields our other routes take (`model`, `max_tokens`, `tools` …) may ride in
the same body (the transport's `body` option); anything else is a 400, as
on every route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.chat import MAX_TEXT_CHARS
from gateway.errors import InvalidRequest
from gateway.schema import GenerationRequest, describe_validation_error, parse_generation_request

#: A chat id travels in the reconnect URL path; the SDK's are 16 characters.
MAX_CHAT_ID_CHARS = 200
#: The AI SDK's body fields; the rest of the body is our request's.
_SDK_FIELDS = frozenset({"id", "messages", "trigger", "messageId"})
#: Tool-part states that carry the call's result.
_ANSWERED = frozenset({"output-available", "output-error", "output-denied"})


class UIPart(BaseModel):
    """One part; only what the conversion reads is checked, the rest is the UI's."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(min_length=1, max_length=200)
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    # tool-<name> and dynamic-tool parts
    toolCallId: str | None = Field(default=None, min_length=1, max_length=256)
    toolName: str | None = Field(default=None, max_length=64)
    state: str | None = Field(default=None, max_length=64)
    input: Any = None
    output: Any = None
    errorText: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    # file parts
    mediaType: str | None = Field(default=None, max_length=200)
    url: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)


class UIMessage(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(default="", max_length=256)
    role: Literal["system", "user", "assistant"]
    parts: tuple[UIPart, ...] = Field(max_length=10_000)


class UIChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=MAX_CHAT_ID_CHARS)
    messages: tuple[UIMessage, ...] = Field(min_length=1, max_length=1000)
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = Field(default=None, max_length=256)


@dataclass(frozen=True, slots=True)
class UIChat:
    """A parsed UI request: which chat, our generation request, and the id of the
    assistant message the answer continues (a tool result sent back), if any."""

    chat_id: str
    request: GenerationRequest
    continues_message: str | None
    #: That message's parts so far (a replay of the answer must show them again).
    earlier_parts: tuple[UIPart, ...] = ()


def parse_ui_chat(data: dict[str, Any]) -> UIChat:
    """Validate the AI SDK's body and convert its conversation (400 on bad input)."""
    sdk = {k: v for k, v in data.items() if k in _SDK_FIELDS}
    ours = {k: v for k, v in data.items() if k not in _SDK_FIELDS}
    if "messages" in ours or "prompt" in ours:
        raise InvalidRequest("prompt: the AI SDK route takes its conversation as UI `messages`")
    try:
        chat = UIChatRequest.model_validate(sdk)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    messages = to_chat_messages(chat.messages)
    if not messages:
        raise InvalidRequest("messages: nothing to send (no text, file or tool output in any part)")
    request = parse_generation_request({**ours, "messages": messages})
    # A tool's output sent back continues the assistant message that called it.
    last = chat.messages[-1]
    if last.role == "assistant" and last.id:
        return UIChat(chat.id, request, last.id, last.parts)
    return UIChat(chat.id, request, None)


def to_chat_messages(messages: tuple[UIMessage, ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "assistant":
            out.extend(_assistant_messages(message.parts))
            continue
        content = _content(message.parts, files=message.role == "user")
        if content:
            out.append({"role": message.role, "content": content})
    return out


def _content(parts: tuple[UIPart, ...], *, files: bool) -> str | list[dict[str, Any]]:
    """A string when the message is text only (what every server takes), else parts."""
    texts = [p.text for p in parts if p.type == "text" and p.text]
    images = [
        p.url
        for p in parts
        if files and p.type == "file" and p.url and (p.mediaType or "").startswith("image/")
    ]
    if not images:
        return "\n\n".join(texts)
    content: list[dict[str, Any]] = [{"type": "text", "text": t} for t in texts]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return content


def tool_name(part: UIPart) -> str | None:
    if part.type == "dynamic-tool":
        return part.toolName
    if part.type.startswith("tool-"):
        return part.type.removeprefix("tool-")
    return None


def _tool_output(part: UIPart) -> str:
    if part.state == "output-error":
        return part.errorText or "the tool failed"
    if part.state == "output-denied":
        return "the user denied this tool call"
    output = part.output
    return output if isinstance(output, str) else orjson.dumps(output).decode()


class _Step:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: list[tuple[str, UIPart]] = []

    def messages(self) -> list[dict[str, Any]]:
        if not self.text and not self.calls:
            return []
        assistant: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if self.calls:
            assistant["tool_calls"] = [
                {
                    "id": part.toolCallId,
                    "type": "function",
                    "function": {"name": name, "arguments": orjson.dumps(part.input).decode()},
                }
                for name, part in self.calls
            ]
        if assistant["content"] is None and not self.calls:
            return []
        results = [
            {"role": "tool", "tool_call_id": part.toolCallId, "content": _tool_output(part)}
            for _, part in self.calls
        ]
        return [assistant, *results]


def _assistant_messages(parts: tuple[UIPart, ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    step = _Step()
    for part in parts:
        name = tool_name(part)
        if part.type == "step-start" or (part.type == "text" and part.text and step.calls):
            out.extend(step.messages())
            step = _Step()
        if part.type == "text" and part.text:
            step.text.append(part.text)
        elif name and part.toolCallId and part.state in _ANSWERED:
            step.calls.append((name, part))
    out.extend(step.messages())
    return out
