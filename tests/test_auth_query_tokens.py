"""Credentials outside the `Authorization` header: `?access_token=` (`auth.query_token`),
the cookie (`auth.cookie`), and their redaction from log lines.

The default, `query_token: true` (tickets only in the URL), is tested against a
real process in tests/test_credentials.py.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.auth import redact_tokens
from tests.auth_helpers import (
    BODY,
    CLOSED,
    KEY_A,
    OPEN_WITH_KEYS,
    ROUTE_IDS,
    ROUTES,
    SSE_GET,
    WRONG_KEY,
    assert_unauthorized,
    create_generation,
    generate_message,
    mint,
)
from tests.conftest import StartGateway
from tests.helpers import (
    assert_well_formed,
    bearer,
    fetch,
    ndjson_events,
    sse_events,
    ws_exchange,
    ws_refusal,
)


async def test_query_token_any_accepts_keys_on_get_stream_routes(
    start_gateway: StartGateway,
) -> None:
    """`auth.query_token: any` keeps the old behaviour: a key in the URL."""
    server = await start_gateway(auth={**CLOSED, "query_token": "any"})
    query = {"access_token": KEY_A}
    status, _, raw = await fetch(server, "GET", SSE_GET, query=query)
    assert status == 200, raw
    assert_well_formed(sse_events(raw))

    frames = await ws_exchange(server, generate_message(), query=query)
    assert frames[-1]["type"] == "done"

    generation_id = await create_generation(server, bearer(KEY_A))
    events = f"/v1/generations/{generation_id}/events"
    status, _, raw = await fetch(server, "GET", events, query=query)
    assert status == 200, raw
    assert_well_formed(sse_events(raw))
    # The query parser decodes a percent-encoded name: still the credential (and so
    # `redact_tokens` must hide it too).
    encoded = server.make_url(SSE_GET + "&access%5Ftoken=" + KEY_A)
    async with aiohttp.ClientSession() as session, session.get(encoded) as response:
        assert response.status == 200
    # Present but wrong in the query is 401 like anywhere else.
    status, headers, raw = await fetch(server, "GET", events, query={"access_token": WRONG_KEY})
    assert_unauthorized(status, headers, raw)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param(*route, id=route_id)
        for route, route_id in zip(ROUTES, ROUTE_IDS, strict=True)
        if route[0] != "GET" or route[1] == "/v1/models"
    ],
)
@pytest.mark.parametrize("mode", [True, "any"])
async def test_query_token_is_refused_off_get_stream_routes(
    start_gateway: StartGateway,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    mode: bool | str,
) -> None:
    server = await start_gateway(auth={**OPEN_WITH_KEYS, "query_token": mode})
    path = path.format(id=await create_generation(server, bearer(KEY_A)))
    ticket = (await mint(server, bearer(KEY_A)))["ticket"]
    for token in (KEY_A, ticket):
        status, headers, raw = await fetch(
            server, method, path, body=body, query={"access_token": token}
        )
        message = assert_unauthorized(status, headers, raw, secret=token)
        assert "Authorization" in message
    status, _, raw = await fetch(server, method, path, body=body, headers=bearer(KEY_A))
    assert status < 400, raw


async def test_query_token_can_be_switched_off(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth={**CLOSED, "query_token": False})
    query = {"access_token": KEY_A}
    generation_id = await create_generation(server, bearer(KEY_A))
    ticket = (await mint(server, bearer(KEY_A)))["ticket"]
    for path in (SSE_GET, "/v1/stream/ws", f"/v1/generations/{generation_id}/events"):
        for token in (KEY_A, ticket):  # not even a ticket
            status, headers, raw = await fetch(server, "GET", path, query={"access_token": token})
            assert "disabled" in assert_unauthorized(status, headers, raw)
        # The same ticket as a bearer still opens the stream.
        if path != "/v1/stream/ws":
            status, _, raw = await fetch(server, "GET", path, headers=bearer(ticket))
            assert status == 200, raw
    assert await ws_refusal(server, query=query) == 401
    frames = await ws_exchange(server, generate_message(), headers=bearer(KEY_A))
    assert frames[-1]["type"] == "done"


async def test_cookie_carries_the_token(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth={**CLOSED, "cookie": "gw_session"})
    cookie = {"Cookie": f"theme=dark; gw_session={KEY_A}"}
    status, _, raw = await fetch(server, "POST", "/v1/stream/chunked", headers=cookie, body=BODY)
    assert status == 200, raw
    assert_well_formed(ndjson_events(raw))
    frames = await ws_exchange(server, generate_message(), headers=cookie)
    assert frames[-1]["type"] == "done"
    # The cookie's principal is the key's: it sees the key's generations.
    generation_id = await create_generation(server, bearer(KEY_A))
    status, _, raw = await fetch(
        server, "GET", f"/v1/generations/{generation_id}/events", headers=cookie
    )
    assert status == 200, raw

    for headers in ({"Cookie": f"gw_session={WRONG_KEY}"}, {"Cookie": f"other={KEY_A}"}):
        status, response_headers, raw = await fetch(
            server, "POST", "/v1/stream/chunked", headers=headers, body=BODY
        )
        assert_unauthorized(status, response_headers, raw)
    # A page on another site cannot ride the visitor's cookie (CSRF).
    status, _, raw = await fetch(
        server,
        "POST",
        "/v1/stream/chunked",
        headers={**cookie, "Origin": "https://evil.example"},
        body=BODY,
    )
    assert status == 403, raw


async def test_cookie_is_ignored_unless_configured(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED)
    status, headers, raw = await fetch(
        server, "GET", "/v1/models", headers={"Cookie": f"gw_session={KEY_A}"}
    )
    assert_unauthorized(status, headers, raw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /v1/stream/sse?access_token=gw_abc.def-ghi", "GET /v1/stream/sse?access_token=***"),
        (
            "/v1/stream/ws?prompt=hi&access_token=eyJh.eyJz.sig&seed=1",
            "/v1/stream/ws?prompt=hi&access_token=***&seed=1",
        ),
        ('{"path":"/x?ACCESS_TOKEN=secret"}', '{"path":"/x?ACCESS_TOKEN=***"}'),
        ("a?access_token=one b?access_token=two", "a?access_token=*** b?access_token=***"),
        ("/x?access%5Ftoken=secret&y=1", "/x?access%5Ftoken=***&y=1"),
        ("/x?%61ccess_token=secret", "/x?%61ccess_token=***"),
        # The last letter encoded: the pre-check looks for `%6e=` as well as `n=`.
        ("/x?access_toke%6E=secret", "/x?access_toke%6E=***"),
        ("/x?ACCESS_TOKE%6e=secret&y=1", "/x?ACCESS_TOKE%6e=***&y=1"),
        ("/v1/stream/sse?prompt=tokens", "/v1/stream/sse?prompt=tokens"),
    ],
)
def test_redact_tokens(text: str, expected: str) -> None:
    redacted = redact_tokens(text)
    assert redacted == expected
    assert "secret" not in redacted and "gw_abc" not in redacted
