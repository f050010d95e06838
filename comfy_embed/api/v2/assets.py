"""Comfy API v2 assets: POST /assets (multipart), POST /assets/from-hash,
HEAD /assets/by-hash/{hash}, GET and DELETE /assets/{id},
GET /assets/{id}/content (Range). A job's outputs are assets too: their ids
name the job and the output (service/jobview.py), and read through the job."""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from comfy_embed.api.auth import key_hash_of
from comfy_embed.api.body import read_limited
from comfy_embed.api.v2.errors import envelope, json_response, not_found
from comfy_embed.api.v2.jobs import URL_SECONDS, base_url, jobs_of, output_json
from comfy_embed.assets.store import AssetRecord, AssetStore, Hasher, parse_hash
from comfy_embed.errors import ComfyEmbedError, PayloadTooLarge, StorageError
from comfy_embed.events import loads
from comfy_embed.service.idempotency import IdempotencyStore, body_hash
from comfy_embed.service.jobs import ANONYMOUS, JobView
from comfy_embed.service.jobview import OutputRef, file_path, iso, parse_output_asset_id

log = logging.getLogger(__name__)

__all__ = ["by_hash", "content", "delete_asset", "from_hash", "get_asset", "upload"]

_MAX_TEXT_FIELD = 4096
#: A media type as it may go into a Content-Type header (ASCII, no controls).
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
                         r"(;[ -~]{0,120})?")


def _store(request: Request) -> AssetStore:
    return request.app.state.v2_assets


def _owner(request: Request) -> str:
    return key_hash_of(request.scope) or ANONYMOUS


def _asset_json(record: AssetRecord, base: str, created_new: bool | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": record.id, "hash": record.hash, "size_bytes": record.size_bytes,
        "content_type": record.content_type, "file_path": record.file_path,
        "created_at": iso(record.created_at),
        "url": f"{base}/api/v2/assets/{record.id}/content",
        "url_expires_at": iso(time.time() + URL_SECONDS), "tags": record.tags,
        "expires_at": None, "job_id": None}
    if created_new is not None:
        body["created_new"] = created_new
    return body


class _Limited:
    """A receive channel that refuses a body past ``limit`` bytes."""

    def __init__(self, request: Request, limit: int) -> None:
        self._receive, self.limit, self.size = request.receive, limit, 0

    async def __call__(self) -> Any:
        message = await self._receive()
        if message.get("type") == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                raise PayloadTooLarge(f"the upload is over the limit of {self.limit} bytes "
                                      f"(COMFY_EMBED_ASSET_MAX_BYTES)")
        return message


@dataclass
class _Upload:
    """An upload read and hashed (its bytes in a temporary blob file)."""

    hasher: Hasher
    digest: str
    content_type: str
    path: str | None
    tags: list[str]

    def fingerprint(self) -> str:
        """What makes a retry with the same Idempotency-Key the same upload."""
        return body_hash(json.dumps([self.digest, self.content_type, self.path,
                                     self.tags]).encode())


async def upload(request: Request) -> Response:
    """POST /assets: multipart upload, hashed here, stored once per content."""
    store = _store(request)
    limit = request.app.state.service.settings.v2.asset_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return envelope(413, "payload_too_large", f"the upload of {declared} bytes is over the "
                        f"limit of {limit} bytes (COMFY_EMBED_ASSET_MAX_BYTES)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return envelope(400, "invalid_request", "send the asset as multipart/form-data")
    limited = Request(request.scope, _Limited(request, limit))
    try:
        form = await limited.form(max_files=1, max_fields=64, max_part_size=_MAX_TEXT_FIELD)
    except PayloadTooLarge as e:
        return envelope(413, "payload_too_large", e.message)
    except (MultiPartException, HTTPException, ValueError) as e:
        # Starlette answers a parse error with an HTTPException of its own.
        why = e.detail if isinstance(e, HTTPException) else e
        return envelope(400, "invalid_request", f"malformed multipart body: {why}")
    hasher: Hasher | None = None
    try:
        read = await _read(form, store)
        if isinstance(read, Response):
            return read
        hasher = read.hasher
        key = request.headers.get("idempotency-key")
        if key is None:
            hasher = None  # _keep owns it now
            return await _keep(request, store, read)
        if not 0 < len(key) <= 255:
            return envelope(400, "invalid_request", "Idempotency-Key must be 1-255 characters")
        hasher = None
        return await _keep_once(request, store, read, key)
    finally:
        if hasher is not None:
            await anyio.to_thread.run_sync(hasher.discard)
        await form.close()


async def _read(form: Any, store: AssetStore) -> _Upload | Response:
    """The upload's fields checked and its bytes hashed into a temporary
    blob file; or the refusal (nothing kept)."""
    file = form.get("file")
    if not form:  # python-multipart drops a part cut short (no closing boundary)
        return envelope(400, "invalid_request", "malformed multipart body: no complete part")
    if not isinstance(file, UploadFile):
        return envelope(422, "invalid_request", "the 'file' part is missing", {"field": "file"})
    fields = {k: form.get(k) for k in ("content_type", "file_path", "expected_hash")}
    if any(v is not None and not isinstance(v, str) for v in fields.values()):
        return envelope(422, "invalid_request", "content_type, file_path and "
                        "expected_hash must be text fields")
    expected = fields["expected_hash"]
    want = parse_hash(expected) if isinstance(expected, str) and expected else None
    if expected and want is None:
        return envelope(422, "invalid_request", "expected_hash must be blake3:<64 hex>",
                        {"field": "expected_hash"})
    content_type = str(fields["content_type"] or file.content_type or "application/octet-stream")
    if not _MEDIA_TYPE.fullmatch(content_type):
        return envelope(422, "invalid_request", "content_type must be a media type such as "
                        "image/png", {"field": "content_type"})
    path = str(fields["file_path"] or file.filename or "")[:1024] or None
    tags = [t for t in form.getlist("tags") if isinstance(t, str)][:32]
    hasher = await anyio.to_thread.run_sync(Hasher, store)
    try:
        while chunk := await file.read(1 << 20):
            await anyio.to_thread.run_sync(hasher.write, chunk)
        digest = await anyio.to_thread.run_sync(hasher.close)
    except BaseException:
        await anyio.to_thread.run_sync(hasher.discard)
        raise
    if want is not None and want != digest:
        await anyio.to_thread.run_sync(hasher.discard)
        return envelope(409, "hash_mismatch", f"the bytes hash to blake3:{digest}, not "
                        f"{expected}; nothing was stored",
                        {"expected": expected, "computed": f"blake3:{digest}"})
    return _Upload(hasher, digest, content_type, path, tags)


async def _keep(request: Request, store: AssetStore, up: _Upload) -> Response:
    """Keep the bytes (once per content) and mint the caller's asset over them."""
    owner = _owner(request)
    # created_new says whether the caller had these bytes here before,
    # never whether someone else had (dedup is per blob, the answer per owner).
    try:
        known = await anyio.to_thread.run_sync(store.may_mint, owner, up.digest)
        await anyio.to_thread.run_sync(store.keep_blob, up.hasher, up.digest)
    except BaseException:
        await anyio.to_thread.run_sync(up.hasher.discard)
        raise
    try:
        record = await anyio.to_thread.run_sync(store.mint, owner, up.digest, up.hasher.size,
                                                up.content_type, up.path, up.tags)
    except FileNotFoundError:  # the last asset over these bytes was deleted meanwhile
        return envelope(503, "unavailable", "the upload raced a delete of the same "
                        "bytes; send it again", headers={"Retry-After": "1"})
    return json_response(_asset_json(record, base_url(request), not known),
                         200 if known else 201)


async def _keep_once(request: Request, store: AssetStore, up: _Upload, key: str) -> Response:
    """:func:`_keep` under an Idempotency-Key (Stripe's rules, as POST /jobs):
    the same upload again replays its answer, another is 422, one still
    being stored is 409."""
    jobs = jobs_of(request)
    keys: IdempotencyStore = request.app.state.v2_idempotency
    who, key, fingerprint = _owner(request), f"asset\x00{key}", up.fingerprint()
    found = await jobs.run_io(keys.begin, who, key, fingerprint)
    if found.kind != "new":
        await anyio.to_thread.run_sync(up.hasher.discard)
    if found.kind == "replay":
        return Response(found.body, found.status, media_type="application/json",
                        headers={"Idempotency-Replayed": "true"})
    if found.kind == "reuse":
        return envelope(422, "idempotency_key_reuse", "this Idempotency-Key was used with "
                        "another upload")
    if found.kind == "in_flight":
        return envelope(409, "idempotency_conflict", "an upload with this Idempotency-Key is "
                        "still in flight; retry", headers={"Retry-After": "1"})
    answer: Response | None = None
    try:
        answer = await _keep(request, store, up)
    finally:
        with anyio.CancelScope(shield=True):
            try:
                if answer is not None and answer.status_code in (200, 201):
                    await jobs.run_io(keys.finish, who, key, fingerprint, answer.status_code,
                                      bytes(answer.body), {})
                else:
                    await jobs.run_io(keys.abandon, who, key)
            except OSError as e:
                log.warning("Idempotency-Key record of an upload not written: %s", e)
    return answer


async def from_hash(request: Request) -> Response:
    """POST /assets/from-hash: a new asset over bytes the caller uploaded before."""
    try:
        raw = await read_limited(request, 64 * 1024)
        body = loads(raw)
    except (ComfyEmbedError, ValueError):
        return envelope(400, "invalid_request", "send a JSON object {\"hash\": \"blake3:...\"}")
    if not isinstance(body, dict) or not isinstance(body.get("hash"), str):
        return envelope(400, "invalid_request", "'hash' (blake3:<hex>) is required",
                        {"field": "hash"})
    digest = parse_hash(body["hash"])
    store, owner = _store(request), _owner(request)
    if digest is None or not await anyio.to_thread.run_sync(store.may_mint, owner, digest):
        return envelope(404, "blob_not_found", "no blob with that hash that you may use")
    path = body.get("file_path") if isinstance(body.get("file_path"), str) else None
    content_type = body.get("content_type") if isinstance(body.get("content_type"), str) else None
    if content_type is not None and not _MEDIA_TYPE.fullmatch(content_type):
        return envelope(400, "invalid_request", "content_type must be a media type such as "
                        "image/png", {"field": "content_type"})
    if content_type is None:
        content_type = mimetypes.guess_type(path or "")[0] or "application/octet-stream"
    tags = [t for t in body.get("tags") or () if isinstance(t, str)][:32]
    try:
        size = (await anyio.to_thread.run_sync(os.stat, store.blob_path(digest))).st_size
        record = await anyio.to_thread.run_sync(store.mint, owner, digest, size, content_type,
                                                path, tags)
    except FileNotFoundError:  # deleted since may_mint looked
        return envelope(404, "blob_not_found", "no blob with that hash that you may use")
    return json_response(_asset_json(record, base_url(request), False), 201)


async def by_hash(request: Request) -> Response:
    """HEAD /assets/by-hash/{hash}: 200 when the caller may mint from those bytes."""
    digest = parse_hash(request.path_params["hash"])
    if digest is None or not await anyio.to_thread.run_sync(
            _store(request).may_mint, _owner(request), digest):
        return Response(status_code=404)
    return Response(status_code=200)


async def _record(request: Request, asset_id: str) -> AssetRecord | None:
    record = await anyio.to_thread.run_sync(_store(request).get, asset_id)
    if record is None or record.owner != _owner(request):
        return None
    return record


async def _output(request: Request, asset_id: str) -> tuple[JobView, OutputRef] | None:
    """The job and output an output asset id names (None: not one, or not yours)."""
    parsed = parse_output_asset_id(asset_id)
    if parsed is None:
        return None
    job_id, node_id, index = parsed
    view = await jobs_of(request).get(job_id, key_hash_of(request.scope))
    if view is None:
        return None
    for ref in view.state.outputs:
        if ref.node_id == node_id and ref.index == index:
            return view, ref
    return None


async def get_asset(request: Request) -> Response:
    """GET /assets/{id}: an uploaded asset, or a job's output."""
    asset_id = request.path_params["id"]
    base = base_url(request)
    found = await _output(request, asset_id)
    if found is not None:
        view, ref = found
        out = output_json(ref, view.job_id, base, request.app.state.v2_folders)
        st = view.state
        return json_response({"id": asset_id, "hash": None, "size_bytes": out["size_bytes"],
                              "content_type": ref.content_type, "file_path": ref.name,
                              "created_at": iso(st.completed_at or st.started_at or
                                                view.record.created_at),
                              "url": out["url"], "url_expires_at": out["url_expires_at"],
                              "job_id": view.job_id, "expires_at": st.expires_at,
                              "tags": ["output"]})
    record = await _record(request, asset_id)
    if record is None:
        return not_found("asset")
    return json_response(_asset_json(record, base))


async def delete_asset(request: Request) -> Response:
    """DELETE /assets/{id}: 204 (the bytes go with the last asset over them)."""
    asset_id = request.path_params["id"]
    if await _record(request, asset_id) is None:
        return not_found("asset")
    await anyio.to_thread.run_sync(_store(request).delete, asset_id)
    return Response(status_code=204)


def _range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """``(start, end)`` inclusive of a single ``bytes=`` range; None: no
    (usable) range, the whole; False: not satisfiable."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return False
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return False
    return start, min(end, size - 1)


async def _file_chunks(path: str, start: int, length: int) -> AsyncIterator[bytes]:
    f = await anyio.open_file(path, "rb")
    try:
        await f.seek(start)
        while length > 0:
            chunk = await f.read(min(1 << 20, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk
    finally:
        await f.aclose()


def _serve(request: Request, path: str | None, data: bytes | None, content_type: str) -> Response:
    size = len(data) if data is not None else os.stat(path or "").st_size
    wanted = _range(request.headers.get("range"), size)
    headers = {"Accept-Ranges": "bytes"}
    if wanted is False:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    status, start, end = 200, 0, size - 1
    if isinstance(wanted, tuple):
        status, (start, end) = 206, wanted
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = max(0, end - start + 1)
    headers["Content-Length"] = str(length)
    if data is not None:
        return Response(data[start:start + length], status, headers=headers,
                        media_type=content_type)
    return StreamingResponse(_file_chunks(path or "", start, length), status, headers=headers,
                             media_type=content_type)


async def _signed(request: Request, ref: OutputRef) -> str | None:
    """A fresh signed URL of an uploaded output, else the one signed at upload."""
    remote = ref.remote or {}
    sign = getattr(request.app.state.engine.store(ref.store), "sign", None)
    if sign is not None and remote.get("bucket") and remote.get("object"):
        try:
            url = await sign(remote["bucket"], remote["object"])
        except StorageError as e:
            log.warning("signing a link to %s failed: %s", remote.get("object"), e)
        else:
            if isinstance(url, str):
                return url
    old = remote.get("url")
    return old if isinstance(old, str) else None


async def content(request: Request) -> Response:
    """GET /assets/{id}/content: the bytes (Range), or a 302 to object storage."""
    asset_id = request.path_params["id"]
    found = await _output(request, asset_id)
    if found is not None:
        view, ref = found
        if ref.text is not None:
            return _serve(request, None, ref.text, ref.content_type)
        if ref.remote:  # uploaded to object storage: send the client there
            url = await _signed(request, ref)
            if url is not None:
                return RedirectResponse(url, 302)
        path = file_path(ref, request.app.state.v2_folders, view.job_id)
        if path is None or not await anyio.to_thread.run_sync(path.is_file):
            return not_found("asset content")
        return _serve(request, str(path), None, ref.content_type)
    record = await _record(request, asset_id)
    if record is None:
        return not_found("asset")
    blob = _store(request).blob_path(record.digest)
    if not await anyio.to_thread.run_sync(blob.is_file):
        return not_found("asset content")
    return _serve(request, str(blob), None, record.content_type)
