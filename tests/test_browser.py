"""The demo page and gateway-client.js in real headless chromium, against `python -m gateway`.

One gateway process (the repository's config.yaml, models replaced by env
overrides) serves four models: `sim-1` (simulated, 50 tokens/s), `sim-fail`
(simulated, an upstream error after 12 tokens), `sim-agent` (simulated, thinks
16 tokens, then calls the tools the user's message mentions) and `fake-html`
(an OpenAI upstream, `tests/fake_upstream.py`, whose tokens are HTML). The page
is loaded from the gateway, or, for the drop tests, through a TCP proxy in
this test that can cut every connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_binary
from tests.fake_upstream import FakeUpstream
from tests.gateway_process import ServedGateway, serving
from tests.helpers import read_ndjson, text_of
from tests.redis_server import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "artifacts" / "demo-page.png"
TRANSPORTS = ["sse", "sse-fetch", "ws", "chunked"]
#: The page's transport choice -> the `transport` label of the gateway's metrics.
METRIC_TRANSPORT = {"sse": "sse", "sse-fetch": "sse", "ws": "websocket", "chunked": "chunked"}
HTML_TOKENS = [
    "Careful: ",
    "<script>",
    "window.__xss = 1",
    "</script>",
    " and <img src=x onerror='window.__xss = 2'>",
    " & <b>bold</b> stay text.",
]
#: EventSource follows a generation made by `POST /v1/generations` on this route.
EVENTS_ROUTE = "/v1/generations/{generation_id}/events"
TERMINAL_STATES = "['done', 'error', 'cancelled']"
FAIL_AFTER = 12
#: A simulated model that thinks first and calls the tools a user message mentions.
AGENT = "sim-agent"
REASONING_TOKENS = 16


class CuttableProxy:
    """A TCP proxy to the gateway; `cut()` drops every open connection (both sides) at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()

    def cut(self) -> int:
        """Abort every connection (RST to both the browser and the gateway); how many."""
        writers = list(self._writers)
        for writer in writers:
            writer.transport.abort()
        return len(writers) // 2

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream() -> AsyncIterator[str]:
    fake = FakeUpstream(tokens=HTML_TOKENS, token_delay_s=0.03, record=False)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(upstream: str) -> AsyncIterator[ServedGateway]:
    models = [
        {"name": "sim-1", "provider": "simulated", "tokens_per_second": 50, "first_token_ms": 100},
        {
            "name": "sim-fail",
            "provider": "simulated",
            "tokens_per_second": 50,
            "first_token_ms": 50,
            "fail_after_tokens": FAIL_AFTER,
        },
        {
            "name": AGENT,
            "provider": "simulated",
            "tokens_per_second": 250,
            "first_token_ms": 30,
            "reasoning_tokens": REASONING_TOKENS,
        },
        {
            "name": "fake-html",
            "provider": "openai",
            "base_url": upstream,
            "api_key": "test-key",
            "upstream_model": "fake-model",
            "max_retries": 0,
        },
    ]
    async with serving(models) as gateway:
        yield gateway


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def proxy(gateway: ServedGateway) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy(int(gateway.url.rsplit(":", 1)[1]))
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    chromium = require_binary("chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        yield browser
        await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1000, "height": 760})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    await context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


# -- helpers -----------------------------------------------------------------------------------


async def open_page(page: Page, base: str) -> None:
    await page.goto(f"{base}/")
    await page.wait_for_function("document.body.dataset.ready === 'true'", timeout=5000)


async def send(page: Page, transport: str, *, model: str, prompt: str, **numbers: int) -> None:
    await page.select_option("#transport", transport)
    await page.select_option("#model", model)
    await page.fill("#prompt", prompt)
    await page.fill("#max-tokens", str(numbers.get("max_tokens", "")))
    await page.fill("#seed", str(numbers.get("seed", "")))
    await page.click("#send")


async def wait_end(page: Page, timeout_ms: int = 10_000) -> str:
    await page.wait_for_function(
        f"{TERMINAL_STATES}.includes(document.querySelector('#status').dataset.state)",
        timeout=timeout_ms,
    )
    return str(await page.get_attribute("#status", "data-state"))


async def answer_text(page: Page) -> str:
    return str(await page.evaluate("document.querySelector('#answer').textContent"))


async def figures(page: Page) -> dict[str, str]:
    ids = ["ttft", "tps", "tokens", "reasoning-tokens", "events", "steps", "resumes", "status"]
    return {i: (await page.text_content(f"#{i}") or "").strip() for i in ids}


async def page_body(page: Page, prompt: str, **fields: Any) -> dict[str, Any]:
    """The request body the page sends for a first turn: the prompt as `messages`, its tools."""
    tools = await page.evaluate(
        """async () => {
          const { ToolRegistry } = await import('/static/gateway-client.js');
          const { DEMO_TOOLS } = await import('/static/demo-tools.js');
          return new ToolRegistry(DEMO_TOOLS).definitions();
        }"""
    )
    return {"messages": [{"role": "user", "content": prompt}], "tools": tools, **fields}


async def reference(base: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The same request straight to the gateway over NDJSON: the events it produces."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/stream/chunked", json=body) as response:
            assert response.status == 200
            return await read_ndjson(response)


async def metric(base: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def wait_metric(base: str, name: str, at_least: float, **labels: str) -> float:
    async with asyncio.timeout(5):
        while (value := await metric(base, name, **labels)) < at_least:
            await asyncio.sleep(0.05)
    return value


async def start_sampler(page: Page) -> None:
    """Record the answer's length every 120 ms, in the page, while the stream runs."""
    await page.evaluate(
        """() => {
          window.__samples = [];
          const status = document.querySelector('#status');
          window.__sampler = setInterval(() => {
            const at = performance.now();
            const answer = document.querySelector('#answer');  // made per turn
            const length = answer ? answer.textContent.length : 0;
            window.__samples.push([at, length, status.dataset.state]);
          }, 120);
        }"""
    )


async def stop_sampler(page: Page) -> list[list[Any]]:
    return list(await page.evaluate("clearInterval(window.__sampler), window.__samples"))


# -- (a) every transport streams into the page -------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_transport_streams_into_the_page(
    page: Page, gateway: ServedGateway, transport: str
) -> None:
    prompt = f"Explain {transport} streaming."
    events_requests = await metric(gateway.url, "gateway_http_requests_total", route=EVENTS_ROUTE)
    await open_page(page, gateway.url)
    body = await page_body(page, prompt, max_tokens=50, seed=11)
    expected_task = asyncio.ensure_future(reference(gateway.url, body))
    await start_sampler(page)
    await send(page, transport, model="sim-1", prompt=prompt, max_tokens=50, seed=11)
    assert await wait_end(page) == "done"
    samples = await stop_sampler(page)
    final = await answer_text(page)
    expected = text_of(await expected_task)
    assert final == expected

    # The text grew while the generation ran, not all at once at the end.
    # Tokens come every 20 ms and samples every 120 ms, so each sample is longer than the
    # last (a timer that fires late and then catches up gives samples too close to count).
    during: list[int] = []
    last_at = -1e9
    for at, n, state in samples:
        if state == "streaming" and 0 < n < len(final) and at - last_at >= 100:
            during.append(n)
            last_at = at
    assert len(during) >= 4, f"not streamed incrementally: {samples}"
    assert all(a < b for a, b in itertools.pairwise(during)), f"not growing: {samples}"

    shown = await figures(page)
    assert shown["tokens"] == "50"
    assert shown["events"] == "52"  # start + 50 tokens + done, nothing twice
    assert shown["ttft"].endswith(" ms") and 0 < int(shown["ttft"].split()[0]) < 3000
    assert 10 < float(shown["tps"]) < 200  # the model runs at 50 tokens/s
    assert "finish_reason length" in shown["status"]

    if transport == "sse":
        # EventSource was closed on `done`: after its retry delay (1 s) it has not
        # reconnected (a reconnect would be a second request on the route).
        await asyncio.sleep(1.3)
        after = await metric(gateway.url, "gateway_http_requests_total", route=EVENTS_ROUTE)
        assert after == events_requests + 1


# -- (b) Stop cancels the generation on the server ---------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stop_cancels_on_the_server(
    page: Page, gateway: ServedGateway, transport: str
) -> None:
    label = METRIC_TRANSPORT[transport]
    before = await metric(
        gateway.url, "gateway_streams_total", transport=label, outcome="cancelled"
    )
    await open_page(page, gateway.url)
    await send(page, transport, model="sim-1", prompt="Tell me a long story.", max_tokens=300)
    await page.wait_for_function("document.querySelector('#answer').textContent.length > 20")
    await page.click("#stop")
    assert await wait_end(page, 5000) == "cancelled"
    assert "finish_reason cancelled" in (await page.text_content("#status") or "")
    await wait_metric(
        gateway.url, "gateway_streams_total", before + 1, transport=label, outcome="cancelled"
    )
    stopped_at = await answer_text(page)
    await asyncio.sleep(0.3)
    assert await answer_text(page) == stopped_at  # nothing arrives after the cancel
    assert 0 < int((await figures(page))["tokens"]) < 300


# -- (c) a dropped connection resumes without loss or duplication ------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dropped_connection_resumes(
    page: Page, gateway: ServedGateway, proxy: CuttableProxy, transport: str
) -> None:
    prompt = f"Explain resuming {transport}."
    label = METRIC_TRANSPORT[transport]
    resumes_before = await metric(gateway.url, "gateway_resumes_total", transport=label)
    await open_page(page, f"http://127.0.0.1:{proxy.port}")
    body = await page_body(page, prompt, max_tokens=60, seed=5)
    expected_task = asyncio.ensure_future(reference(gateway.url, body))
    await send(page, transport, model="sim-1", prompt=prompt, max_tokens=60, seed=5)
    await page.wait_for_function("Number(document.querySelector('#tokens').textContent) >= 12")
    connections = proxy.connections
    assert proxy.cut() >= 1
    cut_at = len(await answer_text(page))
    assert await wait_end(page, 10_000) == "done"
    final = await answer_text(page)
    expected = text_of(await expected_task)
    assert cut_at < len(final)  # the cut really happened mid-answer
    assert final == expected
    shown = await figures(page)
    assert shown["events"] == "62" and shown["tokens"] == "60"  # nothing twice, nothing lost
    assert int(shown["resumes"]) >= 1
    assert proxy.connections > connections  # it reconnected through the proxy
    await wait_metric(gateway.url, "gateway_resumes_total", resumes_before + 1, transport=label)


# -- (d) a mid-stream error is shown inline, the text so far is kept ---------------------------


@pytest.mark.parametrize("transport", ["sse", "ws", "chunked"])
async def test_midstream_error_is_shown_inline(
    page: Page, gateway: ServedGateway, transport: str
) -> None:
    prompt = "Explain failure modes."
    await open_page(page, gateway.url)
    body = await page_body(page, prompt, model="sim-fail", max_tokens=40, seed=3)
    expected_task = asyncio.ensure_future(reference(gateway.url, body))
    await send(page, transport, model="sim-fail", prompt=prompt, max_tokens=40, seed=3)
    assert await wait_end(page) == "error"
    events = await expected_task
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_error"
    partial = text_of(events)
    assert partial and await answer_text(page) == partial
    assert (await figures(page))["tokens"] == str(FAIL_AFTER)
    assert await page.is_visible("#error")
    error_text = await page.text_content("#error") or ""
    assert "upstream_error" in error_text and "after 12 tokens" in error_text
    # inline: in the answer box, right after the text
    assert await page.evaluate(
        "document.querySelector('#answer').nextElementSibling.id === 'error'"
        " && document.querySelector('#error').parentElement.id === 'output'"
    )


# -- (e) model text is text, never HTML --------------------------------------------------------


async def test_script_token_is_rendered_as_text(page: Page, gateway: ServedGateway) -> None:
    await open_page(page, gateway.url)
    scripts_before = await page.evaluate("document.scripts.length")
    await send(page, "ws", model="fake-html", prompt="Show me some HTML.")
    assert await wait_end(page) == "done"
    final = await answer_text(page)
    assert final == "".join(HTML_TOKENS)
    assert "<script>" in final
    assert await page.evaluate("document.querySelectorAll('#answer *').length") == 0
    assert await page.evaluate("document.scripts.length") == scripts_before
    assert await page.evaluate("document.querySelectorAll('img').length") == 0
    assert await page.evaluate("window.__xss") is None
    white_space = "getComputedStyle(document.querySelector('#answer')).whiteSpace"
    assert await page.evaluate(white_space) == "pre-wrap"


# -- (f) the agent loop: thinking, browser tools, a conversation -------------------------------

#: The request paths that start a model call, per transport (WebSocket: a `generate` frame).
START_PATHS = {"/v1/generations", "/v1/stream/sse", "/v1/stream/chunked"}


@dataclass
class Traffic:
    """What the page sent: every request, and the body of every model call."""

    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, url, type
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("request", self._on_request)
        page.on("websocket", lambda ws: ws.on("framesent", self._on_frame))

    def _on_request(self, request: Any) -> None:
        self.requests.append((request.method, request.url, request.resource_type))
        if request.method == "POST" and urlsplit(request.url).path in START_PATHS:
            self.bodies.append(json.loads(request.post_data or "null"))

    def _on_frame(self, payload: str | bytes) -> None:
        message = json.loads(payload)
        if message.get("type") == "generate":
            self.bodies.append(message)


async def watch_thinking(page: Page) -> None:
    """Record, on every change of the chat, whether a thinking block is open while it streams."""
    await page.evaluate(
        """() => {
          window.__thinking = [];
          new MutationObserver(() => {
            for (const d of document.querySelectorAll('details.thinking[data-state=thinking]')) {
              window.__thinking.push(d.open);
            }
          }).observe(document.querySelector('#chat'), {subtree: true, childList: true,
                                                       characterData: true});
        }"""
    )


async def agent_turn(page: Page, transport: str, prompt: str) -> dict[str, Any]:
    """Send one chat turn to the agent model; what the turn shows once it is done."""
    await send(page, transport, model=AGENT, prompt=prompt)
    assert await wait_end(page) == "done", await page.text_content("#output")
    shown: dict[str, Any] = await page.evaluate(
        """() => {
          const turn = document.querySelector('#output');
          return {
            cards: [...turn.querySelectorAll('.tool-card')].map((card) => ({
              tool: card.dataset.tool, state: card.dataset.state,
              args: card.querySelector('.tool-args').textContent,
              result: card.querySelector('.tool-result').textContent,
            })),
            thinking: [...turn.querySelectorAll('details.thinking')].map((d) => ({
              open: d.open, text: d.querySelector('.reasoning').textContent,
              summary: d.querySelector('summary').textContent,
            })),
            answer: document.querySelector('#answer').textContent,
            blocks: [...turn.children].filter((c) => !c.hidden && c.textContent)
              .map((c) => c.classList[0]),
          };
        }"""
    )
    shown["figures"] = await figures(page)
    return shown


def assert_tool_turn(shown: dict[str, Any], tool: str, args: str) -> str:
    """One tool round trip: think, call (card with arguments and result), think, answer."""
    [card] = shown["cards"]
    assert card["tool"] == tool and card["state"] == "done"
    assert card["args"] == args
    assert card["result"]
    # Thinking in both model calls, collapsed, with text.
    assert len(shown["thinking"]) == 2
    for block in shown["thinking"]:
        assert block["open"] is False and block["text"].strip()
        assert block["summary"].startswith("Thought for ")
    assert shown["blocks"] == ["thinking", "tool-card", "thinking", "answer"]
    assert shown["answer"].startswith(f"The {tool} tool returned {card['result']}.")
    assert "finish_reason stop" in shown["figures"]["status"]
    assert "2 steps" in shown["figures"]["status"]
    assert shown["figures"]["steps"] == "2"
    assert shown["figures"]["ttft"].endswith(" ms")
    assert int(shown["figures"]["reasoning-tokens"]) > 0
    return str(card["result"])


async def agent_conversation(page: Page, transport: str) -> Traffic:
    """The demo's two turns: the time (a tool without arguments), then a calculation."""
    traffic = Traffic()
    traffic.watch(page)
    await watch_thinking(page)
    count = "document.querySelectorAll('#chat .msg.user, #chat .tool-card').length"
    before = await page.evaluate(count)
    first = await agent_turn(page, transport, "What time is it?")
    now = assert_tool_turn(first, "get_current_time", "{}")
    assert re.fullmatch(r"\w+day, \w+ \d+, \d{4} at .+ \(.+\)", now), now
    second = await agent_turn(page, transport, "Calculate 17 * 23")
    assert assert_tool_turn(second, "calculate", '{\n  "expression": "17 * 23"\n}') == "391"
    assert second["answer"].startswith("The calculate tool returned 391.")
    # While it streamed, the thinking was shown collapsed.
    seen = await page.evaluate("window.__thinking")
    assert seen and not any(seen)
    # The conversation stays on the page: both questions, both answers.
    assert await page.evaluate(count) == before + 4  # two questions, two tool cards
    return traffic


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_agent_loop_with_browser_tools(
    page: Page, gateway: ServedGateway, transport: str
) -> None:
    await open_page(page, gateway.url)
    traffic = await agent_conversation(page, transport)

    # Four model calls (two per turn), each with the tools and the whole history so far.
    assert len(traffic.bodies) == 4
    for body in traffic.bodies:
        assert body["model"] == AGENT and "prompt" not in body
        names = [t["function"]["name"] for t in body["tools"]]
        assert names == ["get_current_time", "calculate"]
    roles = [[m["role"] for m in body["messages"]] for body in traffic.bodies]
    assert roles == [
        ["user"],
        ["user", "assistant", "tool"],
        ["user", "assistant", "tool", "assistant", "user"],
        ["user", "assistant", "tool", "assistant", "user", "assistant", "tool"],
    ]
    last = traffic.bodies[-1]["messages"]
    [call] = last[5]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "calculate", "arguments": '{"expression":"17 * 23"}'}
    assert last[5]["content"] is None
    assert last[6] == {"role": "tool", "tool_call_id": call["id"], "content": "391"}
    assert last[3]["content"].startswith("The get_current_time tool returned ")

    # No prompt and no conversation in any URL (EventSource included).
    for _method, url, _kind in traffic.requests:
        query = unquote_plus(urlsplit(url).query)
        assert "time is it" not in query and "17 * 23" not in query and "messages" not in query
    if transport == "sse":
        # EventSource mode: POST /v1/generations with the body, then EventSource on events_url.
        paths = [(m, urlsplit(u).path, kind) for m, u, kind in traffic.requests]
        posts = [p for m, p, _ in paths if m == "POST"]
        assert posts == ["/v1/generations"] * 4
        followed = [p for m, p, kind in paths if kind == "eventsource"]
        assert len(followed) == 4
        assert all(re.fullmatch(r"/v1/generations/gen_[\w-]{22,}/events", p) for p in followed)
        assert not any(p.startswith("/v1/stream/sse") for _, p, _ in paths)


# -- (g) a screenshot of the page mid-conversation ---------------------------------------------


async def test_screenshot_of_the_demo_page(page: Page, gateway: ServedGateway) -> None:
    await open_page(page, gateway.url)
    # A first turn without tools (thinking, then text), then the two tool turns.
    prompt = "Explain vector databases."
    await send(page, "sse", model=AGENT, prompt=prompt, seed=7)
    assert await wait_end(page) == "done"
    await agent_conversation(page, "sse")
    # Open the first thinking block, to show what is in one.
    await page.click("#chat details.thinking summary")
    assert await page.evaluate("document.querySelector('#chat details.thinking').open")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        SCREENSHOT.unlink()
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    data = SCREENSHOT.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
