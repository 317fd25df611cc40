"""Soak: a steady mix of transports with random disconnects and resumes, for minutes.

    python -m bench.soak                   # 10 minutes, 100 concurrent clients
    python -m bench.soak --minutes 2       # a shorter run

A `gateway serve` process with the simulated model (deterministic per seed)
serves 100 concurrent client loops. Each stream is NDJSON, SSE or WebSocket
at random and then: runs to its end (70 %), is dropped at a random token and
resumed on a new connection from the last seq seen (15 %), or is dropped and
abandoned (15 %). Every completed text, resumed or not, must equal the
reference for its seed. Every 10 s the gateway's RSS, open descriptors and
`gateway_streams_active` are sampled; the report gives their slopes after a
one-minute warm-up (flat means no leak), and checks that every stream the
clients made was counted exactly once in `gateway_streams_total`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.sse_streams import NO_LIMITS, free_port, gateway_process
from tests.sse_parser import SseParser

SEEDS = 50
MAX_TOKENS = 60


@dataclass
class Tally:
    streams: int = 0  # client-side streams, resumes included
    completed: int = 0
    resumed_exact: int = 0
    abandoned: int = 0
    lost_text: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def failed(self, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1


def body(seed: int) -> dict[str, Any]:
    return {"prompt": "soak", "max_tokens": MAX_TOKENS, "seed": seed}


async def read_events(
    response: aiohttp.ClientResponse, sse: bool, stop_after: int | None
) -> list[dict[str, Any]]:
    """Events until the end, or until `stop_after` tokens (then the caller drops)."""
    events: list[dict[str, Any]] = []
    parser = SseParser()
    rest = b""
    async for chunk in response.content.iter_any():
        if sse:
            new = [orjson.loads(e.data) for e in parser.feed(chunk)]
        else:
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            new = [orjson.loads(line) for line in lines if line.strip()]
        events.extend(new)
        tokens = sum(e["type"] == "token" for e in events)
        if stop_after is not None and tokens >= stop_after:
            return events
    return events


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "token")


class Client:
    def __init__(self, url: str, references: dict[int, str], tally: Tally) -> None:
        self.url = url
        self.references = references
        self.tally = tally

    async def http(self, session: aiohttp.ClientSession, transport: str, seed: int, fate: str):
        tally = self.tally
        drop = random.randint(1, MAX_TOKENS - 1) if fate != "complete" else None
        tally.streams += 1
        sse = transport == "sse"
        async with session.post(f"{self.url}/v1/stream/{transport}", json=body(seed)) as r:
            events = await read_events(r, sse, drop)
        if events[-1]["type"] in {"done", "error"}:
            fate = "complete"  # the end came in the same read as the drop point
        if fate == "abandon":
            tally.abandoned += 1
            return
        if fate == "resume":
            generation, last = events[0]["generation_id"], events[-1]["seq"]
            tally.streams += 1
            url = f"{self.url}/v1/generations/{generation}/events"
            headers = {"Accept": "text/event-stream" if sse else "application/x-ndjson"}
            if sse:
                headers["Last-Event-ID"] = f"{generation}:{last}"
                params = {}
            else:
                params = {"after": str(last)}
            async with session.get(url, headers=headers, params=params) as r:
                events += await read_events(r, sse, None)
        self.check(events, seed, fate)

    async def websocket(self, session: aiohttp.ClientSession, seed: int, fate: str) -> None:
        tally = self.tally
        drop = random.randint(1, MAX_TOKENS - 1) if fate != "complete" else None
        tally.streams += 1
        events: list[dict[str, Any]] = []
        async with session.ws_connect(f"{self.url}/v1/stream/ws") as ws:
            await ws.send_json({"type": "generate", "request_id": "s", **body(seed)})
            while not events or events[-1]["type"] not in {"done", "error"}:
                events.append(await ws.receive_json(timeout=30))
                if drop is not None and sum(e["type"] == "token" for e in events) >= drop:
                    break
        if fate == "abandon":
            tally.abandoned += 1
            return
        if fate == "resume":
            tally.streams += 1
            resume = {
                "type": "resume",
                "request_id": "r",
                "generation_id": events[0]["generation_id"],
                "after_seq": events[-1]["seq"],
            }
            async with session.ws_connect(f"{self.url}/v1/stream/ws") as ws:
                await ws.send_json(resume)
                while events[-1]["type"] not in {"done", "error"}:
                    events.append(await ws.receive_json(timeout=30))
        self.check(events, seed, fate)

    def check(self, events: list[dict[str, Any]], seed: int, fate: str) -> None:
        if events[-1]["type"] != "done":
            self.tally.failed(f"ended with {events[-1].get('code', events[-1]['type'])}")
            return
        if text_of(events) != self.references[seed]:
            self.tally.lost_text += 1
            return
        self.tally.completed += 1
        if fate == "resume":
            self.tally.resumed_exact += 1

    async def loop(self, session: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            transport = random.choice(["chunked", "sse", "ws"])
            seed = random.randrange(SEEDS)
            fate = random.choices(["complete", "resume", "abandon"], [70, 15, 15])[0]
            try:
                if transport == "ws":
                    await self.websocket(session, seed, fate)
                else:
                    await self.http(session, transport, seed, fate)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                self.tally.failed(type(exc).__name__)


def scrape(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute."""
    if len(samples) < 2:
        return float("nan")
    xs, ys = [s[0] for s in samples], [s[1] for s in samples]
    return statistics.linear_regression(xs, ys).slope * 60


async def run(args: argparse.Namespace) -> int:
    config = {
        "server": {"port": free_port()},
        "models": [
            {
                "name": "sim-soak",
                "provider": "simulated",
                "first_token_ms": 20,
                "tokens_per_second": 100,
            }
        ],
        "rate_limit": {"default": NO_LIMITS},
        "logging": {"level": "warning"},
    }
    async with gateway_process(config) as (url, process):
        return await soak(args, url, psutil.Process(process.pid))


async def soak(args: argparse.Namespace, url: str, gateway: psutil.Process) -> int:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        references = {}
        for seed in range(SEEDS):
            async with session.post(f"{url}/v1/stream/chunked", json=body(seed)) as r:
                references[seed] = text_of(await read_events(r, False, None))
        async with session.get(f"{url}/metrics") as r:
            counted_before = scrape(await r.text(), "gateway_streams_total")
        started = time.monotonic()
        until = started + args.minutes * 60
        client = Client(url, references, tally)
        loops = [asyncio.ensure_future(client.loop(session, until)) for _ in range(args.clients)]
        samples: list[dict[str, float]] = []
        while time.monotonic() < until:
            await asyncio.sleep(10)
            async with session.get(f"{url}/metrics") as r:
                active = scrape(await r.text(), "gateway_streams_active")
            sample = {
                "t": time.monotonic() - started,
                "rss_mib": gateway.memory_info().rss / 2**20,
                "fds": float(gateway.num_fds()),
                "active": active,
            }
            samples.append(sample)
            print(
                f"t={sample['t']:5.0f}s rss={sample['rss_mib']:6.1f} MiB fds={sample['fds']:4.0f} "
                f"active={active:4.0f} streams={tally.streams} completed={tally.completed}",
                flush=True,
            )
        await asyncio.gather(*loops)
        # Abandoned streams end within the resume grace (10 s).
        async with asyncio.timeout(30):
            while True:
                async with session.get(f"{url}/metrics") as r:
                    text = await r.text()
                if scrape(text, "gateway_streams_active") == 0:
                    break
                await asyncio.sleep(0.5)
        counted = scrape(text, "gateway_streams_total") - counted_before
    warm = [s for s in samples if s["t"] >= min(60, args.minutes * 30)]
    rss_slope = slope_per_minute([(s["t"], s["rss_mib"]) for s in warm])
    fd_slope = slope_per_minute([(s["t"], s["fds"]) for s in warm])
    report = {
        "minutes": args.minutes,
        "clients": args.clients,
        "streams": tally.streams,
        "counted_by_gateway": counted,
        "completed_exact": tally.completed,
        "resumed_exact": tally.resumed_exact,
        "abandoned": tally.abandoned,
        "lost_text": tally.lost_text,
        "errors": tally.errors,
        "rss_mib_first_last": [warm[0]["rss_mib"], warm[-1]["rss_mib"]] if warm else None,
        "rss_slope_mib_per_min": rss_slope,
        "fds_first_last": [warm[0]["fds"], warm[-1]["fds"]] if warm else None,
        "fd_slope_per_min": fd_slope,
    }
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    ok = not tally.lost_text and not tally.errors and counted == tally.streams
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args(argv)
    random.seed(os.environ.get("SOAK_SEED", "1"))
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
