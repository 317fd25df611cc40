"""What auth and rate limiting cost per stream: gateways with them off, on (memory), on (redis).

    python -m bench.auth_overhead              # 500 streams x 200 tokens, 3 rounds
    python -m bench.auth_overhead --quick      # 100 streams x 50 tokens, 1 round

Three `gateway serve` processes with the same simulated model: `off`
(anonymous, no limits), `memory` (API key + all three limits, memory
backend), `redis` (API key + all three limits on a redis-server this command
starts). Limits are set high enough never to refuse: the point is the cost of
checking them. Each round measures all three back to back, rotating the order;
the report gives medians and the ratio of each against `off`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
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
    ("streams completed", "completed"),
)


def variant_config(port: int, args: argparse.Namespace, variant: str, key: str, redis_url: str):
    config: dict[str, Any] = gateway_config(port, args)
    if variant == "off":
        zero = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent_streams": 0}
        config["rate_limit"] = {"default": zero}
        return config
    many = {"requests_per_minute": 10**6, "tokens_per_minute": 10**9, "concurrent_streams": 10**5}
    digest = hashlib.sha256(key.encode()).hexdigest()
    config["auth"] = {"anonymous": False, "api_keys": [{"id": "bench", "sha256": digest}]}
    config["rate_limit"] = {"backend": variant, "default": many}
    config["redis"] = {"url": redis_url}
    return config


async def start_gateways(args: argparse.Namespace, workdir: Path, redis_url: str) -> list[Server]:
    key = "gw_" + secrets.token_urlsafe(24)
    servers = []
    for variant in ("off", "memory", "redis"):
        port = free_port()
        path = workdir / f"{variant}.yaml"
        path.write_text(yaml.safe_dump(variant_config(port, args, variant, key, redis_url)))
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
        servers.append(await start_process(variant, argv, port, None if variant == "off" else key))
    return servers


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
            servers = await start_gateways(args, Path(workdir), f"redis://127.0.0.1:{redis_port}/0")
            warmup = argparse.Namespace(**{**vars(args), "streams": 50, "max_tokens": 20})
            for server in servers:
                await measure(server, warmup)
            rounds = []
            for index in range(args.rounds):
                order = servers[index % 3 :] + servers[: index % 3]
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

    lines = [
        f"{args.streams} SSE streams × {args.max_tokens} tokens at {args.tokens_per_second:g} "
        f"tokens/s; median of {len(rounds)} round(s)",
        "",
        "| | off | memory | redis | memory vs off | redis vs off |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, key in ROWS:
        off, mem, red = (median(n, key) for n in ("off", "memory", "redis"))
        versus = [f"× {v / off:.2f}" if off > 0 else "" for v in (mem, red)]
        lines.append(f"| {label} | {off:.1f} | {mem:.1f} | {red:.1f} | {versus[0]} | {versus[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_load_args(load_parser(__doc__.splitlines()[0]), argv)
    rounds = asyncio.run(run(args))
    print("\n" + report(rounds, args))
    failed = any(r[s]["completed"] < args.streams for r in rounds for s in r)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
