"""Who is calling: API keys, JWT bearer tokens, stream tickets, or anonymous.

Credentials come from `Authorization: Bearer`, from `?access_token=` on the
GET stream routes only (EventSource and the browser WebSocket cannot set
headers), or from a configured cookie. Where keys or JWT are configured, a
credential that is present but wrong is always 401, even where anonymous
access is allowed: a typo must not silently downgrade a tenant to the
anonymous budget. With no credential configured at all (the loopback
default) there is no tenant to downgrade and nothing to check a bearer
against, so it is ignored: OpenAI SDKs refuse to run without some key.

Stream tickets are short-lived HS256 JWTs that we sign ourselves, bound to the
principal that minted them, so a backend that holds an API key can hand a
browser a credential without any JWT infrastructure of its own. A ticket opens
GET streams only (SSE, the WebSocket upgrade, a generation's events), from the
query, a header or the cookie; anything else (POST, DELETE, minting) needs the
key or JWT itself. `?access_token=` takes tickets only unless
`auth.query_token: any`: URLs end up in proxy access logs, and a ticket there
dies within minutes (or after one stream, with `auth.tickets_single_use`). A
ticket never outlives what minted it: it dies with its key, and one minted by
a JWT expires no later than that JWT.

Refusals carry fixed messages; PyJWT's reasons go to the log only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt

from gateway.config import ApiKey, AuthSettings, JwtSettings, Limits, Settings
from gateway.errors import GatewayError
from gateway.spent_tickets import (
    RedisSpentTickets,
    SpentTickets,
    UsedTickets,
)

log = logging.getLogger(__name__)

PrincipalKind = Literal["key", "jwt", "ticket", "anonymous"]
CredentialSource = Literal["header", "query", "cookie"]
TICKET_AUDIENCE = "gateway-stream-ticket"
TICKET_ISSUER = "gateway"
ANONYMOUS_ID = "anonymous"
#: GET routes whose clients cannot send headers (EventSource, the browser
#: WebSocket): the only ones that take `?access_token=`, and a ticket at all.
STREAM_GET_ROUTE = re.compile(r"/v1/stream/sse|/v1/stream/ws|/v1/generations/[^/]+/events")
#: A JWT `sub` longer than this is hashed into the principal id, never cut.
MAX_SUBJECT_CHARS = 128
TICKET_ROUTES_ONLY = (
    "a stream ticket opens GET streams only (/v1/stream/sse, /v1/stream/ws, "
    "/v1/generations/{id}/events); send your key or JWT as Authorization: Bearer"
)
QUERY_TICKETS_ONLY = (
    "access_token in the query takes a stream ticket only (mint one with POST "
    "/v1/tickets); send keys and JWTs as Authorization: Bearer"
)
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
    """`id` owns generations and appears in logs; `rate_key` is whose budget is charged.

    `expires_at` (epoch seconds) is when the credential itself expires (a JWT's or
    ticket's `exp`): a ticket minted from it must not live longer.
    """

    id: str
    kind: PrincipalKind
    limits: Limits
    rate_key: str
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Credential:
    """A presented token, where it came from, and whether the request is a GET
    stream route (the only place a stream ticket opens)."""

    token: str = field(repr=False)
    source: CredentialSource
    stream_get: bool


def is_stream_get(method: str, path: str) -> bool:
    return method == "GET" and STREAM_GET_ROUTE.fullmatch(path) is not None


def jwt_principal_id(subject: str) -> str:
    """`sub:<subject>`; a subject over 128 characters is hashed, never cut (two long
    subjects with a common start were one principal, sharing generations and budget).
    The `jwt:` prefix keeps hashed ids apart from every short subject."""
    if len(subject) <= MAX_SUBJECT_CHARS:
        return "sub:" + subject
    digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()
    return "jwt:sha256:" + digest


def _log_refusal(what: str, exc: Exception, token: str) -> None:
    """PyJWT's reason, for the operator only: the client gets a fixed message (the
    reason tells a forger which check to beat). The token itself is cut out."""
    detail = str(exc)
    for part in sorted({token, *token.split(".")}, key=len, reverse=True):
        if len(part) >= 8:
            detail = detail.replace(part, "***")
    level = logging.WARNING if isinstance(exc, jwt.PyJWKClientConnectionError) else logging.INFO
    log.log(
        level,
        "%s refused",
        what,
        extra={"error": type(exc).__name__, "detail": redact_tokens(detail[:300])},
    )


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
        self._spent_tickets: SpentTickets = UsedTickets()
        if self._auth.tickets_single_use and "redis" in (
            settings.streams.backend,
            settings.rate_limit.backend,
        ):
            self._spent_tickets = RedisSpentTickets(settings.redis.url)
        self._jwks: jwt.PyJWKClient | None = None
        if self._auth.jwt is not None and self._auth.jwt.jwks_url:
            self._jwks = jwt.PyJWKClient(self._auth.jwt.jwks_url, cache_keys=True, lifespan=300)
        if self._auth.jwt is not None and self._auth.jwt.audience is None:
            log.warning(
                "auth.jwt.audience is null: JWTs are not bound to this gateway (any token "
                "from the same issuer and key without an aud claim is accepted); set it"
            )
        if self._auth.query_token == "any":
            log.warning(
                "auth.query_token is any: API keys and JWTs are accepted in URLs, where "
                "proxy access logs keep them; prefer stream tickets (query_token: true)"
            )

    async def aclose(self) -> None:
        await self._spent_tickets.aclose()

    # -- credentials -----------------------------------------------------------

    def credential(
        self, method: str, path: str, headers: Any, query: Any, cookies: Any
    ) -> Credential | None:
        """The presented token, from the first source that has one."""
        stream_get = is_stream_get(method, path)
        header = headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("Authorization must be 'Bearer <token>'", "malformed")
            return Credential(token.strip(), "header", stream_get)
        if "access_token" in query:
            if not self._auth.query_token:
                raise Unauthorized("access_token in the query is disabled", "query_disabled")
            if not stream_get:
                raise Unauthorized(
                    "access_token is accepted only on GET stream routes; "
                    "send Authorization: Bearer instead",
                    "query_not_allowed",
                )
            return Credential(str(query["access_token"]), "query", stream_get)
        if self._auth.cookie and self._auth.cookie in cookies:
            return Credential(str(cookies[self._auth.cookie]), "cookie", stream_get)
        return None

    @property
    def _nothing_to_check(self) -> bool:
        """Anonymous with no key and no JWT configured (the loopback default)."""
        return self._auth.anonymous and not self._keys and self._auth.jwt is None

    async def authenticate(
        self, credential: Credential | str | None, remote: str | None, xff: str | None
    ) -> Principal:
        """A plain string counts as a bearer header on a route that is no GET stream."""
        if isinstance(credential, str):
            credential = Credential(credential, "header", stream_get=False)
        if credential is None or self._nothing_to_check:
            # With no credential configured a bearer is ignored: OpenAI SDKs
            # insist on sending a key, and there is none to check it against.
            if not self._auth.anonymous:
                raise Unauthorized(
                    "a credential is required: send Authorization: Bearer <key>", "missing"
                )
            ip = client_ip(remote, xff, self._trusted)
            return Principal(ANONYMOUS_ID, "anonymous", self._default_limits, "ip:" + ip)
        token = credential.token
        if credential.source == "query" and self._auth.query_token is True:
            # Tickets only: no key or JWT is even looked at, valid or not.
            if not self._is_ticket_shaped(token):
                raise Unauthorized(QUERY_TICKETS_ONLY, "query_not_ticket")
            return await self._verify_ticket(credential)
        key = self._match_key(token)
        if key is not None:
            limits = key.limits or self._default_limits
            return Principal("key:" + key.id, "key", limits, "key:" + key.id)
        if token.count(".") == 2:
            return await self._verify_jwt(credential)
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

    @staticmethod
    def _is_ticket_shaped(token: str) -> bool:
        """Claims (unverified) of a ticket: `_verify_ticket` then checks everything."""
        if token.count(".") != 2:
            return False
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("malformed token", "malformed_token") from None
        return claims.get("aud") == TICKET_AUDIENCE

    async def _verify_jwt(self, credential: Credential) -> Principal:
        token = credential.token
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("malformed token", "malformed_token") from None
        if claims.get("aud") == TICKET_AUDIENCE:
            return await self._verify_ticket(credential)
        settings = self._auth.jwt
        if settings is None:
            raise Unauthorized("invalid API key", "invalid_key")
        algorithm = header.get("alg")
        if algorithm not in settings.algorithms:
            raise Unauthorized("token algorithm is not accepted", "bad_algorithm")
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
            _log_refusal("jwt", exc, token)
            raise Unauthorized("invalid token", "invalid_token") from None
        principal_id = jwt_principal_id(str(verified["sub"]))
        return Principal(
            principal_id,
            "jwt",
            self._default_limits,
            principal_id,
            expires_at=float(verified["exp"]),
        )

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
            _log_refusal("jwt", exc, token)
            raise Unauthorized("no signing key for this token", "jwks") from None
        return signing_key.key

    def mint_ticket(self, principal: Principal, ttl_s: float | None = None) -> tuple[str, int]:
        """A short-lived credential for a browser, bound to `principal`, expiring
        no later than the credential that asked for it."""
        if principal.kind == "anonymous":
            raise Unauthorized("tickets are minted only for a credential", "missing")
        if principal.kind == "ticket":  # refused before this (tickets open GET streams only)
            raise Unauthorized(TICKET_ROUTES_ONLY, "ticket_not_allowed")
        now = time.time()
        ttl = min(ttl_s or self._auth.ticket_ttl_s, self._auth.ticket_ttl_s)
        # Rounded up: truncating could hand out a ticket that is already expired.
        expires_at = math.ceil(now + ttl)
        if principal.expires_at is not None:
            # Rounded down: the ticket must not outlive the JWT, even by a second.
            ceiling = math.floor(principal.expires_at)
            if ceiling <= now:  # accepted within the leeway, but nothing left to lend
                raise Unauthorized("token expired", "expired")
            expires_at = min(expires_at, ceiling)
        claims = {
            "iss": TICKET_ISSUER,
            "aud": TICKET_AUDIENCE,
            "sub": principal.id,
            "exp": expires_at,
            "iat": int(now),
            "jti": secrets.token_urlsafe(9),
        }
        return jwt.encode(claims, self._ticket_secret, algorithm="HS256"), expires_at

    async def _verify_ticket(self, credential: Credential) -> Principal:
        if not credential.stream_get:
            raise Unauthorized(TICKET_ROUTES_ONLY, "ticket_not_allowed")
        try:
            claims = jwt.decode(
                credential.token,
                self._ticket_secret,
                algorithms=["HS256"],
                audience=TICKET_AUDIENCE,
                issuer=TICKET_ISSUER,
                options={"require": ["exp", "sub", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("ticket expired; mint a new one", "expired") from None
        except jwt.PyJWTError as exc:
            _log_refusal("ticket", exc, credential.token)
            raise Unauthorized("invalid ticket", "invalid_ticket") from None
        owner = str(claims["sub"])
        limits = self._default_limits
        if owner.startswith("key:"):
            key = self._keys_by_id.get(owner[4:])
            if key is None:  # the key was removed since: its tickets die with it
                raise Unauthorized("invalid ticket: its key no longer exists", "invalid_ticket")
            limits = key.limits or self._default_limits
        elif not owner.startswith(("sub:", "jwt:")) or self._auth.jwt is None:
            # A JWT subject's ticket dies with the JWT configuration.
            raise Unauthorized("invalid ticket: its credential no longer exists", "invalid_ticket")
        expires_at = float(claims["exp"])
        if self._auth.tickets_single_use and not await self._spent_tickets.use(
            str(claims["jti"]), expires_at
        ):
            raise Unauthorized(
                "this stream ticket was already used (auth.tickets_single_use); mint a new one",
                "ticket_used",
            )
        return Principal(owner, "ticket", limits, owner, expires_at=expires_at)
