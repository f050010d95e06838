"""OpenAI-compatible images: ``POST /v1/images/generations``, ``POST
/v1/images/edits`` (multipart ``image``, optional ``mask``), ``GET
/v1/models`` (the apps). ``model`` names an app; the app's ``openai``
mapping says which of its parameters take ``prompt``, ``n``, ``size``
(``[width, height]``), ``image``, ``mask`` and ``seed`` (an extension;
default: a parameter named ``seed``). Errors answer OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; API keys come as
``Authorization: Bearer`` as everywhere.

``response_format=url`` answers the signed link of each image uploaded to
the configured object storage (``COMFY_EMBED_STORAGE`` with a link
lifetime), else a ``data:`` URL of the image; ``b64_json`` (the default)
the base64 itself.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from comfy_embed.api.apps import registry
from comfy_embed.api.auth import key_hash_of
from comfy_embed.api.body import read_limited
from comfy_embed.api.errors import status_for, status_for_event
from comfy_embed.errors import ComfyEmbedError
from comfy_embed.prepare.apps import App
from comfy_embed.prepare.options import RunOptions
from comfy_embed.service.lifecycle import TaskService
from comfy_embed.storage import credentials_from_headers

__all__ = ["edits", "generations", "models"]

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_MAX_N = 10


class _OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = (
            message, status, param, code, type_)


def _answer(e: _OpenAIError) -> Response:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param,
                                   "code": e.code}}, e.status)


def _from(error: ComfyEmbedError, status: int | None = None) -> _OpenAIError:
    status = status or status_for(error)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _OpenAIError(error.message, status, None, error.type, kind)


def _app(request: Request, model: Any) -> App:
    if not isinstance(model, str) or not model:
        raise _OpenAIError("model is required: the name of an app (GET /v1/models)",
                           param="model", code="model_required")
    try:
        return registry(request.app.state).get(model)
    except ComfyEmbedError as e:
        raise _OpenAIError(f"The model '{model}' does not exist (GET /v1/models lists them): "
                           f"{e.message}", 404 if e.type == "app_not_found" else status_for(e),
                           "model", "model_not_found") from None


def _values(app: App, fields: dict[str, Any]) -> dict[str, Any]:
    """The app's parameters from OpenAI's fields, through its mapping."""
    m: dict[str, Any] = app.openai
    out: dict[str, Any] = {}

    def target(field: str, default: str | None = None) -> str | None:
        name = m.get(field, default)
        return name if isinstance(name, str) and name in app.parameters else None

    prompt = fields.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise _OpenAIError("prompt must be a string", param="prompt")
        if (p := target("prompt", "prompt")) is None:
            raise _OpenAIError(f"model '{app.name}' takes no prompt", param="prompt")
        out[p] = prompt
    n = fields.get("n")
    if n is not None:
        if isinstance(n, str) and n.isdigit():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_N:
            raise _OpenAIError(f"n must be an integer from 1 to {_MAX_N}", param="n")
        if (p := target("n")) is not None:
            out[p] = n
        elif n != 1:
            raise _OpenAIError(f"model '{app.name}' makes one image per call", param="n")
    size = fields.get("size")
    if size not in (None, "auto"):
        found = _SIZE.match(size) if isinstance(size, str) else None
        pair = m.get("size")
        if found is None:
            raise _OpenAIError("size must be WIDTHxHEIGHT, e.g. 512x512", param="size")
        if not (isinstance(pair, list) and len(pair) == 2 and all(x in app.parameters
                                                                    for x in pair)):
            raise _OpenAIError(f"model '{app.name}' takes no size", param="size")
        out[pair[0]], out[pair[1]] = int(found.group(1)), int(found.group(2))
    seed = fields.get("seed")
    if seed is not None:
        if isinstance(seed, str) and seed.lstrip("-").isdigit():
            seed = int(seed)
        if (p := target("seed", "seed")) is None:
            raise _OpenAIError(f"model '{app.name}' takes no seed", param="seed")
        out[p] = seed
    return out


async def _run(request: Request, app: App, values: dict[str, Any],
               response_format: Any) -> Response:
    if response_format not in (None, "b64_json", "url"):
        raise _OpenAIError("response_format must be b64_json or url", param="response_format")
    service: TaskService = request.app.state.service
    signed = response_format == "url" and _signs_links(service)
    options = RunOptions(output_base64=not signed, output_oss=signed,
                         credentials=credentials_from_headers(request.headers))
    try:
        graph = app.build(values)
        handle = await service.start(graph, options, owner_key=key_hash_of(request.scope))
        final = await handle.final()
    except ComfyEmbedError as e:
        raise _from(e) from None
    data = final.get("data") or {}
    if data.get("status") != "success":
        error = data.get("error") or {}
        raise _OpenAIError(str(error.get("message") or "the run failed"),
                           status_for_event(final), None, str(error.get("type") or ""),
                           "server_error" if status_for_event(final) >= 500
                           else "invalid_request_error")
    images = []
    for result in data.get("results") or []:
        output = result.get("output") or {}
        b64 = (output.get("base64") or {}).get("data")
        media_type = str(output.get("media_type") or "")
        if not media_type.startswith("image/"):
            continue  # OpenAI's answer holds images only
        if signed:  # the upload's signed link
            links = [v["url"] for v in output.values() if isinstance(v, dict) and v.get("url")]
            if links:
                images.append({"url": links[0]})
            continue
        if not b64:
            continue
        if response_format == "url":
            images.append({"url": f"data:{media_type};base64,{b64}"})
        else:
            images.append({"b64_json": b64})
    return JSONResponse({"created": int(time.time()), "data": images})


def _signs_links(service: TaskService) -> bool:
    """Whether object storage is configured to upload outputs and sign links
    for them (then ``response_format=url`` answers those links)."""
    st = service.settings.store
    if st.backend == "oss":
        return bool(st.oss_bucket and st.oss_link_expire)
    if st.backend == "s3":
        return bool(st.s3_bucket and st.s3_link_expire)
    return False


async def generations(request: Request) -> Response:
    """``POST /v1/images/generations`` (JSON body)."""
    try:
        try:
            body = await read_limited(request, request.app.state.service.settings.server
                                      .max_body_bytes)
            fields = json.loads(body or b"{}")
        except ComfyEmbedError as e:
            raise _from(e) from None
        except ValueError:
            raise _OpenAIError("the body must be JSON") from None
        if not isinstance(fields, dict):
            raise _OpenAIError("the body must be a JSON object")
        app = _app(request, fields.get("model"))
        return await _run(request, app, _values(app, fields), fields.get("response_format"))
    except _OpenAIError as e:
        return _answer(e)


async def _upload(form: Any, name: str, limit: int) -> str | None:
    item = form.get(name)
    if item is None:
        return None
    if not isinstance(item, UploadFile):
        raise _OpenAIError(f"{name} must be a file", param=name)
    raw = await item.read(limit + 1)
    if len(raw) > limit:
        raise _OpenAIError(f"{name} is over {limit} bytes", 413, name)
    return base64.b64encode(raw).decode("ascii")


async def edits(request: Request) -> Response:
    """``POST /v1/images/edits`` (multipart: ``image``, optional ``mask``)."""
    try:
        limit = request.app.state.service.settings.server.max_body_bytes
        try:
            form = await request.form(max_files=4, max_fields=32)
        except (HTTPException, MultiPartException, ValueError) as e:  # Starlette's own
            detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e)
            raise _OpenAIError(f"the body must be multipart/form-data: {detail}") from None
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        app = _app(request, fields.get("model"))
        values = _values(app, fields)
        for field in ("image", "mask"):
            data = await _upload(form, field, limit)
            if data is None:
                if field == "image" and form.get("image[]") is None:
                    raise _OpenAIError("image is required", param="image")
                continue
            target = app.openai.get(field, field)
            if target not in app.parameters:
                raise _OpenAIError(f"model '{app.name}' takes no {field}", param=field)
            values[target] = data
        return await _run(request, app, values, fields.get("response_format"))
    except _OpenAIError as e:
        return _answer(e)


async def models(request: Request) -> Response:
    """``GET /v1/models``: one model per app."""
    try:
        apps = registry(request.app.state).all()
    except ComfyEmbedError as e:
        return _answer(_from(e))
    return JSONResponse({"object": "list", "data": [
        {"id": a.name, "object": "model", "created": 0, "owned_by": "comfy-embed"}
        for a in apps]})


def openapi_paths() -> dict[str, Any]:
    """The OpenAI-compatible part of the OpenAPI document."""
    error = {"description": "OpenAI's error object.", "content": {"application/json": {
        "schema": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"]}}}}}}
    images = {"description": "The images.", "content": {"application/json": {"schema": {
        "type": "object", "required": ["created", "data"], "properties": {
            "created": {"type": "integer"},
            "data": {"type": "array", "items": {"type": "object", "properties": {
                "b64_json": {"type": "string"}, "url": {"type": "string"}}}}}}}}}
    fields = {"model": {"type": "string", "description": "An app's name (GET /v1/models)."},
              "prompt": {"type": "string"}, "n": {"type": "integer", "minimum": 1,
                                                  "maximum": _MAX_N},
              "size": {"type": "string", "description": "WIDTHxHEIGHT"},
              "response_format": {"enum": ["b64_json", "url"]},
              "seed": {"type": "integer", "description": "Extension: the app's seed."}}
    answers = {"200": images, "400": error, "401": error, "404": error, "413": error,
               "422": error, "429": error, "500": error, "503": error}
    return {
        "/v1/images/generations": {"post": {
            "summary": "OpenAI-compatible image generation (model = an app)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["model"], "properties": fields}}}},
            "responses": answers}},
        "/v1/images/edits": {"post": {
            "summary": "OpenAI-compatible image edit (multipart image, optional mask)",
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["model", "image"], "properties": {
                    **fields, "image": {"type": "string", "format": "binary"},
                    "mask": {"type": "string", "format": "binary"}}}}}},
            "responses": answers}},
        "/v1/models": {"get": {
            "summary": "The apps, as OpenAI models",
            "responses": {"200": {"description": "The models.", "content": {
                "application/json": {"schema": {"type": "object"}}}}, "503": error}}},
    }
