"""Comfy API v2 jobs: POST/GET /api/v2/jobs, GET and DELETE
/api/v2/jobs/{id}, POST /api/v2/jobs/{id}/cancel, GET /api/v2/jobs/{id}/workflow;
the job and output JSON the other v2 modules answer with too."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from comfy_embed import events
from comfy_embed.api.auth import key_hash_of
from comfy_embed.api.body import deadline_param, read_limited, whole_number
from comfy_embed.api.v2.errors import (
    V2Error,
    envelope,
    from_error,
    json_response,
    not_found,
)
from comfy_embed.errors import ComfyEmbedError
from comfy_embed.prepare.options import RunOptions
from comfy_embed.service.idempotency import IdempotencyStore, body_hash
from comfy_embed.service.jobs import ANONYMOUS, JobService, JobView, expires_at
from comfy_embed.service.jobview import OutputRef, file_path, iso, output_kind
from comfy_embed.webhooks.request import webhook_request

__all__ = [
    "base_url",
    "cancel_job",
    "create_job",
    "delete_job",
    "get_job",
    "job_json",
    "job_workflow",
    "jobs_of",
    "list_jobs",
    "output_json",
]

log = logging.getLogger(__name__)

#: Most labels one job may carry, and their sizes.
_MAX_LABELS, _MAX_LABEL_KEY, _MAX_LABEL_VALUE = 16, 64, 512
#: Body keys the spec reserves and refuses today.
_RESERVED = ("webhook_url", "inputs")
#: How long a content URL given in an answer is said to last.
URL_SECONDS = 3600


def jobs_of(request: Request) -> JobService:
    """The app's v2 job service (api/v2/__init__.py attaches it)."""
    return request.app.state.v2_jobs


def base_url(request: Request) -> str:
    """``scheme://host:port`` the client reached (SDKs need absolute URLs)."""
    return str(request.base_url).rstrip("/")


def output_json(ref: OutputRef, job_id: str, base: str, folders: dict[str, Any]) -> dict[str, Any]:
    """The spec's Output of one job output (an asset: its content URL is absolute)."""
    asset_id = ref.asset_id(job_id)
    if ref.text is not None:
        size = len(ref.text)
    else:
        try:
            path = file_path(ref, folders, job_id)
            size = path.stat().st_size if path is not None else 0
        except OSError:
            size = 0
    return {"node_id": ref.node_id, "name": ref.name,
            "type": output_kind(ref.content_type, ref.name),
            "content_type": ref.content_type, "size_bytes": size, "id": asset_id, "hash": None,
            "url": f"{base}/api/v2/assets/{asset_id}/content",
            "url_expires_at": iso(time.time() + URL_SECONDS), "job_id": job_id}


def job_json(view: JobView, base: str, request: Request) -> dict[str, Any]:
    """The spec's Job (plus the SDKs' ``metadata``)."""
    st, job_id = view.state, view.job_id
    settings = request.app.state.service.settings
    folders = request.app.state.v2_folders
    path = f"/api/v2/jobs/{job_id}"
    created = st.created_at or view.record.created_at
    if st.started_at is not None:
        created = min(created, st.started_at)
    return {
        "id": job_id, "status": st.status, "created_at": iso(created),
        "started_at": iso(st.started_at), "completed_at": iso(st.completed_at),
        # The final's own (issue 29: the task's ttl or the retention), else an estimate.
        "expires_at": st.expires_at or iso(expires_at(settings.tasklog.retention_hours,
                                                      st.completed_at, view.record.created_at)),
        "queue_position": st.queue_position, "progress": st.progress,
        "outputs": [output_json(o, job_id, base, folders) for o in st.outputs],
        "error": st.error, "metrics": st.metrics,
        # Run again after a lost attempt (issue 24): each attempt, this one last.
        **({"attempts": st.attempts} if st.attempts else {}),
        # Position and ETA while it waits or runs here (issue 28; an extension).
        **_eta(request, job_id, st.terminal),
        "urls": {"self": path, "events": f"{path}/events", "cancel": f"{path}/cancel"},
        "metadata": view.record.metadata,
    }


def _eta(request: Request, job_id: str, terminal: bool) -> dict[str, Any]:
    """``eta_start``/``eta_finish``: seconds from now, while the job is live on
    this instance and not ended (None each: unknown, or run elsewhere)."""
    task = None if terminal else request.app.state.engine.get(job_id)
    forecast = task.forecast() if task is not None and task.forecast is not None else None
    return {"eta_start": None, "eta_finish": None} if forecast is None else forecast.fields()


#: The extension header that lets POST /jobs take a saved (editor, UI-format)
#: workflow, converted on the server as the FC API converts it (issue 26).
#: Without it the spec's 422 workflow_format_ui stands.
UI_FORMAT_HEADER = "x-workflow-format"


def _check_body(parsed: Any, accept_ui: bool = False,
                ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, str]]:
    """``(workflow, extra_data, metadata)`` of a POST /jobs body, or V2Error."""
    if not isinstance(parsed, dict):
        raise V2Error(422, "invalid_request", "the body must be a JSON object with 'workflow'")
    for key in _RESERVED:
        if key in parsed:
            raise V2Error(422, "invalid_request", f"'{key}' is reserved and not supported yet",
                          {"field": key})
    workflow = parsed.get("workflow")
    if not isinstance(workflow, dict) or not workflow:
        raise V2Error(422, "invalid_workflow", "'workflow' must be a non-empty JSON object "
                      "(an API-format graph)", {"field": "workflow"})
    if isinstance(workflow.get("nodes"), list) and "links" in workflow and not accept_ui:
        raise V2Error(422, "workflow_format_ui", "this is a UI-format workflow (nodes/links): "
                      "export it with 'Export (API)' and send that graph, or send it as it "
                      f"is with the header '{UI_FORMAT_HEADER}: ui' (an extension)")
    extra = parsed.get("extra_data")
    if extra is not None and not isinstance(extra, dict):
        raise V2Error(422, "invalid_request", "'extra_data' must be an object",
                      {"field": "extra_data"})
    return workflow, extra or None, _labels(parsed.get("metadata"))


def _labels(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise V2Error(422, "metadata_invalid", "'metadata' must be an object of strings")
    if len(raw) > _MAX_LABELS:
        raise V2Error(422, "metadata_invalid",
                      f"'metadata' has {len(raw)} labels; at most {_MAX_LABELS}")
    for k, v in raw.items():
        if not (isinstance(k, str) and 0 < len(k) <= _MAX_LABEL_KEY):
            raise V2Error(422, "metadata_invalid", f"metadata key {str(k)[:80]!r} must be "
                          f"1-{_MAX_LABEL_KEY} characters", {"key": str(k)[:80]})
        if not (isinstance(v, str) and len(v) <= _MAX_LABEL_VALUE):
            raise V2Error(422, "metadata_invalid", f"metadata[{k!r}] must be a string of at "
                          f"most {_MAX_LABEL_VALUE} characters", {"key": k})
    return dict(raw)


def _fingerprint(raw: bytes) -> str:
    """What makes two submissions "the same request" for an Idempotency-Key:
    the body without ``extra_data`` (it carries partner keys, which nothing
    stored may be derived from; newer Comfy specs exclude it too)."""
    if b'"extra_data"' not in raw:  # the common case: no second parse
        return body_hash(raw)
    try:
        parsed = events.loads(raw)
    except ValueError:
        return body_hash(raw)
    if isinstance(parsed, dict) and "extra_data" in parsed:
        parsed = {k: v for k, v in parsed.items() if k != "extra_data"}
        return body_hash(b"v2:" + events.dumps_bytes(parsed))
    return body_hash(raw)


async def create_job(request: Request) -> Response:
    """POST /jobs: validate and queue (201), under an optional Idempotency-Key."""
    jobs = jobs_of(request)
    settings = jobs.tasks.settings
    owner = key_hash_of(request.scope)
    try:
        raw = await read_limited(request, settings.server.max_body_bytes)
    except ComfyEmbedError as e:
        return from_error(e)
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= 255:
        return envelope(400, "invalid_request", "Idempotency-Key must be 1-255 characters")
    if key is None:
        return await _create(request, jobs, raw, owner)
    store: IdempotencyStore = request.app.state.v2_idempotency
    jobs.housekeeping(store)
    who, fingerprint = owner or ANONYMOUS, _fingerprint(raw)
    found = await jobs.run_io(store.begin, who, key, fingerprint)
    if found.kind == "replay":
        return Response(found.body, found.status, media_type="application/json",
                        headers={**(found.headers or {}), "Idempotency-Replayed": "true"})
    if found.kind == "reuse":
        return envelope(422, "idempotency_key_reuse", "this Idempotency-Key was used with "
                        "another request body")
    if found.kind == "in_flight":
        return envelope(409, "idempotency_conflict", "a request with this Idempotency-Key is "
                        "still in flight; retry", headers={"Retry-After": "1"})
    answer: Response | None = None
    try:
        answer = await _create(request, jobs, raw, owner)
    finally:
        with anyio.CancelScope(shield=True):
            await _record_answer(jobs, store, who, key, fingerprint, answer)
    return answer


async def _record_answer(jobs: JobService, store: IdempotencyStore, who: str, key: str,
                         fingerprint: str, answer: Response | None) -> None:
    """Keep a 201 to replay; forget the key after anything else (a refused
    request records nothing: a corrected retry with the same key runs)."""
    try:
        if answer is not None and answer.status_code == 201:
            await jobs.run_io(store.finish, who, key, fingerprint, 201, bytes(answer.body),
                              {"Location": answer.headers.get("location", "")})
        else:
            await jobs.run_io(store.abandon, who, key)
    except OSError as e:  # the job stands; a retry then finds the key pending, then stale
        log.warning("Idempotency-Key record not written: %s", e)


async def _create(request: Request, jobs: JobService, raw: bytes,
                  owner: str | None) -> Response:
    try:
        parsed = events.loads(raw)
    except ValueError:
        return envelope(400, "invalid_request", "the body is not JSON")
    try:
        accept_ui = request.headers.get(UI_FORMAT_HEADER, "").strip().lower() == "ui"
        workflow, extra, labels = _check_body(parsed, accept_ui)
        # Webhooks as for FC tasks: extra_data.webhook, else COMFY_EMBED_WEBHOOK_URL.
        hook_url = (extra or {}).get("webhook")
        hook = webhook_request({}, hook_url if isinstance(hook_url, str) else None,
                               jobs.tasks.settings)
        view = await jobs.submit(workflow, extra_data=extra, metadata=labels, owner_key=owner,
                                 webhook=hook,
                                 options=RunOptions(
                                     output_oss=jobs.tasks.settings.v2.v2_outputs_to_storage,
                                     asset_owner=owner or ANONYMOUS,
                                     deadline=deadline_param(request.query_params,
                                                             request.headers)))
    except V2Error as e:
        return e.response()
    except ComfyEmbedError as e:
        return from_error(e)
    body = job_json(view, base_url(request), request)
    return json_response(body, 201, {"Location": body["urls"]["self"]})


async def get_job(request: Request) -> Response:
    """GET /jobs/{id}: the job as it stands, from memory or the shared log."""
    view = await jobs_of(request).get(request.path_params["id"], key_hash_of(request.scope))
    if view is None:
        return not_found()
    return json_response(job_json(view, base_url(request), request))


async def cancel_job(request: Request) -> Response:
    """POST /jobs/{id}/cancel: idempotent; the job (canceling, or terminal)."""
    view = await jobs_of(request).cancel(request.path_params["id"], key_hash_of(request.scope))
    if view is None:
        return not_found()
    return json_response(job_json(view, base_url(request), request))


async def delete_job(request: Request) -> Response:
    """DELETE /api/v2/jobs/{id} (an extension, as DELETE /api/serverless/task):
    cancelled if it runs, its inputs, outputs and events deleted; 204."""
    try:
        done = await jobs_of(request).delete(request.path_params["id"],
                                             key_hash_of(request.scope))
    except ComfyEmbedError as e:
        return from_error(e)
    return Response(status_code=204) if done else not_found()


async def job_workflow(request: Request) -> Response:
    """GET /jobs/{id}/workflow: the graph as submitted."""
    graph = await jobs_of(request).workflow(request.path_params["id"],
                                            key_hash_of(request.scope))
    if graph is None:
        return not_found()
    return json_response({"workflow": graph, "format": "api"})


def _filters(request: Request) -> tuple[dict[str, str], set[str]]:
    labels: dict[str, str] = {}
    for k, v in request.query_params.multi_items():
        if k.startswith("metadata[") and k.endswith("]"):
            name = k[len("metadata["):-1]
            if not name or len(name) > _MAX_LABEL_KEY:
                raise V2Error(400, "invalid_metadata_filter", f"bad metadata filter {k[:80]!r}")
            labels[name] = v
        elif k.startswith("metadata"):
            raise V2Error(400, "invalid_metadata_filter",
                          f"filter labels as metadata[<key>]=<value>; got {k[:80]!r}")
    statuses = {s for raw in request.query_params.getlist("status") for s in raw.split(",") if s}
    known = {"queued", "running", "succeeded", "canceling", "canceled", "failed", "expired"}
    if statuses - known:
        raise V2Error(400, "invalid_request", f"unknown status {min(statuses - known)!r}")
    return labels, statuses


async def list_jobs(request: Request) -> Response:
    """GET /jobs: the caller's jobs, newest first, by pages."""
    jobs = jobs_of(request)
    try:
        limit = whole_number("limit", request.query_params.get("limit"), low=1, high=100,
                             default=20) or 20
        labels, statuses = _filters(request)
        found, cursor = await jobs.page(key_hash_of(request.scope), limit=limit,
                                        cursor=request.query_params.get("cursor") or None,
                                        metadata=labels, statuses=statuses)
    except V2Error as e:
        return e.response()
    except ComfyEmbedError as e:
        return from_error(e)
    base = base_url(request)
    items = []
    for view in found:
        item = job_json(view, base, request)
        item["create_time"] = item["created_at"]
        item["update_time"] = item["completed_at"] or item["started_at"] or item["created_at"]
        item["deployment_id"] = None
        items.append(item)
    return json_response({"jobs": items, "next_cursor": cursor})
