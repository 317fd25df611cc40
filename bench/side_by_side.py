"""Gateway CPU (user and system) per stream start and per 1,000 tokens, checkouts alternated.

`bench.start_instructions` counts user-space instructions, which repeat to
±0.2 % but leave out the kernel: a lever that saves a system call (a write
to the client, a loop turn's `epoll_wait`) barely shows there. This measures
what the process really spends, like `bench.suite`, but for two or more
checkouts in turns (A B B A A B …), each round on a fresh gateway, so that
a slow spell of the shared machine falls on both sides, and prints each
checkout's median and spread.

    python -m bench.side_by_side --tree /tmp/wt-old --tree .            # both shapes
    python -m bench.side_by_side --tree /tmp/wt-old --tree . --shape starts --rounds 8

Shapes: `starts` (one-token streams, four at a time: the suite's `starts`,
CPU per start) and `S2` (64 streams of 256 tokens at full speed: CPU per
1,000 tokens, and tokens/s). About 15 s per checkout and round for each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.checkouts import config_file, fake_upstream, parse_with_trees, start_in_tree
from bench.sse_streams import free_port, wait_ready
from bench.suite import Proc, load

#: shape -> (loadgen options, its warm-up's)
SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "starts": (
        {"streams": 2000, "tokens": 1, "concurrency": 4},
        {"streams": 300, "tokens": 1, "concurrency": 4},
    ),
    "S2": (
        {"concurrency": 64, "tokens": 256, "duration_s": 8},
        {"concurrency": 64, "tokens": 256, "duration_s": 2},
    ),
}


def figures(shape: str, run: dict[str, Any]) -> dict[str, float]:
    if shape == "starts":
        return {"µs CPU per start": run["cpu_s"] * 1e6 / max(1, run["completed"])}
    return {
        "ms CPU per 1k tokens": run["cpu_s"] * 1e6 / max(1, run["tokens"]),
        "tokens/s": run["tokens_per_s"],
    }


async def one_round(tree: Path, upstream: Proc, transport: str, shape: str) -> dict[str, float]:
    """A fresh gateway of `tree`: warmed up, then measured once."""
    options, warm_up = SHAPES[shape]
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        config = config_file(work, port, upstream)
        argv = (sys.executable, "-m", "gateway", "serve", "--config", str(config))
        process = await start_in_tree(tree, *argv)
        gateway = Proc(f"http://127.0.0.1:{port}", process)
        try:
            await wait_ready(gateway.url, process)
            await load(gateway, gateway.url, transport, "fast", **warm_up)
            return figures(shape, await load(gateway, gateway.url, transport, "fast", **options))
        finally:
            process.terminate()
            await process.wait()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--transport", default="sse")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per checkout")
    args = parse_with_trees(parser, argv)
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    async with fake_upstream() as upstream:
        for shape in shapes:
            runs: dict[Path, list[dict[str, float]]] = {tree: [] for tree in args.tree}
            for index in range(args.rounds):
                order = args.tree if index % 2 == 0 else args.tree[::-1]
                for tree in order:
                    runs[tree].append(await one_round(tree, upstream, args.transport, shape))
            for tree, results in runs.items():
                for name in results[0]:
                    values = [result[name] for result in results]
                    print(
                        f"{shape} {args.transport} {name}: median {statistics.median(values):.2f}"
                        f" (min {min(values):.2f}, max {max(values):.2f}, {len(values)} rounds)"
                        f" {tree}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
