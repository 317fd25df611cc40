"""The memory backend of the generation store: ids, ownership and retention.

Finished logs stay `streams.retention_s` for late resumes; their total size
is bounded by `streams.retention_max_bytes`, evicting the oldest first, so a
burst of long answers cannot grow the process without limit.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import Callable

from gateway.config import StreamSettings
from gateway.errors import GatewayError, GenerationNotFound
from gateway.generation import Generation, LogBudget
from gateway.providers.base import Provider
from gateway.ratelimit import Lease
from gateway.schema import GenerationRequest
from gateway.shared_log import SharedLog

ID_PREFIX = "gen_"


def new_generation_id() -> str:
    """`gen_` and 22 URL-safe characters: 128 random bits."""
    return ID_PREFIX + secrets.token_urlsafe(16)


class GenerationRegistry:
    """Maps unguessable ids to running and recently finished generations."""

    def __init__(
        self,
        settings: StreamSettings,
        shared_log: SharedLog | None = None,
        on_ended: Callable[[Generation], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_ended = on_ended
        self._budget = LogBudget(settings.max_generation_bytes, settings.max_live_bytes)
        self._shared_log = shared_log
        self._running: dict[str, Generation] = {}
        #: Finished logs in the order they finished, which is the order they
        #: expire in (every one is kept `retention_s`): one timer sweeps them,
        #: where a timer per log held ~600 bytes for its whole retention.
        self._finished: OrderedDict[str, Generation] = OrderedDict()
        self._expires_at: dict[str, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._finished_bytes = 0
        self._leases: dict[str, Lease] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        self._idle_waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._running) + len(self._finished)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def live_bytes(self) -> int:
        """Bytes held by the logs of running generations (`streams.max_live_bytes`)."""
        return self._budget.used

    def start(
        self,
        request: GenerationRequest,
        *,
        principal: str,
        model: str,
        provider: Provider,
        resume_grace_s: float | None = None,
        lease: Lease | None = None,
    ) -> Generation:
        """Start a generation; `lease` is released with its usage when it ends."""
        if resume_grace_s is None:
            resume_grace_s = self._settings.resume_grace_s
        generation = Generation(
            generation_id=new_generation_id(),
            principal=principal,
            model=model,
            request=request,
            provider=provider,
            resume_grace_s=resume_grace_s,
            on_finished=self._retain,
            budget=self._budget,
            mirror=self._shared_log,
        )
        self._running[generation.id] = generation
        if self._shared_log is not None:
            self._shared_log.own(generation)
        if lease is not None and lease.limiter is not None:  # else no limit holds anything
            self._leases[generation.id] = lease
        generation.start()
        return generation

    def get(self, generation_id: str, principal: str) -> Generation:
        """The generation if it exists and belongs to `principal`; else 404."""
        generation = self._running.get(generation_id) or self._finished.get(generation_id)
        if generation is None or not secrets.compare_digest(generation.principal, principal):
            raise GenerationNotFound(f"generation {generation_id[:64]!r} not found")
        return generation

    async def wait_idle(self) -> None:
        """Until no generation runs (the drain waits on this)."""
        if self._running:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _retain(self, generation: Generation) -> None:
        self._running.pop(generation.id, None)
        if self._on_ended is not None:
            self._on_ended(generation)
        if not self._running:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        lease = self._leases.pop(generation.id, None)
        if lease is not None and not lease.release_now(generation.used_tokens):
            task = asyncio.get_running_loop().create_task(lease.release(generation.used_tokens))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
        if self._settings.retention_s <= 0:
            return
        for event in generation.events:
            event.forget_encoding()
        self._finished[generation.id] = generation
        self._finished_bytes += generation.size_bytes
        loop = asyncio.get_running_loop()
        self._expires_at[generation.id] = expires_at = loop.time() + self._settings.retention_s
        if self._sweeper is None:
            self._sweeper = loop.call_at(expires_at, self._sweep)
        while self._finished_bytes > self._settings.retention_max_bytes and self._finished:
            self._forget(next(iter(self._finished)))

    def _sweep(self) -> None:
        """Forget the logs whose retention is over; re-arm for the next one."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = []
        for generation_id in self._finished:
            if self._expires_at[generation_id] > now:
                break
            expired.append(generation_id)
        for generation_id in expired:
            self._forget(generation_id)
        if self._finished:
            first = self._expires_at[next(iter(self._finished))]
            self._sweeper = loop.call_at(first, self._sweep)

    def _forget(self, generation_id: str) -> None:
        generation = self._finished.pop(generation_id, None)
        if generation is not None:
            self._finished_bytes -= generation.size_bytes
        self._expires_at.pop(generation_id, None)

    def stop_all(self, error: GatewayError) -> None:
        """End every running generation with `error` (e.g. `shutting_down`)."""
        for generation in list(self._running.values()):
            generation.cancel("shutdown", error)

    async def aclose(self) -> None:
        """Cancel what still runs and drop every log; nothing outlives the app."""
        running = list(self._running.values())
        for generation in running:
            generation.cancel("shutdown")
        await asyncio.gather(*(g.wait() for g in running), return_exceptions=True)
        await asyncio.gather(*self._releasing, return_exceptions=True)
        for generation_id in list(self._finished):
            self._forget(generation_id)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
