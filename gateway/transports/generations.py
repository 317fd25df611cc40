"""Generations as a resource: start detached, attach from any seq, look, cancel."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.admission import admit_generation
from gateway.errors import InvalidRequest
from gateway.events import Event
from gateway.generation_log import GenerationLog
from gateway.keys import shared_log_key
from gateway.middleware import json_response
from gateway.schema import parse_generation_request
from gateway.transports.body import read_generation_body
from gateway.transports.chunked import CONTENT_TYPE as NDJSON_TYPE
from gateway.transports.chunked import NDJSON
from gateway.transports.pump import follow
from gateway.transports.resume import find_generation, parse_event_id, parse_seq
from gateway.transports.sse import sse_wire


def events_url(generation_id: str) -> str:
    return f"/v1/generations/{generation_id}/events"


async def create_generation(request: web.Request) -> web.Response:
    """POST /v1/generations: 201 with the id; nobody is attached yet, so the grace clock runs."""
    body = parse_generation_request(await read_generation_body(request))
    generation = await admit_generation(request, body)
    url = events_url(generation.id)
    return json_response(
        {"id": generation.id, "events_url": url}, status=201, headers={"Location": url}
    )


def _after_seq(request: web.Request, generation_id: str) -> int:
    if "after" in request.query:
        return parse_seq(request.query["after"], "after")
    last_event_id = request.headers.get("Last-Event-ID", "").strip()
    if not last_event_id:
        return -1
    if last_event_id.lstrip("-").isdigit():
        return parse_seq(last_event_id, "Last-Event-ID")
    named, seq = parse_event_id(last_event_id)
    if named != generation_id:
        raise InvalidRequest("Last-Event-ID names another generation")
    return seq


async def generation_events(request: web.Request) -> web.StreamResponse:
    """GET /v1/generations/{id}/events: SSE, or NDJSON when the client accepts it."""
    generation_id = request.match_info["generation_id"]
    after = _after_seq(request, generation_id)
    wire = NDJSON if NDJSON_TYPE in request.headers.get("Accept", "") else sse_wire(request)
    return await follow(request, generation_id, after, wire)


async def generation_status(request: web.Request) -> web.Response:
    """GET /v1/generations/{id}: where it stands, for a client that polls instead of
    following. Same owner rule as its events (anyone else: 404)."""
    generation = await find_generation(request, request.match_info["generation_id"])
    return json_response(status_document(generation, await _newest_event(request, generation)))


def status_document(generation: GenerationLog, newest: Event) -> dict[str, Any]:
    """`state` running | done | cancelled | error; `finish_reason` null until done;
    `usage` once done (a cancelled one too: what it used), `error` once failed."""
    document: dict[str, Any] = {
        "id": generation.id,
        "object": "generation",
        "state": "running",
        "model": generation.model,
        "created": generation.created,
        "last_seq": newest.seq,
        "finish_reason": None,
        "events_url": events_url(generation.id),
    }
    if newest.type == "done":
        fields = newest.fields
        reason = fields["finish_reason"]
        state = "cancelled" if reason == "cancelled" else "done"
        document.update(state=state, finish_reason=reason, usage=fields["usage"])
    elif newest.type == "error":
        document.update(state="error", error=newest.fields)
    return document


async def _newest_event(request: web.Request, generation: GenerationLog) -> Event:
    """The log's last event, read without attaching: a poll must neither count as a
    reader nor hold off the grace timer of a generation nobody follows."""
    if generation.remote:
        return await request.app[shared_log_key].reader.newest(generation.id)
    # Never entered, so never attached; a local log is never empty (`start`).
    batch = await generation.subscribe().next_batch()
    assert batch
    return batch[-1]


async def delete_generation(request: web.Request) -> web.Response:
    """DELETE /v1/generations/{id}: cancel it (idempotent once it has ended)."""
    generation = await find_generation(request, request.match_info["generation_id"])
    await generation.request_cancel()
    return web.Response(status=204)
