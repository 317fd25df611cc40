"""Fixtures: a real gateway app on a real socket, built by the real `create_app`."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import Settings
from gateway.server import drop_silent_peers
from tests.fake_upstream import FakeUpstream, StartFakeUpstream
from tests.redis_server import RedisProcess

#: Fast defaults for tests; each test overrides what it exercises.
FAST_MODEL = {
    "name": "sim-1",
    "provider": "simulated",
    "tokens_per_second": 2000,
    "first_token_ms": 5,
}


#: A key every test gateway accepts (OpenAI SDKs always send one, and a wrong
#: key is a 401 even where anonymous access is on).
TEST_API_KEY = "gw_test_key_for_the_suite"
TEST_KEY_CONFIG = {"id": "test", "sha256": hashlib.sha256(TEST_API_KEY.encode()).hexdigest()}
UNLIMITED = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent_streams": 0}


def make_settings(**sections: Any) -> Settings:
    """Settings with a fast simulated model; `sections` replace or extend config sections."""
    tree: dict[str, Any] = {
        "models": [FAST_MODEL],
        "streams": {"heartbeat_s": 15},
        # No limits unless a test sets them: most tests are not about rate limiting.
        "rate_limit": {"default": UNLIMITED},
        "auth": {"anonymous": True, "api_keys": [{**TEST_KEY_CONFIG, "limits": UNLIMITED}]},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(name), dict):
            tree[name] = {**tree[name], **value}
        else:
            tree[name] = value
    return Settings.model_validate(tree)


StartGateway = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def start_gateway(aiohttp_server: Any) -> StartGateway:
    """Start `create_app(settings)` on a real socket.

    aiohttp's `TestServer` always runs with `handler_cancellation=True`, the
    same setting `gateway serve` uses, so disconnects behave as in production.
    """

    async def start(settings: Settings | None = None, **sections: Any) -> TestServer:
        settings = settings or make_settings(**sections)
        server: TestServer = await aiohttp_server(create_app(settings))
        assert server.runner is not None
        drop_silent_peers(server.runner, settings.streams.write_timeout_s)  # as `serve` does
        return server

    return start


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> FakeUpstream:
    """A started fake upstream; `fake_upstream.base_url` is `http://127.0.0.1:PORT/v1`."""
    return await FakeUpstream().start(aiohttp_server)


@pytest.fixture
def start_fake_upstream(aiohttp_server: Any) -> StartFakeUpstream:
    """Start another fake upstream (a fallback, say)."""

    async def start() -> FakeUpstream:
        return await FakeUpstream().start(aiohttp_server)

    return start


def require_binary(name: str) -> str:
    """The path of a binary; skip locally if missing, but fail under CI=true."""
    # Debian puts daemons such as nginx in /usr/sbin, off a normal user's PATH.
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required under CI but is not installed")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A real redis-server on a free loopback port (killed and restarted by some tests)."""
    server = RedisProcess(require_binary("redis-server"))
    server.start()
    try:
        yield server
    finally:
        server.kill()
