"""The seam between the generation core and an upstream model.

A provider turns a request into an async iterator of text deltas followed by
exactly one `Finish`. Deltas that arrived together may come as one list of
non-empty strings: the generation logs them with one wake-up of its readers,
which a fast upstream (dozens of chunks per read) needs.

It never sees clients or transports: the generation core owns its task and
closes it by cancellation, so a provider must release its upstream connection
in `finally` (or an `async with`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.schema import GenerationRequest

FinishReason = Literal["stop", "length", "content_filter"]


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


@dataclass(frozen=True, slots=True)
class Finish:
    """The last item of a provider stream."""

    finish_reason: FinishReason
    usage: Usage


class Provider(Protocol):
    """An upstream model. Failures are raised as `gateway.errors.UpstreamError`."""

    #: The fixed `provider` metric label (`simulated`, `openai`).
    kind: str

    def stream(self, request: GenerationRequest) -> AsyncGenerator[str | list[str] | Finish, None]:
        """Yield text deltas (one, or a list of those that arrived together), then one `Finish`."""
        ...

    async def aclose(self) -> None:
        """Release shared resources (connection pools) at shutdown."""
        ...
