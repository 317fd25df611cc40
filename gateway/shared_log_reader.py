"""The reader side of the shared log: following a generation another replica owns.

A lookup checks ownership against the generation's meta; a follower reads the
stream from its seq with `XREAD BLOCK` on the readers' pool, keeps a `watch`
entry alive (the owner's grace timer counts it as attached), and, when the
owner's lease is gone before the terminal event, ends the log for everyone
with a retryable error. The connections belong to `SharedLog`; the key names
are here, for both sides.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from gateway.errors import GatewayError, GenerationNotFound, UpstreamError
from gateway.events import Event
from gateway.generation_log import Push, StopCause

if TYPE_CHECKING:
    from gateway.shared_log import SharedLog

#: Where any replica asks a generation's owner to cancel it (pub/sub).
CANCEL_CHANNEL = "gw:cancel"
#: How long a lookup waits for a generation's meta to appear before answering 404.
LOOKUP_PATIENCE_S = 0.25
WATCH_MS = 6_000
READ_BLOCK_MS = 2_000
#: How often a lookup looks for the meta again while it waits.
_LOOKUP_POLL_S = 0.01


class StoreUnavailable(GatewayError):
    """Redis cannot be reached: resuming on this replica fails, retrying may work."""

    status = 503
    code = "internal_error"
    retryable = True


def stream_key(generation_id: str) -> str:
    return f"gw:gen:{generation_id}"


def entry_id(seq: int) -> str:
    return f"{seq + 1}-0"


def seq_of(entry: bytes) -> int:
    return int(entry.split(b"-", 1)[0]) - 1


class SharedLogReader:
    """Lookups, reads, watches and cancel requests for generations owned elsewhere."""

    def __init__(self, log: SharedLog) -> None:
        self._log = log
        #: Open follows of generations other replicas run (streams of this replica too).
        self.following = 0

    @property
    def replica_id(self) -> str:
        return self._log.replica_id

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._log.spawn(coro)

    def note_failure(self, what: str, exc: BaseException) -> None:
        self._log.note_failure(what, exc)

    async def lookup(self, generation_id: str, principal: str) -> RemoteGeneration:
        """A generation another replica runs (or ran); 404 unless `principal` owns it."""
        key = stream_key(generation_id)
        # The owner sends `start` before its flusher has written the meta (up to
        # FLUSH_S later, more under load): a client that resumes here at once
        # must not get a 404 for a generation that exists. Unknown ids wait too.
        deadline = time.monotonic() + LOOKUP_PATIENCE_S
        retried = False
        while True:
            try:
                async with self._log.control.pipeline(transaction=False) as pipe:
                    pipe.hgetall(f"{key}:meta")
                    pipe.xrevrange(key, count=1)
                    meta, last = await pipe.execute()
            except (RedisError, OSError) as exc:
                self._log.note_failure("lookup", exc)
                if not retried:  # a connection dropped under load: one more try
                    retried = True
                    continue
                raise StoreUnavailable(
                    "cannot reach the shared log to resume this generation; retry shortly"
                ) from None
            if meta or time.monotonic() >= deadline:
                break
            await asyncio.sleep(_LOOKUP_POLL_S)
        owner = meta.get(b"principal", b"").decode()
        if not meta or not secrets.compare_digest(owner, principal):
            raise GenerationNotFound(f"generation {generation_id[:64]!r} not found")
        terminal_seq = None
        if last:
            entry_id, fields = last[0]
            if Event.decoded(generation_id, fields[b"e"]).terminal:
                terminal_seq = seq_of(entry_id)
        return RemoteGeneration(
            self,
            generation_id,
            principal=owner,
            model=meta[b"model"].decode(),
            created=int(meta[b"created"]),
            terminal_seq=terminal_seq,
        )

    async def publish_cancel(self, generation_id: str) -> None:
        try:
            await self._log.control.publish(CANCEL_CHANNEL, generation_id)
        except (RedisError, OSError) as exc:
            self._log.note_failure("cancel", exc)
            raise StoreUnavailable("cannot reach the owner replica to cancel; retry") from None

    async def newest(self, generation_id: str) -> Event:
        """The log's last event, without following it (one XREVRANGE)."""
        try:
            # redis-py types a reply as any RESP value; XREVRANGE's is [(id, fields)].
            newest: Any = await self._log.control.xrevrange(stream_key(generation_id), count=1)
        except (RedisError, OSError) as exc:
            self._log.note_failure("newest event", exc)
            raise StoreUnavailable("cannot reach the shared log; retry shortly") from None
        if not newest:  # the owner wrote the meta but has not flushed `start` yet
            return Event.new(generation_id, "start", 0, {})
        return Event.decoded(generation_id, newest[0][1][b"e"])

    async def read(self, generation_id: str, after_seq: int) -> list[Event] | None:
        """Events after `after_seq`, waiting up to `READ_BLOCK_MS`; [] on a quiet spell."""
        key = stream_key(generation_id)
        try:
            # redis-py types a reply as any RESP value; XREAD's (RESP2) is
            # [[key, [(id, fields)…]]].
            reply: Any = await self._log.readers.xread(
                {key: entry_id(after_seq)}, count=512, block=READ_BLOCK_MS
            )
        except (RedisError, OSError) as exc:
            self._log.note_failure("read", exc)
            raise StoreUnavailable("lost the shared log while following it") from None
        if not reply:
            return []
        entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1]
        return [Event.decoded(generation_id, fields[b"e"]) for _, fields in entries]

    async def end_if_orphaned(self, generation_id: str, next_seq: int) -> None:
        """No owner lease and no terminal event: the owner died; end the log for everyone."""
        key = stream_key(generation_id)
        try:
            if await self._log.control.exists(f"{key}:owner"):
                return
            failure = UpstreamError("the replica running this generation stopped; retry")
            event = Event.new(generation_id, "error", next_seq, failure.event_fields())
            retention_ms = int(self._log.settings.retention_s * 1000) or 1
            async with self._log.control.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {"e": event.json}, id=entry_id(next_seq))
                pipe.pexpire(key, retention_ms)
                pipe.pexpire(f"{key}:meta", retention_ms)
                pipe.delete(f"{key}:watch")
                await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._log.note_failure("orphan check", exc)

    async def watch(self, generation_id: str, member: str) -> None:
        key = f"{stream_key(generation_id)}:watch"
        async with self._log.control.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {member: int(time.time() * 1000) + WATCH_MS})
            pipe.pexpire(key, self._log.live_ttl_ms)
            await pipe.execute()

    async def unwatch(self, generation_id: str, member: str) -> None:
        await self._log.control.zrem(f"{stream_key(generation_id)}:watch", member)


class RemoteGeneration:
    """A generation run by another replica, read through its shared log."""

    remote = True

    def __init__(
        self,
        log: SharedLogReader,
        generation_id: str,
        *,
        principal: str,
        model: str,
        created: int,
        terminal_seq: int | None,
    ) -> None:
        self._log = log
        self.id = generation_id
        self.principal = principal
        self.model = model
        self.created = created
        self.terminal_seq = terminal_seq
        self.stop_cause: StopCause | None = None
        #: Known to the replica that runs it, not to its readers here.
        self.tool_calls: list[str] = []
        self.reasoning_events = 0

    def subscribe(self, after_seq: int = -1) -> RemoteSubscription:
        return RemoteSubscription(self._log, self, after_seq)

    async def request_cancel(self) -> None:
        await self._log.publish_cancel(self.id)


class RemoteSubscription:
    """Follows a shared log; while open, counts as attached for the owner's grace timer."""

    def __init__(self, log: SharedLogReader, generation: RemoteGeneration, after_seq: int) -> None:
        self._log = log
        self._generation = generation
        self._last = after_seq
        self._done = False
        self._member = f"{log.replica_id}:{secrets.token_hex(4)}"
        self._heartbeat: asyncio.Task[None] | None = None

    def __enter__(self) -> RemoteSubscription:
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        self._log.following += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
            self._log.following -= 1
            self._log.spawn(self._leave())

    async def _beat(self) -> None:
        while True:
            try:
                await self._log.watch(self._generation.id, self._member)
            except (RedisError, OSError) as exc:
                self._log.note_failure("watch", exc)
            await asyncio.sleep(WATCH_MS / 3000)

    async def _leave(self) -> None:
        try:
            await self._log.unwatch(self._generation.id, self._member)
        except (RedisError, OSError) as exc:
            self._log.note_failure("unwatch", exc)

    def push_tokens(self, push: Push | None) -> None:
        """Ignored: a shared log is read in batches from Redis, never pushed from a task here."""

    async def next_batch(self) -> list[Event] | None:
        """The next events, or None after the terminal one."""
        if self._done:
            return None
        while True:
            try:
                batch = await self._log.read(self._generation.id, self._last)
            except StoreUnavailable as exc:
                # The client's headers are out: the failure is the stream's last event.
                self._done = True
                return [Event.new(self._generation.id, "error", self._last + 1, exc.event_fields())]
            if batch:
                self._last = batch[-1].seq
                if batch[-1].terminal:
                    self._done = True
                    self._generation.terminal_seq = batch[-1].seq
                return batch
            await self._log.end_if_orphaned(self._generation.id, self._last + 1)
