"""One exception hierarchy for everything comfy-embed raises.

Errors say what failed and where (node id, input name, URL); they carry no
HTTP status: the API package maps them to statuses in exactly one table.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ComfyEmbedError",
    "QueueUnavailable",
    "AppNotFound",
    "WorkflowInvalid",
    "ImageInputError",
    "InputPathInvalid",
    "QueueFull",
    "KeyQueueFull",
    "DeadlineUnmeetable",
    "NotAccepting",
    "ExecutionFailed",
    "OutOfMemory",
    "TaskLost",
    "Stalled",
    "TaskCancelled",
    "RunTimeout",
    "DeadlineExceeded",
    "StorageError",
    "PayloadTooLarge",
    "ModelDownloadError",
    "WebhookRefused",
    "InvalidParameter",
    "Unauthorized",
    "TaskIdConflict",
    "MissingAsset",
    "TaskDeleted",
    "TaskRunning",
    "StorageUnavailable",
    "InstallError",
]


class ComfyEmbedError(Exception):
    """Base class: every error has a machine-readable ``type`` and a message."""

    type = "comfy_embed_error"

    def __init__(self, message: str, *, node_errors: dict[str, Any] | None = None,
                 details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.node_errors: dict[str, Any] = node_errors or {}
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The ``data.error`` object of a failed ``serverless_api`` message."""
        out: dict[str, Any] = {"type": self.type, "message": self.message,
                               "node_errors": self.node_errors}
        if self.details is not None:
            out["details"] = self.details
        return out


class WorkflowInvalid(ComfyEmbedError):
    """The request is not a runnable workflow (bad JSON, unknown node, bad link,
    wrong type, value out of range, path escape...). ``node_errors`` has
    ComfyUI's validation shape: ``{node_id: {"errors": [...], "class_type"}}``."""

    type = "invalid_prompt"
    #: Every ``type`` it is raised with: its own, comfy-embed's finer ones and
    #: ComfyUI's validation types. A final event read back from the task log
    #: has only this string, so the status table knows each one
    #: (tests/api/test_errors.py checks the code raises no other).
    TYPES: ClassVar[frozenset[str]] = frozenset({
        "invalid_prompt", "invalid_json", "invalid_task_id", "invalid_output_format",
        "too_many_nodes", "node_denied", "output_too_large", "too_many_url_inputs",
        "prompt_no_outputs", "prompt_outputs_failed_validation",
    })

    def __init__(self, message: str, *, type: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        if type:
            self.type = type


def node_error(node_id: str, class_type: str, input_name: str, message: str,
               value: Any = None, *, type: str = "invalid_input") -> dict[str, Any]:
    """One node's entry in ComfyUI's ``node_errors`` shape."""
    return {node_id: {"errors": [{
        "type": type, "message": message,
        "details": f"{input_name}: {message}",
        "extra_info": {"input_name": input_name, "received_value": value}}],
        "dependent_outputs": [], "class_type": class_type}}


class ImageInputError(ComfyEmbedError):
    """An image input could not be used: unreachable, refused, too large, not
    an image, broken base64. Names the node and the input."""

    type = "image_input_error"

    def __init__(self, reason: str, *, node_id: str = "", class_type: str = "",
                 input_name: str = "image", value: Any = None) -> None:
        where = f"node {node_id} ({class_type}) input '{input_name}': " if node_id else ""
        shown = value if not isinstance(value, str) or len(value) <= 200 else value[:200] + "..."
        super().__init__(where + reason,
                         node_errors=node_error(node_id, class_type, input_name, reason, shown,
                                                type="image_input_error") if node_id else None)
        self.reason = reason
        self.node_id, self.class_type, self.input_name = node_id, class_type, input_name

    def at(self, node_id: str, class_type: str, input_name: str, value: Any) -> "ImageInputError":
        """The same error, located at a node input (raised by code that knew only the value)."""
        err = type(self)(self.reason, node_id=node_id, class_type=class_type,
                         input_name=input_name, value=value)
        err.__cause__ = self.__cause__
        return err


class InputPathInvalid(ImageInputError):
    """A file-name input escapes the input folder (absolute path, ``..``, a
    link pointing outside) or names no file: a bad request, not a bad image."""

    type = "invalid_input_path"


class MissingAsset(ImageInputError):
    """A ``core/ASSET`` reference (Comfy API v2) names no asset the caller
    may use: unknown, not ready, another owner's, or malformed."""

    type = "missing_asset"


class QueueFull(ComfyEmbedError):
    """The local queue is at its bound; retry after ``retry_after`` seconds."""

    type = "queue_full"

    def __init__(self, message: str = "queue is full", retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KeyQueueFull(QueueFull):
    """This API key has its quota of jobs waiting (fair share, issue 28);
    ``details`` names the limit (``{"limit": "key_queue", "value": N}``)."""

    type = "key_queue_full"

    def __init__(self, message: str, *, limit: str = "key_queue", value: int = 0,
                 retry_after: int = 5) -> None:
        super().__init__(message, retry_after=retry_after)
        self.details = {"limit": limit, "value": value}


class DeadlineUnmeetable(QueueFull):
    """The job could not start and finish by its deadline (``X-Deadline``,
    ``?deadline=``), given the measured ETA of the work ahead of it: refused
    at once, 429 with ``Retry-After`` (issue 28); ``details`` holds the
    forecast (``eta_start``, ``eta_finish``, ``estimate``, ``deadline_in``)."""

    type = "deadline_unmeetable"

    def __init__(self, message: str, *, retry_after: int = 5, details: Any = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.details = details


class NotAccepting(ComfyEmbedError):
    """The instance is draining (pre-stop) or not ready yet."""

    type = "not_accepting"

    def __init__(self, message: str = "instance is not accepting work", retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ExecutionFailed(ComfyEmbedError):
    """A node raised while the workflow ran; ``details`` is ComfyUI's
    ``execution_error`` message (traceback, node id, node type)."""

    type = "execution_error"


class OutOfMemory(ExecutionFailed):
    """CUDA (or the host) ran out of memory during the run. Only this task
    fails; cached memory is freed, and repeated ones recycle the instance."""

    type = "out_of_memory"


class TaskLost(ExecutionFailed):
    """The instance running the task stopped (its lease expired in the task
    log) before the task ended; another instance closed it with this error."""

    type = "task_lost"


class Stalled(ExecutionFailed):
    """The running node sent no progress for ``COMFY_EMBED_STALL_SECONDS`` and
    was interrupted (comfy_embed/watchdog.py); ``details`` names it (``node_id``,
    ``node_type``), and says ``interrupt_ignored`` when it did not stop either
    (the instance then drains and exits to be replaced)."""

    type = "stalled"


class TaskCancelled(ComfyEmbedError):
    """The task was cancelled (queued or mid-run)."""

    type = "execution_interrupted"


class RunTimeout(ComfyEmbedError):
    """The task ran past its time limit and was interrupted."""

    type = "run_timeout"


class DeadlineExceeded(RunTimeout):
    """A queued task was dropped, never run: its deadline passed while it
    waited, or it could not have finished by it (issue 28)."""

    type = "deadline_exceeded"


class StorageError(ComfyEmbedError):
    """Object storage failed (upload, signing, reading an ``oss://`` input)."""

    type = "storage_error"


class PayloadTooLarge(ComfyEmbedError):
    """The request body is over the configured limit."""

    type = "payload_too_large"


class WebhookRefused(ComfyEmbedError):
    """A run's webhook cannot be used: not http(s), an address the URL rules
    refuse (private, loopback, metadata... unless allowlisted), or unknown
    ``webhook_events``. Refused at submit time, before the task exists."""

    type = "webhook_refused"


class ModelDownloadError(ComfyEmbedError):
    """A model of the models manifest could not be fetched or verified; the
    message names the model (``folder/name``) and the URL."""

    type = "model_download_error"


# --- safety (issue 9) -------------------------------------------------------
class InvalidParameter(WorkflowInvalid):
    """A query parameter or header is malformed (``since``, ``quality``,
    ``Last-Event-ID``, a task id): names the parameter."""

    type = "invalid_parameter"

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, type=self.type, **kw)


class AppNotFound(ComfyEmbedError):
    """No workflow app of that name in the apps folder (issue 26)."""

    type = "app_not_found"


class Unauthorized(ComfyEmbedError):
    """API keys are configured and the request has none, or a wrong one."""

    type = "unauthorized"


class TaskIdConflict(ComfyEmbedError):
    """The task id names a task that another API key created."""

    type = "task_id_conflict"


class TaskDeleted(ComfyEmbedError):
    """The task was deleted (``DELETE /task``): only its tombstone is left,
    and a retry with its id answers this instead of running it again."""

    type = "task_deleted"


class TaskRunning(ComfyEmbedError):
    """The task did not stop in time to be deleted (a node that ignores
    interrupts): retry the delete."""

    type = "task_running"


class StorageUnavailable(ComfyEmbedError):
    """A local folder the service writes (task log, outputs) is unusable:
    full, read-only or missing. Retry later (or elsewhere)."""

    type = "storage_unavailable"

    def __init__(self, message: str, retry_after: int = 10) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueUnavailable(ComfyEmbedError):
    """The durable task queue (Redis, ``COMFY_EMBED_REDIS_URL``) cannot be
    reached: nothing was queued. Retry later (or elsewhere)."""

    type = "queue_unavailable"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InstallError(ComfyEmbedError):
    """``comfy-embed install-comfyui`` failed; the message names the step
    (git clone, fetch, checkout, pip) and why. Never a request's error."""

    type = "install_failed"
