"""The upstream's streamed answers over a small HTTP/1.1 client on httptools (llhttp).

Why not aiohttp's client, which did this job before: per paced token, its
protocol's `data_received`, its payload parser's chunk bookkeeping and the
`StreamReader` it feeds were ~10 % of the gateway's CPU even with the body
forwarded from the read callback, and building and sending each request
through `ClientSession` was ~8 % of a stream start (py-spy, bench `starts`
and S3; docs/performance.md has the A/B). What an OpenAI-compatible stream
needs is one `POST` with a fixed set of headers and a body whose pieces go
to a parser as they arrive, on a pool of keep-alive connections; that is
what is here, and nothing else (no redirects, cookies, proxies or
decompression: we ask for `identity`).

A response's body goes, read by read, to a consumer called from inside the
connection's `data_received` (`Exchange.follow`): one read's HTTP chunks are
joined and handed on at once, so the consumer runs once per read, with no
task switch and no buffer in between. Until a consumer is set (the first
read, an error body), the pieces are buffered for `readany`/`read`.

One silence timer per exchange bounds every wait for the upstream (its head
and each gap in its body) by `silence_s`, re-armed from the last read (one
timer a stream, not one per read). A connection goes back to the pool only
when its response ended whole and the server keeps it alive; one whose
answer the caller stopped reading early drains for a moment first.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable

import httptools
from yarl import URL

#: `consume(data, at_eof)` -> True when it needs no more (the body's end marker came).
Consume = Callable[[bytes, bool], bool]

#: How long a connection whose answer was left unread may take to finish it
#: before it is closed rather than pooled (the stream's `[DONE]` usually
#: arrives just before the body's last chunk).
DRAIN_S = 1.0
#: A response head larger than this fails the exchange (llhttp sets no bound).
MAX_HEAD_BYTES = 64 * 1024


class UpstreamConnectError(ConnectionError):
    """No connection could be made (refused, unresolvable, timed out)."""


class UpstreamDropped(ConnectionError):
    """The connection failed or closed before the response was whole, or was not HTTP."""


class UpstreamSilent(Exception):
    """Nothing came from the upstream for `silence_s` (not a `TimeoutError`, which
    callers keep for their own deadlines)."""


class UpstreamLate(Exception):
    """The exchange's deadline passed before the caller lifted it (its first token)."""


def _header_line(name: str, value: str) -> bytes:
    if any(c in name + value for c in "\r\n\0") or not name or ":" in name:
        raise ValueError(f"header {name!r}: names and values may not hold CR, LF, NUL or ':'")
    return f"{name}: {value}\r\n".encode("latin-1")


class Exchange(asyncio.Protocol):
    """One keep-alive connection, and the response in progress on it."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = ""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] | None = None
        self._head_bytes = 0
        self._pieces: list[bytes] = []
        #: Reads not yet taken (one or two): a list, as a deque's first block
        #: alone is 600 bytes a stream (tracemalloc, 1,000 held streams).
        self._buffered: list[bytes] = []
        self._complete = False
        self._keep_alive = False
        self._failure: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._consume: Consume | None = None
        self._silence_s: float | None = None
        self._deadline: float | None = None
        self._last_read = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._draining: asyncio.TimerHandle | None = None
        self._head_done = False

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - we never ask to upgrade
            self._fail(UpstreamDropped("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            self._fail(UpstreamDropped(f"the upstream's answer is not valid HTTP: {cause}"))
            return
        pieces = self._pieces
        if pieces:
            body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            self._deliver(body)
        if self._complete:
            self._deliver(b"", at_eof=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._pool._lost(self)
        if self._complete:
            return
        # A body delimited by the connection's close (no length, not chunked) ends here.
        if exc is None and self._head_done and not self._chunked_or_sized():
            self._complete = True
            self._deliver(b"", at_eof=True)
            return
        self._fail(UpstreamDropped(f"the upstream closed the connection: {exc or 'EOF'}"))

    # -- httptools callbacks -----------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:  # llhttp reports it as a parser error
            raise ValueError(f"a response head over {MAX_HEAD_BYTES} bytes")
        self._raw_headers.append((name, value))

    @property
    def headers(self) -> dict[str, str]:
        """The response's headers, lower-cased names; the last of a repeated one wins.

        Decoded on first use: on a streaming answer nothing reads them, and
        decoding each in its callback cost half of the head's parse (23
        headers, OpenAI's usual head: 21 µs a head against 11 µs kept raw).
        """
        if self._headers is None:
            self._headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in self._raw_headers
            }
        return self._headers

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        # Read now: once `feed_data` returns, llhttp has reset for the next message.
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True

    # -- reading -----------------------------------------------------------

    def _chunked_or_sized(self) -> bool:
        return "content-length" in self.headers or "chunked" in self.headers.get(
            "transfer-encoding", ""
        )

    def _deliver(self, body: bytes, *, at_eof: bool = False) -> None:
        consume = self._consume
        if consume is None:
            if body:
                self._buffered.append(body)
            self._wake()
            if self._draining is not None and at_eof:
                self._pool._drained(self)
            return
        try:
            if consume(body, at_eof) or at_eof:
                self._consume = None
                self._wake()
        except BaseException as exc:  # it goes to the awaiting task
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """The connection is unusable: wake the reader with `exc` and abort.

        Kept even when the message is whole: llhttp runs `on_message_complete`
        before the read's body is delivered, so a consumer may fail after it.
        """
        if self._failure is None:
            self._failure = exc
        self._consume = None
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def head(self) -> None:
        """Wait for the response's status line and headers."""
        while not self._head_done:
            self._raise_failure()
            await self._wait()
        self._raise_failure()

    async def readany(self) -> bytes:
        """The body's next buffered piece, waiting for one; b"" at its end."""
        while not self._buffered:
            if self._complete:
                return b""
            self._raise_failure()
            await self._wait()
        return self._buffered.pop(0)

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (an error's), or what came before a failure."""
        data = b""
        try:
            while len(data) < limit:
                piece = await self.readany()
                if not piece:
                    break
                data += piece
        except (UpstreamDropped, UpstreamSilent):
            pass
        return data[:limit]

    async def follow(self, consume: Consume) -> None:
        """Hand the rest of the body to `consume`, read by read, from the read callback;
        return when it is done. Raises what `consume` raises, or the connection's failure."""
        while self._buffered:  # what came before: in this task
            if consume(self._buffered.pop(0), False):
                return
        if self._complete:
            consume(b"", True)
            return
        self._raise_failure()
        self._consume = consume
        try:
            while self._consume is not None:
                await self._wait()
        finally:
            self._consume = None
        self._raise_failure()

    # -- silence -----------------------------------------------------------

    def watch_silence(self, silence_s: float | None, deadline: float | None = None) -> None:
        """Fail the exchange after `silence_s` without a byte, or at `deadline`
        (loop time) unless `lift_deadline` came first: one timer for both."""
        self._silence_s = silence_s
        self._deadline = deadline
        self._last_read = self._loop.time()
        due = self._due()
        if due is not None:
            self._timer = self._loop.call_at(due, self._silence_check)

    def lift_deadline(self) -> None:
        """What the deadline waited for came; the timer re-arms for silence alone."""
        self._deadline = None

    def _due(self) -> float | None:
        silence_s, deadline = self._silence_s, self._deadline
        due = None if silence_s is None else self._last_read + silence_s
        if deadline is not None and (due is None or deadline < due):
            return deadline
        return due

    def _silence_check(self) -> None:
        self._timer = None
        if self._complete or self._failure is not None:
            return
        now = self._loop.time()
        if self._deadline is not None and now >= self._deadline:
            self._fail(UpstreamLate("the deadline passed"))
            return
        due = self._due()
        if due is None:
            return
        if now < due:
            self._timer = self._loop.call_at(due, self._silence_check)
            return
        self._fail(UpstreamSilent(f"nothing came for {self._silence_s} s"))

    def stop_watching(self) -> None:
        self._silence_s = None
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the pool's side ---------------------------------------------------

    def send(self, data: bytes, silence_s: float | None, deadline: float | None = None) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.watch_silence(silence_s, deadline)

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and self._failure is None
            and self.transport is not None
            and not self.transport.is_closing()
            and self._keep_alive
        )

    @property
    def usable(self) -> bool:
        """Still connected (bytes that came while idle fail the parser, which aborts it)."""
        return self.transport is not None and not self.transport.is_closing()

    def begin_drain(self) -> None:
        self._draining = self._loop.call_later(DRAIN_S, self.close)

    def end_drain(self) -> None:
        if self._draining is not None:
            self._draining.cancel()
            self._draining = None

    def recycle(self) -> None:
        """Ready for the next request on this connection."""
        self.stop_watching()
        self.end_drain()
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def close(self) -> None:
        self.stop_watching()
        self.end_drain()
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one origin, at most `limit` open; waiters queue in order."""

    def __init__(
        self,
        url: URL,
        *,
        headers: dict[str, str],
        limit: int,
        connect_timeout_s: float,
        keepalive_s: float = 30.0,
    ) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"upstream URL must be http(s)://host/…, not {url}")
        self.loop = asyncio.get_running_loop()
        self._host = url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._limit = limit
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        host_header = url.raw_host or self._host
        if not url.is_default_port():
            host_header = f"{host_header}:{self._port}"
        target = url.raw_path_qs or "/"
        self._head = (
            f"POST {target} HTTP/1.1\r\n".encode("latin-1")
            + _header_line("Host", host_header)
            + b"".join(_header_line(k, v) for k, v in headers.items())
        )
        self._idle: list[Exchange] = []
        self._idle_timers: dict[Exchange, asyncio.TimerHandle] = {}
        self._open: set[Exchange] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def request_bytes(self, body: bytes, extra_headers: dict[str, str]) -> bytes:
        extra = b"".join(_header_line(k, v) for k, v in extra_headers.items())
        return b"%s%sContent-Length: %d\r\n\r\n%s" % (self._head, extra, len(body), body)

    def post(
        self,
        body: bytes,
        extra_headers: dict[str, str],
        silence_s: float | None,
        deadline: float | None = None,
    ) -> Posting:
        """`async with pool.post(...) as exchange`: send the request and wait for
        the response's head; the exchange is the response.

        `deadline` (loop time) bounds the wait for a connection too, and then
        everything until `Exchange.lift_deadline`: `UpstreamLate`. Only the
        wait for a connection needs a timer of its own; once sent, the
        exchange's silence timer keeps it.

        Leaving the block pools the connection if its answer ended whole, lets
        it drain for a moment if the answer was still coming, and closes it if
        it failed or the block was left by an exception.
        """
        return Posting(self, self.request_bytes(body, extra_headers), silence_s, deadline)

    def _take_idle(self) -> Exchange | None:
        """A pooled connection that is still usable (the usual case: no wait, no timer)."""
        while self._idle and not self._closed:
            exchange = self._idle.pop()
            self._idle_timers.pop(exchange).cancel()
            if exchange.usable:
                return exchange
            exchange.close()
        return None

    async def _acquire_by(self, deadline: float | None) -> Exchange:
        if deadline is None:
            return await self._acquire()
        try:
            async with asyncio.timeout_at(deadline):
                return await self._acquire()
        except TimeoutError:
            raise UpstreamLate("no connection before the deadline") from None

    async def _acquire(self) -> Exchange:
        if self._closed:
            raise UpstreamConnectError("the upstream pool is closed")
        exchange = self._take_idle()
        if exchange is not None:
            return exchange
        while len(self._open) + self._connecting >= self._limit:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_waiter()  # we were woken, then cancelled: pass the turn on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            exchange = self._take_idle()  # a connection came back while we waited
            if exchange is not None:
                return exchange
        self._connecting += 1
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await self.loop.create_connection(
                    lambda: Exchange(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamSilent(f"no connection within {self._connect_timeout_s} s") from None
        except OSError as exc:
            raise UpstreamConnectError(type(exc).__name__) from exc
        finally:
            self._connecting -= 1
            self._wake_waiter()
        self._open.add(protocol)
        return protocol

    def _release(self, exchange: Exchange, failed: bool) -> None:
        if exchange.reusable and not failed:
            self._pool(exchange)
        elif failed or exchange._failure is not None or exchange.transport is None:
            exchange.close()
        else:  # answer still coming: pool it if it ends soon
            exchange.begin_drain()

    def _drained(self, exchange: Exchange) -> None:
        exchange.end_drain()
        if exchange.reusable:
            self._pool(exchange)
        else:
            exchange.close()

    def _pool(self, exchange: Exchange) -> None:
        if self._closed:
            exchange.close()
            return
        exchange.recycle()
        self._idle.append(exchange)
        self._idle_timers[exchange] = self.loop.call_later(
            self._keepalive_s, self._expire, exchange
        )
        self._wake_waiter()

    def _expire(self, exchange: Exchange) -> None:
        self._idle_timers.pop(exchange, None)
        if exchange in self._idle:
            self._idle.remove(exchange)
        exchange.close()

    def _lost(self, exchange: Exchange) -> None:
        self._open.discard(exchange)
        timer = self._idle_timers.pop(exchange, None)
        if timer is not None:
            timer.cancel()
            self._idle.remove(exchange)
        exchange.stop_watching()
        exchange.end_drain()
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        for exchange in list(self._open):
            exchange.close()
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports report their close


class Posting:
    """`UpstreamPool.post`'s block. A class rather than an `@asynccontextmanager`:
    one async generator (and contextlib's wrapper around it) fewer per stream."""

    __slots__ = ("_deadline", "_exchange", "_pool", "_request", "_silence_s")

    def __init__(
        self, pool: UpstreamPool, request: bytes, silence_s: float | None, deadline: float | None
    ) -> None:
        self._pool = pool
        self._request = request
        self._silence_s = silence_s
        self._deadline = deadline
        self._exchange: Exchange | None = None

    async def __aenter__(self) -> Exchange:
        pool = self._pool
        exchange = pool._take_idle() or await pool._acquire_by(self._deadline)
        try:
            exchange.send(self._request, self._silence_s, self._deadline)
            await exchange.head()
        except BaseException:
            exchange.stop_watching()
            pool._release(exchange, True)
            raise
        self._exchange = exchange
        return exchange

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        exchange = self._exchange
        assert exchange is not None
        exchange.stop_watching()
        # A caller's generator that was closed (`GeneratorExit`) did not fail:
        # it had what it wanted (its reader stops at `[DONE]`), so the answer may drain.
        self._pool._release(exchange, exc_type is not None and exc_type is not GeneratorExit)
