"""Any OpenAI-compatible upstream (OpenAI, vLLM, Ollama, llama.cpp, Azure OpenAI).

The chat completion is requested over our own small HTTP/1.1 client
(`upstream_http.py`: aiohttp's client did it before, and cost more per
read and per request) and its stream read raw. The `openai` SDK did this
job first; on its aiohttp transport it still
cost ~30% of the gateway's CPU per paced token (request building with its
typed transforms, then five async-iterator layers of httpx2 per chunk,
py-spy under bench/suite.py S3), for what is one POST and a line splitter:
the chunks are decoded by msgspec into small structs (`openai_chunks.py`)
and only the delta text, the finish reason and the usage are kept (the SDK's
typed chunks cost ~155 µs each against ~3 µs for raw lines and orjson,
measured here; msgspec halved orjson's share since). The SDK stays the reference client
in the tests. Retries happen one level up (`resilience.py`), before the first token
only.

Cancellation: the generation task is cancelled; leaving the `async with`
closes the HTTP response, which closes the upstream TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from typing import Any

import aiohttp
import orjson
from msgspec import UNSET
from yarl import URL

from gateway.config import OpenAIModel
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.events import dumps_compact
from gateway.providers.base import Deliver, Delta, Deltas, Finish, Item, Usage
from gateway.providers.openai_chunks import Chunk, MalformedChunk, decode_chunk
from gateway.providers.openai_deltas import DeltaReader
from gateway.providers.upstream_http import (
    Consume,
    Exchange,
    UpstreamConnectError,
    UpstreamLate,
    UpstreamPool,
    UpstreamSilent,
)
from gateway.schema import GenerationRequest

log = logging.getLogger(__name__)
#: A read longer than this (about ten chunks) that brings the first token: the
#: token goes to the client before the rest of the read is parsed.
FIRST_TOKEN_ALONE_BYTES = 2048

#: Status codes worth another try before the first token (as the SDK's own policy).
RETRYABLE_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_KEY_LIKE = re.compile(r"\b(sk|key|Bearer)[-_ ][A-Za-z0-9*._-]{4,}", re.IGNORECASE)
_CONNECT_TIMEOUT_S = 10.0
_MAX_ERROR_BODY = 64 * 1024
#: One SSE line (one chunk) at most; a 1 MiB delta is ~1 MiB plus its JSON.
MAX_LINE_BYTES = 8 * 1024 * 1024
#: The payload of each `data:` line, with a CRLF's `\r` (JSON allows the blanks
#: left around it). Found by one regex call per read, not a Python loop over
#: lines: a fast upstream packs dozens of chunks (and as many blank separator
#: lines) into a read, and that loop was 15 % of the gateway's CPU under bench
#: S2 (py-spy). `.*`, not `[^\r\n]*`: `re` tests a class byte by byte and
#: `.` far faster, 25 µs against 110 µs for a read of 64 chunks (10 KB).
#: Greedy only: no backtracking, linear in the read.
_DATA_PAYLOADS = re.compile(rb"^data:[ \t]*(.*)", re.MULTILINE)
USER_AGENT = "ai-stream-gateway/0.1"


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
        # Clients see the model's name only: the URL may name internal hosts or
        # carry credentials. It goes to the log, with any userinfo redacted.
        self._label = f"upstream {model.name!r}"
        self._logged_url = _without_userinfo(model.base_url)
        # Parsed once, into the request line and Host header of every request.
        url = URL(model.base_url.rstrip("/") + "/chat/completions")
        self._url = url.with_user(None).with_password(None) if url.user else url
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            # A compressed stream would be held back until a block fills.
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
            **_authorization(self._key, url),
            **model.headers,
        }
        self._connections: UpstreamPool | None = None

    def _pool(self) -> UpstreamPool:
        """One pool per upstream, made in the running loop on first use."""
        if self._connections is None:
            self._connections = UpstreamPool(
                self._url,
                headers=self._headers,
                limit=self._model.max_connections,
                connect_timeout_s=min(_CONNECT_TIMEOUT_S, self._model.timeout_s),
            )
        return self._connections

    async def aclose(self) -> None:
        if self._connections is not None:
            await self._connections.aclose()

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        extra: dict[str, Any] = dict(request.passthrough)
        body: dict[str, Any] = {
            "model": self._model.upstream_model or self._model.name,
            "messages": [m.for_upstream() for m in request.chat],
            **request.forwarded_fields(),
            "stream": True,
            "stream_options": {**extra.pop("stream_options", {}), "include_usage": True},
        }
        # Sampling parameters only when the client chose them: the upstream's own
        # defaults differ from ours, and reasoning models refuse any but their own.
        for name in ("temperature", "top_p"):
            if name in request.model_fields_set:
                body[name] = getattr(request, name)
        if request.max_tokens is not None and "max_completion_tokens" not in extra:
            body["max_tokens"] = request.max_tokens
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        for name in ("stream", "model"):
            extra.pop(name, None)
        return {**extra, **body}

    async def stream(
        self, request: GenerationRequest, deliver: Deliver | None = None
    ) -> AsyncGenerator[Item, None]:
        # Right-sized: the body lives as long as the stream (10,000 streams
        # held 34 MB of orjson's 4 KiB buffers, tracemalloc under S5's load).
        body = dumps_compact(self._body(request))
        extra = {"X-Request-ID": request.request_id} if request.request_id else {}
        responded = False
        try:
            try:
                # First token within timeout_s; no silence longer than timeout_s
                # after it. Both on the exchange's one timer: an `asyncio.timeout`
                # here (its handle, its rescheduling, its exit) was 2 % of a start.
                timeout_s = self._model.timeout_s
                deadline = asyncio.get_running_loop().time() + timeout_s
                async with self._pool().post(body, extra, timeout_s, deadline) as response:
                    if response.status != 200:
                        raise await self._status_error(response)
                    responded = True
                    # Closed here, not left to the garbage collector: an
                    # unclosed async generator is finalised through
                    # `call_soon_threadsafe` (an eventfd write, a wake-up and
                    # a task per stream; seen in strace under bench `starts`).
                    reads = self._read(response, request, deliver)
                    async with contextlib.aclosing(reads):
                        async for item in reads:
                            response.lift_deadline()
                            yield item
            except UpstreamSilent:
                silent = (
                    f"{self._label} was silent for {self._model.timeout_s} s or did not connect"
                )
                raise UpstreamTimeout(silent) from None
            except UpstreamLate:
                message = f"{self._label} sent no token within {self._model.timeout_s} s"
                raise UpstreamTimeout(message) from None
            except UpstreamConnectError as exc:
                raise UpstreamError(
                    f"{self._label} connection failed: {_cause_name(exc)}", result="connect_error"
                ) from None
            except ConnectionError as exc:
                raise UpstreamError(
                    f"{self._label} connection failed: {_cause_name(exc)}",
                    result="stream_error" if responded else "connect_error",
                ) from None
        except UpstreamError as exc:
            log.warning(
                "upstream failed",
                extra={
                    "model": self._model.name,
                    "upstream": self._logged_url,
                    "error": exc.message,
                    "request_id": request.request_id,
                },
            )
            raise

    async def _read(
        self, response: Exchange, request: GenerationRequest, deliver: Deliver | None
    ) -> AsyncGenerator[Item, None]:
        """Yield the deltas of each read, then one `Finish`.

        With `deliver`, only the first read's deltas are yielded: the rest of
        the body is parsed inside the connection's read callback and each
        read's deltas handed to `deliver` there (`Exchange.follow`), which
        saves a task switch and this generator chain per upstream read.
        """
        chunks = _ChunkStream(self._label, self._parse)
        first_yielded = False
        while not chunks.ended:
            data = await response.readany()
            if not data:
                if not chunks.rest:
                    break
                data = b"\n"  # the last line had no newline
            if not first_yielded and len(data) > FIRST_TOKEN_ALONE_BYTES:
                # The first token is not held behind the parse of the rest of a
                # long read (3 µs a chunk: 0.2 ms for a fast upstream's 64): it
                # is yielded alone, and a loop turn lets the handler write it
                # before the rest is parsed. Not for a short read (a one-token
                # answer), where the turn, a second feed and a second write to
                # the client would cost more than the parse (callgrind: +1-5 %
                # of a one-token stream's instructions).
                item, failure, data = chunks.feed_first(data)
                if item is not None:
                    first_yielded = True
                    yield item
                    if data and failure is None:
                        await asyncio.sleep(0)
                        item, failure = chunks.feed(data)
                        if item is not None and not chunks.hold(item, failure):
                            yield item
            else:
                item, failure = chunks.feed(data)
                if item is not None:
                    first_yielded = True
                    if not chunks.hold(item, failure):
                        yield item
            if failure is not None:
                raise failure
            if first_yielded and deliver is not None and not chunks.ended:
                await response.follow(chunks.consumer(deliver))
                break
        try:
            finish = chunks.finish(request.prompt_tokens_estimate)
        except UpstreamError:
            if chunks.held is not None:
                yield chunks.held  # the text before the failure still goes out
            raise
        yield finish

    def _parse(self, payload: bytes) -> Chunk:
        try:
            chunk = decode_chunk(payload)
        except MalformedChunk:
            raise UpstreamError(f"{self._label} sent a malformed chunk") from None
        if chunk.error is not UNSET:  # vLLM and others report failures inside the stream
            error = chunk.error if isinstance(chunk.error, Mapping) else {}
            message = redact(str(error.get("message", "unknown error")), self._key)
            raise UpstreamError(f"{self._label} failed mid-stream: {message}")
        return chunk

    async def _status_error(self, response: Exchange) -> UpstreamError:
        status = response.status
        raw = await response.read(_MAX_ERROR_BODY)
        message = redact(_error_message(raw, response.reason), self._key)
        text = f"{self._label} answered {status}: {message}"
        if status in RETRYABLE_STATUSES:
            retry_after = _retry_after(response.headers.get("retry-after"))
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


class _ChunkStream:
    """The `data:` lines of one answer, parsed read by read.

    Lines are split here from whatever each read returns (a fast upstream
    sends dozens of events per read), with no generator layer in between:
    `feed` runs once per upstream read. A read of plain text gives a
    `list[str]` (or one `str`); only a delta with more than text in it
    (reasoning, a tool call …) goes through `DeltaReader`. A line over
    `MAX_LINE_BYTES` fails the stream, so an upstream that never sends a
    newline cannot grow our memory without end.
    """

    __slots__ = (
        "_label",
        "_others",
        "_parse",
        "deltas",
        "ended",
        "finish_reason",
        "held",
        "rest",
        "usage",
    )

    def __init__(self, label: str, parse: Callable[[bytes], Chunk]) -> None:
        self._label = label
        self._parse = parse
        self._others = DeltaReader(label)
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.deltas = 0
        self.rest = b""
        self.ended = False
        #: The deltas of the read that ended the answer, for its `Finish`.
        self.held: Deltas | None = None

    def feed(self, data: bytes) -> tuple[Deltas | None, UpstreamError | None]:
        """One read's deltas as one item (None: none), and the failure that
        followed them: the deltas before a bad line still go out."""
        if self.rest:
            data = self.rest + data
        end = data.rfind(b"\n")  # what follows the last newline waits for the next read
        self.rest = data[end + 1 :]
        # Blank separators, comments and `event:` lines are skipped by the regex.
        payloads = _DATA_PAYLOADS.findall(data, 0, end) if end >= 0 else ()
        return self._items(payloads)

    def feed_first(self, data: bytes) -> tuple[Deltas | None, UpstreamError | None, bytes]:
        """`feed` up to the payload that brings the first deltas (or a failure,
        or the end); also returns the part of `data` not fed yet."""
        data, self.rest = self.rest + data, b""
        end = data.rfind(b"\n")
        if end >= 0:
            for match in _DATA_PAYLOADS.finditer(data, 0, end):
                item, failure = self._items((match.group(1),))
                if item is not None or failure is not None or self.ended:
                    return item, failure, data[match.end() :]
        self.rest = data[end + 1 :]
        return None, self._line_too_long(), b""

    def _items(self, payloads: Iterable[bytes]) -> tuple[Deltas | None, UpstreamError | None]:
        texts: list[Delta] = []
        mixed = False
        failure: UpstreamError | None = None
        try:
            for payload in payloads:
                if payload[:6] == b"[DONE]" and not payload[6:].strip():
                    self.ended = True
                    break
                chunk = self._parse(payload)
                if chunk.usage is not None:
                    self.usage = _usage(chunk.usage) or self.usage
                for choice in chunk.choices or ():
                    if choice.index != 0:
                        continue
                    delta = choice.delta or {}
                    text = delta.get("content")
                    if len(delta) > ("role" in delta) + (text is not None):
                        mixed = self._others.read(delta, texts) or mixed  # more than text
                    elif text:
                        texts.append(text)
                    if choice.finish_reason:
                        self.finish_reason = choice.finish_reason
        except UpstreamError as exc:
            failure = exc
        if failure is None:
            failure = self._line_too_long()
        if not texts:
            return None, failure
        # What one read brought is logged, woken and written as one batch.
        self.deltas += len(texts)
        if mixed:
            return tuple(texts), failure
        return (texts[0] if len(texts) == 1 else texts), failure  # type: ignore[return-value]

    def _line_too_long(self) -> UpstreamError | None:
        if len(self.rest) > MAX_LINE_BYTES:
            return UpstreamError(f"{self._label} sent a line over {MAX_LINE_BYTES} bytes")
        return None

    def hold(self, item: Deltas, failure: UpstreamError | None) -> bool:
        """Keep the deltas of the read that ended the answer for its `Finish`
        (logged and written with the end, in one send); False: not the end."""
        if not self.ended or failure is not None:
            return False
        self.held = item
        return True

    def consumer(self, deliver: Deliver) -> Consume:
        """`feed` for `Exchange.follow`: each read's deltas go to `deliver` as they come."""
        feed = self.feed

        def consume(data: bytes, at_eof: bool) -> bool:
            if at_eof and self.rest:
                data += b"\n"  # the last line had no newline
            if data:
                item, failure = feed(data)
                if item is not None and not self.hold(item, failure):
                    deliver(item)
                if failure is not None:
                    raise failure
            return self.ended

        return consume

    def finish(self, prompt_tokens_estimate: int) -> Finish:
        if self.finish_reason is None:
            raise UpstreamError(f"{self._label} ended the stream without a finish reason")
        # Servers that ignore stream_options report no usage: count what came.
        usage = self.usage or Usage(prompt_tokens_estimate, self.deltas)
        return Finish(self._others.finish_reason(self.finish_reason), usage, self.held)


def _authorization(key: str | None, url: URL) -> dict[str, str]:
    """The `api_key` as a bearer; else credentials written in the URL, as Basic auth.

    aiohttp refuses a URL with credentials next to an `Authorization` header
    (a ValueError on every request), so the URL never carries them itself.
    """
    if key:
        return {"Authorization": f"Bearer {key}"}
    if url.user:
        return {"Authorization": aiohttp.encode_basic_auth(url.user, url.password or "")}
    return {}


def _without_userinfo(url: str) -> str:
    """The URL with any `user:password@` replaced, for logs."""
    parsed = URL(url)
    return str(parsed.with_user(None).with_password(None)) if parsed.user else url


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


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


def _error_message(raw: bytes, reason: str | None) -> str:
    """OpenAI's `{"error": {"message": …}}`, a bare `{"message": …}`, or the reason phrase."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str) and inner:
            return inner
    return reason or "error"


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None
