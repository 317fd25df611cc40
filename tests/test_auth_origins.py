"""Browser safety on an in-process gateway: the WebSocket's `Origin` check, a foreign
page's POST, and CORS for the origins in `server.allowed_origins`. DNS rebinding and
`allowed_origins: ["*"]` are in tests/test_browser_origins.py."""

from __future__ import annotations

import orjson

from tests.auth_helpers import BODY, CLOSED, KEY_A, assert_unauthorized, generate_message, mint
from tests.conftest import StartGateway
from tests.helpers import bearer, fetch, preflight, ws_exchange, ws_refusal

APP_ORIGIN = "https://app.example"


async def test_websocket_origin_is_checked(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED, server={"allowed_origins": [APP_ORIGIN]})
    own = f"http://127.0.0.1:{server.port}"
    ticket = {"access_token": (await mint(server, bearer(KEY_A)))["ticket"]}
    for origin in (
        "https://evil.example",
        f"http://127.0.0.1:{server.port + 1}",
        "null",
        "https://app.example.evil.example",
    ):
        assert await ws_refusal(server, headers=bearer(KEY_A), origin=origin) == 403, origin
        # A query ticket (what a browser would use) does not help either.
        assert await ws_refusal(server, query=ticket, origin=origin) == 403, origin
    for allowed in (own, APP_ORIGIN, None):
        frames = await ws_exchange(server, generate_message(), query=ticket, origin=allowed)
        assert frames[-1]["type"] == "done", allowed


async def test_post_from_a_foreign_origin_is_403(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED)
    status, headers, raw = await fetch(
        server,
        "POST",
        "/v1/stream/chunked",
        headers={**bearer(KEY_A), "Origin": "https://evil.example"},
        body=BODY,
    )
    assert status == 403, raw
    assert orjson.loads(raw)["error"]["code"] == "unauthorized"
    assert "Access-Control-Allow-Origin" not in headers
    status, _, raw = await fetch(
        server,
        "POST",
        "/v1/stream/chunked",
        headers={**bearer(KEY_A), "Origin": f"http://127.0.0.1:{server.port}"},
        body=BODY,
    )
    assert status == 200, raw


async def test_cors_preflight_and_cross_origin_response(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED, server={"allowed_origins": [APP_ORIGIN]})
    ask = preflight(APP_ORIGIN)
    status, headers, _ = await fetch(server, "OPTIONS", "/v1/stream/chunked", headers=ask)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "Origin" in headers.get("Vary", "")

    foreign = preflight("https://evil.example")
    status, headers, _ = await fetch(server, "OPTIONS", "/v1/stream/chunked", headers=foreign)
    assert status == 403
    assert "Access-Control-Allow-Origin" not in headers

    cross = {**bearer(KEY_A), "Origin": APP_ORIGIN, "X-Request-ID": "req-42"}
    status, headers, raw = await fetch(
        server, "POST", "/v1/stream/chunked", headers=cross, body=BODY
    )
    assert status == 200, raw
    assert headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    exposed = [h.strip() for h in headers["Access-Control-Expose-Headers"].split(",")]
    assert "X-Request-ID" in exposed
    assert headers["X-Request-ID"] == "req-42"
    # A refusal is readable by the allowed page too (so it can tell the user why).
    status, headers, raw = await fetch(
        server, "POST", "/v1/stream/chunked", headers={"Origin": APP_ORIGIN}, body=BODY
    )
    assert_unauthorized(status, headers, raw)
    assert headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    # No Origin, no CORS headers.
    status, headers, _ = await fetch(
        server, "POST", "/v1/stream/chunked", headers=bearer(KEY_A), body=BODY
    )
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
