"""The access middleware: browser origin checks, CORS, and who is calling.

Order matters: the origin is judged before the credential, so a page on a
foreign site cannot use a visitor's cookie to start generations (CSRF) or open
a WebSocket (cross-site WebSocket hijacking, NOTES §9); aiohttp checks neither.
Non-browser clients send no `Origin` and are judged by their credential alone.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from gateway.auth import Forbidden, Unauthorized
from gateway.keys import (
    authenticator_key,
    cors_origin_key,
    metrics_key,
    principal_key,
    settings_key,
)
from gateway.middleware import Handler

#: No credential and no limit: probes and scrapers must always get through.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_ALLOWED_HEADERS = "Authorization, Content-Type, Accept, Last-Event-ID, X-Request-ID"
_EXPOSED_HEADERS = (
    "X-Request-ID, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset"
)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path == "/" or path.startswith("/static/")


def origin_allowed(origin: str, host: str, allowed: tuple[str, ...]) -> bool:
    """Same origin (the page came from us), or listed in `server.allowed_origins`."""
    if "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc.lower() == host.lower()


def _preflight(origin: str) -> web.Response:
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": _ALLOWED_HEADERS,
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if is_open(request.path):
        return await handler(request)
    try:
        await _admit(request)
    except Unauthorized as exc:
        request.app[metrics_key].auth_failed(exc.reason)
        raise
    except Forbidden:
        request.app[metrics_key].auth_failed("forbidden_origin")
        raise
    if request.method == "OPTIONS" and cors_origin_key in request and _is_preflight(request):
        return _preflight(request[cors_origin_key])
    return await handler(request)


def _is_preflight(request: web.Request) -> bool:
    return "Access-Control-Request-Method" in request.headers


async def _admit(request: web.Request) -> None:
    """Judge the origin, then the credential; sets the principal (or raises)."""
    origin = request.headers.get("Origin")
    if origin is not None:
        allowed = request.app[settings_key].server.allowed_origins
        if not origin_allowed(origin, request.host, allowed):
            raise Forbidden(
                f"origin {origin[:200]!r} is not allowed; list it in server.allowed_origins"
            )
        request[cors_origin_key] = origin
        if request.method == "OPTIONS" and _is_preflight(request):
            return
    authenticator = request.app[authenticator_key]
    token = authenticator.credential(
        request.method, request.path, request.headers, request.query, request.cookies
    )
    request[principal_key] = await authenticator.authenticate(
        token, request.remote, request.headers.get("X-Forwarded-For")
    )


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: streams prepare their own responses, so headers go here."""
    origin = request.get(cors_origin_key)
    if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = _EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"
