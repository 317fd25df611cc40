"""Graceful drain on SIGTERM: stop taking streams, let running ones finish, then end them.

Kubernetes sends SIGTERM after the pod's `preStop` pause; from then on
`/readyz` answers 503 (endpoints drop us) and new streams get 503 with
`Retry-After`, while the listening socket stays open so those answers reach
clients. Running generations get `server.shutdown_grace_s` to finish; the
rest end with a retryable `shutting_down` error on their own transport, and
WebSockets are closed with 1012 (service restart). A second signal skips
what is left of the grace.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.errors import ShuttingDown
from gateway.keys import lifecycle_key, registry_key, websockets_key

log = logging.getLogger(__name__)

#: How long WebSockets get to flush their last frames and complete the close handshake.
CLOSE_BUDGET_S = 0.5


async def drain(app: web.Application, grace_s: float, urgent: asyncio.Event) -> None:
    """Refuse new streams, wait up to `grace_s` for running ones, then stop the rest."""
    app[lifecycle_key].draining = True
    registry = app[registry_key]
    log.info("draining", extra={"running": registry.running, "grace_s": grace_s})
    waits = [asyncio.ensure_future(registry.wait_idle()), asyncio.ensure_future(urgent.wait())]
    await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    if registry.running:
        log.info("grace over; ending running streams", extra={"running": registry.running})
    stop_streams(app)
    await close_websockets(app, 0 if urgent.is_set() else CLOSE_BUDGET_S)


def stop_streams(app: web.Application) -> None:
    """End what still runs with a retryable `shutting_down` (idempotent)."""
    app[lifecycle_key].draining = True
    app[registry_key].stop_all(ShuttingDown("server is shutting down; resume or retry elsewhere"))


async def close_websockets(app: web.Application, budget_s: float) -> None:
    """Let each socket's forwarders write their terminal frames, then close with 1012;
    whatever has not closed within `budget_s` is cut when the server stops."""
    # Two steps: inside list(), mypy would infer the key's type from list's Iterable argument.
    open_sockets = app[websockets_key]
    sockets = list(open_sockets)
    if not sockets:
        return
    closes = [asyncio.ensure_future(s.close_for_restart()) for s in sockets]
    _, pending = await asyncio.wait(closes, timeout=max(budget_s, 0.05))
    for close in pending:
        close.cancel()
