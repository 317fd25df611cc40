"""What happened to each request and stream: metrics and one access-log line at its end.

A `StreamTracker` follows one client-facing stream (an HTTP stream, or one
request id on a WebSocket) from the request's arrival to its end, whatever
the end: it is closed in a `finally`, so `gateway_streams_active` returns to
0 and `gateway_streams_total` counts each stream exactly once, including
when the handler is cancelled because the client left. Transports call
`wrote()` once per write (a batch of events), not once per token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.auth import client_ip
from gateway.events import Event
from gateway.generation import Generation
from gateway.keys import (
    lifecycle_key,
    metrics_key,
    principal_key,
    request_id_key,
    settings_key,
)
from gateway.metrics import GatewayMetrics, Outcome, StreamChildren, Transport
from gateway.middleware import Handler

access_log = logging.getLogger("gateway.access")

#: Function names listed in one access-log line at most.
_LOGGED_TOOL_CALLS = 16
#: How many tokens a stream writes between updates of the tokens counter.
_COUNT_EVERY = 16

_ERROR_OUTCOMES: dict[str, Outcome] = {
    "upstream_timeout": "timeout",
    "shutting_down": "shutdown",
}
_STOP_OUTCOMES: dict[str | None, Outcome] = {
    "client_disconnected": "client_disconnected",
    "shutdown": "shutdown",
}


def outcome_of(terminal: Event, generation: Generation) -> Outcome:
    """The outcome a client saw from the generation's terminal event."""
    if terminal.type == "error":
        return _ERROR_OUTCOMES.get(terminal.fields.get("code", ""), "upstream_error")
    if terminal.fields.get("finish_reason") == "cancelled":
        return _STOP_OUTCOMES.get(generation.stop_cause, "cancelled")
    return "completed"


def observe_generation(metrics: GatewayMetrics, generation: Generation) -> None:
    """Once per generation, whatever the transports: how it ended, its tool calls, its thinking."""
    valid = (_is_json_object(arguments) for arguments in generation.tool_call_arguments())
    metrics.generation_ended(
        generation.model, generation.finish_reason or "error", valid, generation.reasoning_events
    )


def _is_json_object(arguments: str) -> bool:
    try:
        return isinstance(orjson.loads(arguments), dict)
    except orjson.JSONDecodeError:
        return False


class StreamTracker:
    """Counts one stream's tokens and bytes, its first token and gaps, and its outcome."""

    __slots__ = (
        "_children",
        "_last_token_at",
        "_uncounted",
        "arrival",
        "bytes",
        "generation",
        "new",
        "outcome",
        "resumed",
        "terminal",
        "tokens",
        "transport",
        "ttft_s",
    )

    def __init__(
        self,
        transport: Transport,
        generation: Generation,
        children: StreamChildren | None,
        *,
        arrival: float,
        new: bool,
        resumed: bool,
    ) -> None:
        """`new`: this request started the generation (its TTFT is ours to measure)."""
        self.transport = transport
        self.generation = generation
        self.arrival = arrival
        self.new = new
        self.resumed = resumed
        self.tokens = 0
        self.bytes = 0
        self.ttft_s: float | None = None
        self.terminal: Event | None = None
        self.outcome: Outcome | None = None
        self._last_token_at: float | None = None
        #: Tokens not yet added to the counter: it is bumped every
        #: `_COUNT_EVERY` tokens and at the end, not on every write.
        self._uncounted = 0
        self._children = children
        if children is not None:
            children.transport.active.inc()
            if resumed:
                children.transport.resumes.inc()

    def wrote(self, batch: list[Event], nbytes: int) -> None:
        """After a write of `batch` (`nbytes` on the wire) to the client."""
        self.bytes += nbytes
        tokens = len(batch)
        if batch[0].seq == 0:
            tokens -= 1  # `start`
        last = batch[-1]
        if last.terminal:
            tokens -= 1
            self.terminal = last
        if tokens <= 0:
            return
        now = time.monotonic()
        self.tokens += tokens
        children = self._children
        if self._last_token_at is None:
            if self.new:
                self.ttft_s = now - self.arrival
                if children is not None:
                    children.ttft.observe(self.ttft_s)
        elif children is not None:
            children.transport.inter_token.observe(now - self._last_token_at)
        self._last_token_at = now
        self._uncounted += tokens
        if children is not None and self._uncounted >= _COUNT_EVERY:
            children.tokens.inc(self._uncounted)
            self._uncounted = 0

    def saw(self, terminal: Event) -> None:
        """The terminal event reached the client another way (an HTTP error status)."""
        self.terminal = terminal

    def finish(self, *, stalled: bool = False, draining: bool = False) -> Outcome:
        """Count the stream once; later calls return the first outcome."""
        if self.outcome is not None:
            return self.outcome
        if self.terminal is not None:
            outcome = outcome_of(self.terminal, self.generation)
        elif stalled:
            outcome = "timeout"
        elif draining:
            outcome = "shutdown"
        else:
            outcome = "client_disconnected"
        self.outcome = outcome
        children = self._children
        if children is not None:
            if self._uncounted:
                children.tokens.inc(self._uncounted)
                self._uncounted = 0
            transport = children.transport
            transport.active.dec()
            transport.outcomes[outcome].inc()
            transport.duration.observe(time.monotonic() - self.arrival)
            if outcome == "client_disconnected":
                transport.disconnects.inc()
        return outcome

    def fields(self) -> dict[str, Any]:
        """This stream's part of an access-log line."""
        generation = self.generation
        fields = {
            "transport": self.transport,
            "model": generation.model,
            "generation_id": generation.id,
            "outcome": self.outcome,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 1),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "resumed": self.resumed,
        }
        # What an agent's operator asks first: did it call tools, which, did it think.
        tool_calls = getattr(generation, "tool_calls", None)
        if tool_calls:
            # Names come from the upstream as well: bounded in count and length.
            fields["tool_calls"] = [name[:64] for name in tool_calls[:_LOGGED_TOOL_CALLS]]
        if getattr(generation, "reasoning_events", 0):
            fields["reasoning_tokens"] = generation.reasoning_events
        return fields


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


def track_stream(
    request: web.Request,
    transport: Transport,
    generation: Generation,
    *,
    new: bool,
    resumed: bool = False,
    arrival: float | None = None,
) -> StreamTracker:
    """A tracker for a stream of `request`; the HTTP access line will carry its fields."""
    metrics = request.app[metrics_key]
    children = metrics.stream(transport, generation.model) if metrics.enabled else None
    tracker = StreamTracker(
        transport,
        generation,
        children,
        arrival=arrival_of(request) if arrival is None else arrival,
        new=new,
        resumed=resumed,
    )
    record = request.get(access_record_key)
    if record is not None and record.stream is None and transport != "websocket":
        record.stream = tracker
    return tracker


def end_stream(request: web.Request, tracker: StreamTracker, *, stalled: bool) -> Outcome:
    """Count the stream's end; a stream cut short by a drain counts as `shutdown`."""
    return tracker.finish(stalled=stalled, draining=request.app[lifecycle_key].draining)


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
