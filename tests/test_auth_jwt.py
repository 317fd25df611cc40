"""JWTs: HS256, RS256 with a PEM key or a JWKS endpoint, every way a token can be bad,
and the key-confusion attack, against a real gateway on a real socket."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiohttp import web
from jwt.algorithms import RSAAlgorithm

from gateway.auth import TICKET_AUDIENCE, TICKET_ISSUER
from tests.auth_helpers import (
    AUDIENCE,
    BODY,
    CLOSED,
    DROP,
    HS256_JWT,
    ISSUER,
    JWT_SECRET,
    KEY_A,
    OTHER_SECRET,
    TICKET_SECRET,
    assert_every_route_works,
    assert_unauthorized,
    b64url,
    claims,
    create_generation,
    hand_made_token,
    hs_token,
    public_pem,
    rs_token,
    rsa_key,
)
from tests.conftest import StartGateway
from tests.helpers import bearer, fetch

#: Every message a refused JWT may get.
JWT_REFUSALS = {
    "invalid token",
    "malformed token",
    "token expired",
    "token algorithm is not accepted",
    "invalid API key",  # not a JWT at all
}


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
