"""Generation logs shared through Redis Streams (`streams.backend: redis`).

The replica that runs a generation (its owner) keeps serving its own
subscribers from memory, so the live path never waits on Redis; a flusher
copies new events to the stream `gw:gen:<id>` in pipelined batches every
`FLUSH_S` and at once for a terminal event. Entry ids are `<seq+1>-0`, so a
retried flush is idempotent and a reader resumes from a seq with plain
`XREAD`. Another replica asked for that generation (a resume after the load
balancer moved the client) reads the stream from the requested seq and
follows it with `XREAD BLOCK`.

Around the log:
- `gw:gen:<id>:meta` (hash): principal, model, created — for ownership checks;
- `gw:gen:<id>:owner`: a lease the owner refreshes; if it expires before the
  terminal event (the replica died), the first reader to notice ends the log
  with a retryable `upstream_error`, so nobody waits forever;
- `gw:gen:<id>:watch` (sorted set): remote readers with an expiry score; the
  owner's grace timer counts them as attached;
- `gw:cancel` (pub/sub): a `DELETE` or WebSocket `cancel` on any replica
  reaches the owner, which stops the upstream.
Finished logs expire after `streams.retention_s`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.config import StreamSettings
from gateway.errors import GatewayError, GenerationNotFound, UpstreamError
from gateway.events import Event
from gateway.generation import Generation, StopCause

log = logging.getLogger(__name__)

FLUSH_S = 0.02
#: How long a lookup waits for a generation's meta to appear before answering 404.
LOOKUP_PATIENCE_S = 0.25
WATCH_MS = 6_000
READ_BLOCK_MS = 2_000
CANCEL_CHANNEL = "gw:cancel"
#: Connections for flushes, leases, lookups and watchers (the pubsub listener has its own).
CONTROL_CONNECTIONS = 32
#: Connections for followers' blocking reads; more followers wait their turn.
READ_CONNECTIONS = 128
_MAX_PENDING_EVENTS = 100_000
_LOG_EVERY_S = 30.0


class StoreUnavailable(GatewayError):
    """Redis cannot be reached: resuming on this replica fails, retrying may work."""

    status = 503
    code = "internal_error"
    retryable = True


def _stream(generation_id: str) -> str:
    return f"gw:gen:{generation_id}"


def _entry_id(seq: int) -> str:
    return f"{seq + 1}-0"


def _seq_of(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0]) - 1


class _ScriptReloaded(Exception):
    """The script cache was empty (Redis restarted); the flush is retried."""


class SharedLog:
    """The owner side (flushing, leases, cancels) and the reader side (lookups)."""

    def __init__(self, url: str, settings: StreamSettings) -> None:
        self._settings = settings
        # Two bounded pools, so that followers can never starve the owner side.
        # Every follower holds a connection in `XREAD BLOCK` for up to
        # READ_BLOCK_MS; on redis-py's default pool ~100 of them made flushes and
        # lease refreshes fail (it raises when exhausted), the leases expired and
        # followers ended generations that were still running. Flushes, leases,
        # lookups and cancels get a small pool of their own; reads wait for a
        # free connection of theirs instead of failing (a streaming generation's
        # reads return at once, so they turn over fast).
        # A refused connect fails at once; the connect timeout only bounds a
        # blackholed host, and must not trip while a busy loop opens connections.
        timeouts = {"socket_timeout": READ_BLOCK_MS / 1000 + 1, "socket_connect_timeout": 5}
        self._redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=CONTROL_CONNECTIONS, timeout=5, **timeouts
            )
        )
        self._readers = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=READ_CONNECTIONS, timeout=None, **timeouts
            )
        )
        self.replica_id = secrets.token_hex(6)
        self._lease_ms = int(settings.shared_log_lease_s * 1000)
        #: Every key of a running generation lives this long unless its lease is
        #: refreshed, so a crashed owner leaves nothing behind for good.
        self._live_ttl_ms = 3 * self._lease_ms
        #: Generations ended because their events could not be queued (Redis down too long).
        self._overflowed: set[str] = set()
        self._owned: dict[str, Generation] = {}
        self._pending: dict[str, list[Event]] = {}
        self._pending_count = 0
        self._new: list[Generation] = []
        self._urgent = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._logged_at = -_LOG_EVERY_S
        self.errors = 0
        #: Open follows of generations other replicas run (streams of this replica too).
        self.following = 0
        self._append = self._redis.register_script(
            (Path(__file__).with_name("lua") / "append_events.lua").read_text()
        )

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._flush_forever(), name="shared log flusher"),
            loop.create_task(self._refresh_leases_forever(), name="shared log leases"),
            loop.create_task(self._listen_for_cancels(), name="shared log cancels"),
        ]

    async def aclose(self) -> None:
        """Flush what is pending (terminal events of a drain), then stop."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(2):
                await self._flush()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed("final flush", exc)
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._redis.aclose()
        await self._readers.aclose()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "redis unavailable for shared logs; local streams go on",
                extra={"during": what, "error": str(exc), "errors_so_far": self.errors},
            )

    # -- owner side -----------------------------------------------------------

    def own(self, generation: Generation) -> None:
        """Before `generation.start()`: mirror every event it appends."""
        self._owned[generation.id] = generation
        self._new.append(generation)
        self._urgent.set()  # its meta, at once: other replicas may be asked for it soon
        generation.on_append = self._queue
        generation.remote_watchers = self.has_remote_watchers

    def _queue(self, generation: Generation, event: Event) -> None:
        """Queue an event for Redis. The terminal event always is, so the log ends;
        a full queue ends the generation with an error rather than leave a gap."""
        if self._pending_count >= _MAX_PENDING_EVENTS and not event.terminal:
            if generation.id not in self._overflowed:
                self._overflowed.add(generation.id)
                generation.cancel(
                    "cancelled",
                    StoreUnavailable(
                        "the shared log could not keep up (Redis unreachable); retry",
                        retryable=True,
                    ),
                )
            return
        self._pending.setdefault(generation.id, []).append(event)
        self._pending_count += 1
        if event.terminal:
            self._owned.pop(generation.id, None)
            self._overflowed.discard(generation.id)
            self._urgent.set()

    async def _flush_forever(self) -> None:
        while True:
            try:
                async with asyncio.timeout(FLUSH_S):
                    await self._urgent.wait()
            except TimeoutError:
                pass
            self._urgent.clear()
            try:
                await self._flush()
            except _ScriptReloaded:
                self._urgent.set()  # Redis restarted: the events are queued again
            except (RedisError, OSError) as exc:
                self._failed("flush", exc)
                await asyncio.sleep(0.5)

    async def _flush(self) -> None:
        if not self._pending and not self._new:
            return
        pending, self._pending, self._pending_count = self._pending, {}, 0
        new, self._new = self._new, []
        retention_ms = int(self._settings.retention_s * 1000) or 1
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for generation in new:
                    meta = f"{_stream(generation.id)}:meta"
                    pipe.hset(
                        meta,
                        mapping={
                            "principal": generation.principal,
                            "model": generation.model,
                            "created": generation.created,
                        },
                    )
                    pipe.pexpire(meta, self._live_ttl_ms)
                    pipe.set(f"{_stream(generation.id)}:owner", self.replica_id, px=self._lease_ms)
                # All events in one script call: a command per event cost ~15 µs
                # of client CPU each, a third of a core at 25,000 tokens/s.
                keys: list[str] = []
                args: list[str | bytes] = []
                for generation_id, events in pending.items():
                    key = _stream(generation_id)
                    for event in events:
                        keys.append(key)
                        args += (_entry_id(event.seq), event.json)
                script_at = len(pipe.command_stack)
                if keys:
                    # EVALSHA in the pipeline, not the Script object: redis-py
                    # sends SCRIPT EXISTS before every pipeline that holds a
                    # Script (a fifth of the flush's CPU under py-spy).
                    pipe.evalsha(self._append.sha, len(keys), *keys, *args, str(self._live_ttl_ms))
                for generation_id, events in pending.items():
                    key = _stream(generation_id)
                    if events[-1].terminal:
                        for name in (key, f"{key}:meta"):
                            pipe.pexpire(name, retention_ms)
                        pipe.delete(f"{key}:owner", f"{key}:watch")
                results = await pipe.execute(raise_on_error=False)
                if keys and isinstance(results[script_at], NoScriptError):
                    await self._redis.script_load(self._append.script)
                    raise _ScriptReloaded
        except BaseException:
            # Put everything back, in order, before whatever came since.
            for generation_id, events in pending.items():
                events.extend(self._pending.get(generation_id, []))
                self._pending[generation_id] = events
            self._pending_count = sum(len(e) for e in self._pending.values())
            self._new = new + self._new
            raise
        for result in results:
            # An entry that exists already (a retried flush) is fine; anything else is not.
            if isinstance(result, ResponseError) and "equal or smaller" not in str(result):
                self._failed("flush", result)

    async def _refresh_leases_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            owned = list(self._owned)
            if not owned:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for generation_id in owned:
                        key = _stream(generation_id)
                        pipe.set(f"{key}:owner", self.replica_id, px=self._lease_ms)
                        for name in (key, f"{key}:meta", f"{key}:watch"):
                            pipe.pexpire(name, self._live_ttl_ms)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                self._failed("lease refresh", exc)

    async def _listen_for_cancels(self) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    async for message in pubsub.listen():
                        generation = self._owned.get(message["data"].decode())
                        if generation is not None:
                            generation.cancel("cancelled")
                finally:
                    await pubsub.aclose()
            except (RedisError, OSError) as exc:
                self._failed("cancel listener", exc)
                await asyncio.sleep(1)

    async def has_remote_watchers(self, generation_id: str) -> bool:
        """Whether a reader on another replica is attached (Redis down: assume not)."""
        try:
            watchers = await self._redis.zcount(
                f"{_stream(generation_id)}:watch", int(time.time() * 1000), "+inf"
            )
        except (RedisError, OSError) as exc:
            self._failed("watchers", exc)
            return False
        return bool(watchers)

    # -- reader side ------------------------------------------------------------

    async def lookup(self, generation_id: str, principal: str) -> RemoteGeneration:
        """A generation another replica runs (or ran); 404 unless `principal` owns it."""
        key = _stream(generation_id)
        # The owner sends `start` before its flusher has written the meta (up to
        # FLUSH_S later, more under load): a client that resumes here at once
        # must not get a 404 for a generation that exists. Unknown ids wait too.
        deadline = time.monotonic() + LOOKUP_PATIENCE_S
        retried = False
        while True:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hgetall(f"{key}:meta")
                    pipe.xrevrange(key, count=1)
                    meta, last = await pipe.execute()
            except (RedisError, OSError) as exc:
                self._failed("lookup", exc)
                if not retried:  # a connection dropped under load: one more try
                    retried = True
                    continue
                raise StoreUnavailable(
                    "cannot reach the shared log to resume this generation; retry shortly"
                ) from None
            if meta or time.monotonic() >= deadline:
                break
            await asyncio.sleep(FLUSH_S / 2)
        owner = meta.get(b"principal", b"").decode()
        if not meta or not secrets.compare_digest(owner, principal):
            raise GenerationNotFound(f"generation {generation_id[:64]!r} not found")
        terminal_seq = None
        if last:
            entry_id, fields = last[0]
            if Event.decoded(generation_id, fields[b"e"]).terminal:
                terminal_seq = _seq_of(entry_id)
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
            await self._redis.publish(CANCEL_CHANNEL, generation_id)
        except (RedisError, OSError) as exc:
            self._failed("cancel", exc)
            raise StoreUnavailable("cannot reach the owner replica to cancel; retry") from None

    async def read(self, generation_id: str, after_seq: int) -> list[Event] | None:
        """Events after `after_seq`, waiting up to `READ_BLOCK_MS`; [] on a quiet spell."""
        key = _stream(generation_id)
        try:
            reply = await self._readers.xread(
                {key: _entry_id(after_seq)}, count=512, block=READ_BLOCK_MS
            )
        except (RedisError, OSError) as exc:
            self._failed("read", exc)
            raise StoreUnavailable("lost the shared log while following it") from None
        if not reply:
            return []
        return [Event.decoded(generation_id, fields[b"e"]) for _, fields in reply[0][1]]

    async def end_if_orphaned(self, generation_id: str, next_seq: int) -> None:
        """No owner lease and no terminal event: the owner died; end the log for everyone."""
        key = _stream(generation_id)
        try:
            if await self._redis.exists(f"{key}:owner"):
                return
            failure = UpstreamError("the replica running this generation stopped; retry")
            event = Event(generation_id, "error", next_seq, failure.event_fields())
            retention_ms = int(self._settings.retention_s * 1000) or 1
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {"e": event.json}, id=_entry_id(next_seq))
                pipe.pexpire(key, retention_ms)
                pipe.pexpire(f"{key}:meta", retention_ms)
                pipe.delete(f"{key}:watch")
                await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._failed("orphan check", exc)

    async def watch(self, generation_id: str, member: str) -> None:
        key = f"{_stream(generation_id)}:watch"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {member: int(time.time() * 1000) + WATCH_MS})
            pipe.pexpire(key, self._live_ttl_ms)
            await pipe.execute()

    async def unwatch(self, generation_id: str, member: str) -> None:
        await self._redis.zrem(f"{_stream(generation_id)}:watch", member)


class RemoteGeneration:
    """A generation run by another replica, read through its shared log."""

    def __init__(
        self,
        log: SharedLog,
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

    def subscribe(self, after_seq: int = -1) -> RemoteSubscription:
        return RemoteSubscription(self._log, self, after_seq)

    async def request_cancel(self) -> None:
        await self._log.publish_cancel(self.id)


class RemoteSubscription:
    """Follows a shared log; while open, counts as attached for the owner's grace timer."""

    def __init__(self, log: SharedLog, generation: RemoteGeneration, after_seq: int) -> None:
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
                self._log._failed("watch", exc)
            await asyncio.sleep(WATCH_MS / 3000)

    async def _leave(self) -> None:
        try:
            await self._log.unwatch(self._generation.id, self._member)
        except (RedisError, OSError) as exc:
            self._log._failed("unwatch", exc)

    def push_tokens(self, push: object) -> None:
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
                return [Event(self._generation.id, "error", self._last + 1, exc.event_fields())]
            if batch:
                self._last = batch[-1].seq
                if batch[-1].terminal:
                    self._done = True
                    self._generation.terminal_seq = batch[-1].seq
                return batch
            await self._log.end_if_orphaned(self._generation.id, self._last + 1)
