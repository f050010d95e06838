"""Comfy API v2 jobs over real HTTP: real uvicorn servers, real ComfyUI (CPU),
two instances sharing one task log folder, API keys on."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import image_only, text_to_image
from tests.fakes.webhook_receiver import SECRET, Receiver, serve_receiver
from tests.servers import Server

KEY, OTHER_KEY = "key-one", "key-two"
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}
TERMINAL = {"succeeded", "failed", "canceled", "expired"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared")


def _server(base: Path, shared: Path) -> Server:
    # One output folder for both: the task log lies in it, as a fleet shares /data.
    return Server(base, api_keys=f"{KEY},{OTHER_KEY}", task_log_dir=shared / "output" / "log",
                  output_dir=shared / "output", lease_seconds=3, url_allowlist="127.0.0.1",
                  webhook_secret=SECRET)


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


def submit(server: Server, workflow: dict[str, Any], **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/api/v2/jobs", json={"workflow": workflow, **body},
                   headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def wait(server: Server, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Poll GET /jobs/{id} until terminal, as the SDK's wait() does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{server.url}/api/v2/jobs/{job_id}", headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        if r.json()["status"] in TERMINAL:
            return r.json()
        time.sleep(0.1)
    raise TimeoutError(job_id)


def sse(server: Server, job_id: str, headers: dict[str, str] = AUTH,
        on_frame: Any = None) -> list[tuple[str, dict[str, Any]]]:
    """Every ``(event, data)`` frame until the stream ends."""
    frames: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{server.url}/api/v2/jobs/{job_id}/events", headers=headers,
                      timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                assert name is not None, "a data line without its event line"
                frames.append((name, json.loads(line[6:])))
                if on_frame is not None:
                    on_frame(frames)
    return frames


def test_submit_poll_and_outputs(a: Server) -> None:
    job = submit(a, image_only(batch=2, color=0x102030), metadata={"app": "t1"})
    assert job["id"].startswith("job_") and job["status"] in {"queued", "running", "succeeded"}
    assert job["urls"] == {"self": f"/api/v2/jobs/{job['id']}",
                           "events": f"/api/v2/jobs/{job['id']}/events",
                           "cancel": f"/api/v2/jobs/{job['id']}/cancel"}
    done = wait(a, job["id"])
    assert done["status"] == "succeeded" and done["error"] is None
    assert done["metadata"] == {"app": "t1"}
    for key in ("created_at", "started_at", "completed_at", "expires_at"):
        assert done[key].endswith("Z"), key  # zone-aware, as the SDK requires
    assert done["progress"]["value"] == 1.0 and done["progress"]["nodes_total"] == 3
    assert set(done["metrics"]) >= {"queue_ms", "execution_ms"}
    assert all(isinstance(v, int) for v in done["metrics"].values())
    outputs = done["outputs"]
    assert [(o["node_id"], o["type"], o["content_type"]) for o in outputs] == \
        [("3", "image", "image/png")] * 2
    # Each output is an asset: absolute URL, its bytes those of the saved file.
    status = httpx.get(f"{a.url}/api/serverless/status", params={"task_id": done["id"]},
                       headers=AUTH).json()
    results = status[-1]["data"]["results"]  # one id space: the FC API reads the job
    for out, res in zip(outputs, results, strict=True):
        assert out["url"].startswith(a.url + "/api/v2/assets/")
        body = httpx.get(out["url"], headers=AUTH).content
        assert body == a.file_of(res["output"]["comfy"]).read_bytes()
        assert out["size_bytes"] == len(body) and body[:8] == b"\x89PNG\r\n\x1a\n"
        meta = httpx.get(f"{a.url}/api/v2/assets/{out['id']}", headers=AUTH).json()
        assert meta["size_bytes"] == len(body) and meta["job_id"] == done["id"]


def test_job_is_an_fc_task(a: Server) -> None:
    """The FC API's task id and the v2 job id are one string."""
    job = submit(a, image_only(batch=1))
    wait(a, job["id"])
    events = httpx.get(f"{a.url}/api/serverless/status", params={"task_id": job["id"]},
                       headers=AUTH).json()
    assert events[-1]["type"] == "serverless_api"
    assert events[-1]["data"]["task_id"] == job["id"]


def test_other_instance_answers(a: Server, b: Server) -> None:
    """Submitted on A: polled, streamed, its workflow and outputs read on B."""
    graph = image_only(batch=1, color=0x445566)
    job = submit(a, graph, metadata={"where": "a"})
    done = wait(b, job["id"])
    assert done["status"] == "succeeded"
    frames = sse(b, job["id"])
    # A finished job's snapshot: its progress and outputs, its terminal status last.
    assert frames[-1] == ("status", {"status": "succeeded", "queue_position": None})
    assert [n for n, _ in frames] == ["progress", "output", "status"]
    wf = httpx.get(f"{b.url}/api/v2/jobs/{job['id']}/workflow", headers=AUTH).json()
    assert wf == {"workflow": graph, "format": "api"}
    out = done["outputs"][0]
    assert out["url"].startswith(b.url)
    body = httpx.get(out["url"], headers=AUTH).content
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    ranged = httpx.get(out["url"], headers={**AUTH, "Range": "bytes=1-3"})
    assert ranged.status_code == 206 and ranged.content == body[1:4]
    assert ranged.headers["content-range"] == f"bytes 1-3/{len(body)}"
    bad = httpx.get(out["url"], headers={**AUTH, "Range": f"bytes={len(body)}-"})
    assert bad.status_code == 416


def test_another_key_sees_nothing(a: Server) -> None:
    job = submit(a, image_only(batch=1))
    done = wait(a, job["id"])
    base = f"{a.url}/api/v2/jobs/{job['id']}"
    for method, url in [("GET", base), ("POST", base + "/cancel"), ("GET", base + "/workflow"),
                        ("GET", base + "/events"),
                        ("GET", done["outputs"][0]["url"]),
                        ("GET", f"{a.url}/api/v2/assets/{done['outputs'][0]['id']}")]:
        r = httpx.request(method, url, headers=OTHER)
        assert r.status_code == 404, (method, url, r.text)
        assert r.json()["error"]["code"] == "not_found"
    unknown = httpx.get(f"{a.url}/api/v2/jobs/job_doesnotexist", headers=AUTH)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    listed = httpx.get(f"{a.url}/api/v2/jobs", headers=OTHER).json()
    assert job["id"] not in [j["id"] for j in listed["jobs"]]


def test_list_newest_first_filters_and_paging(a: Server) -> None:
    label = f"run-{time.time_ns()}"
    ids = [submit(a, image_only(batch=1), metadata={"batch": label, "n": str(i)})["id"]
           for i in range(3)]
    url = f"{a.url}/api/v2/jobs"
    first = httpx.get(url, params={"metadata[batch]": label, "limit": 2}, headers=AUTH).json()
    assert [j["id"] for j in first["jobs"]] == ids[::-1][:2]
    assert first["next_cursor"]
    item = first["jobs"][0]
    assert item["metadata"]["batch"] == label and item["create_time"] == item["created_at"]
    second = httpx.get(url, params={"metadata[batch]": label, "limit": 2,
                                    "cursor": first["next_cursor"]}, headers=AUTH).json()
    assert [j["id"] for j in second["jobs"]] == [ids[0]] and not second["next_cursor"]
    one = httpx.get(url, params={"metadata[batch]": label, "metadata[n]": "1"},
                    headers=AUTH).json()
    assert [j["id"] for j in one["jobs"]] == [ids[1]]
    bad = httpx.get(url, params={"cursor": "not-a-cursor!"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
    bad = httpx.get(url, params={"limit": "0"}, headers=AUTH)
    assert bad.status_code == 400 and "limit" in bad.json()["error"]["message"]


@pytest.mark.parametrize("reader", ["a", "b"])
def test_events_then_cancel(a: Server, b: Server, reader: str) -> None:
    """SSE from the first frame: the snapshot (status), progress while it
    runs; a cancel on B moves it through canceling to canceled. Read on A
    (which runs it: from memory) or on B (from the shared log)."""
    job = submit(a, text_to_image(steps=40, size=64))
    asked: list[int] = []

    def cancel_once_running(frames: list[tuple[str, dict[str, Any]]]) -> None:
        if not asked and frames[-1][0] == "progress" and frames[-1][1].get("step"):
            asked.append(1)
            r = httpx.post(f"{b.url}/api/v2/jobs/{job['id']}/cancel", headers=AUTH)
            assert r.status_code == 200 and r.json()["status"] in {"canceling", "canceled"}

    frames = sse(a if reader == "a" else b, job["id"], on_frame=cancel_once_running)
    statuses = [d["status"] for n, d in frames if n == "status"]
    assert statuses[-1] == "canceled" and "succeeded" not in statuses
    assert frames[0][0] == "status"
    progress = [d for n, d in frames if n == "progress"]
    assert progress and all(0 <= p["value"] <= 1 for p in progress)
    assert any(p["steps"] == 40 for p in progress)
    assert frames[-1] == ("status", {"status": "canceled", "queue_position": None})
    final = wait(b, job["id"])
    assert final["status"] == "canceled" and final["error"] is None
    again = httpx.post(f"{a.url}/api/v2/jobs/{job['id']}/cancel", headers=AUTH)
    assert again.status_code == 200 and again.json()["status"] == "canceled"  # idempotent


def test_partner_key_is_never_stored_or_logged(a: Server, shared: Path) -> None:
    secret = f"partner-secret-{time.time_ns()}"
    job = submit(a, image_only(batch=1), extra_data={"api_key_comfy_org": secret})
    assert wait(a, job["id"])["status"] == "succeeded"
    checked = 0
    for path in (shared / "output").rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            raw = path.read_bytes()
            try:
                raw += zlib.decompress(raw)  # task log files are zlib-compressed JSON
            except zlib.error:
                pass
            assert secret.encode() not in raw, path
            checked += 1
    assert checked > 3
    assert secret not in a.log()


def test_delete_job(a: Server, b: Server) -> None:
    """DELETE /api/v2/jobs/{id} (issue 29's delete): gone on every instance."""
    job = submit(a, image_only(batch=1), metadata={"del": "1"})
    done = wait(a, job["id"])
    final = httpx.get(f"{a.url}/api/serverless/status", params={"task_id": job["id"]},
                      headers=AUTH).json()[-1]
    assert done["expires_at"] == final["data"]["expires_at"]  # the one rule of issue 29
    assert httpx.delete(f"{b.url}/api/v2/jobs/{job['id']}", headers=OTHER).status_code == 404
    assert httpx.delete(f"{b.url}/api/v2/jobs/{job['id']}", headers=AUTH).status_code == 204
    for server in (a, b):
        r = httpx.get(f"{server.url}/api/v2/jobs/{job['id']}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert httpx.get(done["outputs"][0]["url"], headers=AUTH).status_code == 404
    listed = httpx.get(f"{a.url}/api/v2/jobs", params={"metadata[del]": "1"}, headers=AUTH)
    assert listed.json()["jobs"] == []


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as r:
        yield r


def test_webhook_as_for_fc_tasks(a: Server, receiver: Receiver) -> None:
    """A v2 job's end is delivered as an FC task's is (signed, from the log)."""
    path, url = receiver.new_hook("v2")
    job = submit(a, image_only(batch=1), extra_data={"webhook": url})
    [call] = receiver.wait(path, 1)
    assert call.verified, call.error
    assert call.payload["data"]["task_id"] == job["id"]
    assert call.payload["data"]["status"] == "success"
    state = httpx.get(f"{a.url}/api/serverless/webhook", params={"task_id": job["id"]},
                      headers=AUTH).json()
    assert state["state"] == "delivered"
    refused = httpx.post(f"{a.url}/api/v2/jobs", headers=AUTH, json={
        "workflow": image_only(batch=1), "extra_data": {"webhook": "http://169.254.169.254/x"}})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request"


def test_saved_workflow_with_the_extension_header(a: Server) -> None:
    """A saved (editor) workflow: the spec's 422 workflow_format_ui, unless the
    caller sends ``X-Workflow-Format: ui``; then it is converted and runs."""
    saved = json.loads((Path(__file__).resolve().parents[2] / "prepare" / "ui_workflows"
                        / "nested_subgraph_bypass.json").read_text())
    refused = httpx.post(f"{a.url}/api/v2/jobs", json={"workflow": saved}, headers=AUTH,
                         timeout=60)
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "workflow_format_ui"
    assert "X-Workflow-Format".lower() in refused.json()["error"]["message"]
    r = httpx.post(f"{a.url}/api/v2/jobs", json={"workflow": saved},
                   headers={**AUTH, "X-Workflow-Format": "ui"}, timeout=60)
    assert r.status_code == 201, r.text
    job = wait(a, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["outputs"], job
