"""What the side-by-side benches share: `--tree` checkouts and one fake upstream."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from bench.sse_streams import free_port, wait_ready
from bench.suite import Proc, start

REPO = Path(__file__).resolve().parent.parent


def add_tree_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tree", type=Path, action="append", help="a checkout measured (repeat to compare)"
    )


def trees(args: argparse.Namespace) -> list[Path]:
    """The `--tree` checkouts, resolved; this one when none is given."""
    return [tree.resolve() for tree in args.tree or [REPO]]


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
