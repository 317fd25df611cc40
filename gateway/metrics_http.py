"""`GET /metrics`, on the main port or on `server.metrics_port` (then not public).

The exposition is rendered in a worker thread: it is synchronous and takes
milliseconds, which would otherwise stall every stream on the loop
(`generate_latest` costs about 6-9 µs a line).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.keys import metrics_key, settings_key


async def get_metrics(request: web.Request) -> web.Response:
    registry = request.app[metrics_key].registry
    body = await asyncio.to_thread(generate_latest, registry)
    response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
    response.enable_compression()
    return response


def metrics_app(parent: web.Application) -> web.Application:
    """A bare app that serves only `/metrics` for `parent`'s registry."""
    app = web.Application()
    app[metrics_key] = parent[metrics_key]
    app.router.add_get("/metrics", get_metrics)
    return app


async def metrics_port_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serve `/metrics` on `server.metrics_port` for the app's lifetime."""
    server = app[settings_key].server
    runner = web.AppRunner(metrics_app(app), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.metrics_port)
    await site.start()
    yield
    await runner.cleanup()


def add_metrics_route(app: web.Application) -> None:
    """On the main port unless `server.metrics_port` moves it; nowhere when disabled."""
    settings = app[settings_key]
    if not settings.server.metrics_enabled:
        return
    if settings.server.metrics_port is None:
        app.router.add_get("/metrics", get_metrics)
    else:
        app.cleanup_ctx.append(metrics_port_ctx)
