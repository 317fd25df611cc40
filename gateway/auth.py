"""Who is calling: API keys, JWT bearer tokens, stream tickets, or anonymous.

Credentials come from `Authorization: Bearer`, from `?access_token=` on the
GET stream routes only (EventSource and the browser WebSocket cannot set
headers), or from a configured cookie. A credential that is present but wrong
is always 401, even where anonymous access is allowed: a typo must not
silently downgrade a tenant to the anonymous budget.

Stream tickets are short-lived HS256 JWTs that we sign ourselves, bound to the
principal that minted them, so a backend that holds an API key can hand a
browser a credential without any JWT infrastructure of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import jwt

from gateway.config import ApiKey, AuthSettings, JwtSettings, Limits, Settings
from gateway.errors import GatewayError

PrincipalKind = Literal["key", "jwt", "ticket", "anonymous"]
TICKET_AUDIENCE = "gateway-stream-ticket"
TICKET_ISSUER = "gateway"
ANONYMOUS_ID = "anonymous"
#: GET routes whose clients cannot send headers, so `?access_token=` is accepted.
QUERY_TOKEN_ROUTES = ("/v1/stream/sse", "/v1/stream/ws", "/v1/generations/")
#: The parameter name with any of its characters percent-encoded (`access%5Ftoken` is
#: decoded to `access_token` by the query parser, so it is a credential too).
_TOKEN_NAME = "".join(f"(?:{re.escape(c)}|%{ord(c):02x})" for c in "access_token")
_TOKEN_IN_QUERY = re.compile(rf"({_TOKEN_NAME}=)[^&\s\"']*", re.IGNORECASE)


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="gateway"'})
        self.reason = reason


class Forbidden(GatewayError):
    status = 403
    code = "unauthorized"


@dataclass(frozen=True, slots=True)
class Principal:
    """`id` owns generations and appears in logs; `rate_key` is whose budget is charged."""

    id: str
    kind: PrincipalKind
    limits: Limits
    rate_key: str


def redact_tokens(text: str) -> str:
    """`…?access_token=abc` → `…?access_token=***`: for anything that reaches a log.

    Every match ends with `n=` or `%6e=` (any case), so lines without either,
    such as every JSON access line, skip the regex (it was 7% of the CPU of a
    refused request).
    """
    low = text.lower()
    if "n=" not in low and "%6e=" not in low:
        return text
    return _TOKEN_IN_QUERY.sub(r"\1***", text)


def client_ip(remote: str | None, forwarded_for: str | None, trusted: tuple[Any, ...]) -> str:
    """The caller's address; `X-Forwarded-For` counts only when it came through our proxies."""

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in trusted)

    address = remote or "unknown"
    if not forwarded_for or not is_trusted(address):
        return address
    # Walk from the nearest hop back; the first address we do not trust is the client.
    for hop in reversed([part.strip() for part in forwarded_for.split(",")]):
        if not hop:
            continue
        address = hop
        if not is_trusted(hop):
            break
    return address


class Authenticator:
    """Turns a credential into a `Principal`, or raises `Unauthorized`."""

    def __init__(self, settings: Settings) -> None:
        self._auth: AuthSettings = settings.auth
        self._default_limits = settings.rate_limit.default
        self._trusted = settings.server.trusted_proxies
        self._keys = [(bytes.fromhex(key.sha256), key) for key in settings.auth.api_keys]
        self._keys_by_id = {key.id: key for key in settings.auth.api_keys}
        secret = settings.auth.ticket_secret
        self._ticket_secret = (
            secret.get_secret_value().encode() if secret is not None else secrets.token_bytes(32)
        )
        self._jwks: jwt.PyJWKClient | None = None
        if self._auth.jwt is not None and self._auth.jwt.jwks_url:
            self._jwks = jwt.PyJWKClient(self._auth.jwt.jwks_url, cache_keys=True, lifespan=300)

    # -- credentials -----------------------------------------------------------

    def credential(
        self, method: str, path: str, headers: Any, query: Any, cookies: Any
    ) -> str | None:
        """The presented token, from the first source that has one."""
        header = headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("Authorization must be 'Bearer <token>'", "malformed")
            return token.strip()
        if "access_token" in query:
            if not self._auth.query_token:
                raise Unauthorized("access_token in the query is disabled", "query_disabled")
            if method != "GET" or not path.startswith(QUERY_TOKEN_ROUTES):
                raise Unauthorized(
                    "access_token is accepted only on GET stream routes; "
                    "send Authorization: Bearer instead",
                    "query_not_allowed",
                )
            return str(query["access_token"])
        if self._auth.cookie and self._auth.cookie in cookies:
            return str(cookies[self._auth.cookie])
        return None

    @property
    def _nothing_to_check(self) -> bool:
        """Anonymous with no key and no JWT configured (the loopback default)."""
        return self._auth.anonymous and not self._keys and self._auth.jwt is None

    async def authenticate(
        self, token: str | None, remote: str | None, xff: str | None
    ) -> Principal:
        if token is None or self._nothing_to_check:
            # With no credential configured a bearer is ignored: OpenAI SDKs
            # insist on sending a key, and there is none to check it against.
            if not self._auth.anonymous:
                raise Unauthorized(
                    "a credential is required: send Authorization: Bearer <key>", "missing"
                )
            ip = client_ip(remote, xff, self._trusted)
            return Principal(ANONYMOUS_ID, "anonymous", self._default_limits, "ip:" + ip)
        key = self._match_key(token)
        if key is not None:
            limits = key.limits or self._default_limits
            return Principal("key:" + key.id, "key", limits, "key:" + key.id)
        if token.count(".") == 2:
            return await self._verify_jwt(token)
        raise Unauthorized("invalid API key", "invalid_key")

    def _match_key(self, token: str) -> ApiKey | None:
        """Constant time: every configured key is compared, whatever matches first."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: ApiKey | None = None
        for expected, key in self._keys:
            if hmac.compare_digest(digest, expected):
                found = key
        return found

    # -- JWTs and tickets ------------------------------------------------------

    async def _verify_jwt(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("malformed token", "malformed_token") from None
        if claims.get("aud") == TICKET_AUDIENCE:
            return self._verify_ticket(token)
        settings = self._auth.jwt
        if settings is None:
            raise Unauthorized("invalid API key", "invalid_key")
        algorithm = header.get("alg")
        if algorithm not in settings.algorithms:
            raise Unauthorized(f"token algorithm {algorithm!r} is not accepted", "bad_algorithm")
        key = await self._verification_key(settings, algorithm, token)
        try:
            verified = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired", "expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}", "invalid_token") from None
        subject = str(verified["sub"])[:128]
        return Principal("sub:" + subject, "jwt", self._default_limits, "sub:" + subject)

    async def _verification_key(self, settings: JwtSettings, algorithm: str, token: str) -> Any:
        # One key per algorithm, never the RSA public key as an HMAC secret.
        if algorithm == "HS256":
            assert settings.secret is not None  # checked by the config
            return settings.secret.get_secret_value()
        if settings.public_key:
            return settings.public_key
        assert self._jwks is not None
        try:
            # PyJWKClient fetches with blocking urllib; keep it off the loop.
            signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"no signing key for this token: {exc}", "jwks") from None
        return signing_key.key

    def mint_ticket(self, principal: Principal, ttl_s: float | None = None) -> tuple[str, int]:
        """A short-lived credential for a browser, bound to `principal`."""
        if principal.kind == "anonymous":
            raise Unauthorized("tickets are minted only for a credential", "missing")
        if principal.kind == "ticket":
            raise Forbidden("a ticket cannot mint another ticket")
        ttl = min(ttl_s or self._auth.ticket_ttl_s, self._auth.ticket_ttl_s)
        # Rounded up: truncating could hand out a ticket that is already expired.
        expires_at = math.ceil(time.time() + ttl)
        claims = {
            "iss": TICKET_ISSUER,
            "aud": TICKET_AUDIENCE,
            "sub": principal.id,
            "exp": expires_at,
            "iat": int(time.time()),
            "jti": secrets.token_urlsafe(9),
        }
        return jwt.encode(claims, self._ticket_secret, algorithm="HS256"), expires_at

    def _verify_ticket(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._ticket_secret,
                algorithms=["HS256"],
                audience=TICKET_AUDIENCE,
                issuer=TICKET_ISSUER,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("ticket expired; mint a new one", "expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid ticket: {exc}", "invalid_ticket") from None
        owner = str(claims["sub"])
        limits = self._default_limits
        if owner.startswith("key:"):
            key = self._keys_by_id.get(owner[4:])
            if key is None:  # the key was removed since: its tickets die with it
                raise Unauthorized("invalid ticket: its key no longer exists", "invalid_ticket")
            limits = key.limits or self._default_limits
        return Principal(owner, "ticket", limits, owner)
