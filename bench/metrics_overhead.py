"""What metrics and access logs cost per stream: the same gateway with them off and on.

    python -m bench.metrics_overhead           # 500 streams x 200 tokens, 3 rounds
    python -m bench.metrics_overhead --quick   # 100 streams x 50 tokens, 1 round

Two `gateway serve` processes with the same simulated model: `off`
(`server.metrics_enabled: false`, `logging.access_log: false`) and `on`
(every metric, and one JSON access line per stream at level info, written
to a real file as a container runtime would collect it). Each round measures
both back to back, alternating the order; the report gives medians and the
ratio of `on` against `off`.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench import sse_streams as shared

VARIANTS = ("off", "on")


def variant_config(port: int, args: argparse.Namespace, variant: str) -> dict[str, Any]:
    config = shared.gateway_config(port, args)
    on = variant == "on"
    config["server"] = {**config["server"], "metrics_enabled": on}
    config["logging"] = {"level": "info" if on else "warning", "access_log": on}
    return config


async def run(args: argparse.Namespace) -> tuple[shared.Rounds, int]:
    """The rounds, and how many lines `on` logged (to a real file, as a runtime collects them)."""
    async with shared.servers_in_workdir() as (servers, workdir):
        for variant in VARIANTS:
            with (workdir / f"{variant}.log").open("wb") as log:
                config = variant_config(shared.free_port(), args, variant)
                servers.append(await shared.start_gateway(variant, config, workdir, stderr=log))
        rounds = await shared.compare(servers, args)
        with (workdir / "on.log").open("rb") as log:
            return rounds, sum(1 for _ in log)


def main(argv: list[str] | None = None) -> int:
    args = shared.parse_load_args(shared.load_parser(__doc__.splitlines()[0]), argv)
    rounds, lines = asyncio.run(run(args))
    note = f"; `on` wrote {lines} log lines"
    print("\n" + shared.variants_table(rounds, args, VARIANTS, digits=3, note=note))
    return shared.exit_status(rounds, args)


if __name__ == "__main__":
    raise SystemExit(main())
