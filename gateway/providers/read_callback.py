"""An upstream body read inside the connection's read callback, not by a task.

Reading a stream the usual way (`await response.content.readany()` in a
loop) costs a task switch per upstream read: the bytes arrive in the
protocol's `data_received`, aiohttp's `StreamReader` buffers them and
resolves a future, the event loop schedules the reading task, the task
resumes through its coroutine frames and async-generator layers, and only
then parses. On paced streams every token is its own read, so that hop is
paid per token, by every stream (issue 19; bench/RESULTS.md).

`follow_body` hands each piece of the body to a consumer from inside
`data_received` instead: for the rest of the body the response's
`StreamReader` becomes a `_Forwarding` reader, whose `feed_data` (which
aiohttp's parser calls) passes the bytes on instead of buffering them, and
a `_Parked` object sits where the reader keeps a waiting reader's future, so
that the end of the body (`feed_eof`), a failed connection and the read
timeout (`sock_read`, `set_exception`) reach it the way they would wake a
reader. The task awaits one future for the whole body.

aiohttp re-arms its `sock_read` timer on every read (a timer cancelled and
another scheduled: 2.3 % of the gateway's CPU on paced streams). While a
body is followed, the connection's `read_timeout` is lifted and the parked
consumer keeps the silence bound itself: it notes the loop's clock per
read, and one timer a stream fires at most once per `silence_s`, re-armed
to the last read's time + `silence_s` until a silence is that long.

Nothing is read from the reader's buffer inside the callback: draining it
there would resume aiohttp's parser re-entrantly, from within its own
callback (seen here: the parser then held the end of the body back for
good). This leans on two details of aiohttp's `StreamReader`, its `_waiter`
slot and `feed_data` being looked up on the class; the tests that stream
through the OpenAI provider (tests/test_openai_provider.py: large deltas,
fragments, CRLF, drops, stalls, timeouts) exercise both on the installed
aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

#: `consume(data, at_eof)` -> True when it needs no more (the body's end marker came).
Consume = Callable[[bytes, bool], bool]


class _Parked:
    """Sits in the reader's waiter slot; aiohttp calls it like a future."""

    __slots__ = (
        "_consume",
        "_finished",
        "_last_read",
        "_loop",
        "_reader",
        "_silence_s",
        "_timer",
    )

    def __init__(
        self,
        reader: aiohttp.StreamReader,
        consume: Consume,
        finished: asyncio.Future[None],
        silence_s: float | None,
    ) -> None:
        self._reader = reader
        self._consume = consume
        self._finished = finished
        self._loop = finished.get_loop()
        self._silence_s = silence_s
        self._last_read = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None

    def watch_silence(self) -> None:
        """(Re-)arm the silence timer at the last read + `silence_s`."""
        if self._silence_s is not None and not self._finished.done():
            when = self._last_read + self._silence_s
            self._timer = self._loop.call_at(when, self._silence_check)

    def _silence_check(self) -> None:
        if self._loop.time() - self._last_read < self._silence_s:  # type: ignore[operator]
            self.watch_silence()  # something came since the timer was armed
            return
        # What aiohttp's own `sock_read` timeout raises, so callers see one error.
        self.set_exception(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))

    def stop_watching(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def done(self) -> bool:
        """Never resolved: aiohttp only wakes it when it is not done."""
        return False

    def set_result(self, _: object) -> None:
        """A wake-up (none is expected: the bytes and the end come through
        `_Forwarding`); aiohttp took us out of the slot, so back in."""
        if not self._finished.done():
            self._reader._waiter = self  # type: ignore[assignment]

    def set_exception(self, exc: BaseException) -> None:
        """The connection failed or was silent past `sock_read`."""
        if not self._finished.done():
            self._finished.set_exception(exc)

    def forward(self, data: bytes, *, at_eof: bool) -> None:
        finished = self._finished
        if finished.done():
            return  # the follower has gone
        self._last_read = self._loop.time()
        try:
            if self._consume(data, at_eof) or at_eof:
                finished.set_result(None)
        except BaseException as exc:  # it goes to the awaiting task
            finished.set_exception(exc)


class _Forwarding(aiohttp.StreamReader):
    """The reader while it is followed: bytes go to the parked consumer."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        parked: object = self._waiter
        if not isinstance(parked, _Parked):
            return super().feed_data(data)
        self.total_bytes += len(data)
        parked.forward(data, at_eof=False)
        return False

    # The bytes are not kept, so there are no HTTP chunk boundaries to record
    # (for `readchunk`) nor a reader to wake at each: per read, that was 6 % of
    # the gateway's CPU on paced streams (py-spy, bench S3).
    def begin_http_chunk_receiving(self) -> None:
        pass

    def end_http_chunk_receiving(self) -> None:
        pass

    def feed_eof(self) -> None:
        parked: object = self._waiter
        self._waiter = None
        super().feed_eof()
        if isinstance(parked, _Parked):
            parked.forward(b"", at_eof=True)


async def follow_body(
    reader: aiohttp.StreamReader,
    consume: Consume,
    connection: aiohttp.connector.Connection | None = None,
    silence_s: float | None = None,
) -> None:
    """Feed the rest of `reader` to `consume` as it arrives; return when it is done.

    Raises what `consume` raises, or the reader's failure (aiohttp's
    `ServerTimeoutError`, `ClientPayloadError` …). Cancelling it unparks the
    consumer, so nothing is consumed after. With `connection` and
    `silence_s`, the connection's per-read `sock_read` timer is replaced by
    the parked consumer's (same bound, same error).
    """
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    protocol = connection.protocol if connection is not None else None
    watched = protocol is not None and silence_s is not None
    parked = _Parked(reader, consume, finished, silence_s if watched else None)
    # What is buffered already is read here, in the task: safe to drain.
    if reader.exception() is not None:
        raise reader.exception()  # type: ignore[misc]
    parked.forward(reader.read_nowait(-1), at_eof=reader.at_eof())
    if finished.done():
        return finished.result()
    reader.__class__ = _Forwarding
    reader._waiter = parked  # type: ignore[assignment]  # a future in all but type
    if watched:
        # Its timer armed at the last read still runs (the first gap's bound);
        # the next read cancels it and, with no timeout, arms none.
        protocol.read_timeout = None  # type: ignore[union-attr]
        parked.watch_silence()
    try:
        await finished
    finally:
        parked.stop_watching()
        if reader._waiter is parked:  # type: ignore[comparison-overlap]
            reader._waiter = None
        reader.__class__ = aiohttp.StreamReader
