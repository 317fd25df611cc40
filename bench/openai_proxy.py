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
import tempfile
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.sse_streams import Server, free_port, start_process


def gateway_config(port: int, upstream_port: int) -> dict[str, Any]:
    zero = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent_streams": 0}
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
        "rate_limit": {"default": zero},
        "logging": {"level": "warning"},
    }


async def load(
    target: str, url: str, streams: int, tokens: int, watched: Server
) -> dict[str, float]:
    """One loadgen run; CPU is the watched process's (the gateway, or the upstream)."""
    ps = watched.ps
    before = ps.cpu_times()
    chat = target != "sse"
    model = "fake-model" if target == "direct" else "gpt"
    loadgen = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.loadgen", "--url", url, "--model", model),
        *("--streams", str(streams), "--max-tokens", str(tokens), "--ramp-s", "1"),
        *(("--chat",) if chat else ()),
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


async def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    servers: list[Server] = []
    try:
        with tempfile.TemporaryDirectory() as workdir:
            paced_port, flood_port, gw_port, gw2_port = (free_port() for _ in range(4))
            upstream_argv = [sys.executable, "-m", "bench.upstream_server", "--port"]
            paced = await start_process(
                "upstream",
                [*upstream_argv, str(paced_port), "--tokens", str(args.tokens)],
                paced_port,
            )
            flood = await start_process(
                "flood-upstream",
                [*upstream_argv, str(flood_port), "--tokens", "2000", "--token-delay-s", "0"],
                flood_port,
            )
            servers += [paced, flood]
            gateways = []
            for port, upstream_port in ((gw_port, paced_port), (gw2_port, flood_port)):
                path = Path(workdir) / f"gw-{port}.yaml"
                path.write_text(yaml.safe_dump(gateway_config(port, upstream_port)))
                argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
                gateways.append(await start_process("gateway", argv, port))
            servers += gateways
            urls = {
                "direct": (f"http://127.0.0.1:{paced_port}/v1/chat/completions", paced),
                "chat": (f"http://127.0.0.1:{gw_port}/v1/chat/completions", gateways[0]),
                "sse": (f"http://127.0.0.1:{gw_port}/v1/stream/sse", gateways[0]),
            }
            for name, (url, watched) in urls.items():  # warm-up
                await load(name, url, 20, 10, watched)
            rounds = []
            for index in range(args.rounds):
                names = list(urls)
                names = names[index % 3 :] + names[: index % 3]
                rounds.append(
                    {
                        n: await load(n, urls[n][0], args.streams, args.tokens, urls[n][1])
                        for n in names
                    }
                )
                print(f"round {index + 1}: {rounds[-1]}", flush=True)
            flood_urls = {
                "direct": (f"http://127.0.0.1:{flood_port}/v1/chat/completions", flood),
                "chat": (f"http://127.0.0.1:{gw2_port}/v1/chat/completions", gateways[1]),
                "sse": (f"http://127.0.0.1:{gw2_port}/v1/stream/sse", gateways[1]),
            }
            flooded = {
                n: await load(n, url, 20, 2000, watched) for n, (url, watched) in flood_urls.items()
            }
            return rounds, flooded
    finally:
        for server in servers:
            server.process.terminate()
            await server.process.wait()


def report(rounds: list[dict[str, Any]], flooded: dict[str, Any], args: argparse.Namespace) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    direct50, direct99 = median("direct", "ttft_p50_ms"), median("direct", "ttft_p99_ms")
    lines = [
        f"Paced: {args.streams} streams x {args.tokens} tokens at 50 tokens/s; "
        f"median of {len(rounds)} round(s)",
        "",
        "| | direct to upstream | gateway /v1/chat/completions | gateway /v1/stream/sse |",
        "|---|---:|---:|---:|",
        "| TTFT p50 (ms) | {:.1f} | {:.1f} (+{:.1f}) | {:.1f} (+{:.1f}) |".format(
            direct50,
            median("chat", "ttft_p50_ms"),
            median("chat", "ttft_p50_ms") - direct50,
            median("sse", "ttft_p50_ms"),
            median("sse", "ttft_p50_ms") - direct50,
        ),
        "| TTFT p99 (ms) | {:.1f} | {:.1f} (+{:.1f}) | {:.1f} (+{:.1f}) |".format(
            direct99,
            median("chat", "ttft_p99_ms"),
            median("chat", "ttft_p99_ms") - direct99,
            median("sse", "ttft_p99_ms"),
            median("sse", "ttft_p99_ms") - direct99,
        ),
        "| CPU per 1,000 tokens (ms; direct: the upstream's) | {:.1f} | {:.1f} | {:.1f} |".format(
            *(median(n, "cpu_ms_per_1k_tokens") for n in ("direct", "chat", "sse"))
        ),
        "",
        "Flood: 20 streams x 2,000 tokens, no pacing",
        "",
        "| | direct | gateway chat | gateway sse |",
        "|---|---:|---:|---:|",
        "| tokens/s delivered | {:.0f} | {:.0f} | {:.0f} |".format(
            *(flooded[n]["tokens_per_s"] for n in ("direct", "chat", "sse"))
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
