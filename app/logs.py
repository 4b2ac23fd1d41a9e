"""JSON logs, one event per line, for both processes.

Context rides along in `contextvars`: the API binds `request_id` for the whole request
(an incoming `X-Request-ID` or a generated one) and `batch_id` once the batch has one;
the subscriber binds `batch_id` while it applies a table's messages. `ContextFilter`
copies whatever is bound onto every record, so each line of a request carries its id
without any call site passing it. Logs say what happened and how much, never the
values of user data (those stay in the warehouse and the dead-letter store).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from typing import Any, Iterator

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
batch_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("batch_id", default=None)
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)
_CONTEXT = (("request_id", request_id_var), ("batch_id", batch_id_var), ("trace_id", trace_id_var))


@contextlib.contextmanager
def bound(**values: str | None) -> Iterator[None]:
    """Bind `request_id`, `batch_id` and/or `trace_id` for the lines logged inside the block."""
    tokens = [(var, var.set(values[name])) for name, var in _CONTEXT if name in values]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Adds the bound request/batch ids to each record (an explicit `extra=` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True

# Record attributes that are not event fields (uvicorn's `color_message` duplicates `msg` with ANSI codes).
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}
_LEVEL_NAMES = {level: logging.getLevelName(level).lower() for level in (10, 20, 30, 40, 50)}
_second_text: tuple[int, str] = (0, "")  # the last second formatted, shared by all lines of that second


def _timestamp(created: float) -> str:
    """`2024-05-01T12:00:00.123Z` (UTC, milliseconds); strftime runs once per second, not per line."""
    global _second_text
    second = int(created)
    cached = _second_text
    if cached[0] != second:
        cached = _second_text = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": _timestamp(record.created),
            "level": _LEVEL_NAMES.get(record.levelno) or record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(event, default=str).decode()


class JsonLineHandler(logging.StreamHandler):
    """The handler `configure_logging` installs: JSON lines, and preformatted lines from `log_event`."""

    def __init__(self, stream=None) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self.addFilter(ContextFilter())

    def write_line(self, line: str) -> None:
        with self.lock:  # the lock `emit` holds: lines from threads never interleave
            self.stream.write(line)
            self.stream.flush()


_installed: JsonLineHandler | None = None


def _only_handler(logger: logging.Logger) -> JsonLineHandler | None:
    """The installed JSON handler if it is the one place a record of `logger` would go, unfiltered."""
    handler = _installed
    node: logging.Logger | None = logger
    while node is not None and handler is not None:
        if node.filters or node.disabled:
            return None
        if node is logging.root:
            return handler if len(node.handlers) == 1 and node.handlers[0] is handler else None
        if node.handlers or not node.propagate:
            return None
        node = node.parent  # type: ignore[assignment]
    return None


def log_event(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any]) -> None:
    """Logs what `logger.log(level, msg, extra=fields)` logs, cheaper when only our handler listens.

    For the API's one line per request: the line is built straight from the fields, with
    no LogRecord, filter or formatter call on the way. If logging is set up otherwise (a
    test's capture handler, another config), the ordinary call runs instead.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _only_handler(logger)
    if handler is None or level < handler.level:
        if handler is None:
            logger.log(level, msg, extra=fields)
        return
    event = {"ts": _timestamp(time.time()), "level": _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower(),
             "logger": logger.name, "msg": msg, **fields}
    for name, var in _CONTEXT:
        value = var.get()
        if value is not None and name not in event:
            event[name] = value
    try:
        handler.write_line(orjson.dumps(event, default=str).decode() + handler.terminator)
    except Exception:
        handler.handleError(logger.makeRecord(logger.name, level, "(log_event)", 0, msg, (), None))


def configure_logging(level: str = "INFO") -> None:
    global _installed
    # The JSON lines never show the caller's file/line/thread/process, so don't compute
    # them for every record (the Logging HOWTO's optimization switches).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _installed = JsonLineHandler(sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
