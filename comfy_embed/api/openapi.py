"""The OpenAPI 3.1 description of the HTTP API, written by hand, and the
``/openapi.json`` and ``/docs`` endpoints (the docs page is plain HTML and JS
from ``static/docs/``: nothing from a CDN).

A test checks that every route of the app is described here, validates the
document, and runs schemathesis against a live server with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from comfy_embed.api import apps as apps_api
from comfy_embed.api import openai as openai_api
from comfy_embed.api.v2 import openapi as v2_openapi
from comfy_embed.errors import ComfyEmbedError
from comfy_embed.prepare.apps import App
from comfy_embed.version import __version__

__all__ = ["document", "routes"]

_DOCS = Path(__file__).resolve().parent / "static" / "docs"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _final(description: str, stream: bool = False) -> dict[str, Any]:
    """A response whose body is a ``serverless_api`` message (or, in stream
    mode, an SSE stream ending with one)."""
    out = _json(_ref("FinalEvent"), description)
    if stream:
        # Each server-sent event (as OpenAPI 3.2's itemSchema describes one:
        # data, id, event) carries one Event as JSON, the last a serverless_api.
        out["content"]["text/event-stream"] = {"schema": {
            "type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                    "contentSchema": _ref("Event")},
                           "id": {"type": "string"}, "event": {"type": "string"}}}}
    return out


_TASK_ID = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"}
_FLAG = {"type": "string", "enum": ["true", "false", "1", "0"]}

_SCHEMAS: dict[str, Any] = {
    "Workflow": {
        "type": "object",
        "description": "A ComfyUI API-format workflow (`Export (API)`): `{node_id: node}`; a "
                       "link is `[source_node_id, output_index]`. A native `/prompt` envelope "
                       "(`{\"prompt\": {...}, \"extra_data\": ...}`) is accepted too, and so is "
                       "a workflow saved from the editor (`SavedWorkflow`), converted on the "
                       "server.",
        "additionalProperties": _ref("Node"),
    },
    "SavedWorkflow": {
        "type": "object",
        "description": "A workflow saved from ComfyUI's editor (`Workflow > Save`): `nodes`, "
                       "`links`, `extra`, `definitions.subgraphs`; the server converts it to "
                       "the API format with its own node definitions.",
        "required": ["nodes"],
        "properties": {"nodes": {"type": "array", "items": {"type": "object"}},
                       "links": {"type": "array"}},
    },
    "Node": {
        "type": "object",
        "required": ["class_type", "inputs"],
        "properties": {
            "class_type": {"type": "string"},
            "inputs": {"type": "object"},
            "_meta": {"type": "object"},
        },
    },
    "Event": {
        "type": "object",
        "description": "ComfyUI's own websocket messages, unchanged (`status`, `execution_start`, "
                       "`execution_cached`, `executing`, `progress`, `progress_state`, `executed`, "
                       "`execution_success`, `execution_error`, `execution_interrupted`), "
                       "comfy-embed's `queue` (`{position, prompt_id}`: tasks ahead while waiting) "
                       "and the final `serverless_api`.",
        "required": ["type", "data"],
        "properties": {"type": {"type": "string"}, "data": {"type": "object"}},
    },
    "LoggedEvent": {
        "allOf": [_ref("Event"), {
            "type": "object", "required": ["id"],
            "properties": {"id": {"type": "integer", "minimum": 1,
                                  "description": "Sequence number (for `since`, `Last-Event-ID`)."}},
        }],
    },
    "Error": {
        "type": "object",
        "required": ["type", "message"],
        "properties": {
            "type": {"type": "string", "description": "Machine-readable: `invalid_prompt`, "
                     "`prompt_outputs_failed_validation`, `image_input_error`, `queue_full`, "
                     "`execution_error`, `out_of_memory`, `execution_interrupted`, "
                     "`run_timeout`, `storage_error`, `task_lost`, `stalled`, ..."},
            "message": {"type": "string"},
            "node_errors": {"type": "object", "description": "ComfyUI's validation shape: "
                            "`{node_id: {errors: [...], class_type, dependent_outputs}}`."},
            "details": {},
        },
    },
    "Result": {
        "type": "object",
        "required": ["node_id", "index", "output"],
        "properties": {
            "node_id": {"type": "string"},
            "index": {"type": "integer", "minimum": 0},
            "variant": {"type": "integer", "minimum": 1, "description": "With `variants`: "
                        "the variant (1-based) that wrote this file."},
            "output": {"type": "object", "properties": {
                "comfy": {"type": "object", "properties": {
                    "filename": {"type": "string"}, "type": {"type": "string"},
                    "subfolder": {"type": "string"},
                    "dir": {"type": "string", "description":
                            "The file's folder relative to the output folder ('.' for "
                            "outputs): the file is <output>/<dir>/<subfolder>/<filename>."}}},
                "media_type": {"type": "string"},
                "base64": {"type": "object", "properties": {"data": {"type": "string"}}},
                "oss": {"type": "object"},
                "s3": {"type": "object"},
            }},
        },
    },
    "Report": {
        "type": "object",
        "description": "Where the task's time and memory went (seconds unless named).",
        "properties": {
            **{k: {"type": "number", "minimum": 0} for k in (
                "prepare", "validation", "queued", "execution", "handoff", "render", "upload",
                "end_to_end")},
            "nodes": {"type": "array", "items": {"type": "object", "properties": {
                "node": {"type": "string"}, "class_type": {"type": ["string", "null"]},
                "seconds": {"type": "number"}}}},
            "cached_nodes": {"type": "array", "items": {"type": "string"}},
            "models": {"type": "object", "description":
                       "Loader nodes: `loaded` (run: read from disk) or `resident` (from the "
                       "cache), each with `kept` (named in COMFY_EMBED_KEEP_LOADED); "
                       "`evicted`: kept models released under memory pressure since the "
                       "previous job.", "properties": {
                "loaded": {"type": "array", "items": {"type": "object"}},
                "resident": {"type": "array", "items": {"type": "object"}},
                "evicted": {"type": "array", "items": {"type": "string"}}}},
            "peak_rss_bytes": {"type": ["integer", "null"]},
            "peak_vram_bytes": {"type": ["integer", "null"]},
            "environment": {"type": "object", "description":
                            "The run record: comfy_embed (version), comfyui (commit), packs "
                            "({name: commit}), models ({folder/name: sha256} of the model "
                            "files the graph names), torch, device, lock (the lock file's "
                            "sha256), drift (with a lock: how the instance differs from it).",
                            "properties": {
                                "comfy_embed": {"type": "string"},
                                "comfyui": {"type": ["string", "null"]},
                                "packs": {"type": "object"}, "models": {"type": "object"},
                                "torch": {"type": ["string", "null"]},
                                "device": {"type": "string"},
                                "lock": {"type": ["string", "null"]},
                                "drift": {"type": "object"}}},
        },
    },
    "FinalEvent": {
        "type": "object",
        "description": "The `serverless_api` message: the answer of a run, the last event of "
                       "every stream and task log.",
        "required": ["type", "data"],
        "properties": {
            "type": {"const": "serverless_api"},
            "id": {"type": "integer"},
            "data": {
                "type": "object",
                "required": ["status", "task_id", "results"],
                "properties": {
                    "status": {"enum": ["success", "error"]},
                    "task_id": {"type": "string"},
                    "prompt_id": {"type": ["string", "null"]},
                    "seeds": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "results": {"type": "array", "items": _ref("Result")},
                    "outputs": {"type": "object"},
                    "variants": {"type": "array", "description": "With `variants`: each "
                                 "variant's seeds, non-file outputs and entries of `results`.",
                                 "items": {"type": "object", "properties": {
                                     "variant": {"type": "integer"},
                                     "seeds": {"type": "object"}, "outputs": {"type": "object"},
                                     "result_indexes": {"type": "array",
                                                        "items": {"type": "integer"}}}}},
                    "execution_time": {"type": "number"},
                    "expires_at": {"type": ["string", "null"], "format": "date-time",
                                   "description": "When the task's data is deleted (UTC)."},
                    "attempt": {"type": "integer", "minimum": 1,
                                "description": "The run of this task id this event ends: "
                                               "a retry runs a lost task again."},
                    "attempts": {"type": "array", "description": "After a retry: every "
                                 "attempt, oldest first, this one last.",
                                 "items": {"type": "object", "properties": {
                                     "attempt": {"type": "integer"},
                                     "status": {"enum": ["success", "error"]},
                                     "error": {"type": ["object", "null"]},
                                     "finished_at": {"type": ["string", "null"],
                                                     "format": "date-time"}}}},
                    "error": _ref("Error"),
                    "report": _ref("Report"),
                },
            },
        },
    },
    "Accepted": {"type": "object", "required": ["task_id"], "properties": {
        "task_id": {"type": "string"},
        "position": {"type": ["integer", "null"],
                     "description": "Jobs ahead of it (the running one included)."},
        "eta_start": {"type": ["number", "null"], "description":
                      "Seconds until it should start, by the measured ETA (null: unknown)."},
        "eta_finish": {"type": ["number", "null"],
                       "description": "Seconds until it should finish (null: unknown)."}}},
    "DeleteAnswer": {"type": "object", "required": ["task_id", "status"], "properties": {
        "task_id": {"type": "string"}, "status": {"enum": ["deleted", "unknown"]},
        "files": {"type": "integer"}, "bytes": {"type": "integer"},
        "objects": {"type": "object"}}},
    "CancelAnswer": {"type": "object", "required": ["task_id", "status"], "properties": {
        "task_id": {"type": "string"},
        "status": {"enum": ["cancelling", "requested", "done", "unknown"]}}},
    "DryRun": {"type": "object", "required": ["valid"], "properties": {
        "valid": {"type": "boolean"}, "error": {"anyOf": [_ref("Error"), {"type": "null"}]},
        "node_errors": {"type": "object"}, "missing_nodes": {"type": "array"},
        "missing_models": {"type": "array"}, "models": {"type": "array"},
        "outputs": {"type": "array"}}},
    "Status": {"type": "object", "required": ["status"], "properties": {
        "status": {"type": "string"}, "device": {"type": "string"},
        "queue_depth": {"type": "integer", "minimum": 0},
        "error": {"type": "string"}, "reason": {"type": "string"}}},
}

_RUN_ERRORS = {
    "400": _final("Invalid workflow or input (the error names the node and input).", True),
    "401": _final("API keys are configured and none, or a wrong one, was sent.", True),
    "409": _final("Cancelled (`execution_interrupted`), or the task id belongs to another "
                  "API key or names an existing output folder (`task_id_conflict`).", True),
    "410": _final("The task id names a deleted task (`task_deleted`): it does not run again.",
                  True),
    "413": _final("Body over the size limit.", True),
    "422": _final("Unusable image input.", True),
    "429": _final("Queue full, this API key's queue full (`key_queue_full`, the limit in "
                  "`details`), or the job cannot finish by its deadline "
                  "(`deadline_unmeetable`, its ETA in `details`); see `Retry-After`.", True),
    "500": _final("Execution failed (`execution_error`, `out_of_memory`, `task_lost`, "
                  "`stalled`: no progress for COMFY_EMBED_STALL_SECONDS).", True),
    "502": _final("Object storage failed.", True),
    "503": _final("Draining, not ready, or the task log is not writable "
                  "(`storage_unavailable`); see `Retry-After`.", True),
    "504": _final("Run timeout, or dropped unrun from the queue at its deadline "
                  "(`deadline_exceeded`).", True),
}

#: A malformed query parameter (issue 9): never a 500.
_BAD_PARAM = {"400": _final("Malformed parameter (`invalid_parameter`, naming it): a task id "
                            "not of 1-128 `A-Z a-z 0-9 . _ -`, `since` not a whole number.",
                            True)}


def _query(name: str, schema: dict[str, Any], description: str,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema,
            "description": description}


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": {"type": "string"},
            "description": description}


_TASK_Q = _query("task_id", _TASK_ID, "The task id.", required=True)
_SINCE_Q = _query("since", {"type": "integer", "minimum": 0},
                  "Only events with a sequence number above this.")


_SERVERLESS = "/api/serverless"


def _paths() -> dict[str, Any]:
    return {**_run_paths(_SERVERLESS), **_task_paths(_SERVERLESS), **_platform_paths(),
            **_page_paths()}


def _run_paths(p: str) -> dict[str, Any]:
    """Running and checking a workflow."""
    return {
        f"{p}/run": {"post": {
            "summary": "Run a workflow",
            "description": "The answer is a `serverless_api` message; with `stream=true` an SSE "
                           "stream of every event (`id:` = sequence number), ending with it.",
            "parameters": [
                _query("stream", _FLAG, "Stream progress as server-sent events."),
                _query("output_base64", _FLAG, "Inline every output as base64."),
                _query("output_oss", _FLAG, "Upload every output to object storage."),
                _query("output_format", {"enum": ["png", "jpeg", "jpg", "webp"]},
                       "Re-encode still images."),
                _query("quality", {"type": "integer", "minimum": 1, "maximum": 100},
                       "JPEG/WebP quality."),
                _query("variants", {"type": "integer", "minimum": 1},
                       "Run the graph this many times (fresh seeds) in one task; at most "
                       "COMFY_EMBED_MAX_VARIANTS (else 400). `extra_data.variants` may list "
                       "seeds instead."),
                _query("webhook", {"type": "string", "format": "uri"},
                       "Deliver the task's end (signed) to this URL."),
                _query("ttl", {"type": "integer", "minimum": 0},
                       "Delete the task this many seconds after it ends (at most the "
                       "server's COMFY_EMBED_MAX_TTL and retention period)."),
                _query("keep", {"enum": ["all", "nothing"]},
                       "`nothing`: delete inputs and outputs once the answer is delivered, "
                       "keeping only their hashes and sizes."),
                _query("webhook_events", {"type": "string"}, "Comma-separated events to deliver."),
                _query("app", {"type": "string"}, "Run this workflow app: the body is then its "
                       "parameters (`GET /api/apps`), as `POST /api/apps/{name}` takes them."),
                _query("replay", {"type": "string"}, "Run again the graph a finished task ran "
                       "(seeds included; the body is ignored): the answer's `data.replay` names "
                       "what differs in the environment (packs, models, ComfyUI, torch, "
                       "device). 400 when the task left no record."),
                _query("deadline", {"type": "string"}, "Finish by then: seconds from now, or "
                       "an RFC 3339 time; 429 `deadline_unmeetable` at once when the ETA says "
                       "it cannot (`X-Deadline` wins)."),
                _header("X-Deadline", "As `?deadline=`."),
                _header("X-Fc-Async-Task-Id", "Task id (first present of these four)."),
                _header("X-Fc-Trace-Id", "Task id."),
                _header("X-Task-Id", "Task id."),
                _header("X-Fc-Request-Id", "Task id."),
                _header("X-Fc-Invocation-Type", "`Async`: answer 202 at once."),
                _header("Last-Event-ID", "Resume a stream after this sequence number."),
            ],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref("Workflow")}}},
            "responses": {
                "200": _final("The task's final message (or its SSE stream).", True),
                "202": _json(_ref("Accepted"), "Async call accepted; poll `/status`."),
                **_RUN_ERRORS,
                "404": _final("`?app=` names no app (`app_not_found`).", True),
            },
        }},
        f"{p}/validate": {"post": {
            "summary": "Check a workflow without running it",
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref("Workflow")}}},
            "responses": {
                "200": _json(_ref("DryRun"), "The checks' outcome, valid or not."),
                "413": _json(_ref("DryRun"), "Body over the size limit."),
                "503": _json(_ref("DryRun"), "Not ready."),
            },
        }},
    }


def _task_paths(p: str) -> dict[str, Any]:
    """A task's events, its cancelling, its webhook, and the WebSocket."""
    return {
        f"{p}/status": {"get": {
            "summary": "Every event of a task so far",
            "description": "From any instance sharing the task log. Unknown task: `[]`.",
            "parameters": [_TASK_Q, _SINCE_Q],
            "responses": {"200": _json({"type": "array", "items": _ref("LoggedEvent")},
                                       "Events in order, the last one `serverless_api` once done."),
                          **_BAD_PARAM},
        }},
        f"{p}/cancel": {"post": {
            "summary": "Cancel a queued or running task",
            "parameters": [_TASK_Q],
            "responses": {
                "200": _json(_ref("CancelAnswer"), "Cancelling here."),
                "202": _json(_ref("CancelAnswer"), "Requested from the instance that runs it."),
                "404": _json(_ref("CancelAnswer"), "Unknown task."),
                "409": _json(_ref("CancelAnswer"), "Already done."),
                **_BAD_PARAM,
            },
        }},
        f"{p}/task": {"delete": {
            "summary": "Delete a task now",
            "description": "Cancels it if it runs, deletes its inputs, outputs (and uploads, "
                           "with COMFY_EMBED_DELETE_OBJECTS), webhook state and events; a "
                           "tombstone answers later status calls and retries (410).",
            "parameters": [_TASK_Q],
            "responses": {
                "200": _json(_ref("DeleteAnswer"), "Deleted (again: nothing more to do)."),
                "404": _json(_ref("DeleteAnswer"), "Unknown task, or another API key's."),
                "409": _final("Still running after its cancel: retry."),
                **_BAD_PARAM,
            },
        }},
        f"{p}/webhook": {"get": {
            "summary": "Webhook delivery state of a task",
            "parameters": [_TASK_Q],
            "responses": {
                "200": _json({"type": "object", "required": ["task_id", "state"], "properties": {
                    "task_id": {"type": "string"}, "state": {"type": "string"},
                    "attempts": {"type": "array"}}}, "Attempts, next try, outcome."),
                "404": _json({"type": "object", "required": ["task_id", "state"], "properties": {
                    "task_id": {"type": "string"}, "state": {"const": "none"}}},
                    "Unknown task or no webhook."),
                **_BAD_PARAM,
            },
        }},
        f"{p}/ws": {"get": {
            "summary": "WebSocket: runs and their events",
            "description": "Upgrade to a WebSocket (same query flags as `/run`). Send a "
                           "workflow as a text message; every event comes back as a text "
                           "message, the last `serverless_api`; repeat. `?task_id=&since=` "
                           "first replays a task. A plain HTTP GET is not an upgrade (404).",
            "parameters": [_query("task_id", _TASK_ID, "Replay this task first."), _SINCE_Q],
            "responses": {"101": {"description": "Switching to the WebSocket protocol."},
                          "404": {"description": "Not a WebSocket upgrade.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
    }


def _platform_paths() -> dict[str, Any]:
    """Health, Function Compute's lifecycle hooks and metrics."""
    health = _json(_ref("Status"), "As named in `status`.")
    # The hooks answer only the platform: FC's own calls, direct loopback, X-Admin-Key.
    forbidden = _final("Not the platform: Function Compute's own call (its role's "
                       "credentials), a direct loopback connection or `X-Admin-Key` "
                       "(`COMFY_EMBED_ADMIN_KEY`).")
    return {
        "/health": {"get": {"summary": "Alive", "responses": {
            "200": health, "503": _json(_ref("Status"), "`drained` by /pre-stop: the "
                                        "instance is ending.")}}},
        "/ready": {"get": {
            "summary": "Booted and warm",
            "description": "`queue_depth`: tasks queued plus running (also the `X-Queue-Depth` "
                           "header of every answer). `loaded_models`: the models loaded "
                           "here (also `X-Loaded-Models`), `kept_models`: "
                           "COMFY_EMBED_KEEP_LOADED's names. With COMFY_EMBED_LOCK, `lock`: its "
                           "`hash`, whether the instance `drifted` from it and the `drift` "
                           "(packs and models named); COMFY_EMBED_LOCK_DRIFT=unready answers "
                           "503 `drifted` then.",
            "responses": {"200": health, "500": _json(_ref("Status"), "Boot failed."),
                          "503": _json(_ref("Status"), "Starting, draining, or `unhealthy` "
                                       "(`reason`: the task-log or output folder is not "
                                       "writable).")}}},
        "/initialize": {"post": {"summary": "Function Compute: answers once warm",
                                 "responses": {"200": health}}},
        "/pre-stop": {k: {"summary": "Function Compute: drain (finish running work, accept "
                                     "none), then the server exits",
                          "responses": {"200": health, "403": forbidden}} for k in ("get", "post")},
        "/pre-freeze": {k: {"summary": "Function Compute: flush the task log",
                            "responses": {"200": health}}
                        for k in ("get", "post")},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "Text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }


def _page_paths() -> dict[str, Any]:
    """The playground, its files and examples, and this document."""
    html = {"description": "HTML.", "content": {"text/html": {"schema": {"type": "string"}}}}
    return {
        **{path: {"get": {"summary": "The playground page (try workflows in a browser)",
                          "responses": {"200": html}}} for path in ("/", "/playground")},
        "/playground/examples": {"get": {"summary": "The bundled example workflows",
                                         "responses": {"200": _json({
            "type": "object", "required": ["examples"], "properties": {"examples": {
                "type": "array", "items": {"type": "object", "required": ["name", "workflow"],
                "properties": {"name": {"type": "string"}, "workflow": {
                    "anyOf": [_ref("Workflow"), _ref("SavedWorkflow")]}}}}}},
            "`[{name, workflow}]`.")}}},
        "/static/{path}": {"get": {
            "summary": "The playground page's files",
            "parameters": [{"name": "path", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The file (HTML, CSS or JS).", "content": {
                "*/*": {"schema": {"type": "string"}}}},
                "404": {"description": "No such file.",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {
            "description": "OpenAPI 3.1.",
            "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        "/docs": {"get": {"summary": "This document as a page", "responses": {"200": html}}},
        "/docs/{name}": {"get": {
            "summary": "The docs page's script and style",
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "The file.", "content": {
                    "text/javascript": {"schema": {"type": "string"}},
                    "text/css": {"schema": {"type": "string"}}}},
                "404": {"description": "No such file.",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }


def document(version: str = __version__, apps: list[App] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a new dict each call); ``apps``: the
    workflow apps to describe one by one (their parameters' schemas)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "comfy-embed serverless API",
            "version": version,
            "description": "ComfyUI workflows run headless: queue, upload, watch, read history "
                           "and view merged into one call. Every answer carries "
                           "`X-Queue-Depth`.",
        },
        "paths": {**_paths(), **v2_openapi.paths(),  # + Comfy API v2 (api/v2/openapi.py)
                  **apps_api.openapi_paths(apps or []), **openai_api.openapi_paths()},
        "components": {"schemas": {**_SCHEMAS, **v2_openapi.schemas()}},
    }


async def openapi_json(request: Request) -> Response:
    try:  # the apps as the folder holds them now
        apps = apps_api.registry(request.app.state).all()
    except ComfyEmbedError:  # not booted yet: the generic app paths only
        apps = []
    return JSONResponse(document(apps=apps))


async def docs_page(request: Request) -> Response:
    return FileResponse(_DOCS / "docs.html", media_type="text/html")


async def docs_asset(request: Request) -> Response:
    name = request.path_params["name"]
    types = {"docs.js": "text/javascript", "docs.css": "text/css"}
    if name not in types:
        return Response("not found", 404, media_type="text/plain")
    return FileResponse(_DOCS / name, media_type=types[name])


def routes() -> list[Route]:
    """``/openapi.json``, ``/docs`` and the docs page's two assets."""
    return [Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/docs", docs_page, methods=["GET"]),
            Route("/docs/{name}", docs_asset, methods=["GET"])]
