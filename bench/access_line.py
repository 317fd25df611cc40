"""Instructions per JSON access-log line, counted by callgrind.

At the gateway's default `logging.level: info` every request writes one
access line, about a tenth of a stream start's instructions
(`bench.start_instructions --log-level info`); the suite runs at warning
and never sees it. This counts the line alone: each checkout's own logging
set-up (`gateway.logs.configure_logging`, JSON, level info, to /dev/null)
logs the access line of a finished SSE stream (its sixteen fields) N times
and not at all, each run under `valgrind --tool=callgrind`, and prints the
difference per line.

    python -m bench.access_line                                   # this checkout
    python -m bench.access_line --tree /tmp/wt-old --tree .       # side by side

Needs valgrind (Debian: `apt-get install valgrind`). About 20 s a checkout.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.checkouts import parse_with_trees

#: Run in the checkout measured: its own `configure_logging` and formatter.
_LOGGER = """
import logging, os, sys
from gateway.config import LoggingSettings
from gateway.logs import configure_logging
sys.stderr = open(os.devnull, "w")
configure_logging(LoggingSettings(level="info"))
log = logging.getLogger("gateway.access")
fields = {
    "request_id": "a1b2c3d4e5f6a7b8", "principal": "anonymous", "client_ip": "127.0.0.1",
    "method": "POST", "route": "/v1/stream/sse", "status": 200, "duration_ms": 1.3,
    "transport": "sse", "model": "fast", "generation_id": "gen_LOX7cGnGnWy3F9gT6bpz",
    "outcome": "completed", "ttft_ms": 0.9, "tokens": 1, "bytes": 277, "resumed": False,
    "events": 3,
}
for _ in range(int(sys.argv[1])):
    log.info("request", extra=fields)
"""


def instructions(tree: Path, lines: int) -> int:
    """Everything the interpreter executed to start, set up and log `lines` lines."""
    with tempfile.TemporaryDirectory() as work:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/cg.out"]
        command += [sys.executable, "-c", _LOGGER, str(lines)]
        run = subprocess.run(
            command,
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
        )
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind failed in {tree}: {run.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=4000)
    args = parse_with_trees(parser, argv)
    for tree in args.tree:
        per_line = (instructions(tree, args.lines) - instructions(tree, 0)) / args.lines
        print(f"{per_line / 1e3:.1f} k instructions per access line ({tree})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
