"""A spec-correct Server-Sent Events parser (WHATWG HTML §9.2.6), for tests.

Independent of our encoder on purpose: it is how a browser reads the stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


@dataclass
class SseParser:
    """Feed bytes in any chunking; collect dispatched events and comments."""

    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    last_event_id: str = ""
    retry: int | None = None
    _buffer: str = ""
    _pending: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _saw_cr: bool = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        start = len(self.events)
        raw = self._pending + chunk
        # Keep an incomplete UTF-8 sequence for the next chunk.
        cut = len(raw)
        for back in range(1, min(4, len(raw)) + 1):
            byte = raw[-back]
            if byte & 0xC0 == 0x80:
                continue
            if byte & 0x80:
                need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
                if back < need:
                    cut = len(raw) - back
            break
        text, self._pending = raw[:cut].decode("utf-8", "replace"), raw[cut:]
        if not text:
            return []
        # A CRLF split across chunks: the LF ends no second line.
        position = 1 if self._saw_cr and text[0] == "\n" else 0
        self._saw_cr = text[-1] == "\r"
        # Whole lines at a time (not char by char), so a large event stays linear.
        for end in _LINE_END.finditer(text, position):
            self._line(self._buffer + text[position : end.start()])
            self._buffer = ""
            position = end.end()
        self._buffer += text[position:]
        return self.events[start:]

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments.append(line[1:].lstrip(" "))
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)

    def _dispatch(self) -> None:
        if not self._data:
            self._event = ""
            return
        self.events.append(
            SseEvent(
                self._event or "message", "\n".join(self._data), self.last_event_id, self.retry
            )
        )
        self._data, self._event = [], ""
