"""Metrics and access logs against scripted traffic on a real gateway.

Each test takes a scrape of `/metrics` before and after its traffic, parses
both with prometheus-client's own parser, and asserts the exact deltas, and
that `gateway_streams_active` is back to 0 once every stream has ended.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import metrics_key, registry_key
from tests.conftest import FAST_MODEL, TEST_API_KEY, StartGateway, make_settings, require_binary
from tests.fake_upstream import FakeUpstream
from tests.helpers import read_ndjson, read_sse, text_of
from tests.redis_server import free_port

Labels = frozenset[tuple[str, str]]
Scrape = dict[tuple[str, Labels], float]

SLOW = {"name": "slow", "provider": "simulated", "tokens_per_second": 20, "first_token_ms": 0}
BROKEN = {**FAST_MODEL, "name": "broken", "fail_after_tokens": 3}
MODELS = [FAST_MODEL, SLOW, BROKEN]
TRANSPORTS = ("chunked", "sse", "websocket", "openai")
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


def parse(text: str) -> Scrape:
    samples: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(server: TestServer) -> Scrape:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/metrics")) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return parse(await response.text())


def value(samples: Scrape, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Deltas:
    """`after - before` for one sample."""

    def __init__(self, before: Scrape, after: Scrape) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)

    def total(self, name: str, **labels: str) -> float:
        """Summed over every label set that matches `labels`."""
        wanted = set(labels.items())
        return sum(
            v - self.before.get(key, 0.0)
            for key, v in self.after.items()
            if key[0] == name and wanted <= key[1]
        )


async def eventually(check: Callable[[], Any], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


async def settled(server: TestServer, **expected: float) -> Scrape:
    """Scrape until no stream is active (handlers of departed clients end asynchronously)."""
    result: Scrape = {}

    async def done() -> bool:
        nonlocal result
        result = await scrape(server)
        active = sum(value(result, "gateway_streams_active", transport=t) for t in TRANSPORTS)
        return active == 0

    await eventually(done)
    return result


# -- clients -----------------------------------------------------------------


async def chunked(session: aiohttp.ClientSession, server: TestServer, **body: Any) -> list:
    async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
        assert response.status == 200
        return await read_ndjson(response)


async def sse(session: aiohttp.ClientSession, server: TestServer, **body: Any) -> list:
    async with session.post(server.make_url("/v1/stream/sse"), json=body) as response:
        assert response.status == 200
        events, _ = await read_sse(response)
        return events


async def websocket(session: aiohttp.ClientSession, server: TestServer, **body: Any) -> list:
    async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
        await ws.send_json({"type": "generate", "request_id": "r1", **body})
        events = []
        while True:
            event = await ws.receive_json(timeout=5)
            events.append(event)
            if event["type"] in {"done", "error"}:
                return events


async def openai_route(session: aiohttp.ClientSession, server: TestServer, **body: Any) -> str:
    """Raw OpenAI streaming: returns the text, raising on an in-stream error frame."""
    request = {
        "model": body.get("model"),
        "messages": [{"role": "user", "content": body["prompt"]}],
        "stream": True,
    }
    text = []
    async with session.post(server.make_url("/v1/chat/completions"), json=request) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunk = __import__("orjson").loads(line[6:])
                if "error" in chunk:
                    return "".join(text) + "<error>"
                for choice in chunk["choices"]:
                    text.append(choice["delta"].get("content") or "")
    return "".join(text)


# -- scripted traffic --------------------------------------------------------


async def test_completed_streams_on_every_transport(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=MODELS)
    before = await scrape(server)
    async with aiohttp.ClientSession() as session:
        results = {
            "chunked": text_of(await chunked(session, server, prompt="hi", model="sim-1", seed=7)),
            "sse": text_of(await sse(session, server, prompt="hi", model="sim-1", seed=7)),
            "websocket": text_of(
                await websocket(session, server, prompt="hi", model="sim-1", seed=7)
            ),
        }
    client = openai.AsyncOpenAI(api_key=TEST_API_KEY, base_url=str(server.make_url("/v1")))
    stream = await client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": "hi"}], stream=True, seed=7
    )
    results["openai"] = "".join([c.choices[0].delta.content or "" async for c in stream])
    await client.close()
    assert len(set(results.values())) == 1
    tokens_each = None
    after = await settled(server)
    delta = Deltas(before, after)
    for transport in TRANSPORTS:
        assert delta("gateway_streams_total", transport=transport, outcome="completed") == 1
        assert delta.total("gateway_streams_total", transport=transport) == 1
        assert delta("gateway_stream_duration_seconds_count", transport=transport) == 1
        ttft = delta(
            "gateway_time_to_first_token_seconds_count", transport=transport, model="sim-1"
        )
        assert ttft == 1
        tokens = delta("gateway_tokens_streamed_total", transport=transport, model="sim-1")
        assert tokens > 1
        assert tokens_each in (None, tokens)  # the same answer on every transport
        tokens_each = tokens
        assert delta("gateway_client_disconnects_total", transport=transport) == 0
        assert delta("gateway_resumes_total", transport=transport) == 0
        # One gap per write after the first; never more than one per token.
        gaps = delta("gateway_inter_token_latency_seconds_count", transport=transport)
        assert 0 < gaps <= tokens - 1
    assert (
        delta("gateway_upstream_requests_total", provider="simulated", model="sim-1", status="200")
        == 4
    )
    assert (
        delta(
            "gateway_upstream_time_to_first_token_seconds_count",
            provider="simulated",
            model="sim-1",
        )
        == 4
    )
    assert delta.total("gateway_upstream_cancellations_total") == 0
    assert (
        delta(
            "gateway_http_requests_total", route="/v1/stream/chunked", method="POST", status="200"
        )
        == 1
    )
    assert (
        delta("gateway_http_requests_total", route="/v1/stream/sse", method="POST", status="200")
        == 1
    )
    assert (
        delta("gateway_http_requests_total", route="/v1/stream/ws", method="GET", status="101") == 1
    )
    assert (
        delta(
            "gateway_http_requests_total", route="/v1/chat/completions", method="POST", status="200"
        )
        == 1
    )
    # The gateway's own share of TTFT: the client's TTFT includes the upstream's.
    for transport in TRANSPORTS:
        client_sum = delta(
            "gateway_time_to_first_token_seconds_sum", transport=transport, model="sim-1"
        )
        assert client_sum > 0


async def test_disconnects_on_every_transport_count_once(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=MODELS, streams={"resume_grace_s": 0})
    before = await scrape(server)
    body = {"prompt": "a long answer please", "model": "slow", "max_tokens": 200}
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/stream/chunked", "/v1/stream/sse"):
            async with session.post(server.make_url(path), json=body) as response:
                await response.content.readline()  # the start event is on its way
                await response.content.readany()
        request = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with session.post(server.make_url("/v1/chat/completions"), json=request) as response:
            await response.content.readline()
        async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
            await ws.send_json({"type": "generate", "request_id": "a", **body})
            assert (await ws.receive_json(timeout=5))["type"] == "start"
            assert (await ws.receive_json(timeout=5))["type"] == "token"
    after = await settled(server)
    delta = Deltas(before, after)
    for transport in TRANSPORTS:
        assert (
            delta("gateway_streams_total", transport=transport, outcome="client_disconnected") == 1
        )
        assert delta.total("gateway_streams_total", transport=transport) == 1
        assert delta("gateway_client_disconnects_total", transport=transport) == 1

    async def upstreams_cancelled() -> bool:
        d = Deltas(before, await scrape(server))
        return d("gateway_upstream_cancellations_total", provider="simulated") == 4

    await eventually(upstreams_cancelled)
    delta = Deltas(before, await scrape(server))
    assert (
        delta(
            "gateway_upstream_requests_total",
            provider="simulated",
            model="slow",
            status="cancelled",
        )
        == 4
    )


async def test_cancels_and_resumes(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=MODELS)
    before = await scrape(server)
    body = {"prompt": "a long answer please", "model": "slow", "max_tokens": 200}
    async with aiohttp.ClientSession() as session:
        # SSE, cancelled by DELETE while attached.
        async with session.post(server.make_url("/v1/stream/sse"), json=body) as response:
            first = await response.content.readuntil(b"\n\n")
            generation_id = first.split(b"id: ")[1].split(b":")[0].decode()
            async with session.delete(server.make_url(f"/v1/generations/{generation_id}")):
                pass
            events, _ = await read_sse(response)
            assert events[-1]["finish_reason"] == "cancelled"
        # NDJSON, cancelled the same way.
        async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
            start = __import__("orjson").loads(await response.content.readline())
            async with session.delete(server.make_url(f"/v1/generations/{start['generation_id']}")):
                pass
            assert (await read_ndjson(response))[-1]["finish_reason"] == "cancelled"
        # WebSocket: generate, cancel, then resume the finished log on the same socket.
        async with session.ws_connect(server.make_url("/v1/stream/ws")) as ws:
            await ws.send_json({"type": "generate", "request_id": "a", **body})
            start = await ws.receive_json(timeout=5)
            await ws.send_json({"type": "cancel", "request_id": "a"})
            while (event := await ws.receive_json(timeout=5))["type"] != "done":
                pass
            assert event["finish_reason"] == "cancelled"
            await ws.send_json(
                {
                    "type": "resume",
                    "request_id": "b",
                    "generation_id": start["generation_id"],
                    "after_seq": 0,
                }
            )
            while (event := await ws.receive_json(timeout=5))["type"] != "done":
                pass
        # SSE resume by Last-Event-ID of the cancelled SSE generation.
        headers = {"Last-Event-ID": f"{generation_id}:0"}
        async with session.get(server.make_url("/v1/stream/sse"), headers=headers) as response:
            events, _ = await read_sse(response)
            assert events[-1]["type"] == "done"
    after = await settled(server)
    delta = Deltas(before, after)
    assert delta("gateway_streams_total", transport="sse", outcome="cancelled") == 2  # + resume
    assert delta("gateway_streams_total", transport="chunked", outcome="cancelled") == 1
    assert delta("gateway_streams_total", transport="websocket", outcome="cancelled") == 2
    assert delta("gateway_resumes_total", transport="sse") == 1
    assert delta("gateway_resumes_total", transport="websocket") == 1
    assert delta("gateway_resumes_total", transport="chunked") == 0
    assert delta("gateway_upstream_cancellations_total", provider="simulated") == 3
    # A resume starts no generation of its own: no TTFT of its own either.
    assert delta("gateway_time_to_first_token_seconds_count", transport="sse", model="slow") == 1
    assert (
        delta(
            "gateway_http_requests_total",
            route="/v1/generations/{generation_id}",
            method="DELETE",
            status="204",
        )
        == 2
    )


async def test_upstream_failures_on_every_transport(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=MODELS)
    before = await scrape(server)
    async with aiohttp.ClientSession() as session:
        assert (await chunked(session, server, prompt="x", model="broken"))[-1]["type"] == "error"
        assert (await sse(session, server, prompt="x", model="broken"))[-1]["type"] == "error"
        assert (await websocket(session, server, prompt="x", model="broken"))[-1]["type"] == "error"
        assert (await openai_route(session, server, prompt="x", model="broken")).endswith("<error>")
    delta = Deltas(before, await settled(server))
    for transport in TRANSPORTS:
        assert delta("gateway_streams_total", transport=transport, outcome="upstream_error") == 1
        assert delta.total("gateway_streams_total", transport=transport) == 1
        assert delta("gateway_tokens_streamed_total", transport=transport, model="broken") == 3
    assert (
        delta(
            "gateway_upstream_requests_total",
            provider="simulated",
            model="broken",
            status="stream_error",
        )
        == 4
    )
    assert (
        delta("gateway_upstream_requests_total", provider="simulated", model="broken", status="200")
        == 0
    )


async def test_an_answer_in_one_upstream_read_counts_its_first_token_everywhere(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """The read that ends the answer rides with its `Finish` (one send to the
    client): its first token must still be timed, upstream and per transport."""
    fake_upstream.tokens = ["only ", "this"]
    fake_upstream.burst = True  # the whole answer in one write: one read
    gpt = {"name": "gpt", "provider": "openai", "base_url": fake_upstream.base_url}
    server = await start_gateway(models=[gpt])
    before = await scrape(server)
    async with aiohttp.ClientSession() as session:
        texts = {
            "chunked": text_of(await chunked(session, server, prompt="x", model="gpt")),
            "sse": text_of(await sse(session, server, prompt="x", model="gpt")),
            "websocket": text_of(await websocket(session, server, prompt="x", model="gpt")),
            "openai": await openai_route(session, server, prompt="x", model="gpt"),
        }
    assert set(texts.values()) == {"only this"}, texts
    delta = Deltas(before, await settled(server))
    labels = {"provider": "openai", "model": "gpt"}
    assert delta("gateway_upstream_time_to_first_token_seconds_count", **labels) == 4
    for transport in TRANSPORTS:
        assert delta("gateway_streams_total", transport=transport, outcome="completed") == 1
        ttft = delta("gateway_time_to_first_token_seconds_count", transport=transport, model="gpt")
        assert ttft == 1, transport
        # One read's two deltas are one token event (the contract's coalescing).
        assert delta("gateway_tokens_streamed_total", transport=transport, model="gpt") == 1


async def test_openai_upstream_statuses_and_timeouts(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    gpt = {
        "name": "gpt",
        "provider": "openai",
        "base_url": fake_upstream.base_url,
        "api_key": "sk-x",
        "timeout_s": 0.3,
        "max_retries": 1,
    }
    server = await start_gateway(models=[gpt, FAST_MODEL])
    before = await scrape(server)
    async with aiohttp.ClientSession() as session:
        # 503 then success: two upstream requests, one stream completed.
        fake_upstream.fail_status, fake_upstream.fail_times = 503, 1
        fake_upstream.retry_after = "0"
        events = await chunked(session, server, prompt="x", model="gpt")
        assert events[-1]["type"] == "done"
        # No token within timeout_s, twice (a retry): the stream ends in `timeout`.
        fake_upstream.hang_after = 0
        events = await sse(session, server, prompt="x", model="gpt")
        assert events[-1]["code"] == "upstream_timeout"
        # A 400 is final before the first token: the OpenAI route answers with a status.
        fake_upstream.hang_after = None
        fake_upstream.fail_status, fake_upstream.fail_times, fake_upstream.failures_sent = 400, 1, 0
        request = {"model": "gpt", "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with session.post(server.make_url("/v1/chat/completions"), json=request) as response:
            assert response.status == 400
    delta = Deltas(before, await settled(server))
    labels = {"provider": "openai", "model": "gpt"}
    assert delta("gateway_upstream_requests_total", **labels, status="503") == 1
    assert delta("gateway_upstream_requests_total", **labels, status="200") == 1
    assert delta("gateway_upstream_requests_total", **labels, status="timeout") == 2
    assert delta("gateway_upstream_requests_total", **labels, status="400") == 1
    assert delta("gateway_upstream_time_to_first_token_seconds_count", **labels) == 1
    assert delta("gateway_streams_total", transport="chunked", outcome="completed") == 1
    assert delta("gateway_streams_total", transport="sse", outcome="timeout") == 1
    assert delta("gateway_streams_total", transport="openai", outcome="upstream_error") == 1
    assert (
        delta(
            "gateway_http_requests_total", route="/v1/chat/completions", method="POST", status="400"
        )
        == 1
    )


async def test_rate_limits_and_auth_failures_are_counted(start_gateway: StartGateway) -> None:
    server = await start_gateway(
        models=MODELS,
        auth={"anonymous": False},
        rate_limit={
            "default": {"requests_per_minute": 1, "tokens_per_minute": 0, "concurrent_streams": 0}
        },
    )
    before = await scrape(server)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        # The key of the suite is unlimited: use a JWT-less anonymous-free path with a bad key.
        async with session.post(
            server.make_url("/v1/stream/chunked"), json={"prompt": "x"}
        ) as response:
            assert response.status == 200
            await response.read()
    async with aiohttp.ClientSession() as session:
        url = server.make_url("/v1/stream/chunked")
        async with session.post(url, json={"prompt": "x"}) as response:
            assert response.status == 401
        async with session.post(
            url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}
        ) as response:
            assert response.status == 401
        async with session.post(
            url, json={"prompt": "x"}, headers={"Origin": "https://evil.example", **AUTH}
        ) as response:
            assert response.status == 403
    delta = Deltas(before, await settled(server))
    assert delta("gateway_auth_failures_total", reason="missing") == 1
    assert delta("gateway_auth_failures_total", reason="invalid_key") == 1
    assert delta("gateway_auth_failures_total", reason="forbidden_origin") == 1
    assert (
        delta(
            "gateway_http_requests_total", route="/v1/stream/chunked", method="POST", status="401"
        )
        == 2
    )
    assert (
        delta(
            "gateway_http_requests_total", route="/v1/stream/chunked", method="POST", status="403"
        )
        == 1
    )
    # Probes and scrapes are never refused nor counted as failures.
    assert delta.total("gateway_rate_limited_total") == 0


async def test_refusals_by_limit_on_http_and_websocket(start_gateway: StartGateway) -> None:
    limited = {"requests_per_minute": 2, "tokens_per_minute": 0, "concurrent_streams": 0}
    server = await start_gateway(
        models=MODELS,
        auth={"anonymous": True, "api_keys": []},
        rate_limit={"default": limited},
    )
    before = await scrape(server)
    async with aiohttp.ClientSession() as session:
        assert (await chunked(session, server, prompt="x"))[-1]["type"] == "done"
        assert (await chunked(session, server, prompt="x"))[-1]["type"] == "done"
        async with session.post(
            server.make_url("/v1/stream/chunked"), json={"prompt": "x"}
        ) as response:
            assert response.status == 429
            assert "Retry-After" in response.headers
        events = await websocket(session, server, prompt="x")
        assert events[-1]["code"] == "rate_limited"
    delta = Deltas(before, await settled(server))
    assert delta("gateway_rate_limited_total", limit="requests_per_minute") == 2
    assert (
        delta(
            "gateway_http_requests_total", route="/v1/stream/chunked", method="POST", status="429"
        )
        == 1
    )
    # A refused request is not a stream.
    assert delta.total("gateway_streams_total", transport="chunked") == 2
    assert delta.total("gateway_streams_total", transport="websocket") == 0


async def test_streams_cut_by_shutdown_count_as_shutdown(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=MODELS)
    app = server.app
    assert app is not None
    registry = app[metrics_key].registry
    before = parse(generate_latest(registry).decode())
    body = {"prompt": "long", "model": "slow", "max_tokens": 200}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
            await response.content.readline()
            closing = asyncio.create_task(server.close())
            events = await read_ndjson(response)
            await closing
    assert events[-1]["code"] == "shutting_down"
    delta = Deltas(before, parse(generate_latest(registry).decode()))
    assert delta("gateway_streams_total", transport="chunked", outcome="shutdown") == 1
    assert (
        value(
            parse(generate_latest(registry).decode()), "gateway_streams_active", transport="chunked"
        )
        == 0
    )


async def test_route_label_is_the_pattern_never_the_raw_path(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=MODELS)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for path in (
            "/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA/events",
            "/nope/<script>",
            "/v1/x?a=b",
        ):
            async with session.get(server.make_url(path)) as response:
                assert response.status == 404
    samples = await scrape(server)
    routes = {
        dict(labels)["route"] for name, labels in samples if name == "gateway_http_requests_total"
    }
    assert routes <= {"/v1/generations/{generation_id}/events", "unmatched", "/metrics"}
    assert "unmatched" in routes


async def test_metrics_port_moves_metrics_off_the_public_port(start_gateway: StartGateway) -> None:
    port = free_port()
    server = await start_gateway(models=MODELS, server={"metrics_port": port})
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/metrics")) as response:
            assert response.status == 404
        assert (await chunked(session, server, prompt="x"))[-1]["type"] == "done"
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            samples = parse(await response.text())
    assert value(samples, "gateway_streams_total", transport="chunked", outcome="completed") == 1
    assert value(samples, "process_resident_memory_bytes") > 0


async def test_metrics_can_be_turned_off(start_gateway: StartGateway) -> None:
    server = await start_gateway(models=MODELS, server={"metrics_enabled": False})
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/metrics")) as response:
            assert response.status == 404
        assert (await chunked(session, server, prompt="x"))[-1]["type"] == "done"


async def test_promtool_accepts_the_scrape(start_gateway: StartGateway) -> None:
    promtool = require_binary("promtool")
    server = await start_gateway(models=MODELS)
    async with aiohttp.ClientSession() as session:
        await chunked(session, server, prompt="x")
        await websocket(session, server, prompt="x", model="broken")
        async with session.get(server.make_url("/metrics")) as response:
            text = await response.read()
    result = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# -- access logs ---------------------------------------------------------------


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.access"]


async def test_one_access_line_per_request_and_per_websocket_stream(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    server = await start_gateway(models=MODELS)
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/tickets"), headers=AUTH) as response:
            ticket = (await response.json())["ticket"]
        url = server.make_url("/v1/stream/sse").with_query(prompt="hi", access_token=ticket)
        async with session.get(url, headers={"X-Request-ID": "req-42"}) as response:
            assert response.headers["X-Request-ID"] == "req-42"
            events, _ = await read_sse(response)
        await websocket(session, server, prompt="hi")
    await settled(server)
    lines = access_lines(caplog)
    sse_line = next(r for r in lines if getattr(r, "route", None) == "/v1/stream/sse")
    fields = vars(sse_line)
    assert fields["request_id"] == "req-42"
    assert fields["principal"] == "key:test"
    assert fields["status"] == 200 and fields["method"] == "GET"
    assert fields["transport"] == "sse" and fields["model"] == "sim-1"
    assert fields["outcome"] == "completed"
    assert fields["tokens"] == len(events) - 2
    assert (
        fields["bytes"] > 0 and fields["ttft_ms"] > 0 and fields["duration_ms"] >= fields["ttft_ms"]
    )
    assert fields["client_ip"] == "127.0.0.1"
    ws_streams = [r for r in lines if r.getMessage() == "stream"]
    assert len(ws_streams) == 1
    assert vars(ws_streams[0])["ws_request_id"] == "r1"
    assert vars(ws_streams[0])["outcome"] == "completed"
    ws_requests = [
        r
        for r in lines
        if getattr(r, "route", None) == "/v1/stream/ws" and r.getMessage() == "request"
    ]
    assert len(ws_requests) == 1 and vars(ws_requests[0])["status"] == 101
    # Never a credential, in any field.
    for record in lines:
        assert TEST_API_KEY not in str(vars(record)) and ticket not in str(vars(record))


async def test_access_log_can_be_turned_off(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    server = await start_gateway(models=MODELS, logging={"access_log": False})
    async with aiohttp.ClientSession() as session:
        await chunked(session, server, prompt="x")
    assert access_lines(caplog) == []


def test_settings_extensions_validate() -> None:
    settings = make_settings(server={"max_streams": 10, "metrics_enabled": False})
    assert settings.server.max_streams == 10
    with pytest.raises(ValueError):
        make_settings(server={"max_streams": -1})


async def test_request_id_reaches_the_upstream(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    gpt = {"name": "gpt", "provider": "openai", "base_url": fake_upstream.base_url, "api_key": "k"}
    server = await start_gateway(models=[gpt])
    async with aiohttp.ClientSession(headers={"X-Request-ID": "req-up-1"}) as session:
        assert (await chunked(session, server, prompt="x"))[-1]["type"] == "done"
    assert fake_upstream.requests[-1].headers["X-Request-ID"] == "req-up-1"


async def test_max_streams_sheds_new_streams_with_503(start_gateway: StartGateway) -> None:
    server = await start_gateway(
        models=MODELS, server={"max_streams": 2}, streams={"resume_grace_s": 0}
    )
    body = {"prompt": "long", "model": "slow", "max_tokens": 100}
    async with aiohttp.ClientSession() as session:
        url = server.make_url("/v1/stream/chunked")
        async with session.post(url, json=body) as first, session.post(url, json=body) as second:
            assert first.status == second.status == 200
            async with session.post(url, json=body) as third:
                assert third.status == 503
                assert third.headers["Retry-After"] == "1"
                error = (await third.json())["error"]
                assert error["code"] == "rate_limited"
            events = await websocket(session, server, prompt="x")
            assert events[-1]["code"] == "rate_limited"
        # Both clients left (grace 0: their generations stop): there is room again.
        await settled(server)
        app = server.app
        assert app is not None
        await eventually(lambda: _no_running(app))
        assert (await chunked(session, server, prompt="x"))[-1]["type"] == "done"
    samples = await scrape(server)
    assert value(samples, "gateway_rate_limited_total", limit="max_streams") == 2
    assert value(samples, "gateway_streams_limit") == 2


async def _no_running(app: Any) -> bool:
    return app[registry_key].running == 0


# -- agents: tool calls and reasoning ---------------------------------------------

THINKER = {**FAST_MODEL, "name": "thinker", "reasoning_tokens": 7}
CALCULATE = {
    "type": "function",
    "function": {
        "name": "calculate",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}


async def test_tool_calls_reasoning_and_finish_reasons_are_counted_and_logged(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Once per generation (not per reader), by model: how it ended, the calls it made
    and whether their arguments parse, how much it thought; the access line names the calls."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    server = await start_gateway(models=[*MODELS, THINKER])
    before = await scrape(server)
    tool_request = {"prompt": "Calculate 17 * 23", "model": "thinker", "tools": [CALCULATE]}
    async with aiohttp.ClientSession() as session:
        events = await chunked(session, server, **tool_request)
        await chunked(session, server, prompt="x", model="thinker", max_tokens=10)
        await chunked(session, server, prompt="x", model="broken")
    assert events[-1]["finish_reason"] == "tool_calls"
    delta = Deltas(before, await settled(server))
    assert delta("gateway_generations_total", model="thinker", finish_reason="tool_calls") == 1
    assert delta("gateway_generations_total", model="thinker", finish_reason="length") == 1
    assert delta("gateway_generations_total", model="broken", finish_reason="error") == 1
    assert delta("gateway_tool_calls_total", model="thinker", arguments="valid") == 1
    assert delta("gateway_tool_calls_total", model="thinker", arguments="invalid") == 0
    assert delta("gateway_reasoning_tokens_total", model="thinker") == 7 + 7
    # Every delta a client was sent counts as streamed: thinking and call fragments too.
    answer_events = len(events) - 2
    assert delta("gateway_tokens_streamed_total", transport="chunked", model="thinker") == (
        answer_events + 10
    )
    line = next(r for r in access_lines(caplog) if getattr(r, "tool_calls", None))
    assert vars(line)["tool_calls"] == ["calculate"]
    assert vars(line)["reasoning_tokens"] == 7
