"""A newcomer's first hour, on a real `python -m gateway` with the repository's config.yaml:
the start-up line names the URLs to open, the official OpenAI SDK works with any key,
and the README's Python snippets run as written."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest

from gateway.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
#: The start-up line, e.g. `gateway: serving on http://127.0.0.1:8080 — demo page …`.
START_UP = re.compile(
    r"gateway: serving on (?P<base>http://127\.0\.0\.1:(?P<port>\d+)) — "
    r"demo page (?P=base)/ · models (?P=base)/v1/models · metrics (?P=base)/metrics"
)
#: The default simulated model, only faster: the README's snippets ask for whole answers.
FAST = {"GATEWAY__MODELS__0__TOKENS_PER_SECOND": "2000", "GATEWAY__MODELS__0__FIRST_TOKEN_MS": "0"}


@dataclass
class Served:
    process: asyncio.subprocess.Process
    #: The start-up line, and the base URL it names.
    line: str
    url: str


@contextlib.asynccontextmanager
async def serve(*argv: str, log: Path, env: dict[str, str] | None = None) -> AsyncIterator[Served]:
    """Run `argv` in the repository, wait for its start-up line on stdout, stop it at the end.

    Only that line goes to stdout (a pipe); the JSON logs go to `log`, which nobody
    would read while it runs."""
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(15):
            line = (await process.stdout.readline()).decode().strip()
        match = START_UP.fullmatch(line)
        assert match is not None, (line, read_log(log))
        yield Served(process, line, match["base"])
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            await process.wait()


def read_log(path: Path) -> str:
    """For a failure's message only (an async function should not read files)."""
    return path.read_text()


@pytest.fixture
async def default_gateway(tmp_path: Path) -> AsyncIterator[Served]:
    """`python -m gateway --port 0` with config.yaml: the port it prints is the one it got."""
    argv = (sys.executable, "-m", "gateway", "--port", "0")
    async with serve(*argv, log=tmp_path / "gateway.log", env={**os.environ, **FAST}) as served:
        yield served


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)


def on(served: Served, code: str) -> str:
    """A README snippet, pointed at `served` instead of localhost:8080."""
    assert "localhost:8080" in code
    return code.replace("localhost:8080", served.url.removeprefix("http://"))


async def run_python(code: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_start_up_line_names_the_urls_to_open(default_gateway: Served) -> None:
    assert int(START_UP.fullmatch(default_gateway.line)["port"]) > 0  # type: ignore[index]
    urls = re.findall(r"http://\S+", default_gateway.line)
    async with aiohttp.ClientSession() as session:
        for url in urls[1:]:
            async with session.get(url) as response:
                assert response.status == 200, url


async def test_the_openai_sdk_streams_from_the_default_config_with_any_key(
    default_gateway: Served,
) -> None:
    """The SDK refuses to run without a key; config.yaml configures none, so any is ignored."""
    client = openai.AsyncOpenAI(
        base_url=default_gateway.url + "/v1", api_key="anything", max_retries=0
    )
    async with client:
        chunks = await client.chat.completions.create(
            model="sim-1",
            messages=[{"role": "user", "content": "Explain vector databases."}],
            max_tokens=8,
            stream=True,
        )
        text, finish = "", None
        async for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        model = await client.models.retrieve("sim-1")
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.models.retrieve("gpt-4.1-mini")
    assert text and finish == "length"
    assert (model.id, model.object) == ("sim-1", "model")
    assert unknown.value.code == "model_not_found"


def test_every_model_named_in_the_readme_code_is_served_by_the_default_config() -> None:
    served = {model.name for model in load_settings(ROOT / "config.yaml", env={}).models}
    named = set()
    for _, code in code_blocks(README):
        named |= set(re.findall(r"""\bmodel["']?\s*[=:]\s*["']([^"']+)["']""", code))
        named |= set(re.findall(r"[?&]model=([\w.:-]+)", code))
    assert named, "the README's code names no model (its SDK snippet is gone?)"
    assert named <= served, f"not served by config.yaml: {named - served}"


async def test_the_readme_sdk_snippet_runs_against_the_default_config(
    default_gateway: Served,
) -> None:
    snippets = [code for language, code in code_blocks(README) if "from openai" in code]
    assert len(snippets) == 1, "the README shows one OpenAI SDK snippet"
    status, stdout, stderr = await run_python(on(default_gateway, snippets[0]))
    assert status == 0, stderr
    assert stdout.strip(), stderr


async def test_the_readme_websocket_example_runs_with_what_make_install_installs(
    default_gateway: Served,
) -> None:
    heredocs = re.findall(r"\.venv/bin/python - <<'EOF'\n(.*?)^EOF$", README, re.M | re.S)
    websocket = [code for code in heredocs if "/v1/stream/ws" in code]
    assert len(websocket) == 1, "the README shows one WebSocket example"
    status, stdout, stderr = await run_python(on(default_gateway, websocket[0]))
    assert status == 0, stderr
    assert "'type': 'done'" in stdout and "'finish_reason': 'length'" in stdout, stdout
