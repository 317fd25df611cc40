"""`gateway` with its cyclic-GC collections timed, for `bench/gc_pauses.py`.

`python bench/gc_gateway.py serve --config …` runs the gateway's own CLI,
with a `gc.callbacks` hook that times every collection. SIGUSR2 writes the
collections since the last SIGUSR2 to the JSON file named by
`GC_PAUSES_OUT` (generation and milliseconds each) and starts over. Nothing
here changes the gateway; the hook costs two clock reads per collection.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from typing import Any

from gateway.cli import main

collections: list[tuple[int, float]] = []
_started = [0.0]


def _timed(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        collections.append((info["generation"], (time.perf_counter() - _started[0]) * 1000))


def _write(signum: int, frame: object) -> None:
    with open(os.environ["GC_PAUSES_OUT"], "w") as out:
        json.dump(collections, out)
    collections.clear()


if __name__ == "__main__":
    gc.callbacks.append(_timed)
    signal.signal(signal.SIGUSR2, _write)
    sys.exit(main())
