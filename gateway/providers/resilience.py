"""Retries and fallbacks, before the first token only.

Once a token has reached the log, another attempt would duplicate text, so a
failure after it is final: the client gets an `error` event. Before it,
retryable failures (connection errors, timeouts, 429, 5xx) are retried with
jittered exponential backoff up to the model's `max_retries`, then each
model in `fallbacks` is tried in order with its own retries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from gateway.errors import UpstreamError
from gateway.providers.base import Deliver, Item, Provider
from gateway.schema import GenerationRequest

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0


def backoff_s(attempt: int, retry_after_s: float | None = None) -> float:
    """0.5·2ⁿ s capped at 8 s, minus up to 25% jitter; an upstream's Retry-After wins."""
    if retry_after_s is not None:
        return retry_after_s
    # 2.0, not 2: typeshed types `int ** int` as Any (a negative exponent gives a float).
    delay = min(BACKOFF_BASE_S * 2.0**attempt, BACKOFF_CAP_S)
    return delay * (1 - 0.25 * random.random())


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream in the chain and how often to retry it."""

    provider: Provider
    max_retries: int


class FallbackChain:
    """A provider that tries its attempts in order until one yields a token."""

    def __init__(self, attempts: Sequence[Attempt]) -> None:
        self._attempts = tuple(attempts)
        self.kind = attempts[0].provider.kind

    async def aclose(self) -> None:
        """The providers are shared with their own catalog entries, which close them."""

    async def stream(
        self, request: GenerationRequest, deliver: Deliver | None = None
    ) -> AsyncGenerator[Item, None]:
        failure: UpstreamError | None = None
        for attempt in self._attempts:
            for retry in range(attempt.max_retries + 1):
                if retry:
                    assert failure is not None
                    await asyncio.sleep(backoff_s(retry - 1, failure.retry_after_s))
                started = False
                try:
                    async with aclosing(attempt.provider.stream(request, deliver)) as items:
                        async for item in items:
                            started = True
                            yield item
                    return
                except UpstreamError as exc:
                    if started:
                        raise
                    failure = exc
                    if not exc.retryable:
                        break
            assert failure is not None
            if not failure.fallback:
                break
        assert failure is not None
        raise failure
