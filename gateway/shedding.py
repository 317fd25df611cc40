"""Shedding streams: how many one replica takes, and how long a refused client should wait.

The cap is `server.max_streams`, or what the open-files limit allows if that
is lower: each proxied stream holds two sockets, and a replica that runs out
of descriptors fails accepts and upstream connects at random instead of
answering 503 (bench/suite.py S5 met a 20,000-file hard limit that root
cannot raise in this container).

The Retry-After follows Little's law, not a constant.

A fixed `Retry-After: 1` brings every refused client back every second, so
under a sustained overload of N waiting clients the replica answers N
refusals a second on the loop its admitted streams run on (bench/overload.py:
~1,400 refusals/s for 1,400 surplus clients, and the admitted streams' time
to first token suffered for it). The wait a client can expect is the number
of clients waiting divided by the rate at which slots free up. Each refused
client comes back after the Retry-After it was given, so the clients waiting
are about refusals/s times that Retry-After, and slots free at the admission rate.
The estimate is smoothed across one-second windows and kept within
[1, `MAX_RETRY_AFTER_S`].
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable

MAX_RETRY_AFTER_S = 30
#: Sockets a proxied stream holds: the client's and the upstream's.
FDS_PER_STREAM = 2
#: Descriptors kept for all else (listening sockets, idle keep-alive clients,
#: connections accepted but not yet admitted, log files, Redis): an eighth of
#: the limit, within these bounds, so that a common 1,024 keeps 128.
FD_RESERVE_MIN, FD_RESERVE_MAX = 64, 512


def fd_reserve(limit: int) -> int:
    return max(FD_RESERVE_MIN, min(FD_RESERVE_MAX, limit // 8))


def open_files_stream_cap(limit: int | None = None) -> int:
    """Streams the open-files limit (the soft one, by default) leaves room for; 0: unbounded."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return 0
    return max(1, (limit - fd_reserve(limit)) // FDS_PER_STREAM)


def stream_cap(max_streams: int, open_files_cap: int) -> int:
    """The lower of the two caps, where 0 means none."""
    caps = [cap for cap in (max_streams, open_files_cap) if cap]
    return min(caps, default=0)


#: Weight of the newest one-second window in the smoothed estimate.
SMOOTHING = 0.5


class RetryAfterEstimate:
    """Counts admissions and refusals; `refused()` returns the Retry-After to send."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = 1.0) -> None:
        self._clock = clock
        self._window_s = window_s
        self._window_start = clock()
        self._admitted = 0
        self._refused = 0
        self._smoothed = 1.0
        self.retry_after_s = 1

    def admitted(self) -> None:
        self._admitted += 1

    def refused(self) -> int:
        """Count one refusal; the whole seconds the refused client should wait."""
        self._refused += 1
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed >= self._window_s:
            self._close_window(elapsed)
            self._window_start = now
        return self.retry_after_s

    def _close_window(self, elapsed: float) -> None:
        refusals_per_s = self._refused / elapsed
        # A window with no admission at all: nothing frees up; wait the longest.
        admissions_per_s = max(self._admitted / elapsed, 1e-9)
        waiting = refusals_per_s * self.retry_after_s
        estimate = min(waiting / admissions_per_s, MAX_RETRY_AFTER_S)
        self._smoothed = SMOOTHING * estimate + (1 - SMOOTHING) * self._smoothed
        self.retry_after_s = max(1, min(MAX_RETRY_AFTER_S, math.ceil(self._smoothed)))
        self._admitted = self._refused = 0
