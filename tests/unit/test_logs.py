"""Log lines: JSON or text, never a credential."""

from __future__ import annotations

import logging

import orjson

from gateway.logs import JsonFormatter, TextFormatter, extra_fields


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


def test_text_lines_carry_the_extra_fields() -> None:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", (), None)
    record.route, record.status, record.outcome = "/v1/stream/sse", 200, "completed"
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == (
        "INFO gateway.access: request route=/v1/stream/sse status=200 outcome=completed"
    )


def test_json_lines_carry_each_records_own_time() -> None:
    """The formatted second is reused within a second, never across one."""
    formatter = JsonFormatter()
    lines = []
    for created in (1_764_720_000.25, 1_764_720_000.5, 1_764_720_001.125, 1_764_720_000.75):
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        lines.append(orjson.loads(formatter.format(record))["ts"])
    assert lines == [
        "2025-12-03T00:00:00.250Z",
        "2025-12-03T00:00:00.500Z",
        "2025-12-03T00:00:01.125Z",
        "2025-12-03T00:00:00.750Z",
    ]


def test_the_extra_fields_are_exactly_those_given() -> None:
    """Whatever set on the record after them (another handler's formatter adds
    `message` and `asctime`) is no extra field, and no standard one is."""
    logger = logging.getLogger("t.extra")
    extra = {"route": "/v1/stream/sse", "status": 200, "client_ip": "127.0.0.1"}
    record = logger.makeRecord(
        "t.extra", logging.INFO, __file__, 1, "request", (), None, extra=extra
    )
    logging.Formatter("%(asctime)s %(message)s").format(record)
    assert extra_fields(record) == extra
    line = orjson.loads(JsonFormatter().format(record))
    assert {k: line[k] for k in extra} == extra
    assert set(line) == {"ts", "level", "logger", "message", *extra}
