"""The request body shared by the chunked, SSE, WebSocket and generations routes.

Validation lives here so that every transport rejects the same inputs with
the same one-line messages (400 `invalid_request`).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.chat import (
    MAX_TEXT_CHARS,
    MAX_TOOLS,
    Message,
    NamedToolChoice,
    ReasoningEffort,
    ResponseFormat,
    Tool,
    ToolChoice,
    estimate_prompt_tokens,
)
from gateway.errors import InvalidRequest

#: Request fields an OpenAI-compatible upstream receives exactly as the client sent them.
FORWARDED_FIELDS: frozenset[str] = frozenset(
    {"tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort"}
)


class GenerationRequest(BaseModel):
    """A chat request. `prompt` is folded into `messages`, so providers see one shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(default=None, min_length=1, max_length=200)
    messages: tuple[Message, ...] | None = Field(default=None, min_length=1, max_length=1000)
    prompt: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, le=131_072)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = Field(default=(), max_length=4)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    on_disconnect: Literal["cancel", "finish"] = "cancel"
    tools: tuple[Tool, ...] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None

    # Not client fields: set by the gateway, read by upstream providers.
    _passthrough: dict[str, Any] = PrivateAttr(default_factory=dict)
    _request_id: str | None = PrivateAttr(default=None)

    def for_upstream(
        self, *, request_id: str | None, passthrough: dict[str, Any] | None = None
    ) -> GenerationRequest:
        """This request, now carrying the request id and the raw OpenAI fields an
        upstream should receive. Set in place, on private attributes: the fields
        the client sent stay as sent, and a request starts one generation (a
        `model_copy` was 2 % of a stream start's instructions)."""
        self._request_id = request_id
        if passthrough is not None:
            self._passthrough = passthrough
        return self

    @property
    def passthrough(self) -> dict[str, Any]:
        """Unknown OpenAI fields (tools, response_format, …) for an OpenAI-compatible upstream."""
        return self._passthrough

    @property
    def request_id(self) -> str | None:
        return self._request_id

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _exactly_one_input(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        if self.messages is None:
            user = Message(role="user", content=self.prompt or "")
            object.__setattr__(self, "messages", (user,))
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> GenerationRequest:
        """OpenAI's rules: choosing among tools needs tools, and a named one must be there."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise ValueError("tool_choice: only allowed when `tools` are given")
            if self.parallel_tool_calls is not None:
                raise ValueError("parallel_tool_calls: only allowed when `tools` are given")
        elif isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if all(tool.function.name != name for tool in self.tools):
                raise ValueError(f"tool_choice: names {name!r}, which is not in `tools`")
        return self

    @property
    def chat(self) -> tuple[Message, ...]:
        """The conversation; never None after validation."""
        assert self.messages is not None
        return self.messages

    @cached_property
    def prompt_tokens_estimate(self) -> int:
        """Computed once: admission, budgets and usage each ask (the request is frozen)."""
        return estimate_prompt_tokens(self.chat, self.tools)

    def forwarded_fields(self) -> dict[str, Any]:
        """The tool and output-shape fields the client set, as it sent them."""
        if self.model_fields_set.isdisjoint(FORWARDED_FIELDS):
            return {}  # the usual request: no `model_dump` walk per stream start
        return self.model_dump(include=set(FORWARDED_FIELDS), exclude_unset=True)


#: Pydantic's type errors, to which a string that should have been a number or a
#: boolean (`port: "8080"`) gets a hint: its message alone reads like a bad number.
_SCALAR_TYPE_ERRORS = frozenset({"int_type", "float_type", "bool_type"})


def _looks_scalar(text: str) -> bool:
    """A number or a boolean, once its quotes are gone."""
    if text.strip().lower() in ("true", "false"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def describe_validation_errors(exc: ValidationError) -> list[str]:
    """One line per bad field, e.g. ``server.port: Input should be a valid integer``.

    A list that is too short only because one of its items failed is that item's
    problem, not a second one (`models: [{provider: magic}]` is not an empty list)."""
    errors = exc.errors(include_url=False)
    has_inner_errors = {e["loc"][:depth] for e in errors for depth in range(len(e["loc"]))}
    lines = []
    for error in errors:
        if error["type"] == "too_short" and error["loc"] in has_inner_errors:
            continue
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in _SCALAR_TYPE_ERRORS and isinstance(error["input"], str):
            message += f", not the string {error['input'][:40]!r}"
            if _looks_scalar(error["input"]):
                message += " (write it without quotes)"
        lines.append(f"{where}: {message}" if where else message)
    return lines


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad field, e.g. ``max_tokens: Input should be ...``."""
    first, *rest = describe_validation_errors(exc)
    return f"{first} (and {len(rest)} more)" if rest else first


def parse_json_object(raw: bytes | str) -> dict[str, Any]:
    """Decode a JSON object or raise `InvalidRequest` saying why."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    return data


def parse_generation_request(data: dict[str, Any]) -> GenerationRequest:
    """Validate a request body, mapping pydantic errors to one-line 400s."""
    try:
        return GenerationRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
