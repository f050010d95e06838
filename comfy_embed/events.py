"""Event shapes: ComfyUI's own websocket messages plus the final result.

Every event is a plain ``{"type": str, "data": dict}`` so it serialises the
same way to SSE, WebSocket, the task log and the status endpoint.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["FINAL", "COMFY_TERMINAL", "PROGRESS_STATE", "event", "status_event", "queue_event",
           "final_event", "is_final", "error_type", "dumps", "dumps_bytes", "loads", "coalesce_snapshots"]

#: The type of the one terminal event of every task.
FINAL = "serverless_api"
#: ComfyUI's own end-of-execution messages.
COMFY_TERMINAL = frozenset({"execution_success", "execution_error", "execution_interrupted"})
#: ComfyUI's snapshot of every node's progress: each one supersedes the last.
PROGRESS_STATE = "progress_state"

_OPTS = orjson.OPT_NON_STR_KEYS


def dumps_bytes(value: Any) -> bytes:
    """Compact JSON (orjson: this runs for every event and answer).

    Values JSON has no form for (tuples and classes in ComfyUI's validation
    details) are written as ``str()``; what orjson refuses (integers past 64
    bits) falls back to the standard library.
    """
    try:
        return orjson.dumps(value, default=str, option=_OPTS)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, default=str, separators=(",", ":")).encode()


def dumps(value: Any) -> str:
    """:func:`dumps_bytes` as text (SSE lines, WebSocket messages)."""
    return dumps_bytes(value).decode()


def loads(data: bytes | str) -> Any:
    """Parse JSON; ValueError when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            # orjson refuses what it cannot represent (integers past 64 bits).
            return json.loads(data)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def coalesce_snapshots(events: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """Keep only the last ``progress_state`` of a batch: each lists every
    node, so earlier ones say nothing the last does not (and a graph of N
    nodes sends about 2N of them)."""
    last = None
    for seq, ev in events:
        if ev.get("type") == PROGRESS_STATE:
            last = seq
    if last is None:
        return events
    return [(seq, ev) for seq, ev in events if ev.get("type") != PROGRESS_STATE or seq == last]


def event(type: str, data: dict[str, Any]) -> dict[str, Any]:
    """An event in ComfyUI's message shape."""
    return {"type": type, "data": data}


def status_event(queue_remaining: int) -> dict[str, Any]:
    """ComfyUI's ``status`` message, as its server sends on queue changes."""
    return event("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}})


def queue_event(prompt_id: str, position: int,
                eta: dict[str, Any] | None = None) -> dict[str, Any]:
    """comfy-embed's own message while a task waits: ``position`` tasks are
    ahead of it (the running one included). Sent when queued behind others
    and each time the queue ahead changes (it shrinks; under fair share it
    also grows when another key's job is placed ahead); never with 0 (``execution_start``
    comes instead). ``eta``: ``eta_start``/``eta_finish``, seconds from the
    message until the task should start and finish (comfy_embed.eta)."""
    return event("queue", {"position": position, "prompt_id": prompt_id, **(eta or {})})


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


def error_type(final: dict[str, Any]) -> str | None:
    """The ``type`` of a final event's error (None for a success)."""
    error = (final.get("data") or {}).get("error")
    return error.get("type") if isinstance(error, dict) else None


def is_final(ev: dict[str, Any]) -> bool:
    """Whether ``ev`` is the terminal ``serverless_api`` event."""
    return ev.get("type") == FINAL
