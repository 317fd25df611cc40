"""What a transport may do with a generation, wherever it runs.

A generation runs on this replica (`Generation`) or on another one, read
through the shared log (`RemoteGeneration`). Transports, admission and
observation are typed against these protocols, so neither an `isinstance`
nor a transport ever has to tell the two apart; `remote` is the one fact
that differs for them (a reader of a remote log is a stream of this replica,
see `admission.admit_follower`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from gateway.events import Event

#: Delivers token events synchronously to a caught-up reader; False: not now.
Push = Callable[[list[Event]], bool]
#: Why a generation was stopped early; `None` while it runs on its own.
StopCause = Literal["client_disconnected", "cancelled", "shutdown"]


class LogSubscription(Protocol):
    """A reader's place in a generation's log; while open, the reader counts as attached."""

    def __enter__(self) -> LogSubscription: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def close(self) -> None: ...

    def push_tokens(self, push: Push | None) -> None:
        """Offer the generation a synchronous path to this reader (ignored where impossible)."""
        ...

    async def next_batch(self) -> list[Event] | None:
        """The next events, or None after the terminal one."""
        ...


class GenerationLog(Protocol):
    """A generation's identity and log, as its readers see it."""

    @property
    def id(self) -> str: ...

    @property
    def principal(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def created(self) -> int: ...

    @property
    def remote(self) -> bool:
        """Run by another replica and read through the shared log."""
        ...

    @property
    def terminal_seq(self) -> int | None:
        """The seq of the terminal event once known, else None."""
        ...

    @property
    def stop_cause(self) -> StopCause | None: ...

    @property
    def tool_calls(self) -> list[str]:
        """Names of the functions the model called, in order (known where it runs)."""
        ...

    @property
    def reasoning_events(self) -> int:
        """How many reasoning events it logged (known where it runs)."""
        ...

    def subscribe(self, after_seq: int = -1) -> LogSubscription: ...

    async def request_cancel(self) -> None:
        """Stop it: here, or by asking the replica that runs it."""
        ...


class LogMirror(Protocol):
    """Where a generation that runs here copies its log for other replicas (the shared log)."""

    def append(self, generation_id: str, event: Event) -> None:
        """Queue `event` for the readers elsewhere; must not block."""
        ...

    async def has_remote_watchers(self, generation_id: str) -> bool:
        """Whether a reader on another replica is attached."""
        ...
