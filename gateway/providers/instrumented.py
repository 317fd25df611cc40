"""Upstream metrics around one provider: requests by result, first-token time, cancellations.

It wraps each configured model's own provider, below the retry and fallback
chain, so every attempt is one upstream request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.metrics import UpstreamChildren
from gateway.providers.base import Deliver, Finish, Item, Provider
from gateway.schema import GenerationRequest


def upstream_result(exc: UpstreamError) -> str:
    """The `status` label of a failed upstream request."""
    if exc.result is not None:
        return exc.result
    return "timeout" if isinstance(exc, UpstreamTimeout) else "stream_error"


class InstrumentedProvider:
    """Passes items through; one extra `if` per item beyond the first."""

    def __init__(self, inner: Provider, children: UpstreamChildren) -> None:
        self._inner = inner
        self._children = children
        self.kind = inner.kind

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def stream(
        self, request: GenerationRequest, deliver: Deliver | None = None
    ) -> AsyncGenerator[Item, None]:
        children = self._children
        started = time.monotonic()
        waiting_for_first = True
        result: str | None = None
        try:
            async with aclosing(self._inner.stream(request, deliver)) as items:
                async for item in items:
                    if item.__class__ is Finish:
                        result = "200"
                        # An answer that came in one read has its deltas here.
                        if waiting_for_first and item.deltas is not None:
                            children.ttft.observe(time.monotonic() - started)
                    elif waiting_for_first:
                        waiting_for_first = False
                        children.ttft.observe(time.monotonic() - started)
                    yield item
        except UpstreamError as exc:
            result = upstream_result(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if result is None:
                result = "cancelled"
                children.cancellations.inc()
            raise
        finally:
            children.request(result or "stream_error").inc()
