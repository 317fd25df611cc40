"""The seam between the generation core and an upstream model.

A provider turns a request into an async iterator of deltas followed by
exactly one `Finish`. A text delta is a plain `str`; the model's visible
thinking is a `Reasoning` and a fragment of a function call a
`ToolCallDelta`. Deltas that arrived together come as one batch: a `list`
of non-empty strings when they are all text (the per-token fast path: the
generation logs them with one wake-up of its readers, which a fast upstream
sending dozens of chunks per read needs), else a `tuple` of any deltas, in
the order the upstream sent them.

It never sees clients or transports: the generation core owns its task and
closes it by cancellation, so a provider must release its upstream connection
in `finally` (or an `async with`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, get_args

from gateway.schema import GenerationRequest

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
#: OpenAI's finish reasons, the ones this gateway speaks both ways.
FINISH_REASONS: frozenset[str] = frozenset(get_args(FinishReason))


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A delta of the model's visible thinking (`delta.reasoning_content` upstream)."""

    text: str
    type: ClassVar[str] = "reasoning"

    def fields(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of function call `index`; its first fragment carries `id` and `name`."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    type: ClassVar[str] = "tool_call"

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            fields["id"] = self.id
        if self.name is not None:
            fields["name"] = self.name
        fields["arguments"] = self.arguments
        return fields


#: What one batch may hold besides plain text.
Delta = str | Reasoning | ToolCallDelta


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


#: A delta, or the deltas of one upstream read as one batch.
Deltas = str | list[str] | tuple[Delta, ...] | Reasoning | ToolCallDelta


@dataclass(frozen=True, slots=True)
class Finish:
    """The last item of a provider stream.

    `deltas`: those of the read that also brought the answer's end. They are
    logged together with the end, so that a reader writes both in one send
    instead of the deltas (pushed at once) and then the end a loop turn later.
    """

    finish_reason: FinishReason
    usage: Usage
    deltas: Deltas | None = None


#: One item of a provider stream: a delta, a batch of deltas, or the closing `Finish`.
Item = Deltas | Finish


#: Takes the deltas of one upstream read, synchronously, from wherever they arrive.
Deliver = Callable[[Deltas], object]


class Provider(Protocol):
    """An upstream model. Failures are raised as `gateway.errors.UpstreamError`."""

    #: The fixed `provider` metric label (`simulated`, `openai`).
    kind: str

    def stream(
        self, request: GenerationRequest, deliver: Deliver | None = None
    ) -> AsyncGenerator[Item, None]:
        """Yield deltas (one, or a batch of those that arrived together), then one `Finish`.

        With `deliver`, a provider may hand the deltas after the first ones to
        it as they arrive (inside the connection's read callback) instead of
        yielding them; it yields at least the first delta (or a `Finish` that
        carries it, for an answer that came in one read) and the `Finish`, so
        what wraps it (metrics, retries before the first token) still sees
        both. It may raise what `deliver` raises.
        """
        ...

    async def aclose(self) -> None:
        """Release shared resources (connection pools) at shutdown."""
        ...
