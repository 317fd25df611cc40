"""Property-based fuzzing of the request body and the WebSocket message schemas.

Against a real `gateway serve` process: every generated input gets a stream
(and its terminal event) or a contract error (4xx with `{"error": {code,
message}}`, or an `error` frame), never a 500 and never a dropped socket;
the process logs no error.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ws_exchange
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
ERROR_CODES = {"invalid_request", "model_not_found", "rate_limited"}

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "on_disconnect",
    "stream",
    "type",
    "request_id",
    "generation_id",
    "after_seq",
]
_VALUES = (
    _JSON
    | st.sampled_from(["sim-1", "sim-fast", "generate", "resume", "cancel", "cancel", "finish"])
    | st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                "content": _JSON,
            }
        ),
        max_size=3,
    )
    | st.integers(min_value=-2, max_value=5)
)
BODIES = st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _VALUES, max_size=6)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A `gateway serve` process (hypothesis drives sync tests, so the fixture is sync)."""
    port = free_port()
    off = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent_streams": 0}
    config = {
        "server": {"port": port},
        "models": [
            {"name": "sim-1", "provider": "simulated", "first_token_ms": 5},
            {"name": "sim-fast", "provider": "simulated", "first_token_ms": 5},
        ],
        "rate_limit": {"default": off},
        "logging": {"level": "warning"},
    }
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "gateway.yaml").write_text(yaml.safe_dump(config))
    log = folder / "gateway.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(folder / "gateway.yaml")],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 15
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the gateway did not start"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                break
        except OSError:
            time.sleep(0.05)
    yield "127.0.0.1", port
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=10)
    text = log.read_text()
    assert "Traceback" not in text and '"level":"error"' not in text, text[-3000:]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, route=st.sampled_from(["chunked", "sse", "openai"]))
def test_fuzzed_bodies_get_a_stream_or_a_contract_error(
    fuzz_target: tuple[str, int], body: dict[str, Any], route: str
) -> None:
    path = "/v1/chat/completions" if route == "openai" else f"/v1/stream/{route}"
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 3)  # keep accepted streams short
    connection = http.client.HTTPConnection(*fuzz_target, timeout=10)
    try:
        payload = json.dumps(body).encode()  # stdlib: integers past 64 bits too
        connection.request("POST", path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    assert response.status in {200, 400, 404, 413}, (response.status, data[:300])
    if response.status != 200:
        error = orjson.loads(data)["error"]
        assert error["code"] in ERROR_CODES and error["message"], data


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(message=BODIES)
def test_fuzzed_websocket_messages_get_a_stream_or_an_error_frame(
    fuzz_target: tuple[str, int], message: dict[str, Any]
) -> None:
    if isinstance(message.get("max_tokens"), int):
        message["max_tokens"] = min(message["max_tokens"], 3)
    host, port = fuzz_target
    frames = asyncio.run(ws_exchange(f"http://{host}:{port}", json.dumps(message), timeout=5))
    terminal = frames[-1]
    assert terminal["type"] in {"done", "error"}
    if terminal["type"] == "error":
        assert terminal["code"] in ERROR_CODES | {"upstream_error"} and terminal["message"]
