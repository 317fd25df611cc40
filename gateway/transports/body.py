"""Reading a request body: within its time and size bounds, as a JSON object."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.admission import refuse_early
from gateway.errors import BodyTimeout, BodyTooLarge, InvalidRequest
from gateway.keys import settings_key
from gateway.schema import parse_json_object


async def read_body(request: web.Request) -> bytes:
    """The whole body, within `server.body_timeout_s` and `server.max_body_bytes`."""
    server = request.app[settings_key].server
    content = request.content
    if content.is_eof():
        # The usual chat request arrives with its head in one read: take it
        # as it lies, without a deadline timer and aiohttp's read loop (about
        # 30 µs of the path to the upstream's request).
        body = content.read_nowait()
        if len(body) > server.max_body_bytes:
            raise _over_the_limit(server.max_body_bytes)
        return body
    try:
        async with asyncio.timeout(server.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"body not received within {server.body_timeout_s} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise _over_the_limit(server.max_body_bytes) from None


def _over_the_limit(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"body exceeds the limit of {limit} bytes")


async def read_json_body(request: web.Request) -> dict[str, Any]:
    limit = request.app[settings_key].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body is {request.content_length} bytes; the limit is {limit}")
    raw = await read_body(request)
    if not raw.strip():
        raise InvalidRequest("body is empty: send a JSON object")
    return parse_json_object(raw)


async def read_generation_body(request: web.Request) -> dict[str, Any]:
    """The body of a request that starts a generation, after the cheap refusals
    (draining, the stream cap): a refused request costs no body read."""
    refuse_early(request)
    return await read_json_body(request)
