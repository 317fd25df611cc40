"""A raw HTTP client over asyncio streams, for dropping connections at exact points."""

from __future__ import annotations

import asyncio
import socket

import orjson


async def open_stream(
    port: int,
    path: str,
    body: dict | None = None,
    *,
    headers: dict[str, str] | None = None,
    rcvbuf: int | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a request and return the open connection (response unread)."""
    sock = None
    if rcvbuf is not None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = orjson.dumps(body) if body is not None else b""
    method = "POST" if body is not None else "GET"
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append("Content-Type: application/json")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    return reader, writer


async def read_generation_id(reader: asyncio.StreamReader) -> str:
    """Skip headers and read until the `start` event names the generation."""
    buffer = b""
    while b'"generation_id":"' not in buffer:
        chunk = await reader.read(4096)
        if not chunk:
            raise ConnectionError(f"closed before start: {buffer!r}")
        buffer += chunk
    start = buffer.index(b'"generation_id":"') + len(b'"generation_id":"')
    return buffer[start : buffer.index(b'"', start)].decode()
