"""`create_app(settings)`: routes, middleware and resource lifecycles."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from gateway.access import access_middleware, add_cors_headers
from gateway.access_log import observe_middleware, record_status
from gateway.auth import Authenticator
from gateway.catalog import ModelCatalog
from gateway.chat_index import MemoryChatIndex, RedisChatIndex
from gateway.config import Settings
from gateway.drain import CLOSE_BUDGET_S, close_websockets, stop_streams
from gateway.health import get_healthz, get_model, get_readyz, list_models
from gateway.keys import (
    Lifecycle,
    authenticator_key,
    catalog_key,
    chat_index_key,
    lifecycle_key,
    limiter_key,
    metrics_key,
    registry_key,
    retry_after_key,
    settings_key,
    shared_log_key,
    socket_counts_key,
    stream_cap_key,
    websockets_key,
)
from gateway.metrics import GatewayMetrics
from gateway.metrics_http import add_metrics_route
from gateway.middleware import echo_request_id, error_middleware, request_id_middleware
from gateway.ratelimit import make_limiter
from gateway.registry import GenerationRegistry
from gateway.shared_log import SharedLog
from gateway.shedding import RetryAfterEstimate, open_files_stream_cap, stream_cap
from gateway.static_routes import add_static_routes
from gateway.stream_tracker import observe_generation
from gateway.tickets import create_ticket
from gateway.transports.chunked import stream_chunked
from gateway.transports.generations import (
    create_generation,
    delete_generation,
    generation_events,
    generation_status,
)
from gateway.transports.openai_compat import chat_completions
from gateway.transports.sse import stream_sse
from gateway.transports.ui_stream import resume_ui, stop_ui, stream_ui
from gateway.transports.websocket import stream_ws


async def catalog_ctx(app: web.Application) -> AsyncIterator[None]:
    app[catalog_key] = ModelCatalog(app[settings_key], app[metrics_key])
    yield
    await app[catalog_key].aclose()


async def limiter_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    limiter = app[limiter_key] = make_limiter(settings.rate_limit, settings.redis.url)
    metrics = app[metrics_key]
    limiter.on_refused.append(metrics.refused)
    limiter.on_backend_error.append(metrics.rate_limit_backend_errors.inc)
    limiter.on_degraded.append(metrics.rate_limit_degraded.set)
    limiter.start()
    yield
    await limiter.aclose()


async def authenticator_ctx(app: web.Application) -> AsyncIterator[None]:
    """Closes what the authenticator holds open (the spent tickets' Redis pool)."""
    yield
    await app[authenticator_key].aclose()


async def registry_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    shared_log = None
    if settings.streams.backend == "redis":
        shared_log = app[shared_log_key] = SharedLog(settings.redis.url, settings.streams)
        shared_log.start()
    metrics = app[metrics_key]
    on_ended = partial(observe_generation, metrics) if metrics.enabled else None
    app[registry_key] = GenerationRegistry(settings.streams, shared_log, on_ended)
    app[chat_index_key] = (
        MemoryChatIndex() if shared_log is None else RedisChatIndex(shared_log.control)
    )
    yield
    await app[registry_key].aclose()
    if shared_log is not None:
        await shared_log.aclose()  # after the registry: the last terminal events are flushed


async def stop_generations_on_shutdown(app: web.Application) -> None:
    """Whatever stops the app (a drain has usually done this already): end what still runs."""
    stop_streams(app)
    await close_websockets(app, CLOSE_BUDGET_S)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/readyz", get_readyz)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/stream/chunked", stream_chunked)
    app.router.add_route("GET", "/v1/stream/sse", stream_sse)
    app.router.add_route("POST", "/v1/stream/sse", stream_sse)
    app.router.add_get("/v1/stream/ws", stream_ws)
    app.router.add_post("/v1/generations", create_generation)
    app.router.add_get("/v1/generations/{generation_id}/events", generation_events)
    app.router.add_get("/v1/generations/{generation_id}", generation_status)
    app.router.add_delete("/v1/generations/{generation_id}", delete_generation)
    app.router.add_post("/v1/stream/ui", stream_ui)
    app.router.add_get("/v1/stream/ui/{chat_id}/stream", resume_ui)
    app.router.add_delete("/v1/stream/ui/{chat_id}/stream", stop_ui)
    app.router.add_post("/v1/tickets", create_ticket)
    add_static_routes(app)


def new_metrics(settings: Settings, cap: int) -> GatewayMetrics:
    metrics = GatewayMetrics(
        ((m.name, m.provider) for m in settings.models),
        enabled=settings.server.metrics_enabled,
    )
    metrics.streams_limit.set(cap)
    return metrics


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[
            observe_middleware,
            request_id_middleware,
            error_middleware,
            access_middleware,
        ],
        client_max_size=settings.server.max_body_bytes,
    )
    app.on_response_prepare.append(echo_request_id)
    app.on_response_prepare.append(record_status)
    app.on_response_prepare.append(add_cors_headers)
    app[settings_key] = settings
    app[authenticator_key] = Authenticator(settings)
    app[lifecycle_key] = Lifecycle()
    app[retry_after_key] = RetryAfterEstimate()
    app[stream_cap_key] = cap = stream_cap(settings.server.max_streams, open_files_stream_cap())
    app[websockets_key] = set()
    app[socket_counts_key] = Counter()
    app[metrics_key] = new_metrics(settings, cap)
    add_routes(app)
    add_metrics_route(app)
    # Torn down in reverse: generations stop (releasing their leases) before
    # the limiter and the providers close.
    app.cleanup_ctx.append(authenticator_ctx)
    app.cleanup_ctx.append(catalog_ctx)
    app.cleanup_ctx.append(limiter_ctx)
    app.cleanup_ctx.append(registry_ctx)
    app.on_shutdown.append(stop_generations_on_shutdown)
    return app
