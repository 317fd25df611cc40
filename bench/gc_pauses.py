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
import json
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from bench.checkouts import REPO, add_tree_argument, fake_upstream, trees
from bench.sse_streams import free_port, wait_ready
from bench.suite import Proc, gateway_config, load


async def pauses(tree: Path, upstream: Proc, args: argparse.Namespace) -> list[tuple[int, float]]:
    """(generation, ms) of each collection while the paced streams ran through `tree`."""
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config.yaml"
        config.write_text(yaml.safe_dump(gateway_config(port, upstream.url)))
        out = Path(work) / "pauses.json"
        # The hook from this checkout (run as a file), the gateway from `tree`.
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPO / "bench" / "gc_gateway.py"),
            "serve",
            "--config",
            str(config),
            env={**os.environ, "PYTHONPATH": str(tree), "GC_PAUSES_OUT": str(out)},
            cwd=tree,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        gateway = Proc(f"http://127.0.0.1:{port}", process)
        try:
            await wait_ready(gateway.url, process)
            await load(gateway, gateway.url, args.transport, "fast", streams=50, tokens=64)
            process.send_signal(signal.SIGUSR2)  # forget the warm-up's collections
            options = {"concurrency": args.streams, "tokens": 100, "ramp_s": 1}
            run = await load(
                gateway, gateway.url, args.transport, "paced-20", duration_s=args.seconds, **options
            )
            out.unlink(missing_ok=True)
            process.send_signal(signal.SIGUSR2)
            for _ in range(50):
                await asyncio.sleep(0.1)
                if out.exists() and out.stat().st_size:
                    break
            print(
                f"# {tree}: {run['completed']} streams, {run['tokens']} tokens,"
                f" TTFT p99 {run['ttft_p99_s'] * 1000:.1f} ms,"
                f" inter-token p99 {run['itl_p99_s'] * 1000:.1f} ms",
                flush=True,
            )
            return [(int(g), float(ms)) for g, ms in json.loads(out.read_text())]
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()


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
    add_tree_argument(parser)
    parser.add_argument("--transport", default="sse")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args(argv)
    args.tree = trees(args)
    asyncio.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
