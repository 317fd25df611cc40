"""Anonymous mode: what a gateway open to callers without a credential still refuses,
and whose address an anonymous caller's budget follows behind a proxy."""

from __future__ import annotations

import ipaddress
from typing import Any

import openai
import pytest

from gateway.auth import client_ip
from tests.auth_helpers import (
    BODY,
    OPEN_WITH_KEYS,
    ROUTE_IDS,
    ROUTES,
    WRONG_KEY,
    assert_unauthorized,
    create_generation,
)
from tests.conftest import UNLIMITED, StartGateway
from tests.helpers import bearer, fetch


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_anonymous_gateway_still_refuses_a_wrong_credential(
    start_gateway: StartGateway, method: str, path: str, body: dict[str, Any] | None
) -> None:
    server = await start_gateway(auth=OPEN_WITH_KEYS)
    path = path.format(id=await create_generation(server, {}))  # anonymous owns it
    for headers in (bearer(WRONG_KEY), {"Authorization": "Basic dXNlcjpwYXNz"}):
        status, response_headers, raw = await fetch(
            server, method, path, headers=headers, body=body
        )
        assert_unauthorized(status, response_headers, raw)
    # The same request without a credential is served as anonymous (a plain GET
    # is no WebSocket upgrade; anonymous callers cannot mint tickets).
    if path not in {"/v1/stream/ws", "/v1/tickets"}:
        status, _, raw = await fetch(server, method, path, body=body)
        assert status < 400, raw


async def test_with_no_credential_configured_a_bearer_is_ignored(
    start_gateway: StartGateway,
) -> None:
    """The loopback default: an OpenAI SDK must send some key, and any works."""
    server = await start_gateway(auth={"anonymous": True, "api_keys": [], "jwt": None})
    sdk = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="sk-anything", max_retries=0
    )
    async with sdk:
        answer = await sdk.chat.completions.create(
            model="sim-1", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    assert answer.choices[0].finish_reason == "length"
    status, _, raw = await fetch(
        server,
        "POST",
        "/v1/stream/chunked",
        headers=bearer(WRONG_KEY),
        body={"prompt": "hi", "max_tokens": 2},
    )
    assert status == 200, raw


def test_client_ip_believes_forwarded_for_only_from_trusted_proxies() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert client_ip("203.0.113.9", "1.2.3.4", trusted) == "203.0.113.9"
    assert client_ip("203.0.113.9", None, trusted) == "203.0.113.9"
    assert client_ip("10.0.0.5", "198.51.100.7", trusted) == "198.51.100.7"
    assert client_ip("10.0.0.5", None, trusted) == "10.0.0.5"
    # The client's own claim comes first; the nearest untrusted hop is the truth.
    assert client_ip("10.0.0.5", "6.6.6.6, 198.51.100.7, 10.1.1.1", trusted) == "198.51.100.7"
    assert client_ip("fd00::1", "2001:db8::5", trusted) == "2001:db8::5"
    assert client_ip("10.0.0.5", "10.2.2.2, 10.3.3.3", trusted) == "10.2.2.2"
    assert client_ip("10.0.0.5", "", trusted) == "10.0.0.5"
    assert client_ip("127.0.0.1", "1.2.3.4", ()) == "127.0.0.1"
    assert client_ip(None, "1.2.3.4", trusted) == "unknown"


@pytest.mark.parametrize("trusted", [True, False])
async def test_anonymous_budget_follows_forwarded_for_only_behind_a_trusted_proxy(
    start_gateway: StartGateway, trusted: bool
) -> None:
    limits = {**UNLIMITED, "requests_per_minute": 1}
    server = await start_gateway(
        rate_limit={"default": limits},
        server={"trusted_proxies": ["127.0.0.0/8"] if trusted else []},
    )
    statuses = []
    for client in ("198.51.100.1", "198.51.100.1", "198.51.100.2"):
        status, _, _ = await fetch(
            server, "POST", "/v1/generations", headers={"X-Forwarded-For": client}, body=BODY
        )
        statuses.append(status)
    assert statuses == ([201, 429, 201] if trusted else [201, 429, 429])
