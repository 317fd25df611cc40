"""The OpenAI provider's line parser on the wire's awkward corners."""

from __future__ import annotations

import contextlib
import time

import orjson
import pytest

from gateway.errors import UpstreamError
from gateway.providers.openai import _ChunkStream
from gateway.providers.openai_chunks import Chunk, MalformedChunk, decode_chunk


def parse(payload: bytes) -> Chunk:
    return decode_chunk(payload)


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
    # The test's `parse` raises msgspec's error, not the provider's: only the time matters.
    with contextlib.suppress(MalformedChunk):
        stream.feed(b"data: x" + b" " * 200_000 + b"y \n\n")
    assert time.perf_counter() - began < 1.0


def finish_frames(reason: str | None) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"


def test_the_read_that_ends_a_sound_answer_is_held_for_its_finish() -> None:
    """Its deltas go out with the end in one send, not pushed a loop turn before it."""
    stream = _ChunkStream("up", parse)
    delivered: list[object] = []
    consume = stream.consumer(delivered.append)
    assert consume(frame("a"), False) is False
    assert consume(frame("b") + frame("c") + finish_frames("stop"), False) is True
    assert delivered == ["a"]
    finish = stream.finish(1)
    assert (finish.finish_reason, finish.deltas) == ("stop", ["b", "c"])
    assert finish.usage.completion_tokens == 3


def test_a_held_last_read_is_kept_when_the_answer_fails_at_its_end() -> None:
    """No finish reason: `finish` fails, and the provider yields the held text first."""
    stream = _ChunkStream("up", parse)
    consume = stream.consumer(lambda item: None)
    assert consume(frame("a") + finish_frames(None), False) is True
    with pytest.raises(UpstreamError, match="without a finish reason"):
        stream.finish(1)
    assert stream.held == "a"
