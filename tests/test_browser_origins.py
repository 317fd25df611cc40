"""Browser edge cases, against a real `gateway serve` process.

- DNS rebinding: a page on `evil.example` whose name the attacker re-points at
  127.0.0.1 calls an anonymous loopback gateway "same origin" (its `Origin`
  and `Host` agree). It can only name itself in `Host`, so an anonymous
  gateway answers loopback names only; the probes answer any `Host`.
- `server.allowed_origins: ["*"]`: any page may call with a credential of its
  own, never with the visitor's cookie, and never gets
  `Access-Control-Allow-Credentials: true`. Listed origins keep credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.auth_helpers import key_config
from tests.gateway_process import NO_LIMITS, GatewayProcess, start_gateway_process
from tests.helpers import bearer, fetch, preflight, raw_exchange, ws_exchange, ws_refusal
from tests.redis_server import free_port

MODEL = {"name": "sim-1", "provider": "simulated", "first_token_ms": 5, "tokens_per_second": 2000}
BODY = {"prompt": "Tell me about caching.", "max_tokens": 5, "seed": 1}
CHAT = {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
KEY = "gw_browser_origins_test_key"
COOKIE = "gw_session"
LISTED = "https://listed.example"
ANY = "https://any.example"

StartGateway = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    started: list[GatewayProcess] = []

    async def start(**sections: Any) -> GatewayProcess:
        config = {
            "models": [MODEL],
            "rate_limit": {"default": NO_LIMITS},
            **sections,
            "server": {"port": free_port(), **sections.get("server", {})},
        }
        started.append(await start_gateway_process(config, tmp_path))
        return started[-1]

    yield start
    for gateway in started:
        await gateway.stop()


GENERATE = {"type": "generate", "request_id": "r", **BODY}


def assert_refused_host(status: int, headers: Any, raw: bytes, what: str) -> None:
    """403 with the contract's error body, and nothing a page could read cross-origin."""
    assert status == 403, (what, status, raw[:300])
    assert headers["Content-Type"].startswith("application/json"), what
    error = orjson.loads(raw)["error"]
    assert error["code"] == "unauthorized" and error["type"] == "authentication_error", what
    assert "host" in error["message"], what
    assert "Access-Control-Allow-Origin" not in headers, what


# -- DNS rebinding ------------------------------------------------------------------

#: What a rebinding page sends: its own name in `Host`, and the matching `Origin`.
REBOUND_HOSTS = [
    "evil.example",
    "evil.example:{port}",
    "127.0.0.1.evil.example:{port}",
    "localhost.evil.example:{port}",
    "evil-localhost:{port}",
    "0.0.0.0:{port}",
    "192.168.1.10:{port}",
    "[::ffff:7f00:1]:{port}",
]
LOOPBACK_HOSTS = [
    "127.0.0.1:{port}",
    "127.0.0.1",
    "localhost:{port}",
    "LocalHost:{port}",
    "localhost",
    "[::1]:{port}",
    "[::1]",
]
#: Every kind of route (API, streams, pages, an unknown path) and its status from
#: a loopback name. (The WebSocket is tried on its own.)
ROUTES: list[tuple[str, str, dict[str, Any] | None, int]] = [
    ("POST", "/v1/stream/chunked", BODY, 200),
    ("GET", "/v1/stream/sse?prompt=hi&max_tokens=3", None, 200),
    ("POST", "/v1/chat/completions", CHAT, 200),
    ("GET", "/v1/models", None, 200),
    ("POST", "/v1/generations", BODY, 201),
    ("POST", "/v1/tickets", {}, 401),  # anonymous callers get no tickets
    ("GET", "/", None, 200),
    ("GET", "/static/gateway-client.js", None, 200),
    ("GET", "/no/such/route", None, 404),
]


async def test_an_anonymous_gateway_answers_only_loopback_names(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway()  # the default: anonymous, on 127.0.0.1
    for template in REBOUND_HOSTS:
        host = template.format(port=gateway.port)
        page = {"Host": host, "Origin": f"http://{host}"}
        for method, path, body, _ in ROUTES:
            status, headers, raw = await fetch(gateway, method, path, headers=page, body=body)
            assert_refused_host(status, headers, raw, f"{host} {method} {path}")
        # The preflight of a cross-origin call, too.
        asked = {**page, "Access-Control-Request-Method": "POST"}
        status, headers, raw = await fetch(gateway, "OPTIONS", "/v1/stream/chunked", headers=asked)
        assert_refused_host(status, headers, raw, f"{host} OPTIONS")
        assert await ws_refusal(gateway, headers=page) == 403, host
        # Probes answer whatever the Host (a kubelet probes by IP).
        for probe in ("/healthz", "/readyz", "/metrics"):
            status, _, raw = await fetch(gateway, "GET", probe, headers={"Host": host})
            assert status == 200, (host, probe, raw[:200])

    for template in LOOPBACK_HOSTS:
        host = template.format(port=gateway.port)
        page = {"Host": host, "Origin": f"http://{host}"}
        for method, path, body, expected in ROUTES:
            status, _, raw = await fetch(gateway, method, path, headers=page, body=body)
            assert status == expected, (host, method, path, raw[:300])
        frames = await ws_exchange(gateway, GENERATE, headers=page)
        assert frames[-1]["type"] == "done", host
    # No Host at all (HTTP/1.0) is no browser: judged as before.
    response = await raw_exchange(gateway.host, gateway.port, b"GET /v1/models HTTP/1.0\r\n\r\n", 5)
    assert response.startswith(b"HTTP/1.0 200") or response.startswith(b"HTTP/1.1 200"), response


async def test_a_gateway_with_credentials_answers_any_host(start_gateway: StartGateway) -> None:
    """Not anonymous (as in Kubernetes, behind a Service or an ingress): every name works,
    and the credential is what is judged."""
    gateway = await start_gateway(auth={"anonymous": False, "api_keys": [key_config("web", KEY)]})
    for host in ("gateway.internal", "gateway.example.com:8443", "10.1.2.3:8080"):
        page = {"Host": host, "Origin": f"https://{host}"}
        status, _, raw = await fetch(
            gateway, "POST", "/v1/stream/chunked", headers={**page, **bearer(KEY)}, body=BODY
        )
        assert status == 200, (host, raw[:300])
        status, _, _ = await fetch(gateway, "POST", "/v1/stream/chunked", headers=page, body=BODY)
        assert status == 401, host


# -- allowed_origins: ["*"] ----------------------------------------------------------


async def test_any_origin_never_gets_credentials(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(
        server={"allowed_origins": ["*", LISTED]},
        auth={"anonymous": False, "api_keys": [key_config("web", KEY)], "cookie": COOKIE},
    )
    authorization = bearer(KEY)
    cookie = {"Cookie": f"{COOKIE}={KEY}"}
    own = gateway.url

    # Any origin: CORS without credentials, preflight included.
    status, headers, _ = await fetch(
        gateway, "OPTIONS", "/v1/stream/chunked", headers=preflight(ANY)
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in headers
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    status, headers, raw = await fetch(
        gateway, "POST", "/v1/stream/chunked", headers={"Origin": ANY, **authorization}, body=BODY
    )
    assert status == 200, raw
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in headers
    assert "X-Request-ID" in headers["Access-Control-Expose-Headers"]
    assert "Origin" in headers["Vary"]
    # The visitor's cookie is not the page's credential: a simple POST and a
    # WebSocket carry it whatever CORS says, so it is not read at all.
    status, headers, raw = await fetch(
        gateway, "POST", "/v1/stream/chunked", headers={"Origin": ANY, **cookie}, body=BODY
    )
    assert status == 401, raw
    assert "Access-Control-Allow-Credentials" not in headers
    assert await ws_refusal(gateway, headers={"Origin": ANY, **cookie}) == 401
    # Its own credential works: a ticket its backend minted, on the WebSocket.
    status, _, raw = await fetch(gateway, "POST", "/v1/tickets", headers=authorization, body={})
    assert status == 201, raw
    ticket = orjson.loads(raw)["ticket"]
    frames = await ws_exchange(
        gateway, GENERATE, headers={"Origin": ANY}, query={"access_token": ticket}
    )
    assert frames[-1]["type"] == "done"

    # A listed origin and our own keep credentials, and the cookie.
    for origin in (LISTED, own):
        status, headers, _ = await fetch(
            gateway, "OPTIONS", "/v1/stream/chunked", headers=preflight(origin)
        )
        assert status == 204, origin
        assert headers["Access-Control-Allow-Origin"] == origin
        assert headers["Access-Control-Allow-Credentials"] == "true"
        status, headers, raw = await fetch(
            gateway, "POST", "/v1/stream/chunked", headers={"Origin": origin, **cookie}, body=BODY
        )
        assert status == 200, (origin, raw)
        assert headers["Access-Control-Allow-Origin"] == origin
        assert headers["Access-Control-Allow-Credentials"] == "true"
        frames = await ws_exchange(gateway, GENERATE, headers={"Origin": origin, **cookie})
        assert frames[-1]["type"] == "done", origin
