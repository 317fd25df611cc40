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

    __slots__ = ("_consume", "_finished", "_reader")

    def __init__(
        self, reader: aiohttp.StreamReader, consume: Consume, finished: asyncio.Future[None]
    ) -> None:
        self._reader = reader
        self._consume = consume
        self._finished = finished

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


async def follow_body(reader: aiohttp.StreamReader, consume: Consume) -> None:
    """Feed the rest of `reader` to `consume` as it arrives; return when it is done.

    Raises what `consume` raises, or the reader's failure (aiohttp's
    `ServerTimeoutError`, `ClientPayloadError` …). Cancelling it unparks the
    consumer, so nothing is consumed after.
    """
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    parked = _Parked(reader, consume, finished)
    # What is buffered already is read here, in the task: safe to drain.
    if reader.exception() is not None:
        raise reader.exception()  # type: ignore[misc]
    parked.forward(reader.read_nowait(-1), at_eof=reader.at_eof())
    if finished.done():
        return finished.result()
    reader.__class__ = _Forwarding
    reader._waiter = parked  # type: ignore[assignment]  # a future in all but type
    try:
        await finished
    finally:
        if reader._waiter is parked:  # type: ignore[comparison-overlap]
            reader._waiter = None
        reader.__class__ = aiohttp.StreamReader
