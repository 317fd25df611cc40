"""What `streams.backend: redis` costs the live path: the same gateway with memory and redis logs.

    python -m bench.shared_log_overhead           # 500 streams x 200 tokens, 3 rounds
    python -m bench.shared_log_overhead --quick   # 100 streams x 50 tokens, 1 round

Two `gateway serve` processes with the same simulated model, one with
`streams.backend: memory` and one with `redis` (a redis-server this command
starts). The clients read from the replica that runs their generations, so
this measures what mirroring every event to Redis adds to time to first token
and to CPU. Rounds alternate the order; the report gives medians and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.sse_streams import (
    Server,
    free_port,
    gateway_config,
    load_parser,
    measure,
    parse_load_args,
    start_process,
)

ROWS = (
    ("TTFT added, p50 (ms)", "ttft_added_p50_ms"),
    ("TTFT added, p99 (ms)", "ttft_added_p99_ms"),
    ("server CPU per 1,000 tokens (ms)", "cpu_ms_per_1k_tokens"),
    ("server peak RSS (MiB)", "rss_mib"),
    ("streams completed", "completed"),
)
VARIANTS = ("memory", "redis")


async def run(args: argparse.Namespace) -> list[dict[str, dict[str, float]]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    redis_port = free_port()
    redis = await asyncio.create_subprocess_exec(
        *(binary, "--port", str(redis_port), "--bind", "127.0.0.1"),
        *("--save", "", "--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    servers: list[Server] = []
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for variant in VARIANTS:
                port = free_port()
                config: dict[str, Any] = gateway_config(port, args)
                config["streams"] = {"backend": variant}
                config["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
                path = Path(workdir) / f"{variant}.yaml"
                path.write_text(yaml.safe_dump(config))
                argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
                servers.append(await start_process(variant, argv, port))
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
            return rounds
    finally:
        for server in servers:
            server.process.terminate()
            await server.process.wait()
        redis.kill()
        await redis.wait()


def report(rounds: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    out = [
        f"{args.streams} SSE streams × {args.max_tokens} tokens at {args.tokens_per_second:g} "
        f"tokens/s; median of {len(rounds)} round(s)",
        "",
        "| | memory | redis | redis vs memory |",
        "|---|---:|---:|---:|",
    ]
    for label, key in ROWS:
        memory, shared = median("memory", key), median("redis", key)
        versus = f"× {shared / memory:.2f}" if memory > 0 else ""
        out.append(f"| {label} | {memory:.1f} | {shared:.1f} | {versus} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_load_args(load_parser(__doc__.splitlines()[0]), argv)
    rounds = asyncio.run(run(args))
    print("\n" + report(rounds, args))
    failed = any(r[s]["completed"] < args.streams for r in rounds for s in r)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
