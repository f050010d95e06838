"""Log records that carry the task id, as text or as one JSON object per line.

The task id lives in a context variable: the executor thread sets it around
each job, and the service around each request, so every record made while a
task runs carries it, ComfyUI's own (its root-logger lines) included. Event
loop callbacks scheduled from the executor thread copy its context, so the
result rendering of a task carries its id too.

Library code only logs; :func:`configure_logging` is called by the entry
points (``comfy-embed serve`` / ``run``, ``server.py``), never at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from typing import IO, Iterator

__all__ = ["current_task", "task_context", "TaskIdFilter", "JsonFormatter",
           "TextFormatter", "escape_controls", "TEXT_FORMAT", "QUIET_LOGGERS",
           "configure_logging"]

#: The id of the task the current code works for (None: no task).
current_task: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "comfy_embed_task_id", default=None)

#: The text format: the task id (``-`` when none) after the logger name.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(task_id)s] %(message)s"


#: Libraries whose INFO records carry what must not reach a log: httpx logs
#: every request's full URL (webhook tokens, presigned signatures in the
#: query string). They log at WARNING and above only.
QUIET_LOGGERS: tuple[str, ...] = ("httpx", "httpcore")

# Every character that ends a line for some reader (str.splitlines: \n \r
# \v \f \x1c-\x1e \x85 \u2028 \u2029) or drives a terminal (the other C0
# controls, DEL, C1), tab excepted.
_CONTROLS = {c: (repr(chr(c))[1:-1] if c in (0x0a, 0x0d) else f"\\x{c:02x}")
             for c in [*range(0x00, 0x09), *range(0x0a, 0x20), *range(0x7f, 0xa0)]}
_CONTROLS.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    """``text`` on one line: control characters and line separators as
    escapes (a newline as ``\\n``), so a value cannot start a forged line."""
    return text.translate(_CONTROLS)


@contextlib.contextmanager
def task_context(task_id: str | None) -> Iterator[None]:
    """Records made inside carry ``task_id``."""
    token = current_task.set(task_id or None)
    try:
        yield
    finally:
        current_task.reset(token)


class TaskIdFilter(logging.Filter):
    """Sets ``record.task_id`` from the context (a handler filter: it sees
    the records of every logger, ComfyUI's root-logger lines included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_id", None) is None:
            record.task_id = current_task.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger,
    message, task_id (when there is one), exception (when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        if task_id and task_id != "-":
            out["task_id"] = task_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, one line per record whatever logger made it:
    control characters in the message, its arguments and a traceback are
    escaped (a request path or a workflow value with a newline cannot forge a
    record; a traceback reads as one line with ``\\n`` between its lines)."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


def configure_logging(fmt: str = "text", level: int | str = logging.INFO,
                      stream: IO[str] | None = None) -> None:
    """Send every record (the root logger's, so ComfyUI's too) to ``stream``
    (stdout by default), as ``text`` or ``json`` lines, with task ids; one
    line per record (:class:`TextFormatter`); :data:`QUIET_LOGGERS` at
    WARNING."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.addFilter(TaskIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
