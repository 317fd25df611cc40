"""Where a stream's time to first token goes inside the gateway, stage by stage.

S1's shape: one stream at a time (a new connection each), 64 tokens from the
fast fake upstream. The gateway runs under `bench/critical_path_gateway.py`
(its own CLI with a clock at each stage boundary) and this prints, per
transport, the median time of each stage from the moment the request's
bytes reached the gateway, and the added TTFT of the same run against
direct (the load generator straight to the fake upstream).

    python -m bench.critical_path                                # this checkout, SSE and openai
    python -m bench.critical_path --tree /tmp/wt-old --tree .    # checkouts one after the other
    python -m bench.critical_path --transports chunked --streams 500

The stages, in order: `connected` (aiohttp accepted the socket), `request
bytes` (the request arrived), `first middleware`, `body read`, `validated`,
`admitted` (limits and the generation started), `generation task` (its first
step), `upstream request sent`, `upstream read` (the upstream's first bytes),
`tokens logged` (the first token event), `client write` (the first write to
the client after it). What lies between `upstream request sent` and `tokens
logged` is mostly the upstream's own time, which direct pays too; the
gateway's own share of the critical path is `request bytes` to `upstream
request sent`, plus `tokens logged` to `client write`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

from bench.checkouts import fake_upstream, hook_notes, hooked_gateway, parse_with_trees
from bench.suite import Proc, load

STAGES = (
    "connected",
    "request bytes",
    "first middleware",
    "body read",
    "validated",
    "admitted",
    "generation task",
    "upstream request sent",
    "upstream read",
    "tokens logged",
    "client write",
)
#: Stages noted once per request, at their first occurrence after the one named.
_FIRST_AFTER = {
    "request bytes": "connected",
    "upstream read": "upstream request sent",
    "client write": "tokens logged",
}


def per_request(notes: list[tuple[str, int]]) -> list[dict[str, int]]:
    """Each request's stages (ns), split at the middleware that starts it."""
    requests: list[dict[str, int]] = []
    pending: dict[str, int] = {}
    current: dict[str, int] | None = None
    for stage, ns in notes:
        if stage == "connected":
            pending = {"connected": ns}
        elif stage == "request bytes":
            if "connected" in pending:
                pending.setdefault("request bytes", ns)
        elif stage == "first middleware":
            current = {**pending, stage: ns}
            pending = {}
            requests.append(current)
        elif current is not None and stage not in current:
            earlier = _FIRST_AFTER.get(stage)
            if earlier is None or earlier in current:
                current[stage] = ns
    return requests


async def stages_of(
    tree: Path, upstream: Proc, transport: str, streams: int
) -> tuple[dict[str, float], float]:
    """Median µs of each stage after `request bytes`, and the added TTFT p50 (ms)."""
    options = {"streams": streams, "tokens": 64, "concurrency": 1}
    hook = "critical_path_gateway.py"
    async with hooked_gateway(tree, upstream, hook, "CRITICAL_PATH_OUT") as (gateway, out):
        await load(gateway, gateway.url, transport, "fast", **{**options, "streams": 50})
        await hook_notes(gateway, out)  # forget the warm-up
        through = await load(gateway, gateway.url, transport, "fast", **options)
        notes = [(str(stage), int(ns)) for stage, ns in await hook_notes(gateway, out)]
    direct = await load(upstream, upstream.url, "openai", "fast", **options)
    requests = [r for r in per_request(notes) if "request bytes" in r]
    medians = {
        stage: statistics.median((r[stage] - r["request bytes"]) / 1000 for r in with_stage)
        for stage in STAGES
        if (with_stage := [r for r in requests if stage in r])
    }
    added_ms = (through["ttft_p50_s"] - direct["ttft_p50_s"]) * 1000
    return medians, added_ms


def report(tree: Path, transport: str, medians: dict[str, float], added_ms: float) -> str:
    lines = [f"{transport} ({tree}): added TTFT p50 {added_ms:+.2f} ms; median µs from the request"]
    previous: float | None = None
    for stage in STAGES:
        if stage not in medians:
            lines.append(f"  {stage:<24} (not reached, or not in this checkout)")
            continue
        at = medians[stage]
        step = "" if previous is None else f"  (+{at - previous:.0f})"
        lines.append(f"  {stage:<24} {at:8.0f}{step}")
        previous = at
    own = medians.get("upstream request sent", 0.0) + (
        medians.get("client write", 0.0) - medians.get("tokens logged", 0.0)
    )
    lines.append(f"  gateway's own share of the critical path ≈ {own:.0f} µs")
    return "\n".join(lines)


async def measure(args: argparse.Namespace) -> None:
    async with fake_upstream() as upstream:
        for transport in [t.strip() for t in args.transports.split(",")]:
            for tree in args.tree:
                medians, added_ms = await stages_of(tree, upstream, transport, args.streams)
                print(report(tree, transport, medians, added_ms), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transports", default="sse,openai")
    parser.add_argument("--streams", type=int, default=300)
    asyncio.run(measure(parse_with_trees(parser, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
