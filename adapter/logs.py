"""Logs an operator can use: one line per event, JSON by default, never a query string.

`configure` is called once, when `g0129 serve` starts (`G0129_LOG_FORMAT`, `G0129_LOG_LEVEL`).
It puts one handler on the root logger, so the adapter's loggers, uvicorn's and FastAPI's all
come out the same way:

    json   {"time": "2026-11-28T12:00:00.123Z", "level": "info", "logger": "adapter.worker",
            "message": "Claim/c1: updated (version 2)", "event": "write-back", "job": 7,
            "claim": "Claim/c1", "encounters": ["Encounter/e1"], "outcome": "updated", ...}
    text   2026-11-28T12:00:00.123Z info adapter.worker: Claim/c1: updated (version 2) event=write-back job=7 ...

The fields are what the caller passed as `extra=`, at the top level beside the four fixed keys.
A line is always one line: JSON escapes control characters, and the text format escapes them
in the message and quotes field values that need it, so an id carrying CR/LF cannot forge a line.

uvicorn's access log goes through a filter that drops the query string (a token sent as
`?token=` never reaches a log line) and turns the request into fields. httpx logs every
request URL, FHIR search parameters included (patient ids), at INFO: it is held at WARNING.

The standard library is enough here: a formatter and a filter are all structured logging needs,
and uvicorn and FastAPI log through `logging` anyway.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import IO, Any

import orjson

from .settings import LogFormat, LogLevel

__all__ = ["JsonFormatter", "QueryStringFilter", "TextFormatter", "configure"]

# Attributes every LogRecord has: anything else on a record came in through `extra=`.
# `color_message` is uvicorn's ANSI-coloured copy of its message; `taskName` is Python 3.12's.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message", "taskName"}
_FIXED = ("time", "level", "logger", "message")
# Libraries that log request URLs (with their query strings) at INFO or DEBUG.
_URL_LOGGERS = ("httpx", "httpcore")
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k not in _FIXED and not k.startswith("_")}


def _default(value: Any) -> Any:
    # A float subclass (a FHIR decimal that keeps its text) is still a number in a log line.
    return float(value) if isinstance(value, float) else str(value)


def _dumps(value: Any) -> str:
    """Compact JSON; whatever JSON cannot say is written as its str()."""
    try:
        return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, ValueError):  # nested deeper than orjson goes (254 levels), or a key it refuses
        try:
            return json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            return json.dumps(repr(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, then the record's fields,
    and `exception` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _dumps(line)


def _escape(text: str) -> str:
    """Control characters as escapes, so one record stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _value(value: Any) -> str:
    if isinstance(value, str) and value and value.isprintable() and not any(c in value for c in ' "='):
        return value
    return _dumps(value)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` for a person at a terminal; the traceback,
    if any, on the lines after."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={_value(v)}" for k, v in _fields(record).items())
        line = f"{_time(record)} {record.levelname.lower()} {record.name}: {_escape(record.getMessage())}"
        if fields:
            line += f" {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        return line


class QueryStringFilter(logging.Filter):
    """For uvicorn's access log: drops the query string from the path and gives the request as
    fields (client, method, path, http_version, status). uvicorn logs
    `'%s - "%s %s HTTP/%s" %d'` with (client, method, path?query, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            client, method, full_path, version, status = args
            path = str(full_path).split("?", 1)[0]
            record.args = (client, method, path, version, status)
            record.__dict__.update(client=client, method=method, path=path, http_version=version, status=status)
        elif record.args:
            # Not the shape we know (another uvicorn version): say nothing rather than risk a token.
            record.msg, record.args = "request (access log line withheld: unknown format)", None
        return True


_QUERY_FILTER = QueryStringFilter()
_MARK = "_g0129_handler"


def configure(fmt: LogFormat = "json", level: LogLevel = "info", stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to `stream` (default stderr) in `fmt`, from `level` up. Called
    again, it replaces its own handler (never adds a second one); returns the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    root.setLevel(numeric)
    for name in _URL_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    # uvicorn's own handlers (from its default dictConfig, should anything have applied it)
    # would print unfiltered lines of their own: its records come to ours instead.
    for name in _UVICORN:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").addFilter(_QUERY_FILTER)
    return handler
