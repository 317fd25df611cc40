"""The upstream HTTP/1.1 client (gateway/providers/upstream_http.py) against real sockets.

Each test runs a small asyncio server that writes exactly the bytes a case
needs (keep-alive, chunked and close-delimited bodies, a late last chunk,
garbage), so the pool's reuse, queueing, draining and failures are seen on
the wire. Streaming through the OpenAI provider is covered by
tests/test_openai_provider.py.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pydantic import ValidationError
from yarl import URL

from gateway.config import OpenAIModel
from gateway.providers.upstream_http import (
    UpstreamConnectError,
    UpstreamDropped,
    UpstreamLate,
    UpstreamPool,
    UpstreamSilent,
)
from tests.redis_server import make_tls_files

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Server:
    """Counts connections; answers every request on a connection with `answer`."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = URL()
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                await self.answer(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # stopped with the listener (asyncio would log a cancelled handler)
        finally:
            writer.close()


@asynccontextmanager
async def serving(answer: Answer, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(answer)
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    scheme = "https" if tls is not None else "http"
    server.url = URL(f"{scheme}://127.0.0.1:{port}/v1/chat/completions")
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()
        # Handlers still waiting on a socket are stopped with the listener.
        for task in server.tasks:
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)


@asynccontextmanager
async def pool_for(server: Server, **options: object) -> AsyncIterator[UpstreamPool]:
    settings: dict = {"headers": {"Authorization": "Bearer k"}, "limit": 10}
    settings |= {"connect_timeout_s": 2.0} | options
    pool = UpstreamPool(server.url, **settings)
    try:
        yield pool
    finally:
        await pool.aclose()


async def whole_answer(writer: asyncio.StreamWriter, body: bytes = b"data: x\n\n") -> None:
    writer.write(OK_HEAD + chunk(body) + b"0\r\n\r\n")
    await writer.drain()


async def read_all(pool: UpstreamPool) -> bytes:
    async with pool.post(b"{}", {}, 5.0) as response:
        assert response.status == 200
        data = b""
        while piece := await response.readany():
            data += piece
        return data


async def test_the_request_goes_out_as_given_and_the_answer_comes_back() -> None:
    async with serving(lambda _, w: whole_answer(w, b"data: hello\n\n")) as server:
        async with pool_for(server) as pool:
            async with pool.post(b'{"a":1}', {"X-Request-ID": "r1"}, 5.0) as response:
                assert (response.status, response.reason) == (200, "OK")
                assert response.headers["content-type"] == "text/event-stream"
                assert await response.readany() == b"data: hello\n\n"
                assert await response.readany() == b""
    request = server.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.url.port}\r\n".encode() in request
    assert b"Authorization: Bearer k\r\n" in request and b"X-Request-ID: r1\r\n" in request
    assert request.endswith(b'Content-Length: 7\r\n\r\n{"a":1}')


async def test_each_answer_has_its_own_headers_and_the_last_of_a_repeated_one_wins() -> None:
    """Headers are kept raw and decoded on first use: names lower-cased, the
    last of a repeated name (in any case) wins, and nothing carries over to
    the next answer on the same connection."""
    answers = iter([b"Retry-After: 1\r\nX-Answer: one\r\nretry-after: 2\r\n", b"X-Answer: two\r\n"])

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = OK_HEAD.replace(b"\r\n\r\n", b"\r\n" + next(answers) + b"\r\n", 1)
        writer.write(head + chunk(b"data: x\n\n") + b"0\r\n\r\n")
        await writer.drain()

    seen = []
    async with serving(answer) as server:
        async with pool_for(server) as pool:
            for _ in range(2):
                async with pool.post(b"{}", {}, 5.0) as response:
                    while await response.readany():
                        pass
                    seen.append(response.headers)
    assert server.connections == 1
    assert seen[0]["retry-after"] == "2" and seen[0]["x-answer"] == "one"
    assert seen[1]["x-answer"] == "two" and "retry-after" not in seen[1]
    assert seen[1]["content-type"] == "text/event-stream"


async def test_connections_are_reused_across_answers() -> None:
    async with serving(lambda _, w: whole_answer(w)) as server:
        async with pool_for(server) as pool:
            for _ in range(3):
                assert await read_all(pool) == b"data: x\n\n"
    assert server.connections == 1 and len(server.requests) == 3


async def test_an_answer_left_before_its_last_chunk_drains_and_is_pooled() -> None:
    async def late_end(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + chunk(b"data: [DONE]\n\n"))
        await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")

    async with serving(late_end) as server:
        async with pool_for(server) as pool:
            for _ in range(2):
                async with pool.post(b"{}", {}, 5.0) as response:
                    assert await response.readany() == b"data: [DONE]\n\n"
                await asyncio.sleep(0.2)  # the last chunk comes in the meantime
    assert server.connections == 1 and len(server.requests) == 2


async def test_the_limit_queues_requests_until_a_connection_is_free() -> None:
    release = asyncio.Event()

    async def held(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD)
        await release.wait()
        writer.write(chunk(b"data: x\n\n") + b"0\r\n\r\n")

    async with serving(held) as server:
        async with pool_for(server, limit=1) as pool:
            first = asyncio.create_task(read_all(pool))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(read_all(pool))
            await asyncio.sleep(0.1)
            assert len(server.requests) == 1  # the second waits for the connection
            release.set()
            assert await asyncio.gather(first, second) == [b"data: x\n\n"] * 2
    assert server.connections == 1


async def test_a_body_delimited_by_the_close_is_read_to_its_end() -> None:
    async def old_style(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndata: a\n\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"data: b\n\n")
        writer.close()

    async with serving(old_style) as server:
        async with pool_for(server) as pool:
            assert await read_all(pool) == b"data: a\n\ndata: b\n\n"
            assert await read_all(pool) == b"data: a\n\ndata: b\n\n"  # on a new connection
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def then_close(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await whole_answer(writer)
        await asyncio.sleep(0.05)
        writer.close()  # keep-alive announced, then the server's idle timeout

    async with serving(then_close) as server:
        async with pool_for(server) as pool:
            assert await read_all(pool) == b"data: x\n\n"
            await asyncio.sleep(0.2)
            assert await read_all(pool) == b"data: x\n\n"
    assert server.connections == 2


async def drop_mid_body(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(OK_HEAD + chunk(b"data: x\n\n"))
    await writer.drain()
    writer.close()


async def not_http(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")


async def endless_head(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for n in range(10_000):  # 10,000 headers of ~30 bytes: 300 KB
        writer.write(b"X-Filler-%05d: %s\r\n" % (n, b"y" * 16))
        await writer.drain()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (drop_mid_body, "closed the connection"),
        (not_http, "not valid HTTP"),
        (endless_head, "response head over 65536 bytes"),  # llhttp sets no bound
    ],
    ids=["drop mid-body", "not HTTP", "endless head"],
)
async def test_a_broken_answer_fails_the_exchange_clearly(answer: Answer, error: str) -> None:
    async with serving(answer) as server:
        async with pool_for(server) as pool:
            with pytest.raises(UpstreamDropped, match=error):
                await read_all(pool)


async def test_silence_fails_the_exchange_on_time() -> None:
    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + chunk(b"data: x\n\n"))
        await asyncio.sleep(10)

    async with serving(mute) as server:
        async with pool_for(server) as pool:
            async with pool.post(b"{}", {}, 0.3) as response:
                assert await response.readany() == b"data: x\n\n"
                began = time.monotonic()
                with pytest.raises(UpstreamSilent):
                    await response.readany()
                assert 0.2 <= time.monotonic() - began < 0.6


async def test_the_deadline_fails_an_exchange_that_keeps_talking_until_lifted() -> None:
    """Bytes that keep coming reset the silence timer, not the deadline; lifting it
    leaves the silence timer alone in charge."""

    async def chatty(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD)
        for _ in range(100):
            writer.write(chunk(b": keep-alive\n\n"))
            await asyncio.sleep(0.05)

    async with serving(chatty) as server:
        async with pool_for(server) as pool:
            began = time.monotonic()
            async with pool.post(b"{}", {}, 0.2, pool.loop.time() + 0.4) as response:
                with pytest.raises(UpstreamLate):
                    while await response.readany():
                        pass
            assert 0.35 <= time.monotonic() - began < 0.8
            began = time.monotonic()
            async with pool.post(b"{}", {}, 0.2, pool.loop.time() + 0.4) as response:
                response.lift_deadline()
                while time.monotonic() - began < 0.8:  # past the deadline: still open
                    assert await response.readany()


async def test_the_deadline_bounds_the_wait_for_a_connection() -> None:
    async def held(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD)
        await asyncio.sleep(10)

    async with serving(held) as server:
        async with pool_for(server, limit=1) as pool:
            async with pool.post(b"{}", {}, 5.0):
                began = time.monotonic()
                with pytest.raises(UpstreamLate):
                    async with pool.post(b"{}", {}, 5.0, pool.loop.time() + 0.3):
                        pass
                assert 0.25 <= time.monotonic() - began < 0.6
    assert len(server.requests) == 1


async def test_a_closed_port_is_a_connect_error() -> None:
    async with serving(lambda _, w: whole_answer(w)) as server:
        pass  # closed again: nothing listens on its port now
    async with pool_for(server) as pool:
        with pytest.raises(UpstreamConnectError, match="ConnectionRefusedError"):
            await read_all(pool)


@pytest.mark.parametrize(
    "headers",
    [{"X-Tenant": "a\r\nX-Injected: 1"}, {"X-Tenant": "a\nb"}, {"X Tenant": "a"}, {"": "a"}],
)
def test_configured_headers_cannot_smuggle_another_header(headers: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="headers"):
        OpenAIModel(name="m", provider="openai", headers=headers)


async def test_the_pool_refuses_a_header_that_would_split_the_request() -> None:
    async with serving(lambda _, w: whole_answer(w)) as server:
        with pytest.raises(ValueError, match="CR, LF"):
            UpstreamPool(
                server.url,
                headers={"X-Tenant": "a\r\nX-Injected: 1"},
                limit=1,
                connect_timeout_s=1,
            )
        async with pool_for(server) as pool:
            with pytest.raises(ValueError, match="CR, LF"):
                pool.request_bytes(b"{}", {"X-Request-ID": "a\r\nb"})


async def test_an_https_upstream_is_verified_against_the_trusted_cas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_tls_files(tmp_path)  # a throwaway CA, and a certificate for 127.0.0.1
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(files.cert, files.key)
    async with serving(lambda _, w: whole_answer(w), tls) as server:
        # Not trusted: the handshake fails, and says why.
        async with pool_for(server) as pool:
            with pytest.raises(UpstreamConnectError, match="SSLCertVerificationError"):
                await read_all(pool)
        # Trusted (as an operator adds a private CA: OpenSSL's SSL_CERT_FILE).
        monkeypatch.setenv("SSL_CERT_FILE", str(files.ca))
        async with pool_for(server) as pool:
            assert await read_all(pool) == b"data: x\n\n"
            assert await read_all(pool) == b"data: x\n\n"
    assert server.connections == 1  # one kept alive (a refused handshake never reaches it)


async def test_a_consumer_failing_on_the_read_that_ends_the_body_is_not_lost() -> None:
    """The last read brings a bad line and the body's end together: llhttp has
    seen the whole message by the time the consumer raises, and the failure
    must still reach the caller (and the connection must not be pooled)."""

    async def bad_last_read(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + chunk(b"data: good\n\n"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(b"data: bad\n\n") + b"0\r\n\r\n")

    def consume(data: bytes, at_eof: bool) -> bool:
        if b"bad" in data:
            raise ValueError("a bad line")
        return False

    async with serving(bad_last_read) as server:
        async with pool_for(server) as pool:
            with pytest.raises(ValueError, match="a bad line"):
                async with pool.post(b"{}", {}, 5.0) as response:
                    assert await response.readany() == b"data: good\n\n"
                    await response.follow(consume)
            assert await read_all(pool) == b"data: good\n\ndata: bad\n\n"
    assert server.connections == 2
