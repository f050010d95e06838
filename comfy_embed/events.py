"""Event shapes: ComfyUI's own websocket messages plus the final result.

Every event is a plain ``{"type": str, "data": dict}`` so it serialises the
same way to SSE, WebSocket, the task log and the status endpoint.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FINAL", "COMFY_TERMINAL", "event", "status_event", "final_event", "is_final"]

#: The type of the one terminal event of every task.
FINAL = "serverless_api"
#: ComfyUI's own end-of-execution messages.
COMFY_TERMINAL = frozenset({"execution_success", "execution_error", "execution_interrupted"})


def event(type: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": type, "data": data}


def status_event(queue_remaining: int) -> dict[str, Any]:
    """ComfyUI's ``status`` message, as its server sends on queue changes."""
    return event("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}})


def final_event(task_id: str, prompt_id: str | None, seeds: dict[str, int],
                results: list[dict[str, Any]] | None = None,
                error: dict[str, Any] | None = None,
                execution_time: float = 0.0,
                outputs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``serverless_api`` message: same body for HTTP, stream, WS, status.

    ``execution_time`` is the seconds from the start of execution to this
    event (0 for a task that never ran), as Function Compute's own ComfyUI
    template reports it. ``outputs`` holds the non-file values of nodes' UI
    outputs (text, numbers, JSON), ``{node_id: {key: value}}``; files are in
    ``results``.
    """
    data: dict[str, Any] = {"status": "error" if error else "success", "task_id": task_id,
                            "prompt_id": prompt_id, "seeds": dict(seeds),
                            "results": [] if error else list(results or []),
                            "outputs": {} if error else dict(outputs or {}),
                            "execution_time": round(execution_time, 3)}
    if error:
        data["error"] = error
    return event(FINAL, data)


def is_final(ev: dict[str, Any]) -> bool:
    return ev.get("type") == FINAL
