"""What the side-by-side benches share: `--tree` checkouts and one fake upstream."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from bench.sse_streams import free_port, wait_ready
from bench.suite import Proc, gateway_config, start

REPO = Path(__file__).resolve().parent.parent


def parse_with_trees(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser`'s arguments plus `--tree` (repeatable), resolved into `args.tree`:
    the checkouts measured, this one when none is given."""
    parser.add_argument(
        "--tree", type=Path, action="append", help="a checkout measured (repeat to compare)"
    )
    args = parser.parse_args(argv)
    args.tree = [tree.resolve() for tree in args.tree or [REPO]]
    return args


@contextlib.asynccontextmanager
async def fake_upstream() -> AsyncIterator[Proc]:
    """The fake OpenAI upstream (tests/fake_upstream.py), ready; stopped on exit."""
    port = free_port()
    command = ["-m", "tests.fake_upstream", "--port", str(port)]
    upstream = Proc(f"http://127.0.0.1:{port}", await start(sys.executable, *command))
    try:
        await wait_ready(upstream.url, upstream.process)
        yield upstream
    finally:
        upstream.process.terminate()
        await upstream.process.wait()


def config_file(work: str | Path, port: int, upstream: Proc, log_level: str = "warning") -> Path:
    """The benches' gateway config (`bench.suite.gateway_config`), written into `work`.

    `log_level`: the suite logs warnings only; "info", the gateway's default,
    adds the access line of every request."""
    tree = gateway_config(port, upstream.url)
    tree["logging"] = {**tree["logging"], "level": log_level}
    config = Path(work) / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config


async def start_in_tree(tree: Path, *argv: str, **env: str) -> asyncio.subprocess.Process:
    """`argv` run from `tree` with `tree` first on the path, so that `-m gateway`
    is that checkout's gateway (`bench.sse_streams.start_process` always runs
    this checkout's, whatever the caller's working folder)."""
    return await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        cwd=tree,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


@contextlib.asynccontextmanager
async def hooked_gateway(
    tree: Path, upstream: Proc, hook: str, out_variable: str
) -> AsyncIterator[tuple[Proc, Path]]:
    """The gateway of `tree`, on `upstream`, run by this checkout's `bench/<hook>`
    (as a file: the hook from here, the gateway from `tree`); also the file the
    hook writes its notes to, named to it by the `out_variable` environment variable."""
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        config = config_file(work, port, upstream)
        out = Path(work) / "notes.json"
        hook_path = str(REPO / "bench" / hook)
        argv = (sys.executable, hook_path, "serve", "--config", str(config))
        process = await start_in_tree(tree, *argv, **{out_variable: str(out)})
        gateway = Proc(f"http://127.0.0.1:{port}", process)
        try:
            await wait_ready(gateway.url, process)
            yield gateway, out
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()


async def hook_notes(gateway: Proc, out: Path) -> Any:
    """What a `hooked_gateway`'s hook noted since the last call (SIGUSR2 has it
    write them and start over)."""
    out.unlink(missing_ok=True)  # noqa: ASYNC240 - a temporary file, instant
    gateway.process.send_signal(signal.SIGUSR2)
    for _ in range(50):
        await asyncio.sleep(0.1)
        if out.exists() and out.stat().st_size:  # noqa: ASYNC240
            break
    return json.loads(out.read_bytes())  # noqa: ASYNC240
