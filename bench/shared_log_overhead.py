"""What `streams.backend: redis` costs the live path: the same gateway with memory and redis logs.

    python -m bench.shared_log_overhead           # 500 streams x 200 tokens, 3 rounds
    python -m bench.shared_log_overhead --quick   # 100 streams x 50 tokens, 1 round

Two `gateway serve` processes with the same simulated model, one with
`streams.backend: memory` and one with `redis` (a redis-server this command
starts). The clients read from the replica that runs their generations, so
this measures what mirroring every event to Redis adds to time to first token
and to CPU. Rounds alternate the order; the report gives medians and ratios.
"""

from __future__ import annotations

import argparse
import asyncio

from bench import sse_streams as shared

ROWS = (*shared.OVERHEAD_ROWS[:3], ("server peak RSS (MiB)", "rss_mib"), shared.OVERHEAD_ROWS[3])
VARIANTS = ("memory", "redis")


async def run(args: argparse.Namespace) -> shared.Rounds:
    async with shared.redis_url() as redis, shared.servers_in_workdir() as (servers, workdir):
        for variant in VARIANTS:
            config = shared.gateway_config(shared.free_port(), args)
            config["streams"] = {"backend": variant}
            config["redis"] = {"url": redis}
            servers.append(await shared.start_gateway(variant, config, workdir))
        return await shared.compare(servers, args)


def main(argv: list[str] | None = None) -> int:
    args = shared.parse_load_args(shared.load_parser(__doc__.splitlines()[0]), argv)
    rounds = asyncio.run(run(args))
    print("\n" + shared.variants_table(rounds, args, VARIANTS, ROWS))
    return shared.exit_status(rounds, args)


if __name__ == "__main__":
    raise SystemExit(main())
