"""`gateway serve` as a real process from a config dict, for tests that need one.

Its stderr (the JSON logs) goes to a file, never a pipe: a pipe nobody reads
fills up and blocks the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
#: Rate limits off: tests that are not about them must never be refused.
NO_LIMITS = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent_streams": 0}


@dataclass
class GatewayProcess:
    port: int
    process: asyncio.subprocess.Process
    log: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text()

    def access_lines(self) -> list[dict[str, Any]]:
        lines = [orjson.loads(line) for line in self.log.read_bytes().splitlines() if line]
        return [line for line in lines if line.get("logger") == "gateway.access"]

    def open_fds(self) -> int:
        return len(list(Path(f"/proc/{self.process.pid}/fd").iterdir()))

    async def stop(self) -> None:
        """Two signals: the second skips the drain."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
            self.process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            await self.process.wait()


def _limit_open_files(count: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


async def start_gateway_process(
    config: dict[str, Any], folder: Path, *, open_files: int | None = None
) -> GatewayProcess:
    """Write `config` (it must set `server.port`) to `folder`, start, wait for /healthz.

    `open_files` sets the process's open-files limit (soft and hard).
    """
    port = config["server"]["port"]
    path = folder / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = folder / f"gateway-{port}.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "serve", "--config", str(path)),
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=None if open_files is None else partial(_limit_open_files, open_files),
        )
    gateway = GatewayProcess(port, process, log)
    await wait_healthy(gateway.url, process, log.read_text)
    return gateway


async def wait_healthy(
    url: str, process: asyncio.subprocess.Process, why: Callable[[], str] = str
) -> None:
    """Until `url`/healthz answers 200; fails at once (with `why()`) if the process exits."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(15):
        while True:
            assert process.returncode is None, why()
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)


# -- `python -m gateway` on the repository's config.yaml, overridden by environment ----------


async def start_process(port: int, **overrides: str) -> asyncio.subprocess.Process:
    """`python -m gateway` with the repository's config.yaml, on `port`; waits for /healthz.

    `overrides` are config keys as environment variables (`GATEWAY__SERVER__…`).
    Its stdout and stderr are pipes: read them (`drain_pipe`) or the gateway blocks.
    """
    env = {**os.environ, "GATEWAY__SERVER__PORT": str(port), **overrides}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await wait_healthy(f"http://127.0.0.1:{port}", process)
    return process


async def drain_pipe(stream: asyncio.StreamReader | None, keep: bytearray | None = None) -> None:
    """Read a child's pipe to the end, so its logging never blocks on a full pipe;
    the first 64 KiB go to `keep` if given (for a failure message)."""
    if stream is None:
        return
    while data := await stream.read(65536):
        if keep is not None:
            keep += data[: 65536 - len(keep)]


async def stop_process(
    process: asyncio.subprocess.Process, drains: list[asyncio.Task[None]]
) -> None:
    """SIGTERM, then wait for the exit and for its pipes to be read to the end."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        await process.wait()
        await asyncio.gather(*drains)


@dataclass
class ServedGateway:
    url: str
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def serving(models: list[dict[str, Any]]) -> AsyncIterator[ServedGateway]:
    """`python -m gateway` serving `models`, for pages in a browser: no rate limits,
    warnings only, no shutdown grace; stopped at the end."""
    port = free_port()
    process = await start_process(
        port,
        GATEWAY__MODELS=json.dumps(models),  # JSON is YAML
        GATEWAY__RATE_LIMIT__DEFAULT=json.dumps(NO_LIMITS),
        GATEWAY__LOGGING__LEVEL="warning",
        GATEWAY__SERVER__SHUTDOWN_GRACE_S="0",
    )
    loop = asyncio.get_running_loop()
    drains = [
        loop.create_task(drain_pipe(process.stdout)),
        loop.create_task(drain_pipe(process.stderr)),
    ]
    try:
        yield ServedGateway(f"http://127.0.0.1:{port}", process)
    finally:
        await stop_process(process, drains)
