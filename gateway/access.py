"""The access middleware: browser origin checks, CORS, and who is calling.

Order matters: the origin is judged before the credential, so a page on a
foreign site cannot use a visitor's cookie to start generations (CSRF) or open
a WebSocket (cross-site WebSocket hijacking: WebSockets are exempt from CORS and the
browser attaches cookies); aiohttp checks neither.
Non-browser clients send no `Origin` and are judged by their credential alone.

Two more browser edges:

- DNS rebinding. An anonymous gateway (loopback only) has no credential to
  stop a page whose name the attacker re-points at 127.0.0.1: the browser
  then calls it same-origin. Such a page can only name itself in `Host`, so an
  anonymous gateway answers only loopback names (`localhost`, `127.0.0.1`,
  `[::1]`, any port), except the probes, which must answer a kubelet by IP.
- `server.allowed_origins: ["*"]` lets any page call with a credential of its
  own (a bearer, a ticket), never with the visitor's ambient one: such origins
  get `Access-Control-Allow-Origin: *` without `Allow-Credentials`, and their
  cookie is not read (a WebSocket or a simple `POST` would carry it whatever
  CORS says). Same-origin and listed origins keep credentials.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
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

#: No credential, no limit, any `Host`: probes and scrapers must always get through.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: `cors_origin_key` for an origin admitted only by `"*"`: CORS without credentials.
ANY_ORIGIN = "*"
_ALLOWED_HEADERS = "Authorization, Content-Type, Accept, Last-Event-ID, X-Request-ID"
_EXPOSED_HEADERS = (
    "X-Request-ID, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset"
)
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]+))(?::[0-9]{0,5})?")


class ForbiddenHost(Forbidden):
    """A `Host` an anonymous gateway does not answer (DNS rebinding)."""


def is_open(path: str) -> bool:
    """No credential needed: the probes, the demo page and its files."""
    return path in PROBE_PATHS or path == "/" or path.startswith("/static/")


@functools.lru_cache(maxsize=256)
def is_loopback_host(host: str) -> bool:
    """`localhost`, a loopback IPv4 address or a bracketed loopback IPv6 one, any port.

    Cached: `ipaddress` parses in Python, 3 % of a stream start's CPU (py-spy,
    bench `starts`), and a replica sees few distinct `Host` values; a client
    sending many only cycles the bounded cache.
    """
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    if match["v6"] is not None:
        try:
            return ipaddress.IPv6Address(match["v6"]).is_loopback
        except ValueError:
            return False
    name = match["name"].lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def same_origin(origin: str, host: str) -> bool:
    """The page came from us: its origin names the `Host` we were reached by."""
    return urlsplit(origin).netloc.lower() == host.lower()


def _preflight(origin: str) -> web.Response:
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": _ALLOWED_HEADERS,
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }
    if origin != ANY_ORIGIN:
        headers["Access-Control-Allow-Credentials"] = "true"
    return web.Response(status=204, headers=headers)


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PROBE_PATHS:
        return await handler(request)
    try:
        _check_host(request)
        if not is_open(request.path):
            await _admit(request)
    except ForbiddenHost:
        request.app[metrics_key].auth_failed("forbidden_host")
        raise
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


def _check_host(request: web.Request) -> None:
    """An anonymous gateway answers loopback names only (no `Host`, no browser)."""
    if not request.app[settings_key].auth.anonymous:
        return
    host = request.headers.get("Host")
    if host and not is_loopback_host(host):
        raise ForbiddenHost(
            f"host {host[:200]!r} is refused: a gateway with anonymous access answers "
            "only localhost, 127.0.0.1 and [::1] (DNS rebinding)"
        )


async def _admit(request: web.Request) -> None:
    """Judge the origin, then the credential; sets the principal (or raises)."""
    cookies: Mapping[str, str] = request.cookies
    origin = request.headers.get("Origin")
    if origin is not None:
        allowed = request.app[settings_key].server.allowed_origins
        if origin in allowed or same_origin(origin, request.host):
            request[cors_origin_key] = origin
        elif "*" in allowed:
            # Any page may call with its own credential, never the visitor's cookie.
            request[cors_origin_key] = ANY_ORIGIN
            cookies = {}
        else:
            raise Forbidden(
                f"origin {origin[:200]!r} is not allowed; list it in server.allowed_origins"
            )
        if request.method == "OPTIONS" and _is_preflight(request):
            return
    authenticator = request.app[authenticator_key]
    token = authenticator.credential(
        request.method, request.path, request.headers, request.query, cookies
    )
    request[principal_key] = await authenticator.authenticate(
        token, request.remote, request.headers.get("X-Forwarded-For")
    )


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: streams prepare their own responses, so headers go here."""
    origin = request.get(cors_origin_key)
    if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = origin
        if origin != ANY_ORIGIN:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = _EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"
