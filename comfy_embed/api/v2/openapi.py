"""Comfy API v2's part of the OpenAPI 3.1 document (api/openapi.py merges
it): paths and schemas as this server answers them, after the public spec
(Comfy-Org/comfy-api-proxy ``spec/openapi.yaml``) and what the official SDKs
send and read (list, workflow and deletes are the SDKs' additions)."""

from __future__ import annotations

from typing import Any

__all__ = ["paths", "schemas"]

_P = "/api/v2"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _json(name: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": _ref(name)}}}
    if headers:
        out["headers"] = headers
    return out


def _err(description: str, retry: bool = False) -> dict[str, Any]:
    return _json("V2Error", description,
                 {"Retry-After": {"schema": {"type": "integer"}}} if retry else None)


_DT = {"type": "string", "format": "date-time"}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_AUTH = {"401": _err("`unauthorized`: no or a wrong API key (when keys are configured).")}
_NOT_FOUND = {"404": _err("`not_found`: unknown, or another API key's (indistinguishable).")}


def schemas() -> dict[str, Any]:
    """The v2 component schemas (named V2*, beside the FC API's)."""
    status = {"type": "string", "enum": ["queued", "running", "succeeded", "canceling",
                                         "canceled", "failed", "expired"]}
    return {
        "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"},
                "details": _null({"type": "object"})}}}},
        "V2Progress": {"type": "object", "required": ["value", "nodes_done", "nodes_total"],
                       "properties": {
                           "value": {"type": "number", "minimum": 0, "maximum": 1},
                           "nodes_done": {"type": "integer"}, "nodes_total": {"type": "integer"},
                           "current_node": _null({"type": "string"}),
                           "current_node_class": _null({"type": "string"}),
                           "step": _null({"type": "integer"}), "steps": _null({"type": "integer"}),
                           "message": _null({"type": "string"}),
                           "variant": {"type": "integer", "description": "N variants "
                                       "(extra_data.variants): the one running; value is "
                                       "the whole job's"},
                           "variants": {"type": "integer"}}},
        "V2Output": {"type": "object", "required": [
            "node_id", "name", "type", "content_type", "size_bytes", "id", "hash", "url",
            "url_expires_at"], "properties": {
            "node_id": {"type": "string"}, "name": {"type": "string"},
            "type": {"type": "string", "enum": ["image", "video", "audio", "text", "file",
                                                "latent"]},
            "content_type": {"type": "string"}, "size_bytes": {"type": "integer"},
            "id": {"type": "string", "description": "An asset id: GET /api/v2/assets/{id}."},
            "hash": _null({"type": "string"}), "url": {"type": "string", "format": "uri"},
            "url_expires_at": _DT, "job_id": _null({"type": "string"})}},
        "V2Job": {"type": "object", "required": [
            "id", "status", "created_at", "started_at", "completed_at", "expires_at",
            "queue_position", "progress", "outputs", "error", "urls"], "properties": {
            "id": {"type": "string", "description": "The task id too (FC API /status)."},
            "status": status, "created_at": _DT, "started_at": _null(_DT),
            "completed_at": _null(_DT), "expires_at": _DT,
            "queue_position": _null({"type": "integer"}),
            "progress": _null(_ref("V2Progress")),
            "outputs": {"type": "array", "items": _ref("V2Output")},
            "error": _null({"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"},
                "node_id": _null({"type": "string"}), "class_type": _null({"type": "string"}),
                "traceback": _null({"type": "string"})}}),
            "metrics": {"type": "object", "additionalProperties": _null({"type": "integer"})},
            "urls": {"type": "object", "required": ["self", "events", "cancel"],
                     "properties": {k: {"type": "string"} for k in ("self", "events", "cancel")}},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "attempts": {"type": "array", "items": {"type": "object"}, "description":
                         "Only for a task run again after a lost attempt: every attempt "
                         "(attempt, status, error, finished_at), this one last."},
            "eta_start": _null({"type": "number", "description":
                                "Seconds from now until it should start (measured ETA; null: "
                                "unknown, ended, or run by another instance)."}),
            "eta_finish": _null({"type": "number", "description":
                                 "Seconds from now until it should finish (as eta_start)."})}},
        "V2JobList": {"type": "object", "required": ["jobs"], "properties": {
            "jobs": {"type": "array", "items": _ref("V2Job")},
            "next_cursor": _null({"type": "string"})}},
        "V2Asset": {"type": "object", "required": [
            "id", "hash", "size_bytes", "content_type", "created_at", "url", "url_expires_at"],
            "properties": {
                "id": {"type": "string"}, "hash": _null({"type": "string"}),
                "size_bytes": {"type": "integer"}, "content_type": {"type": "string"},
                "file_path": _null({"type": "string"}), "created_new": {"type": "boolean"},
                "created_at": _DT, "url": {"type": "string", "format": "uri"},
                "url_expires_at": _DT, "expires_at": _null(_DT),
                "job_id": _null({"type": "string"}),
                "tags": {"type": "array", "items": {"type": "string"}}}},
    }


def _deadline() -> list[dict[str, Any]]:
    """``X-Deadline`` and ``?deadline=`` (an extension, issue 28)."""
    text = ("Finish by then: seconds from now, or an RFC 3339 time (the header wins); "
            "429 `deadline_unmeetable` at once when the measured ETA says it cannot.")
    return [{"name": "X-Deadline", "in": "header", "required": False,
             "schema": {"type": "string"}, "description": text},
            {"name": "deadline", "in": "query", "required": False,
             "schema": {"type": "string"}, "description": text}]


def _job_paths() -> dict[str, Any]:
    idem = {"name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
    job = _json("V2Job", "The job.")
    return {
        f"{_P}/jobs": {
            "post": {"summary": "Submit an API-format workflow (Comfy API v2)",
                     "parameters": [idem, *_deadline()],
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "required": ["workflow"], "properties": {
                             "workflow": {"type": "object"},
                             "extra_data": {"type": "object"},
                             "metadata": {"type": "object",
                                          "additionalProperties": {"type": "string"}}}}}}},
                     "responses": {
                         "201": _json("V2Job", "Queued (or replayed: `Idempotency-Replayed`).",
                                      {"Idempotency-Replayed": {"schema": {"type": "string"}}}),
                         "400": _err("Not JSON, or a malformed parameter."),
                         **_AUTH,
                         "409": _err("`idempotency_conflict`: the first request with this key "
                                     "is still in flight.", retry=True),
                         "413": _err("`payload_too_large`."),
                         "422": _err("`invalid_workflow` (details.node_errors by node and "
                                     "input), `workflow_format_ui`, `missing_asset`, "
                                     "`metadata_invalid`, `idempotency_key_reuse`."),
                         "429": _err("`queue_full`, or `deadline_unmeetable` (the job cannot "
                                     "finish by its deadline; its ETA in details).", retry=True),
                         "502": _err("A model or input could not be fetched."),
                         "503": _err("Draining, or a folder is unusable.", retry=True)}},
            "get": {"summary": "List jobs, newest first",
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {
                            "type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                        {"name": "status", "in": "query", "schema": {"type": "string"},
                         "description": "Comma-separated statuses."},
                        {"name": "metadata", "in": "query", "style": "deepObject",
                         "explode": True, "schema": {"type": "object",
                                                     "additionalProperties": {"type": "string"}}}],
                    "responses": {"200": _json("V2JobList", "A page of jobs."),
                                  "400": _err("`invalid_cursor`, `invalid_metadata_filter`, "
                                              "a bad limit or status."), **_AUTH}}},
        f"{_P}/jobs/{{id}}": {
            "get": {"summary": "A job: status, progress, outputs (assets), error, metrics",
                    "parameters": [_ID], "responses": {"200": job, **_AUTH, **_NOT_FOUND}},
            "delete": {"summary": "Delete a job now (cancelled if running)", "parameters": [_ID],
                       "responses": {"204": {"description": "Deleted."}, **_AUTH, **_NOT_FOUND,
                                     "409": _err("`job_running`: it did not stop; retry.")}}},
        f"{_P}/jobs/{{id}}/events": {
            "get": {"summary": "Live events (SSE: status, progress, output, log), the current "
                               "snapshot first; ends after the terminal status",
                    "parameters": [_ID], "responses": {
                        "200": {"description": "`event:`/`data:` frames.",
                                "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        **_AUTH, **_NOT_FOUND}}},
        f"{_P}/jobs/{{id}}/cancel": {
            "post": {"summary": "Cancel (idempotent): canceling, then canceled",
                     "parameters": [_ID], "responses": {"200": job, **_AUTH, **_NOT_FOUND}}},
        f"{_P}/jobs/{{id}}/workflow": {
            "get": {"summary": "The workflow as submitted", "parameters": [_ID],
                    "responses": {"200": {"description": "`{workflow, format: api}`",
                                          "content": {"application/json": {"schema": {
                                              "type": "object", "required": ["workflow"]}}}},
                                  **_AUTH, **_NOT_FOUND}}},
    }


def _asset_paths() -> dict[str, Any]:
    asset = _json("V2Asset", "The asset.")
    # Served with the asset's own content type.
    binary = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
    return {
        f"{_P}/assets": {"post": {
            "summary": "Upload an asset (multipart; blake3 on the server; dedup by hash)",
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255}}],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["file"], "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "content_type": {"type": "string"}, "file_path": {"type": "string"},
                    "expected_hash": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}}}}}}},
            "responses": {"201": _json("V2Asset", "New bytes stored."),
                          "200": _json("V2Asset", "Bytes already here: a new asset over them."),
                          "400": _err("`invalid_request`: not multipart, or malformed."),
                          **_AUTH,
                          "409": _err("`hash_mismatch`: nothing stored; "
                                      "`idempotency_conflict`.", retry=True),
                          "413": _err("`payload_too_large` (COMFY_EMBED_ASSET_MAX_BYTES)."),
                          "422": _err("No `file` part, a bad `expected_hash`, "
                                      "`idempotency_key_reuse`."),
                          "503": _err("The same bytes were being deleted: send it again.",
                                      retry=True)}}},
        f"{_P}/assets/from-hash": {"post": {
            "summary": "A new asset over bytes this caller uploaded before",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["hash"], "properties": {
                    "hash": {"type": "string"}, "file_path": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}}}}}}},
            "responses": {"201": asset, "400": _err("Not JSON, or no `hash`."), **_AUTH,
                          "404": _err("`blob_not_found`.")}}},
        f"{_P}/assets/by-hash/{{hash}}": {"head": {
            "summary": "Whether this caller may mint from these bytes",
            "parameters": [{"name": "hash", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "Yes."}, "404": {"description": "No."},
                          "401": {"description": "No or a wrong API key."}}}},
        f"{_P}/assets/{{id}}": {
            "get": {"summary": "An asset (a job's output too)", "parameters": [_ID],
                    "responses": {"200": asset, **_AUTH, **_NOT_FOUND}},
            "delete": {"summary": "Delete an asset record", "parameters": [_ID],
                       "responses": {"204": {"description": "Deleted."}, **_AUTH,
                                     **_NOT_FOUND}}},
        f"{_P}/assets/{{id}}/content": {"get": {
            "summary": "The bytes (Range: 206, 416), or a 302 to object storage",
            "parameters": [_ID, {"name": "Range", "in": "header", "required": False,
                                 "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The bytes.", "content": binary},
                          "206": {"description": "The range asked.", "content": binary},
                          "302": {"description": "A signed object-storage URL.",
                                  "headers": {"Location": {"schema": {"type": "string"}}}},
                          "416": {"description": "Range not satisfiable."},
                          **_AUTH, **_NOT_FOUND}}},
    }


def paths() -> dict[str, Any]:
    """Every /api/v2 path."""
    return {**_job_paths(), **_asset_paths()}
