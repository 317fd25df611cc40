"""The benchmarks' one load generator: streams over one transport, in its own process.

    python -m bench.loadgen --url http://127.0.0.1:8080 --transport sse --model paced-20 \
        --concurrency 500 --duration-s 30 --tokens 100

It must not be the bottleneck, so it does not parse events: it counts each
transport's token marker in the raw bytes (one WebSocket message per event),
or with `--mark` a text each upstream token carries (the suite counts the
fake upstream's `tok `, since the gateway may put the tokens of one upstream
read in one event).
`--streams` streams run, `--concurrency` at a time (all at once without it),
their starts spread over `--ramp-s`; `--duration-s` instead keeps
`--concurrency` streams running, each starting a new one when it ends.
`--drop-after N` closes the connection after N tokens and reports the moment
(`time.monotonic()`, system-wide on Linux) with the stream's `X-Request-ID`,
so that the orchestrator can ask the upstream when it stopped. Each request
carries its index as `seed`, so a simulated model writes the same text on
every server compared. One JSON summary goes to stdout: `peak_open` counts
streams from their first byte sent, `held_peak` only those the server
answered and has not finished (the streams it held at once).
`--canaries N --canary-url U` runs N more streams of the same shape straight
to `U` (OpenAI's route) in the same process and the same seconds, summarised
apart under `canaries`: the baseline of what the upstream, this process and
the machine gave meanwhile (`bench.suite --capacity`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

#: What one token looks like in the raw bytes of each transport.
MARKS = {
    "openai": b'"delta":{"content":',  # the role chunk (`"delta":{"role":…`) does not match
    "sse": b"event: token\n",
    "chunked": b'{"type":"token"',
    "ws": b'"type":"token"',
    # WebSocket on a socket each worker keeps open, as the browser client does
    # (one multiplexed socket): no connect and no upgrade in a stream's TTFT.
    "ws-open": b'"type":"token"',
}
ROUTES = {
    "openai": "/v1/chat/completions",
    "sse": "/v1/stream/sse",
    "chunked": "/v1/stream/chunked",
}
#: An error, in the raw bytes of any transport.
ERROR_MARKS = (b"event: error", b'"type":"error"', b'data: {"error"')


@dataclass
class Totals:
    started: int = 0
    completed: int = 0
    tokens: int = 0
    open: int = 0
    peak: int = 0
    held: int = 0
    held_peak: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttfts: array[float] = field(default_factory=lambda: array("d"))
    gaps: array[float] = field(default_factory=lambda: array("d"))
    durations: array[float] = field(default_factory=lambda: array("d"))
    drops: list[dict[str, Any]] = field(default_factory=list)

    def failed(self, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """While the server streams an answer it accepted."""
        self.held += 1
        self.held_peak = max(self.held_peak, self.held)
        try:
            yield
        finally:
            self.held -= 1


class Stream:
    """One stream's clock: TTFT, the gaps between tokens, and its count."""

    def __init__(self, totals: Totals, mark: bytes) -> None:
        self.totals = totals
        self.mark = mark
        self.started = time.perf_counter()
        self.last: float | None = None
        self.tokens = 0
        self.tail = b""

    def saw(self, data: bytes) -> bool:
        """Count the tokens in `data` (a marker may straddle two reads); True on an error."""
        window = self.tail + data
        found = window.count(self.mark)
        self.tail = window[-(len(self.mark) - 1) :]
        if found:
            now = time.perf_counter()
            if self.last is None:
                self.totals.ttfts.append(now - self.started)
            else:
                self.totals.gaps.append(now - self.last)
            self.totals.gaps.extend([0.0] * (found - 1))
            self.last = now
            self.tokens += found
            self.totals.tokens += found
        return any(mark in window for mark in ERROR_MARKS)


def percentile(values: array[float] | list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.totals = Totals()
        self.mark = args.mark.encode() if args.mark else MARKS[args.transport]
        self.counter = 0

    def body(self, index: int) -> bytes:
        fields: dict[str, Any] = {
            "messages": [{"role": "user", "content": f"bench stream {index}"}],
            "max_tokens": self.args.tokens,
            "seed": index,
        }
        if self.args.model:
            fields["model"] = self.args.model
        if self.args.transport == "openai":
            fields["stream"] = True
        return orjson.dumps(fields)

    def headers(self, index: int) -> dict[str, str]:
        headers = {}
        if self.args.bearer:
            headers["Authorization"] = f"Bearer {self.args.bearer}"
        if self.args.drop_after:
            headers["X-Request-ID"] = f"rec-{self.args.tag}-{index}"
        return headers

    async def one(
        self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse | None = None
    ) -> None:
        index = self.counter
        self.counter += 1
        totals = self.totals
        totals.started += 1
        stream = Stream(totals, self.mark)
        totals.open += 1
        totals.peak = max(totals.peak, totals.open)
        try:
            async with asyncio.timeout(self.args.timeout_s):
                if ws is not None:
                    ended = await self._on_websocket(ws, stream, index)
                elif self.args.transport == "ws":
                    ended = await self._websocket(session, stream, index)
                else:
                    ended = await self._http(session, stream, index)
            if ended == "dropped":
                pass
            elif ended != "done":
                totals.failed(ended)
            elif stream.tokens != self.args.tokens:
                totals.failed("missing tokens")
            else:
                totals.completed += 1
                totals.durations.append(time.perf_counter() - stream.started)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            totals.failed(type(exc).__name__)
        finally:
            totals.open -= 1

    def _dropped(self, index: int) -> str:
        self.totals.drops.append({"id": f"rec-{self.args.tag}-{index}", "at": time.monotonic()})
        return "dropped"

    async def _http(self, session: aiohttp.ClientSession, stream: Stream, index: int) -> str:
        url = self.args.url + ROUTES[self.args.transport]
        headers = {"Content-Type": "application/json", **self.headers(index)}
        if self.args.transport != "chunked":
            headers["Accept"] = "text/event-stream"
        async with session.post(url, data=self.body(index), headers=headers) as r:
            if r.status != 200:
                return f"HTTP {r.status}"
            with self.totals.holding():
                async for chunk in r.content.iter_any():
                    error = stream.saw(chunk)
                    if self.args.drop_after and stream.tokens >= self.args.drop_after:
                        dropped = self._dropped(index)
                        r.close()  # the connection, mid-body: as a closed browser tab
                        return dropped
                    if error:
                        return "error event"
        return "done"

    async def _websocket(self, session: aiohttp.ClientSession, stream: Stream, index: int) -> str:
        url = self.args.url + "/v1/stream/ws"
        async with session.ws_connect(url, headers=self.headers(index)) as ws:
            return await self._on_websocket(ws, stream, index)

    async def _on_websocket(
        self, ws: aiohttp.ClientWebSocketResponse, stream: Stream, index: int
    ) -> str:
        """One stream on an open socket; `ws-open` reuses it for the next one."""
        message = b'{"type":"generate","request_id":"r%d",' % index + self.body(index)[1:]
        await ws.send_str(message.decode())
        with self.totals.holding():
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    return f"websocket {frame.type.name}"
                data = frame.data.encode()
                stream.saw(data)
                if self.args.drop_after and stream.tokens >= self.args.drop_after:
                    dropped = self._dropped(index)
                    await ws.close()  # as a browser closing the tab (1001 or 1000)
                    return dropped
                if b'"type":"done"' in data:
                    return "done"
                if b'"type":"error"' in data:
                    return "error event"
        return "closed early"

    async def run(self) -> dict[str, Any]:
        args = self.args
        concurrency = args.concurrency or args.streams
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            began = time.perf_counter()
            deadline = began + args.duration_s if args.duration_s else None

            async def worker(slot: int) -> None:
                await asyncio.sleep(args.ramp_s * slot / max(1, concurrency))
                ws = None
                if args.transport == "ws-open":
                    ws = await session.ws_connect(args.url + "/v1/stream/ws")
                try:
                    while True:
                        if deadline is None and self.counter >= args.streams:
                            return
                        if deadline is not None and time.perf_counter() >= deadline:
                            return
                        await self.one(session, ws)
                finally:
                    if ws is not None:
                        await ws.close()

            await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
            wall = time.perf_counter() - began
        t = self.totals
        return {
            "started": t.started,
            "completed": t.completed,
            "errors": t.errors,
            "tokens": t.tokens,
            "wall_s": wall,
            "tokens_per_s": t.tokens / wall if wall else 0.0,
            "peak_open": t.peak,
            "held_peak": t.held_peak,
            "ttft_p50_s": percentile(t.ttfts, 0.5),
            "ttft_p99_s": percentile(t.ttfts, 0.99),
            "itl_p50_s": percentile(t.gaps, 0.5),
            "itl_p99_s": percentile(t.gaps, 0.99),
            "duration_p50_s": percentile(t.durations, 0.5),
            "duration_p99_s": percentile(t.durations, 0.99),
            "drops": t.drops,
        }


async def run_with_canaries(args: argparse.Namespace) -> dict[str, Any]:
    """The run, and its canaries (if any) through the same seconds on the same loop."""
    if not args.canaries:
        return await Generator(args).run()
    canary_args = argparse.Namespace(**vars(args))
    canary_args.url, canary_args.transport = args.canary_url, "openai"
    canary_args.concurrency = canary_args.streams = args.canaries
    canary_args.drop_after, canary_args.tag = 0, f"{args.tag}-canary"
    summary, canaries = await asyncio.gather(Generator(args).run(), Generator(canary_args).run())
    summary["canaries"] = canaries
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server's base URL")
    parser.add_argument("--transport", choices=sorted(MARKS), default="sse")
    parser.add_argument("--model", help="the request's model (default: the server's)")
    parser.add_argument("--tokens", "--max-tokens", type=int, default=64, dest="tokens")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=0, help="0: every stream at once")
    parser.add_argument("--duration-s", type=float, default=0.0)
    parser.add_argument("--ramp-s", type=float, default=0.0, help="spread the first starts")
    parser.add_argument("--drop-after", type=int, default=0)
    parser.add_argument("--tag", default="run", help="part of recorded request ids")
    parser.add_argument("--bearer", help="send Authorization: Bearer <this>")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--mark",
        help="count this text instead of the transport's token marker: one per upstream "
        "token, however the server groups tokens into events (the fake upstream's `tok `)",
    )
    parser.add_argument("--canaries", type=int, default=0, help="direct streams alongside")
    parser.add_argument("--canary-url", help="where the canaries go: the upstream's base URL")
    args = parser.parse_args(argv)
    if args.canaries and not args.canary_url:
        parser.error("--canaries needs --canary-url")
    from gateway.server import new_event_loop

    loop = new_event_loop()
    try:
        summary = loop.run_until_complete(run_with_canaries(args))
    finally:
        loop.close()
    sys.stdout.buffer.write(orjson.dumps(summary) + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
