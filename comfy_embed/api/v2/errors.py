"""Comfy API v2's error envelope: ``{"error": {"code", "message", "details"}}``
with the spec's codes, from comfy-embed's errors (the one hierarchy)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from comfy_embed import events
from comfy_embed.errors import (
    ComfyEmbedError,
    DeadlineUnmeetable,
    ImageInputError,
    InvalidParameter,
    KeyQueueFull,
    MissingAsset,
    ModelDownloadError,
    NotAccepting,
    PayloadTooLarge,
    QueueFull,
    StorageError,
    StorageUnavailable,
    TaskIdConflict,
    TaskRunning,
    Unauthorized,
    WebhookRefused,
    WorkflowInvalid,
)
from comfy_embed.service.jobs import is_bad_cursor

__all__ = ["V2Error", "envelope", "from_error", "json_response", "node_details", "not_found"]

log = logging.getLogger(__name__)


class V2Error(Exception):
    """A refusal of the v2 API itself (not of the task service)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.retry_after = details, retry_after

    def response(self) -> Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return envelope(self.status, self.code, self.message, self.details, headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer (orjson, as every answer of the server)."""
    return Response(events.dumps_bytes(body), status, headers=headers,
                    media_type="application/json")


def envelope(status: int, code: str, message: str, details: Any = None,
             headers: dict[str, str] | None = None) -> Response:
    """The spec's ErrorEnvelope."""
    return json_response({"error": {"code": code, "message": message, "details": details}},
                         status, headers)


def not_found(what: str = "job") -> Response:
    """Unknown and another caller's look the same."""
    return envelope(404, "not_found", f"no such {what}")


def node_details(node_errors: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's ``node_errors`` as the spec's ``{node_id: [{field, reason}]}``
    (ComfyUI's own entries kept under ``comfy_node_errors``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for node_id, entry in (node_errors or {}).items():
        items = entry.get("errors") if isinstance(entry, dict) else None
        rows = []
        for err in items or ():
            if not isinstance(err, dict):
                continue
            extra = err.get("extra_info") or {}
            rows.append({"field": extra.get("input_name") if isinstance(extra, dict) else None,
                         "reason": err.get("type") or "invalid",
                         "message": err.get("message") or err.get("details") or "",
                         "class_type": entry.get("class_type")})
        out[str(node_id)] = rows
    return {"node_errors": out, "comfy_node_errors": node_errors or {}}


#: (class, status, code), the first that matches wins.
_TABLE: list[tuple[type[ComfyEmbedError], int, str]] = [
    (MissingAsset, 422, "missing_asset"),
    (InvalidParameter, 400, "invalid_request"),
    (WebhookRefused, 422, "invalid_request"),
    (WorkflowInvalid, 422, "invalid_workflow"),
    (ImageInputError, 422, "invalid_workflow"),
    (KeyQueueFull, 429, "key_queue_full"),
    (DeadlineUnmeetable, 429, "deadline_unmeetable"),
    (QueueFull, 429, "queue_full"),
    (NotAccepting, 503, "unavailable"),
    (StorageUnavailable, 503, "storage_unavailable"),
    (PayloadTooLarge, 413, "payload_too_large"),
    (Unauthorized, 401, "unauthorized"),
    (TaskIdConflict, 409, "conflict"),
    (TaskRunning, 409, "job_running"),
    (ModelDownloadError, 502, "model_download_error"),
    (StorageError, 502, "storage_error"),
]


def from_error(error: ComfyEmbedError) -> Response:
    """The envelope of a request the service refused."""
    status, code = 500, "internal_error"
    for cls, s, c in _TABLE:
        if isinstance(error, cls):
            status, code = s, c
            break
    if is_bad_cursor(error):
        code = "invalid_cursor"
    details: dict[str, Any] | None = None
    if error.node_errors:
        details = node_details(error.node_errors)
    if details is not None or error.type != code:
        details = {**(details or {}), "type": error.type}
    if isinstance(error, (KeyQueueFull, DeadlineUnmeetable)):  # the limit; the ETA
        details = {**(details or {}), **error.details}
    headers = None
    retry = getattr(error, "retry_after", None)
    if isinstance(retry, int):
        headers = {"Retry-After": str(retry)}
    message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
    log.info("v2 refused: %d %s (%s): %s", status, code, error.type, message)
    return envelope(status, code, error.message, details, headers)


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (an unknown path, a method not allowed): the
    envelope under /api/v2/, Starlette's plain text elsewhere, as before."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/v2/"):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code,
                                                                 "invalid_request")
        return envelope(exc.status_code, code, str(exc.detail), None, dict(exc.headers or {}))
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
