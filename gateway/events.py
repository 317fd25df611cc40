"""Events of a generation log, encoded once per wire format.

An event's JSON body (`{"type":…,"seq":…,…fields}`) is serialised once when
it is appended; each transport then derives its framing from that body and
caches it on the event, so a thousand subscribers of one generation cost one
encoding per format, not a thousand.
"""

from __future__ import annotations

from collections.abc import Callable
from json.encoder import encode_basestring as _encode_basestring  # C version on CPython
from typing import Any, Literal

import msgspec
import orjson

EventType = Literal["start", "token", "reasoning", "tool_call", "done", "error"]
TERMINAL_TYPES: frozenset[str] = frozenset({"done", "error"})
#: The answer's pieces, between `start` and the terminal event.
DELTA_TYPES: frozenset[str] = frozenset({"token", "reasoning", "tool_call"})


def scrub_surrogates(text: str) -> str:
    """Replace lone UTF-16 surrogates (not encodable as UTF-8) by U+FFFD.

    Paired surrogates are joined into the character they encode.
    """
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def dumps_compact(value: Any) -> bytes:
    """`orjson.dumps`, copied into a right-sized object.

    orjson 3.13 returns bytes that keep a 4 KiB allocation however short the
    JSON (tracemalloc: 4,098 B for a 60-byte token event). An event log holds
    thousands of them, so the copy (about 0.1 µs) saves ~4 KiB per event.
    """
    return bytes(memoryview(orjson.dumps(value)))


def json_string(text: str) -> bytes:
    """`text` as a JSON string, for the per-token path.

    The standard library's C encoder returns a right-sized object; orjson's
    4 KiB buffer per call showed up as 13% of the gateway's CPU under load
    (py-spy, 200 proxied streams), though it costs only 0.3 µs in a loop.
    Raises `UnicodeEncodeError` on lone surrogates (callers scrub).
    """
    return _encode_basestring(text).encode()


def _token_json(seq: int, text: str) -> bytes:
    return b'{"type":"token","seq":%d,"text":%s}' % (seq, json_string(text))


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_surrogates(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    return value


#: What an event costs in memory beyond its JSON body (the object, the bytes
#: header and the log's slot: 141 bytes by tracemalloc over 20,000 token
#: events, with a margin), so that `streams.retention_max_bytes` bounds real
#: memory rather than wire bytes.
EVENT_OVERHEAD_BYTES = 155


class Event(msgspec.Struct, gc=False, eq=False):
    """One entry of a generation's log.

    Kept lean, because finished logs are retained for late resumes: a token
    event holds only its JSON body (its text is read back from it when
    asked), and caches one wire encoding, dropped when the log is finished.

    Invisible to the cyclic GC (a msgspec `Struct` with `gc=False`): a
    replica's logs hold hundreds of thousands of events, and as tracked
    objects they were most of what every young-generation collection walked
    (pauses of 30-60 ms at a few hundred streams, every stream stalled at
    once). An event refers to strings, bytes and JSON data only, so it can
    never be part of a cycle. Build one with `Event.new`, `Event.token` or
    `Event.decoded`.
    """

    generation_id: str
    type: EventType
    seq: int
    json: bytes
    _fields: dict[str, Any] | None = None
    _wire: str | None = None
    _encoded: bytes | None = None

    @classmethod
    def new(cls, generation_id: str, type: EventType, seq: int, fields: dict[str, Any]) -> Event:
        """An event of any type, its JSON body serialised once, here."""
        if type == "token" and len(fields) == 1 and "text" in fields:
            return cls.token(generation_id, seq, fields["text"])
        try:
            json = dumps_compact({"type": type, "seq": seq, **fields})
        except orjson.JSONEncodeError:  # lone surrogates
            fields = _scrub(fields)
            json = dumps_compact({"type": type, "seq": seq, **fields})
        return cls(generation_id, type, seq, json, fields)

    @classmethod
    def token(cls, generation_id: str, seq: int, text: str) -> Event:
        """A token event, built without a fields dict (the per-token path)."""
        try:
            return cls(generation_id, "token", seq, _token_json(seq, text))
        except UnicodeEncodeError:
            stored = {"text": scrub_surrogates(text)}
            return cls(generation_id, "token", seq, _token_json(seq, stored["text"]), stored)

    @classmethod
    def decoded(cls, generation_id: str, raw: bytes) -> Event:
        """An event read back from a shared log: its JSON body is kept as is."""
        data = orjson.loads(raw)
        return cls(generation_id, data.pop("type"), data.pop("seq"), raw, data)

    @property
    def fields(self) -> dict[str, Any]:
        if self._fields is not None:
            return self._fields
        data: dict[str, Any] = orjson.loads(self.json)  # an event's body is a JSON object
        del data["type"], data["seq"]
        return data

    @property
    def text(self) -> str:
        """A token's text, without building its fields dict."""
        text: str = (  # a token's `text` is a JSON string
            self._fields["text"] if self._fields is not None else orjson.loads(self.text_json)
        )
        return text

    @property
    def text_json(self) -> bytes:
        """A token's text as the JSON string inside `json` (no re-encoding)."""
        if self._fields is not None:
            return json_string(self._fields["text"])
        return self.json[self.json.index(b',"text":') + 8 : -1]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @property
    def event_id(self) -> str:
        """The resumable id, `<generation_id>:<seq>` (SSE `id:` field)."""
        return f"{self.generation_id}:{self.seq}"

    def encoded(self, wire_format: str, encode: Callable[[Event], bytes]) -> bytes:
        """`encode(self)`, computed once while subscribers share one wire format.

        One slot, not a dict per format: mixed formats on one generation are
        rare and re-encoding costs about a microsecond.
        """
        if self._wire == wire_format:
            return self._encoded  # type: ignore[return-value]
        data = encode(self)
        self._wire, self._encoded = wire_format, data
        return data

    def forget_encoding(self) -> None:
        """Free the cached wire encoding (the log is finished; resumes re-encode)."""
        self._wire = self._encoded = None

    def __repr__(self) -> str:
        return f"Event({self.event_id}, {self.type})"
