"""Which generation answers a chat: what `useChat` reconnects to by chat id.

The AI SDK names a conversation by its chat id, not by our generation id:
`GET /v1/stream/ui/{chat_id}/stream` must find the chat's latest generation
of the same principal. With `streams.backend: redis` the entry is in Redis,
so the reconnect may land on any replica; otherwise it is in this process.

An entry also keeps the id of the assistant message the answer was written
into (`start.messageId`), so that a replay names the same message, and,
when the answer continues a message (a tool's output sent back), that
message's earlier parts: the SDK rebuilds the message from the replay.
Entries outlive their generation (a reconnect then gets a 204 from the
route), bounded in number here and by a TTL in Redis.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import orjson
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from gateway.shared_log_reader import StoreUnavailable

#: How long a chat remembers its latest generation. Long enough for any answer;
#: a finished one is not replayed anyway.
ENTRY_TTL_S = 6 * 3600
#: Entries kept in memory (least recently written go first): about 200 bytes each.
MAX_MEMORY_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class ChatEntry:
    generation_id: str
    message_id: str
    #: The continued message's earlier parts as chunks, for a replay (see ui_stream).
    earlier_parts: bytes = b""


class ChatIndex(Protocol):
    async def put(self, principal: str, chat_id: str, entry: ChatEntry) -> None: ...

    async def get(self, principal: str, chat_id: str) -> ChatEntry | None: ...


class MemoryChatIndex:
    def __init__(self, max_entries: int = MAX_MEMORY_ENTRIES, ttl_s: float = ENTRY_TTL_S) -> None:
        self._entries: OrderedDict[tuple[str, str], tuple[float, ChatEntry]] = OrderedDict()
        self._max = max_entries
        self._ttl_s = ttl_s

    async def put(self, principal: str, chat_id: str, entry: ChatEntry) -> None:
        key = (principal, chat_id)
        self._entries.pop(key, None)
        self._entries[key] = (time.monotonic() + self._ttl_s, entry)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def get(self, principal: str, chat_id: str) -> ChatEntry | None:
        found = self._entries.get((principal, chat_id))
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]


def redis_key(principal: str, chat_id: str) -> str:
    """Hashed: chat ids are the client's strings, and principals may hold a key id."""
    digest = hashlib.sha256(b"%d:%s:%s" % (len(principal), principal.encode(), chat_id.encode()))
    return "gw:chat:" + digest.hexdigest()


class RedisChatIndex:
    def __init__(self, redis: aioredis.Redis, ttl_s: int = ENTRY_TTL_S) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    async def put(self, principal: str, chat_id: str, entry: ChatEntry) -> None:
        value = orjson.dumps([entry.generation_id, entry.message_id, entry.earlier_parts.decode()])
        try:
            await self._redis.set(redis_key(principal, chat_id), value, ex=self._ttl_s)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(
                "cannot reach the shared store to register this chat; retry shortly"
            ) from exc

    async def get(self, principal: str, chat_id: str) -> ChatEntry | None:
        try:
            raw = await self._redis.get(redis_key(principal, chat_id))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(
                "cannot reach the shared store to find this chat's answer; retry shortly"
            ) from exc
        if raw is None:
            return None
        generation_id, message_id, earlier_parts = orjson.loads(raw)
        return ChatEntry(generation_id, message_id, earlier_parts.encode())
