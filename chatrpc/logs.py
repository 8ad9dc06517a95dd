"""Logging for both processes: `--log-format text` (a line a person reads) or `json` (one object per
line for a log pipeline), and the request id on every line written while a call is handled.

In JSON each record is an object with `time` (ISO 8601, UTC), `level`, `logger` and `message`, plus `request_id`
and the fields a record carries (the access line's counts: service/access_log.py). uvicorn's own
loggers go through the same handler. Prompts and completions are never logged above DEBUG.
"""

from __future__ import annotations

import contextvars
import logging

LOG_FORMATS = ("text", "json")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Each gRPC call and each HTTP request runs in an asyncio task of its own, with a copy of the context:
# what a handler binds here stays with its own request.
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("chatrpc_request_id", default=None)


def bind_request_id(value: str) -> None:
    """The request id that log lines written from here on in this task (and the threads it hands
    work to with asyncio.to_thread) carry."""
    _request_id.set(value)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside a request) to every record, for the formatters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get()
        return True


def configure(level: str, log_format: str = "text") -> None:
    """Installs one stderr handler on the root logger at `level` (a name of LOG_LEVELS in cli.py)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",  # ISO 8601, UTC, from the record's creation
                # uvicorn's lines carry a copy of the message with terminal colours.
                reserved_attrs=[*RESERVED_ATTRS, "color_message"],
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # llama.cpp's own log lines are detail; show them only when debugging.
    logging.getLogger("llama.cpp").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
