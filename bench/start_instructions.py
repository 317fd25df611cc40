"""Instructions per stream start through the whole gateway, counted by callgrind.

Timings on this shared 2-core machine move by ±10 % from run to run, more
than most single levers on the start path are worth. Instruction counts
repeat to ±0.2 % under the same load (a loaded machine batches more events
per loop turn, which moves them by up to 10 %, so checkouts are measured
side by side, one transport at a time). The gateway runs under
`valgrind --tool=callgrind`, serves a warm-up, has its counters zeroed
(`callgrind_control -z`), serves N one-token streams one at a time from the
fake OpenAI upstream (a new client connection each, as `bench.suite`'s
`starts` opens them), and is dumped (`callgrind_control -d`). The count is
user space only: the system calls' kernel work is not in it, so it says what
the Python side of a start costs.

    python -m bench.start_instructions                       # this checkout, sse then openai
    python -m bench.start_instructions --tree /tmp/wt-old --tree .   # side by side
    python -m bench.start_instructions --transports chunked --streams 200
    python -m bench.start_instructions --per-token --transports ws,sse   # per paced token
    python -m bench.start_instructions --log-level info   # with the access log on, as by default

`--per-token` serves, in the same gateway, one-token streams and then
50-token streams from the `paced-20` model (a token every 20 ms, one upstream
read each, S3's shape), two at a time, and prints the difference per extra
token: what one paced token costs, its start taken out.

Needs valgrind (Debian: `apt-get install valgrind`). About 50 s per
transport for 100 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.checkouts import config_file, fake_upstream, parse_with_trees, start_in_tree
from bench.sse_streams import free_port, wait_ready
from bench.suite import Proc, load


async def ready(proc: Proc, within_s: float = 300) -> None:
    """Under callgrind the gateway takes tens of seconds to start."""
    async with asyncio.timeout(within_s):
        while True:
            with contextlib.suppress(Exception):
                await wait_ready(proc.url, proc.process)
                return
            await asyncio.sleep(1)


async def callgrind_control(option: str, pid: int) -> None:
    """`-z` zeroes the running process's counters, `-d` dumps them."""
    control = await asyncio.create_subprocess_exec(
        "callgrind_control",
        option,
        str(pid),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await control.wait() != 0:
        raise RuntimeError(f"callgrind_control {option} {pid} failed")


def total_instructions(dump_dir: Path) -> int:
    newest = max(dump_dir.glob("cg.out*"), key=os.path.getmtime)
    for line in newest.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {newest}")


#: `--per-token`: tokens in a long stream, and streams served at once (under
#: callgrind a token costs ~50x its native CPU; more at once would coalesce reads).
PACED_TOKENS, PACED_CONCURRENCY = 50, 2


async def served(
    process: asyncio.subprocess.Process, gateway: Proc, transport: str, model: str, **options: Any
) -> int:
    """One `load` run with the counters zeroed before and dumped after; streams completed."""
    await callgrind_control("-z", process.pid)
    run = await load(gateway, gateway.url, transport, model, **options)
    await callgrind_control("-d", process.pid)
    if run["errors"]:
        raise RuntimeError(f"{transport}: errors {run['errors']}")
    return int(run["completed"])


async def per_start(
    tree: Path,
    transport: str,
    streams: int,
    upstream: Proc,
    per_token: bool = False,
    log_level: str = "warning",
) -> float:
    """Instructions per one-token stream over `transport`, for the gateway in `tree`;
    with `per_token`, per paced token beyond the first."""
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        config = config_file(work, port, upstream, log_level)
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/cg.out"]
        command += [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        process = await start_in_tree(tree, *command)
        gateway = Proc(f"http://127.0.0.1:{port}", process)
        try:
            await ready(gateway)
            model = "paced-20" if per_token else "fast"
            options = {"tokens": 1, "concurrency": 1, "timeout_s": 600}
            await load(gateway, gateway.url, transport, model, streams=60, **options)
            completed = await served(process, gateway, transport, model, streams=streams, **options)
            one = total_instructions(Path(work)) / max(1, completed)
            if not per_token:
                return one
            options.update(tokens=PACED_TOKENS, concurrency=PACED_CONCURRENCY)
            completed = await served(process, gateway, transport, model, streams=streams, **options)
            long = total_instructions(Path(work)) / max(1, completed)
            return (long - one) / (PACED_TOKENS - 1)
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()


async def measure(args: argparse.Namespace) -> None:
    async with fake_upstream() as upstream:
        for transport in [t.strip() for t in args.transports.split(",")]:
            # The checkouts side by side, so that each runs under the same load.
            counts = await asyncio.gather(
                *(
                    per_start(
                        tree, transport, args.streams, upstream, args.per_token, args.log_level
                    )
                    for tree in args.tree
                )
            )
            for tree, count in zip(args.tree, counts, strict=True):
                if args.per_token:
                    print(f"{transport}: {count / 1e3:.1f} k instructions per paced token ({tree})")
                else:
                    print(
                        f"{transport}: {count / 1e6:.3f} M instructions per stream start ({tree})"
                    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transports", default="sse,openai")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument(
        "--per-token", action="store_true", help="per paced token instead of per start"
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        help="the gateway's `logging.level` (the suite's: warning; the default: info)",
    )
    asyncio.run(measure(parse_with_trees(parser, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
