"""examples/react-chat (the AI SDK's `useChat` on the gateway), built and driven in chromium.

The example is built with its own lockfile (`npm ci`, `npm run build`), served
by `vite preview`, whose proxy forwards `/v1` to a real `python -m gateway`,
and driven by Playwright on Debian's chromium: an answer streams in, Stop
cancels it on the server (a reload then resumes nothing), a reload mid-answer
resumes it from the gateway's log with the whole answer shown exactly once,
and a tool round trip with thinking renders its parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Request, Response, async_playwright

from tests.conftest import require_binary
from tests.gateway_process import ServedGateway, drain_pipe, serving, stop_process
from tests.redis_server import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "react-chat"
UI_ROUTE = "/v1/stream/ui"
#: Long enough at 50 tokens/s (8 s) to stop it or reload the page in the middle.
LONG = 400
#: Thinks first, and calls the tools a question mentions (the example has get_current_time).
AGENT = "sim-think"

# The assistant messages on the page, as the texts of their text parts.
ASSISTANT_TEXTS = """() => [...document.querySelectorAll('#messages li[data-role=assistant]')]
    .map((li) => [...li.querySelectorAll('.text')].map((p) => p.textContent).join(''))"""
ROLES = "() => [...document.querySelectorAll('#messages li')].map((li) => li.dataset.role)"


# -- fixtures ------------------------------------------------------------------------------------


def _npm(npm: str, *args: str) -> None:
    result = subprocess.run(
        [npm, *args], cwd=EXAMPLE, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, f"npm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example built from its lockfile, into a temporary folder (the tree stays clean)."""
    require_binary("node")
    npm = require_binary("npm")
    # npm writes node_modules/.package-lock.json on every install: none, or older than the
    # lockfile, and node_modules is missing or stale.
    installed = EXAMPLE / "node_modules" / ".package-lock.json"
    lockfile = EXAMPLE / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lockfile.stat().st_mtime:
        _npm(npm, "ci", "--no-audit", "--no-fund")
    out = tmp_path_factory.mktemp("react-chat-dist")
    _npm(npm, "run", "build", "--", "--outDir", str(out), "--emptyOutDir")
    assert (out / "index.html").is_file()
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway() -> AsyncIterator[ServedGateway]:
    models = [
        {"name": "sim-1", "provider": "simulated", "tokens_per_second": 50, "first_token_ms": 100},
        {
            "name": AGENT,
            "provider": "simulated",
            "tokens_per_second": 250,
            "first_token_ms": 30,
            "reasoning_tokens": 12,
        },
    ]
    async with serving(models) as gateway:
        yield gateway


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app_url(dist: Path, gateway: ServedGateway) -> AsyncIterator[str]:
    """`vite preview` of the build, its proxy sending /v1 to the gateway."""
    node = require_binary("node")
    port = free_port()
    vite = EXAMPLE / "node_modules" / "vite" / "bin" / "vite.js"
    process = await asyncio.create_subprocess_exec(
        node,
        str(vite),
        "preview",
        "--outDir",
        str(dist),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--strictPort",
        "--bypass-lock",  # a developer's own `npm run preview` may be running
        cwd=EXAMPLE,
        env={**os.environ, "GATEWAY_URL": gateway.url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output = bytearray()
    loop = asyncio.get_running_loop()
    drains = [
        loop.create_task(drain_pipe(process.stdout, output)),
        loop.create_task(drain_pipe(process.stderr, output)),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(15):
            while True:
                assert process.returncode is None, f"vite preview exited: {output.decode()}"
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{url}/v1/models") as response:  # through the proxy
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield url
    finally:
        await stop_process(process, drains)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    chromium = require_binary("chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        yield browser
        await browser.close()


@dataclass
class Traffic:
    """The page's requests to the UI route: (method, path, status), and the POST bodies."""

    responses: list[tuple[str, str, int]] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("request", self._on_request)
        page.on("response", self._on_response)

    def _on_request(self, request: Request) -> None:
        if request.method == "POST" and urlsplit(request.url).path == UI_ROUTE:
            self.posts.append(json.loads(request.post_data or "null"))

    def _on_response(self, response: Response) -> None:
        path = urlsplit(response.url).path
        if path.startswith(UI_ROUTE):
            self.responses.append((response.request.method, path, response.status))

    def count(self, method: str, path: str, status: int | None = None) -> int:
        """Responses to `method` on a path under `path`, of `status` if given."""
        return sum(
            m == method and p.startswith(path) and status in (None, s) for m, p, s in self.responses
        )

    async def wait_count(
        self, above: int, method: str, path: str, status: int | None = None
    ) -> None:
        async with asyncio.timeout(5):
            while self.count(method, path, status) <= above:
                await asyncio.sleep(0.05)


@dataclass
class App:
    page: Page
    traffic: Traffic
    errors: list[str]


@pytest_asyncio.fixture(loop_scope="module")
async def app(browser: Browser) -> AsyncIterator[App]:
    context = await browser.new_context(viewport={"width": 900, "height": 800})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    traffic = Traffic()
    traffic.watch(page)
    yield App(page, traffic, errors)
    await context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


# -- helpers -------------------------------------------------------------------------------------


async def wait_status(page: Page, *states: str, timeout_ms: int = 10_000) -> str:
    await page.wait_for_function(
        f"{list(states)!r}.includes(document.querySelector('#status')?.dataset.status)",
        timeout=timeout_ms,
    )
    return str(await page.get_attribute("#status", "data-status"))


async def load(app: App, url: str | None = None) -> None:
    """Open `url`, or reload the page, and wait for useChat's resume request to be answered.

    (useChat asks the gateway for the chat's running answer whenever it mounts.)
    """
    before = app.traffic.count("GET", UI_ROUTE)
    await (app.page.goto(url) if url else app.page.reload())
    await app.traffic.wait_count(before, "GET", UI_ROUTE)
    await wait_status(app.page, "ready", "streaming")


async def send(page: Page, text: str) -> None:
    await page.fill("#prompt", text)
    await page.click("#send")


async def assistant_texts(page: Page) -> list[str]:
    return list(await page.evaluate(ASSISTANT_TEXTS))


async def last_answer(page: Page) -> str:
    texts = await assistant_texts(page)
    return texts[-1] if texts else ""


async def wait_answer_longer(page: Page, chars: int, answers: int = 1) -> None:
    """Until the `answers`-th assistant message exists and is over `chars` long (an
    earlier, longer answer must not satisfy the wait for the next one)."""
    texts = f"({ASSISTANT_TEXTS})()"
    await page.wait_for_function(
        f"{texts}.length >= {answers} && {texts}.at(-1).length > {chars}", timeout=10_000
    )


async def chat_id(page: Page) -> str:
    return str(await page.evaluate("sessionStorage.getItem('react-chat:id')"))


async def resume_status(base: str, chat: str) -> int:
    """What the resume route answers for the chat right now (200 running, 204 nothing)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}{UI_ROUTE}/{chat}/stream") as response:
            return response.status


async def reference_text(base: str, body: dict[str, Any]) -> str:
    """The same POST straight to the gateway, under another chat id: the text it streams.

    The simulated model is deterministic for a given seed, conversation and tools.
    """
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}{UI_ROUTE}", json={**body, "id": "reference"}) as resp:
            assert resp.status == 200
            assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
            raw = (await resp.read()).decode()
    data = [line[len("data: ") :] for line in raw.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["type"] == "finish", chunks[-3:]
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


# -- the tests -----------------------------------------------------------------------------------


async def test_the_example_builds(dist: Path) -> None:
    scripts = list((dist / "assets").glob("*.js"))
    assert scripts, "no JavaScript in the build"
    bundle = "".join(s.read_text() for s in scripts)
    assert UI_ROUTE in bundle and "/stream" in bundle  # useChat's route and stopChat's DELETE


async def test_stop_then_reload_resumes_nothing_a_dropped_answer_resumes_once(
    app: App, app_url: str, gateway: ServedGateway
) -> None:
    page = app.page
    await load(app, f"{app_url}/?max_tokens={LONG}&seed=3")
    assert await page.evaluate(ROLES) == []
    await send(page, "Tell me a long story about caching.")
    await wait_status(page, "streaming")

    # The text grows while it streams (tokens every 20 ms, looked at every 250 ms).
    await wait_answer_longer(page, 0)
    lengths = []
    for _ in range(4):
        lengths.append(len(await last_answer(page)))
        await asyncio.sleep(0.25)
    assert all(a < b for a, b in itertools.pairwise(lengths)), lengths

    chat = await chat_id(page)
    await page.click("#stop")
    assert await wait_status(page, "ready", timeout_ms=5000) == "ready"
    stopped = await last_answer(page)
    await asyncio.sleep(0.5)
    assert await last_answer(page) == stopped  # nothing more arrives
    assert stopped
    # The explicit stop reached the gateway and cancelled the generation: 200, and the
    # chat has nothing left to resume (a plain abort would have left it running).
    stream_path = f"{UI_ROUTE}/{chat}/stream"
    await app.traffic.wait_count(0, "DELETE", stream_path, 200)
    assert await resume_status(gateway.url, chat) == 204

    # A reload: the question and the stopped answer are back from sessionStorage, the
    # resume request finds nothing running (204), and the answer stays as it was.
    await load(app)
    assert app.traffic.count("GET", stream_path, 204) == 2  # the first load's, and this one
    assert app.traffic.count("GET", stream_path) == 2
    assert await wait_status(page, "ready") == "ready"
    assert await page.evaluate(ROLES) == ["user", "assistant"]
    assert await assistant_texts(page) == [stopped]
    await asyncio.sleep(0.3)
    assert await assistant_texts(page) == [stopped]

    # The next question, and a reload in the middle of its answer (the connection drops,
    # the gateway keeps the generation running for a reader).
    await send(page, "Explain vector databases.")
    await wait_answer_longer(page, 60, answers=2)
    body = app.traffic.posts[-1]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    expected_task = asyncio.ensure_future(reference_text(gateway.url, body))
    before_reload = await last_answer(page)

    # useChat reconnects on mount: GET …/stream, the generation replayed from its start,
    # then live (it runs for 8 s at 50 tokens/s, and the reload takes well under that).
    await load(app)
    assert app.traffic.count("GET", stream_path, 200) == 1
    await wait_status(page, "streaming", timeout_ms=5000)
    assert await page.evaluate(ROLES) == ["user", "assistant"] * 2
    assert await wait_status(page, "ready", timeout_ms=15_000) == "ready"

    expected = await expected_task
    final = await assistant_texts(page)
    assert final == [stopped, expected]  # one message per answer, whole, nothing twice
    assert expected.startswith(before_reload) and len(before_reload) < len(expected)
    assert len(app.traffic.posts) == 2  # the resume did not send the question again

    # Saved as it ended: one more reload shows the same, and resumes nothing.
    await load(app)
    assert app.traffic.count("GET", stream_path, 200) == 1
    assert await wait_status(page, "ready") == "ready"
    assert await page.evaluate(ROLES) == ["user", "assistant"] * 2
    assert await assistant_texts(page) == [stopped, expected]


async def test_thinking_and_a_browser_tool(app: App, app_url: str) -> None:
    page = app.page
    await load(app, f"{app_url}/?model={AGENT}")
    await send(page, "What time is it?")
    # Two model calls: the first thinks and calls the tool, the page runs it, useChat sends
    # the output back, the second thinks and answers.
    await page.wait_for_function(
        "document.querySelectorAll('#messages li[data-role=assistant] .text').length > 0",
        timeout=10_000,
    )
    await wait_status(page, "ready")
    shown = await page.evaluate(
        """() => {
          const li = document.querySelector('#messages li[data-role=assistant]');
          return {
            tools: [...li.querySelectorAll('.tool')].map((t) => ({
              name: t.querySelector('.tool-name').textContent, state: t.dataset.state,
              input: t.querySelector('.tool-input').textContent,
              output: t.querySelector('.tool-output')?.textContent,
            })),
            thinking: [...li.querySelectorAll('details.reasoning')].map((d) => ({
              open: d.open, state: d.dataset.state, text: d.querySelector('p').textContent,
            })),
            text: [...li.querySelectorAll('.text')].map((p) => p.textContent).join(''),
          };
        }"""
    )
    assert await page.evaluate(ROLES) == ["user", "assistant"]
    [tool] = shown["tools"]
    assert tool["name"] == "get_current_time" and tool["state"] == "output-available"
    assert json.loads(tool["input"]) == {}
    time = json.loads(tool["output"])["time"]
    assert shown["thinking"] and all(
        not t["open"] and t["state"] == "done" and t["text"].strip() for t in shown["thinking"]
    )
    # The simulated model answers with the tool's output.
    assert shown["text"].startswith("The get_current_time tool returned"), shown["text"]
    assert time in shown["text"]
    posts = app.traffic.posts
    assert [p["model"] for p in posts] == [AGENT, AGENT]
    assert posts[1]["messages"][-1]["role"] == "assistant"  # the tool output, sent back
