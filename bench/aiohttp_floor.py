"""The floor of a proxy built on aiohttp: its server and client, and nothing else.

    python -m bench.aiohttp_floor --port 9001 --upstream-port 8001

`POST /v1/chat/completions` is sent on to the upstream as it came (a pooled
connection, the request's body bytes) and the answer's body is copied back
as it arrives, the usual aiohttp way (`async for data in
response.content.iter_any()` then `await out.write(data)`), on uvloop. It
parses no JSON and has no auth, limits, log, metrics or events. The suite
runs it next to `bench/relay.py`: the relay is what any proxy process pays;
this is what any proxy that uses aiohttp's server and client pays before it
does anything of its own. The gap between the two is aiohttp's; the gap
between this and the gateway is the gateway's.

`GET /v1/stream/ws` is the same for a WebSocket: the upgrade, then for each
`generate` message the least a WebSocket proxy does (read the message's JSON,
drop its control fields, ask for a stream), each upstream read sent on as a
text frame, and `{"type":"done"}` at the end. It is the floor of the S1
WebSocket row, whose streams each open a socket: the upgrade's round trip
and aiohttp's handshake are in it, and in no HTTP row.
"""

from __future__ import annotations

import argparse
import json

import aiohttp
from aiohttp import WSMsgType, web

try:
    import uvloop
except ImportError:  # pragma: no cover - Linux has it
    uvloop = None

upstream_key = web.AppKey("upstream", str)
session_key = web.AppKey("session", aiohttp.ClientSession)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[session_key]
    headers = {"Content-Type": "application/json"}
    async with session.post(request.app[upstream_key], data=body, headers=headers) as answer:
        out = web.StreamResponse(
            status=answer.status, headers={"Content-Type": answer.content_type}
        )
        await out.prepare(request)
        async for data in answer.content.iter_any():
            await out.write(data)
        await out.write_eof()
        return out


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    session = request.app[session_key]
    async for message in ws:
        if message.type is not WSMsgType.TEXT:
            continue
        body = json.loads(message.data)
        for name in ("type", "request_id"):
            body.pop(name, None)
        body["stream"] = True
        async with session.post(request.app[upstream_key], json=body) as answer:
            async for data in answer.content.iter_any():
                await ws.send_frame(data, WSMsgType.TEXT)
        await ws.send_frame(b'{"type":"done"}', WSMsgType.TEXT)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(upstream_port: int) -> web.Application:
    app = web.Application()
    app[upstream_key] = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
        app[session_key] = aiohttp.ClientSession(connector=connector, timeout=timeout)
        yield
        await app[session_key].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/stream/ws", websocket)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(args.upstream_port),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        backlog=4096,
        loop=uvloop.new_event_loop() if uvloop is not None else None,
    )


if __name__ == "__main__":
    main()
