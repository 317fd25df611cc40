"""Authentication and browser safety, against a real gateway on a real socket.

API keys (as `gateway hash-key` prints them), JWTs (HS256, RS256 with a PEM
key or a JWKS endpoint), stream tickets, the `access_token` query parameter
and the cookie; generation ownership; `Origin` checks and CORS; constant-time
key matching; log redaction and the client address behind trusted proxies.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gc
import hashlib
import hmac
import io
import ipaddress
import json
import statistics
import sys
import time
from typing import Any

import aiohttp
import jwt
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway import cli
from gateway.auth import TICKET_AUDIENCE, TICKET_ISSUER, Authenticator, client_ip, redact_tokens
from tests.conftest import TEST_API_KEY, TEST_KEY_CONFIG, UNLIMITED, StartGateway, make_settings
from tests.helpers import assert_well_formed
from tests.rawclient import open_stream
from tests.sse_parser import SseParser

KEY_A = TEST_API_KEY
KEY_B = "gw_second_tenant_key_for_auth_tests"
WRONG_KEY = "gw_this_key_was_never_configured"


def key_config(key_id: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"id": key_id, "sha256": hashlib.sha256(key.encode()).hexdigest(), **extra}


#: Two tenants, no anonymous access.
CLOSED: dict[str, Any] = {
    "anonymous": False,
    "api_keys": [{**TEST_KEY_CONFIG, "limits": UNLIMITED}, key_config("other", KEY_B)],
}
OPEN_WITH_KEYS: dict[str, Any] = {**CLOSED, "anonymous": True}

BODY = {"prompt": "Tell me about caching.", "max_tokens": 5, "seed": 1}
CHAT = {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
#: Slow enough that a generation is still running while another tenant pokes at it.
SLOW = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 150, "first_token_ms": 0}

#: Every route that needs a credential: (method, path, JSON body).
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/stream/chunked", BODY),
    ("GET", "/v1/stream/sse?prompt=hi&max_tokens=5", None),
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
DROP = object()
#: Every message a refused JWT may get.
JWT_REFUSALS = {
    "invalid token",
    "malformed token",
    "token expired",
    "token algorithm is not accepted",
    "invalid API key",  # not a JWT at all
}


# -- helpers -------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def fetch(
    server: TestServer,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    query: dict[str, str] | None = None,
) -> tuple[int, Any, bytes]:
    """One request on a fresh session: status, headers, the whole body."""
    url = server.make_url(path)
    if query:
        url = url.update_query(query)
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, json=body) as response:
            return response.status, response.headers, await response.read()


async def mint(
    server: TestServer, headers: dict[str, str], body: dict[str, Any] | None = None
) -> dict[str, Any]:
    status, _, raw = await fetch(server, "POST", "/v1/tickets", headers=headers, body=body)
    assert status == 201, raw
    return orjson.loads(raw)


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    parser = SseParser()
    parser.feed(raw)
    return [orjson.loads(event.data) for event in parser.events]


def ndjson_events(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in raw.split(b"\n") if line.strip()]


def assert_unauthorized(status: int, headers: Any, raw: bytes, *, secret: str = "") -> str:
    """401, OpenAI's error shape with code `unauthorized`, and a Bearer challenge."""
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
    return body["error"]["message"]


async def create_generation(
    server: TestServer, headers: dict[str, str], body: dict[str, Any] = BODY
) -> str:
    status, _, raw = await fetch(server, "POST", "/v1/generations", headers=headers, body=body)
    assert status == 201, raw
    return orjson.loads(raw)["id"]


async def ws_exchange(
    server: TestServer,
    message: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    origin: str | None = None,
) -> list[dict[str, Any]]:
    """Open a socket, send one message, read its frames up to the terminal one."""
    url = server.make_url("/v1/stream/ws")
    if query:
        url = url.update_query(query)
    frames: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers=headers, origin=origin) as ws,
    ):
        await ws.send_json(message)
        async with asyncio.timeout(5):
            while True:
                frame = await ws.receive_json()
                if frame.get("request_id") != message["request_id"]:
                    continue
                frames.append(frame)
                if frame["type"] in {"done", "error"}:
                    return frames


def generate_message(request_id: str = "r1") -> dict[str, Any]:
    return {"type": "generate", "request_id": request_id, **BODY}


async def assert_every_route_works(server: TestServer, headers: dict[str, str]) -> None:
    """The credential in `headers` is accepted on every transport and route."""
    status, _, raw = await fetch(server, "POST", "/v1/stream/chunked", headers=headers, body=BODY)
    assert status == 200, raw
    events = ndjson_events(raw)
    assert_well_formed(events)
    assert events[-1]["type"] == "done"

    sse_get = "/v1/stream/sse?prompt=hi&max_tokens=5"
    status, _, raw = await fetch(server, "GET", sse_get, headers=headers)
    assert status == 200, raw
    assert_well_formed(sse_events(raw))

    status, _, raw = await fetch(server, "POST", "/v1/stream/sse", headers=headers, body=BODY)
    assert status == 200, raw
    assert_well_formed(sse_events(raw))

    frames = await ws_exchange(server, generate_message(), headers=headers)
    assert frames[-1]["type"] == "done"

    status, _, raw = await fetch(server, "POST", "/v1/chat/completions", headers=headers, body=CHAT)
    assert status == 200, raw
    assert orjson.loads(raw)["choices"][0]["message"]["content"]

    status, _, raw = await fetch(server, "GET", "/v1/models", headers=headers)
    assert status == 200, raw
    assert [m["id"] for m in orjson.loads(raw)["data"]] == ["sim-1"]

    generation_id = await create_generation(server, headers)
    status, _, raw = await fetch(
        server, "GET", f"/v1/generations/{generation_id}/events", headers=headers
    )
    assert status == 200, raw
    assert_well_formed(sse_events(raw))
    status, _, raw = await fetch(
        server, "DELETE", f"/v1/generations/{generation_id}", headers=headers
    )
    assert status == 204, raw

    status, _, raw = await fetch(server, "POST", "/v1/tickets", headers=headers)
    assert status == 201, raw


# -- JWT helpers -----------------------------------------------------------------


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
    """Valid claims for the HS256/RS256 settings above; DROP removes one."""
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


# -- every route refuses a bad credential ---------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_closed_gateway_refuses_missing_wrong_and_malformed_credentials(
    start_gateway: StartGateway, method: str, path: str, body: dict[str, Any] | None
) -> None:
    server = await start_gateway(auth=CLOSED)
    # A real generation of the caller-to-be, so only auth can refuse the id routes.
    path = path.format(id=await create_generation(server, bearer(KEY_A)))
    attempts = [  # (headers, what must not be echoed)
        ({}, ""),
        (bearer(WRONG_KEY), WRONG_KEY),
        (bearer(KEY_A + "x"), KEY_A + "x"),
        (bearer(KEY_A.upper()), KEY_A.upper()),
        (bearer("a.b.c"), ""),
        ({"Authorization": KEY_A}, KEY_A),
        ({"Authorization": f"Token {KEY_A}"}, KEY_A),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "dXNlcjpwYXNz"),
        ({"Authorization": "Bearer"}, ""),
    ]
    for headers, presented in attempts:
        status, response_headers, raw = await fetch(
            server, method, path, headers=headers, body=body
        )
        assert_unauthorized(status, response_headers, raw, secret=presented)
    if path == "/v1/stream/ws":
        async with aiohttp.ClientSession() as session:
            for headers, _ in attempts[:3]:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(server.make_url(path), headers=headers)
                assert refused.value.status == 401


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


async def test_probes_need_no_credential(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED)
    for path in ("/healthz", "/readyz"):
        for headers in ({}, bearer(WRONG_KEY), {"Authorization": "garbage"}):
            status, _, raw = await fetch(server, "GET", path, headers=headers)
            assert status == 200, (path, headers, raw)
    status, _, _ = await fetch(server, "GET", "/v1/models")
    assert status == 401


async def test_dot_segments_do_not_reach_routes_past_auth(start_gateway: StartGateway) -> None:
    """`/static/` and the probes are open; a path through them must not open a stream route."""
    server = await start_gateway(auth=CLOSED)
    for path in (
        "/static/../v1/stream/chunked",
        "/static/%2e%2e/v1/stream/chunked",
        "/static/..%2fv1/stream/chunked",
        "/healthz/../v1/stream/chunked",
    ):
        reader, writer = await open_stream(server.port, path, BODY)
        try:
            status_line = await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()
        # 405: the static route matched and refuses POST; no stream route was reached.
        assert status_line.split()[1] in {b"401", b"404", b"405"}, (path, status_line)


# -- API keys ----------------------------------------------------------------------


def hash_key_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str, stdin: str = ""
) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert cli.main(["hash-key", *args]) == 0
    return capsys.readouterr().out


async def test_keys_from_hash_key_work_on_every_route(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    chosen = "gw_chosen_by_the_operator_0123"
    chosen_sha = hash_key_cli(monkeypatch, capsys, stdin=chosen + "\n").strip()
    printed = dict(
        line.split(":", 1) for line in hash_key_cli(monkeypatch, capsys, "--new").splitlines()
    )
    new_key, new_sha = printed["key"].strip(), printed["sha256"].strip()
    assert len(chosen_sha) == len(new_sha) == 64
    server = await start_gateway(
        auth={
            "anonymous": False,
            "api_keys": [{"id": "chosen", "sha256": chosen_sha}, {"id": "new", "sha256": new_sha}],
        }
    )
    await assert_every_route_works(server, bearer(chosen))
    await assert_every_route_works(server, {"Authorization": f"bearer {new_key}"})
    # The hash itself is not a credential.
    status, headers, raw = await fetch(server, "GET", "/v1/models", headers=bearer(chosen_sha))
    assert_unauthorized(status, headers, raw)


# -- JWT -----------------------------------------------------------------------------


async def test_valid_hs256_jwt_works_and_its_subject_owns_its_generations(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(auth={**CLOSED, "jwt": HS256_JWT})
    await assert_every_route_works(server, bearer(hs_token()))
    # Inside the leeway an expired token is still accepted.
    status, _, raw = await fetch(
        server, "GET", "/v1/models", headers=bearer(hs_token(exp=int(time.time()) - 2))
    )
    assert status == 200, raw

    generation_id = await create_generation(server, bearer(hs_token()))
    events = f"/v1/generations/{generation_id}/events"
    # Ownership follows `sub`, not the token: a fresh token for alice sees it.
    status, _, raw = await fetch(server, "GET", events, headers=bearer(hs_token(jti="second")))
    assert status == 200, raw
    for stranger in (hs_token(sub="bob"), hs_token(sub="key:test"), KEY_A):
        status, _, raw = await fetch(server, "GET", events, headers=bearer(stranger))
        assert status == 404, raw


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda: hs_token(exp=int(time.time()) - 60), id="expired-beyond-leeway"),
        pytest.param(lambda: hs_token(secret=OTHER_SECRET), id="wrong-signature"),
        pytest.param(
            lambda: hand_made_token({"alg": "none", "typ": "JWT"}, claims(), None), id="alg-none"
        ),
        pytest.param(
            lambda: hand_made_token({"alg": "None", "typ": "JWT"}, claims(), None), id="alg-None"
        ),
        pytest.param(
            lambda: hand_made_token({"alg": "HS512", "typ": "JWT"}, claims(), JWT_SECRET.encode()),
            id="alg-not-configured",
        ),
        pytest.param(lambda: rs_token(), id="rs256-when-only-hs256"),
        pytest.param(lambda: hs_token(aud="someone-else"), id="wrong-audience"),
        pytest.param(lambda: hs_token(aud=DROP), id="missing-audience"),
        pytest.param(lambda: hs_token(iss="https://evil.example"), id="wrong-issuer"),
        pytest.param(lambda: hs_token(exp=DROP), id="missing-exp"),
        pytest.param(lambda: hs_token(sub=DROP), id="missing-sub"),
        pytest.param(lambda: hs_token(nbf=int(time.time()) + 120), id="not-yet-valid"),
        pytest.param(lambda: hs_token()[:-4] + "AAAA", id="tampered-signature"),
        pytest.param(
            lambda: hs_token().split(".")[0] + "." + b64url(b'{"sub":"bob"') + ".x",
            id="garbage-payload",
        ),
    ],
)
async def test_bad_jwts_are_401(start_gateway: StartGateway, make_token: Any) -> None:
    server = await start_gateway(auth={**CLOSED, "jwt": HS256_JWT})
    token = make_token()
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/generations", BODY)):
        status, headers, raw = await fetch(server, method, path, headers=bearer(token), body=body)
        message = assert_unauthorized(status, headers, raw, secret=token)
        # Fixed messages: PyJWT's reason (which check failed) is for the log only.
        assert message in JWT_REFUSALS, message
    # The same gateway accepts a good token: the refusal was about the token.
    status, _, _ = await fetch(server, "GET", "/v1/models", headers=bearer(hs_token()))
    assert status == 200


async def test_jwt_is_refused_when_no_jwt_is_configured(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED)
    status, headers, raw = await fetch(server, "GET", "/v1/models", headers=bearer(hs_token()))
    assert_unauthorized(status, headers, raw)


async def test_a_jwt_cannot_pose_as_a_stream_ticket(start_gateway: StartGateway) -> None:
    """Signed by the JWT issuer, shaped like a ticket for key `test`: not a ticket."""
    server = await start_gateway(auth={**CLOSED, "jwt": HS256_JWT, "ticket_secret": TICKET_SECRET})
    generation_id = await create_generation(server, bearer(KEY_A))
    forged = hs_token(aud=TICKET_AUDIENCE, iss=TICKET_ISSUER, sub="key:test")
    status, headers, raw = await fetch(
        server, "GET", f"/v1/generations/{generation_id}/events", headers=bearer(forged)
    )
    assert_unauthorized(status, headers, raw)


async def test_rs256_with_a_public_key(start_gateway: StartGateway) -> None:
    settings = {"algorithms": ["RS256"], "public_key": public_pem("issuer"), "audience": AUDIENCE}
    server = await start_gateway(auth={**CLOSED, "jwt": settings})
    await assert_every_route_works(server, bearer(rs_token(iss=DROP)))
    for token in (
        rs_token("stranger"),  # signed by another key
        rs_token(exp=int(time.time()) - 120),
        rs_token(aud="other"),
        hs_token(),  # HS256 is not configured
    ):
        status, headers, raw = await fetch(server, "GET", "/v1/models", headers=bearer(token))
        assert_unauthorized(status, headers, raw)


async def test_rs256_with_a_jwks_url(start_gateway: StartGateway, aiohttp_server: Any) -> None:
    jwk = RSAAlgorithm.to_jwk(rsa_key("issuer").public_key(), as_dict=True)
    fetched: list[str] = []

    async def jwks(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.json_response({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]})

    jwks_app = web.Application()
    jwks_app.router.add_get("/.well-known/jwks.json", jwks)
    jwks_server = await aiohttp_server(jwks_app)
    settings = {
        "algorithms": ["RS256"],
        "jwks_url": str(jwks_server.make_url("/.well-known/jwks.json")),
        "audience": AUDIENCE,
        "issuer": ISSUER,
    }
    server = await start_gateway(auth={**CLOSED, "jwt": settings})
    await assert_every_route_works(server, bearer(rs_token(kid="k1")))
    assert fetched, "the gateway never fetched the JWKS"
    for token in (
        rs_token("stranger", kid="k1"),  # right kid, wrong key
        rs_token(kid="k2"),  # unknown kid
        rs_token(kid="k1", iss="https://evil.example"),
    ):
        status, headers, raw = await fetch(server, "GET", "/v1/models", headers=bearer(token))
        message = assert_unauthorized(status, headers, raw)
        assert message in {*JWT_REFUSALS, "no signing key for this token"}, message


async def test_rsa_public_key_as_hmac_secret_is_refused(start_gateway: StartGateway) -> None:
    """The key-confusion attack: HS256 "signed" with the (public) RS256 key."""
    pem = public_pem("issuer")
    settings = {**HS256_JWT, "algorithms": ["HS256", "RS256"], "public_key": pem}
    server = await start_gateway(auth={**CLOSED, "jwt": settings})
    # Both configured algorithms work with their own keys.
    for token in (hs_token(), rs_token()):
        status, _, raw = await fetch(server, "GET", "/v1/models", headers=bearer(token))
        assert status == 200, raw
    header = {"alg": "HS256", "typ": "JWT"}
    for secret in (pem, pem.strip(), pem.replace("\n", "\r\n")):
        forged = hand_made_token(header, claims(sub="mallory"), secret.encode())
        status, headers, raw = await fetch(server, "GET", "/v1/models", headers=bearer(forged))
        assert_unauthorized(status, headers, raw)


# -- query token and cookie --------------------------------------------------------


async def test_query_token_any_accepts_keys_on_get_stream_routes(
    start_gateway: StartGateway,
) -> None:
    """`auth.query_token: any` keeps the old behaviour: a key in the URL (the default,
    `true`, takes tickets only: tests/test_credentials.py)."""
    server = await start_gateway(auth={**CLOSED, "query_token": "any"})
    query = {"access_token": KEY_A}
    status, _, raw = await fetch(
        server, "GET", "/v1/stream/sse?prompt=hi&max_tokens=5", query=query
    )
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
    encoded = server.make_url("/v1/stream/sse?prompt=hi&max_tokens=5&access%5Ftoken=" + KEY_A)
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
    for path in (
        "/v1/stream/sse?prompt=hi&max_tokens=5",
        "/v1/stream/ws",
        f"/v1/generations/{generation_id}/events",
    ):
        for token in (KEY_A, ticket):  # not even a ticket
            status, headers, raw = await fetch(server, "GET", path, query={"access_token": token})
            assert "disabled" in assert_unauthorized(status, headers, raw)
        # The same ticket as a bearer still opens the stream.
        if path != "/v1/stream/ws":
            status, _, raw = await fetch(server, "GET", path, headers=bearer(ticket))
            assert status == 200, raw
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await ws_exchange(server, generate_message(), query=query)
    assert refused.value.status == 401
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


# -- stream tickets ------------------------------------------------------------------


async def test_ticket_streams_as_the_key_that_minted_it(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED)
    before = time.time()
    minted = await mint(server, bearer(KEY_A))
    assert set(minted) == {"ticket", "expires_at"}
    assert isinstance(minted["expires_at"], int)
    assert before + 299 <= minted["expires_at"] <= time.time() + 301
    ticket = {"access_token": minted["ticket"]}

    status, _, raw = await fetch(
        server, "GET", "/v1/stream/sse?prompt=hi&max_tokens=5", query=ticket
    )
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


async def test_forged_and_expired_tickets_are_401(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth={**CLOSED, "ticket_secret": TICKET_SECRET})
    path = "/v1/stream/sse?prompt=hi&max_tokens=5"
    # A ticket made with the configured secret is a ticket: the crafting is right.
    good = jwt.encode(ticket_claims(), TICKET_SECRET, algorithm="HS256")
    status, _, raw = await fetch(server, "GET", path, query={"access_token": good})
    assert status == 200, raw
    for bad in (
        jwt.encode(ticket_claims(exp=int(time.time()) - 30), TICKET_SECRET, algorithm="HS256"),
        jwt.encode(ticket_claims(), OTHER_SECRET, algorithm="HS256"),
        jwt.encode(ticket_claims(sub="key:removed"), TICKET_SECRET, algorithm="HS256"),
        jwt.encode(ticket_claims(iss="someone"), TICKET_SECRET, algorithm="HS256"),
        jwt.encode(ticket_claims(jti=DROP), TICKET_SECRET, algorithm="HS256"),
        # A JWT subject's ticket, but no JWT is configured (any more).
        jwt.encode(ticket_claims(sub="sub:alice"), TICKET_SECRET, algorithm="HS256"),
        jwt.encode(ticket_claims(sub="anonymous"), TICKET_SECRET, algorithm="HS256"),
        hand_made_token({"alg": "none", "typ": "JWT"}, ticket_claims(), None),
    ):
        status, headers, raw = await fetch(server, "GET", path, query={"access_token": bad})
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
    path = "/v1/stream/sse?prompt=hi&max_tokens=5"
    status, _, raw = await fetch(server, "GET", path, headers=bearer(minted["ticket"]))
    assert status == 200, raw
    await asyncio.sleep(max(0.0, minted["expires_at"] - time.time()) + 0.05)
    status, headers, raw = await fetch(server, "GET", path, query=query)
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
    ticket = (await mint(minting, bearer(KEY_A)))["ticket"]
    path = "/v1/stream/sse?prompt=hi&max_tokens=5"
    status, _, raw = await fetch(sibling, "GET", path, headers=bearer(ticket))
    assert status == 200, raw
    for server in (key_removed, own_secret):
        status, headers, raw = await fetch(server, "GET", path, headers=bearer(ticket))
        assert_unauthorized(status, headers, raw)


# -- ownership ----------------------------------------------------------------------


async def test_another_key_cannot_see_touch_or_resume_a_generation(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(auth=CLOSED, models=[SLOW], streams={"resume_grace_s": 5})
    generation_id = await create_generation(server, bearer(KEY_A), {**BODY, "max_tokens": 60})
    events = f"/v1/generations/{generation_id}/events"
    resume = {"Last-Event-ID": f"{generation_id}:0"}
    ws_resume = {
        "type": "resume",
        "generation_id": generation_id,
        "after_seq": 0,
        "request_id": "r2",
    }
    b, a = bearer(KEY_B), bearer(KEY_A)

    status, _, raw = await fetch(server, "GET", events, headers=b)
    assert status == 404, raw
    status, _, raw = await fetch(server, "DELETE", f"/v1/generations/{generation_id}", headers=b)
    assert status == 404, raw
    status, _, raw = await fetch(server, "GET", "/v1/stream/sse", headers={**b, **resume})
    assert status == 404, raw
    status, _, raw = await fetch(
        server, "POST", "/v1/stream/sse", headers={**b, **resume}, body=BODY
    )
    assert status == 404, raw
    frames = await ws_exchange(server, ws_resume, headers=b)
    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["code"] == "invalid_request" and "generation_id" not in frames[0]

    # The owner can do all of it, and the stranger's DELETE cancelled nothing.
    frames = await ws_exchange(server, ws_resume, headers=a)
    assert_well_formed(frames, first_seq=1)
    status, _, raw = await fetch(server, "GET", "/v1/stream/sse", headers={**a, **resume})
    assert status == 200, raw
    resumed = sse_events(raw)
    assert_well_formed(resumed, first_seq=1)
    assert resumed == [
        {k: v for k, v in f.items() if k not in {"request_id", "generation_id"}} for f in frames
    ]
    status, _, raw = await fetch(server, "GET", events, headers=a)
    assert status == 200, raw
    full = sse_events(raw)
    assert full[-1]["type"] == "done" and full[-1]["finish_reason"] == "length"
    status, _, raw = await fetch(
        server, "POST", "/v1/stream/sse", headers={**a, **resume}, body=BODY
    )
    assert status == 200, raw
    status, _, raw = await fetch(server, "DELETE", f"/v1/generations/{generation_id}", headers=a)
    assert status == 204, raw


# -- Origin and CORS -----------------------------------------------------------------


async def test_websocket_origin_is_checked(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED, server={"allowed_origins": ["https://app.example"]})
    own = f"http://127.0.0.1:{server.port}"
    ticket = (await mint(server, bearer(KEY_A)))["ticket"]
    for origin in (
        "https://evil.example",
        f"http://127.0.0.1:{server.port + 1}",
        "null",
        "https://app.example.evil.example",
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await ws_exchange(server, generate_message(), headers=bearer(KEY_A), origin=origin)
        assert refused.value.status == 403, origin
        # A query ticket (what a browser would use) does not help either.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await ws_exchange(
                server, generate_message(), query={"access_token": ticket}, origin=origin
            )
        assert refused.value.status == 403, origin
    for origin in (own, "https://app.example", None):
        frames = await ws_exchange(
            server, generate_message(), query={"access_token": ticket}, origin=origin
        )
        assert frames[-1]["type"] == "done", origin


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
    app_origin = "https://app.example"
    server = await start_gateway(auth=CLOSED, server={"allowed_origins": [app_origin]})
    preflight = {
        "Origin": app_origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = await fetch(server, "OPTIONS", "/v1/stream/chunked", headers=preflight)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == app_origin
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "Origin" in headers.get("Vary", "")

    foreign = {**preflight, "Origin": "https://evil.example"}
    status, headers, _ = await fetch(server, "OPTIONS", "/v1/stream/chunked", headers=foreign)
    assert status == 403
    assert "Access-Control-Allow-Origin" not in headers

    cross = {**bearer(KEY_A), "Origin": app_origin, "X-Request-ID": "req-42"}
    status, headers, raw = await fetch(
        server, "POST", "/v1/stream/chunked", headers=cross, body=BODY
    )
    assert status == 200, raw
    assert headers["Access-Control-Allow-Origin"] == app_origin
    exposed = [h.strip() for h in headers["Access-Control-Expose-Headers"].split(",")]
    assert "X-Request-ID" in exposed
    assert headers["X-Request-ID"] == "req-42"
    # A refusal is readable by the allowed page too (so it can tell the user why).
    status, headers, raw = await fetch(
        server, "POST", "/v1/stream/chunked", headers={"Origin": app_origin}, body=BODY
    )
    assert_unauthorized(status, headers, raw)
    assert headers["Access-Control-Allow-Origin"] == app_origin
    # No Origin, no CORS headers.
    status, headers, _ = await fetch(
        server, "POST", "/v1/stream/chunked", headers=bearer(KEY_A), body=BODY
    )
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


# -- constant-time key comparison -------------------------------------------------------


def test_key_matching_takes_the_same_time_whatever_the_key() -> None:
    keys = [f"gw_tenant_{n:02d}_abcdefghijklmnopqrstuvwxyz0123" for n in range(10)]
    settings = make_settings(
        auth={
            "anonymous": False,
            "api_keys": [key_config(f"k{n}", key) for n, key in enumerate(keys)],
        }
    )
    authenticator = Authenticator(settings)
    tokens = {
        "first": keys[0],
        "last": keys[-1],
        "last-but-one-char": keys[-1][:-1] + "!",
        "unrelated": "x" * len(keys[0]),
    }
    assert authenticator._match_key(tokens["first"]).id == "k0"
    assert authenticator._match_key(tokens["last"]).id == "k9"
    assert authenticator._match_key(tokens["last-but-one-char"]) is None
    assert authenticator._match_key(tokens["unrelated"]) is None

    def per_call_ns(iterations: int = 4_000, batches: int = 15) -> dict[str, float]:
        """The fastest of many short batches per token: the batch least disturbed by
        other processes (the median of a few long batches swings on a busy 2-core box)."""
        match = authenticator._match_key
        samples: dict[str, list[float]] = {name: [] for name in tokens}
        gc.disable()
        try:
            for _ in range(batches):
                for name, token in tokens.items():  # interleaved, so drift hits all alike
                    start = time.perf_counter_ns()
                    for _ in range(iterations):
                        match(token)
                    samples[name].append((time.perf_counter_ns() - start) / iterations)
        finally:
            gc.enable()
        return {name: min(values) for name, values in samples.items()}

    # An early exit makes "first" about half of "last"; noise is retried, a leak is not.
    for _attempt in range(3):
        timings = per_call_ns()
        reference = statistics.median(timings.values())
        ratios = {name: value / reference for name, value in timings.items()}
        if all(0.7 <= ratio <= 1.4 for ratio in ratios.values()):
            break
    assert all(0.7 <= ratio <= 1.4 for ratio in ratios.values()), timings
    assert 0.7 <= timings["first"] / timings["last"] <= 1.4, timings


# -- log redaction and the client address -------------------------------------------------


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
