"""API keys on a closed gateway, against a real gateway on a real socket.

Every route refuses a missing, wrong or malformed credential; keys as `gateway
hash-key` prints them work everywhere; a tenant cannot see, touch or resume
another's generation; key matching takes the same time whatever the key.
"""

from __future__ import annotations

import asyncio
import gc
import io
import statistics
import sys
import time
from typing import Any

import pytest

from gateway import cli
from gateway.auth import Authenticator
from tests.auth_helpers import (
    BODY,
    CLOSED,
    KEY_A,
    KEY_B,
    ROUTE_IDS,
    ROUTES,
    WRONG_KEY,
    assert_every_route_works,
    assert_unauthorized,
    create_generation,
    key_config,
)
from tests.conftest import StartGateway, make_settings
from tests.helpers import (
    assert_well_formed,
    bearer,
    fetch,
    open_stream,
    sse_events,
    ws_exchange,
    ws_refusal,
)

#: Slow enough that a generation is still running while another tenant pokes at it.
SLOW = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 150, "first_token_ms": 0}


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_closed_gateway_refuses_missing_wrong_and_malformed_credentials(
    start_gateway: StartGateway, method: str, path: str, body: dict[str, Any] | None
) -> None:
    server = await start_gateway(auth=CLOSED)
    # A real generation of the caller-to-be, so only auth can refuse the id routes.
    path = path.format(id=await create_generation(server, bearer(KEY_A)))
    attempts = [  # (headers, what must not be echoed)
        ({}, ""),
        (bearer(WRONG_KEY), WRONG_KEY),
        (bearer(KEY_A + "x"), KEY_A + "x"),
        (bearer(KEY_A.upper()), KEY_A.upper()),
        (bearer("a.b.c"), ""),
        ({"Authorization": KEY_A}, KEY_A),
        ({"Authorization": f"Token {KEY_A}"}, KEY_A),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "dXNlcjpwYXNz"),
        ({"Authorization": "Bearer"}, ""),
    ]
    for headers, presented in attempts:
        status, response_headers, raw = await fetch(
            server, method, path, headers=headers, body=body
        )
        assert_unauthorized(status, response_headers, raw, secret=presented)
    if path == "/v1/stream/ws":
        for headers, _ in attempts[:3]:
            assert await ws_refusal(server, headers=headers) == 401


async def test_probes_need_no_credential(start_gateway: StartGateway) -> None:
    server = await start_gateway(auth=CLOSED)
    for path in ("/healthz", "/readyz"):
        for headers in ({}, bearer(WRONG_KEY), {"Authorization": "garbage"}):
            status, _, raw = await fetch(server, "GET", path, headers=headers)
            assert status == 200, (path, headers, raw)
    status, _, _ = await fetch(server, "GET", "/v1/models")
    assert status == 401


async def test_dot_segments_do_not_reach_routes_past_auth(start_gateway: StartGateway) -> None:
    """`/static/` and the probes are open; a path through them must not open a stream route."""
    server = await start_gateway(auth=CLOSED)
    for path in (
        "/static/../v1/stream/chunked",
        "/static/%2e%2e/v1/stream/chunked",
        "/static/..%2fv1/stream/chunked",
        "/healthz/../v1/stream/chunked",
    ):
        reader, writer = await open_stream(server.port, path, BODY)
        try:
            status_line = await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()
        # 405: the static route matched and refuses POST; no stream route was reached.
        assert status_line.split()[1] in {b"401", b"404", b"405"}, (path, status_line)


def hash_key_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str, stdin: str = ""
) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert cli.main(["hash-key", *args]) == 0
    return capsys.readouterr().out


async def test_keys_from_hash_key_work_on_every_route(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    chosen = "gw_chosen_by_the_operator_0123"
    chosen_sha = hash_key_cli(monkeypatch, capsys, stdin=chosen + "\n").strip()
    printed = dict(
        line.split(":", 1) for line in hash_key_cli(monkeypatch, capsys, "--new").splitlines()
    )
    new_key, new_sha = printed["key"].strip(), printed["sha256"].strip()
    assert len(chosen_sha) == len(new_sha) == 64
    server = await start_gateway(
        auth={
            "anonymous": False,
            "api_keys": [{"id": "chosen", "sha256": chosen_sha}, {"id": "new", "sha256": new_sha}],
        }
    )
    await assert_every_route_works(server, bearer(chosen))
    await assert_every_route_works(server, {"Authorization": f"bearer {new_key}"})
    # The hash itself is not a credential.
    status, headers, raw = await fetch(server, "GET", "/v1/models", headers=bearer(chosen_sha))
    assert_unauthorized(status, headers, raw)


async def test_another_key_cannot_see_touch_or_resume_a_generation(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway(auth=CLOSED, models=[SLOW], streams={"resume_grace_s": 5})
    generation_id = await create_generation(server, bearer(KEY_A), {**BODY, "max_tokens": 60})
    events = f"/v1/generations/{generation_id}/events"
    resume = {"Last-Event-ID": f"{generation_id}:0"}
    ws_resume = {
        "type": "resume",
        "generation_id": generation_id,
        "after_seq": 0,
        "request_id": "r2",
    }
    b, a = bearer(KEY_B), bearer(KEY_A)

    status, _, raw = await fetch(server, "GET", events, headers=b)
    assert status == 404, raw
    status, _, raw = await fetch(server, "DELETE", f"/v1/generations/{generation_id}", headers=b)
    assert status == 404, raw
    status, _, raw = await fetch(server, "GET", "/v1/stream/sse", headers={**b, **resume})
    assert status == 404, raw
    status, _, raw = await fetch(
        server, "POST", "/v1/stream/sse", headers={**b, **resume}, body=BODY
    )
    assert status == 404, raw
    frames = await ws_exchange(server, ws_resume, headers=b)
    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["code"] == "invalid_request" and "generation_id" not in frames[0]

    # The owner can do all of it, and the stranger's DELETE cancelled nothing.
    frames = await ws_exchange(server, ws_resume, headers=a)
    assert_well_formed(frames, first_seq=1)
    status, _, raw = await fetch(server, "GET", "/v1/stream/sse", headers={**a, **resume})
    assert status == 200, raw
    resumed = sse_events(raw)
    assert_well_formed(resumed, first_seq=1)
    assert resumed == [
        {k: v for k, v in f.items() if k not in {"request_id", "generation_id"}} for f in frames
    ]
    status, _, raw = await fetch(server, "GET", events, headers=a)
    assert status == 200, raw
    full = sse_events(raw)
    assert full[-1]["type"] == "done" and full[-1]["finish_reason"] == "length"
    status, _, raw = await fetch(
        server, "POST", "/v1/stream/sse", headers={**a, **resume}, body=BODY
    )
    assert status == 200, raw
    status, _, raw = await fetch(server, "DELETE", f"/v1/generations/{generation_id}", headers=a)
    assert status == 204, raw


def test_key_matching_takes_the_same_time_whatever_the_key() -> None:
    keys = [f"gw_tenant_{n:02d}_abcdefghijklmnopqrstuvwxyz0123" for n in range(10)]
    settings = make_settings(
        auth={
            "anonymous": False,
            "api_keys": [key_config(f"k{n}", key) for n, key in enumerate(keys)],
        }
    )
    authenticator = Authenticator(settings)
    tokens = {
        "first": keys[0],
        "last": keys[-1],
        "last-but-one-char": keys[-1][:-1] + "!",
        "unrelated": "x" * len(keys[0]),
    }
    assert authenticator._match_key(tokens["first"]).id == "k0"
    assert authenticator._match_key(tokens["last"]).id == "k9"
    assert authenticator._match_key(tokens["last-but-one-char"]) is None
    assert authenticator._match_key(tokens["unrelated"]) is None

    def per_call_ns(iterations: int = 4_000, batches: int = 15) -> dict[str, float]:
        """The fastest of many short batches per token: the batch least disturbed by
        other processes (the median of a few long batches swings on a busy 2-core box)."""
        match = authenticator._match_key
        samples: dict[str, list[float]] = {name: [] for name in tokens}
        gc.disable()
        try:
            for _ in range(batches):
                for name, token in tokens.items():  # interleaved, so drift hits all alike
                    start = time.perf_counter_ns()
                    for _ in range(iterations):
                        match(token)
                    samples[name].append((time.perf_counter_ns() - start) / iterations)
        finally:
            gc.enable()
        return {name: min(values) for name, values in samples.items()}

    # An early exit makes "first" about half of "last"; noise is retried, a leak is not.
    for _attempt in range(3):
        timings = per_call_ns()
        reference = statistics.median(timings.values())
        ratios = {name: value / reference for name, value in timings.items()}
        if all(0.7 <= ratio <= 1.4 for ratio in ratios.values()):
            break
    assert all(0.7 <= ratio <= 1.4 for ratio in ratios.values()), timings
    assert 0.7 <= timings["first"] / timings["last"] <= 1.4, timings
