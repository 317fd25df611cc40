"""Token delivery by push (from the generation's task) and by batch, in the generation core.

A scripted provider stands in for the upstream here: it is the provider seam
itself, and these tests need to choose exactly when each delta arrives. The
transports' use of push is exercised end to end by every streaming test
(tests/test_sse.py, test_chunked.py, test_openai_compat.py) and under
back-pressure by tests/test_hostile_clients.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.events import Event
from gateway.generation import Generation, Push
from gateway.providers.base import Deliver, Finish, Usage
from gateway.schema import GenerationRequest


class ScriptedProvider:
    """Yields what the test puts in its queue; `None` or a `Finish` ends the stream."""

    kind = "scripted"

    def __init__(self) -> None:
        self.items: asyncio.Queue[str | list[str] | Finish | None] = asyncio.Queue()

    async def stream(
        self, request: GenerationRequest, deliver: Deliver | None = None
    ) -> AsyncIterator[str | list[str] | Finish]:
        while (item := await self.items.get()) is not None:
            yield item
            if isinstance(item, Finish):
                return
        yield Finish("stop", Usage(1, 0))

    async def aclose(self) -> None:
        pass


def generation(provider: ScriptedProvider) -> Generation:
    return Generation(
        generation_id="gen_test",
        principal="anonymous",
        model="scripted",
        request=GenerationRequest(prompt="hi"),
        provider=provider,
        resume_grace_s=10,
        on_finished=lambda generation: None,
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def texts(events: list[Event]) -> list[str]:
    return [e.text for e in events if e.type == "token"]


async def follow(gen: Generation, push: Push, seen: list[str]) -> None:
    """Read to the end, pushed or woken; every token's text lands in `seen`."""
    with gen.subscribe() as subscription:
        subscription.push_tokens(push)
        while (batch := await subscription.next_batch()) is not None:
            seen.extend(texts(batch))


async def read_recording(
    gen: Generation, pushed: list[list[Event]], woken: list[list[Event]]
) -> None:
    """Read to the end, pushing after `start`: what was pushed, what woke the reader."""
    with gen.subscribe() as subscription:
        woken.append(await subscription.next_batch() or [])  # `start`
        subscription.push_tokens(lambda events: pushed.append(events) is None)
        while (batch := await subscription.next_batch()) is not None:
            woken.append(batch)


def started_and_recorded() -> tuple[
    ScriptedProvider, Generation, list[list[Event]], list[list[Event]], asyncio.Task[None]
]:
    """A started generation and a `read_recording` reader of it, with its two lists."""
    provider = ScriptedProvider()
    gen = generation(provider)
    gen.start()
    pushed: list[list[Event]] = []
    woken: list[list[Event]] = []
    return provider, gen, pushed, woken, asyncio.create_task(read_recording(gen, pushed, woken))


async def test_pushed_tokens_do_not_wake_the_reader_and_the_end_does() -> None:
    provider, gen, pushed, woken, reader = started_and_recorded()
    await settle()
    for item in ("a", ["b", "c", "d"], "e"):
        provider.items.put_nowait(item)
        await settle()
    # One upstream read's deltas are one event.
    assert [texts(batch) for batch in pushed] == [["a"], ["bcd"], ["e"]]
    assert [[e.seq for e in batch] for batch in pushed] == [[1], [2], [3]]
    assert [[e.type for e in batch] for batch in woken] == [["start"]]
    provider.items.put_nowait(None)
    await asyncio.wait_for(reader, 2)
    assert [[e.type for e in batch] for batch in woken] == [["start"], ["done"]]
    assert woken[-1][0].seq == 4
    assert gen.completion_tokens == 5  # every delta counts


async def test_deltas_that_came_with_the_end_wake_the_reader_once_with_the_end() -> None:
    """The read that ends the answer: its deltas are not pushed on their own,
    so the reader writes them and the end in one send."""
    provider, gen, pushed, woken, reader = started_and_recorded()
    await settle()
    provider.items.put_nowait("a")
    await settle()
    provider.items.put_nowait(Finish("stop", Usage(1, 3), deltas=["b", "c"]))
    await asyncio.wait_for(reader, 2)
    assert [texts(batch) for batch in pushed] == [["a"]]
    assert [[e.type for e in batch] for batch in woken] == [["start"], ["token", "done"]]
    assert texts(woken[-1]) == ["bc"]
    assert gen.completion_tokens == 3


async def test_a_refused_push_wakes_the_reader_with_those_events() -> None:
    provider = ScriptedProvider()
    gen = generation(provider)
    gen.start()
    accept = True
    seen: list[str] = []

    def push(events: list[Event]) -> bool:
        if accept:
            seen.extend(texts(events))
        return accept

    reader = asyncio.create_task(follow(gen, push, seen))
    await settle()
    provider.items.put_nowait("one ")
    await settle()
    accept = False  # the client stopped draining
    provider.items.put_nowait(["two ", "three "])
    await settle()
    accept = True
    provider.items.put_nowait("four")
    provider.items.put_nowait(None)
    await asyncio.wait_for(reader, 2)
    assert "".join(seen) == "one two three four"


async def test_a_failing_push_is_dropped_without_failing_the_generation() -> None:
    provider = ScriptedProvider()
    gen = generation(provider)
    gen.start()
    seen: list[str] = []
    calls = 0

    def push(events: list[Event]) -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("broken reader")

    reader = asyncio.create_task(follow(gen, push, seen))
    await settle()
    for item in ("x", "y", None):
        provider.items.put_nowait(item)
        await settle()
    await asyncio.wait_for(reader, 2)
    assert calls == 1  # not tried again
    assert seen == ["x", "y"]
    assert gen.events[-1].type == "done"


async def test_a_cancelled_reader_is_neither_pushed_to_nor_woken() -> None:
    provider = ScriptedProvider()
    gen = generation(provider)
    gen.start()
    pushed: list[Event] = []

    async def read() -> None:
        with gen.subscribe() as subscription:
            subscription.push_tokens(lambda events: pushed.extend(events) is None)
            while await subscription.next_batch() is not None:
                pass

    reader = asyncio.create_task(read())
    await settle()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    provider.items.put_nowait("late")
    provider.items.put_nowait(None)
    await asyncio.wait_for(gen.wait(), 2)
    assert pushed == []
    assert texts(gen.events) == ["late"]


async def test_one_reads_deltas_are_one_event_that_counts_each_delta_and_its_bytes() -> None:
    provider = ScriptedProvider()
    gen = generation(provider)
    gen.start()
    provider.items.put_nowait(["é", "\ud83d", "z"])  # a lone surrogate is scrubbed
    provider.items.put_nowait(None)
    await asyncio.wait_for(gen.wait(), 2)
    assert [(e.type, e.seq) for e in gen.events] == [("start", 0), ("token", 1), ("done", 2)]
    assert texts(gen.events) == ["é\ufffdz"]
    assert gen.completion_tokens == 3
    assert gen.size_bytes > sum(len(e.json) for e in gen.events)
