"""Any OpenAI-compatible upstream (OpenAI, vLLM, Ollama, llama.cpp, Azure OpenAI).

The request goes through `openai.AsyncOpenAI` (auth, base URL, headers, one
connection pool per upstream, on the SDK's aiohttp transport), but the
stream is read raw: the SDK's typed
chunk parsing costs ~150 µs a chunk against ~3 µs for `iter_lines` plus
orjson (NOTES §5), and we only need the delta text, the finish reason and
the usage. Retries happen one level up (`resilience.py`), before the first
token only, so the SDK's own retries are off.

Cancellation: the generation task is cancelled; leaving the `async with`
closes the HTTP response, which closes the upstream TCP connection.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx2
import openai
import orjson

from gateway.config import OpenAIModel
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.providers.base import Finish, FinishReason, Usage
from gateway.schema import GenerationRequest

#: Status codes worth another try before the first token (as the SDK's own policy).
RETRYABLE_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_KEY_LIKE = re.compile(r"\b(sk|key|Bearer)[-_ ][A-Za-z0-9*._-]{4,}", re.IGNORECASE)
_CONNECT_TIMEOUT_S = 10.0


def redact(text: str, secret: str | None) -> str:
    """Remove our key and anything key-shaped from an upstream's message."""
    if secret:
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub(lambda m: f"{m.group(1)}-***", text)[:500]


class OpenAIProvider:
    """Streams one chat completion from an OpenAI-compatible endpoint."""

    kind = "openai"

    def __init__(self, model: OpenAIModel) -> None:
        self._model = model
        self._key = model.api_key.get_secret_value() if model.api_key else None
        self._label = f"upstream {model.name!r} ({model.base_url})"
        self._client = openai.AsyncOpenAI(
            api_key=self._key or "none",
            base_url=model.base_url,
            default_headers=model.headers or None,
            max_retries=0,
            # The SDK's aiohttp transport: ~28% less CPU per paced token than
            # httpx2's own (bench/openai_proxy.py), on the loop we already run.
            http_client=openai.DefaultAioHttpClient(
                limits=httpx2.Limits(
                    max_connections=model.max_connections, max_keepalive_connections=100
                )
            ),
            timeout=httpx2.Timeout(
                model.timeout_s, connect=min(_CONNECT_TIMEOUT_S, model.timeout_s)
            ),
        )

    async def aclose(self) -> None:
        await self._client.close()

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        extra: dict[str, Any] = dict(request.passthrough)
        body: dict[str, Any] = {
            "model": self._model.upstream_model or self._model.name,
            "messages": extra.pop("messages", None) or [m.model_dump() for m in request.chat],
            "stream": True,
            "stream_options": {**extra.pop("stream_options", {}), "include_usage": True},
        }
        # Sampling parameters only when the client chose them: the upstream's own
        # defaults differ from ours, and reasoning models refuse any but their own.
        for name in ("temperature", "top_p"):
            if name in request.model_fields_set:
                body[name] = getattr(request, name)
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        for name in ("stream", "model"):
            extra.pop(name, None)
        return {**extra, **body}

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Finish]:
        body = self._body(request)
        headers = {"X-Request-ID": request.request_id} if request.request_id else None
        responded = False
        try:
            # First token within timeout_s (the read timeout bounds each gap after it).
            async with asyncio.timeout(self._model.timeout_s) as first_token_deadline:
                async with self._client.chat.completions.with_streaming_response.create(
                    **body, extra_headers=headers
                ) as response:
                    responded = True
                    async for item in self._read(response.iter_lines(), request):
                        if first_token_deadline.when() is not None:
                            first_token_deadline.reschedule(None)
                        yield item
        except TimeoutError:
            message = f"{self._label} sent no token within {self._model.timeout_s} s"
            raise UpstreamTimeout(message) from None
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None
        except (openai.APIConnectionError, httpx2.HTTPError) as exc:
            timed_out = isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException)
            if timed_out and not _refused(exc):
                raise UpstreamTimeout(f"{self._label} timed out") from None
            raise UpstreamError(
                f"{self._label} connection failed: {_cause_name(exc)}",
                result="stream_error" if responded else "connect_error",
            ) from None

    async def _read(
        self, lines: AsyncIterator[str], request: GenerationRequest
    ) -> AsyncIterator[str | Finish]:
        """Parse `data:` lines; yield text deltas, then one `Finish`."""
        finish_reason: str | None = None
        usage: Usage | None = None
        deltas = 0
        async for line in lines:
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = self._parse(payload)
            usage = _usage(chunk.get("usage")) or usage
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                text = (choice.get("delta") or {}).get("content")
                if text:
                    deltas += 1
                    yield text
                finish_reason = choice.get("finish_reason") or finish_reason
        if finish_reason is None:
            raise UpstreamError(f"{self._label} ended the stream without a finish reason")
        if usage is None:  # servers that ignore stream_options
            prompt = sum(max(1, math.ceil(len(m.content) / 4)) for m in request.chat)
            usage = Usage(prompt, deltas)
        reason: FinishReason = "length" if finish_reason == "length" else "stop"
        yield Finish(reason, usage)

    def _parse(self, payload: str) -> dict[str, Any]:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"{self._label} sent a malformed chunk") from None
        if not isinstance(chunk, dict):
            raise UpstreamError(f"{self._label} sent a malformed chunk")
        if "error" in chunk:  # vLLM and others report failures inside the stream
            error = chunk["error"] if isinstance(chunk["error"], Mapping) else {}
            message = redact(str(error.get("message", "unknown error")), self._key)
            raise UpstreamError(f"{self._label} failed mid-stream: {message}")
        return chunk

    def _status_error(self, exc: openai.APIStatusError) -> UpstreamError:
        status = exc.status_code
        message = redact(_error_message(exc), self._key)
        text = f"{self._label} answered {status}: {message}"
        if status in RETRYABLE_STATUSES:
            retry_after = _retry_after(exc.response.headers.get("retry-after"))
            return UpstreamError(
                text,
                status=429 if status == 429 else 502,
                retry_after_s=retry_after,
                result=str(status),
            )
        # 400: the request is bad everywhere; 401/403/404: this upstream's
        # configuration is. None of them heals by retrying.
        return UpstreamError(
            text,
            status=400 if status in {400, 422} else 502,
            retryable=False,
            fallback=status not in {400, 422},
            result=str(status),
        )


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _refused(exc: BaseException) -> bool:
    """The SDK's aiohttp transport reports a refused connection as `ConnectTimeout`."""
    return any(
        isinstance(e, aiohttp.ClientConnectorError | ConnectionRefusedError) for e in _causes(exc)
    )


def _cause_name(exc: BaseException) -> str:
    """The innermost type: `ClientConnectorError` says more than `APIConnectionError`."""
    return type(_causes(exc)[-1]).__name__


def _usage(data: Any) -> Usage | None:
    if not isinstance(data, Mapping):
        return None
    prompt, completion = data.get("prompt_tokens"), data.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return Usage(prompt, completion)
    return None


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
    return exc.response.reason_phrase or "error"


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None
