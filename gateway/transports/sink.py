"""Writing to one client: heartbeats while idle, and a cut-off for stalled readers.

A client that stops reading never makes `write()` fail: aiohttp only waits
for the socket to drain once 64 KiB are queued, and then waits forever
(checked with aiohttp 3.14: a stalled reader blocks the writer for good).
One watchdog per connection therefore tracks the write in flight and
aborts the transport when it has been pending for `write_timeout_s`; the
same watchdog sends a heartbeat after `heartbeat_s` without output, so
proxies keep the stream open while the model thinks. One timer per
connection, rather than one per token, keeps the hot path free. It is a
timer callback, not a task: a task (its steps, its sleeps' futures, its
cancellation and the wait for it) cost ~3 % of a stream start's CPU (py-spy,
bench `starts`); a task runs only for a heartbeat's awaited write.

The kernel holds the same line for a peer that is gone without a word: the
listening socket's `TCP_USER_TIMEOUT` (`gateway/server.py`,
`drop_silent_peers`) is `write_timeout_s` too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

Writer = Callable[[bytes], Awaitable[None]]

#: Queued bytes above which `write_now` refuses and the awaited write (its
#: drain, and the stall watchdog) takes over; aiohttp's own drain threshold.
PUSH_BUFFER_LIMIT = 64 * 1024


class ClientGone(Exception):
    """The client closed the connection or was cut off for not reading."""


class ClientSink:
    """Serialised output to one connection, with heartbeat and stall watchdog."""

    def __init__(
        self,
        request: web.BaseRequest,
        write: Writer,
        *,
        write_timeout_s: float,
        heartbeat: bytes | None = None,
        heartbeat_s: float | None = None,
        end: Writer | None = None,
    ) -> None:
        """`end`, if given, writes the last bytes and ends the body in one send."""
        self._request = request
        #: Kept: `request.transport` is a property lookup, and `write_now` runs per token.
        #: After the connection is lost it reports `is_closing()`.
        self._transport = request.transport
        self._write = write
        self._end = end
        self._write_timeout_s = write_timeout_s
        self._heartbeat = heartbeat
        self._heartbeat_s = heartbeat_s
        self._loop = asyncio.get_running_loop()
        self._last_output = self._loop.time()
        self._pending_since: float | None = None
        self._inflight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._beat: asyncio.Task[None] | None = None
        self._stopped = False
        self.stalled = False

    async def __aenter__(self) -> ClientSink:
        self._check()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        beat = self.stop()
        if beat is not None:
            # `wait` (not `await task`) so our own cancellation is never swallowed.
            await asyncio.wait([beat])

    def stop(self) -> asyncio.Task[None] | None:
        """Stop the watchdog now, synchronously, so no await can skip it; returns
        the heartbeat write in progress, if any, to be waited for."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._beat is not None and not self._beat.done():
            self._beat.cancel()
            return self._beat
        return None

    async def write(self, data: bytes, *, last: bool = False) -> None:
        """Write or raise `ClientGone`; a stalled write is aborted by the watchdog.

        `last`: nothing follows, so the body's end goes in the same send (one
        system call a stream fewer) and no heartbeat is written after it.
        """
        self._inflight += 1
        if self._pending_since is None:
            self._pending_since = self._loop.time()
        if last and self._end is not None:
            write, self._heartbeat = self._end, None
        else:
            write = self._write
        try:
            await write(data)
        except ConnectionError as exc:
            raise ClientGone(str(exc)) from exc
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._pending_since = None
        self._last_output = self._loop.time()

    def write_now(self, data: bytes) -> bool:
        """Queue `data` on the socket without awaiting, if the client keeps up; else False.

        For bytes already framed for the wire, written from outside the
        handler's task (a pushed token): nothing may be in flight, so the
        order of writes is kept, and little may be queued, so a client that
        stops reading still meets the watchdog on the awaited path.
        """
        transport = self._transport
        if (
            self._inflight
            or transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() > PUSH_BUFFER_LIMIT
        ):
            return False
        transport.write(data)
        self._last_output = self._loop.time()
        return True

    def _check(self) -> None:
        """The watchdog: cut off a write pending too long, send a due heartbeat,
        and arm the timer for the next thing to look at."""
        self._timer = None
        if self._stopped:
            return
        now = self._loop.time()
        if self._pending_since is not None:
            deadline = self._pending_since + self._write_timeout_s
            if now >= deadline:
                self._cut_off()
                return
            self._at(deadline)
            return
        if self._heartbeat is None or self._heartbeat_s is None:
            self._at(now + self._write_timeout_s)
            return
        due = self._last_output + self._heartbeat_s
        if now < due:
            self._at(min(due, now + self._write_timeout_s))
            return
        self._beat = self._loop.create_task(self._send_heartbeat(self._heartbeat))

    def _at(self, when: float) -> None:
        self._timer = self._loop.call_at(when, self._check)

    async def _send_heartbeat(self, heartbeat: bytes) -> None:
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await self.write(heartbeat)
        except TimeoutError:
            self._cut_off()
            return
        except ClientGone:
            return
        self._check()

    def _cut_off(self) -> None:
        """Abort: a graceful close would wait on the same full buffer."""
        self.stalled = True
        transport = self._request.transport
        if transport is not None:
            transport.abort()
