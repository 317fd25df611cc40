"""Log set-up: one JSON object per line (or plain text for humans).

Every line passes through `redact_tokens`, so a URL with `?access_token=`
logged anywhere (by us or a library) never leaks the credential.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from gateway.auth import redact_tokens
from gateway.config import LoggingSettings

_HEAD = vars(logging.LogRecord("", 0, "", 0, "", None, None))
#: LogRecord attributes that are not user-supplied `extra` fields.
_STANDARD = frozenset(_HEAD) | {"message", "asctime"}
#: How many attributes a record has before its `extra` fields, which
#: `Logger.makeRecord` sets after `LogRecord.__init__` sets these.
_HEAD_SIZE = len(_HEAD)


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra` fields, in the order given.

    The standard head is skipped by position (a dict keeps insertion order)
    instead of testing each of its ~25 names, which was 4 µs of a JSON access
    line's 10. What is set on the record later (a formatter's `message`) is
    still left out by name."""
    items = itertools.islice(vars(record).items(), _HEAD_SIZE, None)
    return {key: value for key, value in items if key not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the standard head, then the `extra` fields."""

    def __init__(self) -> None:
        super().__init__()
        #: The timestamp's whole second, formatted once per second rather than
        #: per line (one access line per request; `gmtime` and `strftime` were
        #: ~2 µs of a line's ~20).
        self._second = -1
        self._stamp = ""

    def _timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact_tokens(orjson.dumps(entry, default=str).decode())


class TextFormatter(logging.Formatter):
    """For humans: the message, then the `extra` fields as `key=value`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [f"{k}={v}" for k, v in extra_fields(record).items()]
        return redact_tokens(" ".join([line, *extra]))


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a malformed request (bad header, bad method, …) as an error
    with a traceback: any client could fill the logs with them. It becomes one
    info line with the parser's reason; the client got its 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "malformed request refused: %s", (exc.message,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure_logging(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # No caller lookup (a stack walk per record): no formatter here prints the
    # file or line, and it was 2% of a refused request. The logging module
    # documents this switch in its source.
    logging._srcfile = None
    # Nor the thread, process and multiprocessing names each record looks up
    # (a `getpid` system call among them): no formatter here prints them. The
    # logging documentation's "Optimization" section names these switches.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
