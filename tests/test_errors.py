"""Errors before streaming are HTTP statuses with OpenAI's error body, on every route."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import StartGateway
from tests.helpers import fetch

STREAM_ROUTES = ["/v1/stream/chunked", "/v1/stream/sse", "/v1/generations"]


def assert_error(headers: Mapping[str, str], raw: bytes, code: str) -> str:
    """A JSON body in OpenAI's error shape with `code`; the message."""
    assert headers["Content-Type"].startswith("application/json"), headers
    body = orjson.loads(raw)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return str(body["error"]["message"])


@pytest.mark.parametrize("path", STREAM_ROUTES)
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "empty"),
        (b'{"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}', "exactly one"),
        (b'{"max_tokens": 5}', "exactly one"),
        (b'{"prompt": "hi", "max_tokens": 0}', "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": "ten"}', "max_tokens"),
        (b'{"prompt": "hi", "temperature": 9}', "temperature"),
        (b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        (b'{"prompt": "hi", "on_disconnect": "later"}', "on_disconnect"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
        (b'{"prompt": "hi", "colour": "red"}', "colour"),
        (b'{"prompt": 5}', "prompt"),
        (b"[" * 5000 + b"]" * 5000, "JSON"),
    ],
)
async def test_bad_bodies_are_400(
    start_gateway: StartGateway, path: str, body: bytes, fragment: str
) -> None:
    server = await start_gateway()
    status, headers, raw = await fetch(server, "POST", path, data=body)
    assert status == 400
    assert fragment in assert_error(headers, raw, "invalid_request")


@pytest.mark.parametrize("path", STREAM_ROUTES)
async def test_unknown_model_is_404(start_gateway: StartGateway, path: str) -> None:
    server = await start_gateway()
    status, headers, raw = await fetch(
        server, "POST", path, body={"prompt": "hi", "model": "gpt-9"}
    )
    assert status == 404
    assert "gpt-9" in assert_error(headers, raw, "model_not_found")


@pytest.mark.parametrize("path", STREAM_ROUTES)
async def test_body_over_the_limit_is_413(start_gateway: StartGateway, path: str) -> None:
    server = await start_gateway(server={"max_body_bytes": 4096})
    status, headers, raw = await fetch(server, "POST", path, body={"prompt": "x" * 5000})
    assert status == 413
    assert "4096" in assert_error(headers, raw, "invalid_request")


async def test_body_over_the_limit_without_content_length_is_413(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(server={"max_body_bytes": 4096})

    async def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    status, headers, raw = await fetch(server, "POST", "/v1/stream/chunked", data=chunks())
    assert status == 413
    assert_error(headers, raw, "invalid_request")


async def test_body_over_the_limit_arriving_whole_is_413(start_gateway: StartGateway) -> None:
    """A chunked body (no length to judge it by) that comes with its head in one
    write is read as it lies, without aiohttp's read loop: the limit holds there too."""
    server = await start_gateway(server={"max_body_bytes": 4096})
    payload = b'{"prompt": "' + b"x" * 5000 + b'"}'
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /v1/stream/sse HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n" % len(payload)
        + payload
        + b"\r\n0\r\n\r\n"
    )
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    head, _, raw = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 413"), head
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert "4096" in assert_error(headers, raw, "invalid_request")


async def test_unknown_route_and_method_use_the_error_shape(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    status, headers, raw = await fetch(server, "GET", "/v1/nothing")
    assert status == 404
    assert_error(headers, raw, "invalid_request")
    status, headers, raw = await fetch(server, "PUT", "/v1/stream/chunked")
    assert status == 405
    assert_error(headers, raw, "invalid_request")


async def test_sse_get_validates_query(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    for query, fragment in [
        ("", "prompt"),
        ("?prompt=hi&max_tokens=ten", "max_tokens"),
        ("?prompt=hi&evil=1", "evil"),
    ]:
        status, headers, raw = await fetch(server, "GET", "/v1/stream/sse" + query)
        assert status == 400
        assert fragment in assert_error(headers, raw, "invalid_request")


async def test_request_id_is_echoed_or_made(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    async with aiohttp.ClientSession() as session:
        async with session.get(
            server.make_url("/healthz"), headers={"X-Request-ID": "abc-123"}
        ) as r:
            assert r.headers["X-Request-ID"] == "abc-123"
        bad = {"X-Request-ID": "evil\tvalue" + "x" * 200}
        async with session.get(server.make_url("/healthz"), headers=bad) as r:
            assert r.headers["X-Request-ID"] != bad["X-Request-ID"]
            assert len(r.headers["X-Request-ID"]) == 16


async def test_health_and_readiness(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/healthz")) as response:
            assert response.status == 200 and (await response.json())["status"] == "ok"
        async with session.get(server.make_url("/readyz")) as response:
            assert response.status == 200
        async with session.get(server.make_url("/v1/models")) as response:
            data = await response.json()
            assert [m["id"] for m in data["data"]] == ["sim-1"]
