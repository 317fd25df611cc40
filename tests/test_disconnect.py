"""Disconnect detection: a client that leaves stops the upstream, after the grace."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestServer

from gateway.generation import Generation
from gateway.keys import registry_key
from tests.conftest import StartGateway
from tests.gateway_process import NO_LIMITS, start_gateway_process
from tests.helpers import open_stream, read_generation_id, read_ndjson
from tests.redis_server import free_port

THINKING = {
    "name": "sim-1",
    "provider": "simulated",
    "tokens_per_second": 50,
    "first_token_ms": 5000,
}
BODY = {"prompt": "Explain vector databases.", "max_tokens": 100}
HTTP_ROUTES = ["/v1/stream/chunked", "/v1/stream/sse"]


async def wait_finished(generation: Generation, timeout: float) -> float:
    """Seconds until the generation's log is terminal."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(timeout):
        while not generation.finished:
            await asyncio.sleep(0.002)
    return loop.time() - began


@pytest.mark.parametrize("path", HTTP_ROUTES)
@pytest.mark.parametrize("how", ["close", "abort"])
async def test_grace_zero_cancels_at_once_while_waiting_for_first_token(
    start_gateway: StartGateway, path: str, how: str
) -> None:
    server = await start_gateway(models=[THINKING], streams={"resume_grace_s": 0})
    reader, writer = await open_stream(server.port, path, BODY)
    generation = server.app[registry_key].get(await read_generation_id(reader), "anonymous")
    await asyncio.sleep(0.05)
    assert not generation.finished
    if how == "close":
        writer.close()
    else:
        writer.transport.abort()
    elapsed = await wait_finished(generation, timeout=1)
    assert elapsed < 0.1
    assert generation.events[-1].fields["finish_reason"] == "cancelled"
    assert generation.completion_tokens == 0
    assert generation.stop_cause == "client_disconnected"


async def test_grace_zero_on_websocket(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=[THINKING], streams={"resume_grace_s": 0})
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.make_url("/v1/stream/ws"))
        await ws.send_json({"type": "generate", "request_id": "r", **BODY})
        start = await ws.receive_json()
        generation = server.app[registry_key].get(start["generation_id"], "anonymous")
        await ws.close()
        assert await wait_finished(generation, timeout=1) < 0.1
    assert generation.events[-1].fields["finish_reason"] == "cancelled"


@pytest.mark.parametrize("path", HTTP_ROUTES)
async def test_grace_period_cancels_only_after_it_runs_out(
    start_gateway: StartGateway, path: str
) -> None:
    server = await start_gateway(models=[THINKING], streams={"resume_grace_s": 0.6})
    reader, writer = await open_stream(server.port, path, BODY)
    generation = server.app[registry_key].get(await read_generation_id(reader), "anonymous")
    writer.close()
    await asyncio.sleep(0.4)
    assert not generation.finished and generation.subscribers == 0
    elapsed = await wait_finished(generation, timeout=2)
    assert 0.1 < elapsed < 0.45  # i.e. between 0.5 and 0.85 s after the drop
    assert generation.events[-1].fields["finish_reason"] == "cancelled"


async def test_reattach_within_grace_keeps_it_running(start_gateway: StartGateway) -> None:
    model = {**THINKING, "first_token_ms": 300, "tokens_per_second": 200}
    server = await start_gateway(models=[model], streams={"resume_grace_s": 0.3})
    reader, writer = await open_stream(
        server.port, "/v1/stream/chunked", {**BODY, "max_tokens": 60}
    )
    generation_id = await read_generation_id(reader)
    writer.close()
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as session:
        url = server.make_url(f"/v1/generations/{generation_id}/events")
        async with session.get(url, headers={"Accept": "application/x-ndjson"}) as response:
            events = await read_ndjson(response)
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 60


async def test_on_disconnect_finish_runs_to_the_end(start_gateway: StartGateway) -> None:
    model = {**THINKING, "first_token_ms": 50, "tokens_per_second": 500}
    server = await start_gateway(models=[model], streams={"resume_grace_s": 0})
    body = {**BODY, "max_tokens": 50, "on_disconnect": "finish"}
    reader, writer = await open_stream(server.port, "/v1/stream/sse", body)
    generation = server.app[registry_key].get(await read_generation_id(reader), "anonymous")
    writer.transport.abort()
    await wait_finished(generation, timeout=2)
    assert generation.events[-1].fields["finish_reason"] == "length"
    assert generation.completion_tokens == 50


@pytest.mark.parametrize("path", HTTP_ROUTES)
async def test_a_client_that_stops_reading_is_cut_off(
    start_gateway: StartGateway, path: str
) -> None:
    # 131,072 tokens take 26 s at this pace: the stall must be caught long before.
    fast = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 5e3, "first_token_ms": 0}
    server = await start_gateway(
        models=[fast], streams={"resume_grace_s": 0, "write_timeout_s": 0.5}
    )
    reader, writer = await open_stream(
        server.port, path, {**BODY, "max_tokens": 131072}, rcvbuf=4096
    )
    generation = server.app[registry_key].get(await read_generation_id(reader), "anonymous")
    # Never read again: the server's buffers fill, its write stalls, the watchdog aborts.
    await wait_finished(generation, timeout=15)
    assert generation.stop_cause == "client_disconnected"
    assert generation.completion_tokens < 131072
    writer.transport.abort()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
async def test_no_leaks_after_1000_streams_dropped_at_random_points(
    start_gateway: StartGateway,
) -> None:
    model = {
        "name": "sim-1",
        "provider": "simulated",
        "tokens_per_second": 2000,
        "first_token_ms": 2,
    }
    streams = {"resume_grace_s": 0, "retention_s": 0, "max_sockets_per_principal": 0}
    server = await start_gateway(models=[model], streams=streams)
    registry = server.app[registry_key]
    rng = random.Random(2024)
    paths = ["/v1/stream/chunked", "/v1/stream/sse", "/v1/stream/ws"]

    async def one(n: int) -> None:
        path = paths[n % 3]
        if path.endswith("ws"):
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(server.make_url(path))
                await ws.send_json({"type": "generate", "request_id": "r", **BODY})
                for _ in range(rng.randint(0, 40)):
                    await ws.receive()
                await ws.close()
            return
        reader, writer = await open_stream(server.port, path, {**BODY, "seed": n})
        await reader.read(rng.randint(1, 6000))
        if rng.random() < 0.5:
            writer.transport.abort()
        else:
            writer.close()

    async def settle() -> tuple[int, int]:
        for _ in range(3):
            await asyncio.sleep(0.05)
        return len(asyncio.all_tasks()), open_fds()

    baseline_tasks, baseline_fds = await settle()
    for batch in range(20):
        await asyncio.gather(*(one(batch * 50 + n) for n in range(50)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(registry) or len(asyncio.all_tasks()) > baseline_tasks:
        if loop.time() > deadline:
            names = sorted(t.get_name() + repr(t.get_coro())[:80] for t in asyncio.all_tasks())
            pytest.fail(f"{len(registry)} generations and tasks left: {names[:10]}")
        await asyncio.sleep(0.05)
    tasks, fds = await settle()
    assert len(registry) == 0
    assert tasks <= baseline_tasks, [t.get_name() for t in asyncio.all_tasks()]
    assert fds <= baseline_fds + 2


#: The HTTP streaming routes: method, path and a body that starts a stream.
SILENT_PEER_ROUTES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "chunked": ("POST", "/v1/stream/chunked", BODY),
    "sse": ("POST", "/v1/stream/sse", BODY),
    "openai": (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "stream": True},
    ),
    "ui": (
        "POST",
        "/v1/stream/ui",
        {
            "id": "c1",
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}],
        },
    ),
}


@contextlib.asynccontextmanager
async def first_bytes_of(
    session: aiohttp.ClientSession, server: TestServer, transport: str
) -> AsyncIterator[int]:
    """A stream over `transport`, read until its first bytes; yields the client's port."""
    url = server.make_url
    if transport == "ws":
        async with session.ws_connect(url("/v1/stream/ws")) as ws:
            await ws.send_json({"type": "generate", "request_id": "r1", **BODY})
            await ws.receive(timeout=5)
            yield ws.get_extra_info("sockname")[1]
        return
    method, path, body = SILENT_PEER_ROUTES[transport]
    async with session.request(method, url(path), json=body) as response:
        assert response.status == 200, await response.text()
        await response.content.readany()
        assert response.connection is not None and response.connection.transport
        yield response.connection.transport.get_extra_info("sockname")[1]


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
@pytest.mark.parametrize("transport", [*SILENT_PEER_ROUTES, "ws"])
async def test_the_kernel_drops_a_silent_peer_after_the_write_timeout(
    start_gateway: StartGateway, transport: str
) -> None:
    """A peer that stops acknowledging (no FIN, no RST: a laptop shut) must not
    hold its generation for TCP's ~15 minutes of retransmits: every stream's
    socket has `TCP_USER_TIMEOUT` = `streams.write_timeout_s` (read from the
    server's side of the connection, in this process)."""
    model = {**THINKING, "first_token_ms": 600}
    server = await start_gateway(models=[model], streams={"write_timeout_s": 7})
    async with (
        aiohttp.ClientSession() as session,
        first_bytes_of(session, server, transport) as client_port,
    ):
        ours = [
            c.fd
            for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == client_port
        ]
        assert len(ours) == 1, ours
        with socket.socket(fileno=os.dup(ours[0])) as sock:
            timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        assert timeout == 7000


#: pidfd_getfd(2), the same number on every Linux architecture (5.6 and later).
_SYS_PIDFD_GETFD = 438


def duplicate_of(pid: int, fd: int) -> int:
    """A duplicate of descriptor `fd` of process `pid` (pidfd_getfd(2))."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        duplicate = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
        if duplicate < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return duplicate
    finally:
        os.close(pidfd)


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
async def test_gateway_serve_holds_its_connections_to_the_write_timeout(tmp_path: Path) -> None:
    """What `gateway serve` itself sets (the test above runs the app in this
    process): the server's side of a client's connection, read from the
    gateway process, has `TCP_USER_TIMEOUT` = `streams.write_timeout_s`, and
    keep-alive probes and `TCP_NODELAY` on, which it inherits from the
    listener and gets from uvloop rather than from aiohttp per connection."""
    config = {
        "server": {"host": "127.0.0.1", "port": free_port()},
        "models": [{**THINKING, "first_token_ms": 600}],
        "streams": {"write_timeout_s": 9},
        "rate_limit": {"default": NO_LIMITS},
    }
    gateway = await start_gateway_process(config, tmp_path)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{gateway.url}/v1/stream/chunked", json=BODY) as response,
        ):
            await response.content.readline()  # `start`: the stream is open
            assert response.connection is not None and response.connection.transport
            client_port = response.connection.transport.get_extra_info("sockname")[1]
            theirs = [
                c.fd
                for c in psutil.Process(gateway.process.pid).net_connections("tcp")
                if c.raddr and c.raddr.port == client_port
            ]
            assert len(theirs) == 1, theirs
            try:
                fd = duplicate_of(gateway.process.pid, theirs[0])
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOSYS) and not os.environ.get("CI"):
                    pytest.skip(f"pidfd_getfd refused here ({exc}): the kernel or sandbox")
                raise
            with socket.socket(fileno=fd) as sock:
                timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
                keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert (timeout, keepalive, nodelay) == (9000, 1, 1)
    finally:
        await gateway.stop()
