"""The floor of any proxy: a TCP relay that copies bytes both ways and parses nothing.

    python -m bench.relay --port 9000 --upstream-port 8001

The suite puts it between the load generator and the fake upstream for S2 and
S3. It does what every proxy in front of a stream must do at the least (one
more process, one `recv` and one `send` per chunk, on uvloop), and nothing a
gateway does besides (HTTP, JSON, auth, metrics, logs). Its figures are the
best a Python proxy on this machine can reach: a target the relay misses is
out of reach here, whatever the gateway does.
"""

from __future__ import annotations

import argparse
import asyncio

try:
    import uvloop
except ImportError:  # pragma: no cover - Linux has it
    uvloop = None


class Half(asyncio.Protocol):
    """One side of a relayed connection; writes what it reads to its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.set_write_buffer_limits(high=256 * 1024)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Back-pressure: a peer that cannot take more pauses our reading.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class ClientSide(Half):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(Half, *self.upstream)
        except OSError:
            assert self.transport is not None
            self.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        assert upstream.transport is not None
        for data in self.pending:
            upstream.transport.write(data)
        self.pending.clear()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ClientSide(("127.0.0.1", upstream_port)), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    if uvloop is not None:
        uvloop.run(serve(args.port, args.upstream_port))
    else:  # pragma: no cover
        asyncio.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
