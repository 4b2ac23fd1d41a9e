"""JSON log lines: `log_event`'s direct line equals what logging itself writes; it falls back when others listen."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from app import logs
from app.logs import bound, configure_logging, log_event


@pytest.fixture
def json_stream(monkeypatch):
    """configure_logging() writing into a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs._installed)
    configure_logging("INFO")
    stream = io.StringIO()
    root.handlers[0].setStream(stream)
    yield stream
    root.handlers[:], level, logs._installed = saved
    root.setLevel(level)


def _events(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


FIELDS = {"method": "POST", "path": "/api-log/v1/", "status": 200, "duration_ms": 1.25, "duplicate": False}


def test_direct_line_is_the_line_logging_writes(json_stream):
    log = logging.getLogger("app.api")
    with bound(request_id="req-1", batch_id="b-1"):
        log_event(log, logging.INFO, "request finished", FIELDS)
        log.info("request finished", extra=FIELDS)
        log_event(log, logging.INFO, "request finished", {**FIELDS, "request_id": "explicit"})  # explicit wins
    direct, via_logging, explicit = _events(json_stream)
    assert direct.pop("ts")[:4] == via_logging.pop("ts")[:4]
    assert direct == via_logging == {
        "level": "info", "logger": "app.api", "msg": "request finished", **FIELDS,
        "request_id": "req-1", "batch_id": "b-1",
    }
    assert list(direct) == list(via_logging)  # same field order too
    assert explicit["request_id"] == "explicit" and explicit["batch_id"] == "b-1"
    # Lines end with a newline each, one JSON object per line.
    assert json_stream.getvalue().count("\n") == 3


def test_levels_are_honoured(json_stream):
    log = logging.getLogger("app.api")
    log_event(log, logging.DEBUG, "probe", {"path": "/healthz"})
    logging.getLogger().setLevel(logging.DEBUG)
    log_event(log, logging.DEBUG, "probe", {"path": "/healthz"})
    logging.getLogger().setLevel(logging.WARNING)
    log_event(log, logging.INFO, "request finished", FIELDS)
    assert [(e["level"], e["msg"]) for e in _events(json_stream)] == [("debug", "probe")]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("where", ["root", "logger"])
def test_other_handlers_get_an_ordinary_record(json_stream, where):
    log = logging.getLogger("app.api")
    capture = _Capture()
    target = logging.getLogger() if where == "root" else log
    target.addHandler(capture)
    try:
        with bound(request_id="req-2"):
            log_event(log, logging.INFO, "request finished", FIELDS)
    finally:
        target.removeHandler(capture)
    [record] = capture.records
    assert record.getMessage() == "request finished" and record.status == 200 and record.path == "/api-log/v1/"
    [event] = _events(json_stream)  # the JSON handler still writes its line, through logging
    assert event["status"] == 200 and event["request_id"] == "req-2"


def test_without_configure_logging_it_is_plain_logging(monkeypatch):
    monkeypatch.setattr(logs, "_installed", None)
    capture = _Capture()
    log = logging.getLogger("app.api.test")
    log.addHandler(capture)
    log.setLevel(logging.INFO)
    try:
        log_event(log, logging.INFO, "request finished", FIELDS)
    finally:
        log.removeHandler(capture)
        log.setLevel(logging.NOTSET)
    assert [r.duration_ms for r in capture.records] == [1.25]


def test_timestamp_is_utc_with_milliseconds_across_seconds():
    assert logs._timestamp(1700000000.125) == "2023-11-14T22:13:20.125Z"
    assert logs._timestamp(1700000000.9999) == "2023-11-14T22:13:20.999Z"  # truncated, as LogRecord.msecs
    assert logs._timestamp(1700000001.5) == "2023-11-14T22:13:21.500Z"
    assert logs._timestamp(1700000000.0) == "2023-11-14T22:13:20.000Z"  # an earlier second again
