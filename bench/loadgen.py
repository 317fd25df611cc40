"""Load generator: N concurrent SSE streams, run in its own process.

It must not be the bottleneck, so it does not parse events: it times the
first token and counts `event: token` frames in the raw bytes. It prints one
JSON summary on stdout; the orchestrator (`bench.sse_streams`) turns the
summaries of the gateway and the baseline into ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

TOKEN_MARK = b"\nevent: token\n"
#: In OpenAI's chunks; the role chunk (`"delta":{"role":…`) does not match.
CHAT_TOKEN_MARK = b'"delta":{"content":'


@dataclass
class StreamResult:
    ok: bool = False
    ttft_s: float | None = None
    tokens: int = 0
    duration_s: float = 0.0
    error: str | None = None


@dataclass
class Gauge:
    """How many streams are open at once: the number of streams held."""

    open: int = 0
    peak: int = 0
    peak_at: float = 0.0
    samples: list[int] = field(default_factory=list)

    def enter(self) -> None:
        self.open += 1
        if self.open > self.peak:
            self.peak, self.peak_at = self.open, time.monotonic()

    def leave(self) -> None:
        self.open -= 1


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    gauge: Gauge,
    timeout_s: float,
    headers: dict[str, str],
    mark: bytes = TOKEN_MARK,
) -> StreamResult:
    result = StreamResult()
    started = time.perf_counter()
    tail = b""
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}"
                return result
            gauge.enter()
            try:
                async for chunk in response.content.iter_any():
                    window = tail + chunk
                    found = window.count(mark)
                    if found and result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - started
                    result.tokens += found
                    tail = window[-(len(mark) - 1) :]
                    if b"event: error" in window or b'data: {"error"' in window:
                        result.error = "error event"
            finally:
                gauge.leave()
        result.ok = result.error is None
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = type(exc).__name__
    result.duration_s = time.perf_counter() - started
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    gauge = Gauge()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if args.bearer:
        headers["Authorization"] = f"Bearer {args.bearer}"
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def staggered(index: int) -> StreamResult:
            await asyncio.sleep(args.ramp_s * index / max(1, args.streams))
            fields: dict[str, object] = {
                "messages": [{"role": "user", "content": f"bench stream {index}"}],
                "max_tokens": args.max_tokens,
                "seed": index,
            }
            if args.model:
                fields["model"] = args.model
            if args.chat:
                fields["stream"] = True
            body = orjson.dumps(fields)
            mark = CHAT_TOKEN_MARK if args.chat else TOKEN_MARK
            return await one_stream(session, args.url, body, gauge, args.timeout_s, headers, mark)

        began = time.perf_counter()
        results = await asyncio.gather(*(staggered(i) for i in range(args.streams)))
        wall = time.perf_counter() - began
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "streams": args.streams,
        "completed": sum(r.ok and r.tokens == args.max_tokens for r in results),
        "held_peak": gauge.peak,
        "tokens": sum(r.tokens for r in results),
        "ttft_p50_s": percentile(ttfts, 0.50),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "duration_p50_s": statistics.median(r.duration_s for r in results),
        "duration_p99_s": percentile([r.duration_s for r in results], 0.99),
        "wall_s": wall,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--ramp-s", type=float, default=1.0, help="spread stream starts")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--bearer", help="send Authorization: Bearer <this>")
    parser.add_argument("--model", help="the request's model")
    parser.add_argument(
        "--chat", action="store_true", help="an OpenAI chat-completions stream (stream: true)"
    )
    args = parser.parse_args(argv)
    from gateway.server import new_event_loop

    loop = new_event_loop()
    try:
        summary = loop.run_until_complete(run(args))
    finally:
        loop.close()
    sys.stdout.buffer.write(orjson.dumps(summary) + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
