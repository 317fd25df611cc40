"""Small clients for tests: read NDJSON, SSE and WebSocket streams into events."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from tests.sse_parser import SseParser

#: The upstream key of test models: it must never reach a client or a log.
SECRET = "sk-test-secret-123456"


def openai_model(base_url: str, name: str = "gpt", **overrides: Any) -> dict[str, Any]:
    """An `openai` model on a fake upstream: fast timeouts, no retries unless asked."""
    return {
        "name": name,
        "provider": "openai",
        "base_url": base_url,
        "api_key": SECRET,
        "upstream_model": f"{name}-upstream",
        "timeout_s": 1,
        "max_retries": 0,
        **overrides,
    }


async def read_ndjson(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    lines = (await response.read()).split(b"\n")
    return [orjson.loads(line) for line in lines if line.strip()]


async def read_sse(response: aiohttp.ClientResponse) -> tuple[list[dict[str, Any]], SseParser]:
    parser = SseParser()
    async for chunk in response.content.iter_any():
        parser.feed(chunk)
    return [orjson.loads(e.data) for e in parser.events], parser


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "token")


def assert_well_formed(events: list[dict[str, Any]], first_seq: int = 0) -> None:
    """Seqs contiguous from `first_seq`; exactly one terminal event, last."""
    assert [e["seq"] for e in events] == list(range(first_seq, first_seq + len(events)))
    assert events[-1]["type"] in {"done", "error"}
    assert all(e["type"] not in {"done", "error"} for e in events[:-1])
