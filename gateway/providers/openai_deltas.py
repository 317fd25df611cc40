"""The parts of an OpenAI `chat.completion.chunk` delta beyond plain text.

A delta may carry the model's thinking (`reasoning_content`, as vLLM,
DeepSeek and others send it, or `reasoning`, as OpenRouter and newer vLLM
do), fragments of tool calls, a refusal, or content this gateway cannot
carry (legacy `function_call`, `audio`, custom tools). What it can carry
becomes our deltas; what it cannot ends the stream with an explicit error,
so nothing an upstream sent is dropped silently.

Upstreams differ in how they shape tool-call fragments, and strict clients
break on the difference, so fragments are normalised here, once: every
fragment has an `index` (a server that omits it, TensorZero #1266, gets one
from the call's `id`), the first fragment of each call has an `id` (made up
when missing, LiteLLM #11407) and a `name`, and object-valued `arguments`
(some servers send parsed JSON) become the JSON string OpenAI sends.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, cast

import orjson

from gateway.errors import UpstreamError
from gateway.providers.base import FINISH_REASONS, Delta, FinishReason, Reasoning, ToolCallDelta

_REASONING_KEYS = ("reasoning_content", "reasoning")
#: Delta fields that the chat stream documents but this gateway cannot forward.
_UNSUPPORTED = {
    "function_call": "a legacy `function_call` (send `tools` instead of `functions`)",
    "audio": "audio output",
}
_MAX_REFUSAL_CHARS = 2000


def new_call_id() -> str:
    """An id shaped like OpenAI's (`call_` and 24 characters)."""
    return "call_" + secrets.token_hex(12)


class DeltaReader:
    """Reads the non-text parts of one stream's deltas, keeping its tool-call state."""

    def __init__(self, label: str) -> None:
        self._label = label
        #: The id of each call index seen so far.
        self._calls: dict[int, str] = {}
        self._last_index: int | None = None
        self._refusal: list[str] = []

    def read(self, delta: Mapping[str, Any], out: list[Delta]) -> bool:
        """Append the deltas in `delta` to `out`, in OpenAI's field order; True if not all text."""
        mixed = False
        for key in _REASONING_KEYS:
            reasoning = delta.get(key)
            if reasoning and isinstance(reasoning, str):
                out.append(Reasoning(reasoning))
                mixed = True
                break  # servers that send both send the same text twice
        text = delta.get("content")
        if text and isinstance(text, str):
            out.append(text)
        for position, call in enumerate(delta.get("tool_calls") or ()):
            fragment = self._tool_call(call, position)
            if fragment is not None:
                out.append(fragment)
                mixed = True
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            self._refusal.append(refusal)
        for key, what in _UNSUPPORTED.items():
            if delta.get(key):
                raise self._unsupported(what)
        return mixed

    def finish_reason(self, raw: str) -> FinishReason:
        """Our finish reason for the upstream's; a refusal or a legacy call is an error."""
        if self._refusal:
            refusal = "".join(self._refusal)[:_MAX_REFUSAL_CHARS]
            raise UpstreamError(
                f"{self._label} refused: {refusal}", retryable=False, fallback=False
            )
        if raw == "function_call":
            raise self._unsupported(_UNSUPPORTED["function_call"])
        if raw == "tool_calls" or (raw == "stop" and self._calls):
            # Some servers (older Ollama, llama.cpp) end a tool call with `stop`;
            # agent frameworks branch on `tool_calls`.
            return "tool_calls"
        if raw in FINISH_REASONS:
            return cast(FinishReason, raw)
        return "stop"

    def _tool_call(self, call: Any, position: int) -> ToolCallDelta | None:
        if not isinstance(call, Mapping):
            raise UpstreamError(f"{self._label} sent a malformed tool call")
        if call.get("type", "function") not in ("function", None) or "custom" in call:
            raise self._unsupported("a custom (non-function) tool call")
        function = call.get("function") or {}
        if not isinstance(function, Mapping):
            raise UpstreamError(f"{self._label} sent a malformed tool call")
        call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
        index = self._index_of(call.get("index"), call_id, position)
        arguments = _arguments(function.get("arguments"))
        if index not in self._calls:
            self._calls[index] = call_id or new_call_id()
            name = function.get("name")
            return ToolCallDelta(
                index, arguments, id=self._calls[index], name=name if isinstance(name, str) else ""
            )
        return ToolCallDelta(index, arguments) if arguments else None

    def _index_of(self, index: Any, call_id: str | None, position: int) -> int:
        """The call's index; without one, a new id starts a call and no id continues the last."""
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < 1024:
            self._last_index = index
            return index
        if call_id is not None and call_id not in self._calls.values():
            chosen = len(self._calls)
        elif self._last_index is not None:
            chosen = self._last_index
        else:
            chosen = position
        self._last_index = chosen
        return chosen

    def _unsupported(self, what: str) -> UpstreamError:
        return UpstreamError(
            f"{self._label} answered with {what}, which this gateway does not forward",
            retryable=False,
            fallback=False,
        )


def _arguments(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()  # parsed JSON from servers that send an object
