"""A fake OpenAI-compatible upstream as a process: `tests/fake_openai.py` on a port.

It answers every chat completion with `--tokens` content chunks, `--token-delay-s`
apart, in OpenAI's real `chat.completion.chunk` SSE format.
"""

from __future__ import annotations

import argparse

from aiohttp import web

from gateway.server import new_event_loop
from tests.fake_openai import FakeOpenAI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--token-delay-s", type=float, default=0.02)
    args = parser.parse_args(argv)
    words = ("Latency ", "adds ", "up ", "quickly: ", "a ", "request ", "from ", "東京 ")
    fake = FakeOpenAI(
        tokens=[words[i % len(words)] for i in range(args.tokens)],
        token_delay_s=args.token_delay_s,
        record=False,
    )
    app = fake.app()
    app.router.add_get("/healthz", lambda request: web.json_response({"status": "ok"}))
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        loop=new_event_loop(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
