"""One error root for the whole gateway.

Every failure a client can see is a `GatewayError`: it knows its HTTP status
(used before a response is prepared) and its contract `code` (used in the
`error` event once streaming has started). `error_body` is the one place that
turns either into OpenAI's error shape.
"""

from __future__ import annotations

from typing import Any, ClassVar

#: OpenAI's `error.type` for each of our codes, so OpenAI SDKs classify them.
_OPENAI_TYPES: dict[str, str] = {
    "invalid_request": "invalid_request_error",
    "model_not_found": "invalid_request_error",
    "unauthorized": "authentication_error",
    "rate_limited": "rate_limit_error",
    "upstream_error": "api_error",
    "upstream_timeout": "api_error",
    "shutting_down": "api_error",
    "internal_error": "api_error",
}


class GatewayError(Exception):
    """An error with a contract code, an HTTP status and a retry hint."""

    #: Class defaults; an instance may override them (`status=`, `retryable=`).
    status: int = 500
    code: ClassVar[str] = "internal_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if status is not None:
            self.status = status
        if retryable is not None:
            self.retryable = retryable

    def event_fields(self) -> dict[str, Any]:
        """The fields of the terminal `error` event."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class InvalidRequest(GatewayError):
    status = 400
    code = "invalid_request"


class BodyTooLarge(InvalidRequest):
    status = 413


class UrlTooLong(InvalidRequest):
    status = 414


class BodyTimeout(InvalidRequest):
    """A body that trickles in (slowloris) holds a handler; it gets a deadline."""

    status = 408


class ModelNotFound(GatewayError):
    status = 404
    code = "model_not_found"


class GenerationNotFound(GatewayError):
    """Unknown, expired, or owned by another principal: all look the same."""

    status = 404
    code = "invalid_request"


class TooManyStreams(GatewayError):
    status = 429
    code = "rate_limited"
    retryable = True


class Overloaded(GatewayError):
    """`server.max_streams` reached: this replica sheds the stream, another may take it."""

    status = 503
    code = "rate_limited"
    retryable = True


class AnswerTooLarge(GatewayError):
    """One answer outgrew `streams.max_generation_bytes`: asking again gets the same."""

    status = 400
    code = "invalid_request"


class LogsFull(GatewayError):
    """This replica's running logs reached `streams.max_live_bytes`: another may have room."""

    status = 503
    code = "rate_limited"
    retryable = True


class UpstreamError(GatewayError):
    """The upstream failed. `status` is what the OpenAI-compatible route answers
    when this happens before the first token (429 stays 429 so SDKs back off)."""

    status = 502
    code = "upstream_error"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after_s: float | None = None,
        fallback: bool = True,
        result: str | None = None,
    ) -> None:
        super().__init__(message, status=status, retryable=retryable)
        #: The metric label of the upstream request: its HTTP status, or
        #: `connect_error`; None lets the metrics layer infer it.
        self.result = result
        #: The upstream's `Retry-After`, honoured by the retry loop.
        self.retry_after_s = retry_after_s
        #: False when another upstream would fail the same way (a bad request).
        self.fallback = fallback


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ShuttingDown(GatewayError):
    status = 503
    code = "shutting_down"
    retryable = True


class InternalError(GatewayError):
    status = 500
    code = "internal_error"


def error_body(code: str, message: str) -> dict[str, Any]:
    """OpenAI's error body, used on every route for HTTP errors."""
    error_type = _OPENAI_TYPES.get(code, "api_error")
    return {"error": {"type": error_type, "code": code, "message": message}}
