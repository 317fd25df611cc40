"""A fast fake OpenAI upstream for the benchmark suite, as a process.

    python -m bench.fast_upstream --port 9100

It answers `POST /v1/chat/completions` (stream: true) with OpenAI's real
`chat.completion.chunk` SSE frames, pre-encoded once at start-up so that the
upstream spends as little CPU as possible per token. The request chooses the
pacing through its model name, so the same upstream serves every scenario and
the gateway needs nothing but one model per pacing:

- `fast`: every token at once (written as fast as the socket takes them);
- `paced-<ms>`: a token every `<ms>` milliseconds;
- `paced-<ms>-first-<ms>`: and the first one after that long.

`max_tokens` is the number of content chunks. A request whose `X-Request-ID`
starts with `rec-` is recorded with the `time.monotonic()` (system-wide on Linux, so
comparable with the load generator's) of every token written and of the end;
`GET /stats?ids=a,b` returns them, `DELETE /stats` forgets them. The
disconnect scenario compares them with the moment the client dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

_PACING = re.compile(r"^paced-(\d+)(?:-first-(\d+))?$")
_CREATED = 1_700_000_000


def _frame(chunk: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


ROLE = _frame(_chunk({"role": "assistant", "content": ""}))
TOKEN = _frame(_chunk({"content": "tok "}))
DONE = b"data: [DONE]\n\n"


def _tail(tokens: int) -> bytes:
    usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
    return (
        _frame(_chunk({}, "length")) + _frame({**_chunk({}), "choices": [], "usage": usage}) + DONE
    )


@dataclass
class Record:
    """One request's token write times and how it ended."""

    token_times: list[float] = field(default_factory=list)
    ended_at: float | None = None
    outcome: str = "running"


class FastUpstream:
    def __init__(self) -> None:
        self.records: dict[str, Record] = {}

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        tokens = int(body.get("max_tokens") or 64)
        pacing = _PACING.match(str(body.get("model", "")))
        gap_s = int(pacing.group(1)) / 1000 if pacing else 0.0
        first_s = int(pacing.group(2)) / 1000 if pacing and pacing.group(2) else gap_s
        request_id = request.headers.get("X-Request-ID", "")
        if not request_id.startswith("rec-"):
            request_id = ""  # only the requests that ask for it are recorded
        record = Record()
        if request_id:
            self.records[request_id] = record
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            await response.write(ROLE)
            if gap_s == 0:
                # Unpaced: many tokens per write, as a fast server's socket would carry.
                for start in range(0, tokens, 32):
                    count = min(32, tokens - start)
                    await response.write(TOKEN * count)
                    if request_id:
                        record.token_times.extend([time.monotonic()] * count)
            else:
                await asyncio.sleep(first_s)
                for _ in range(tokens):
                    await response.write(TOKEN)
                    if request_id:
                        record.token_times.append(time.monotonic())
                    await asyncio.sleep(gap_s)
            await response.write(_tail(tokens))
            await response.write_eof()
            record.outcome = "completed"
        except (asyncio.CancelledError, ConnectionError):
            record.outcome = "disconnected"
            raise
        finally:
            record.ended_at = time.monotonic()
        return response

    async def stats(self, request: web.Request) -> web.Response:
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        chosen = {i: self.records[i] for i in ids if i in self.records}
        return web.json_response(
            {
                i: {"token_times": r.token_times, "ended_at": r.ended_at, "outcome": r.outcome}
                for i, r in chosen.items()
            },
            dumps=lambda data: orjson.dumps(data).decode(),
        )

    async def forget(self, request: web.Request) -> web.Response:
        self.records.clear()
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/stats", self.stats)
        app.router.add_delete("/stats", self.forget)
        app.router.add_get("/healthz", lambda request: web.json_response({"status": "ok"}))
        return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    from gateway.server import new_event_loop

    web.run_app(
        FastUpstream().app(),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        backlog=4096,
        loop=new_event_loop(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
