"""The baseline: a bare aiohttp SSE handler with the simulated model's pacing.

Every figure the gateway benchmark reports is a ratio against this server,
measured in the same run, so the noise of a shared 2-core machine cancels out.
It does the least any streaming server must do: parse the JSON body, wait the
model's first-token delay, then write one SSE frame per token on absolute
deadlines. No auth, no event log, no resume, no heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

from gateway.server import new_event_loop

WORDS = ("Latency ", "adds ", "up ", "quickly: ", "a ", "request ", "from ", "東京 ", "spends ")


def make_app(tokens_per_second: float, first_token_ms: float) -> web.Application:
    interval = 1.0 / tokens_per_second

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stream(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        max_tokens = int(body.get("max_tokens", 200))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        start = loop.time() + first_token_ms / 1000
        for seq in range(max_tokens):
            delay = start + seq * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            data = orjson.dumps({"type": "token", "text": WORDS[seq % len(WORDS)]})
            await response.write(b"id: b:%d\nevent: token\ndata: %s\n\n" % (seq, data))
        await response.write(b'event: done\ndata: {"type":"done"}\n\n')
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/stream/sse", stream)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-per-second", type=float, default=50)
    parser.add_argument("--first-token-ms", type=float, default=150)
    args = parser.parse_args(argv)
    app = make_app(args.tokens_per_second, args.first_token_ms)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        loop=new_event_loop(),  # uvloop, as `gateway serve`: compare like with like
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
