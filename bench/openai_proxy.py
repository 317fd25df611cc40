"""The gateway in front of a fake OpenAI-compatible upstream, against going straight to it.

    python -m bench.openai_proxy            # 200 streams x 200 tokens at 50 tokens/s, 3 rounds
    python -m bench.openai_proxy --quick    # 50 streams x 50 tokens, 1 round

Paced run: the same load is sent straight to the upstream (`direct`), through
the gateway's `/v1/chat/completions` (`chat`) and through its SSE route
(`sse`); the report gives the TTFT the gateway adds over `direct` and the
gateway's CPU per 1,000 tokens. Flood run: 20 streams of 2,000 tokens with
no pacing, to find the tokens/s one gateway process passes through.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from typing import Any

import orjson

from bench.sse_streams import (
    NO_LIMITS,
    Server,
    free_port,
    servers_in_workdir,
    start_gateway,
    start_process,
)

#: name -> (the route's transport, the model asked for); `direct` is the upstream itself.
TARGETS = {
    "direct": ("openai", "fake-model"),
    "chat": ("openai", "gpt"),
    "sse": ("sse", "gpt"),
}


def gateway_config(port: int, upstream_port: int) -> dict[str, Any]:
    model = {
        "name": "gpt",
        "provider": "openai",
        "base_url": f"http://127.0.0.1:{upstream_port}/v1",
        "api_key": "bench",
        "upstream_model": "fake-model",
        "max_retries": 0,
    }
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "models": [model],
        "auth": {"anonymous": True},
        "rate_limit": {"default": NO_LIMITS},
        "logging": {"level": "warning"},
    }


async def load(target: str, watched: Server, streams: int, tokens: int) -> dict[str, float]:
    """One loadgen run at `watched`, whose CPU it reports (the gateway, or the upstream)."""
    ps = watched.ps
    before = ps.cpu_times()
    transport, model = TARGETS[target]
    loadgen = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.loadgen", "--url", watched.url),
        *("--transport", transport, "--model", model),
        *("--streams", str(streams), "--tokens", str(tokens), "--ramp-s", "1"),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await loadgen.communicate()
    after = ps.cpu_times()
    summary = orjson.loads(stdout)
    cpu_s = after.user + after.system - before.user - before.system
    return {
        "ttft_p50_ms": summary["ttft_p50_s"] * 1000,
        "ttft_p99_ms": summary["ttft_p99_s"] * 1000,
        "cpu_ms_per_1k_tokens": cpu_s * 1e6 / max(1, summary["tokens"]),
        "tokens_per_s": summary["tokens"] / summary["wall_s"],
        "completed": summary["completed"],
        "errors": sum(summary["errors"].values()),
    }


async def upstream_and_gateway(
    servers: list[Server], workdir: Path, name: str, *options: str
) -> dict[str, Server]:
    """The fake upstream (`tests/fake_upstream.py`) with `options`, and a gateway in front."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.fake_upstream", "--port", str(port), *options]
    servers.append(await start_process(name, argv, port))
    config = gateway_config(free_port(), port)
    servers.append(await start_gateway(f"{name}-gateway", config, workdir))
    upstream, gateway = servers[-2:]
    return {"direct": upstream, "chat": gateway, "sse": gateway}


async def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    async with servers_in_workdir() as (servers, workdir):
        paced = await upstream_and_gateway(servers, workdir, "paced", "--tokens", str(args.tokens))
        flood = await upstream_and_gateway(
            servers, workdir, "flood", "--tokens", "2000", "--token-delay-s", "0"
        )
        for name, watched in paced.items():  # warm-up
            await load(name, watched, 20, 10)
        rounds = []
        for index in range(args.rounds):
            names = list(paced)
            names = names[index % 3 :] + names[: index % 3]
            rounds.append({n: await load(n, paced[n], args.streams, args.tokens) for n in names})
            print(f"round {index + 1}: {rounds[-1]}", flush=True)
        flooded = {n: await load(n, watched, 20, 2000) for n, watched in flood.items()}
        return rounds, flooded


def report(rounds: list[dict[str, Any]], flooded: dict[str, Any], args: argparse.Namespace) -> str:
    def median(name: str, key: str) -> float:
        return float(statistics.median(r[name][key] for r in rounds))

    lines = [
        f"Paced: {args.streams} streams x {args.tokens} tokens at 50 tokens/s; "
        f"median of {len(rounds)} round(s)",
        "",
        "| | direct to upstream | gateway /v1/chat/completions | gateway /v1/stream/sse |",
        "|---|---:|---:|---:|",
    ]
    for quantile in ("p50", "p99"):
        key = f"ttft_{quantile}_ms"
        direct = median("direct", key)
        chat, sse = (median(n, key) for n in ("chat", "sse"))
        through = f"{chat:.1f} (+{chat - direct:.1f}) | {sse:.1f} (+{sse - direct:.1f})"
        lines.append(f"| TTFT {quantile} (ms) | {direct:.1f} | {through} |")
    lines += [
        "| CPU per 1,000 tokens (ms; direct: the upstream's) | {:.1f} | {:.1f} | {:.1f} |".format(
            *(median(n, "cpu_ms_per_1k_tokens") for n in TARGETS)
        ),
        "",
        "Flood: 20 streams x 2,000 tokens, no pacing",
        "",
        "| | direct | gateway chat | gateway sse |",
        "|---|---:|---:|---:|",
        "| tokens/s delivered | {:.0f} | {:.0f} | {:.0f} |".format(
            *(flooded[n]["tokens_per_s"] for n in TARGETS)
        ),
        "| gateway CPU per 1,000 tokens (ms) | | {:.1f} | {:.1f} |".format(
            *(flooded[n]["cpu_ms_per_1k_tokens"] for n in ("chat", "sse"))
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.tokens, args.rounds = 50, 50, 1
    rounds, flooded = asyncio.run(run(args))
    print("\n" + report(rounds, flooded, args))
    runs = [*flooded.values(), *(r[n] for r in rounds for n in r)]
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
