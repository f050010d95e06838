"""The one table from errors to HTTP statuses (SPEC §2).

Used live (the exception at hand) and when a final event is read back from
the task log (only its ``error.type`` string is left), with the same answer
for the same error: the table by type string is derived from the table by
class, never written twice.
"""

from __future__ import annotations

from typing import Any

from comfy_embed.errors import (
    AppNotFound,
    ComfyEmbedError,
    ExecutionFailed,
    ImageInputError,
    InputPathInvalid,
    ModelDownloadError,
    NotAccepting,
    PayloadTooLarge,
    QueueFull,
    QueueUnavailable,
    RunTimeout,
    StorageError,
    StorageUnavailable,
    TaskCancelled,
    TaskDeleted,
    TaskIdConflict,
    TaskRunning,
    Unauthorized,
    WebhookRefused,
    WorkflowInvalid,
)

__all__ = ["status_for", "status_for_type", "status_for_event"]

#: Each error class's status; a class not listed takes its nearest listed
#: base's (InvalidParameter a WorkflowInvalid's, OutOfMemory and TaskLost an
#: ExecutionFailed's).
_BY_CLASS: dict[type[ComfyEmbedError], int] = {
    WorkflowInvalid: 400,
    # A file name that escapes the input folder is a bad request, not a bad image.
    InputPathInvalid: 400,
    ImageInputError: 422,
    WebhookRefused: 400,
    PayloadTooLarge: 413,
    QueueFull: 429,
    Unauthorized: 401,
    AppNotFound: 404,
    TaskIdConflict: 409,
    # Deleted on purpose: gone for good, unlike an unknown task (404).
    TaskDeleted: 410,
    TaskRunning: 409,
    StorageUnavailable: 503,
    QueueUnavailable: 503,
    NotAccepting: 503,
    StorageError: 502,
    # A model fetched on first use could not be downloaded or verified.
    ModelDownloadError: 502,
    RunTimeout: 504,
    # A cancelled task did not fail, nor did it succeed: 409 tells a client
    # that the task's state (cancelled) conflicts with returning images.
    TaskCancelled: 409,
    ExecutionFailed: 500,
    ComfyEmbedError: 500,
}


def _class_status(cls: type[ComfyEmbedError]) -> int:
    return next(_BY_CLASS[base] for base in cls.__mro__ if base in _BY_CLASS)


def _all_classes(cls: type[ComfyEmbedError]) -> list[type[ComfyEmbedError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_classes(sub))
    return found


#: The same statuses by ``type`` string: every error class's own type, and
#: each type WorkflowInvalid is raised with (``WorkflowInvalid.TYPES``).
_BY_TYPE: dict[str, int] = {
    **{t: _BY_CLASS[WorkflowInvalid] for t in WorkflowInvalid.TYPES},
    **{cls.type: _class_status(cls) for cls in _all_classes(ComfyEmbedError)},
}


def status_for(error: ComfyEmbedError) -> int:
    """The status of a refused request or failed task, from its error."""
    return _class_status(type(error))


def status_for_type(error_type: str) -> int:
    """The status of an error known only by its ``type`` string. Unknown
    ones: ComfyUI's validation types (``prompt_*``) are 400, the rest 500."""
    status = _BY_TYPE.get(error_type)
    if status is None:
        return 400 if error_type.startswith("prompt_") else 500
    return status


def status_for_event(final: dict[str, Any]) -> int:
    """Status for a final ``serverless_api`` event (live or read back from the log)."""
    data = final.get("data") or {}
    if data.get("status") == "success":
        return 200
    return status_for_type(str((data.get("error") or {}).get("type", "")))
