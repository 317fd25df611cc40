"""The AI SDK's own client (`ai` and `@ai-sdk/react`'s `Chat`, pinned in
tests/js/package-lock.json) against the UI message stream route, from Node.

Each scenario file under tests/js/ai_sdk/ is a `node --test` run against
gateways started here on real sockets: one gateway for the answers (text,
reasoning, a client-side tool round trip, an upstream failure, a dropped
answer resumed, an explicit stop), and two replicas sharing one redis-server
for a reconnect that lands on the other replica.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import StartGateway, require_binary
from tests.fake_upstream import (
    Call,
    FakeUpstream,
    Reply,
    reasoning_deltas,
    text_deltas,
    tool_call_deltas,
)
from tests.helpers import openai_model
from tests.redis_server import RedisProcess

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "tests" / "js"
SLOW = {"name": "slow", "provider": "simulated", "tokens_per_second": 50, "first_token_ms": 20}


def scripted_reply(body: dict[str, Any]) -> Reply:
    """Thinks when asked to, calls `get_weather` when offered, answers a tool's output."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return Reply(text_deltas("It is ", "21 degrees ", "in Oslo."))
    if body.get("tools"):
        return Reply(tool_call_deltas([Call.of("get_weather", {"city": "Oslo"})]), "tool_calls")
    thinking = reasoning_deltas("Two ", "lookups: ", "weather, then time.")
    return Reply([*thinking, *text_deltas("Here is ", "what I found.")])


def node_modules() -> Path:
    modules = JS / "node_modules"
    if not (modules / "ai").is_dir():
        pytest.fail("tests/js/node_modules is missing: run `make js` (make test does)")
    return modules


async def run_scenarios(name: str, env: dict[str, str], expected: int) -> None:
    node = require_binary("node")
    node_modules()
    process = await asyncio.create_subprocess_exec(
        node,
        "--test",
        "--test-reporter=tap",
        str(JS / "ai_sdk" / name),
        cwd=JS,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    output = out.decode()
    assert process.returncode == 0, output
    assert "# fail 0" in output, output
    assert f"# pass {expected}\n" in output, output


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_ai_sdk_chat_against_one_gateway(
    start_gateway: StartGateway, aiohttp_server: Any
) -> None:
    scripted = FakeUpstream(responder=scripted_reply)
    await scripted.start(aiohttp_server)
    broken = FakeUpstream(tokens=["One ", "two ", "three ", "four "], error_after=3)
    await broken.start(aiohttp_server)
    server = await start_gateway(
        models=[
            SLOW,
            openai_model(scripted.base_url, "scripted", timeout_s=5),
            openai_model(broken.base_url, "broken", timeout_s=5),
        ],
        streams={"resume_grace_s": 10},
    )
    await run_scenarios("ui_stream.scenario.mjs", {"GATEWAY_URL": url(server)}, expected=7)

    # The tool round trip reached the model as OpenAI's messages: the call, then its output.
    follow_up = next(r.body for r in scripted.requests if r.body["messages"][-1]["role"] == "tool")
    *_, user, call, output = follow_up["messages"]
    assert user == {"role": "user", "content": "What is the weather in Oslo?"}
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city":"Oslo"}',
    }
    assert output == {
        "role": "tool",
        "tool_call_id": call["tool_calls"][0]["id"],
        "content": '{"city":"Oslo","celsius":21}',
    }


async def test_ai_sdk_resume_on_another_replica(
    start_gateway: StartGateway, redis_server: RedisProcess
) -> None:
    shared = {
        "models": [SLOW],
        "streams": {"backend": "redis", "resume_grace_s": 10},
        "redis": {"url": redis_server.url},
    }
    a = await start_gateway(**shared)
    b = await start_gateway(**shared)
    env = {"GATEWAY_URL": url(a), "GATEWAY_B_URL": url(b)}
    await run_scenarios("ui_resume_replicas.scenario.mjs", env, expected=2)
