"""Admission: whether a stream may start on this replica, decided in one place.

Every stream passes the same three gates, in this order: the replica is not
draining, it runs fewer than its stream cap, and the caller's limits admit it
(`ratelimit.py`). A new generation is admitted once (`admit_generation`); a
reader of a generation another replica runs is a stream here too, holding a
client socket and a Redis read (`admit_follower`: a request and a concurrent
stream of the caller's limits, no tokens). POST routes refuse early, before
reading the body (`refuse_early`): shedding load must cost as little as
possible. Each admitted stream is counted once for the load-following
`Retry-After`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.errors import Overloaded, ShuttingDown
from gateway.generation import Generation
from gateway.generation_log import GenerationLog
from gateway.keys import (
    catalog_key,
    lifecycle_key,
    limiter_key,
    metrics_key,
    principal,
    registry_key,
    request_id_key,
    retry_after_key,
    settings_key,
    shared_log_key,
    stream_cap_key,
)
from gateway.ratelimit import Lease
from gateway.schema import GenerationRequest


def _refuse_if_draining(app: web.Application) -> None:
    if app[lifecycle_key].draining:
        raise ShuttingDown(
            "server is draining; retry on another replica", headers={"Retry-After": "1"}
        )


def _refuse_if_full(app: web.Application) -> None:
    """Shed new streams past the cap rather than slow (or, out of sockets, fail) running ones.

    The cap is `server.max_streams` or what the open-files limit allows,
    whichever is lower; refusals of both count as `limit="max_streams"`.
    """
    cap = app[stream_cap_key]
    if not cap:
        return
    shared_log = app.get(shared_log_key)
    following = shared_log.reader.following if shared_log is not None else 0
    if app[registry_key].running + following < cap:
        return
    app[metrics_key].refused("max_streams")
    retry_after_s = app[retry_after_key].refused()
    raise Overloaded(
        f"this replica runs its maximum of {cap} streams; retry in {retry_after_s} s",
        headers={"Retry-After": str(retry_after_s)},
    )


def refuse_early(request: web.Request) -> None:
    """Draining or full: refuse before the body is read (not counted as admitted)."""
    _refuse_if_draining(request.app)
    _refuse_if_full(request.app)


def refuse_if_draining(request: web.Request) -> None:
    """For what starts no stream itself (a WebSocket upgrade): draining only."""
    _refuse_if_draining(request.app)


def _admit_stream(request: web.Request) -> None:
    refuse_early(request)
    request.app[retry_after_key].admitted()


async def admit_generation(
    request: web.Request,
    body: GenerationRequest,
    *,
    passthrough: dict[str, Any] | None = None,
    resume_grace_s: float | None = None,
) -> Generation:
    """Resolve the model (404), admit it (503, 429), start it; `passthrough`: raw
    OpenAI fields for the upstream (`GenerationRequest.for_upstream`).

    The lease is released by the registry when the generation ends, however
    it ends, with the tokens it really used.
    """
    _admit_stream(request)
    app = request.app
    entry = app[catalog_key].resolve(body.model)
    caller = principal(request)
    default_reserve = app[settings_key].rate_limit.default_reserve_tokens
    reserve = body.prompt_tokens_estimate + (body.max_tokens or default_reserve)
    lease = await app[limiter_key].admit(
        caller.rate_key, caller.limits, reserve, prompt_tokens=body.prompt_tokens_estimate
    )
    return app[registry_key].start(
        body.for_upstream(request_id=request.get(request_id_key), passthrough=passthrough),
        principal=caller.id,
        model=entry.settings.name,
        provider=entry.provider,
        resume_grace_s=resume_grace_s,
        lease=lease,
    )


async def admit_follower(request: web.Request, generation: GenerationLog) -> Lease | None:
    """A lease for a reader of a remote generation (release it with 0 tokens); None
    for a local one, which its generation already counts."""
    if not generation.remote:
        return None
    _admit_stream(request)
    caller = principal(request)
    return await request.app[limiter_key].admit(caller.rate_key, caller.limits, 0)


class Following:
    """`admit_follower` for the span of one HTTP handler (`async with`).

    A class rather than an `asynccontextmanager`: every stream passes here, and
    a local generation (the usual case) needs neither an async generator nor
    contextlib's wrapper around it.
    """

    __slots__ = ("_generation", "_lease", "_request")

    def __init__(self, request: web.Request, generation: GenerationLog) -> None:
        self._request = request
        self._generation = generation
        self._lease: Lease | None = None

    async def __aenter__(self) -> None:
        if self._generation.remote:
            self._lease = await admit_follower(self._request, self._generation)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._lease is not None:
            # Shielded: the handler may be cancelled (its client left) while releasing.
            await asyncio.shield(self._lease.release(0))
