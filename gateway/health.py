"""Liveness and readiness (open routes, no credential needed), and the models served
(`/v1/models`, which needs the same credential as the streams)."""

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


def model_object(name: str) -> dict[str, object]:
    """OpenAI's model object (`created` 0: a configured name has no creation date)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "gateway"}


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models in OpenAI's shape."""
    return json_response(
        {"object": "list", "data": [model_object(n) for n in request.app[catalog_key].names]}
    )


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model_id}: what OpenAI SDKs' `models.retrieve` asks; 404
    `model_not_found` for a name not served here, as a generation would get."""
    entry = request.app[catalog_key].resolve(request.match_info["model_id"])
    return json_response(model_object(entry.settings.name))
