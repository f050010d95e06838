"""Workflow apps over HTTP: ``GET /api/apps``, ``GET /api/apps/{name}``,
``POST /api/apps/{name}`` (answers exactly as ``POST /api/serverless/run``:
sync, ``?stream=1``, async, ``?webhook=``), and ``?app=`` on the FC run and
the WebSocket (each message is then the app's parameters).

The apps themselves (files, parameters, schemas) are ``prepare.apps``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from comfy_embed.api.errors import status_for
from comfy_embed.errors import ComfyEmbedError, InvalidParameter
from comfy_embed.prepare.apps import App, AppRegistry
from comfy_embed.service.lifecycle import TaskService

__all__ = ["app_graph", "describe", "get_app", "list_apps", "registry"]


def registry(state: Any) -> AppRegistry:
    """The app's one registry (made on first use: it needs booted ComfyUI's
    node definitions; NotAccepting before)."""
    found = getattr(state, "apps", None)
    if found is None:
        service: TaskService = state.service
        found = AppRegistry(service.settings.apps_path, service.engine.comfy)
        state.apps = found
    return found


def app_graph(state: Any, name: str, body: Any) -> dict[str, Any]:
    """The API-format graph of a call of app ``name`` with ``body`` (its
    parameters as JSON, bytes or decoded); 404 unknown app, 400 naming a bad
    parameter."""
    if isinstance(body, (bytes, bytearray, str)):
        text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
        try:
            body = json.loads(text) if text.strip() else {}
        except (ValueError, RecursionError) as e:
            raise InvalidParameter(f"app '{name}': the body must be a JSON object of "
                                   f"parameters ({e})") from None
    return registry(state).get(name).build(body)


def describe(app: App) -> dict[str, Any]:
    """An app as ``GET /api/apps`` lists it."""
    return {"name": app.name, "description": app.description, "schema": app.schema(),
            "openai": app.openai, "url": f"/api/apps/{app.name}"}


def _error(e: ComfyEmbedError) -> Response:
    return JSONResponse({"error": e.to_dict()}, status_for(e))


async def list_apps(request: Request) -> Response:
    try:
        apps = registry(request.app.state).all()
    except ComfyEmbedError as e:
        return _error(e)
    return JSONResponse({"apps": [describe(a) for a in apps]})


async def get_app(request: Request) -> Response:
    try:
        app = registry(request.app.state).get(request.path_params["name"])
    except ComfyEmbedError as e:
        return _error(e)
    return JSONResponse(describe(app))


def openapi_paths(apps: list[App]) -> dict[str, Any]:
    """The apps' part of the OpenAPI document: the list, the generic call,
    and one path per app whose request body is that app's own schema (the
    document is built per request, so it follows the apps folder)."""
    error = {"description": "An error (`{\"error\": {...}}`).",
             "content": {"application/json": {"schema": {"type": "object"}}}}
    final = {"description": "The task's final `serverless_api` message (or its SSE stream), "
                            "as `/api/serverless/run` answers.",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/"
                                                                 "FinalEvent"}},
                         "text/event-stream": {"schema": {"type": "string"}}}}
    flags = [{"name": n, "in": "query", "required": False, "schema": {"type": "string"},
              "description": d} for n, d in (
        ("stream", "Stream progress as server-sent events."),
        ("output_base64", "Inline every output as base64."),
        ("webhook", "Deliver the task's end (signed) to this URL."))]
    call: dict[str, Any] = {
        "summary": "Run an app with its named parameters (answers as /api/serverless/run)",
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string"}}, *flags],
        "requestBody": {"required": False, "content": {"application/json": {
            "schema": {"type": "object"}}}},
        # Refusals are final messages too (SSE with ?stream=1), as on the FC run.
        "responses": {"200": final, "202": {"description": "Async call accepted."},
                      **{code: {**final, "description": "Refused (the message says why)."}
                         for code in ("400", "404", "409", "413", "422", "429", "500", "503")}}}
    paths: dict[str, Any] = {
        "/api/apps": {"get": {"summary": "The workflow apps, each with its parameters' "
                                         "JSON Schema",
                              "responses": {"200": {"description": "The apps.", "content": {
                                  "application/json": {"schema": {"type": "object"}}}},
                                  "503": error}}},
        "/api/apps/{name}": {
            "get": {"summary": "One app", "parameters": call["parameters"][:1],
                    "responses": {"200": {"description": "The app.", "content": {
                        "application/json": {"schema": {"type": "object"}}}},
                        "404": error, "503": error}},
            "post": call},
    }
    for app in apps:
        one = {**call, "summary": app.description or f"Run app {app.name}",
               "operationId": f"app_{re.sub(r'[^A-Za-z0-9_]', '_', app.name)}",
               "parameters": flags,
               "requestBody": {"required": bool(app.schema()["required"]),
                               "content": {"application/json": {"schema": app.schema()}}}}
        paths[f"/api/apps/{app.name}"] = {"post": one}
    return paths
