"""What every transport does before it encodes: read the body, start or find a generation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.errors import (
    BodyTimeout,
    BodyTooLarge,
    GenerationNotFound,
    InvalidRequest,
    Overloaded,
    ShuttingDown,
)
from gateway.generation import Generation
from gateway.keys import (
    catalog_key,
    lifecycle_key,
    limiter_key,
    metrics_key,
    principal,
    principal_of,
    registry_key,
    request_id_key,
    retry_after_key,
    settings_key,
    shared_log_key,
    stream_cap_key,
)
from gateway.registry import ID_PREFIX
from gateway.schema import GenerationRequest, parse_generation_request, parse_json_object
from gateway.shared_log import RemoteGeneration

#: Response headers for streams: no caching, and no buffering in nginx
#: (`X-Accel-Buffering: no`: nginx buffers proxied responses by default).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def finish_response(response: web.StreamResponse) -> None:
    """End a chunked body. The terminal event is out already: a client that
    hung up the moment it read it has the whole stream, so a reset is fine."""
    with contextlib.suppress(ConnectionError):  # aiohttp's ClientConnectionResetError is one
        await response.write_eof()


async def read_body(request: web.Request) -> bytes:
    """The whole body, within `server.body_timeout_s` and `server.max_body_bytes`."""
    server = request.app[settings_key].server
    try:
        async with asyncio.timeout(server.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"body not received within {server.body_timeout_s} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"body exceeds the limit of {server.max_body_bytes} bytes") from None


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
    (draining, `server.max_streams`): shedding load must cost as little as
    possible, not a body read and a validation per refused request."""
    ensure_accepting(request)
    ensure_capacity(request)
    return await read_json_body(request)


def ensure_accepting(request: web.Request) -> None:
    if request.app[lifecycle_key].draining:
        raise ShuttingDown(
            "server is draining; retry on another replica", headers={"Retry-After": "1"}
        )


def ensure_capacity(request: web.Request) -> None:
    """Shed new streams past the cap rather than slow (or, out of sockets, fail) running ones.

    The cap is `server.max_streams` or what the open-files limit allows,
    whichever is lower; refusals of both count as `limit="max_streams"`.
    """
    cap = request.app[stream_cap_key]
    if not cap:
        return
    shared_log = request.app.get(shared_log_key)
    following = shared_log.following if shared_log is not None else 0
    if request.app[registry_key].running + following < cap:
        request.app[retry_after_key].admitted()
        return
    request.app[metrics_key].refused("max_streams")
    retry_after_s = request.app[retry_after_key].refused()
    raise Overloaded(
        f"this replica runs its maximum of {cap} streams; retry in {retry_after_s} s",
        headers={"Retry-After": str(retry_after_s)},
    )


async def start_generation(
    request: web.Request, body: GenerationRequest, *, resume_grace_s: float | None = None
) -> Generation:
    """Resolve the model (404), admit it against the caller's limits (429), start it.

    The lease is released by the registry when the generation ends, however
    it ends, with the tokens it really used.
    """
    ensure_accepting(request)
    ensure_capacity(request)
    entry = request.app[catalog_key].resolve(body.model)
    caller = principal(request)
    default_reserve = request.app[settings_key].rate_limit.default_reserve_tokens
    reserve = body.prompt_tokens_estimate + (body.max_tokens or default_reserve)
    lease = await request.app[limiter_key].admit(
        caller.rate_key, caller.limits, reserve, prompt_tokens=body.prompt_tokens_estimate
    )
    body.for_upstream(request_id=request.get(request_id_key))
    return request.app[registry_key].start(
        body,
        principal=caller.id,
        model=entry.settings.name,
        provider=entry.provider,
        resume_grace_s=resume_grace_s,
        lease=lease,
    )


async def start_from_dict(request: web.Request, data: dict[str, Any]) -> Generation:
    return await start_generation(request, parse_generation_request(data))


async def find_generation(
    request: web.Request, generation_id: str
) -> Generation | RemoteGeneration:
    """Ours if we run it; else, with a shared log, the one another replica runs (or ran)."""
    owner = principal_of(request)
    try:
        return request.app[registry_key].get(generation_id, owner)
    except GenerationNotFound:
        shared_log = request.app.get(shared_log_key)
        if shared_log is None:
            raise
        return await shared_log.lookup(generation_id, owner)


@contextlib.asynccontextmanager
async def follow_admitted(
    request: web.Request, generation: Generation | RemoteGeneration
) -> AsyncIterator[None]:
    """A reader of a generation another replica runs is a stream of this one: it
    holds a client socket and a Redis read. It counts toward `server.max_streams`
    and the principal's limits (a request, a concurrent stream, no tokens) as if
    it had started the generation here; a local reader is counted by its generation."""
    if not isinstance(generation, RemoteGeneration):
        yield
        return
    ensure_capacity(request)
    caller = principal(request)
    lease = await request.app[limiter_key].admit(caller.rate_key, caller.limits, 0)
    try:
        yield
    finally:
        # Shielded: the handler may be cancelled (its client left) while releasing.
        await asyncio.shield(lease.release(0))


async def cancel_generation(generation: Generation | RemoteGeneration) -> None:
    """Stop it here, or ask its owner replica to (through the shared log)."""
    if isinstance(generation, RemoteGeneration):
        await generation.request_cancel()
    else:
        generation.cancel("cancelled")


def parse_event_id(value: str) -> tuple[str, int]:
    """Split `<generation_id>:<seq>` (an SSE `Last-Event-ID`)."""
    generation_id, _, seq = value.strip().rpartition(":")
    if not generation_id.startswith(ID_PREFIX) or not seq.isdigit() or len(seq) > 9:
        raise InvalidRequest("Last-Event-ID must look like gen_…:<seq>")
    return generation_id, int(seq)


def parse_seq(value: str, name: str) -> int:
    value = value.strip()
    if not value.lstrip("-").isdigit() or len(value) > 10 or int(value) < -1:
        raise InvalidRequest(f"{name} must be an integer seq >= -1")
    return int(value)


def already_delivered(generation: Generation | RemoteGeneration, after_seq: int) -> bool:
    """True when the client has seen the terminal event: answer 204, start nothing."""
    terminal = generation.terminal_seq
    return terminal is not None and after_seq >= terminal
