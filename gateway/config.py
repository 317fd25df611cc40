"""Settings: the contract's `config.yaml` keys as pydantic models.

Loading order: YAML file, then `${VAR}` interpolation inside string values,
then `GATEWAY__SECTION__KEY` environment overrides, then validation. Any
failure is a `ConfigError` with one line per problem, each naming the bad
key, so a broken deploy says what to fix instead of printing a traceback.

Numbers and booleans are strict: `port: "8080"` or `anonymous: "false"` is
an error, not a silent conversion, so a value is what the file says (a
`${VAR}` gives a string: numbers come from `GATEWAY__…` overrides, which are
YAML).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

from gateway.schema import describe_validation_errors


class ConfigError(Exception):
    """A configuration problem: one line per problem, each naming its key."""


#: An HTTP header's name (RFC 9110 token) and a value that cannot start another header.
HeaderName = Annotated[str, Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
HeaderValue = Annotated[str, Field(pattern=r"^[^\r\n\x00]*$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Section):
    requests_per_minute: StrictInt = Field(default=60, ge=0)
    tokens_per_minute: StrictInt = Field(default=100_000, ge=0)
    concurrent_streams: StrictInt = Field(default=5, ge=0)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: StrictInt = Field(default=8080, ge=0, le=65535)
    metrics_port: StrictInt | None = Field(default=None, ge=0, le=65535)
    shutdown_grace_s: StrictFloat = Field(default=20, ge=0)
    max_body_bytes: StrictInt = Field(default=1_048_576, ge=1024)
    #: Extension of the contract: a request body must arrive within this (408 after).
    body_timeout_s: StrictFloat = Field(default=10, gt=0)
    #: Extension of the contract: a connection with no complete request head
    #: for this long is closed, on arrival and between keep-alive requests (it
    #: bounds slowloris headers). Keep it above your proxy's upstream keepalive
    #: (nginx: keepalive_timeout 60s in deploy/nginx), so the proxy closes first.
    idle_timeout_s: StrictFloat = Field(default=75, gt=0)
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: Extension of the contract: a cap on concurrent streams per replica (0: none),
    #: so an overloaded process sheds new streams with 503 instead of slowing all.
    max_streams: StrictInt = Field(default=0, ge=0)
    #: Extension of the contract: false turns every metric off (benchmarks measure the cost).
    metrics_enabled: StrictBool = True


class StreamSettings(_Section):
    backend: Literal["memory", "redis"] = "memory"
    heartbeat_s: StrictFloat = Field(default=15, gt=0)
    resume_grace_s: StrictFloat = Field(default=10, ge=0)
    retention_s: StrictFloat = Field(default=60, ge=0)
    #: Extension of the contract: the bound on finished logs kept for resume.
    retention_max_bytes: StrictInt = Field(default=64 * 1024 * 1024, ge=0)
    #: Extension of the contract: the bound on one running generation's log
    #: (its events' JSON plus their overhead); past it the answer ends in an error.
    max_generation_bytes: StrictInt = Field(default=32 * 1024 * 1024, ge=4096)
    #: Extension of the contract: the bound on the logs of all running generations
    #: of a replica; the generation whose append crosses it ends in an error.
    max_live_bytes: StrictInt = Field(default=256 * 1024 * 1024, ge=4096)
    write_timeout_s: StrictFloat = Field(default=30, gt=0)
    max_per_socket: StrictInt = Field(default=4, ge=1)
    #: Extension of the contract (`backend: redis`): how long a replica's claim on
    #: a running generation lasts unrefreshed; a crashed owner's followers get an
    #: error after it, and its keys expire three of these later.
    shared_log_lease_s: StrictFloat = Field(default=10, ge=0.5, le=300)
    #: Extension of the contract: a WebSocket's messages, sustained per second and
    #: in a burst; past them it is closed with 1008 (a flood, not a client).
    ws_messages_per_s: StrictFloat = Field(default=50, gt=0)
    ws_message_burst: StrictInt = Field(default=200, ge=1)
    #: Extension of the contract: open WebSockets per principal (per client IP when
    #: anonymous) on a replica; one more is refused with 429 (0: no cap).
    max_sockets_per_principal: StrictInt = Field(default=16, ge=0)
    #: Extension of the contract: the SSE `retry:` sent in the first frame.
    sse_retry_ms: StrictInt = Field(default=1000, ge=0)


class SimulatedModel(_Section):
    name: str = Field(min_length=1)
    provider: Literal["simulated"]
    tokens_per_second: StrictFloat = Field(default=50, gt=0)
    first_token_ms: StrictFloat = Field(default=150, ge=0)
    fail_after_tokens: StrictInt | None = Field(default=None, ge=0)
    #: Think this many tokens (`reasoning` events) before answering.
    reasoning_tokens: StrictInt = Field(default=0, ge=0, le=100_000)


class OpenAIModel(_Section):
    name: str = Field(min_length=1)
    provider: Literal["openai"]
    base_url: str = Field(default="https://api.openai.com/v1", pattern=r"^https?://[^/?#]+")
    api_key: SecretStr | None = None
    upstream_model: str | None = None
    #: Sent with every request as given: names are HTTP tokens, values one line.
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    timeout_s: StrictFloat = Field(default=60, gt=0)
    max_retries: StrictInt = Field(default=2, ge=0, le=10)
    fallbacks: tuple[str, ...] = ()
    #: Request fields of the OpenAI-compatible route forwarded as given: fields
    #: it does not know (400 otherwise) or that act on the upstream account
    #: (`store`, `metadata`, `service_tier`, `user`: dropped otherwise).
    passthrough: tuple[str, ...] = ()
    #: Extension of the contract: open connections to this upstream at most (one
    #: per running stream). The SDK's default, 1,000, queued streams past it.
    max_connections: StrictInt = Field(default=10_000, ge=1)


ModelSettings = Annotated[SimulatedModel | OpenAIModel, Field(discriminator="provider")]


class ApiKey(_Section):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    limits: Limits | None = None


class JwtSettings(_Section):
    algorithms: tuple[Literal["HS256", "RS256"], ...] = Field(default=("HS256",), min_length=1)
    secret: SecretStr | None = None
    public_key: str | None = None
    jwks_url: str | None = None
    #: Required: the `aud` this gateway's tokens carry. An explicit `null` opts
    #: out (only tokens without `aud` are then accepted, with a warning at start-up).
    audience: str | None = None
    issuer: str | None = None
    leeway_s: StrictFloat = Field(default=30, ge=0, le=600)

    @model_validator(mode="after")
    def _check_keys(self) -> JwtSettings:
        if "audience" not in self.model_fields_set:
            # Without it, a token the identity provider issued for any other
            # service (same issuer, same key) would be accepted here.
            raise ValueError(
                "audience: required (the `aud` your tokens carry for this gateway); "
                "set audience: null to accept only tokens without one"
            )
        if "HS256" in self.algorithms and self.secret is None:
            raise ValueError("secret: required when algorithms include HS256")
        if "RS256" in self.algorithms and not (self.public_key or self.jwks_url):
            raise ValueError("public_key: required (or jwks_url) when algorithms include RS256")
        return self


class AuthSettings(_Section):
    anonymous: StrictBool = True
    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtSettings | None = None
    #: `?access_token=` on GET stream routes: `true` takes stream tickets only,
    #: `any` keys and JWTs too (they end up in proxy logs), `false` none.
    query_token: bool | Literal["any"] = True
    #: A stream ticket opens one stream (used ticket ids are kept until they expire).
    tickets_single_use: StrictBool = False
    cookie: str | None = None
    #: Signs stream tickets; replicas must share it. None: random per process.
    ticket_secret: SecretStr | None = None
    ticket_ttl_s: StrictFloat = Field(default=300, gt=0, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _query_token_mode(cls, data: Any) -> Any:
        # Checked first, so the error is one line (not one per member of the union).
        value = data.get("query_token", True) if isinstance(data, dict) else True
        if not (isinstance(value, bool) or value == "any"):
            raise ValueError("query_token: must be true (stream tickets only), any, or false")
        return data


class RateLimitSettings(_Section):
    backend: Literal["memory", "redis"] = "memory"
    fail_open: StrictBool = True
    default: Limits = Limits()
    #: Tokens reserved for a request without `max_tokens`, reconciled at its end.
    default_reserve_tokens: StrictInt = Field(default=1024, ge=0)


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    #: Extension of the contract: one line per request or stream at its end.
    access_log: StrictBool = True


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    streams: StreamSettings = StreamSettings()
    models: tuple[ModelSettings, ...] = Field(
        default=(SimulatedModel(name="sim-1", provider="simulated"),), min_length=1
    )
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    redis: RedisSettings = RedisSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _check_cross_references(self) -> Settings:
        names = [m.name for m in self.models]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ValueError(f"models.{index}.name: duplicate model name {name!r}")
        for index, model in enumerate(self.models):
            for fallback in getattr(model, "fallbacks", ()):
                if fallback not in names:
                    raise ValueError(f"models.{index}.fallbacks: unknown model {fallback!r}")
        if self.auth.anonymous and not is_loopback(self.server.host):
            raise ValueError(
                "auth.anonymous: anonymous access is refused unless server.host is a "
                f"loopback address (server.host is {self.server.host!r})"
            )
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ENV_PREFIX = "GATEWAY__"


def _interpolate(value: Any, env: Mapping[str, str], where: str) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string of the tree."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}{k}.") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}{i}.") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{where.rstrip('.')}: environment variable {name} is not set")

    return _VAR.sub(replace, value)


def _apply_overrides(tree: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Apply `GATEWAY__SECTION__KEY=value`; values are parsed as YAML scalars."""
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: malformed override name")
        try:
            value = yaml.safe_load(env[name])
        except yaml.YAMLError:
            value = env[name]
        _set_path(tree, path, value, name)
    return tree


def _set_path(tree: Any, path: list[str], value: Any, origin: str) -> None:
    node = tree
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{origin}: no list item {part!r}")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
            if not last and not isinstance(node.get(key), dict | list):
                node[key] = {}
        else:
            raise ConfigError(f"{origin}: {'.'.join(path[:depth])} is not a section")
        if last:
            node[key] = value
        else:
            node = node[key]


def load_settings(
    path: str | Path | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, interpolate, apply env then `overrides` (`"server.port": 9000`), validate.

    Raises `ConfigError`.
    """
    env = os.environ if env is None else env
    tree: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: invalid YAML{line}") from None
        if tree is None:
            # An empty file is a mistake (a wrong path, a failed copy), not "all defaults".
            raise ConfigError(
                f"{path}: the file is empty; copy the repository's config.yaml to start from"
            )
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    tree = _apply_overrides(_interpolate(tree, env, ""), env)
    for dotted, value in (overrides or {}).items():
        _set_path(tree, dotted.split("."), value, dotted)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("\n".join(describe_validation_errors(exc))) from None
