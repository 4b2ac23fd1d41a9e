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
from typing import Iterator

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
batch_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("batch_id", default=None)
_CONTEXT = (("request_id", request_id_var), ("batch_id", batch_id_var))


@contextlib.contextmanager
def bound(**values: str | None) -> Iterator[None]:
    """Bind `request_id` and/or `batch_id` for the lines logged inside the block."""
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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(event, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    # The JSON lines never show the caller's file/line/thread/process, so don't compute
    # them for every record (the Logging HOWTO's optimization switches; two lines per
    # request on the API's hot path).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
