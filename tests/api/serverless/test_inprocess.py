"""The HTTP and WebSocket mechanics in-process: Starlette's TestClient over
``create_app`` with a fake ComfyUI (tests/fakes/comfy_backend.py). What is
tested here is the API's own behaviour, the same whatever a graph does: the
error -> status table, SSE framing, the WebSocket protocol, cancel and drain.
Real ComfyUI behind a real server is tested in tests/api/serverless/test_server.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import anyio
import pytest
from starlette.testclient import TestClient

from comfy_embed.api import create_app
from comfy_embed.config import Settings
from comfy_embed.runtime import Engine

from tests.fakes.comfy_backend import FakeComfy, fake_graph

RUN = "/api/serverless/run"


class App:
    """A TestClient over create_app, the engine and its fake ComfyUI."""

    def __init__(self, client: TestClient, engine: Engine, comfy: FakeComfy) -> None:
        self.client, self.engine, self.comfy = client, engine, comfy

    def run(self, graph: Any, params: str = "", **kw: Any) -> Any:
        body = graph if isinstance(graph, (bytes, str)) else json.dumps(graph)
        return self.client.post(RUN + params, content=body, **kw)

    def submit_async(self, graph: Any, task_id: str) -> None:
        r = self.run(graph, headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
        assert r.status_code == 202, r.text
        assert r.json()["task_id"] == task_id

    def status(self, task_id: str, since: int = 0) -> list[dict[str, Any]]:
        r = self.client.get("/api/serverless/status", params={"task_id": task_id, "since": since})
        assert r.status_code == 200
        return r.json()

    def wait_final(self, task_id: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            events = self.status(task_id)
            if events and events[-1]["type"] == "serverless_api":
                return events
            time.sleep(0.02)  # polling the log as clients do, bounded by the deadline
        raise TimeoutError(f"no final event for {task_id}")


def open_app(tmp_path: Path, **overrides: Any) -> Iterator[App]:
    settings = Settings(base_dir=tmp_path, max_queue=4, max_body_bytes=64 * 1024,
                        **overrides)
    boot, fake = FakeComfy.booter()
    engine = Engine(settings, boot=boot)
    try:
        # From loopback, as a platform hook on the instance (api/hooks.py).
        with TestClient(create_app(settings, engine), client=("127.0.0.1", 50000)) as client:
            r = client.post("/initialize")
            assert r.status_code == 200, r.text
            yield App(client, engine, fake())
            fake().gate.set()  # nothing may stay blocked at shutdown
    finally:
        engine.close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    yield from open_app(tmp_path)


def final_of(r: Any) -> dict[str, Any]:
    msg = r.json()
    assert msg["type"] == "serverless_api"
    return msg["data"]


def sse_frames(text: str) -> list[dict[str, str]]:
    """Each frame's fields (``id``, ``data``, or ``comment``)."""
    assert text.endswith("\n\n"), text[-200:]
    frames = []
    for block in text[:-2].split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                fields["comment"] = line[1:].strip()
                continue
            name, _, value = line.partition(": ")
            assert name in ("id", "data") and name not in fields, block
            fields[name] = value
        frames.append(fields)
    return frames


# ------------------------------------------------------------- success
def test_run_answers_the_final_event(app: App) -> None:
    r = app.run(fake_graph("FakeImage"), "?output_base64=true", headers={"X-Task-Id": "ok-1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-task-id"] == "ok-1"
    data = final_of(r)
    assert data["status"] == "success" and data["task_id"] == "ok-1"
    assert data["seeds"] == {"1": 5}
    (result,) = data["results"]
    assert result["node_id"] == "2" and result["index"] == 0
    assert result["output"]["comfy"]["subfolder"] == "ok-1"  # isolated per task
    assert result["output"]["base64"]["data"].startswith("iVBORw0KGgo")
    events = app.status("ok-1")
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["data"] == data
    # A retry of the same task id answers the same result, without running again.
    runs = app.comfy.executed.count("FakeSave")
    again = app.run(fake_graph("FakeImage"), headers={"X-Task-Id": "ok-1"})
    assert final_of(again) == data and app.comfy.executed.count("FakeSave") == runs


# --------------------------------------------------------- error table
BROKEN_DATA_URI = "data:image/png;base64,@@@not-base64@@@"


@pytest.mark.parametrize("body, params, headers, code, err_type, needle", [
    (b"{nope", "", {}, 400, "invalid_json", "malformed JSON"),
    (b"", "", {}, 400, "invalid_json", "empty"),
    (b"[1,2,3]", "", {}, 400, "invalid_prompt", "JSON object"),
    (fake_graph("NoSuchNode"), "", {}, 400, "invalid_prompt", "unknown node types"),
    ({"1": {"class_type": "FakeSave", "inputs": {"images": ["7", 0]}}}, "", {}, 400,
     "prompt_outputs_failed_validation", "node 7"),
    (fake_graph(), "", {"X-Task-Id": "no spaces!"}, 400, "invalid_task_id", "task id"),
    (b"x" * (64 * 1024 + 1), "", {}, 413, "payload_too_large", "limit"),
    ({**fake_graph(), "9": {"class_type": "LoadImage", "inputs": {"image": BROKEN_DATA_URI}}},
     "", {}, 422, "image_input_error", "node 9 (LoadImage) input 'image'"),
    ({**fake_graph(), "9": {"class_type": "LoadImage", "inputs": {"image": "../secret.png"}}},
     "", {}, 400, "invalid_input_path", "'..'"),
    (fake_graph(), "?output_oss=true", {}, 502, "storage_error", "COMFY_EMBED_OSS_BUCKET"),
    (fake_graph("FakeFail"), "", {}, 500, "execution_error", "node 1 (FakeFail) failed"),
], ids=["bad-json", "empty", "not-object", "unknown-node", "dangling-link", "bad-task-id",
        "too-large", "bad-image", "path-escape", "storage", "node-fails"])
def test_error_table(app: App, body: Any, params: str, headers: dict[str, str], code: int,
                     err_type: str, needle: str) -> None:
    for stream in (False, True):
        p = params + ("&" if params else "?") + "stream=true" if stream else params
        r = app.run(body, p, headers=headers)
        # A stream that started (the task was queued) is already 200 when a
        # node fails; its final event carries the error.
        assert r.status_code == (200 if stream and err_type == "execution_error" else code), r.text
        if stream:
            assert r.headers["content-type"].startswith("text/event-stream")
            frames = sse_frames(r.text)
            data = json.loads(frames[-1]["data"])["data"]
            assert all(json.loads(f["data"])["type"] != "serverless_api" for f in frames[:-1])
        else:
            data = final_of(r)
        assert data["status"] == "error" and data["results"] == []
        assert data["error"]["type"] == err_type, data
        assert needle in data["error"]["message"], data
        if err_type == "invalid_prompt" and "unknown" in needle:
            assert data["error"]["node_errors"]["1"]["class_type"] == "NoSuchNode"
        if err_type == "execution_error":
            assert data["error"]["node_errors"]["1"]["class_type"] == "FakeFail"
    # The app goes on serving.
    assert final_of(app.run(fake_graph()))["status"] == "success"


def test_queue_full_then_draining_answer_with_retry_after(app: App) -> None:
    app.submit_async(fake_graph("FakeWait"), "busy")
    assert app.comfy.running.wait(10)
    for i in range(app.engine.settings.jobs.max_queue):
        app.submit_async(fake_graph(), f"queued-{i}")
    full = app.run(fake_graph(), headers={"X-Task-Id": "one-too-many"})
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
    assert final_of(full)["error"]["type"] == "queue_full"
    # Refused work is not claimed: the same id can run once there is room.
    assert app.status("one-too-many") == []
    app.comfy.gate.set()
    for i in range(app.engine.settings.jobs.max_queue):
        assert app.wait_final(f"queued-{i}")[-1]["data"]["status"] == "success"
    assert final_of(app.run(fake_graph(), headers={"X-Task-Id": "one-too-many"}))["status"] == "success"


def test_run_timeout_is_504(tmp_path: Path) -> None:
    for app in open_app(tmp_path, run_timeout=0.05):
        r = app.run(fake_graph("FakeWait"))
        assert r.status_code == 504, r.text
        assert final_of(r)["error"]["type"] == "run_timeout"


# ------------------------------------------------------------------ cancel
def test_cancel_answers(app: App) -> None:
    app.submit_async(fake_graph("FakeWait"), "victim")
    assert app.comfy.running.wait(10)
    app.submit_async(fake_graph(), "queued")
    r = app.client.post("/api/serverless/cancel", params={"task_id": "queued"})
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    r = app.client.post("/api/serverless/cancel", params={"task_id": "victim"})
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    for task_id in ("victim", "queued"):
        events = app.wait_final(task_id)
        assert events[-1]["data"]["error"]["type"] == "execution_interrupted"
        # Asking again for a cancelled task answers 409 with the same final event.
        again = app.run(fake_graph("FakeWait"), headers={"X-Task-Id": task_id})
        assert again.status_code == 409 and final_of(again) == events[-1]["data"]
    assert "execution_interrupted" in [e["type"] for e in app.status("victim")]
    r = app.client.post("/api/serverless/cancel", params={"task_id": "victim"})
    assert r.status_code == 409 and r.json()["status"] == "done"
    r = app.client.post("/api/serverless/cancel", params={"task_id": "never-was"})
    assert r.status_code == 404 and r.json()["status"] == "unknown"
    assert app.comfy.executed.count("FakeSave") == 0


# --------------------------------------------------------------------- SSE
def test_sse_framing_and_resume(app: App) -> None:
    app.comfy.gate.set()
    r = app.run(fake_graph("FakeImage", "FakeWait"), "?stream=true", headers={"X-Task-Id": "sse-1"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-task-id"] == "sse-1"
    frames = sse_frames(r.text)
    ids = [int(f["id"]) for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] == 1
    events = [json.loads(f["data"]) for f in frames]
    types = [e["type"] for e in events]
    assert types[0] == "status" and types[-1] == "serverless_api"
    assert types.count("serverless_api") == 1
    for t in ("execution_start", "executing", "executed", "execution_success"):
        assert t in types
    assert all(set(e) == {"type", "data"} for e in events)  # ComfyUI's own shape
    # Resume after event k, as a client reconnecting with Last-Event-ID does.
    k = ids[2]
    resumed = app.run(fake_graph("FakeImage", "FakeWait"), "?stream=true",
                      headers={"X-Task-Id": "sse-1", "Last-Event-ID": str(k)})
    again = sse_frames(resumed.text)
    assert [int(f["id"]) for f in again] == [i for i in ids if i > k]
    assert again[-1]["data"] == frames[-1]["data"]


def test_sse_keepalive_during_silence(tmp_path: Path) -> None:
    """Raw ASGI in the TestClient's loop, to see the stream as it is sent:
    the keep-alive comes while the task waits, and releases it."""
    for app in open_app(tmp_path, sse_keepalive=0.05):
        chunks: list[bytes] = []
        comfy = app.comfy

        async def call() -> int:
            body = json.dumps(fake_graph("FakeWait")).encode()
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": RUN, "raw_path": RUN.encode(),
                     "query_string": b"stream=true", "root_path": "", "client": ("t", 1),
                     "server": ("t", 80), "headers": [(b"content-type", b"application/json")],
                     "app": None, "state": dict(app.client.app_state)}
            sent = False
            status = 0

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await anyio.sleep_forever()
                raise AssertionError

            async def send(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                elif message["type"] == "http.response.body" and message.get("body"):
                    chunks.append(message["body"])
                    if message["body"] == b": keep-alive\n\n":
                        comfy.gate.set()

            with anyio.fail_after(20):
                await app.client.app(scope, receive, send)  # type: ignore[arg-type]
            return status

        assert app.client.portal is not None
        assert app.client.portal.call(call) == 200
        text = b"".join(chunks).decode()
        frames = sse_frames(text)
        comments = [i for i, f in enumerate(frames) if f.get("comment") == "keep-alive"]
        assert comments, text
        progress = [i for i, f in enumerate(frames)
                    if "data" in f and json.loads(f["data"])["type"] == "progress"]
        # Keep-alives only while the node waited: after its first progress, before its second.
        assert progress[0] < comments[0] and comments[-1] < progress[-1]
        assert json.loads(frames[-1]["data"])["data"]["status"] == "success"


# --------------------------------------------------------------- WebSocket
def ws_until_final(ws: Any) -> list[dict[str, Any]]:
    events = []
    while not events or events[-1]["type"] != "serverless_api":
        events.append(json.loads(ws.receive_text()))
    return events


def test_websocket_protocol(app: App) -> None:
    app.comfy.gate.set()
    with app.client.websocket_connect("/api/serverless/ws?output_base64=true") as ws:
        ws.send_text(json.dumps(fake_graph("FakeWait")))
        first = ws_until_final(ws)
        types = [e["type"] for e in first]
        assert types[0] == "status" and "execution_success" in types
        final = first[-1]["data"]
        assert final["status"] == "success" and final["results"][0]["output"]["base64"]["data"]
        # Bad messages answer an error final event; the connection goes on.
        ws.send_text("{broken")
        (bad,) = ws_until_final(ws)
        assert bad["data"]["error"]["type"] == "invalid_json"
        ws.send_bytes(b"\xff\xfe")
        (bad,) = ws_until_final(ws)
        assert bad["data"]["error"]["type"] == "invalid_json"
        ws.send_text("x" * (64 * 1024 + 1))
        (big,) = ws_until_final(ws)
        assert big["data"]["error"]["type"] == "payload_too_large"
        ws.send_text(json.dumps(fake_graph("FakeImage")))
        second = ws_until_final(ws)
        assert second[-1]["data"]["status"] == "success"
        assert second[-1]["data"]["task_id"] != final["task_id"]
    # Resume: replay a task's events after a sequence number, then take work.
    task_id = final["task_id"]
    with app.client.websocket_connect(f"/api/serverless/ws?task_id={task_id}&since=2") as ws:
        replay = ws_until_final(ws)
        assert replay == [{"type": e["type"], "data": e["data"]} for e in app.status(task_id, 2)]
        ws.send_text(json.dumps(fake_graph()))
        assert ws_until_final(ws)[-1]["data"]["status"] == "success"


def test_websocket_client_leaving_does_not_stop_the_task(app: App) -> None:
    with app.client.websocket_connect("/api/serverless/ws") as ws:
        ws.send_text(json.dumps(fake_graph("FakeWait")))
        status = json.loads(ws.receive_text())
        assert status["type"] == "status"
        assert app.comfy.running.wait(10)
        task_id = next(e for e in app.engine._tasks.values()).task_id
    app.comfy.gate.set()  # the client is gone; the task goes on to its final event
    events = app.wait_final(task_id)
    assert events[-1]["data"]["status"] == "success"
    assert "execution_success" in [e["type"] for e in events]


# ------------------------------------------------------------------- drain
def test_pre_stop_drains_running_work(app: App) -> None:
    app.submit_async(fake_graph("FakeWait"), "in-flight")
    assert app.comfy.running.wait(10)
    answer: list[Any] = []
    stopper = threading.Thread(target=lambda: answer.append(app.client.post("/pre-stop")))
    stopper.start()
    try:
        deadline = time.monotonic() + 10
        while app.engine.accepting and time.monotonic() < deadline:
            time.sleep(0.01)  # until the drain began, bounded by the deadline
        refused = app.run(fake_graph())
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert final_of(refused)["error"]["type"] == "not_accepting"
        ready = app.client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert not answer  # still draining: the task runs
    finally:
        app.comfy.gate.set()
        stopper.join(20)
    assert answer and answer[0].status_code == 200 and answer[0].json() == {"status": "drained"}
    # A drained instance ends: liveness fails (a served one also exits).
    health = app.client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "drained"}
    # Drained means the log is complete: the final event is already there.
    events = app.status("in-flight")
    assert events[-1]["type"] == "serverless_api" and events[-1]["data"]["status"] == "success"


def test_health_and_ready(app: App) -> None:
    assert app.client.get("/health").json() == {"status": "alive"}
    ready = app.client.get("/ready")
    body = ready.json()
    assert ready.status_code == 200 and body["status"] == "ready" and body["device"] == "fake"
    assert body["queue_depth"] == 0
    # The fake runs no loader node: no model loaded, none kept (the header empty).
    assert body["loaded_models"] == [] and body["kept_models"] == []
    assert ready.headers["X-Queue-Depth"] == "0" and ready.headers["X-Loaded-Models"] == ""
