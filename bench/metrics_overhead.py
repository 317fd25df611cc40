"""What metrics and access logs cost per stream: the same gateway with them off and on.

    python -m bench.metrics_overhead           # 500 streams x 200 tokens, 3 rounds
    python -m bench.metrics_overhead --quick   # 100 streams x 50 tokens, 1 round

Two `gateway serve` processes with the same simulated model: `off`
(`server.metrics_enabled: false`, `logging.access_log: false`) and `on`
(every metric, and one JSON access line per stream at level info, written
to a real file as a container runtime would collect it). Each round measures
both back to back, alternating the order; the report gives medians and the
ratio of `on` against `off`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.sse_streams import (
    ROOT,
    Server,
    free_port,
    gateway_config,
    load_parser,
    measure,
    parse_load_args,
    wait_ready,
)

ROWS = (
    ("TTFT added, p50 (ms)", "ttft_added_p50_ms"),
    ("TTFT added, p99 (ms)", "ttft_added_p99_ms"),
    ("server CPU per 1,000 tokens (ms)", "cpu_ms_per_1k_tokens"),
    ("streams completed", "completed"),
)
VARIANTS = ("off", "on")


def variant_config(port: int, args: argparse.Namespace, variant: str) -> dict[str, Any]:
    config: dict[str, Any] = gateway_config(port, args)
    on = variant == "on"
    config["server"] = {**config["server"], "metrics_enabled": on}
    config["logging"] = {"level": "info" if on else "warning", "access_log": on}
    return config


async def start_gateway(args: argparse.Namespace, workdir: Path, variant: str) -> Server:
    port = free_port()
    path = workdir / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(variant_config(port, args, variant)))
    log = (workdir / f"{variant}.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "serve", "--config", str(path)),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    await wait_ready(base, process)
    return Server(variant, base + "/v1/stream/sse", process, None)


async def run(args: argparse.Namespace) -> tuple[list[dict[str, dict[str, float]]], int]:
    servers: list[Server] = []
    with tempfile.TemporaryDirectory() as workdir:
        try:
            servers = [await start_gateway(args, Path(workdir), v) for v in VARIANTS]
            warmup = argparse.Namespace(**{**vars(args), "streams": 50, "max_tokens": 20})
            for server in servers:
                await measure(server, warmup)
            rounds = []
            for index in range(args.rounds):
                order = servers if index % 2 == 0 else servers[::-1]
                measured = {}
                for server in order:
                    measured[server.name] = await measure(server, args)
                    print(f"round {index + 1} {server.name}: {measured[server.name]}", flush=True)
                rounds.append(measured)
            lines = sum(1 for _ in (Path(workdir) / "on.log").open("rb"))
            return rounds, lines
        finally:
            for server in servers:
                server.process.terminate()
                await server.process.wait()


def report(rounds: list[dict[str, dict[str, float]]], lines: int, args: argparse.Namespace) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    out = [
        f"{args.streams} SSE streams × {args.max_tokens} tokens at {args.tokens_per_second:g} "
        f"tokens/s; median of {len(rounds)} round(s); `on` wrote {lines} log lines",
        "",
        "| | off | on | on vs off |",
        "|---|---:|---:|---:|",
    ]
    for label, key in ROWS:
        off, on = median("off", key), median("on", key)
        versus = f"× {on / off:.3f}" if off > 0 else ""
        out.append(f"| {label} | {off:.1f} | {on:.1f} | {versus} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_load_args(load_parser(__doc__.splitlines()[0]), argv)
    rounds, lines = asyncio.run(run(args))
    print("\n" + report(rounds, lines, args))
    failed = any(r[s]["completed"] < args.streams for r in rounds for s in r)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
