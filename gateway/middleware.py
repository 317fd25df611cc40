"""Middleware shared by every route: request ids and the one error shape.

Before a response is prepared every failure becomes an HTTP status with
OpenAI's error body; after it, transports report failures as `error` events
themselves, so this layer never touches a stream that has started.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from gateway.errors import GatewayError, UrlTooLong, error_body
from gateway.keys import request_get, request_id_key, started_response_key

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: A client's id is echoed only if harmless: no header or log-line injection.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

#: The longest URL (path and query) served; longer ones get a JSON 414. aiohttp
#: reads request lines up to `READ_LINE_BYTES` (`gateway serve`), so that
#: this check, not its parser's plain-text 400, answers the usual offenders:
#: a chat history or a long prompt put in a GET query.
MAX_URL_BYTES = 8190
READ_LINE_BYTES = 64 * 1024

_HTTP_CODES: dict[int, str] = {
    400: "invalid_request",
    401: "unauthorized",
    404: "invalid_request",
    405: "invalid_request",
    413: "invalid_request",
    414: "invalid_request",
    429: "rate_limited",
    503: "shutting_down",
}


def json_response(
    data: object, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(error_body(code, message), status=status, headers=headers)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take a safe `X-Request-ID` or make one (echoed by `echo_request_id`)."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if _SAFE_REQUEST_ID.match(given) else secrets.token_hex(8)
    request[request_id_key] = request_id
    return await handler(request)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: runs for streams too, just before their headers go out."""
    request[started_response_key] = response
    request_id = request.get(request_id_key)
    if request_id is not None:
        response.headers["X-Request-ID"] = request_id


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn exceptions raised before streaming into OpenAI-shaped HTTP errors.

    After a response's headers went out, a second response would be written
    inside the first one's body (aiohttp does not refuse it; clients report a
    protocol error), so whatever raises then, the started response is ended
    instead: transports send failures as `error` events, this is the backstop.
    """
    try:
        return await _answer(request, handler)
    except Exception:
        started = request_get(request, started_response_key)
        if started is None:
            raise
        log.exception(
            "failure after the response started", extra={"request_id": request.get(request_id_key)}
        )
        return started


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if len(request.raw_path) > MAX_URL_BYTES:
            raise UrlTooLong(
                f"the URL is over {MAX_URL_BYTES} bytes: send the request as a JSON body"
                " (POST), not in the query"
            )
        return await handler(request)
    except GatewayError as exc:
        if request.get(started_response_key) is not None:
            raise
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400 or request.get(started_response_key) is not None:
            raise
        code = _HTTP_CODES.get(
            exc.status, "internal_error" if exc.status >= 500 else "invalid_request"
        )
        headers = {k: v for k, v in exc.headers.items() if k.lower() in {"allow", "retry-after"}}
        return error_response(exc.status, code, exc.reason or "error", headers)
    except Exception:
        if request.get(started_response_key) is not None:
            raise
        log.exception("unhandled error", extra={"request_id": request.get(request_id_key)})
        return error_response(500, "internal_error", "internal error")
