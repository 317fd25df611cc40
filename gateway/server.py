"""Running the app: uvloop, handler cancellation, signals and the drain.

`web.run_app` would close the listening socket and end every stream at the
first SIGTERM; we run the `AppRunner` ourselves so that a SIGTERM starts a
drain (`gateway.drain`) while the socket still answers, and a second signal
cuts it short.

Once bound it prints the URLs to open on stdout (the logs are JSON on
stderr), with the port really bound; a port it cannot bind is a `ServeError`,
one line for the CLI instead of a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import logging
import resource
import signal
import socket

from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings
from gateway.drain import drain
from gateway.keys import stream_cap_key
from gateway.middleware import READ_LINE_BYTES

log = logging.getLogger(__name__)

#: After the drain, what is left (handlers writing their last frame) gets this long.
FINAL_SHUTDOWN_S = 1.0
#: Young-generation threshold of the cyclic GC (CPython's default: 700).
#: Event logs keep ~100k tracked objects per 250 open streams; a full
#: collection over them takes ~17 ms and with the default it ran every few
#: seconds under load, stalling every stream at once (p99 TTFT). The gateway
#: makes few reference cycles, so collecting 100x less often costs little memory.
GC_THRESHOLD = (70_000, 10, 10)
#: Connections the kernel completes and holds while the loop is busy (a GC
#: pause, a burst of starts). aiohttp's default, 128, lost 444 of 10,000
#: streams started at 1,000 a second (bench S5: a dropped handshake is a
#: client connect that hangs, then fails); the kernel caps it at
#: `net.core.somaxconn` (4,096 on current Linux). uvicorn's default too.
LISTEN_BACKLOG = 2048


#: Linux only; elsewhere the sink's watchdog alone cuts off a peer that stopped.
_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)


def drop_silent_peers(runner: web.BaseRunner, timeout_s: float) -> None:
    """`TCP_USER_TIMEOUT` = `timeout_s` (`streams.write_timeout_s`, Linux) and
    `SO_KEEPALIVE` on the listening sockets, which every connection accepted
    after it inherits.

    Keep-alive probes find an idle peer that vanished. aiohttp would turn them
    on per connection (its `tcp_keepalive`, off in `run`): a `getsockname` and
    a `setsockopt` through uvloop's socket wrapper per stream start.

    With the user timeout, a peer that stops acknowledging (a laptop shut, a
    network gone, with no FIN or RST) is dropped by the kernel once sent data
    has waited that long, before the socket's send buffer (tens of kilobytes to megabytes) has
    filled up and let the sink's watchdog see a pending write; without it
    Linux retransmits for about 15 minutes, and the generation runs on. Set
    on the listener, not per stream: through uvloop's socket wrapper a
    `setsockopt` per stream cost 1.7 % of a start's instructions.
    """
    for site in runner.sites:
        # aiohttp keeps each site's asyncio.Server private; its sockets are public.
        for sock in getattr(site._server, "sockets", None) or ():
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if _TCP_USER_TIMEOUT is not None:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(timeout_s * 1000))


def raise_open_files_limit() -> int:
    """Each proxied stream holds two sockets (client and upstream); a soft
    limit of 1,024, common by default, would cap a replica near 500 streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is Linux-only in our dependencies
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ServeError(Exception):
    """Start-up failed for a reason the operator fixes (a busy port): one line, no traceback."""


def bind_problem(exc: OSError, host: str, port: int | None, choose: str = "--port") -> str:
    """What `cannot bind` means, in the words of the fix (`choose`: where the port is set)."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another gateway?): stop what holds it, "
            f"or choose another port with {choose}"
        )
    if exc.errno == errno.EACCES:
        return f"port {port} on {host}: permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: it is not an address of this machine"
    return f"cannot listen on {host} port {port}: {exc.strerror or exc}"


def http_url(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address in brackets; a wildcard address (all
    interfaces) becomes loopback, which a browser on this machine can open."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


def start_up_line(settings: Settings, host: str, port: int) -> str:
    """The URLs to open, from the address really bound (port 0 binds any free one)."""
    server = settings.server
    base = http_url(host, port)
    line = f"gateway: serving on {base} — demo page {base}/ · models {base}/v1/models"
    if server.metrics_enabled:
        metrics = base if server.metrics_port is None else http_url(host, server.metrics_port)
        line += f" · metrics {metrics}/metrics"
    return line


class Signals:
    """The first SIGTERM/SIGINT sets `stop`; the next one sets `urgent` too."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.urgent = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._received, signum)

    def _received(self, signum: int) -> None:
        if self.stop.is_set():
            log.warning("second signal: stopping now", extra={"signal": signum})
            self.urgent.set()
        else:
            log.info("signal: draining", extra={"signal": signum})
            self.stop.set()


async def run(settings: Settings) -> None:
    """Serve until a signal, drain, and return (exit status 0).

    `handler_cancellation=True`: a client that disconnects cancels its
    handler at once, even while it waits for the upstream's first token
    (aiohttp's default, False, would notice only at the next write); the tests
    run with the same setting.
    """
    app = create_app(settings)
    wanted = settings.server.max_streams
    if wanted and app[stream_cap_key] < wanted:
        log.warning(
            "the open-files limit leaves room for fewer streams than server.max_streams",
            extra={"max_streams": wanted, "stream_cap": app[stream_cap_key]},
        )
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        tcp_keepalive=False,  # set once on the listener instead: `drop_silent_peers`
        access_log=None,
        shutdown_timeout=FINAL_SHUTDOWN_S,
        keepalive_timeout=settings.server.idle_timeout_s,
        max_line_size=READ_LINE_BYTES,
    )
    server = settings.server
    try:
        await runner.setup()  # binds `server.metrics_port`, if set
    except OSError as exc:
        await runner.cleanup()
        if server.metrics_port is None:
            raise
        problem = bind_problem(exc, server.host, server.metrics_port, "server.metrics_port")
        raise ServeError(f"server.metrics_port: {problem}") from None
    signals = Signals()
    try:
        site = web.TCPSite(runner, server.host, server.port, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            raise ServeError(bind_problem(exc, server.host, server.port)) from None
        drop_silent_peers(runner, settings.streams.write_timeout_s)
        host, port = runner.addresses[0][:2]
        # For whoever started it: stdout, apart from the JSON logs on stderr.
        print(start_up_line(settings, host, port), flush=True)
        log.info(
            "serving",
            extra={
                "host": server.host,
                "port": port,
                "url": http_url(host, port),
                "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                "stream_cap": app[stream_cap_key],
            },
        )
        await signals.stop.wait()
        await drain(app, settings.server.shutdown_grace_s, signals.urgent)
    finally:
        await runner.cleanup()
    log.info("stopped")


def serve(settings: Settings) -> None:
    gc.set_threshold(*GC_THRESHOLD)
    raise_open_files_limit()
    loop = new_event_loop()
    try:
        loop.run_until_complete(run(settings))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
