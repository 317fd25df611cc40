"""Pauses of the cyclic GC inside the gateway under paced streams.

A collection stops the event loop, so every stream waits for it at once:
it shows up in the tails (TTFT and inter-token p99), not in CPU per token.
This serves `--streams` paced streams (50 tokens/s, 100 tokens each, new
ones as they end) for `--seconds` through a gateway started by
`bench/gc_gateway.py` (the gateway with its collections timed), then prints
how many collections of each generation ran and how long they held the loop.

    python -m bench.gc_pauses                              # this checkout: 200 SSE streams, 30 s
    python -m bench.gc_pauses --tree /tmp/wt-old --tree .  # checkouts one after the other
    python -m bench.gc_pauses --streams 500 --transport openai

Checkouts run one after the other (each needs the machine to itself); run
the pair twice, alternated, to see the noise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

from bench.checkouts import fake_upstream, hook_notes, hooked_gateway, parse_with_trees
from bench.suite import Proc, load


async def pauses(tree: Path, upstream: Proc, args: argparse.Namespace) -> list[tuple[int, float]]:
    """(generation, ms) of each collection while the paced streams ran through `tree`."""
    async with hooked_gateway(tree, upstream, "gc_gateway.py", "GC_PAUSES_OUT") as (gateway, out):
        await load(gateway, gateway.url, args.transport, "fast", streams=50, tokens=64)
        await hook_notes(gateway, out)  # forget the warm-up's collections
        options = {"concurrency": args.streams, "tokens": 100, "ramp_s": 1}
        run = await load(
            gateway, gateway.url, args.transport, "paced-20", duration_s=args.seconds, **options
        )
        collections = await hook_notes(gateway, out)
        print(
            f"# {tree}: {run['completed']} streams, {run['tokens']} tokens,"
            f" TTFT p99 {run['ttft_p99_s'] * 1000:.1f} ms,"
            f" inter-token p99 {run['itl_p99_s'] * 1000:.1f} ms",
            flush=True,
        )
        return [(int(g), float(ms)) for g, ms in collections]


def summary(collections: list[tuple[int, float]]) -> str:
    parts = []
    for generation in (0, 1, 2):
        times = sorted(ms for g, ms in collections if g == generation)
        if times:
            parts.append(
                f"gen{generation} {len(times)}x: p50 {statistics.median(times):.1f},"
                f" max {times[-1]:.1f}, sum {sum(times):.1f} ms"
            )
    return "; ".join(parts) or "no collection"


async def measure(args: argparse.Namespace) -> None:
    async with fake_upstream() as upstream:
        for tree in args.tree:
            print(f"{tree}: {summary(await pauses(tree, upstream, args))}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", default="sse")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=30)
    asyncio.run(measure(parse_with_trees(parser, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
