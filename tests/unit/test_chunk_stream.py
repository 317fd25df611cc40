"""The OpenAI provider's line parser on the wire's awkward corners."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import orjson

from gateway.providers.openai import _ChunkStream


def parse(payload: bytes) -> dict[str, Any]:
    chunk: dict[str, Any] = orjson.loads(payload)
    return chunk


def frame(text: str, end: bytes = b"\n") -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + orjson.dumps(chunk) + end + end


def test_a_read_of_many_frames_gives_its_deltas_in_order() -> None:
    stream = _ChunkStream("up", parse)
    item, failure = stream.feed(b"".join(frame(t) for t in ("a", "b", "c")) + b": keep-alive\n\n")
    assert (item, failure) == (["a", "b", "c"], None)


def test_crlf_blanks_and_a_done_with_trailing_blanks() -> None:
    stream = _ChunkStream("up", parse)
    item, _ = stream.feed(frame("x", b"\r\n") + b"data:\t[DONE]  \r\n\r\n")
    assert item == "x" and stream.ended


def test_a_line_split_across_reads_waits_for_its_end() -> None:
    stream = _ChunkStream("up", parse)
    whole = frame("split")
    assert stream.feed(whole[:9]) == (None, None)
    assert stream.feed(whole[9:]) == ("split", None)


def test_a_long_run_of_blanks_inside_a_line_is_read_in_linear_time() -> None:
    """A hostile upstream's line must not make the parser backtrack."""
    stream = _ChunkStream("up", parse)
    began = time.perf_counter()
    # The test's `parse` raises orjson's error, not the provider's: only the time matters.
    with contextlib.suppress(orjson.JSONDecodeError):
        stream.feed(b"data: x" + b" " * 200_000 + b"y \n\n")
    assert time.perf_counter() - began < 1.0
