"""Overload: more clients than a replica should take, with and without `server.max_streams`.

    python -m bench.overload                 # 1,500 clients for 20 s against each gateway
    python -m bench.overload --clients 800 --seconds 10

Two `gateway serve` processes with the same simulated model (50 ms to the
first token, 50 tokens at 100 tokens/s): `capped` has `server.max_streams:
100` (what this 2-core machine sustains at 100 tokens/s each, see the suite's
CPU per token), `uncapped` has none. First the unloaded time to first token (10
clients), then every client loops for `--seconds`: a stream, read to its end;
a 503 is honoured by sleeping its `Retry-After` (plus jitter) before the next
try. The report compares the TTFT of admitted streams with the unloaded one,
as the client sees it (the target: within 2x) and as the part the gateway
adds (less the model's 50 ms), a much stricter measure: a gateway that sheds
load keeps admitted streams fast, one that does not slows every stream down.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import aiohttp
import orjson

from bench.sse_streams import NO_LIMITS, free_port, gateway_process

FIRST_TOKEN_S = 0.05
BODY = orjson.dumps({"prompt": "overload", "max_tokens": 50})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")
    )


async def one_stream(session: aiohttp.ClientSession, url: str) -> tuple[str, float | None, str]:
    """("ok" | "refused" | error, TTFT, Retry-After)."""
    started = time.perf_counter()
    headers = {"Content-Type": "application/json"}
    try:
        async with session.post(f"{url}/v1/stream/chunked", data=BODY, headers=headers) as r:
            if r.status != 200:
                await r.read()
                return (
                    ("refused" if r.status == 503 else f"HTTP {r.status}"),
                    None,
                    r.headers.get("Retry-After", ""),
                )
            ttft = None
            async for line in r.content:
                if ttft is None and b'"type":"token"' in line:
                    ttft = time.perf_counter() - started
                if b'"type":"error"' in line:
                    return "error event", ttft, ""
            return "ok", ttft, ""
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        return type(exc).__name__, None, ""


async def load(url: str, clients: int, seconds: float) -> dict[str, Any]:
    ttfts: list[float] = []
    outcomes: dict[str, int] = {}
    retry_after_missing = 0
    until = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal retry_after_missing
            await asyncio.sleep(random.random())  # spread the first wave over a second
            while time.monotonic() < until:
                outcome, ttft, retry_after = await one_stream(session, url)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if ttft is not None and outcome == "ok":
                    ttfts.append(ttft)
                if outcome == "refused":
                    if not retry_after:
                        retry_after_missing += 1
                    await asyncio.sleep(float(retry_after or 1) * random.uniform(0.5, 1.5))

        await asyncio.gather(*(client() for _ in range(clients)))
    return {
        "outcomes": outcomes,
        "admitted": outcomes.get("ok", 0),
        "refused_without_retry_after": retry_after_missing,
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
        # Less the model's own first-token delay: what the gateway adds.
        "ttft_added_p50_ms": (percentile(ttfts, 0.5) - FIRST_TOKEN_S) * 1000,
        "ttft_added_p99_ms": (percentile(ttfts, 0.99) - FIRST_TOKEN_S) * 1000,
    }


async def run(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {}
    for name, cap in (("capped", args.max_streams), ("uncapped", 0)):
        config = {
            "server": {"port": free_port(), "max_streams": cap},
            "models": [
                {
                    "name": "sim",
                    "provider": "simulated",
                    "first_token_ms": FIRST_TOKEN_S * 1000,
                    "tokens_per_second": 100,
                }
            ],
            "rate_limit": {"default": NO_LIMITS},
            "logging": {"level": "warning"},
        }
        async with gateway_process(config) as (url, _):
            unloaded = await load(url, 10, 5)
            loaded = await load(url, args.clients, args.seconds)
        results[name] = {"max_streams": cap, "unloaded": unloaded, "overloaded": loaded}
        print(f"# {name}: done", flush=True)
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    print(
        "| gateway | TTFT p99 unloaded / admitted under overload (ratio) "
        "| added by the gateway p50, p99: unloaded / overloaded (p99 ratio) "
        "| streams admitted | refused (503) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, result in results.items():
        u, o = result["unloaded"], result["overloaded"]
        print(
            f"| {name} | {u['ttft_p99_ms']:.1f} / {o['ttft_p99_ms']:.1f} ms "
            f"(× {o['ttft_p99_ms'] / u['ttft_p99_ms']:.2f}) "
            f"| {u['ttft_added_p50_ms']:.1f}, {u['ttft_added_p99_ms']:.1f} / "
            f"{o['ttft_added_p50_ms']:.1f}, {o['ttft_added_p99_ms']:.1f} ms "
            f"(× {o['ttft_added_p99_ms'] / max(u['ttft_added_p99_ms'], 0.1):.1f}) "
            f"| {o['admitted']} | {o['outcomes'].get('refused', 0)} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-streams", type=int, default=100)
    args = parser.parse_args(argv)
    random.seed(1)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
