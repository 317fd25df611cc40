"""`python -m gateway` as a real process, with the repository's own config.yaml."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.gateway_process import start_process
from tests.helpers import assert_well_formed, stream
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent


async def test_python_m_gateway_serves_the_default_config() -> None:
    port = free_port()
    process = await start_process(port)
    try:
        body = {"prompt": "Explain vector databases.", "max_tokens": 5, "seed": 1}
        events = (await stream(f"http://127.0.0.1:{port}", "chunked", body)).events
        assert_well_formed(events)
        assert events[0]["model"] == "sim-1" and events[-1]["finish_reason"] == "length"
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    first_log_line = stderr.decode().splitlines()[0]
    assert '"level":"info"' in first_log_line and "serving" in first_log_line
