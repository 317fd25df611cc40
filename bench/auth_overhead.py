"""What auth and rate limiting cost per stream: gateways with them off, on (memory), on (redis).

    python -m bench.auth_overhead              # 500 streams x 200 tokens, 3 rounds
    python -m bench.auth_overhead --quick      # 100 streams x 50 tokens, 1 round

Three `gateway serve` processes with the same simulated model: `off`
(anonymous, no limits), `memory` (API key + all three limits, memory
backend), `redis` (API key + all three limits on a redis-server this command
starts). Limits are set high enough never to refuse: the point is the cost of
checking them. Each round measures all three back to back, rotating the order;
the report gives medians and the ratio of each against `off`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
from typing import Any

from bench import sse_streams as shared

VARIANTS = ("off", "memory", "redis")


def variant_config(
    port: int, args: argparse.Namespace, variant: str, key: str, redis: str
) -> dict[str, Any]:
    config = shared.gateway_config(port, args)  # limits high enough never to refuse
    if variant == "off":
        config["rate_limit"] = {"default": shared.NO_LIMITS}
        return config
    digest = hashlib.sha256(key.encode()).hexdigest()
    config["auth"] = {"anonymous": False, "api_keys": [{"id": "bench", "sha256": digest}]}
    config["rate_limit"] = {**config["rate_limit"], "backend": variant}
    config["redis"] = {"url": redis}
    return config


async def run(args: argparse.Namespace) -> shared.Rounds:
    key = "gw_" + secrets.token_urlsafe(24)
    async with shared.redis_url() as redis, shared.servers_in_workdir() as (servers, workdir):
        for variant in VARIANTS:
            config = variant_config(shared.free_port(), args, variant, key, redis)
            bearer = None if variant == "off" else key
            servers.append(await shared.start_gateway(variant, config, workdir, bearer))
        return await shared.compare(servers, args)


def main(argv: list[str] | None = None) -> int:
    args = shared.parse_load_args(shared.load_parser(__doc__.splitlines()[0]), argv)
    rounds = asyncio.run(run(args))
    print("\n" + shared.variants_table(rounds, args, VARIANTS))
    return shared.exit_status(rounds, args)


if __name__ == "__main__":
    raise SystemExit(main())
