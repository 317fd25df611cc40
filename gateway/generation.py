"""A generation: one upstream call in its own task, and its in-order event log.

The log holds `token`, `reasoning` and `tool_call` events on one `seq`
sequence, in the order the upstream sent them, so resume and retention treat
them alike.

Transports never talk to the provider. They `subscribe()` from a seq and
follow the log, either by awaiting `next_batch()` or, once caught up, by
letting the generation push new tokens to them synchronously (`push_tokens`),
which saves a task switch per token. When the last subscriber of an
unfinished generation leaves, a grace timer starts and, unless somebody
re-attaches, cancels the task, which closes the upstream request (the
provider's `finally` runs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from typing import Any

from gateway.errors import AnswerTooLarge, GatewayError, InternalError, LogsFull, UpstreamError
from gateway.events import DELTA_TYPES, EVENT_OVERHEAD_BYTES, Event, EventType
from gateway.generation_log import LogMirror, Push, StopCause
from gateway.providers.base import Delta, Deltas, Finish, Provider, ToolCallDelta, Usage
from gateway.schema import GenerationRequest

log = logging.getLogger(__name__)


class LogBudget:
    """The bytes held by the logs of a replica's running generations, and their bounds.

    `streams.retention_max_bytes` bounds finished logs; without these, a few
    long answers that run on with nobody reading (`on_disconnect: finish`)
    could hold gigabytes. Checked once per upstream read, not per token.
    """

    __slots__ = ("limit", "per_generation", "used")

    def __init__(self, per_generation: int, limit: int) -> None:
        self.per_generation = per_generation
        self.limit = limit
        self.used = 0

    def exceeded(self, size: int) -> GatewayError:
        if size > self.per_generation:
            return AnswerTooLarge(
                f"the answer outgrew this gateway's bound of {self.per_generation} bytes a"
                " generation (streams.max_generation_bytes): ask for fewer max_tokens"
            )
        return LogsFull(
            f"this replica's running answers hold its bound of {self.limit} bytes"
            " (streams.max_live_bytes); retry"
        )


class Generation:
    """Owns one provider stream; appends `start`, `token`…, `done`|`error`."""

    #: Runs here (see `GenerationLog`).
    remote = False

    def __init__(
        self,
        *,
        generation_id: str,
        principal: str,
        model: str,
        request: GenerationRequest,
        provider: Provider,
        resume_grace_s: float,
        on_finished: Callable[[Generation], None],
        budget: LogBudget | None = None,
        mirror: LogMirror | None = None,
    ) -> None:
        self.id = generation_id
        self.principal = principal
        self.model = model
        self.request = request
        self.provider = provider
        self.created = int(time.time())
        self.events: list[Event] = []
        self.size_bytes = 0
        self.subscribers = 0
        self.stop_cause: StopCause | None = None
        #: The error behind a terminal `error` event, with its HTTP status.
        self.failure: GatewayError | None = None
        self._grace_s = resume_grace_s
        self._grace_timer: asyncio.TimerHandle | None = None
        self._on_finished = on_finished
        self._budget = budget
        self._final_usage: Usage | None = None
        #: Subscriptions parked in `next_batch`, woken (or pushed to) by the next append.
        self._waiting: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None
        self._shutdown_error: GatewayError | None = None
        #: The shared log (`streams.backend: redis`): copies each event, knows remote readers.
        self._mirror = mirror
        self._grace_check: asyncio.Task[None] | None = None
        #: Names of the functions the model called, in order (for logs and metrics).
        self.tool_calls: list[str] = []
        self.reasoning_events = 0
        #: Answer deltas appended (several may share one event): the completion's
        #: size when the upstream reports no usage, and what budgets charge.
        self.deltas = 0

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Log `start` and launch the provider task; unattached, the grace clock runs."""
        self._append(
            "start", {"generation_id": self.id, "model": self.model, "created": self.created}
        )
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"generation {self.id}")
        self._task.add_done_callback(self._task_done)
        # Armed on the next loop turn: a handler that starts a generation
        # subscribes synchronously right after, before this runs.
        loop.call_soon(self._arm_grace_timer)

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1].terminal

    @property
    def terminal_seq(self) -> int | None:
        return self.events[-1].seq if self.finished else None

    @property
    def finish_reason(self) -> str | None:
        """The terminal event's finish reason, `error`, or None while it runs."""
        if not self.finished:
            return None
        terminal = self.events[-1]
        return "error" if terminal.type == "error" else terminal.fields["finish_reason"]

    def tool_call_arguments(self) -> list[str]:
        """Each call's whole arguments, by index (a scan of the log: call it at the end)."""
        if not self.tool_calls:
            return []
        calls: dict[int, list[str]] = {}
        for event in self.events:
            if event.type == "tool_call":
                fields = event.fields
                calls.setdefault(fields["index"], []).append(fields["arguments"])
        return ["".join(calls[index]) for index in sorted(calls)]

    @property
    def completion_tokens(self) -> int:
        return self.deltas

    def cancel(self, cause: StopCause = "cancelled", error: GatewayError | None = None) -> None:
        """Stop the upstream. The log ends with `done{cancelled}`, or `error` if given."""
        if self.finished or self._task is None or self._task.done():
            return
        if self.stop_cause is None:
            self.stop_cause = cause
        self._shutdown_error = error
        self._task.cancel()

    async def request_cancel(self) -> None:
        self.cancel("cancelled")

    async def wait(self) -> None:
        """Wait until the provider task has ended (the log is terminal then)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        finish: Finish | None = None
        try:
            # `aclosing`: the provider's `finally` (closing the upstream
            # response) runs now, not when the generator is collected.
            # The provider may hand deltas to `_take` from its read callback
            # instead of yielding them (no task switch per upstream read).
            async with aclosing(self.provider.stream(self.request, self._take)) as items:
                # Read to the end, not `break` at the `Finish` (its last item):
                # the provider's generators then return, instead of each having
                # `GeneratorExit` thrown through it by `aclose`.
                async for item in items:
                    if item.__class__ is Finish:
                        finish = item
                    elif finish is None:
                        self._take(item)  # type: ignore[arg-type]  # not a `Finish` (above)
            if finish is None:
                raise UpstreamError("upstream ended the stream without a finish reason")
            if finish.deltas is not None:
                self._take(finish.deltas, wake=False)  # woken with `done`, below
            self._final_usage = finish.usage
            self._append(
                "done", {"finish_reason": finish.finish_reason, "usage": finish.usage.as_dict()}
            )
        except asyncio.CancelledError:
            self._append_stopped()
        except GatewayError as exc:
            self._fail(exc)
        except Exception:
            log.exception("generation failed", extra={"generation_id": self.id})
            self._fail(InternalError("internal error in the generation"))

    def _take(self, item: Deltas, wake: bool = True) -> None:
        """The deltas of one upstream read: logged, and written to caught-up readers
        (unless not `wake`: then the next append wakes them for both)."""
        kind = item.__class__
        if kind is str:
            if item:
                self._append_tokens((item,), wake)  # type: ignore[arg-type]
        elif kind is list:
            self._append_tokens(item, wake)  # type: ignore[arg-type]
        else:
            self._append_deltas(item if kind is tuple else (item,), wake)  # type: ignore[arg-type]

    def _fail(self, error: GatewayError) -> None:
        self.failure = error
        self._append("error", error.event_fields())

    def _append_stopped(self) -> None:
        if self._shutdown_error is not None:
            self._fail(self._shutdown_error)
        else:
            self._append("done", {"finish_reason": "cancelled", "usage": self._usage().as_dict()})

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never enters `_run`'s body.
        if not self.finished:
            self._append_stopped()
        self._cancel_grace_timer()
        if self._grace_check is not None:
            self._grace_check.cancel()
        if self._budget is not None:
            self._budget.used -= self.size_bytes  # a finished log counts toward retention
        # A retained log outlives its task by `streams.retention_s`: let the
        # task, its coroutine and its context go (less for the GC to walk).
        self._task = None
        self._on_finished(self)

    @property
    def used_tokens(self) -> int:
        """Prompt plus completion tokens, as charged against the caller's budget."""
        return (self._final_usage or self._usage()).total_tokens

    def _usage(self) -> Usage:
        return Usage(self.request.prompt_tokens_estimate, self.completion_tokens)

    # -- the log ------------------------------------------------------------

    def _append(self, type: EventType, fields: dict[str, Any]) -> None:
        event = Event.new(self.id, type, len(self.events), fields)
        self.events.append(event)
        size = len(event.json) + EVENT_OVERHEAD_BYTES
        self.size_bytes += size
        if self._budget is not None:
            self._budget.used += size
        if self._mirror is not None:
            self._mirror.append(self.id, event)
        self._wake([event])

    def _append_tokens(self, texts: Sequence[str], wake: bool = True) -> None:
        """The text deltas of one upstream read, as one token event (the contract
        lets one read's deltas be coalesced): one event, encoding, wake-up and
        write however many deltas a fast upstream packed into the read."""
        self.deltas += len(texts)
        text = texts[0] if len(texts) == 1 else "".join(texts)
        self._log([Event.token(self.id, len(self.events), text)], wake)

    def _append_deltas(self, deltas: Sequence[Delta], wake: bool = True) -> None:
        """Events for a read that brought reasoning or tool-call deltas, in upstream order."""
        seq = len(self.events)
        added: list[Event] = []
        for delta in deltas:
            if isinstance(delta, str):
                if delta:
                    added.append(Event.token(self.id, seq + len(added), delta))
                continue
            if isinstance(delta, ToolCallDelta):
                if delta.name is not None:
                    self.tool_calls.append(delta.name)
            else:
                self.reasoning_events += 1
            kind: EventType = "tool_call" if isinstance(delta, ToolCallDelta) else "reasoning"
            added.append(Event.new(self.id, kind, seq + len(added), delta.fields()))
        if added:
            self.deltas += len(added)
            self._log(added, wake)

    def _log(self, added: list[Event], wake: bool = True) -> None:
        """Append the answer events of one read, wake their readers once, then hold
        the log to its bounds: past one, the answer ends in an error (raised into `_run`)."""
        self.events.extend(added)
        if len(added) == 1:  # a text read's one event: no generator per token
            grown = len(added[0].json) + EVENT_OVERHEAD_BYTES
        else:
            grown = sum(len(e.json) for e in added) + EVENT_OVERHEAD_BYTES * len(added)
        self.size_bytes += grown
        if self._mirror is not None:
            for event in added:
                self._mirror.append(self.id, event)
        if wake:
            self._wake(added)
        budget = self._budget
        if budget is not None:
            budget.used += grown
            if self.size_bytes > budget.per_generation or budget.used > budget.limit:
                raise budget.exceeded(self.size_bytes)

    def _wake(self, added: list[Event]) -> None:
        """Push tokens to caught-up pushing readers; wake every other waiting one.

        Bare futures, not an asyncio.Event per append: this runs once per
        token and the Event cost ~8% of CPU. A reader's push may refuse (its
        client is not draining): then it is woken and writes with an await.
        """
        waiting = self._waiting
        if not waiting:
            return
        self._waiting = still = []
        pushable = added[-1].type in DELTA_TYPES
        for subscription in waiting:
            waiter = subscription._waiter
            if waiter is None or waiter.done():  # its reader was cancelled
                continue
            if pushable and subscription._push is not None and self._pushed(subscription, added):
                subscription._next = added[-1].seq + 1
                still.append(subscription)
            else:
                waiter.set_result(None)

    def _pushed(self, subscription: Subscription, added: list[Event]) -> bool:
        """One reader's push; a failing one must not fail the generation for all."""
        try:
            return subscription._push(added)  # type: ignore[misc]
        except Exception:
            log.exception("pushing tokens failed", extra={"generation_id": self.id})
            subscription._push = None
            return False

    def subscribe(self, after_seq: int = -1) -> Subscription:
        """Follow the log from the event after `after_seq` (-1: from `start`)."""
        return Subscription(self, after_seq)

    # -- attach / detach: disconnect detection ----------------------------

    def _attach(self) -> None:
        self.subscribers += 1
        self._cancel_grace_timer()

    def _detach(self) -> None:
        self.subscribers -= 1
        if self.subscribers == 0:
            self._arm_grace_timer()

    def _arm_grace_timer(self) -> None:
        if self.finished or self.subscribers or self.request.on_disconnect == "finish":
            return
        if self._grace_s <= 0:
            self.cancel("client_disconnected")
        elif self._grace_timer is None:
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(self._grace_s, self._grace_over)

    def _grace_over(self) -> None:
        """Nobody re-attached here; unless someone reads it on another replica, stop."""
        self._grace_timer = None
        if self._mirror is None:
            self.cancel("client_disconnected")
        elif self._grace_check is None:
            self._grace_check = asyncio.get_running_loop().create_task(self._check_remote())

    async def _check_remote(self) -> None:
        assert self._mirror is not None
        try:
            watched = await self._mirror.has_remote_watchers(self.id)
        finally:
            self._grace_check = None
        if self.subscribers or self.finished:
            return
        if watched:
            self._arm_grace_timer()  # look again after another grace period
        else:
            self.cancel("client_disconnected")

    def _cancel_grace_timer(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None


class Subscription:
    """A reader's position in a generation log; attached while open.

    `next_batch` is safe to cancel: the position only moves when it returns.
    """

    __slots__ = ("_generation", "_next", "_open", "_push", "_waiter")

    def __init__(self, generation: Generation, after_seq: int) -> None:
        self._generation = generation
        self._next = max(after_seq + 1, 0)
        self._open = False
        self._push: Push | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __enter__(self) -> Subscription:
        if not self._open:
            self._generation._attach()
            self._open = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._push = None
        if self._open:
            self._open = False
            self._generation._detach()

    def push_tokens(self, push: Push | None) -> None:
        """While parked in `next_batch`, get new token events through `push`.

        `push(events)` runs inside the generation's task, right where the
        events are appended, and returns False to have them delivered the
        usual way (by waking `next_batch`) instead. Terminal events always
        wake `next_batch`. Only set it once output has started, so that the
        response headers have gone out before any pushed bytes.
        """
        self._push = push

    async def next_batch(self) -> list[Event] | None:
        """All events not yet returned, waiting for at least one; None after the terminal one."""
        generation = self._generation
        while True:
            events = generation.events
            if self._next < len(events):
                batch = events[self._next :]
                self._next = len(events)
                return batch
            if generation.finished:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            generation._waiting.append(self)
            try:
                await waiter
            finally:
                self._waiter = None
