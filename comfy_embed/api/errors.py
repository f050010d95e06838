"""The one table from errors to HTTP statuses (SPEC §2)."""

from __future__ import annotations

from typing import Any

from comfy_embed.errors import (
    ComfyEmbedError,
    ExecutionFailed,
    ImageInputError,
    InputPathInvalid,
    ModelDownloadError,
    NotAccepting,
    PayloadTooLarge,
    QueueFull,
    RunTimeout,
    StorageError,
    StorageUnavailable,
    TaskCancelled,
    TaskIdConflict,
    Unauthorized,
    WebhookRefused,
    WorkflowInvalid,
)

__all__ = ["status_for", "status_for_event"]

# Most specific class first.
_BY_CLASS: list[tuple[type[ComfyEmbedError], int]] = [
    (InputPathInvalid, 400),
    (ImageInputError, 422),
    (WorkflowInvalid, 400),
    (WebhookRefused, 400),
    (PayloadTooLarge, 413),
    (QueueFull, 429),
    (Unauthorized, 401),
    (TaskIdConflict, 409),
    (StorageUnavailable, 503),
    (NotAccepting, 503),
    (StorageError, 502),
    # A model fetched on first use could not be downloaded or verified.
    (ModelDownloadError, 502),
    (RunTimeout, 504),
    # A cancelled task did not fail, nor did it succeed: 409 tells a client
    # that the task's state (cancelled) conflicts with returning images.
    (TaskCancelled, 409),
    (ExecutionFailed, 500),
]

# Error ``type`` strings as they appear in a persisted final event, for
# answering from the task log (where no exception object exists).
_BY_TYPE: dict[str, int] = {cls.type: code for cls, code in _BY_CLASS}
_BY_TYPE.update({"invalid_json": 400, "invalid_prompt": 400, "invalid_task_id": 400,
                 "prompt_no_outputs": 400, "prompt_outputs_failed_validation": 400,
                 "task_lost": 500, "invalid_parameter": 400, "too_many_nodes": 400,
                 "node_denied": 400})


def status_for(error: ComfyEmbedError) -> int:
    for cls, code in _BY_CLASS:
        if isinstance(error, cls):
            return code
    return 500


def status_for_event(final: dict[str, Any]) -> int:
    """Status for a final ``serverless_api`` event read back from the log."""
    data = final.get("data") or {}
    if data.get("status") == "success":
        return 200
    err_type = (data.get("error") or {}).get("type", "")
    return _BY_TYPE.get(err_type, 400 if err_type.startswith("prompt_") else 500)
