"""Credentials in URLs, what a stream ticket opens, and JWT details.

Against a real `gateway serve` process where the question is what the wire
carries: `?access_token=` takes stream tickets only (`auth.query_token: true`,
the default); a ticket opens GET streams only, from the query, a header or the
cookie, and never POST, DELETE or minting; a single-use ticket opens one
stream; a ticket minted by a JWT dies with that JWT; long JWT subjects stay
distinct principals; PyJWT's reasons never reach a client. Configuration and
small units in-process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio

from gateway.auth import TICKET_AUDIENCE, TICKET_ISSUER, Authenticator, jwt_principal_id
from gateway.config import ConfigError, load_settings
from gateway.spent_tickets import SPENT_MARGIN_S, UsedTickets
from tests.auth_helpers import (
    BODY,
    DROP,
    HS256_JWT,
    TICKET_SECRET,
    assert_unauthorized,
    b64url,
    create_generation,
    generate_message,
    hs_token,
    key_config,
    mint,
)
from tests.conftest import StartGateway, make_settings
from tests.gateway_process import NO_LIMITS, GatewayProcess, start_gateway_process
from tests.helpers import bearer, fetch, sse_events, ws_exchange, ws_refusal
from tests.redis_server import free_port

#: Tests against the module's `gateway serve` processes share their event loop.
on_process = pytest.mark.asyncio(loop_scope="module")

KEY = "gw_credentials_test_key_0123456789"
OTHER_KEY = "gw_credentials_other_key_abcdefgh"
COOKIE = "gw_ticket"
SSE_GET = "/v1/stream/sse?prompt=hi&max_tokens=3"
#: What PyJWT says about the tokens below: none of it may reach a client.
PYJWT_TEXTS = (
    "Signature verification failed",
    "Audience",
    "audience",
    "issuer",
    "Invalid payload",
    "claim",
    "padding",
    "Not enough segments",
)


def auth_config(**extra: Any) -> dict[str, Any]:
    return {
        "anonymous": False,
        "api_keys": [
            key_config("app", KEY, limits=NO_LIMITS),
            key_config("other", OTHER_KEY, limits=NO_LIMITS),
        ],
        "jwt": HS256_JWT,
        "ticket_secret": TICKET_SECRET,
        "cookie": COOKIE,
        **extra,
    }


def process_config(**auth: Any) -> dict[str, Any]:
    return {
        "server": {"port": free_port()},
        "models": [
            {"name": "sim-1", "provider": "simulated", "first_token_ms": 5},
            {
                "name": "sim-slow",
                "provider": "simulated",
                "first_token_ms": 5,
                "tokens_per_second": 40,
            },
        ],
        "streams": {"resume_grace_s": 5},
        "auth": auth_config(**auth),
        "rate_limit": {"default": NO_LIMITS},
        "logging": {"level": "info"},
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayProcess]:
    """The defaults: `query_token: true`, reusable tickets."""
    process = await start_gateway_process(process_config(), tmp_path_factory.mktemp("creds"))
    yield process
    await process.stop()
    assert "Traceback" not in process.log_text(), process.log_text()[-3000:]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def single_use(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayProcess]:
    process = await start_gateway_process(
        process_config(tickets_single_use=True), tmp_path_factory.mktemp("single")
    )
    yield process
    await process.stop()
    assert "Traceback" not in process.log_text(), process.log_text()[-3000:]


async def ws_last_type(gateway: GatewayProcess, **carrier: dict[str, str]) -> str:
    """Run one generation over the WebSocket (`query` or `headers` carry the
    credential); its last frame's type."""
    return str((await ws_exchange(gateway, generate_message(), **carrier))[-1]["type"])


# -- ?access_token= takes tickets only -------------------------------------------------


@on_process
async def test_the_query_takes_a_ticket_but_never_a_key_or_a_jwt(gateway: GatewayProcess) -> None:
    """Keys and JWTs in URLs end up in proxy access logs: refused there by default."""
    events = f"/v1/generations/{await create_generation(gateway, bearer(KEY))}/events"
    jwt_token = hs_token()
    for token in (KEY, jwt_token):
        for path in (SSE_GET, events):
            status, headers, raw = await fetch(gateway, "GET", path, query={"access_token": token})
            message = assert_unauthorized(status, headers, raw, secret=token)
            assert "ticket" in message and "POST /v1/tickets" in message
        assert await ws_refusal(gateway, query={"access_token": token}) == 401
    # The same credentials as a bearer, and a ticket in the query, are fine.
    status, _, raw = await fetch(gateway, "GET", SSE_GET, headers=bearer(KEY))
    assert status == 200, raw
    ticket = (await mint(gateway, bearer(KEY)))["ticket"]
    status, _, raw = await fetch(gateway, "GET", SSE_GET, query={"access_token": ticket})
    assert status == 200, raw
    assert sse_events(raw)[-1]["type"] == "done"
    status, _, raw = await fetch(gateway, "GET", events, query={"access_token": ticket})
    assert status == 200, raw
    assert await ws_last_type(gateway, query={"access_token": ticket}) == "done"
    # A JWT's ticket works there too, and reusable tickets (the default) open again.
    jwt_ticket = (await mint(gateway, bearer(jwt_token)))["ticket"]
    for _ in range(2):
        status, _, raw = await fetch(gateway, "GET", SSE_GET, query={"access_token": jwt_ticket})
        assert status == 200, raw


# -- a ticket opens GET streams only ---------------------------------------------------


@on_process
async def test_a_ticket_opens_get_streams_only_whatever_carries_it(
    gateway: GatewayProcess,
) -> None:
    generation_id = await create_generation(gateway, bearer(KEY), {**BODY, "model": "sim-slow"})
    ticket = (await mint(gateway, bearer(KEY)))["ticket"]
    refused = [
        ("POST", "/v1/stream/chunked", BODY),
        ("POST", "/v1/stream/sse", BODY),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/generations", BODY),
        ("DELETE", f"/v1/generations/{generation_id}", None),
        ("POST", "/v1/tickets", {}),
    ]
    for carrier in (bearer(ticket), {"Cookie": f"{COOKIE}={ticket}"}):
        for method, path, body in refused:
            status, headers, raw = await fetch(gateway, method, path, headers=carrier, body=body)
            message = assert_unauthorized(status, headers, raw, secret=ticket)
            assert "GET streams only" in message and "key or JWT" in message, (method, path)
    # The DELETE above cancelled nothing: the generation still streams to its end.
    events = f"/v1/generations/{generation_id}/events"
    for carrier in (bearer(ticket), {"Cookie": f"{COOKIE}={ticket}"}):
        status, _, raw = await fetch(gateway, "GET", SSE_GET, headers=carrier)
        assert status == 200, raw
        status, _, raw = await fetch(gateway, "GET", events, headers=carrier)
        assert status == 200, raw
        assert sse_events(raw)[-1]["finish_reason"] == "length"
        assert await ws_last_type(gateway, headers=carrier) == "done"
    # Keys and JWTs still do everything.
    for token in (KEY, hs_token()):
        status, _, raw = await fetch(gateway, "GET", "/v1/models", headers=bearer(token))
        assert status == 200, raw


# -- single-use tickets ----------------------------------------------------------------


@on_process
async def test_a_single_use_ticket_opens_one_stream(single_use: GatewayProcess) -> None:
    events = f"/v1/generations/{await create_generation(single_use, bearer(KEY))}/events"
    opens = [
        ("sse", lambda t: fetch(single_use, "GET", SSE_GET, query={"access_token": t})),
        ("events", lambda t: fetch(single_use, "GET", events, headers=bearer(t))),
    ]
    for name, open_stream in opens:
        ticket = (await mint(single_use, bearer(KEY)))["ticket"]
        status, _, raw = await open_stream(ticket)
        assert status == 200, (name, raw)
        for _ in range(2):
            status, headers, raw = await open_stream(ticket)
            assert "already used" in assert_unauthorized(status, headers, raw, secret=ticket), name
    ticket = (await mint(single_use, bearer(KEY)))["ticket"]
    assert await ws_last_type(single_use, query={"access_token": ticket}) == "done"
    assert await ws_refusal(single_use, query={"access_token": ticket}) == 401
    # A spent ticket is spent on every route, and a fresh one works.
    status, headers, raw = await fetch(single_use, "GET", SSE_GET, query={"access_token": ticket})
    assert "already used" in assert_unauthorized(status, headers, raw)
    fresh = (await mint(single_use, bearer(KEY)))["ticket"]
    status, _, raw = await fetch(single_use, "GET", SSE_GET, query={"access_token": fresh})
    assert status == 200, raw


def test_spent_ticket_ids_are_forgotten_after_their_ticket_expires() -> None:
    used = UsedTickets()
    now = 1_000_000.0
    assert used.spend("a", now + 10, now=now)
    assert not used.spend("a", now + 10, now=now + 1)
    assert used.spend("b", now + 100, now=now + 1)
    assert len(used) == 2
    # Past `a`'s expiry (and the margin) its id is dropped; `b`'s is kept.
    later = now + 10 + SPENT_MARGIN_S
    assert not used.spend("b", now + 100, now=later)
    assert len(used) == 1
    assert used.spend("c", now + 200, now=now + 100 + SPENT_MARGIN_S)
    assert len(used) == 1


# -- a ticket never outlives the credential that minted it -----------------------------


@on_process
async def test_a_ticket_minted_by_a_jwt_expires_with_it(gateway: GatewayProcess) -> None:
    jwt_exp = int(time.time()) + 3
    short_lived = hs_token(exp=jwt_exp)
    minted = await mint(gateway, bearer(short_lived))  # asks for the default 300 s
    assert minted["expires_at"] <= jwt_exp
    claims = jwt.decode(minted["ticket"], options={"verify_signature": False})
    assert claims["exp"] == minted["expires_at"]
    query = {"access_token": minted["ticket"]}
    status, _, raw = await fetch(gateway, "GET", SSE_GET, query=query)
    assert status == 200, raw
    await asyncio.sleep(max(0.0, jwt_exp - time.time()) + 0.2)
    status, headers, raw = await fetch(gateway, "GET", SSE_GET, query=query)
    assert "expired" in assert_unauthorized(status, headers, raw)
    # Inside the JWT's leeway the JWT still works, but there is no time left to lend.
    status, _, raw = await fetch(gateway, "GET", "/v1/models", headers=bearer(short_lived))
    assert status == 200, raw
    status, headers, raw = await fetch(gateway, "POST", "/v1/tickets", headers=bearer(short_lived))
    assert "expired" in assert_unauthorized(status, headers, raw)
    # A key's ticket still gets its full life.
    before = time.time()
    assert (await mint(gateway, bearer(KEY)))["expires_at"] >= before + 299


# -- JWT subjects are never cut --------------------------------------------------------


@on_process
async def test_long_jwt_subjects_that_share_a_start_are_two_principals(
    gateway: GatewayProcess,
) -> None:
    common = "tenant-42/" + "x" * 130  # the first 128 characters are the same
    alice, bob = hs_token(sub=common + "alice"), hs_token(sub=common + "bob")
    events = f"/v1/generations/{await create_generation(gateway, bearer(alice))}/events"
    status, _, raw = await fetch(gateway, "GET", events, headers=bearer(bob))
    assert status == 404, raw
    status, _, raw = await fetch(gateway, "GET", events, headers=bearer(alice))
    assert status == 200, raw
    # Another token for the same long subject is the same principal, and its ticket too.
    again = hs_token(sub=common + "alice", jti="again")
    status, _, raw = await fetch(gateway, "GET", events, headers=bearer(again))
    assert status == 200, raw
    ticket = (await mint(gateway, bearer(again)))["ticket"]
    status, _, raw = await fetch(gateway, "GET", events, query={"access_token": ticket})
    assert status == 200, raw
    # The logs name the hash, never the long subject.
    await asyncio.sleep(0.2)
    principals = {line.get("principal") for line in gateway.access_lines()}
    assert jwt_principal_id(common + "alice") in principals
    assert jwt_principal_id(common + "bob") in principals
    assert common not in gateway.log_text()


def test_jwt_principal_ids() -> None:
    assert jwt_principal_id("alice") == "sub:alice"
    assert jwt_principal_id("a" * 128) == "sub:" + "a" * 128
    long = "a" * 129
    assert jwt_principal_id(long) == "jwt:sha256:" + hashlib.sha256(long.encode()).hexdigest()
    assert jwt_principal_id(long) != jwt_principal_id("a" * 130)
    # A short subject can never look like a hashed one.
    hashed = jwt_principal_id(long)
    assert jwt_principal_id(hashed) != hashed
    assert jwt_principal_id("é" * 200).startswith("jwt:sha256:")


# -- PyJWT's reasons stay in the log ---------------------------------------------------


@on_process
async def test_jwt_refusals_carry_a_fixed_message_and_the_reason_is_logged(
    gateway: GatewayProcess,
) -> None:
    payload = b64url(b'{"sub":"mallory"')
    bad = {
        "wrong-audience": hs_token(aud="another-service"),
        "wrong-issuer": hs_token(iss="https://evil.example"),
        "wrong-signature": hs_token(secret="not-the-secret-0123456789abcdefghij"),
        "missing-sub": hs_token(sub=DROP),
        "tampered": hs_token()[:-6] + "AAAAAA",
        "garbage-payload": hs_token().split(".")[0] + "." + payload + ".c2ln",
    }
    for name, token in bad.items():
        status, headers, raw = await fetch(gateway, "GET", "/v1/models", headers=bearer(token))
        message = assert_unauthorized(status, headers, raw, secret=token)
        assert message in {"invalid token", "malformed token"}, (name, message)
        assert not any(text in message for text in PYJWT_TEXTS), (name, message)
    # A forged ticket too.
    now = int(time.time())
    forged = jwt.encode(
        {"iss": TICKET_ISSUER, "aud": TICKET_AUDIENCE, "sub": "key:app", "exp": now + 60},
        "not-the-ticket-secret-0123456789abcdef",
        "HS256",
    )
    status, headers, raw = await fetch(gateway, "GET", SSE_GET, query={"access_token": forged})
    assert assert_unauthorized(status, headers, raw, secret=forged) == "invalid ticket"
    # The operator reads the reason in the log, without the token.
    await asyncio.sleep(0.2)
    log = gateway.log_text()
    assert "InvalidAudienceError" in log and "InvalidIssuerError" in log, log[-3000:]
    assert "InvalidSignatureError" in log
    for token in (*bad.values(), forged):
        assert token not in log
        assert token.split(".")[2] not in log


# -- the JWT audience is required (configuration) --------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_jwt_audience_is_required_unless_explicitly_null(tmp_path: Path) -> None:
    jwt_section = "auth:\n  jwt: {algorithms: [HS256], secret: s3cret"
    with pytest.raises(ConfigError, match=r"^auth\.jwt: audience: required"):
        load_settings(write(tmp_path, jwt_section + "}\n"), env={})
    settings = load_settings(write(tmp_path, jwt_section + ", audience: null}\n"), env={})
    assert settings.auth.jwt is not None and settings.auth.jwt.audience is None
    settings = load_settings(write(tmp_path, jwt_section + ", audience: api}\n"), env={})
    assert settings.auth.jwt is not None and settings.auth.jwt.audience == "api"
    # From the environment as well.
    env = {"GATEWAY__AUTH__JWT": "{algorithms: [HS256], secret: s3cret, audience: null}"}
    assert load_settings(None, env=env).auth.jwt is not None


async def test_a_null_audience_warns_at_start_up_and_takes_only_tokens_without_one(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    auth = auth_config()
    auth["jwt"] = {**auth["jwt"], "audience": None}
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        server = await start_gateway(auth=auth)
    assert any("audience is null" in r.getMessage() for r in caplog.records), caplog.text
    for token, expected in ((hs_token(aud=DROP), 200), (hs_token(), 401)):
        status, _, raw = await fetch(server, "GET", "/v1/models", headers=bearer(token))
        assert status == expected, raw
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        Authenticator(make_settings(auth=auth_config()))
    assert not any("audience" in r.getMessage() for r in caplog.records)


def test_query_token_takes_true_any_or_false(tmp_path: Path) -> None:
    for text, expected in (("true", True), ("false", False), ("any", "any")):
        settings = load_settings(write(tmp_path, f"auth: {{query_token: {text}}}\n"), env={})
        assert settings.auth.query_token == expected
    assert load_settings(None, env={}).auth.query_token is True
    assert load_settings(None, env={}).auth.tickets_single_use is False
    for text in ("maybe", "1", "null", "ANY"):
        with pytest.raises(ConfigError, match=r"^auth: query_token: must be true"):
            load_settings(write(tmp_path, f"auth: {{query_token: {text}}}\n"), env={})
    env = {"GATEWAY__AUTH__TICKETS_SINGLE_USE": "true", "GATEWAY__AUTH__QUERY_TOKEN": "any"}
    settings = load_settings(None, env=env)
    assert settings.auth.tickets_single_use is True and settings.auth.query_token == "any"
