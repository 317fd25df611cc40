"""Log lines: JSON or text, never a credential."""

from __future__ import annotations

import logging

from gateway.logs import JsonFormatter, TextFormatter


def test_log_lines_never_carry_an_access_token() -> None:
    record = logging.LogRecord(
        "t",
        logging.WARNING,
        __file__,
        1,
        "GET %s",
        ("/v1/stream/sse?access_token=sk-secret&x=1",),
        None,
    )
    record.url = "/v1/stream/ws?prompt=a&access_token=eyJabc.def.ghi"
    for formatter in (JsonFormatter(), TextFormatter("%(message)s")):
        line = formatter.format(record)
        assert "sk-secret" not in line and "eyJabc" not in line
        assert "access_token=***" in line
