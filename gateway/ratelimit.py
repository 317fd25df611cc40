"""Per-principal limits: requests/min, tokens/min (a sliding minute), streams.

A generation is admitted once, atomically against all three limits, and
holds a `Lease` until it ends however it ends.

Tokens per minute, the accounting (the same in both backends), a sliding
window of one minute rather than a refilling bucket, because a bucket that
starts full and refills serves up to twice its budget in a minute:

- A lease's real usage (prompt plus completion) is recorded when the lease
  ends, whatever it is, stamped with that moment; it counts against the
  budget for the next 60 seconds, then not at all.
- While a lease runs it *holds* a reservation: the prompt estimate plus
  `max_tokens` (or `rate_limit.default_reserve_tokens`), capped at the whole
  budget. A generation is admitted only if the usage recorded in the last
  minute, plus what running leases hold, plus its own reservation, fits the
  budget.
- A request whose prompt estimate alone exceeds the whole budget can never
  fit and is refused (429, not retryable).

So in any minute a principal is served at most its budget, plus what the
requests served in that minute used beyond what they held (an estimate that
fell short, or a reservation capped at the budget): take the last request
admitted in the minute; everything else served in that minute was then
either running (held) or had ended less than a minute before (recorded).
`tests/test_token_budget.py` proves it as a property on both backends.

Requests per minute is a token bucket (a burst of the whole budget, refilled
evenly). Its levels are integers in 1/60,000ths of a request, times integer
milliseconds: a budget of L a minute refills L units a millisecond, exactly,
in Python and in Lua alike. A limit of 0 means no limit.

Two backends with one semantics: `memory` (one process) and `redis` (one Lua
script per decision, so every replica shares one budget). Leases in Redis
carry an expiry that the owning replica keeps refreshing, so the stream slots
and reservations of a replica that crashed free themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gateway.config import Limits, RateLimitSettings
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

#: A Redis lease lives this long unless its replica refreshes it.
LEASE_TTL_S = 30.0
_REFRESH_EVERY_S = LEASE_TTL_S / 3
#: After a Redis failure, skip it for this long (no per-request connect timeouts).
_BACKOFF_S = 1.0
_LOG_EVERY_S = 30.0
#: The requests bucket is kept in units of 1/UNIT request: a limit of L a
#: minute refills exactly L units a millisecond.
UNIT = 60_000
#: How long a lease's usage counts against its principal's token budget.
WINDOW_MS = 60_000
#: What a backend answers when the prompt alone exceeds the whole token budget.
_NEVER_FITS = "prompt_exceeds_tokens_per_minute"
#: Retry-After (s) of a request that can never fit: a whole window, not a promise.
_NEVER_FITS_RETRY_MS = WINDOW_MS


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
    #: Set when the prompt alone exceeds the whole budget: no wait will help.
    prompt_tokens: int | None = None

    def error(self) -> RateLimited:
        wait = max(1, math.ceil(self.retry_after_s))
        headers = {
            "Retry-After": str(wait),
            "RateLimit-Limit": str(self.limit_value),
            "RateLimit-Remaining": str(max(0, self.remaining)),
            "RateLimit-Reset": str(wait),
        }
        if self.prompt_tokens is not None:
            message = (
                f"the prompt alone (about {self.prompt_tokens} tokens) exceeds the whole"
                f" {self.limit} limit of {self.limit_value}: this request can never be"
                " admitted; shorten it or ask for a larger limit"
            )
            return RateLimited(message, headers=headers, retryable=False)
        message = f"{self.limit} limit of {self.limit_value} reached; retry in {wait} s"
        return RateLimited(message, headers=headers)


def _refusal(limits: Limits, limit: str, remaining: int, wait_ms: int, prompt: int) -> Refusal:
    """Turn a backend's answer into a `Refusal`; one code for both backends."""
    if limit == "concurrent_streams":
        return Refusal(limit, limits.concurrent_streams, 0, 1.0)
    if limit == _NEVER_FITS:
        return Refusal(
            "tokens_per_minute",
            limits.tokens_per_minute,
            remaining,
            _NEVER_FITS_RETRY_MS / 1000,
            prompt_tokens=prompt,
        )
    return Refusal(limit, getattr(limits, limit), remaining, wait_ms / 1000)


def _requests_wait_ms(level: int, rpm: int) -> int:
    """Until the requests bucket holds one whole request again."""
    return -(-(UNIT - level) // rpm)


def _tokens_wait_ms(short: int, recent: list[tuple[int, int]], now: int) -> int:
    """Until enough recorded usage leaves the window to free `short` tokens.

    `recent` is (ended at ms, tokens) oldest first. If what leaves is not
    enough (running leases hold the rest), until all of it has left: the holds
    may end sooner, and the client is told to try again then.
    """
    freed, wait = 0, 0
    for stamp, used in recent:
        freed += used
        wait = stamp + WINDOW_MS - now
        if freed >= short:
            break
    return max(0, wait)


class Backend(Protocol):
    async def acquire(
        self, key: str, limits: Limits, reserve: int, lease_id: str, prompt_tokens: int = 0
    ) -> Refusal | None: ...

    async def release(self, key: str, limits: Limits, lease_id: str, used_tokens: int) -> None: ...

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
    #: Admitted by the replica's own memory while the shared backend was down.
    local: bool = False

    async def release(self, used_tokens: int) -> None:
        """Free the stream slot and the reservation; record `used_tokens` (idempotent)."""
        if self.released:
            return
        self.released = True
        if self.limiter is not None:
            await self.limiter.release(self, used_tokens)

    def release_now(self, used_tokens: int) -> bool:
        """`release`, done at once when no shared backend must be awaited (no
        limits, or limits kept in this process's memory); False: await `release`.

        A stream's end then creates no task just to release its lease."""
        if self.released:
            return True
        if self.limiter is not None and not self.limiter.release_now(self, used_tokens):
            return False
        self.released = True
        return True


def _hold(limits: Limits, reserve: int) -> int:
    """Tokens a lease holds while it runs: its reservation, capped at the whole budget."""
    return min(reserve, limits.tokens_per_minute)


# -- memory ------------------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    """Units that refill `limit` a millisecond up to `limit * UNIT`."""

    level: int
    stamp: int
    limit: int

    def refill(self, limit: int, now: int) -> int:
        self.level = min(limit * UNIT, self.level + max(0, now - self.stamp) * limit)
        self.stamp = now
        self.limit = limit
        return self.level


@dataclass(slots=True)
class _PrincipalState:
    requests: _Bucket | None = None
    #: Live leases and the tokens each holds.
    leases: dict[str, int] = field(default_factory=dict)
    held: int = 0
    #: Usage of the leases that ended in the last minute: (ended at ms, tokens).
    recent: deque[tuple[int, int]] = field(default_factory=deque)
    recent_total: int = 0

    def requests_bucket(self, limit: int, now: int) -> _Bucket:
        if self.requests is None:
            self.requests = _Bucket(limit * UNIT, now, limit)
        self.requests.refill(limit, now)
        return self.requests

    def used_in_window(self, now: int) -> int:
        while self.recent and self.recent[0][0] <= now - WINDOW_MS:
            self.recent_total -= self.recent.popleft()[1]
        return self.recent_total

    def idle(self, now: int) -> bool:
        """Nothing held or recorded and the bucket full: forgetting it changes nothing."""
        bucket = self.requests
        return (
            not self.leases
            and not self.used_in_window(now)
            and (bucket is None or bucket.refill(bucket.limit, now) >= bucket.limit * UNIT)
        )


class MemoryBackend:
    """One process's limits; states of idle principals are swept once a minute.

    Decides exactly as `lua/acquire.lua` and `lua/release.lua` do.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _PrincipalState] = {}
        self._swept = self._now()

    def __len__(self) -> int:
        return len(self._states)

    def _now(self) -> int:
        return round(self._clock() * 1000)

    async def acquire(
        self, key: str, limits: Limits, reserve: int, lease_id: str, prompt_tokens: int = 0
    ) -> Refusal | None:
        now = self._now()
        self._sweep(now)
        state = self._states.setdefault(key, _PrincipalState())
        rpm, tpm, streams = (
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.concurrent_streams,
        )
        used = state.used_in_window(now)
        if tpm and prompt_tokens > tpm:
            left = tpm - used - state.held
            return _refusal(limits, _NEVER_FITS, max(0, left), 0, prompt_tokens)
        if streams and len(state.leases) >= streams:
            return _refusal(limits, "concurrent_streams", 0, 0, 0)
        requests = None
        if rpm:
            requests = state.requests_bucket(rpm, now)
            if requests.level < UNIT:
                wait = _requests_wait_ms(requests.level, rpm)
                return _refusal(limits, "requests_per_minute", requests.level // UNIT, wait, 0)
        need = 0
        if tpm:
            need = _hold(limits, reserve)
            short = used + state.held + need - tpm
            if short > 0:
                wait = _tokens_wait_ms(short, list(state.recent), now)
                left = max(0, tpm - used - state.held)
                return _refusal(limits, "tokens_per_minute", left, wait, 0)
        if requests is not None:
            requests.level -= UNIT
        if tpm or streams:
            state.leases[lease_id] = need
            state.held += need
        return None

    async def release(self, key: str, limits: Limits, lease_id: str, used_tokens: int) -> None:
        self.release_now(key, limits, lease_id, used_tokens)

    def release_now(self, key: str, limits: Limits, lease_id: str, used_tokens: int) -> None:
        """Memory needs no wait: `RateLimiter.release_now` calls this directly."""
        state = self._states.get(key)
        if state is None:
            if not limits.tokens_per_minute:
                return
            state = self._states[key] = _PrincipalState()
        state.held -= state.leases.pop(lease_id, 0)
        if limits.tokens_per_minute and used_tokens > 0:
            state.recent.append((self._now(), used_tokens))
            state.recent_total += used_tokens

    async def refresh(self, leases: list[tuple[str, str]]) -> None:
        """Memory leases die with the process; nothing to refresh."""

    async def aclose(self) -> None:
        self._states.clear()

    def _sweep(self, now: int) -> None:
        if now - self._swept < 60_000:
            return
        self._swept = now
        for key in [k for k, state in self._states.items() if state.idle(now)]:
            del self._states[key]


# -- redis -------------------------------------------------------------------

_SCRIPTS = Path(__file__).with_name("lua")


class RedisBackend:
    """All replicas share one budget: every decision is one atomic Lua call.

    Time is the Redis server's (`TIME`), one clock for every replica; `clock`
    (seconds) replaces it in tests that must step time.
    """

    def __init__(
        self,
        url: str,
        lease_ttl_s: float = LEASE_TTL_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import redis.asyncio as redis

        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        self._clock = clock
        # Blocking pool: redis-py's default pool raises at 100 concurrent commands.
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
        return [tag + ":requests", tag + ":tokens", tag + ":streams", tag + ":recent"]

    def _now(self) -> str:
        """The scripts' clock argument: '' for the server's time."""
        return "" if self._clock is None else str(round(self._clock() * 1000))

    async def acquire(
        self, key: str, limits: Limits, reserve: int, lease_id: str, prompt_tokens: int = 0
    ) -> Refusal | None:
        args: list[str | int] = [
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.concurrent_streams,
            reserve,
            prompt_tokens,
            lease_id,
            self._lease_ttl_ms,
            self._now(),
        ]
        try:
            answer = await self._acquire(self._keys(key), args)
        except self._errors as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if int(answer[0]):
            return None
        limit, remaining, wait_ms = answer[1:]
        name = limit.decode() if isinstance(limit, bytes) else str(limit)
        return _refusal(limits, name, int(remaining), int(wait_ms), prompt_tokens)

    async def release(self, key: str, limits: Limits, lease_id: str, used_tokens: int) -> None:
        keys = self._keys(key)[1:]
        args: list[str | int] = [
            limits.tokens_per_minute,
            max(0, used_tokens),
            lease_id,
            self._now(),
        ]
        try:
            await self._release(keys, args)
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
                        self._keys(key)[1:], [self._lease_ttl_ms, self._now(), *ids], client=pipe
                    )
                await pipe.execute()
        except self._errors as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        # A pool passed in is not closed by `Redis.aclose()`; close its sockets too.
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()


# -- the limiter -------------------------------------------------------------


class RateLimiter:
    """Admits generations against a backend; applies `fail_open` when it is down.

    Down with `fail_open: true`, limits are never off: each replica enforces
    them from its own memory (an approximation: N replicas then allow up to N
    times a budget, and what they admitted is not carried back to Redis) until
    the backend answers again. `degraded` says so, as a gauge and one log line.
    """

    def __init__(self, settings: RateLimitSettings, backend: Backend) -> None:
        self._settings = settings
        self._backend = backend
        self._local = MemoryBackend() if settings.fail_open else None
        self.degraded = False
        #: Called with True when limits fall back to memory, False when they are shared again.
        self.on_degraded: list[Callable[[bool], None]] = []
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
    def held(self) -> int:
        return len(self._held)

    def start(self) -> None:
        if isinstance(self._backend, RedisBackend):
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def admit(
        self, key: str, limits: Limits, reserve: int, *, prompt_tokens: int = 0
    ) -> Lease:
        """A lease on `key`'s budget, or `RateLimited` (HTTP 429 / `rate_limited`).

        `reserve` is the most the generation may use (prompt estimate plus
        `max_tokens`); `prompt_tokens`, the prompt estimate, refuses for good a
        request whose prompt alone exceeds the whole token budget.
        """
        prompt_tokens = max(0, prompt_tokens)
        reserve = max(0, reserve, prompt_tokens)
        if not (
            limits.requests_per_minute or limits.tokens_per_minute or limits.concurrent_streams
        ):
            return Lease(None, key, limits, "", reserve)  # holds nothing: no id to draw
        lease = Lease(self, key, limits, secrets.token_hex(8), reserve)
        if time.monotonic() < self._down_until:
            return await self._unavailable(lease, None, prompt_tokens)
        try:
            refusal = await self._backend.acquire(
                key, limits, reserve, lease.lease_id, prompt_tokens
            )
        except BackendUnavailable as exc:
            return await self._unavailable(lease, exc, prompt_tokens)
        self._set_degraded(False)
        self._refuse_if(refusal)
        self._held[lease.lease_id] = lease
        return lease

    def _refuse_if(self, refusal: Refusal | None) -> None:
        if refusal is not None:
            for hook in self.on_refused:
                hook(refusal.limit)
            raise refusal.error()

    async def release(self, lease: Lease, used_tokens: int) -> None:
        if self.release_now(lease, used_tokens):
            return
        if self._held.pop(lease.lease_id, None) is None:
            return
        try:
            await self._backend.release(lease.key, lease.limits, lease.lease_id, used_tokens)
        except BackendUnavailable as exc:
            # The lease and its reservation expire on their own; the usage goes uncharged.
            self._note_failure(exc)

    def release_now(self, lease: Lease, used_tokens: int) -> bool:
        """Release a lease held in memory at once; False if the shared backend holds it."""
        if lease.local:
            assert self._local is not None
            memory = self._local
        elif isinstance(self._backend, MemoryBackend):
            memory = self._backend
            if self._held.pop(lease.lease_id, None) is None:
                return True
        else:
            return False
        memory.release_now(lease.key, lease.limits, lease.lease_id, used_tokens)
        return True

    async def _unavailable(
        self, lease: Lease, exc: BackendUnavailable | None, prompt_tokens: int
    ) -> Lease:
        if exc is not None:
            self._note_failure(exc)
        if self._local is not None:  # fail_open: this replica's memory enforces the limits
            self._set_degraded(True)
            refusal = await self._local.acquire(
                lease.key, lease.limits, lease.reserved, lease.lease_id, prompt_tokens
            )
            self._refuse_if(refusal)
            lease.local = True
            return lease
        for hook in self.on_refused:
            hook("backend_unavailable")
        raise RateLimited(
            "rate limiter unavailable; retry shortly",
            status=503,
            headers={"Retry-After": "1"},
        )

    def _set_degraded(self, degraded: bool) -> None:
        if degraded == self.degraded or self._local is None:
            return
        self.degraded = degraded
        if degraded:
            log.warning(
                "rate limits are enforced from this replica's memory until the backend answers"
            )
        else:
            log.info("rate limits are shared again")
        for hook in self.on_degraded:
            hook(degraded)

    def _note_failure(self, exc: BackendUnavailable) -> None:
        self.backend_errors += 1
        for hook in self.on_backend_error:
            hook()
        now = time.monotonic()
        self._down_until = now + _BACKOFF_S
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            policy = "limiting from memory (fail_open)" if self._settings.fail_open else "refusing"
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
