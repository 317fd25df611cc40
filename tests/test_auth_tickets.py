"""Stream tickets (`POST /v1/tickets`): who may mint one, what it streams as, how long
it lives, and that a forged or expired one is refused, against a real gateway on a
real socket. What a ticket opens, per route, is in tests/test_credentials.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt

from gateway.auth import TICKET_AUDIENCE, TICKET_ISSUER
from tests.auth_helpers import (
    CLOSED,
    DROP,
    KEY_A,
    KEY_B,
    OPEN_WITH_KEYS,
    OTHER_SECRET,
    SSE_GET,
    TICKET_SECRET,
    assert_unauthorized,
    create_generation,
    generate_message,
    hand_made_token,
    key_config,
    mint,
)
from tests.conftest import StartGateway
from tests.helpers import bearer, fetch, sse_events, ws_exchange


async def test_ticket_streams_as_the_key_that_minted_it(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED)
    before = time.time()
    minted = await mint(server, bearer(KEY_A))
    assert set(minted) == {"ticket", "expires_at"}
    assert isinstance(minted["expires_at"], int)
    assert before + 299 <= minted["expires_at"] <= time.time() + 301
    ticket = {"access_token": minted["ticket"]}

    status, _, raw = await fetch(server, "GET", SSE_GET, query=ticket)
    assert status == 200, raw
    over_sse = sse_events(raw)[0]["generation_id"]
    frames = await ws_exchange(server, generate_message(), query=ticket)
    assert frames[-1]["type"] == "done"
    over_ws = frames[0]["generation_id"]

    for generation_id in (over_sse, over_ws):
        events = f"/v1/generations/{generation_id}/events"
        status, _, raw = await fetch(server, "GET", events, headers=bearer(KEY_A))
        assert status == 200, raw
        status, _, raw = await fetch(server, "GET", events, headers=bearer(KEY_B))
        assert status == 404, raw
    # And the other way round: the ticket sees what its key started.
    generation_id = await create_generation(server, bearer(KEY_A))
    status, _, raw = await fetch(
        server, "GET", f"/v1/generations/{generation_id}/events", query=ticket
    )
    assert status == 200, raw


async def test_who_may_mint_a_ticket(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=OPEN_WITH_KEYS)
    status, headers, raw = await fetch(server, "POST", "/v1/tickets")
    assert_unauthorized(status, headers, raw)  # anonymous
    ticket = (await mint(server, bearer(KEY_A)))["ticket"]
    # A ticket cannot mint another (it would outlive itself): 401, saying what to send.
    status, headers, raw = await fetch(server, "POST", "/v1/tickets", headers=bearer(ticket))
    message = assert_unauthorized(status, headers, raw, secret=ticket)
    assert "GET streams only" in message and "key or JWT" in message
    status, _, raw = await fetch(server, "POST", "/v1/tickets", query={"access_token": ticket})
    assert status == 401, raw  # and not from the query either


def ticket_claims(**overrides: Any) -> dict[str, Any]:
    """Claims of a ticket for key `test`; DROP removes one."""
    now = int(time.time())
    base = {
        "iss": TICKET_ISSUER,
        "aud": TICKET_AUDIENCE,
        "sub": "key:test",
        "iat": now,
        "exp": now + 60,
        "jti": "crafted-ticket-id",
    }
    return {k: v for k, v in {**base, **overrides}.items() if v is not DROP}


def ticket(secret: str = TICKET_SECRET, **overrides: Any) -> str:
    return jwt.encode(ticket_claims(**overrides), secret, algorithm="HS256")


async def test_forged_and_expired_tickets_are_401(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth={**CLOSED, "ticket_secret": TICKET_SECRET})
    # A ticket made with the configured secret is a ticket: the crafting is right.
    status, _, raw = await fetch(server, "GET", SSE_GET, query={"access_token": ticket()})
    assert status == 200, raw
    for bad in (
        ticket(exp=int(time.time()) - 30),
        ticket(OTHER_SECRET),
        ticket(sub="key:removed"),
        ticket(iss="someone"),
        ticket(jti=DROP),
        # A JWT subject's ticket, but no JWT is configured (any more).
        ticket(sub="sub:alice"),
        ticket(sub="anonymous"),
        hand_made_token({"alg": "none", "typ": "JWT"}, ticket_claims(), None),
    ):
        status, headers, raw = await fetch(server, "GET", SSE_GET, query={"access_token": bad})
        assert_unauthorized(status, headers, raw, secret=bad)


async def test_minted_ticket_lives_its_ttl_then_expires(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED)
    before = time.time()
    minted = await mint(server, bearer(KEY_A), {"ttl_s": 0.5})
    exp = jwt.decode(minted["ticket"], options={"verify_signature": False})["exp"]
    assert exp == minted["expires_at"]
    # Never shorter than asked (a truncated expiry could be dead on arrival).
    assert before + 0.5 <= minted["expires_at"] <= time.time() + 1.5
    query = {"access_token": minted["ticket"]}
    status, _, raw = await fetch(server, "GET", SSE_GET, headers=bearer(minted["ticket"]))
    assert status == 200, raw
    await asyncio.sleep(max(0.0, minted["expires_at"] - time.time()) + 0.05)
    status, headers, raw = await fetch(server, "GET", SSE_GET, query=query)
    assert "expired" in assert_unauthorized(status, headers, raw)


async def test_ticket_ttl_is_capped_and_validated(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth={**CLOSED, "ticket_ttl_s": 60})
    for body, ttl in (({"ttl_s": 3600}, 60), ({"ttl_s": 10}, 10), (None, 60), ({}, 60)):
        before = time.time()
        minted = await mint(server, bearer(KEY_A), body)
        assert before + ttl <= minted["expires_at"] <= time.time() + ttl + 1, body
        exp = jwt.decode(minted["ticket"], options={"verify_signature": False})["exp"]
        assert exp == minted["expires_at"]
    for body in ({"ttl_s": 0}, {"ttl_s": -5}, {"ttl_s": "60"}, {"ttl_s": True}, {"sub": "x"}):
        status, _, raw = await fetch(
            server, "POST", "/v1/tickets", headers=bearer(KEY_A), body=body
        )
        assert status == 400, (body, raw)


async def test_tickets_work_across_replicas_sharing_the_secret(
    start_gateway: StartGateway,
) -> None:
    shared = {**CLOSED, "ticket_secret": TICKET_SECRET}
    minting = await start_gateway(auth=shared)
    sibling = await start_gateway(auth=shared)
    key_removed = await start_gateway(auth={**shared, "api_keys": [key_config("other", KEY_B)]})
    own_secret = await start_gateway(auth=CLOSED)  # a random per-process secret
    minted = (await mint(minting, bearer(KEY_A)))["ticket"]
    status, _, raw = await fetch(sibling, "GET", SSE_GET, headers=bearer(minted))
    assert status == 200, raw
    for server in (key_removed, own_secret):
        status, headers, raw = await fetch(server, "GET", SSE_GET, headers=bearer(minted))
        assert_unauthorized(status, headers, raw)
