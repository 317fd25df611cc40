"""Finding a generation to read, and where a returning reader picks up.

One place decides the resume point and "already delivered": a reader that
has seen the terminal event gets nothing more (HTTP: 204, which also stops a
browser's EventSource from reconnecting; a WebSocket has no status, so it
gets the terminal event again and its request id ends).
"""

from __future__ import annotations

from aiohttp import web

from gateway.errors import GenerationNotFound, InvalidRequest
from gateway.generation_log import GenerationLog
from gateway.keys import principal_of, registry_key, shared_log_key
from gateway.registry import ID_PREFIX


async def find_generation(request: web.Request, generation_id: str) -> GenerationLog:
    """Ours if we run it; else, with a shared log, the one another replica runs (or ran)."""
    owner = principal_of(request)
    try:
        return request.app[registry_key].get(generation_id, owner)
    except GenerationNotFound:
        shared_log = request.app.get(shared_log_key)
        if shared_log is None:
            raise
        return await shared_log.reader.lookup(generation_id, owner)


def already_delivered(generation: GenerationLog, after_seq: int) -> bool:
    """True when the reader has seen the terminal event: start nothing."""
    terminal = generation.terminal_seq
    return terminal is not None and after_seq >= terminal


def replay_from(generation: GenerationLog, after_seq: int) -> int:
    """Where a WebSocket resume starts: at the latest, just before the terminal event."""
    terminal = generation.terminal_seq
    if terminal is not None and after_seq >= terminal:
        return terminal - 1
    return after_seq


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
