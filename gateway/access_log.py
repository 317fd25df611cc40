"""One access-log line per request (and per WebSocket stream), and request metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.auth import client_ip
from gateway.keys import metrics_key, principal_key, request_id_key, settings_key
from gateway.middleware import Handler

if TYPE_CHECKING:
    from gateway.stream_tracker import StreamTracker

access_log = logging.getLogger("gateway.access")


@dataclass(slots=True)
class AccessRecord:
    """Per request: when it arrived, the status it got, and its stream(s)."""

    arrival: float
    status: int | None = None
    stream: StreamTracker | None = None
    extra: dict[str, Any] = field(default_factory=dict)


access_record_key = web.RequestKey("access_record", AccessRecord)


def arrival_of(request: web.Request) -> float:
    record = request.get(access_record_key)
    return record.arrival if record is not None else time.monotonic()


def route_of(request: web.Request) -> str:
    """The route's pattern (never the raw path, which is unbounded user input)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def request_fields(request: web.Request) -> dict[str, Any]:
    """Who asked: request id, principal and client address (never a credential)."""
    caller = request.get(principal_key)
    trusted = request.app[settings_key].server.trusted_proxies
    return {
        "request_id": request.get(request_id_key),
        "principal": caller.id if caller is not None else None,
        "client_ip": client_ip(request.remote, request.headers.get("X-Forwarded-For"), trusted),
    }


def log_stream(request: web.Request, tracker: StreamTracker, **extra: Any) -> None:
    """The access line of one WebSocket stream (HTTP streams share their request's line)."""
    if not access_log.isEnabledFor(logging.INFO) or not _access_log_on(request):
        return
    duration_ms = round((time.monotonic() - tracker.arrival) * 1000, 1)
    access_log.info(
        "stream",
        extra={
            **request_fields(request),
            "route": route_of(request),
            "duration_ms": duration_ms,
            **tracker.fields(),
            **extra,
        },
    )


def _access_log_on(request: web.Request) -> bool:
    return request.app[settings_key].logging.access_log


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request by route, method and status, and log one line at its end."""
    record = request[access_record_key] = AccessRecord(time.monotonic())
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except BaseException:
        # Cancelled (the client left): 499 unless headers had gone out already.
        status = record.status if record.status is not None else 499
        raise
    finally:
        metrics = request.app[metrics_key]
        route = route_of(request)
        metrics.http_request(route, request.method, status)
        if access_log.isEnabledFor(logging.INFO) and _access_log_on(request):
            _log_request(request, record, route, status)


def _log_request(request: web.Request, record: AccessRecord, route: str, status: int) -> None:
    fields: dict[str, Any] = {
        **request_fields(request),
        "method": request.method,
        "route": route,
        "status": status,
        "duration_ms": round((time.monotonic() - record.arrival) * 1000, 1),
    }
    if record.stream is not None:
        fields.update(record.stream.fields())
    fields.update(record.extra)
    access_log.info("request", extra=fields)


async def record_status(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the status a stream's client got before it ended."""
    record = request.get(access_record_key)
    if record is not None:
        record.status = response.status
