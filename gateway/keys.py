"""Every typed key for state shared through the application and requests."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol, TypeVar, overload

from aiohttp import web

from gateway.auth import ANONYMOUS_ID, Authenticator, Principal
from gateway.catalog import ModelCatalog
from gateway.chat_index import ChatIndex
from gateway.config import Limits, Settings
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.registry import GenerationRegistry
from gateway.shared_log import SharedLog
from gateway.shedding import RetryAfterEstimate


@dataclass(slots=True)
class Lifecycle:
    """Process-wide serving state; `draining` flips on SIGTERM."""

    draining: bool = False


class OpenSocket(Protocol):
    """What the drain needs of a WebSocket session."""

    async def close_for_restart(self) -> None: ...


settings_key = web.AppKey("settings", Settings)
catalog_key = web.AppKey("catalog", ModelCatalog)
registry_key = web.AppKey("registry", GenerationRegistry)
lifecycle_key = web.AppKey("lifecycle", Lifecycle)
#: The Retry-After of `server.max_streams` refusals, estimated from the load.
retry_after_key = web.AppKey("retry_after", RetryAfterEstimate)
#: Streams this replica takes: `server.max_streams`, or fewer if open files run short; 0: no cap.
stream_cap_key = web.AppKey("stream_cap", int)
authenticator_key = web.AppKey("authenticator", Authenticator)
limiter_key = web.AppKey("limiter", RateLimiter)
metrics_key = web.AppKey("metrics", GatewayMetrics)
#: Only with `streams.backend: redis`.
shared_log_key = web.AppKey("shared_log", SharedLog)
#: Each chat's latest generation, for `useChat`'s reconnects (memory, or Redis).
chat_index_key = web.AppKey("chat_index", ChatIndex)
#: Open WebSocket sessions, closed with 1012 at the end of a drain.
websockets_key: web.AppKey[set[OpenSocket]] = web.AppKey("websockets")
#: Open WebSockets per principal's rate key (`streams.max_sockets_per_principal`).
socket_counts_key: web.AppKey[Counter[str]] = web.AppKey("socket_counts")

#: The response whose headers went out (set just before they do): after it, a
#: failure can no longer be an HTTP error.
started_response_key = web.RequestKey("started_response", web.StreamResponse)
#: Who is calling, set by the access middleware on every non-open route.
principal_key = web.RequestKey("principal", Principal)
request_id_key = web.RequestKey("request_id", str)
#: The allowed cross-origin `Origin` of this request, for the CORS headers.
cors_origin_key = web.RequestKey("cors_origin", str)

#: Only for code paths that run without the access middleware (never in `create_app`).
_NOBODY = Principal(ANONYMOUS_ID, "anonymous", Limits(), ANONYMOUS_ID)


_T = TypeVar("_T")
_D = TypeVar("_D")


@overload
def request_get(request: web.Request, key: web.RequestKey[_T]) -> _T | None: ...
@overload
def request_get(request: web.Request, key: web.RequestKey[_T], default: _D) -> _T | _D: ...
def request_get(request: web.Request, key: web.RequestKey[_T], default: object = None) -> object:
    """`request.get(key, default)`, typed by the key: aiohttp types only
    `Request.__getitem__` by `RequestKey`; its inherited `get` returns `Any`."""
    try:
        return request[key]
    except KeyError:
        return default


def principal(request: web.Request) -> Principal:
    return request_get(request, principal_key, _NOBODY)


def principal_of(request: web.Request) -> str:
    """The id that owns generations: `key:<id>`, `sub:<jwt sub>` (`jwt:sha256:<hex>` for
    a `sub` over 128 characters), or `anonymous`."""
    return principal(request).id
