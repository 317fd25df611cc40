"""The contract's Prometheus metrics, on a registry of the app's own.

A registry per app (not prometheus-client's global one) lets tests run
several apps in one process. Every label value comes from a fixed set: the
transports, outcomes and limits below, the configured model names, HTTP
status codes, and route patterns. Children are created once and kept, so
the per-token path does attribute lookups, never `.labels()` (a label lookup takes a
lock and a dict walk per call).

Buckets (seconds) are chosen for LLM streaming, not web requests:
- time to first token, gateway and upstream: 10 ms to 2 min; queued or
  reasoning models take tens of seconds, prometheus' defaults stop at 10 s;
- inter-token gaps: 1 ms to 5 s (50 tokens/s is 20 ms);
- stream duration: 100 ms to 30 min.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Transport = Literal["chunked", "sse", "websocket", "openai", "ui"]
Outcome = Literal[
    "completed", "client_disconnected", "cancelled", "upstream_error", "timeout", "shutdown"
]

TRANSPORTS: Final = ("chunked", "sse", "websocket", "openai", "ui")
OUTCOMES: Final = (
    "completed",
    "client_disconnected",
    "cancelled",
    "upstream_error",
    "timeout",
    "shutdown",
)
LIMITS: Final = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_streams",
    "max_streams",
    "backend_unavailable",
)
AUTH_REASONS: Final = (
    "missing",
    "malformed",
    "malformed_token",
    "invalid_key",
    "invalid_token",
    "invalid_ticket",
    "expired",
    "bad_algorithm",
    "jwks",
    "query_disabled",
    "query_not_allowed",
    "forbidden_origin",
    "forbidden_host",
    "query_not_ticket",
    "ticket_not_allowed",
    "ticket_used",
)
#: How a generation ended: its finish reason, or `error`.
FINISHES: Final = ("stop", "length", "tool_calls", "content_filter", "cancelled", "error")
#: Whether a tool call's arguments parsed as JSON.
ARGUMENTS: Final = ("valid", "invalid")
#: Upstream request results that are not an HTTP status code.
UPSTREAM_RESULTS: Final = ("connect_error", "timeout", "stream_error", "cancelled")
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

TTFT_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
DURATION_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip


class GapCounts:
    """One histogram child, counted without a lock, for what is observed per token.

    prometheus-client's `Histogram.observe` takes a lock twice (bucket and
    sum): 5 % of the gateway's CPU on paced streams, observed per token
    (py-spy, bench S3). Here a token costs a bisect and two additions. It is
    only written from the event loop's thread; `/metrics` reads it from a
    worker thread, where the GIL makes each read whole.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class GapHistogram(Collector):
    """A histogram family of `GapCounts` children, one per label value, exposed
    at scrape time in the same shape as prometheus-client's `Histogram`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        values: Iterable[str],
        buckets: tuple[float, ...],
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        # `le` spelt as prometheus-client spells it (the library leaves it untyped).
        self._les = [floatToGoString(b) for b in buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
        self.children = {value: GapCounts(buckets) for value in values}

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=[self._label])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, child in self.children.items():
            counts, total = list(child.counts), child.total
            cumulative, buckets = 0, []
            for le, count in zip(self._les, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric([value], buckets, total)
        yield family


@dataclass(slots=True)
class TransportChildren:
    """The children of one transport, resolved once."""

    active: Gauge
    outcomes: dict[str, Counter]
    duration: Histogram
    disconnects: Counter
    resumes: Counter
    inter_token: GapCounts


@dataclass(slots=True)
class StreamChildren:
    """What one stream touches: its transport's children plus its model's."""

    transport: TransportChildren
    ttft: Histogram
    tokens: Counter


@dataclass(slots=True)
class UpstreamChildren:
    """One upstream (provider kind, model name)."""

    provider: str
    model: str
    ttft: Histogram
    cancellations: Counter
    requests: Counter
    _by_status: dict[str, Counter]

    def request(self, status: str) -> Counter:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self.requests.labels(
                self.provider, self.model, status
            )
        return child


def _child(
    children: dict[tuple[str, ...], Counter], labels: tuple[str, ...], family: Counter
) -> Counter:
    """`family.labels(*labels)`, looked up once and kept in `children`."""
    child = children.get(labels)
    if child is None:
        child = children[labels] = family.labels(*labels)
    return child


class GatewayMetrics:
    """Every metric of the contract, plus process, GC and platform collectors."""

    def __init__(self, models: Iterable[tuple[str, str]], *, enabled: bool = True) -> None:
        """`models`: (model name, provider kind) of every configured model.

        Disabled (`server.metrics_enabled: false`, for benchmarks), nothing on
        the stream path touches a metric and `/metrics` is not served.
        """
        self.enabled = enabled
        registry = self.registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        if GC_COLLECTOR is not None:
            GCCollector(registry=registry)
        self.http_requests = Counter(
            "gateway_http_requests_total",
            "HTTP requests by route pattern, method and status (499: client left first).",
            ["route", "method", "status"],
            registry=registry,
        )
        self._http_children: dict[tuple[str, str, int], Counter] = {}
        self.streams_active = Gauge(
            "gateway_streams_active",
            "Streams being written to clients.",
            ["transport"],
            registry=registry,
        )
        self.streams = Counter(
            "gateway_streams_total",
            "Streams ended, each counted once, by how it ended.",
            ["transport", "outcome"],
            registry=registry,
        )
        self.stream_duration = Histogram(
            "gateway_stream_duration_seconds",
            "From the request's arrival to the stream's end.",
            ["transport"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "From the request's arrival to its first token written to the client.",
            ["transport", "model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "gateway_tokens_streamed_total",
            "Answer events (token, reasoning, tool_call) written to clients.",
            ["transport", "model"],
            registry=registry,
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects_total",
            "Streams whose client left before the end.",
            ["transport"],
            registry=registry,
        )
        self.upstream_requests = Counter(
            "gateway_upstream_requests_total",
            "Upstream requests (each retry and fallback counts) by result: the upstream's "
            "HTTP status, or connect_error, timeout, stream_error (failed after 200), cancelled.",
            ["provider", "model", "status"],
            registry=registry,
        )
        self.upstream_ttft = Histogram(
            "gateway_upstream_time_to_first_token_seconds",
            "From sending the upstream request to its first text delta.",
            ["provider", "model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.upstream_cancellations = Counter(
            "gateway_upstream_cancellations_total",
            "Upstream requests stopped before their end (client gone, cancel, shutdown).",
            ["provider"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited_total",
            "Requests refused by a limit.",
            ["limit"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures_total",
            "Requests refused by auth.",
            ["reason"],
            registry=registry,
        )
        self.resumes = Counter(
            "gateway_resumes_total",
            "Streams that attached to an existing generation (resume or attach).",
            ["transport"],
            registry=registry,
        )
        self.inter_token = GapHistogram(
            "gateway_inter_token_latency_seconds",
            "Gaps between successive writes of tokens to one client.",
            "transport",
            TRANSPORTS,
            INTER_TOKEN_BUCKETS,
        )
        registry.register(self.inter_token)
        self.rate_limit_backend_errors = Counter(
            "gateway_rate_limit_backend_errors_total",
            "Rate-limit backend (Redis) calls that failed; fail_open decides what followed.",
            registry=registry,
        )
        self.rate_limit_degraded = Gauge(
            "gateway_rate_limit_degraded",
            "1 while the rate-limit backend (Redis) is unreachable and this replica enforces "
            "the limits from its own memory (fail_open).",
            registry=registry,
        )
        self.streams_limit = Gauge(
            "gateway_streams_limit",
            "The cap on concurrent streams per replica: server.max_streams, or what the "
            "open-files limit allows if lower (0: none).",
            registry=registry,
        )
        self.generations = Counter(
            "gateway_generations_total",
            "Generations by model and how they ended: finish reason, or error.",
            ["model", "finish_reason"],
            registry=registry,
        )
        self.tool_calls = Counter(
            "gateway_tool_calls_total",
            "Function calls the models made; arguments: valid or invalid (not a JSON object).",
            ["model", "arguments"],
            registry=registry,
        )
        self.reasoning_tokens = Counter(
            "gateway_reasoning_tokens_total",
            "Reasoning events (the models' visible thinking) appended to generation logs.",
            ["model"],
            registry=registry,
        )
        self._transports = {t: self._transport_children(t) for t in TRANSPORTS}
        self._streams: dict[tuple[str, str], StreamChildren] = {}
        self._upstreams: dict[tuple[str, str], UpstreamChildren] = {}
        #: (model, finish reason or arguments) -> child; `.labels()` takes a lock per call.
        self._generations: dict[tuple[str, ...], Counter] = {}
        self._tool_calls: dict[tuple[str, ...], Counter] = {}
        self._reasoning: dict[tuple[str, ...], Counter] = {}
        self._limits = {name: self.rate_limited.labels(name) for name in LIMITS}
        self._auth = {name: self.auth_failures.labels(name) for name in AUTH_REASONS}
        self._auth_other = self.auth_failures.labels("other")
        for model, provider in models:
            for transport in TRANSPORTS:
                self.stream(transport, model)
            self.upstream(provider, model)
            for finish in FINISHES:
                _child(self._generations, (model, finish), self.generations)
            for arguments in ARGUMENTS:
                _child(self._tool_calls, (model, arguments), self.tool_calls)
            _child(self._reasoning, (model,), self.reasoning_tokens)

    def generation_ended(
        self, model: str, finish: str, arguments: Iterable[bool], reasoning: int
    ) -> None:
        """Once per generation: how it ended, its tool calls (argument validity), its thinking."""
        if not self.enabled:
            return
        finish = finish if finish in FINISHES else "stop"
        _child(self._generations, (model, finish), self.generations).inc()
        for valid in arguments:
            kind = "valid" if valid else "invalid"
            _child(self._tool_calls, (model, kind), self.tool_calls).inc()
        if reasoning:
            _child(self._reasoning, (model,), self.reasoning_tokens).inc(reasoning)

    def _transport_children(self, transport: str) -> TransportChildren:
        return TransportChildren(
            active=self.streams_active.labels(transport),
            outcomes={o: self.streams.labels(transport, o) for o in OUTCOMES},
            duration=self.stream_duration.labels(transport),
            disconnects=self.client_disconnects.labels(transport),
            resumes=self.resumes.labels(transport),
            inter_token=self.inter_token.children[transport],
        )

    def stream(self, transport: Transport, model: str) -> StreamChildren:
        """Children for a stream; `model` must be a configured model name."""
        key = (transport, model)
        children = self._streams.get(key)
        if children is None:
            children = self._streams[key] = StreamChildren(
                self._transports[transport],
                self.ttft.labels(transport, model),
                self.tokens.labels(transport, model),
            )
        return children

    def upstream(self, provider: str, model: str) -> UpstreamChildren:
        key = (provider, model)
        children = self._upstreams.get(key)
        if children is None:
            children = self._upstreams[key] = UpstreamChildren(
                provider,
                model,
                self.upstream_ttft.labels(provider, model),
                self.upstream_cancellations.labels(provider),
                self.upstream_requests,
                {},
            )
            children.request("200")
        return children

    def refused(self, limit: str) -> None:
        if self.enabled:
            self._limits.get(limit, self._limits["backend_unavailable"]).inc()

    def auth_failed(self, reason: str) -> None:
        if self.enabled:
            self._auth.get(reason, self._auth_other).inc()

    def http_request(self, route: str, method: str, status: int) -> None:
        if not self.enabled:
            return
        key = (route, method if method in METHODS else "OTHER", status)
        child = self._http_children.get(key)
        if child is None:  # a bounded set: route patterns x methods x statuses
            child = self._http_children[key] = self.http_requests.labels(
                key[0], key[1], str(status)
            )
        child.inc()
