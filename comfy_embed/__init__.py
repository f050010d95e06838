"""comfy-embed: ComfyUI workflows run headless, in-process, as a library or a
serverless image API. Importing this package does not import ComfyUI."""

from __future__ import annotations

from comfy_embed.config import Settings
from comfy_embed.errors import (
    ComfyEmbedError,
    ExecutionFailed,
    ImageInputError,
    InputPathInvalid,
    NotAccepting,
    PayloadTooLarge,
    QueueFull,
    RunTimeout,
    StorageError,
    TaskCancelled,
    WorkflowInvalid,
)
from comfy_embed.runtime import Engine, Task, run_workflow, shared_engine

__all__ = [
    "Settings", "Engine", "Task", "run_workflow", "shared_engine",
    "ComfyEmbedError", "WorkflowInvalid", "ImageInputError", "InputPathInvalid",
    "QueueFull", "NotAccepting", "ExecutionFailed", "TaskCancelled", "RunTimeout",
    "StorageError", "PayloadTooLarge",
]
