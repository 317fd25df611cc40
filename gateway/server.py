"""Running the app: uvloop, handler cancellation, and the shutdown budget."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings

log = logging.getLogger(__name__)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is Linux-only in our dependencies
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT.

    `handler_cancellation=True`: a client that disconnects cancels its
    handler at once, even while it waits for the upstream's first token
    (NOTES §1); the tests run with the same setting.
    """
    log.info("serving", extra={"host": settings.server.host, "port": settings.server.port})
    web.run_app(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        handler_cancellation=True,
        shutdown_timeout=settings.server.shutdown_grace_s,
        access_log=None,
        print=None,
        loop=new_event_loop(),
    )
