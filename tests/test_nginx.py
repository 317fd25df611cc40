"""deploy/nginx/gateway.conf in a real nginx, in front of a real `gateway serve` process.

Only four things in the shipped file are rewritten for the test (each must
match exactly once, so the test breaks if the file changes shape): the listen
address (a free high port, as a deployment on :8443 would use), the upstream's
address, the access log's path and, for the heartbeat tests, a
`proxy_read_timeout` of one second.
"""

from __future__ import annotations

import asyncio
import re
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import require_binary
from tests.gateway_process import NO_LIMITS, start_gateway_process
from tests.gateway_process import GatewayProcess as Gateway
from tests.helpers import (
    Events,
    assert_well_formed,
    read_ndjson,
    stream,
    text_of,
    ws_exchange,
    ws_frames,
    ws_refusal,
)
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONF = ROOT / "deploy" / "nginx" / "gateway.conf"

#: A fast model for latency, a slow one that streams for ~1 s, and one that
#: thinks for 2.5 s before its first token (longer than nginx's read timeout here).
MODELS = [
    {"name": "sim-fast", "provider": "simulated", "first_token_ms": 20, "tokens_per_second": 200},
    {"name": "sim-slow", "provider": "simulated", "first_token_ms": 20, "tokens_per_second": 20},
    {"name": "sim-think", "provider": "simulated", "first_token_ms": 2500},
]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """`gateway serve` processes with the test models; nginx at 127.0.0.1 is trusted."""
    started: list[Gateway] = []

    async def start(heartbeat_s: float = 15) -> Gateway:
        config = {
            "server": {"port": free_port(), "trusted_proxies": ["127.0.0.1/32"]},
            "streams": {"heartbeat_s": heartbeat_s},
            "models": MODELS,
            "rate_limit": {"default": NO_LIMITS},
        }
        started.append(await start_gateway_process(config, tmp_path))
        return started[-1]

    yield start
    for gateway in started:
        await gateway.stop()


def rewrite(conf: str, pattern: str, replacement: str) -> str:
    rewritten, count = re.subn(pattern, replacement, conf, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} matched {count} times in {SHIPPED_CONF}"
    return rewritten


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """A foreground nginx (its own prefix, pid and temp folders) with the shipped config."""
    binary = require_binary("nginx")
    processes: list[subprocess.Popen[bytes]] = []

    def start(gateway: Gateway, read_timeout: str | None = None) -> str:
        port = free_port()
        prefix = tmp_path / f"nginx-{port}"
        prefix.mkdir()
        conf = SHIPPED_CONF.read_text()
        conf = rewrite(conf, r"^    listen 80;$", f"    listen 127.0.0.1:{port};")
        conf = rewrite(conf, r"server 127\.0\.0\.1:8080 ", f"server 127.0.0.1:{gateway.port} ")
        conf = rewrite(
            conf, r"access_log /var/log/nginx/access\.log ", f"access_log {prefix}/access.log "
        )
        if read_timeout is not None:
            conf = rewrite(conf, r"proxy_read_timeout 75s;", f"proxy_read_timeout {read_timeout};")
        (prefix / "gateway.conf").write_text(conf)
        temp_paths = "\n".join(
            f"    {kind}_temp_path {prefix}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/http-access.log;
{temp_paths}
    include {prefix}/gateway.conf;
}}
"""
        )
        command = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        process = subprocess.Popen(
            [*command, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        deadline = time.monotonic() + 10
        while True:  # the pid file is written before the socket listens
            assert process.poll() is None, (prefix / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not start"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=10)


#: A gateway process and the shipped nginx in front of it: (gateway, nginx's base URL).
Proxied = Callable[..., Awaitable[tuple[Gateway, str]]]


@pytest.fixture
def through_nginx(
    start_gateway: Callable[..., Awaitable[Gateway]], start_nginx: Callable[..., str]
) -> Proxied:
    async def start(
        heartbeat_s: float = 15, read_timeout: str | None = None
    ) -> tuple[Gateway, str]:
        gateway = await start_gateway(heartbeat_s)
        return gateway, start_nginx(gateway, read_timeout)

    return start


BODY = {"prompt": "Explain vector databases.", "max_tokens": 20, "seed": 7}


async def stream_all(base: str, transport: str, **body: Any) -> Events:
    """Every event of one generation over `transport`. The client accepts gzip, yet the
    stream must come uncompressed: nginx would hold a gzipped stream in its buffers."""
    streamed = await stream(base, transport, {**BODY, **body}, headers={"Accept-Encoding": "gzip"})
    assert streamed.status in {101, 200} and "Content-Encoding" not in streamed.headers
    return streamed.events


@pytest.mark.parametrize("transport", ["chunked", "sse", "ws"])
async def test_every_transport_streams_through_nginx_unchanged(
    through_nginx: Proxied, transport: str
) -> None:
    gateway, proxy = await through_nginx()
    direct = await stream_all(gateway.url, transport, model="sim-fast")
    through = await stream_all(proxy, transport, model="sim-fast")
    assert_well_formed(through)
    assert through[-1]["type"] == "done"
    assert text_of(through) == text_of(direct) != ""


async def first_token_delay(session: aiohttp.ClientSession, base: str, transport: str) -> float:
    """Seconds from sending the request to reading the first token event."""
    started = time.perf_counter()
    async with session.post(
        f"{base}/v1/stream/{transport}", json={**BODY, "model": "sim-slow"}
    ) as response:
        async for line in response.content:
            if b'"type":"token"' in line:
                return time.perf_counter() - started
    raise AssertionError("no token")


@pytest.mark.parametrize("transport", ["chunked", "sse"])
async def test_the_first_token_through_nginx_is_not_held_back(
    through_nginx: Proxied, transport: str
) -> None:
    """sim-slow streams its 20 tokens over ~1 s: a buffering proxy would hold the
    first one until the buffer fills or the stream ends, ~1 s late."""
    gateway, proxy = await through_nginx()
    direct, through = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(7):  # alternating, so machine noise hits both alike
            direct.append(await first_token_delay(session, gateway.url, transport))
            through.append(await first_token_delay(session, proxy, transport))
    added_ms = (statistics.median(through) - statistics.median(direct)) * 1000
    print(
        f"{transport}: first token direct p50 {statistics.median(direct) * 1000:.1f} ms, "
        f"through nginx +{added_ms:.1f} ms"
    )
    assert added_ms < 15, (direct, through)


@pytest.mark.parametrize("transport", ["chunked", "sse", "ws"])
async def test_heartbeats_keep_a_thinking_stream_open_past_the_read_timeout(
    through_nginx: Proxied, transport: str
) -> None:
    """sim-think is silent for 2.5 s; nginx's read timeout is 1 s; heartbeats every 0.3 s."""
    _, proxy = await through_nginx(heartbeat_s=0.3, read_timeout="1s")
    events = await stream_all(proxy, transport, model="sim-think", max_tokens=3)
    assert_well_formed(events)
    assert events[-1]["type"] == "done" and text_of(events)


async def test_without_heartbeats_nginx_cuts_the_silent_stream(through_nginx: Proxied) -> None:
    """The control for the test above: the read timeout really is one second."""
    _, proxy = await through_nginx(heartbeat_s=10, read_timeout="1s")
    started = time.monotonic()
    with pytest.raises(aiohttp.ClientPayloadError):
        await stream_all(proxy, "chunked", model="sim-think", max_tokens=3)
    assert 0.9 < time.monotonic() - started < 2.4


async def access_line(gateway: Gateway, request_id: str) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while True:
            for line in gateway.access_lines():
                if line.get("request_id") == request_id:
                    return line
            await asyncio.sleep(0.05)


async def test_the_client_address_and_request_id_reach_the_gateway(through_nginx: Proxied) -> None:
    """The client connects from 127.0.0.2 and claims to be 203.0.113.9; nginx
    (127.0.0.1, trusted) appends what it saw, and the gateway believes only that."""
    gateway, proxy = await through_nginx()
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    spoofed = {"X-Forwarded-For": "203.0.113.9"}
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = {**spoofed, "X-Request-ID": "through-nginx-1"}
        async with session.post(f"{proxy}/v1/stream/chunked", json=BODY, headers=headers) as r:
            assert r.headers["X-Request-ID"] == "through-nginx-1"
            await r.read()
        # No id from the client: nginx's $request_id (32 hex digits) is used end to end.
        async with session.post(f"{proxy}/v1/stream/sse", json=BODY, headers=spoofed) as r:
            generated = r.headers["X-Request-ID"]
            await r.read()
        # Straight to the gateway, the same claim is not believed: 127.0.0.2 is no proxy.
        headers = {**spoofed, "X-Request-ID": "direct-1"}
        async with session.post(f"{gateway.url}/v1/stream/chunked", json=BODY, headers=headers):
            pass
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    through = await access_line(gateway, "through-nginx-1")
    assert through["client_ip"] == "127.0.0.2" and through["status"] == 200
    assert (await access_line(gateway, generated))["client_ip"] == "127.0.0.2"
    assert (await access_line(gateway, "direct-1"))["client_ip"] == "127.0.0.2"


async def test_metrics_are_not_served_through_nginx(through_nginx: Proxied) -> None:
    gateway, proxy = await through_nginx()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy}/metrics") as response:
            assert response.status == 404
        async with session.get(f"{gateway.url}/metrics") as response:
            assert response.status == 200
        async with session.get(f"{proxy}/readyz") as response:
            assert response.status == 200


# -- browsers on a port other than 80/443 ---------------------------------------------


async def test_a_page_served_on_a_high_port_may_open_a_websocket_and_post(
    through_nginx: Proxied,
) -> None:
    """A browser on nginx's port sends `Origin: http://127.0.0.1:<port>`; the gateway's
    same-origin check needs that port in `Host` (`$host` dropped it: 403)."""
    _, proxy = await through_nginx()  # a free high port
    async with aiohttp.ClientSession() as session:
        frames = await ws_exchange(
            proxy, {"type": "generate", "request_id": "r", **BODY}, origin=proxy
        )
        assert frames[-1]["type"] == "done", frames[-1]
        headers = {"Origin": proxy}
        async with session.post(f"{proxy}/v1/stream/chunked", json=BODY, headers=headers) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Access-Control-Allow-Origin"] == proxy
            assert (await read_ndjson(r))[-1]["type"] == "done"
        # Another port is another origin, through nginx as well.
        other = f"http://127.0.0.1:{free_port()}"
        async with session.post(
            f"{proxy}/v1/stream/chunked", json=BODY, headers={"Origin": other}
        ) as r:
            assert r.status == 403
        assert await ws_refusal(proxy, origin=other) == 403


# -- nginx's access log ------------------------------------------------------------------


async def test_an_access_token_never_reaches_the_nginx_access_log(
    through_nginx: Proxied, tmp_path: Path
) -> None:
    gateway, proxy = await through_nginx()
    prefix = tmp_path / f"nginx-{proxy.rsplit(':', 1)[1]}"
    secret = "secret-ticket-7f3a9c"
    async with aiohttp.ClientSession() as session:
        sse = f"{proxy}/v1/stream/sse?prompt=hi&max_tokens=3&access_token={secret}"
        async with session.get(sse, headers={"X-Request-ID": "nginx-log-sse"}) as r:
            assert r.status == 200
            await r.read()
        ws_url = f"{proxy}/v1/stream/ws?access%5Ftoken={secret}&x=1"
        async with session.ws_connect(ws_url, headers={"X-Request-ID": "nginx-log-ws"}) as ws:
            await ws.send_json({"type": "generate", "request_id": "r", **BODY})
            await ws_frames(ws, "r")
    log = prefix / "access.log"
    async with asyncio.timeout(5):  # a line is written when its request ends
        while log.read_text().count("/v1/stream/") < 2:
            await asyncio.sleep(0.05)
    text = log.read_text()
    assert secret not in text, text
    assert "access_token" not in text and "access%5ftoken" not in text.lower(), text
    assert '"GET /v1/stream/sse HTTP/1.1" 200' in text, text
    assert '"GET /v1/stream/ws HTTP/1.1" 101' in text, text
    # nginx's log and the gateway's share the request id; neither has the secret.
    assert "id=nginx-log-sse" in text and "id=nginx-log-ws" in text, text
    assert secret not in gateway.log_text()
    http_level = prefix / "http-access.log"
    assert not http_level.exists() or secret not in http_level.read_text()
