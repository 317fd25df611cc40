"""N concurrent SSE streams from the simulated model: the gateway vs a bare aiohttp baseline.

    python -m bench.sse_streams                 # 500 streams, 50 tokens/s, 200 tokens, 3 rounds
    python -m bench.sse_streams --quick         # 100 streams, 50 tokens, 1 round

Both servers run as their own processes with the same pacing (first token
after 150 ms, then 50 tokens/s); the load generator is a third process. Each
round measures the baseline and the gateway back to back (alternating which
goes first) and the report gives medians over rounds, as ratios or
differences against the baseline, because the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    url: str
    process: asyncio.subprocess.Process
    bearer: str | None = None

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.process.pid)


async def wait_ready(base: str, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                async with session.get(base + "/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base} did not become ready")


#: Rate limits off: a benchmark measures streaming, not refusals.
NO_LIMITS = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent_streams": 0}


@contextlib.asynccontextmanager
async def gateway_process(
    config: dict[str, Any],
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """`gateway serve` with `config` (it sets `server.port`), ready; stopped on exit."""
    port = config["server"]["port"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "serve", "--config", str(path)),
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(url, process)
            yield url, process
        finally:
            process.terminate()
            await process.wait()


def gateway_config(port: int, args: argparse.Namespace) -> dict[str, object]:
    """The default config, with limits lifted so the benchmark measures streaming."""
    many = {"requests_per_minute": 10**6, "tokens_per_minute": 10**9, "concurrent_streams": 10**5}
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "models": [
            {
                "name": "sim-1",
                "provider": "simulated",
                "tokens_per_second": args.tokens_per_second,
                "first_token_ms": args.first_token_ms,
            }
        ],
        "auth": {"anonymous": True},
        "rate_limit": {"default": many},
        "logging": {"level": "warning"},
    }


async def start_servers(args: argparse.Namespace, workdir: Path) -> list[Server]:
    gw_port, base_port = free_port(), free_port()
    config = workdir / "bench-gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_config(gw_port, args)))
    commands = {
        "gateway": ([sys.executable, "-m", "gateway", "serve", "--config", str(config)], gw_port),
        "baseline": (
            [
                *(sys.executable, "-m", "bench.baseline_server", "--port", str(base_port)),
                *("--tokens-per-second", str(args.tokens_per_second)),
                *("--first-token-ms", str(args.first_token_ms)),
            ],
            base_port,
        ),
    }
    return [await start_process(name, argv, port) for name, (argv, port) in commands.items()]


async def start_process(name: str, argv: list[str], port: int, bearer: str | None = None) -> Server:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=None
    )
    base = f"http://127.0.0.1:{port}"
    await wait_ready(base, process)
    return Server(name, base + "/v1/stream/sse", process, bearer)


async def measure(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """One load-generator run against one server, with its CPU time and peak RSS."""
    ps = server.ps
    rss_before = ps.memory_info().rss
    cpu = ps.cpu_times()
    cpu_before = cpu.user + cpu.system
    peak_rss = rss_before
    loadgen = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.loadgen", "--url", server.url),
        *("--streams", str(args.streams), "--max-tokens", str(args.max_tokens)),
        *("--ramp-s", str(args.ramp_s)),
        *(("--bearer", server.bearer) if server.bearer else ()),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    output = asyncio.ensure_future(loadgen.communicate())
    while not output.done():
        peak_rss = max(peak_rss, ps.memory_info().rss)
        await asyncio.wait([output], timeout=0.05)
    stdout, _ = output.result()
    if loadgen.returncode != 0:
        raise RuntimeError(f"loadgen failed with {loadgen.returncode}")
    cpu = ps.cpu_times()
    summary = orjson.loads(stdout)
    tokens = max(1, summary["tokens"])
    held = max(1, summary["held_peak"])
    first = args.first_token_ms / 1000
    return {
        **{k: v for k, v in summary.items() if k != "errors"},
        "errors": sum(summary["errors"].values()),
        "ttft_added_p50_ms": (summary["ttft_p50_s"] - first) * 1000,
        "ttft_added_p99_ms": (summary["ttft_p99_s"] - first) * 1000,
        "cpu_ms_per_1k_tokens": (cpu.user + cpu.system - cpu_before) * 1000 / tokens * 1000,
        "rss_kib_per_stream": (peak_rss - rss_before) / 1024 / held,
        "rss_mib": peak_rss / 2**20,
    }


ROWS = (
    ("streams held (peak open at once)", "held_peak", "{:.0f}", None),
    ("streams completed with every token", "completed", "{:.0f}", None),
    ("errors", "errors", "{:.0f}", None),
    ("TTFT added over the model's own delay, p50 (ms)", "ttft_added_p50_ms", "{:.1f}", "ms"),
    ("TTFT added over the model's own delay, p99 (ms)", "ttft_added_p99_ms", "{:.1f}", "ms"),
    ("stream duration p99 (s)", "duration_p99_s", "{:.2f}", "ratio"),
    ("server CPU per 1,000 tokens (ms)", "cpu_ms_per_1k_tokens", "{:.1f}", "ratio"),
    ("server RSS growth per open stream (KiB)", "rss_kib_per_stream", "{:.1f}", "KiB"),
    ("server peak RSS (MiB)", "rss_mib", "{:.1f}", "ratio"),
)


def report(rounds: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    def median(server: str, key: str) -> float:
        return statistics.median(r[server][key] for r in rounds)

    lines = [
        f"{args.streams} SSE streams, {args.max_tokens} tokens each at "
        f"{args.tokens_per_second:g} tokens/s (first token after {args.first_token_ms:g} ms), "
        f"started over {args.ramp_s:g} s; median of {len(rounds)} round(s)",
        "",
        "| | baseline (hand-rolled aiohttp, same model) | gateway | gateway vs baseline |",
        "|---|---:|---:|---:|",
    ]
    for label, key, fmt, compare in ROWS:
        base, gw = median("baseline", key), median("gateway", key)
        versus = ""
        if compare in ("ms", "KiB"):
            versus = f"{gw - base:+.1f} {compare}"
        elif compare == "ratio" and base > 0:
            versus = f"× {gw / base:.2f}"
        lines.append(f"| {label} | {fmt.format(base)} | {fmt.format(gw)} | {versus} |")
    return "\n".join(lines)


async def run_rounds(args: argparse.Namespace) -> list[dict[str, dict[str, float]]]:
    with tempfile.TemporaryDirectory() as workdir:
        servers = await start_servers(args, Path(workdir))
        try:
            warmup = argparse.Namespace(**{**vars(args), "streams": 50, "max_tokens": 20})
            for server in servers:  # first-use costs (imports, arenas) are not per stream
                await measure(server, warmup)
            rounds = []
            for index in range(args.rounds):
                order = servers if index % 2 else servers[::-1]
                measured = {}
                for server in order:
                    measured[server.name] = await measure(server, args)
                    print(f"round {index + 1} {server.name}: {measured[server.name]}", flush=True)
                rounds.append(measured)
        finally:
            for server in servers:
                server.process.terminate()
                await server.process.wait()
    return rounds


def main_report(rounds: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> int:
    print("\n" + report(rounds, args))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(rounds, option=orjson.OPT_INDENT_2))
    failed = any(r[s]["completed"] < args.streams for r in rounds for s in r)
    return 1 if failed else 0


def load_parser(description: str) -> argparse.ArgumentParser:
    """The load options every simulated-model scenario shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--tokens-per-second", type=float, default=50)
    parser.add_argument("--first-token-ms", type=float, default=150)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--ramp-s", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100 streams, 50 tokens, 1 round")
    return parser


def parse_load_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.max_tokens, args.rounds = 100, 50, 1
    return args


def main(argv: list[str] | None = None) -> int:
    parser = load_parser(__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write every round's raw figures here")
    args = parse_load_args(parser, argv)
    return main_report(asyncio.run(run_rounds(args)), args)


if __name__ == "__main__":
    raise SystemExit(main())
