"""The Starlette app: serverless endpoints plus health and lifecycle hooks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, AsyncIterator, Callable

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from comfy_embed.api import apps, metrics, openai, openapi, page, v2
from comfy_embed.api.auth import ApiKeyAuth
from comfy_embed.api.hooks import LifecycleGuard
from comfy_embed.api.middleware import InternalErrors
from comfy_embed.api.serverless import runs, ws
from comfy_embed.api.serverless.queued import TaskQueue
from comfy_embed.config import Settings
from comfy_embed.observe.guard import drain_when_tripped
from comfy_embed.runtime import Engine
from comfy_embed.service.lifecycle import TaskService

log = logging.getLogger(__name__)

__all__ = ["create_app"]


async def health(request: Request) -> Response:
    # A drained instance (/pre-stop) takes no work again: liveness fails so
    # that a platform that did not stop it restarts it (it also exits itself).
    if getattr(request.app.state, "drained", False):
        return JSONResponse({"status": "drained"}, 503)
    return JSONResponse({"status": "alive"})


async def ready(request: Request) -> Response:
    state = request.app.state
    # A full or read-only task-log/output folder: unhealthy until it recovers.
    unusable = await anyio.to_thread.run_sync(state.service.folders.reason)
    if not unusable and state.queue is not None:  # Redis down: nothing can be queued
        unusable = await state.queue.reason()
    if unusable:
        return JSONResponse({"status": "unhealthy", "reason": unusable}, 503)
    if state.engine.ready and state.warm.is_set() and state.engine.accepting:
        body: dict[str, Any] = {"status": "ready", "device": state.engine.comfy.device,
                                "queue_depth": metrics.queue_depth(request.app),
                                "loaded_models": list(state.engine.loaded_models),
                                "kept_models": sorted(state.engine.settings.comfy.keep_loaded)}
        # Seconds of work held here (running + queued), by the measured ETA; None: unknown.
        backlog = state.engine.eta.backlog()
        body["backlog_seconds"] = None if backlog is None else round(backlog, 3)
        packs = state.engine.custom_nodes()
        if packs is not None:  # failing packs named, as at start-up
            body["custom_nodes"] = packs
        fp = state.engine.fingerprint
        if fp is not None and fp.lock is not None:  # how it differs from its lock
            body["lock"] = {"hash": fp.lock, "drifted": fp.drifted, "drift": fp.drift}
            if fp.drifted and state.engine.settings.comfy.lock_drift == "unready":
                return JSONResponse({**body, "status": "drifted"}, 503)
        return JSONResponse(body)
    if state.engine.executor.boot_error is not None:
        return JSONResponse({"status": "failed", "error": str(state.engine.executor.boot_error)}, 500)
    if state.engine.guard.tripped.is_set():  # memory guard: draining, then exiting
        return JSONResponse({"status": "recycling", "reason": state.engine.guard.reason}, 503)
    return JSONResponse({"status": "starting" if state.engine.accepting else "draining"}, 503)


async def initialize(request: Request) -> Response:
    """Function Compute calls this once after start: answer when warm."""
    await request.app.state.engine.wait_ready()
    await request.app.state.warm.wait()
    return JSONResponse({"status": "ready"})


async def pre_stop(request: Request) -> Response:
    """Function Compute calls this before stopping: accept nothing new,
    finish running work (its log included), then answer; the process then
    stops as after SIGTERM's drain (a drained instance never takes work
    again). Only the platform may call it (api/hooks.py)."""
    await request.app.state.service.drain()
    request.app.state.drained = True
    return JSONResponse({"status": "drained"},
                        background=BackgroundTask(_stop_drained, request.app.state.control))


def _stop_drained(control: ServerControl) -> None:
    """After /pre-stop's answer is sent: stop the server (``comfy-embed
    serve`` exits 0). Hosted by something else, /health's 503 ends it."""
    log.info("drained by /pre-stop: stopping")
    if control.stop_server is not None:
        control.stop_server()


async def pre_freeze(request: Request) -> Response:
    """Function Compute calls this before freezing the instance: answer once
    the task-log writes in flight are on disk. Unlike /pre-stop it does not
    drain: running tasks go on when the instance thaws."""
    await request.app.state.service.flush()
    return JSONResponse({"status": "flushed"})


async def _warm_up(engine: Engine, settings: Settings, warm: anyio.Event) -> None:
    try:
        await engine.wait_ready()
        # COMFY_EMBED_WARMUP_WORKFLOW, else the lock's [warmup] workflow.
        warmup = settings.jobs.warmup_workflow or (
            engine.fingerprint.warmup if engine.fingerprint is not None else None)
        if warmup:
            graph = json.loads(warmup.read_text())
            await engine.run(graph, task_id="warmup")
            log.info("warm-up workflow done")
    except Exception:
        log.exception("warm-up failed")
    finally:
        warm.set()


@dataclasses.dataclass
class ServerControl:
    """What the app and the server hosting it tell each other (``comfy-embed
    serve`` passes one to :func:`create_app`)."""

    #: When SIGTERM/SIGINT arrived (monotonic), if it did: drain time counts from it.
    stop_requested_at: float | None = None
    #: How the app stops its server itself (the memory guard, after draining).
    stop_server: Callable[[], None] | None = None
    #: The process's exit status: EXIT_RECYCLE when the memory guard recycled
    #: it, watchdog.EXIT_STALLED when a node ignored the stall interrupt.
    exit_code: int = 0


async def _recycle(app: Starlette, control: ServerControl) -> None:
    """The memory guard tripped: drain, then stop the server; ``comfy-embed
    serve`` exits with ``control.exit_code`` (guard.EXIT_RECYCLE)."""
    await drain_when_tripped(app.state.engine.guard, app.state.service.drain)
    control.exit_code = app.state.engine.guard.exit_code  # EXIT_RECYCLE, or watchdog.EXIT_STALLED
    if control.stop_server is not None:
        control.stop_server()
    else:  # hosted by something else: ask it to stop as a platform would
        os.kill(os.getpid(), signal.SIGTERM)


def create_app(settings: Settings | None = None, engine: Engine | None = None,
               control: ServerControl | None = None) -> Starlette:
    """Build the app; ComfyUI boots in the background when the app starts."""
    settings = settings or Settings.from_env()
    engine = engine or Engine(settings)
    control = control or ServerControl()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        service = TaskService(engine, settings)
        app.state.engine, app.state.service = engine, service
        v2.attach(app, service)  # Comfy API v2, over the same task service
        app.state.control = control
        app.state.warm = anyio.Event()
        url = settings.tasklog.redis_url
        app.state.queue = TaskQueue(service, url, settings.tasklog.queue_stream) if url else None
        await service.recover()
        try:
            # The engine's group owns what outlives a request (results being
            # assembled, log writers, webhooks); this one the server's loops.
            async with engine.background.open(), anyio.create_task_group() as tg:
                tg.start_soon(_warm_up, engine, settings, app.state.warm)
                tg.start_soon(service.upkeep)
                if app.state.queue is not None:  # the durable queue mode (issue 24)
                    tg.start_soon(app.state.queue.work, app.state.warm)
                tg.start_soon(_recycle, app, control)
                yield
                # SIGTERM/SIGINT: the server waited for open requests; now the
                # rest of the grace period goes to background (async) tasks.
                began = control.stop_requested_at or time.monotonic()
                grace = max(0.0, settings.server.drain_seconds - (time.monotonic() - began))
                await service.shutdown(grace)
                tg.cancel_scope.cancel()
                # Shutdown waited for what it could; whatever is left is cancelled.
                engine.background.cancel()
        finally:
            engine.accepting = False
            service.close()

    prefix = "/api/serverless"
    routes: list[Any] = [
        Route(f"{prefix}/run", runs.run, methods=["POST"]),
        Route(f"{prefix}/validate", runs.validate, methods=["POST"]),
        Route(f"{prefix}/status", runs.status, methods=["GET"]),
        Route(f"{prefix}/cancel", runs.cancel, methods=["POST"]),
        Route(f"{prefix}/task", runs.delete, methods=["DELETE"]),
        Route(f"{prefix}/webhook", runs.webhook, methods=["GET"]),
        WebSocketRoute(f"{prefix}/ws", ws.serverless_ws),
        Route("/api/apps", apps.list_apps, methods=["GET"]),
        Route("/api/apps/{name}", apps.get_app, methods=["GET"]),
        Route("/api/apps/{name}", runs.run, methods=["POST"]),  # the FC run, with the app's graph
        Route("/v1/images/generations", openai.generations, methods=["POST"]),
        Route("/v1/images/edits", openai.edits, methods=["POST"]),
        Route("/v1/models", openai.models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/initialize", initialize, methods=["POST"]),
        Route("/pre-stop", pre_stop, methods=["GET", "POST"]),
        Route("/pre-freeze", pre_freeze, methods=["GET", "POST"]),
        Route("/metrics", metrics.metrics, methods=["GET"]),
        *v2.routes(),  # Comfy API v2: /api/v2/jobs, /api/v2/assets
        *openapi.routes(),  # /openapi.json, /docs
        *page.routes(),  # the playground page at / (api/static/)
    ]
    # Internal errors outermost (they catch the other middleware's too), then
    # API keys: nothing else runs for a refused request.
    # The lifecycle hooks are the platform's, whatever API key a caller has.
    middleware = [Middleware(InternalErrors),
                  Middleware(LifecycleGuard, admin_key=settings.safety.admin_key)]
    if settings.safety.api_keys:
        middleware.append(Middleware(ApiKeyAuth, keys=settings.safety.api_keys))
    middleware.append(Middleware(metrics.QueueDepthHeader))
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                     exception_handlers=v2.exception_handlers())
