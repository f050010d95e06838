"""Comfy API v2 assets over real HTTP: uploads hashed with blake3 on the
server, dedup, from-hash / by-hash per owner, content with Range, delete,
refused uploads leaving nothing behind, and core/ASSET references run by
real ComfyUI; two instances sharing one folder, API keys on."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Iterator

import blake3
import httpx
import pytest
from PIL import Image

from tests.conftest import image_only
from tests.fakes.moto_s3 import serve_s3
from tests.servers import Server

KEY, OTHER_KEY = "asset-key-one", "asset-key-two"
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}
LIMIT = 200_000


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared")


def _server(base: Path, shared: Path) -> Server:
    # A fleet shares its output folder, with the task log (and so the assets) in it.
    return Server(base, api_keys=f"{KEY},{OTHER_KEY}", task_log_dir=shared / "output" / "log",
                  output_dir=shared / "output", asset_max_bytes=LIMIT)


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Iterator[Server]:
    s = _server(tmp_path_factory.mktemp("a"), shared)
    try:
        yield s.wait_ready(headers=AUTH)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory, shared: Path, a: Server) -> Iterator[Server]:
    s = _server(tmp_path_factory.mktemp("b"), shared)
    try:
        yield s.wait_ready(headers=AUTH)
    finally:
        s.stop()


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, "PNG")
    return out.getvalue()


def hash_of(data: bytes) -> str:
    return "blake3:" + blake3.blake3(data).hexdigest()


def upload(server: Server, data: bytes, headers: dict[str, str] = AUTH,
           **fields: str) -> httpx.Response:
    form = {"content_type": "image/png", "file_path": "photo.png", **fields}
    return httpx.post(f"{server.url}/api/v2/assets", data=form, headers=headers,
                      files={"file": ("photo.png", data, "image/png")}, timeout=30)


def blob_files(shared: Path) -> list[Path]:
    return [p for p in (shared / "output" / "log" / "@v2" / "assets" / "blobs").rglob("*") if p.is_file()]


def test_upload_dedup_and_hash_lookups(a: Server, b: Server) -> None:
    data = png((1, 2, int(time.time()) % 255))
    first = upload(a, data, expected_hash=hash_of(data))
    assert first.status_code == 201, first.text
    asset = first.json()
    assert asset["hash"] == hash_of(data) and asset["created_new"] is True
    assert asset["size_bytes"] == len(data) and asset["content_type"] == "image/png"
    assert asset["url"] == f"{a.url}/api/v2/assets/{asset['id']}/content"
    # The same bytes again, on the other instance: no new blob.
    again = upload(b, data)
    assert again.status_code == 200 and again.json()["created_new"] is False
    assert again.json()["hash"] == asset["hash"] and again.json()["id"] != asset["id"]
    # by-hash and from-hash: the owner's only, raw ':' or %3A alike.
    hexa = asset["hash"].split(":")[1]
    for path in (asset["hash"], f"blake3%3A{hexa}"):
        assert httpx.head(f"{b.url}/api/v2/assets/by-hash/{path}", headers=AUTH).status_code == 200
        assert httpx.head(f"{b.url}/api/v2/assets/by-hash/{path}",
                          headers=OTHER).status_code == 404
    minted = httpx.post(f"{b.url}/api/v2/assets/from-hash", headers=AUTH,
                        json={"hash": asset["hash"], "file_path": "again.png"})
    assert minted.status_code == 201 and minted.json()["created_new"] is False
    assert minted.json()["file_path"] == "again.png"
    refused = httpx.post(f"{a.url}/api/v2/assets/from-hash", headers=OTHER,
                         json={"hash": asset["hash"]})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "blob_not_found"
    unknown = httpx.head(f"{a.url}/api/v2/assets/by-hash/blake3:{'0' * 64}", headers=AUTH)
    assert unknown.status_code == 404



def test_created_new_does_not_reveal_another_owners_bytes(a: Server, shared: Path) -> None:
    data = png((3, 1, 4), size=24)
    assert upload(a, data).json()["created_new"] is True
    blobs = blob_files(shared)
    # Another key sending the same bytes learns nothing: new to it (stored once).
    theirs = upload(a, data, headers=OTHER)
    assert theirs.status_code == 201 and theirs.json()["created_new"] is True
    assert blob_files(shared) == blobs
    again = upload(a, data, headers=OTHER)
    assert again.status_code == 200 and again.json()["created_new"] is False


def test_get_content_range_and_delete(a: Server, b: Server) -> None:
    data = png((9, 8, 7), size=32)
    asset = upload(a, data).json()
    meta = httpx.get(f"{b.url}/api/v2/assets/{asset['id']}", headers=AUTH)
    assert meta.status_code == 200 and meta.json()["hash"] == hash_of(data)
    url = f"{b.url}/api/v2/assets/{asset['id']}/content"
    whole = httpx.get(url, headers=AUTH)
    assert whole.status_code == 200 and whole.content == data
    part = httpx.get(url, headers={**AUTH, "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
    tail = httpx.get(url, headers={**AUTH, "Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == data[-5:]
    past = httpx.get(url, headers={**AUTH, "Range": f"bytes={len(data) + 1}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
    assert httpx.get(url, headers=OTHER).status_code == 404
    assert httpx.delete(f"{a.url}/api/v2/assets/{asset['id']}", headers=OTHER).status_code == 404
    gone = httpx.delete(f"{a.url}/api/v2/assets/{asset['id']}", headers=AUTH)
    assert gone.status_code == 204 and gone.content == b""
    for server in (a, b):
        r = httpx.get(f"{server.url}/api/v2/assets/{asset['id']}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # Its bytes went with it (no other asset was over them).
    assert httpx.head(f"{a.url}/api/v2/assets/by-hash/{asset['hash']}",
                      headers=AUTH).status_code == 404
    again = httpx.delete(f"{a.url}/api/v2/assets/{asset['id']}", headers=AUTH)
    assert again.status_code == 404


def test_refused_uploads_leave_nothing(a: Server, shared: Path) -> None:
    before = blob_files(shared)
    data = png((200, 100, 50))
    wrong = upload(a, data, expected_hash=hash_of(b"something else"))
    assert wrong.status_code == 409, wrong.text
    assert wrong.json()["error"]["code"] == "hash_mismatch"
    assert httpx.head(f"{a.url}/api/v2/assets/by-hash/{hash_of(data)}",
                      headers=AUTH).status_code == 404
    huge = upload(a, b"\0" * (LIMIT + 10))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        for _ in range(LIMIT // 10_000 + 2):
            yield b"\0" * 10_000
        yield b"\r\n--b--\r\n"

    chunked = httpx.post(f"{a.url}/api/v2/assets", content=chunks(), headers={
        **AUTH, "Content-Type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413, chunked.text
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    broken = httpx.post(f"{a.url}/api/v2/assets", headers={
        **AUTH, "Content-Type": "multipart/form-data; boundary=xyz"},
        content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc")
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_request"
    for content_type, body in [("multipart/form-data", b"x"),
                               ("multipart/form-data; boundary=x", b"--x\r\nnot a part at all"),
                               ("application/json", b"hello")]:
        r = httpx.post(f"{a.url}/api/v2/assets", headers={**AUTH, "Content-Type": content_type},
                       content=body)
        assert r.status_code == 400, (content_type, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    no_hash = httpx.post(f"{a.url}/api/v2/assets/from-hash", headers=AUTH, json={})
    assert no_hash.status_code == 400 and no_hash.json()["error"]["code"] == "invalid_request"
    no_file = httpx.post(f"{a.url}/api/v2/assets", headers=AUTH,
                         data={"content_type": "image/png"}, files={"other": ("x", b"1")})
    assert no_file.status_code == 422 and "file" in no_file.json()["error"]["message"]
    bad_hash = upload(a, data, expected_hash="md5:abc")
    assert bad_hash.status_code == 422
    assert blob_files(shared) == before  # no blob, no temporary file left
    assert upload(a, data).status_code == 201  # and the server goes on serving


def _load_and_save(ref: Any) -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": ref}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                        "filename_prefix": "asset"}}}


def _ref(asset: dict[str, Any]) -> dict[str, Any]:
    return {"__type": "core/ASSET",
            "info": {"id": asset["id"], "hash": asset["hash"], "file_path": "photo.png"}}


def test_core_asset_reference_runs(a: Server, b: Server) -> None:
    asset = upload(a, png((255, 0, 0), size=8)).json()
    r = httpx.post(f"{b.url}/api/v2/jobs", headers=AUTH,
                   json={"workflow": _load_and_save(_ref(asset))}, timeout=60)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = httpx.get(f"{a.url}/api/v2/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in {"succeeded", "failed"}:
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    out = httpx.get(job["outputs"][0]["url"], headers=AUTH).content
    pixels = Image.open(io.BytesIO(out)).convert("RGB")
    assert pixels.size == (8, 8) and pixels.getpixel((0, 0)) == (0, 255, 255)  # inverted red
    # The workflow reads back as sent, reference included.
    wf = httpx.get(f"{a.url}/api/v2/jobs/{job_id}/workflow", headers=AUTH).json()
    assert wf["workflow"]["1"]["inputs"]["image"] == _ref(asset)


@pytest.mark.parametrize("case", ["unknown", "not_yours", "malformed", "deleted"])
def test_bad_core_asset_reference_is_missing_asset(a: Server, case: str) -> None:
    asset = upload(a, png((1, 1, 1))).json()
    ref: Any = _ref(asset)
    headers = AUTH
    if case == "unknown":
        ref["info"]["id"] = "asset_" + "0" * 32
    elif case == "not_yours":
        headers = OTHER
    elif case == "malformed":
        ref = {"__type": "core/ASSET", "info": {}}
    else:
        assert httpx.delete(f"{a.url}/api/v2/assets/{asset['id']}", headers=AUTH).status_code == 204
    r = httpx.post(f"{a.url}/api/v2/jobs", headers=headers,
                   json={"workflow": _load_and_save(ref)}, timeout=60)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "missing_asset"
    assert "node 1 (LoadImage) input 'image'" in error["message"]
    assert error["details"]["node_errors"]["1"][0]["field"] == "image"
    listed = httpx.get(f"{a.url}/api/v2/jobs", headers=headers).json()["jobs"]
    assert all(j["status"] != "queued" for j in listed)  # nothing was queued for it


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Outputs of v2 jobs uploaded to an S3 bucket (a local moto server)."""
    with serve_s3("v2-out", {}) as endpoint:
        s = Server(tmp_path_factory.mktemp("s3"), raw_env={
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true"}, storage="s3", s3_bucket="v2-out",
            s3_endpoint=endpoint, s3_region="us-east-1", s3_link_expire=300,
            v2_outputs_to_storage=1)
        try:
            yield s.wait_ready()
        finally:
            s.stop()


def test_output_in_object_storage_is_a_redirect(s3_server: Server) -> None:
    r = httpx.post(f"{s3_server.url}/api/v2/jobs", json={"workflow": image_only(batch=1)},
                   timeout=60)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = httpx.get(f"{s3_server.url}/api/v2/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed"}:
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    content = job["outputs"][0]["url"]
    first = httpx.get(content)
    assert first.status_code == 302
    location = first.headers["location"]
    assert "v2-out" in location and "Signature" in location  # a presigned S3 URL
    body = httpx.get(location).content
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and len(body) == job["outputs"][0]["size_bytes"]


def test_upload_idempotency_key(a: Server, b: Server) -> None:
    """A retried upload with its Idempotency-Key (the SDK sends one per
    asset) replays the first answer, on any instance; other bytes are 422."""
    key = f"upload-{time.time_ns()}"
    data = png((7, 7, 7), size=20)
    first = httpx.post(f"{a.url}/api/v2/assets", headers={**AUTH, "Idempotency-Key": key},
                       data={"content_type": "image/png", "file_path": "x.png"},
                       files={"file": ("x.png", data, "image/png")})
    assert first.status_code == 201, first.text
    again = httpx.post(f"{b.url}/api/v2/assets", headers={**AUTH, "Idempotency-Key": key},
                       data={"content_type": "image/png", "file_path": "x.png"},
                       files={"file": ("x.png", data, "image/png")})
    assert again.status_code == 201 and again.headers["idempotency-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = httpx.post(f"{b.url}/api/v2/assets", headers={**AUTH, "Idempotency-Key": key},
                       data={"content_type": "image/png", "file_path": "x.png"},
                       files={"file": ("x.png", png((8, 8, 8)), "image/png")})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reuse"
