"""What happened to each stream: its metrics, and its part of the access-log line.

A `StreamTracker` follows one client-facing stream (an HTTP stream, or one
request id on a WebSocket) from the request's arrival to its end, whatever
the end: it is closed in a `finally`, so `gateway_streams_active` returns to
0 and `gateway_streams_total` counts each stream exactly once, including
when the handler is cancelled because the client left. Transports call
`wrote()` once per write (a batch of events), not once per token.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from gateway.access_log import access_record_key, arrival_of
from gateway.events import Event
from gateway.generation import Generation
from gateway.generation_log import GenerationLog
from gateway.keys import lifecycle_key, metrics_key
from gateway.metrics import GatewayMetrics, Outcome, StreamChildren, Transport

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


def outcome_of(terminal: Event, generation: GenerationLog) -> Outcome:
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
        generation: GenerationLog,
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
        fields: dict[str, Any] = {
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
        tool_calls = generation.tool_calls
        if tool_calls:
            # Names come from the upstream as well: bounded in count and length.
            fields["tool_calls"] = [name[:64] for name in tool_calls[:_LOGGED_TOOL_CALLS]]
        if generation.reasoning_events:
            fields["reasoning_tokens"] = generation.reasoning_events
        return fields


def track_stream(
    request: web.Request,
    transport: Transport,
    generation: GenerationLog,
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
