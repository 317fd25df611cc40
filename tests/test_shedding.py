"""The Retry-After of `server.max_streams` refusals follows the load (Little's law)."""

from __future__ import annotations

import asyncio
import resource
import signal
from pathlib import Path

import aiohttp
import pytest

from gateway.shedding import (
    MAX_RETRY_AFTER_S,
    RetryAfterEstimate,
    open_files_stream_cap,
    stream_cap,
)
from tests.gateway_process import NO_LIMITS, start_gateway_process
from tests.helpers import read_ndjson, scrape_value
from tests.redis_server import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_second(
    estimate: RetryAfterEstimate, clock: Clock, admitted: int, refused: int
) -> list[int]:
    """One second of traffic, spread evenly; the Retry-After values handed out."""
    answers = []
    events = admitted + refused
    for index in range(events):
        clock.now += 1.0 / events
        if index < admitted:
            estimate.admitted()
        else:
            answers.append(estimate.refused())
    return answers


def test_starts_at_one_second_and_stays_there_under_light_overload() -> None:
    clock = Clock()
    estimate = RetryAfterEstimate(clock)
    for _ in range(10):
        answers = run_second(estimate, clock, admitted=100, refused=20)
    assert answers[-1] == 1


def test_a_sustained_overload_backs_clients_off_to_the_expected_wait() -> None:
    """1,400 clients waiting for 180 slots a second: each should wait about 8 s."""
    clock = Clock()
    estimate = RetryAfterEstimate(clock)
    waiting, admissions = 1_400, 180
    for _ in range(30):
        # Every waiting client retries once per Retry-After it was last given.
        refusals = round(waiting / estimate.retry_after_s)
        run_second(estimate, clock, admitted=admissions, refused=refusals)
    assert 7 <= estimate.retry_after_s <= 9
    assert round(waiting / estimate.retry_after_s) < 250  # down from 1,400 a second


def test_no_admissions_at_all_waits_the_longest_and_recovers_when_load_ends() -> None:
    clock = Clock()
    estimate = RetryAfterEstimate(clock)
    for _ in range(12):
        run_second(estimate, clock, admitted=0, refused=200)
    assert estimate.retry_after_s == MAX_RETRY_AFTER_S
    for _ in range(12):
        run_second(estimate, clock, admitted=100, refused=1)
    assert estimate.retry_after_s == 1


def test_the_open_files_limit_caps_streams_below_max_streams() -> None:
    assert open_files_stream_cap(20_000) == (20_000 - 512) // 2 == 9_744
    assert open_files_stream_cap(1_024) == (1_024 - 128) // 2
    assert open_files_stream_cap(200) == (200 - 64) // 2
    assert open_files_stream_cap(60) == 1
    assert open_files_stream_cap(resource.RLIM_INFINITY) == 0
    assert stream_cap(0, 9_744) == 9_744
    assert stream_cap(100, 9_744) == 100
    assert stream_cap(0, 0) == 0


async def test_a_replica_short_of_open_files_sheds_with_503_instead_of_failing(
    tmp_path: Path,
) -> None:
    """200 descriptors leave room for 68 streams; 80 clients at once get 68 streams and
    12 clean refusals, where without the cap accepts and upstream connects would fail."""
    config = {
        "server": {"port": free_port()},
        "models": [{"name": "sim", "provider": "simulated", "tokens_per_second": 20}],
        "streams": {"resume_grace_s": 0},
        "rate_limit": {"default": NO_LIMITS},
        "logging": {"level": "info"},
    }
    gateway = await start_gateway_process(config, tmp_path, open_files=200)
    try:
        cap = open_files_stream_cap(200)
        body = {"model": "sim", "prompt": "hi", "max_tokens": 20}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one() -> tuple[int, str, str]:
                url = f"{gateway.url}/v1/stream/chunked"
                async with session.post(url, json=body) as response:
                    if response.status != 200:
                        error = (await response.json())["error"]["code"]
                        return response.status, error, response.headers.get("Retry-After", "")
                    events = await read_ndjson(response)
                    return 200, events[-1]["type"], ""

            results = await asyncio.gather(*(one() for _ in range(80)))
            async with session.get(f"{gateway.url}/metrics") as response:
                scrape = await response.text()
            assert await one() == (200, "done", "")  # and it serves on afterwards
        assert sorted(set(results)) == [(200, "done", ""), (503, "rate_limited", "1")]
        assert sum(status == 200 for status, _, _ in results) == cap
        assert scrape_value(scrape, "gateway_streams_limit") == cap
        assert scrape_value(scrape, "gateway_rate_limited_total", limit="max_streams") == 80 - cap
        assert f'"stream_cap":{cap}' in gateway.log_text()
    finally:
        await gateway.stop()
    assert "Traceback" not in gateway.log_text(), gateway.log_text()[-3000:]


def kernel_somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


async def test_a_burst_of_connections_waits_in_the_listen_queue(tmp_path: Path) -> None:
    """While the gateway is busy (here: stopped), the kernel completes handshakes
    up to the listen backlog and drops the rest, which a client sees as a connect
    that hangs and then fails (S5: 1,000 starts a second lost hundreds against
    aiohttp's default of 128). 600 fit in the gateway's backlog."""
    somaxconn = kernel_somaxconn()
    if somaxconn <= 128:
        pytest.skip(f"net.core.somaxconn is {somaxconn}: the kernel caps any backlog there")
    expected = min(600, somaxconn + 1)  # the kernel's cap: somaxconn, plus one
    config = {
        "server": {"host": "127.0.0.1", "port": free_port()},
        "models": [{"name": "sim", "provider": "simulated"}],
        "rate_limit": {"default": NO_LIMITS},
    }
    gateway = await start_gateway_process(config, tmp_path)
    writers: list[asyncio.StreamWriter] = []

    async def connect() -> bool:
        # 3 s, past the SYN's first retransmit (1 s): a handshake the loaded
        # machine was slow with still counts; one beyond a full backlog stays
        # dropped however often it is sent, so the count still tells them apart.
        try:
            async with asyncio.timeout(3.0):
                _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        except (TimeoutError, OSError):
            return False
        writers.append(writer)
        return True

    gateway.process.send_signal(signal.SIGSTOP)
    try:
        connected = await asyncio.gather(*(connect() for _ in range(600)))
    finally:
        gateway.process.send_signal(signal.SIGCONT)
        for writer in writers:
            writer.close()
        await gateway.stop()
    assert sum(connected) == expected
