"""Liveness, readiness and the model list: open routes, no credential needed."""

from __future__ import annotations

from aiohttp import web

from gateway.keys import catalog_key, lifecycle_key
from gateway.middleware import error_response, json_response


async def get_healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def get_readyz(request: web.Request) -> web.Response:
    """503 while draining, so load balancers stop sending new streams here."""
    if request.app[lifecycle_key].draining:
        return error_response(503, "shutting_down", "draining", {"Retry-After": "1"})
    return json_response({"status": "ready"})


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models in OpenAI's shape."""
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "gateway"}
        for name in request.app[catalog_key].names
    ]
    return json_response({"object": "list", "data": data})
