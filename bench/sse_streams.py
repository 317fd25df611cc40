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
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
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
    async with servers_in_workdir() as (servers, workdir):
        gateway = await start_gateway("gateway", config, workdir, stderr=asyncio.subprocess.DEVNULL)
        servers.append(gateway)
        yield gateway.url, gateway.process


def gateway_config(port: int, args: argparse.Namespace) -> dict[str, Any]:
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


async def start_process(
    name: str, argv: list[str], port: int, bearer: str | None = None, stderr: Any = None
) -> Server:
    """A server process on `port`, once its `/healthz` answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=stderr
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, process)
    except BaseException:
        process.terminate()
        await process.wait()
        raise
    return Server(name, base, process, bearer)


async def start_gateway(
    name: str,
    config: dict[str, Any],
    workdir: Path,
    bearer: str | None = None,
    stderr: Any = None,
) -> Server:
    """`gateway serve` with `config` (written to `workdir/<name>.yaml`), ready."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
    return await start_process(name, argv, config["server"]["port"], bearer, stderr)


@contextlib.asynccontextmanager
async def servers_in_workdir() -> AsyncIterator[tuple[list[Server], Path]]:
    """A list to start servers into and a folder for their configs; all stopped on exit."""
    servers: list[Server] = []
    with tempfile.TemporaryDirectory() as workdir:
        try:
            yield servers, Path(workdir)
        finally:
            for server in servers:
                server.process.terminate()
                await server.process.wait()


@contextlib.asynccontextmanager
async def redis_url() -> AsyncIterator[str]:
    """A throwaway redis-server (no persistence) on a free port, killed on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    redis = await asyncio.create_subprocess_exec(
        *(binary, "--port", str(port), "--bind", "127.0.0.1"),
        *("--save", "", "--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        redis.kill()
        await redis.wait()


Rounds = list[dict[str, dict[str, float]]]


async def measure(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """One load-generator run against one server, with its CPU time and peak RSS."""
    ps = server.ps
    rss_before = ps.memory_info().rss
    cpu = ps.cpu_times()
    cpu_before = cpu.user + cpu.system
    peak_rss = rss_before
    loadgen = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.loadgen", "--url", server.url, "--transport", "sse"),
        *("--streams", str(args.streams), "--tokens", str(args.max_tokens)),
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


def report(rounds: Rounds, args: argparse.Namespace) -> str:
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


async def compare(servers: list[Server], args: argparse.Namespace) -> Rounds:
    """A warm-up per server (first-use costs, such as imports and arenas, are not
    per stream), then `args.rounds` rounds measuring each server in turn, the
    order rotating so that no server always goes first."""
    warmup = argparse.Namespace(**{**vars(args), "streams": 50, "max_tokens": 20})
    for server in servers:
        await measure(server, warmup)
    rounds = []
    for index in range(args.rounds):
        shift = index % len(servers)
        measured = {}
        for server in servers[shift:] + servers[:shift]:
            measured[server.name] = await measure(server, args)
            print(f"round {index + 1} {server.name}: {measured[server.name]}", flush=True)
        rounds.append(measured)
    return rounds


#: What the variant benchmarks (auth, metrics, shared log) report.
OVERHEAD_ROWS = (
    ("TTFT added, p50 (ms)", "ttft_added_p50_ms"),
    ("TTFT added, p99 (ms)", "ttft_added_p99_ms"),
    ("server CPU per 1,000 tokens (ms)", "cpu_ms_per_1k_tokens"),
    ("streams completed", "completed"),
)


def variants_table(
    rounds: Rounds,
    args: argparse.Namespace,
    names: Sequence[str],
    rows: Sequence[tuple[str, str]] = OVERHEAD_ROWS,
    digits: int = 2,
    note: str = "",
) -> str:
    """Medians over rounds, one column per variant, then each against the first."""
    first, others = names[0], names[1:]
    lines = [
        f"{args.streams} SSE streams × {args.max_tokens} tokens at {args.tokens_per_second:g} "
        f"tokens/s; median of {len(rounds)} round(s){note}",
        "",
        "| | " + " | ".join([*names, *(f"{name} vs {first}" for name in others)]) + " |",
        "|---|" + "---:|" * (2 * len(names) - 1),
    ]
    for label, key in rows:
        values = [statistics.median(r[name][key] for r in rounds) for name in names]
        versus = [f"× {v / values[0]:.{digits}f}" if values[0] > 0 else "" for v in values[1:]]
        lines.append("| " + " | ".join([label, *(f"{v:.1f}" for v in values), *versus]) + " |")
    return "\n".join(lines)


def exit_status(rounds: Rounds, args: argparse.Namespace) -> int:
    """1 if any stream of any round lost a token or failed."""
    return int(any(r[s]["completed"] < args.streams for r in rounds for s in r))


async def run_rounds(args: argparse.Namespace) -> Rounds:
    async with servers_in_workdir() as (servers, workdir):
        baseline_port = free_port()
        baseline = [
            *(sys.executable, "-m", "bench.baseline_server", "--port", str(baseline_port)),
            *("--tokens-per-second", str(args.tokens_per_second)),
            *("--first-token-ms", str(args.first_token_ms)),
        ]
        servers.append(await start_process("baseline", baseline, baseline_port))
        config = gateway_config(free_port(), args)
        servers.append(await start_gateway("gateway", config, workdir))
        return await compare(servers, args)


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
    rounds = asyncio.run(run_rounds(args))
    print("\n" + report(rounds, args))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(rounds, option=orjson.OPT_INDENT_2))
    return exit_status(rounds, args)


if __name__ == "__main__":
    raise SystemExit(main())
