"""Which single-use stream tickets (`auth.tickets_single_use`) were spent already.

In memory a ticket could open one stream on every replica, so with Redis in
use (either backend) the spent ids are shared: `SET … NX EXAT`, one atomic
command, kept until the ticket could no longer be used anyway. While Redis
cannot answer, each replica falls back to its own memory (logged once per
outage): a ticket may then open one stream per replica, never more, and never
is a stream refused because the store is down.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from typing import Protocol

log = logging.getLogger(__name__)

#: A spent ticket's id is kept this long past its expiry (clock skew between replicas).
SPENT_MARGIN_S = 5.0
_REDIS_PREFIX = "gateway:ticket-used:"


class SpentTickets(Protocol):
    async def use(self, jti: str, expires_at: float) -> bool:
        """True the first time `jti` is used, False on every later try."""
        ...

    async def aclose(self) -> None: ...


class UsedTickets:
    """Ids (`jti`) of spent tickets in this process, each kept until its ticket expires."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def spend(self, jti: str, expires_at: float, now: float | None = None) -> bool:
        """True the first time `jti` is spent, False on every later try."""
        now = time.time() if now is None else now
        while self._expiries and self._expiries[0][0] <= now:
            _, gone = heapq.heappop(self._expiries)
            del self._until[gone]
        if jti in self._until:
            return False
        until = expires_at + SPENT_MARGIN_S
        self._until[jti] = until
        heapq.heappush(self._expiries, (until, jti))
        return True

    async def use(self, jti: str, expires_at: float) -> bool:
        return self.spend(jti, expires_at)

    async def aclose(self) -> None:
        self._until.clear()
        self._expiries.clear()


class RedisSpentTickets:
    """Spent ids shared by every replica through one Redis key each."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        # A small bounded pool with short timeouts: a ticket check costs a
        # stream milliseconds, and a dead Redis must not hold connections open.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=16, timeout=0.5, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            OSError,
            asyncio.TimeoutError,
        )
        self._local = UsedTickets()
        self._degraded = False

    async def use(self, jti: str, expires_at: float) -> bool:
        until = math.ceil(expires_at + SPENT_MARGIN_S)
        try:
            first = await self._redis.set(_REDIS_PREFIX + jti, 1, nx=True, exat=until)
        except self._errors as exc:
            if not self._degraded:
                self._degraded = True
                log.warning(
                    "spent tickets are kept in this replica's memory until Redis answers",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
            return self._local.spend(jti, expires_at)
        if self._degraded:
            self._degraded = False
            log.info("spent tickets are shared through Redis again")
        # Spent here while Redis was down counts too.
        return bool(first) and self._local.spend(jti, expires_at)

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()
