"""Per-principal limits: requests/min, tokens/min (reserved, then reconciled), streams.

A generation is admitted once, atomically against all three limits, and
holds a `Lease` until it ends however it ends. Tokens are reserved up front
(the prompt estimate plus `max_tokens`, or `rate_limit.default_reserve_tokens`)
so that many concurrent streams cannot overshoot the budget, and the lease's
release refunds what was not used, so a cancelled stream pays only for what
it streamed. A limit of 0 means no limit.

Two backends with one semantics: `memory` (one process) and `redis` (one Lua
script per decision, so every replica shares one budget). Concurrency leases
in Redis carry an expiry that the owning replica keeps refreshing, so slots
held by a replica that crashed free themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gateway.config import Limits, RateLimitSettings
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")
#: A Redis concurrency lease lives this long unless its replica refreshes it.
LEASE_TTL_S = 30.0
_REFRESH_EVERY_S = LEASE_TTL_S / 3
#: After a Redis failure, skip it for this long (no per-request connect timeouts).
_BACKOFF_S = 1.0
_LOG_EVERY_S = 30.0


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"
    retryable = True


@dataclass(frozen=True, slots=True)
class Refusal:
    """Which limit refused, and the `RateLimit-*` figures for the response."""

    limit: str
    limit_value: int
    remaining: int
    retry_after_s: float

    def error(self) -> RateLimited:
        wait = max(1, math.ceil(self.retry_after_s))
        headers = {
            "Retry-After": str(wait),
            "RateLimit-Limit": str(self.limit_value),
            "RateLimit-Remaining": str(max(0, self.remaining)),
            "RateLimit-Reset": str(wait),
        }
        message = f"{self.limit} limit of {self.limit_value} reached; retry in {wait} s"
        return RateLimited(message, headers=headers)


class Backend(Protocol):
    async def acquire(
        self, key: str, limits: Limits, reserve: int, lease_id: str
    ) -> Refusal | None: ...

    async def release(self, key: str, limits: Limits, lease_id: str, refund: int) -> None: ...

    async def refresh(self, leases: list[tuple[str, str]]) -> None: ...

    async def aclose(self) -> None: ...


class BackendUnavailable(Exception):
    """The shared store could not answer; the limiter applies `fail_open`."""


@dataclass(slots=True)
class Lease:
    """One admitted generation's hold on its principal's budget."""

    limiter: RateLimiter | None
    key: str
    limits: Limits
    lease_id: str
    reserved: int
    released: bool = False

    async def release(self, used_tokens: int) -> None:
        """Free the stream slot and refund `reserved - used_tokens` (idempotent)."""
        if self.released:
            return
        self.released = True
        if self.limiter is not None:
            await self.limiter.release(self, used_tokens)


# -- memory ------------------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    """A token bucket that refills its whole capacity over a minute."""

    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60)
        self.stamp = now
        return self.level

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level) * 60 / self.capacity)


@dataclass(slots=True)
class _PrincipalState:
    buckets: dict[str, _Bucket] = field(default_factory=dict)
    leases: set[str] = field(default_factory=set)

    def bucket(self, name: str, capacity: int, now: float) -> _Bucket:
        bucket = self.buckets.get(name)
        if bucket is None or bucket.capacity != capacity:
            bucket = self.buckets[name] = _Bucket(capacity, capacity, now)
        bucket.refill(now)
        return bucket

    def idle(self, now: float) -> bool:
        """Nothing held and every bucket full again: forgetting it changes nothing."""
        return not self.leases and all(b.refill(now) >= b.capacity for b in self.buckets.values())


class MemoryBackend:
    """One process's limits; states of idle principals are swept once a minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _PrincipalState] = {}
        self._swept = self._clock()

    def __len__(self) -> int:
        return len(self._states)

    async def acquire(
        self, key: str, limits: Limits, reserve: int, lease_id: str
    ) -> Refusal | None:
        now = self._clock()
        self._sweep(now)
        state = self._states.setdefault(key, _PrincipalState())
        if limits.concurrent_streams and len(state.leases) >= limits.concurrent_streams:
            return Refusal("concurrent_streams", limits.concurrent_streams, 0, 1.0)
        requests = tokens = None
        if limits.requests_per_minute:
            requests = state.bucket("requests", limits.requests_per_minute, now)
            if requests.level < 1:
                return Refusal(
                    "requests_per_minute",
                    limits.requests_per_minute,
                    0,
                    requests.wait_for(1),
                )
        if limits.tokens_per_minute:
            tokens = state.bucket("tokens", limits.tokens_per_minute, now)
            need = min(reserve, limits.tokens_per_minute)
            if tokens.level < need:
                return Refusal(
                    "tokens_per_minute",
                    limits.tokens_per_minute,
                    math.floor(tokens.level),
                    tokens.wait_for(need),
                )
            tokens.level -= need
        if requests is not None:
            requests.level -= 1
        if limits.concurrent_streams:
            state.leases.add(lease_id)
        return None

    async def release(self, key: str, limits: Limits, lease_id: str, refund: int) -> None:
        state = self._states.get(key)
        if state is None:
            return
        state.leases.discard(lease_id)
        if limits.tokens_per_minute and refund:
            bucket = state.bucket("tokens", limits.tokens_per_minute, self._clock())
            bucket.level = min(bucket.capacity, bucket.level + refund)

    async def refresh(self, leases: list[tuple[str, str]]) -> None:
        """Memory leases die with the process; nothing to refresh."""

    async def aclose(self) -> None:
        self._states.clear()

    def _sweep(self, now: float) -> None:
        if now - self._swept < 60:
            return
        self._swept = now
        for key in [k for k, state in self._states.items() if state.idle(now)]:
            del self._states[key]


# -- redis -------------------------------------------------------------------

_SCRIPTS = Path(__file__).with_name("lua")


class RedisBackend:
    """All replicas share one budget: every decision is one atomic Lua call."""

    def __init__(self, url: str, lease_ttl_s: float = LEASE_TTL_S) -> None:
        import redis.asyncio as redis

        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        # Blocking pool: the default pool raises at 100 concurrent commands (NOTES §10).
        # Short timeouts: a dead Redis must cost a request milliseconds, not seconds.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=64,
            timeout=0.5,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            OSError,
            asyncio.TimeoutError,
        )
        self._acquire = self._redis.register_script((_SCRIPTS / "acquire.lua").read_text())
        self._release = self._redis.register_script((_SCRIPTS / "release.lua").read_text())
        self._refresh = self._redis.register_script((_SCRIPTS / "refresh.lua").read_text())

    @staticmethod
    def _keys(key: str) -> list[str]:
        # One hash tag: all of a principal's keys live in one Redis Cluster slot.
        tag = "{rl:" + key + "}"
        return [tag + ":requests", tag + ":tokens", tag + ":streams"]

    async def acquire(
        self, key: str, limits: Limits, reserve: int, lease_id: str
    ) -> Refusal | None:
        args = [
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.concurrent_streams,
            reserve,
            lease_id,
            self._lease_ttl_ms,
        ]
        try:
            allowed, limit, wait_ms, remaining = await self._acquire(self._keys(key), args)
        except self._errors as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if int(allowed):
            return None
        name = limit.decode() if isinstance(limit, bytes) else str(limit)
        return Refusal(name, getattr(limits, name), int(remaining), int(wait_ms) / 1000)

    async def release(self, key: str, limits: Limits, lease_id: str, refund: int) -> None:
        keys = self._keys(key)[1:]
        try:
            await self._release(keys, [limits.tokens_per_minute, refund, lease_id])
        except self._errors as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def refresh(self, leases: list[tuple[str, str]]) -> None:
        by_key: dict[str, list[str]] = {}
        for key, lease_id in leases:
            by_key.setdefault(key, []).append(lease_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, ids in by_key.items():
                    await self._refresh(
                        [self._keys(key)[2]], [self._lease_ttl_ms, *ids], client=pipe
                    )
                await pipe.execute()
        except self._errors as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except self._errors:
            return False

    async def aclose(self) -> None:
        # A pool passed in is not closed by `Redis.aclose()`; close its sockets too.
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()


# -- the limiter -------------------------------------------------------------


class RateLimiter:
    """Admits generations against a backend; applies `fail_open` when it is down."""

    def __init__(self, settings: RateLimitSettings, backend: Backend) -> None:
        self._settings = settings
        self._backend = backend
        self._held: dict[str, Lease] = {}
        self._down_until = 0.0
        self._logged_at = -math.inf
        self._refresher: asyncio.Task[None] | None = None
        self.backend_errors = 0
        #: Called with the refusing limit's name (a metric label).
        self.on_refused: list[RefusalHook] = []
        #: Called on every failed backend call.
        self.on_backend_error: list[Callable[[], None]] = []

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def held(self) -> int:
        return len(self._held)

    def start(self) -> None:
        if isinstance(self._backend, RedisBackend):
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def admit(self, key: str, limits: Limits, reserve: int) -> Lease:
        """A lease on `key`'s budget, or `RateLimited` (HTTP 429 / `rate_limited`)."""
        reserve = max(0, reserve)
        lease = Lease(self, key, limits, secrets.token_hex(8), reserve)
        if not (
            limits.requests_per_minute or limits.tokens_per_minute or limits.concurrent_streams
        ):
            lease.limiter = None
            return lease
        if time.monotonic() < self._down_until:
            return self._unavailable(lease, None)
        try:
            refusal = await self._backend.acquire(key, limits, reserve, lease.lease_id)
        except BackendUnavailable as exc:
            return self._unavailable(lease, exc)
        if refusal is not None:
            for hook in self.on_refused:
                hook(refusal.limit)
            raise refusal.error()
        self._held[lease.lease_id] = lease
        return lease

    async def release(self, lease: Lease, used_tokens: int) -> None:
        if self._held.pop(lease.lease_id, None) is None:
            return  # admitted while the backend was down: nothing was recorded
        refund = lease.reserved - used_tokens
        try:
            await self._backend.release(lease.key, lease.limits, lease.lease_id, refund)
        except BackendUnavailable as exc:
            # The lease expires on its own; the unused reservation is not refunded.
            self._note_failure(exc)

    def _unavailable(self, lease: Lease, exc: BackendUnavailable | None) -> Lease:
        if exc is not None:
            self._note_failure(exc)
        if self._settings.fail_open:
            lease.limiter = None
            return lease
        for hook in self.on_refused:
            hook("backend_unavailable")
        raise RateLimited(
            "rate limiter unavailable; retry shortly",
            status=503,
            headers={"Retry-After": "1"},
        )

    def _note_failure(self, exc: BackendUnavailable) -> None:
        self.backend_errors += 1
        for hook in self.on_backend_error:
            hook()
        now = time.monotonic()
        self._down_until = now + _BACKOFF_S
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            policy = "allowing (fail_open)" if self._settings.fail_open else "refusing"
            log.warning(
                "rate-limit backend unavailable; %s requests",
                policy,
                extra={"error": str(exc), "errors_so_far": self.backend_errors},
            )

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(_REFRESH_EVERY_S)
            leases = [(lease.key, lease.lease_id) for lease in self._held.values()]
            if not leases:
                continue
            try:
                await self._backend.refresh(leases)
            except BackendUnavailable as exc:
                self._note_failure(exc)

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self._backend.aclose()


class RefusalHook(Protocol):
    def __call__(self, limit: str) -> None: ...


def make_limiter(settings: RateLimitSettings, redis_url: str) -> RateLimiter:
    backend: Backend = MemoryBackend() if settings.backend == "memory" else RedisBackend(redis_url)
    return RateLimiter(settings, backend)
