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
from gateway.events import Event
from gateway.generation import Generation
from gateway.shared_log_reader import (
    CANCEL_CHANNEL,
    READ_BLOCK_MS,
    SharedLogReader,
    StoreUnavailable,
    entry_id,
    stream_key,
)

log = logging.getLogger(__name__)

FLUSH_S = 0.02
#: Connections for flushes, leases, lookups and watchers (the pubsub listener has its own).
CONTROL_CONNECTIONS = 32
#: Connections for followers' blocking reads; more followers wait their turn.
READ_CONNECTIONS = 128
_MAX_PENDING_EVENTS = 100_000
#: How long closing waits for a background task to stop, twice at most.
_STOP_WAIT_S = 1.0
_LOG_EVERY_S = 30.0


class _ScriptReloaded(Exception):
    """The script cache was empty (Redis restarted); the flush is retried."""


class SharedLog:
    """The Redis connections, and the owner side: flushing, leases, cancels.

    The reader side (`shared_log_reader.SharedLogReader`, as `reader`) follows
    generations other replicas own over the same connections.
    """

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
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()
        self._logged_at = -_LOG_EVERY_S
        self.errors = 0
        self._append = self._redis.register_script(
            (Path(__file__).with_name("lua") / "append_events.lua").read_text()
        )
        self.reader = SharedLogReader(self)

    @property
    def control(self) -> aioredis.Redis:
        """The pool for short commands (flushes, leases, lookups, watchers, cancels)."""
        return self._redis

    @property
    def readers(self) -> aioredis.Redis:
        """The pool for followers' blocking reads."""
        return self._readers

    @property
    def settings(self) -> StreamSettings:
        return self._settings

    @property
    def live_ttl_ms(self) -> int:
        """How long a running generation's keys live without a lease refresh."""
        return self._live_ttl_ms

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._flush_forever(), name="shared log flusher"),
            loop.create_task(self._refresh_leases_forever(), name="shared log leases"),
            loop.create_task(self._listen_for_cancels(), name="shared log cancels"),
        ]

    async def aclose(self) -> None:
        """Flush what is pending (terminal events of a drain), then stop.

        Never waits on a task for long: redis-py's pub/sub reader can swallow a
        cancellation (seen when the app stopped while the listener was still
        subscribing), so the listener also stops on `_closing`, and closing the
        pools (in-use connections included) breaks any read still pending.
        """
        self._closing = True
        for task in self._tasks:
            task.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=_STOP_WAIT_S)
        try:
            async with asyncio.timeout(2):
                await self._flush()
        except (TimeoutError, RedisError, OSError) as exc:
            self.note_failure("final flush", exc)
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()
        await self._readers.aclose()
        await self._readers.connection_pool.disconnect()
        if stuck:
            _, stuck = await asyncio.wait(stuck, timeout=_STOP_WAIT_S)
            for task in stuck:
                log.warning("shared log task did not stop", extra={"task": task.get_name()})

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def note_failure(self, what: str, exc: BaseException) -> None:
        """Count a Redis failure; log it at most every `_LOG_EVERY_S`."""
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
        """Before `generation.start()` (created with this log as its mirror)."""
        self._owned[generation.id] = generation
        self._new.append(generation)
        self._urgent.set()  # its meta, at once: other replicas may be asked for it soon

    def append(self, generation_id: str, event: Event) -> None:
        """Queue an event for Redis. The terminal event always is, so the log ends;
        a full queue ends the generation with an error rather than leave a gap."""
        if self._pending_count >= _MAX_PENDING_EVENTS and not event.terminal:
            generation = self._owned.get(generation_id)
            if generation is not None and generation_id not in self._overflowed:
                self._overflowed.add(generation_id)
                generation.cancel(
                    "cancelled",
                    StoreUnavailable(
                        "the shared log could not keep up (Redis unreachable); retry",
                        retryable=True,
                    ),
                )
            return
        self._pending.setdefault(generation_id, []).append(event)
        self._pending_count += 1
        if event.terminal:
            self._owned.pop(generation_id, None)
            self._overflowed.discard(generation_id)
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
                self.note_failure("flush", exc)
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
                    meta = f"{stream_key(generation.id)}:meta"
                    pipe.hset(
                        meta,
                        mapping={
                            "principal": generation.principal,
                            "model": generation.model,
                            "created": generation.created,
                        },
                    )
                    pipe.pexpire(meta, self._live_ttl_ms)
                    pipe.set(
                        f"{stream_key(generation.id)}:owner", self.replica_id, px=self._lease_ms
                    )
                # All events in one script call: a command per event cost ~15 µs
                # of client CPU each, a third of a core at 25,000 tokens/s.
                keys: list[str] = []
                args: list[str | bytes] = []
                for generation_id, events in pending.items():
                    key = stream_key(generation_id)
                    for event in events:
                        keys.append(key)
                        args += (entry_id(event.seq), event.json)
                script_at = len(pipe.command_stack)
                if keys:
                    # EVALSHA in the pipeline, not the Script object: redis-py
                    # sends SCRIPT EXISTS before every pipeline that holds a
                    # Script (a fifth of the flush's CPU under py-spy).
                    pipe.evalsha(self._append.sha, len(keys), *keys, *args, str(self._live_ttl_ms))
                for generation_id, events in pending.items():
                    key = stream_key(generation_id)
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
                self.note_failure("flush", result)

    async def _refresh_leases_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            owned = list(self._owned)
            if not owned:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for generation_id in owned:
                        key = stream_key(generation_id)
                        pipe.set(f"{key}:owner", self.replica_id, px=self._lease_ms)
                        for name in (key, f"{key}:meta", f"{key}:watch"):
                            pipe.pexpire(name, self._live_ttl_ms)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                self.note_failure("lease refresh", exc)

    async def _listen_for_cancels(self) -> None:
        while not self._closing:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    async for message in pubsub.listen():
                        generation = self._owned.get(message["data"].decode())
                        if generation is not None:
                            generation.cancel("cancelled")
                finally:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            except (RedisError, OSError) as exc:
                self.note_failure("cancel listener", exc)
                await asyncio.sleep(1)

    async def has_remote_watchers(self, generation_id: str) -> bool:
        """Whether a reader on another replica is attached (Redis down: assume not)."""
        try:
            watchers = await self._redis.zcount(
                f"{stream_key(generation_id)}:watch", int(time.time() * 1000), "+inf"
            )
        except (RedisError, OSError) as exc:
            self.note_failure("watchers", exc)
            return False
        return bool(watchers)
