"""Comfy API v2 (``/api/v2/``): jobs, their events, assets, the spec's error
envelope. Official Comfy SDKs work against it through ``COMFY_BASE_URL``."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from comfy_embed.api.v2 import assets, errors, jobs, stream
from comfy_embed.assets.store import AssetStore
from comfy_embed.service.idempotency import IdempotencyStore
from comfy_embed.service.jobs import JobService
from comfy_embed.service.lifecycle import TaskService

__all__ = ["PREFIX", "attach", "routes"]

PREFIX = "/api/v2"


def attach(app: Starlette, service: TaskService) -> None:
    """What the v2 routes use, over the app's task service (lifespan)."""
    s = service.settings
    app.state.v2_jobs = JobService(service)
    app.state.v2_idempotency = IdempotencyStore(service.tasklog.root, s.v2.idempotency_hours,
                                                max(30.0, 4 * s.tasklog.lease_seconds))
    app.state.v2_assets = AssetStore(service.tasklog.root)
    app.state.v2_folders = {"output": s.comfy.output_path, "temp": s.comfy.temp_path,
                            "input": s.comfy.input_path}


def exception_handlers() -> dict[Any, Any]:
    """Starlette's refusals under /api/v2/ in the envelope (the app's handlers)."""
    return {HTTPException: errors.http_exception}


def routes() -> list[Any]:
    """Every /api/v2 route (app.py mounts them beside the FC API's)."""
    p = PREFIX
    return [
        Route(f"{p}/jobs", jobs.create_job, methods=["POST"]),
        Route(f"{p}/jobs", jobs.list_jobs, methods=["GET"]),
        Route(f"{p}/jobs/{{id}}", jobs.get_job, methods=["GET"]),
        Route(f"{p}/jobs/{{id}}", jobs.delete_job, methods=["DELETE"]),
        Route(f"{p}/jobs/{{id}}/events", stream.job_events, methods=["GET"]),
        Route(f"{p}/jobs/{{id}}/cancel", jobs.cancel_job, methods=["POST"]),
        Route(f"{p}/jobs/{{id}}/workflow", jobs.job_workflow, methods=["GET"]),
        Route(f"{p}/assets", assets.upload, methods=["POST"]),
        Route(f"{p}/assets/from-hash", assets.from_hash, methods=["POST"]),
        Route(f"{p}/assets/by-hash/{{hash}}", assets.by_hash, methods=["HEAD"]),
        Route(f"{p}/assets/{{id}}", assets.get_asset, methods=["GET"]),
        Route(f"{p}/assets/{{id}}", assets.delete_asset, methods=["DELETE"]),
        Route(f"{p}/assets/{{id}}/content", assets.content, methods=["GET"]),
    ]
