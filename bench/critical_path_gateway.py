"""`gateway` with a clock at each stage of a stream's start, for `bench/critical_path.py`.

`python bench/critical_path_gateway.py serve --config …` runs the gateway's
own CLI with the functions at the stage boundaries wrapped: each wrapper
notes `(stage, perf_counter_ns)` when the stage is reached. SIGUSR2 writes
the notes since the last SIGUSR2 to the JSON file named by
`CRITICAL_PATH_OUT` and starts over. Nothing here changes what the gateway
does; each note costs a clock read and a list append (~0.2 µs).

The module-level functions are wrapped before the routes import them (the
transports bind them by name at import); a stage whose function a checkout
does not have is left out, so older checkouts can be measured too.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web_protocol

import gateway.access_log
import gateway.admission
import gateway.schema
import gateway.transports.body

notes: list[tuple[str, int]] = []


def note(stage: str) -> None:
    notes.append((stage, time.perf_counter_ns()))


def before(owner: Any, name: str, stage: str, *, coroutine: bool = False) -> None:
    """Note `stage` when `owner.name` is called (a coroutine function: when it
    starts running, not when its coroutine is made)."""
    original = getattr(owner, name, None)
    if original is None:
        return
    if coroutine:

        @functools.wraps(original)
        async def started(*args: Any, **kwargs: Any) -> Any:
            note(stage)
            return await original(*args, **kwargs)

        setattr(owner, name, started)
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        note(stage)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def after(owner: Any, name: str, stage: str, *, coroutine: bool = False) -> None:
    """Note `stage` when `owner.name` returns (a coroutine function: when its await does)."""
    original: Callable[..., Any] | None = getattr(owner, name, None)
    if original is None:
        return
    if coroutine:

        @functools.wraps(original)
        async def awaited(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            note(stage)
            return result

        setattr(owner, name, awaited)
        return

    @functools.wraps(original)
    def returned(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        note(stage)
        return result

    setattr(owner, name, returned)


def instrument() -> None:
    from gateway.generation import Generation
    from gateway.providers import upstream_http
    from gateway.transports.sink import ClientSink

    before(web_protocol.RequestHandler, "connection_made", "connected")
    before(web_protocol.RequestHandler, "data_received", "request bytes")
    # @web.middleware's mark is in the function's __dict__, which `wraps` copies.
    before(gateway.access_log, "observe_middleware", "first middleware")
    after(gateway.transports.body, "read_generation_body", "body read", coroutine=True)
    after(gateway.schema, "parse_generation_request", "validated")
    after(gateway.admission, "admit_generation", "admitted", coroutine=True)
    before(Generation, "_run", "generation task", coroutine=True)
    after(upstream_http.Exchange, "send", "upstream request sent")
    before(upstream_http.Exchange, "data_received", "upstream read")
    before(Generation, "_append_tokens", "tokens logged")
    before(ClientSink, "write_now", "client write")
    before(ClientSink, "write", "client write")


def _write(signum: int, frame: object) -> None:
    with open(os.environ["CRITICAL_PATH_OUT"], "w") as out:
        json.dump(notes, out)
    notes.clear()


if __name__ == "__main__":
    instrument()
    from gateway.cli import main

    signal.signal(signal.SIGUSR2, _write)
    sys.exit(main())
