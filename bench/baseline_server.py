"""The baseline: a hand-rolled aiohttp SSE handler around the same simulated model.

Every figure the gateway benchmark reports is compared with this server,
measured in the same run, so the noise of a shared 2-core machine cancels out.
It runs the gateway's own `SimulatedProvider` (same text, same pacing, same
CPU for the model itself) and writes one SSE frame per delta straight from the
handler: what a minimal hand-written streaming endpoint does. No event log,
no resume, no heartbeat or stall watchdog, no middleware, no auth.
"""

from __future__ import annotations

import argparse

import orjson
from aiohttp import web

from gateway.config import SimulatedModel
from gateway.providers.base import Finish
from gateway.providers.simulated import SimulatedProvider
from gateway.schema import parse_generation_request
from tests.fake_upstream import serve


def make_app(tokens_per_second: float, first_token_ms: float) -> web.Application:
    model = SimulatedProvider(
        SimulatedModel(
            name="sim-1",
            provider="simulated",
            tokens_per_second=tokens_per_second,
            first_token_ms=first_token_ms,
        )
    )

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stream(request: web.Request) -> web.StreamResponse:
        generation = parse_generation_request(orjson.loads(await request.read()))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        seq = 0
        async for item in model.stream(generation):
            if isinstance(item, Finish):
                data = orjson.dumps({"type": "done", "finish_reason": item.finish_reason})
                await response.write(b"event: done\ndata: %s\n\n" % data)
                break
            data = orjson.dumps({"type": "token", "seq": seq, "text": item})
            await response.write(b"id: b:%d\nevent: token\ndata: %s\n\n" % (seq, data))
            seq += 1
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
    # On uvloop, with handler cancellation, as `gateway serve`: compare like with like.
    serve(make_app(args.tokens_per_second, args.first_token_ms), args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
