"""The tokens-per-minute budget holds whatever a client reserves, uses, cancels or overlaps.

Issue 16 item 1: admission charged the reservation capped at the budget, but the
release refunded `reserved - used` of the *uncapped* reservation, so a request
with a huge `max_tokens` refilled the bucket it had barely drawn from (1,000
tokens a minute served 1,620 tokens in 1.9 s, no refusal). A refilling bucket
that starts full also serves twice its budget in a minute; the budget is now a
sliding minute.

The rule, for any mix of prompt sizes, `max_tokens`, cancels, client retries,
upstream retries and fallbacks (one lease whatever happens inside it) and
concurrency: in any minute a principal is served at most its budget, plus what
the requests served in that minute used beyond what they held (their
reservation, capped at the budget). A request whose prompt alone exceeds the
whole budget is refused (429, not retryable).

1. A property (hypothesis): random programs of admissions, waits and lease
   ends, run on the real limiter with each backend (memory; redis on a real
   redis-server) under one stepped clock, must decide exactly as a small model
   of the window written here (same admissions, same `RateLimit-*` headers),
   and the tokens served must keep the rule.
2. Black box: `gateway serve` with a key of 1,000 tokens/minute and the
   simulated model replays the measured bypass.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import Limits, RateLimitSettings
from gateway.ratelimit import Lease, MemoryBackend, RateLimited, RateLimiter, RedisBackend
from tests.conftest import FAST_MODEL, TEST_API_KEY, TEST_KEY_CONFIG
from tests.gateway_process import NO_LIMITS, start_gateway_process
from tests.helpers import read_ndjson
from tests.redis_server import RedisProcess, free_port

MINUTE_MS = 60_000

# -- the model -----------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """What a refusal must say: its limit and `RateLimit-*` headers, and whether it is final."""

    limit: str
    headers: dict[str, str]
    never_fits: bool = False


def _headers(limit_value: int, remaining: Fraction | int, wait_s: Fraction) -> dict[str, str]:
    wait = max(1, math.ceil(wait_s))
    return {
        "Retry-After": str(wait),
        "RateLimit-Limit": str(limit_value),
        "RateLimit-Remaining": str(max(0, math.floor(remaining))),
        "RateLimit-Reset": str(wait),
    }


@dataclass
class WindowModel:
    """The limits as specified (requests in exact fractions).

    Tokens: a lease's usage is recorded when it ends and counts for the next
    minute; a running lease holds its reservation, capped at `tpm`; a request
    is admitted if the usage of the last minute plus the holds plus its capped
    reservation fit `tpm`, else it is told to wait until enough usage has left
    the minute (or all of it). A prompt estimate above `tpm` never fits.
    Requests: a bucket of `rpm` refilling evenly. Streams: at most `streams`
    leases at once. Checked in that order: never fits, streams, requests, tokens.
    """

    tpm: int
    rpm: int
    streams: int
    requests: Fraction = Fraction(0)
    stamp_ms: int = 0
    holds: dict[int, int] = field(default_factory=dict)
    #: (ended at ms, tokens used), oldest first.
    usage: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.requests = Fraction(self.rpm)

    def _refill(self, now_ms: int) -> None:
        elapsed = now_ms - self.stamp_ms
        self.requests = min(
            Fraction(self.rpm), self.requests + Fraction(self.rpm * elapsed, MINUTE_MS)
        )
        self.stamp_ms = now_ms

    def admit(self, now_ms: int, lease: int, prompt: int, reserve: int) -> Refused | None:
        self._refill(now_ms)
        self.usage = [(at, used) for at, used in self.usage if at > now_ms - MINUTE_MS]
        recent, held = sum(used for _, used in self.usage), sum(self.holds.values())
        if self.tpm and prompt > self.tpm:
            headers = _headers(self.tpm, self.tpm - recent - held, Fraction(60))
            return Refused("tokens_per_minute", headers, never_fits=True)
        if self.streams and len(self.holds) >= self.streams:
            return Refused("concurrent_streams", _headers(self.streams, 0, Fraction(1)))
        if self.rpm and self.requests < 1:
            wait_ms = math.ceil((1 - self.requests) * MINUTE_MS / self.rpm)
            headers = _headers(self.rpm, self.requests, Fraction(wait_ms, 1000))
            return Refused("requests_per_minute", headers)
        need = min(reserve, self.tpm)
        short = recent + held + need - self.tpm
        if self.tpm and short > 0:
            wait_ms, freed = 0, 0
            for at, used in self.usage:
                freed, wait_ms = freed + used, at + MINUTE_MS - now_ms
                if freed >= short:
                    break
            headers = _headers(self.tpm, self.tpm - recent - held, Fraction(wait_ms, 1000))
            return Refused("tokens_per_minute", headers)
        if self.rpm:
            self.requests -= 1
        if self.tpm or self.streams:
            self.holds[lease] = need if self.tpm else 0
        return None

    def end(self, now_ms: int, lease: int, used: int) -> None:
        self.holds.pop(lease, None)
        if self.tpm and used > 0:
            self.usage.append((now_ms, used))


# -- programs ------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    tpm: int
    rpm: int
    streams: int
    #: ("wait", ms) | ("admit", prompt, max_tokens or None) | ("end", which, fraction, extra)
    ops: tuple[tuple[Any, ...], ...]


#: `rate_limit.default_reserve_tokens` stand-in for requests without `max_tokens`.
DEFAULT_RESERVE = 64


@st.composite
def programs(draw: st.DrawFn) -> Program:
    tpm = draw(st.sampled_from([7, 100, 1000]) | st.integers(1, 5000))
    rpm = draw(st.sampled_from([0, 0, 0, 2, 30]))
    streams = draw(st.sampled_from([0, 0, 0, 1, 3]))
    waits = st.sampled_from([0, 1, 250, 1000, 15_000, 59_999, 60_000, 61_000, 300_000])
    admits = st.tuples(
        st.just("admit"),
        # The prompt estimate: mostly short, sometimes up to the budget, or beyond it.
        st.integers(0, 10)
        | st.integers(0, 10)
        | st.integers(0, tpm)
        | st.integers(tpm + 1, tpm + 99),
        st.none() | st.integers(0, 2 * tpm) | st.just(100_000),  # max_tokens
    )
    ends = st.tuples(
        st.just("end"),
        st.integers(0, 1000),  # which running lease
        st.integers(0, 100),  # % of its completion allowance used (0: cancelled at once)
        st.just(0) | st.just(0) | st.integers(1, 3 * tpm),  # used beyond the reservation
    )
    wait = st.tuples(st.just("wait"), waits | st.integers(0, 90_000))
    ops = st.one_of(wait, admits, admits, ends, ends)
    return Program(tpm, rpm, streams, tuple(draw(st.lists(ops, min_size=10, max_size=80))))


# The measured bypass: max_tokens 100000, 27 tokens used, again and again.
MEASURED = Program(
    1000, 0, 0, tuple(op for _ in range(60) for op in (("admit", 2, 100_000), ("end", 0, 0, 25)))
)
# A refund after the bucket refilled under a running lease: a stream that holds
# the whole budget for a minute, then ends having used almost nothing, must not
# hand a second budget to requests admitted meanwhile.
REFILLED_UNDER_A_LEASE = Program(
    1000,
    0,
    0,
    (
        ("admit", 1, 100_000),
        ("wait", 60_000),
        ("admit", 1, 998),
        ("end", 0, 0, 0),
        ("admit", 1, 998),
        ("end", 0, 100, 0),
        ("end", 0, 100, 0),
    ),
)
# Prompts bigger than the whole budget, between requests that fit.
NEVER_FITS = Program(
    100, 0, 0, (("admit", 101, 1), ("admit", 100, 0), ("admit", 1_000_000, None), ("end", 0, 0, 0))
)


@dataclass
class Served:
    admitted_ms: int
    prompt: int
    reserved: int
    used: int = 0
    ended_ms: int = 0


async def run_program(program: Program, limiter: RateLimiter, clock: list[int]) -> None:
    """Run `program` on `limiter` and on the model side by side; check both agree and the rule."""
    limits = Limits(
        requests_per_minute=program.rpm,
        tokens_per_minute=program.tpm,
        concurrent_streams=program.streams,
    )
    key = f"budget-{uuid.uuid4().hex}"
    model = WindowModel(program.tpm, program.rpm, program.streams)
    running: list[tuple[int, Lease, Served]] = []
    served: list[Served] = []

    async def end(index: int, used: int) -> None:
        number, lease, record = running.pop(index)
        record.used, record.ended_ms = used, clock[0]
        # As a stream's end does it: at once in memory, awaited from a shared backend.
        if not lease.release_now(used):
            await lease.release(used)
        model.end(clock[0], number, used)

    for number, op in enumerate(program.ops):
        if op[0] == "wait":
            clock[0] += op[1]
        elif op[0] == "admit":
            _, prompt, max_tokens = op
            reserve = prompt + (DEFAULT_RESERVE if max_tokens is None else max_tokens)
            expected = model.admit(clock[0], number, prompt, reserve)
            try:
                lease = await limiter.admit(key, limits, reserve, prompt_tokens=prompt)
            except RateLimited as refused:
                assert expected is not None, f"refused, the model admits: {refused.message}"
                assert refused.status == 429
                assert refused.headers == expected.headers, refused.message
                assert expected.limit in refused.message
                assert refused.retryable is not expected.never_fits
                if expected.never_fits:
                    assert "can never be admitted" in refused.message
                continue
            assert expected is None, f"admitted, the model refuses: {expected}"
            record = Served(clock[0], prompt, reserve)
            served.append(record)
            running.append((number, lease, record))
        elif running:
            _, which, percent, beyond = op
            index = which % len(running)
            record = running[index][2]
            allowance = record.reserved - record.prompt
            await end(index, record.prompt + allowance * percent // 100 + beyond)
    while running:  # the rest run to their full allowance
        await end(0, running[0][2].reserved)

    assert_within_budget(program.tpm, served)


def assert_within_budget(tpm: int, served: list[Served]) -> None:
    """In every minute: the budget plus what its requests used beyond what they held.

    A request is served in the open minute (a, a + 60 s) if it ended after `a`
    and was admitted before `a + 60 s`. The largest such sets are those where
    `a` is just before some request's end, so those minutes are the ones checked.
    """
    if not tpm:
        return
    for start in sorted({record.ended_ms - 1 for record in served}):
        inside = [r for r in served if r.ended_ms > start and r.admitted_ms < start + MINUTE_MS]
        used = sum(r.used for r in inside)
        beyond = sum(max(0, r.used - min(r.reserved, tpm)) for r in inside)
        assert used <= tpm + beyond, (
            f"{used} tokens served in the minute after {start} ms on a budget of {tpm}/min"
            f" (allowed {tpm + beyond}): {inside}"
        )


PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(program=programs())
@example(program=MEASURED)
@example(program=REFILLED_UNDER_A_LEASE)
@example(program=NEVER_FITS)
def test_memory_backend_keeps_the_budget(program: Program) -> None:
    clock = [0]
    backend = MemoryBackend(clock=lambda: clock[0] / 1000)
    limiter = RateLimiter(RateLimitSettings(fail_open=False), backend)
    asyncio.run(run_program(program, limiter, clock))


@PROPERTY
@given(program=programs())
@example(program=MEASURED)
@example(program=REFILLED_UNDER_A_LEASE)
@example(program=NEVER_FITS)
def test_redis_backend_keeps_the_budget(redis_server: RedisProcess, program: Program) -> None:
    async def run() -> None:
        clock = [0]
        # Leases outlive the program: their expiry is tested on its own below.
        backend = RedisBackend(redis_server.url, lease_ttl_s=1e6, clock=lambda: clock[0] / 1000)
        limiter = RateLimiter(RateLimitSettings(backend="redis", fail_open=False), backend)
        try:
            await run_program(program, limiter, clock)
        finally:
            await backend.aclose()

    asyncio.run(run())


# -- redis: what the model leaves out ------------------------------------------------


async def test_the_holds_of_a_crashed_replica_expire(redis_server: RedisProcess) -> None:
    budget = Limits(requests_per_minute=0, tokens_per_minute=1000, concurrent_streams=0)
    crashed = RedisBackend(redis_server.url, lease_ttl_s=0.3)
    survivor = RedisBackend(redis_server.url, lease_ttl_s=0.3)
    try:
        assert await crashed.acquire("key:h", budget, 100_000, "lease-1", 5) is None
        refusal = await survivor.acquire("key:h", budget, 10, "lease-2", 5)
        assert refusal is not None and refusal.limit == "tokens_per_minute"
        assert refusal.remaining == 0
        await asyncio.sleep(0.45)  # nobody refreshes lease-1: its hold goes with it
        assert await survivor.acquire("key:h", budget, 10, "lease-2", 5) is None
    finally:
        await crashed.aclose()
        await survivor.aclose()


async def test_a_refreshed_lease_keeps_its_hold(redis_server: RedisProcess) -> None:
    """On a clock of the test's own: with the wall clock and a 0.3 s lease, a
    loaded machine's late loop turn let the lease lapse between refreshes."""
    budget = Limits(requests_per_minute=0, tokens_per_minute=1000, concurrent_streams=0)
    clock = [1_000_000.0]
    owner = RedisBackend(redis_server.url, lease_ttl_s=0.3, clock=lambda: clock[0])
    other = RedisBackend(redis_server.url, lease_ttl_s=0.3, clock=lambda: clock[0])
    try:
        assert await owner.acquire("key:r", budget, 100_000, "held", 5) is None
        for _ in range(6):  # 1.2 s, four times the ttl: the owner keeps it alive
            clock[0] += 0.2
            await owner.refresh([("key:r", "held")])
            refusal = await other.acquire("key:r", budget, 10, "other", 5)
            assert refusal is not None and refusal.limit == "tokens_per_minute"
        await owner.release("key:r", budget, "held", 30)
        assert await other.acquire("key:r", budget, 10, "other", 5) is None
        # And a lease nobody refreshes lapses after its ttl.
        assert await owner.acquire("key:s", budget, 100_000, "lost", 5) is None
        assert await other.acquire("key:s", budget, 10, "other", 5) is not None
        clock[0] += 0.4
        assert await other.acquire("key:s", budget, 10, "other", 5) is None
    finally:
        await owner.aclose()
        await other.aclose()


async def test_an_overshoot_counts_for_one_minute_and_every_key_expires(
    redis_server: RedisProcess,
) -> None:
    import redis.asyncio as redis

    budget = Limits(requests_per_minute=0, tokens_per_minute=1000, concurrent_streams=0)
    clock = [1_000_000.0]
    backend = RedisBackend(redis_server.url, clock=lambda: clock[0])
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert await backend.acquire("key:d", budget, 100_000, "big", 5) is None
        await backend.release("key:d", budget, "big", 100_000)  # 99,000 beyond the budget
        clock[0] += 30
        refusal = await backend.acquire("key:d", budget, 1, "small", 1)
        assert refusal is not None and refusal.limit == "tokens_per_minute"
        assert refusal.retry_after_s == 30 and refusal.remaining == 0
        clock[0] += 30  # the overshoot leaves the window: a whole budget again
        assert await backend.acquire("key:d", budget, 1000, "next", 1) is None
        await backend.release("key:d", budget, "next", 10)
        # Nothing a principal leaves behind is kept for ever.
        keys = [key async for key in client.scan_iter("{rl:key:d}*")]
        assert keys
        for key in keys:
            assert 0 < await client.pttl(key) <= 2 * 60_000 + 30_000, key
    finally:
        await backend.aclose()
        await client.aclose()


# -- black box: `gateway serve` ----------------------------------------------------

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
BUDGET = 1000


def serve_config(backend: str, redis_url: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"port": free_port()},
        "models": [{**FAST_MODEL, "tokens_per_second": 5000, "first_token_ms": 0}],
        "auth": {
            "anonymous": False,
            "api_keys": [
                {
                    **TEST_KEY_CONFIG,
                    "limits": {**NO_LIMITS, "tokens_per_minute": BUDGET},
                }
            ],
        },
        "rate_limit": {"backend": backend, "default": NO_LIMITS},
        "logging": {"level": "warning"},
    }
    if redis_url is not None:
        config["redis"] = {"url": redis_url}
    return config


@pytest.fixture(params=["memory", "redis"])
def backend_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return serve_config("memory", None)
    redis_server: RedisProcess = request.getfixturevalue("redis_server")
    return serve_config("redis", redis_server.url)


async def test_huge_max_tokens_no_longer_refill_the_budget(
    backend_config: dict[str, Any], tmp_path: Path
) -> None:
    """The measured bypass, replayed: 1,000 tokens/min, `max_tokens` 100000, ~27 tokens used."""
    gateway = await start_gateway_process(backend_config, tmp_path)
    # `stop` ends each answer at its first sentence: some 30 tokens of 100,000 allowed.
    body = {"prompt": "Tell me about rate limits.", "max_tokens": 100_000, "stop": ["."]}
    statuses: list[int] = []
    used: list[int] = []
    try:
        async with aiohttp.ClientSession() as session:

            async def one() -> None:
                url = f"{gateway.url}/v1/stream/chunked"
                async with session.post(url, json=body, headers=AUTH) as response:
                    statuses.append(response.status)
                    if response.status == 200:
                        events = await read_ndjson(response)
                        assert events[-1]["type"] == "done", events[-1]
                        used.append(events[-1]["usage"]["total_tokens"])
                        return
                    assert response.status == 429
                    error = (await response.json())["error"]
                    assert error["code"] == "rate_limited"
                    assert "tokens_per_minute" in error["message"]
                    assert response.headers["RateLimit-Limit"] == str(BUDGET)
                    for name in ("Retry-After", "RateLimit-Remaining", "RateLimit-Reset"):
                        assert response.headers[name].isdigit(), (name, response.headers[name])
                    assert int(response.headers["Retry-After"]) >= 1

            started = time.monotonic()
            for _ in range(60):  # one after another, as fast as they end
                await one()
            for _ in range(4):  # and in bursts
                await asyncio.gather(*(one() for _ in range(20)))
            elapsed_ms = (time.monotonic() - started) * 1000
    finally:
        await gateway.stop()
    assert "Traceback" not in gateway.log_text(), gateway.log_text()[-3000:]
    assert used, "not even the first request was served"
    assert max(used) < 100, used  # the bypass: far below what each one reserved
    # Each held the whole budget (its reservation, capped) while it ran, so none
    # used more than it held: no overshoot, and the run is shorter than a minute.
    assert elapsed_ms < MINUTE_MS
    allowed = BUDGET
    assert sum(used) <= allowed, (
        f"{sum(used)} tokens in {elapsed_ms:.0f} ms ({len(used)} requests of {used[0]}),"
        f" allowed {allowed:.0f}"
    )
    assert statuses.count(429) >= len(statuses) - 5, statuses


async def test_a_prompt_bigger_than_the_budget_is_refused_for_good(tmp_path: Path) -> None:
    gateway = await start_gateway_process(serve_config("memory", None), tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{gateway.url}/v1/stream/chunked"
            huge = {"prompt": "word " * (BUDGET * 2), "max_tokens": 1}  # ~2,500 tokens
            async with session.post(url, json=huge, headers=AUTH) as response:
                assert response.status == 429
                error = (await response.json())["error"]
                assert "can never be admitted" in error["message"], error
                assert response.headers["RateLimit-Limit"] == str(BUDGET)
                for name in ("Retry-After", "RateLimit-Remaining", "RateLimit-Reset"):
                    assert response.headers[name].isdigit(), (name, response.headers[name])
            # Nothing was charged: the whole budget is still there.
            small = {"prompt": "hi", "max_tokens": BUDGET - 1}
            async with session.post(url, json=small, headers=AUTH) as response:
                assert response.status == 200
                await response.read()
    finally:
        await gateway.stop()
