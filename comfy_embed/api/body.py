"""Reading a request body under a size limit, and the query parameters:
boolean flags, bounded whole numbers, task ids, deadlines."""

from __future__ import annotations

from typing import Mapping

from starlette.requests import Request

from comfy_embed.errors import InvalidParameter, PayloadTooLarge
from comfy_embed.eta import parse_deadline
from comfy_embed.taskid import TASK_ID_RULE, valid_task_id

__all__ = ["read_limited", "flag", "whole_number", "task_id_param", "deadline_param"]

#: More digits than any count or sequence number needs; checked before int().
_MAX_DIGITS = 12


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with PayloadTooLarge as soon as it passes ``limit``
    (announced length or bytes received): never buffered whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def flag(value: str | None) -> bool:
    """SPEC: boolean flags accept true/false/1/0 (and yes/no)."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def whole_number(name: str, raw: str | None, *, low: int = 0, high: int = 10 ** _MAX_DIGITS,
                 default: int | None = None) -> int | None:
    """``raw`` as an int in [low, high], ``default`` when absent or empty.

    Only ASCII digits count (``str.isdigit`` admits ``²``, which ``int``
    refuses), and the length is bounded before converting, so a malformed
    value is an InvalidParameter (400) naming ``name``, never a server error.
    """
    if raw is None or raw == "":
        return default
    if not (len(raw) <= _MAX_DIGITS and raw.isascii() and raw.isdigit()):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise InvalidParameter(f"{name} must be a whole number of at most {_MAX_DIGITS} "
                               f"ASCII digits; got {shown!r}")
    value = int(raw)
    if not low <= value <= high:
        raise InvalidParameter(f"{name} must be between {low} and {high}; got {value}")
    return value


def deadline_param(query: Mapping[str, str], headers: Mapping[str, str]) -> float | None:
    """The run's deadline as a ``time.monotonic()`` value: the ``X-Deadline``
    header, else ``?deadline=`` (seconds from now, or an RFC 3339 time);
    None when neither is given. A malformed one is InvalidParameter (400)
    naming the header or the parameter."""
    for name, raw in (("X-Deadline", headers.get("x-deadline")),
                      ("deadline", query.get("deadline"))):
        if raw is None:
            continue
        try:
            return parse_deadline(raw)
        except ValueError as e:
            raise InvalidParameter(f"{name} {e}") from None
    return None


def task_id_param(raw: str | None, *, required: bool = True) -> str:
    """A task id from a query parameter, refused (400) unless plain."""
    if not raw:
        if required:
            raise InvalidParameter("task_id is required")
        return ""
    if not valid_task_id(raw):
        raise InvalidParameter(f"task_id must be {TASK_ID_RULE}",
                               details={"parameter": "task_id"})
    return raw
