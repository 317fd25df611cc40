"""Credentials for the authentication tests: keys, JWTs, tickets, and the checks on a 401.

Shared by the `test_auth_*` topic files and `test_credentials.py`, so that a key,
a token or a refusal means the same thing in each.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import TEST_API_KEY, TEST_KEY_CONFIG, UNLIMITED
from tests.helpers import (
    Target,
    assert_well_formed,
    fetch,
    ndjson_events,
    sse_events,
    ws_exchange,
)

KEY_A = TEST_API_KEY
KEY_B = "gw_second_tenant_key_for_auth_tests"
WRONG_KEY = "gw_this_key_was_never_configured"


def key_config(key_id: str, key: str, **extra: Any) -> dict[str, Any]:
    """An `auth.api_keys` entry, as `gateway hash-key` would have it."""
    return {"id": key_id, "sha256": hashlib.sha256(key.encode()).hexdigest(), **extra}


#: Two tenants, no anonymous access.
CLOSED: dict[str, Any] = {
    "anonymous": False,
    "api_keys": [{**TEST_KEY_CONFIG, "limits": UNLIMITED}, key_config("other", KEY_B)],
}
OPEN_WITH_KEYS: dict[str, Any] = {**CLOSED, "anonymous": True}

BODY = {"prompt": "Tell me about caching.", "max_tokens": 5, "seed": 1}
CHAT = {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
SSE_GET = "/v1/stream/sse?prompt=hi&max_tokens=5"

#: Every route that needs a credential: (method, path, JSON body).
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/stream/chunked", BODY),
    ("GET", SSE_GET, None),
    ("POST", "/v1/stream/sse", BODY),
    ("GET", "/v1/stream/ws", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("GET", "/v1/models", None),
    ("POST", "/v1/generations", BODY),
    ("GET", "/v1/generations/{id}/events", None),
    ("DELETE", "/v1/generations/{id}", None),
    ("POST", "/v1/tickets", {}),
]
ROUTE_IDS = [f"{method} {path.split('?')[0]}" for method, path, _ in ROUTES]

JWT_SECRET = "jwt-secret-for-tests-0123456789abcdef"
OTHER_SECRET = "some-other-secret-0123456789abcdefghij"
TICKET_SECRET = "ticket-secret-for-tests-0123456789abcdef"
AUDIENCE = "gateway-tests"
ISSUER = "https://issuer.test"
HS256_JWT = {
    "algorithms": ["HS256"],
    "secret": JWT_SECRET,
    "audience": AUDIENCE,
    "issuer": ISSUER,
    "leeway_s": 5,
}
#: A claim override that removes the claim.
DROP = object()


# -- requests ------------------------------------------------------------------------


def assert_unauthorized(status: int, headers: Any, raw: bytes, *, secret: str = "") -> str:
    """401, OpenAI's error shape with code `unauthorized`, a Bearer challenge, and
    not a trace of `secret`; the message."""
    assert status == 401, raw
    assert headers["Content-Type"].startswith("application/json")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    body = orjson.loads(raw)
    assert set(body) == {"error"}
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["message"]
    if secret:
        assert secret not in raw.decode()
    return str(body["error"]["message"])


async def mint(
    target: Target, headers: dict[str, str], body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """POST /v1/tickets: the ticket and its expiry."""
    status, _, raw = await fetch(target, "POST", "/v1/tickets", headers=headers, body=body)
    assert status == 201, raw
    minted: dict[str, Any] = orjson.loads(raw)
    return minted


async def create_generation(
    target: Target, headers: dict[str, str], body: dict[str, Any] = BODY
) -> str:
    """POST /v1/generations: the new generation's id."""
    status, _, raw = await fetch(target, "POST", "/v1/generations", headers=headers, body=body)
    assert status == 201, raw
    return str(orjson.loads(raw)["id"])


def generate_message(request_id: str = "r1") -> dict[str, Any]:
    """A WebSocket `generate` message for BODY."""
    return {"type": "generate", "request_id": request_id, **BODY}


async def assert_every_route_works(target: Target, headers: dict[str, str]) -> None:
    """The credential in `headers` is accepted on every transport and route."""
    status, _, raw = await fetch(target, "POST", "/v1/stream/chunked", headers=headers, body=BODY)
    assert status == 200, raw
    events = ndjson_events(raw)
    assert_well_formed(events)
    assert events[-1]["type"] == "done"

    status, _, raw = await fetch(target, "GET", SSE_GET, headers=headers)
    assert status == 200, raw
    assert_well_formed(sse_events(raw))

    status, _, raw = await fetch(target, "POST", "/v1/stream/sse", headers=headers, body=BODY)
    assert status == 200, raw
    assert_well_formed(sse_events(raw))

    frames = await ws_exchange(target, generate_message(), headers=headers)
    assert frames[-1]["type"] == "done"

    status, _, raw = await fetch(target, "POST", "/v1/chat/completions", headers=headers, body=CHAT)
    assert status == 200, raw
    assert orjson.loads(raw)["choices"][0]["message"]["content"]

    status, _, raw = await fetch(target, "GET", "/v1/models", headers=headers)
    assert status == 200, raw
    assert [m["id"] for m in orjson.loads(raw)["data"]] == ["sim-1"]

    generation_id = await create_generation(target, headers)
    events_path = f"/v1/generations/{generation_id}/events"
    status, _, raw = await fetch(target, "GET", events_path, headers=headers)
    assert status == 200, raw
    assert_well_formed(sse_events(raw))
    status, _, raw = await fetch(
        target, "DELETE", f"/v1/generations/{generation_id}", headers=headers
    )
    assert status == 204, raw

    status, _, raw = await fetch(target, "POST", "/v1/tickets", headers=headers)
    assert status == 201, raw


# -- tokens ----------------------------------------------------------------------------


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """One 2048-bit key per name, made once per test session."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(name: str) -> str:
    return (
        rsa_key(name)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for HS256_JWT (and RS256 with the same audience); DROP removes one."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


def hs_token(secret: str = JWT_SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def rs_token(key_name: str = "issuer", kid: str | None = None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**overrides), rsa_key(key_name), algorithm="RS256", headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built byte by byte, for what PyJWT refuses to sign (alg none, PEM as secret)."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)
