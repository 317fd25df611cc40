"""Every typed key for state shared through the application and requests."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.catalog import ModelCatalog
from gateway.config import Settings
from gateway.registry import GenerationRegistry


@dataclass(slots=True)
class Lifecycle:
    """Process-wide serving state; `draining` flips on SIGTERM."""

    draining: bool = False


settings_key = web.AppKey("settings", Settings)
catalog_key = web.AppKey("catalog", ModelCatalog)
registry_key = web.AppKey("registry", GenerationRegistry)
lifecycle_key = web.AppKey("lifecycle", Lifecycle)

#: Who is calling: an API key id, a JWT `sub`, or `anonymous`.
principal_key = web.RequestKey("principal", str)
request_id_key = web.RequestKey("request_id", str)

ANONYMOUS = "anonymous"


def principal_of(request: web.Request) -> str:
    return request.get(principal_key, ANONYMOUS)
