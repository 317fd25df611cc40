"""Any Unicode text round-trips through the NDJSON, SSE and WebSocket encoders."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.events import Event, scrub_surrogates
from gateway.transports.chunked import encode_ndjson
from gateway.transports.sse import encode_sse
from gateway.transports.websocket import encode_ws, with_request_id
from tests.helpers import SseParser

# Every code point, lone surrogates included, with line breaks and emoji made likely.
pieces = st.one_of(
    st.text(alphabet=st.characters(codec=None), max_size=8),
    st.sampled_from(["\n", "\r", "\r\n", "\u2028", "\x00", "🚀", "👍🏽", "é", '"', "\\"]),
    st.sampled_from(["\ud800", "\udfff", "\ud83d\ude80", "\ude80\ud83d"]),
)
texts = st.lists(pieces, max_size=40).map("".join)


def expected(text: str) -> str:
    """What a client must see: the text, with lone surrogates as U+FFFD."""
    return scrub_surrogates(text)


@settings(max_examples=300, deadline=None)
@given(text=texts, seq=st.integers(min_value=1, max_value=10**6))
def test_ndjson_round_trip(text: str, seq: int) -> None:
    data = encode_ndjson(Event.new("gen_x", "token", seq, {"text": text}))
    assert data.endswith(b"\n") and data.count(b"\n") == 1  # one event, one line
    decoded = orjson.loads(data)
    assert decoded == {"type": "token", "seq": seq, "text": expected(text)}


@settings(max_examples=300, deadline=None)
@given(text=texts, seq=st.integers(min_value=1, max_value=10**6), split=st.integers(0, 400))
def test_sse_round_trip_in_any_chunking(text: str, seq: int, split: int) -> None:
    event = Event.new("gen_x", "token", seq, {"text": text})
    data = b"retry: 1000\n" + encode_sse(event)
    parser = SseParser()
    parser.feed(data[:split])
    parser.feed(data[split:])
    [received] = parser.events
    assert received.event == "token" and received.id == f"gen_x:{seq}"
    assert orjson.loads(received.data)["text"] == expected(text)


@settings(max_examples=300, deadline=None)
@given(text=texts, request_id=st.text(min_size=1, max_size=20))
def test_websocket_round_trip(text: str, request_id: str) -> None:
    request_id = scrub_surrogates(request_id)
    event = Event.new("gen_x", "token", 5, {"text": text})
    frame = with_request_id(request_id, encode_ws(event))
    frame.decode("utf-8")  # a text frame must be valid UTF-8
    assert orjson.loads(frame) == {
        "request_id": request_id,
        "generation_id": "gen_x",
        "type": "token",
        "seq": 5,
        "text": expected(text),
    }


def test_paired_surrogates_become_the_character() -> None:
    assert scrub_surrogates("\ud83d\ude80") == "🚀"
    assert scrub_surrogates("a\ud800b") == "a\ufffdb"


def test_each_format_is_encoded_once_per_event() -> None:
    event = Event.new("gen_x", "token", 1, {"text": "hi"})
    calls = []

    def counting(e: Event) -> bytes:
        calls.append(e)
        return encode_sse(e)

    first = event.encoded("sse", counting)
    assert all(event.encoded("sse", counting) is first for _ in range(100))
    assert len(calls) == 1
