"""Event logs stay out of the cyclic GC's way.

A replica retains hundreds of thousands of events (finished logs are kept
`streams.retention_s` for late resumes). Every object the cyclic GC tracks is
walked by each collection of its generation; with tracked events the young
collections took 20-80 ms at a few hundred streams and stalled every stream at
once. The log's size must not change what a collection walks.
"""

from __future__ import annotations

import asyncio
import gc
import types

from gateway.events import Event
from tests.unit.test_push import ScriptedProvider, generation, settle


def tracked_objects_held_by(root: object, leave_out: tuple[object, ...]) -> int:
    """Tracked objects reachable from `root`, not via modules, types, functions or `leave_out`."""
    seen = {id(root)} | {id(o) for o in leave_out}
    stack = [root]
    count = 0
    while stack:
        for referent in gc.get_referents(stack.pop()):
            if id(referent) in seen or not gc.is_tracked(referent):
                continue
            seen.add(id(referent))
            if isinstance(referent, types.ModuleType | type | types.FunctionType):
                continue
            count += 1
            stack.append(referent)
    return count


def test_events_of_every_kind_are_untracked() -> None:
    events = [
        Event.token("gen_x", 1, "hi"),
        Event.token("gen_x", 2, "lone \ud800 surrogate"),
        Event.new("gen_x", "tool_call", 3, {"index": 0, "id": "c", "name": "f", "arguments": "{}"}),
        Event.new("gen_x", "done", 4, {"finish_reason": "stop", "usage": {"prompt_tokens": 1}}),
        Event.decoded("gen_x", b'{"type":"reasoning","seq":5,"text":"hmm"}'),
    ]
    assert [gc.is_tracked(event) for event in events] == [False] * len(events)


async def test_a_long_finished_log_holds_no_more_tracked_objects_than_a_short_one() -> None:
    held = []
    for tokens in (10, 2_000):
        provider = ScriptedProvider()
        gen = generation(provider)
        gen.start()
        for n in range(tokens):
            provider.items.put_nowait(f"t{n} ")
        provider.items.put_nowait(None)
        await gen.wait()
        await settle()
        assert gen.finished and len(gen.events) == tokens + 2
        shared = (provider, gen.request, asyncio.get_running_loop())
        held.append(tracked_objects_held_by(gen, shared))
    short, long = held
    # A finished generation keeps a few lists and its usage, not a task, its
    # coroutine and context, nor anything per event.
    assert long == short
    assert long <= 5
