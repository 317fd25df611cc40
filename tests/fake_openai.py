"""A fake OpenAI-compatible upstream: the real chat.completion.chunk SSE wire, over HTTP.

Knobs are plain attributes set per test; every request and the moment each
streaming client went away are recorded, so tests can prove that cancelling a
generation really closes the upstream connection.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Recorded:
    body: dict[str, Any]
    headers: dict[str, str]
    closed_at: float | None = None  # time.monotonic() when the client hung up mid-stream


@dataclass
class FakeOpenAI:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " wor", "ld", "!"])
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    finish_reason: str = "stop"
    fail_status: int | None = None
    fail_times: int = 0
    retry_after: str | None = None
    fail_message: str = "fake failure"
    drop_after: int | None = None  # abort the TCP connection after N tokens
    hang_after: int | None = None  # stop sending (but keep the connection) after N tokens
    error_after: int | None = None  # an in-stream `{"error": …}` after N tokens
    malformed_after: int | None = None
    omit_finish: bool = False
    record: bool = True  # a benchmark keeps no history
    requests: list[Recorded] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        record = Recorded(body, dict(request.headers))
        if self.record:
            self.requests.append(record)
        if self.fail_status is not None and len(self.requests) <= self.fail_times:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            error = {"message": self.fail_message, "type": "server_error"}
            return web.json_response({"error": error}, status=self.fail_status, headers=headers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await self._stream(request, response, body)
        except (asyncio.CancelledError, ConnectionError):
            record.closed_at = time.monotonic()
            raise
        return response

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, body: dict[str, Any]
    ) -> None:
        async def send(chunk: dict[str, Any]) -> None:
            frame = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body.get("model"),
                **chunk,
            }
            await response.write(b"data: " + orjson.dumps(frame) + b"\n\n")

        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        await asyncio.sleep(self.first_token_delay_s)
        await send(choice({"role": "assistant", "content": ""}))
        for index, token in enumerate(self.tokens):
            if index == self.drop_after:
                assert request.transport is not None
                request.transport.abort()
                return
            if index == self.hang_after:
                await asyncio.sleep(3600)
            if index == self.error_after:
                await response.write(b'data: {"error": {"message": "model crashed"}}\n\n')
                return
            if index == self.malformed_after:
                await response.write(b"data: {not json\n\n")
                return
            if index:
                await asyncio.sleep(self.token_delay_s)
            await send(choice({"content": token}))
        if self.omit_finish:
            await response.write(b"data: [DONE]\n\n")
            return
        await send(choice({}, self.finish_reason))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": 7,
                "completion_tokens": len(self.tokens),
                "total_tokens": 7 + len(self.tokens),
            }
            await send({"choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
