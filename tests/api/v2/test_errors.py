"""Comfy API v2 refusals over real HTTP: each a clear 4xx in the spec's
envelope with its code, and the server goes on serving."""

from __future__ import annotations

import time
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import image_only, text_to_image
from tests.servers import Server

AUTH = {"Authorization": "Bearer err-key"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("e"), api_keys="err-key", max_queue=1)
    try:
        yield s.wait_ready(headers=AUTH)
    finally:
        s.stop()


def post(server: Server, body: Any, headers: dict[str, str] = AUTH, **kw: Any) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        kw["content"] = body
    else:
        kw["json"] = body
    return httpx.post(f"{server.url}/api/v2/jobs", headers=headers, timeout=60, **kw)


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    return error  # type: ignore[no-any-return]


def settle(server: Server) -> None:
    """Wait until no job of this server is queued or running."""
    deadline = time.monotonic() + 120
    while True:
        jobs = httpx.get(f"{server.url}/api/v2/jobs", params={"limit": 100},
                         headers=AUTH).json()["jobs"]
        if all(j["status"] not in {"queued", "running", "canceling"} for j in jobs):
            return
        assert time.monotonic() < deadline, [j["status"] for j in jobs]
        time.sleep(0.1)


def assert_serves(server: Server) -> None:
    r = post(server, {"workflow": image_only(batch=1)})
    assert r.status_code == 201, r.text


def test_unauthorized(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in [("POST", "/jobs"), ("GET", "/jobs"), ("GET", "/jobs/x"),
                             ("POST", "/assets"), ("HEAD", "/assets/by-hash/blake3:00")]:
            r = httpx.request(method, f"{server.url}/api/v2{path}", headers=headers)
            assert r.status_code == 401, (method, path)
            if method != "HEAD":
                assert r.json()["error"]["code"] == "unauthorized"


def test_invalid_workflow_names_node_and_input(server: Server) -> None:
    graph = image_only(batch=1)
    del graph["2"]["inputs"]["image"]
    error = error_of(post(server, {"workflow": graph}), 422, "invalid_workflow")
    rows = error["details"]["node_errors"]["2"]
    assert rows[0]["field"] == "image" and rows[0]["class_type"] == "ImageInvert"
    assert "2" in error["message"] and "image" in error["message"]
    unknown = {"workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}
    error = error_of(post(server, unknown), 422, "invalid_workflow")
    assert "NoSuchNode" in error["message"]
    assert_serves(server)


@pytest.mark.parametrize(("body", "status", "code", "says"), [
    ({"workflow": {"nodes": [], "links": [], "last_node_id": 0}}, 422, "workflow_format_ui",
     "UI-format"),
    (b"{not json", 400, "invalid_request", "JSON"),
    ([1, 2], 422, "invalid_request", "workflow"),
    ({"graph": {}}, 422, "invalid_workflow", "workflow"),
    ({"workflow": {"1": {}}, "webhook_url": "http://x"}, 422, "invalid_request", "webhook_url"),
    ({"workflow": {"1": {}}, "inputs": {}}, 422, "invalid_request", "inputs"),
    ({"workflow": {"1": {}}, "metadata": {"k": 1}}, 422, "metadata_invalid", "metadata"),
    ({"workflow": {"1": {}}, "metadata": {str(i): "v" for i in range(17)}}, 422,
     "metadata_invalid", "17"),
    ({"workflow": {"1": {}}, "extra_data": [1]}, 422, "invalid_request", "extra_data"),
])
def test_bad_bodies(server: Server, body: Any, status: int, code: str, says: str) -> None:
    error = error_of(post(server, body), status, code)
    assert says in error["message"]


def test_not_found_and_bad_parameters(server: Server) -> None:
    for path in ("/jobs/job_nope", "/jobs/job_nope/workflow", "/jobs/../etc",
                 "/assets/asset_nope", "/assets/asset_out.job_nope.33.0/content"):
        r = httpx.get(f"{server.url}/api/v2{path}", headers=AUTH)
        assert r.status_code == 404, path
    error_of(httpx.post(f"{server.url}/api/v2/jobs/job_nope/cancel", headers=AUTH), 404,
             "not_found")
    error_of(httpx.get(f"{server.url}/api/v2/jobs", params={"status": "bogus"}, headers=AUTH),
             400, "invalid_request")
    error_of(httpx.get(f"{server.url}/api/v2/jobs", params={"metadata": "x"}, headers=AUTH),
             400, "invalid_metadata_filter")
    error_of(post(server, {"workflow": image_only()}, headers={**AUTH, "Idempotency-Key": ""}),
             400, "invalid_request")


def test_queue_full_is_429_with_retry_after(server: Server) -> None:
    """max_queue=1: one running, one waiting, the next refused."""
    settle(server)  # the jobs of the tests before have left the queue
    ids = []
    try:
        for _ in range(2):
            r = post(server, {"workflow": text_to_image(steps=200, size=64)})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        # The first one leaves the queue when it starts running: wait for that.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = httpx.get(f"{server.url}/api/v2/jobs/{ids[0]}", headers=AUTH).json()
            if job["status"] == "running":
                break
            time.sleep(0.05)
        queued = httpx.get(f"{server.url}/api/v2/jobs/{ids[1]}", headers=AUTH).json()
        assert queued["status"] == "queued" and queued["queue_position"] == 1
        full = post(server, {"workflow": image_only(batch=1)})
        error_of(full, 429, "queue_full")
        assert int(full.headers["retry-after"]) >= 1
    finally:
        for job_id in ids:
            httpx.post(f"{server.url}/api/v2/jobs/{job_id}/cancel", headers=AUTH)
    for job_id in ids:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = httpx.get(f"{server.url}/api/v2/jobs/{job_id}", headers=AUTH).json()
            if job["status"] == "canceled":
                break
            time.sleep(0.05)
        assert job["status"] == "canceled"
    assert_serves(server)


def test_unknown_paths_and_methods_answer_the_envelope(server: Server) -> None:
    error_of(httpx.get(f"{server.url}/api/v2/nope", headers=AUTH), 404, "not_found")
    r = httpx.put(f"{server.url}/api/v2/jobs", headers=AUTH)
    error_of(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]
    # The FC API's answers stay as they were.
    assert httpx.get(f"{server.url}/nope", headers=AUTH).text == "Not Found"
