"""comfy-embed: ComfyUI workflows run headless, in-process, as a library or a
serverless image API. Importing this package does not import ComfyUI.

The public surface is ``__all__``: :func:`run_workflow` (blocking) and
:class:`Engine` (async: submit, stream, result, cancel), :class:`Settings`,
and the errors they raise, all subclasses of :class:`ComfyEmbedError`.
ComfyUI is found through ``Settings.comfyui_dir`` (``COMFY_EMBED_COMFYUI_DIR``)
or installed by ``comfy-embed install-comfyui``.
"""

from __future__ import annotations

from comfy_embed.config import Settings
from comfy_embed.errors import (
    AppNotFound,
    ComfyEmbedError,
    DeadlineExceeded,
    DeadlineUnmeetable,
    ExecutionFailed,
    ImageInputError,
    InputPathInvalid,
    InstallError,
    InvalidParameter,
    KeyQueueFull,
    MissingAsset,
    ModelDownloadError,
    NotAccepting,
    OutOfMemory,
    PayloadTooLarge,
    QueueFull,
    QueueUnavailable,
    RunTimeout,
    Stalled,
    StorageError,
    StorageUnavailable,
    TaskCancelled,
    TaskDeleted,
    TaskIdConflict,
    TaskLost,
    TaskRunning,
    Unauthorized,
    WebhookRefused,
    WorkflowInvalid,
)
from comfy_embed.prepare.options import RunOptions
from comfy_embed.runtime import Engine, Task, run_workflow, shared_engine
from comfy_embed.version import __version__

__all__ = [
    "__version__", "Settings", "Engine", "Task", "RunOptions", "run_workflow", "shared_engine",
    # every error comfy-embed raises (comfy_embed.errors), one hierarchy
    "ComfyEmbedError", "WorkflowInvalid", "ImageInputError", "InputPathInvalid", "MissingAsset",
    "QueueFull", "NotAccepting", "ExecutionFailed", "OutOfMemory", "TaskLost", "TaskCancelled",
    "RunTimeout", "StorageError", "StorageUnavailable", "PayloadTooLarge", "ModelDownloadError",
    "WebhookRefused", "InvalidParameter", "Unauthorized", "TaskIdConflict", "TaskDeleted",
    "TaskRunning", "InstallError", "QueueUnavailable", "AppNotFound",
    "KeyQueueFull", "DeadlineExceeded", "DeadlineUnmeetable",
    "Stalled",
]
