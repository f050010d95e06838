"""The serverless API as clients call it: real uvicorn, real ComfyUI, real
HTTP and WebSocket clients."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import websocket

from comfy_embed.tasklog.log import TaskLog
from tests.conftest import image_only, text_to_image
from tests.servers import Server


@pytest.fixture(scope="module")
def shared_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tasklog")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shared_log: Path) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("a"), max_queue=2, max_body_bytes=1_000_000,
               task_log_dir=shared_log, lease_seconds=3)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory, shared_log: Path, server: Server) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("b"), task_log_dir=shared_log, lease_seconds=3)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def sse_events(resp: requests.Response) -> Iterator[dict[str, Any]]:
    """What a stream client does: read `data:` lines until serverless_api."""
    for line in resp.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            ev = json.loads(line[6:])
            yield ev
            if ev["type"] == "serverless_api":
                return


def assert_serves(server: Server) -> None:
    r = server.run(image_only(batch=1, color=0x010203))
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "success"


# ---------------------------------------------------------------- the four clients
def test_sync_run(server: Server) -> None:
    r = server.run(text_to_image(steps=2), "?output_base64=true", {"X-Fc-Trace-Id": "sync-1"})
    assert r.status_code == 200, r.text
    assert r.headers["X-Task-Id"] == "sync-1"
    body = r.json()
    assert body["type"] == "serverless_api"
    data = body["data"]
    assert data["status"] == "success" and data["task_id"] == "sync-1" and data["prompt_id"]
    (res,) = data["results"]
    assert res["node_id"] == "9" and res["index"] == 0
    assert set(res["output"]["comfy"]) == {"filename", "type", "subfolder", "dir"}
    assert res["output"]["comfy"]["dir"] == "."  # relative to the output folder: no server path
    assert server.file_of(res["output"]["comfy"]).exists()
    assert res["output"]["base64"]["data"].startswith("iVBORw0KGgo")
    assert "oss" not in res["output"]


def test_stream_run(server: Server) -> None:
    with requests.post(f"{server.url}/api/serverless/run?stream=1", json=text_to_image(steps=3),
                       stream=True, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    types = [e["type"] for e in events]
    assert types[0] == "status" and "execution_start" in types and "progress" in types
    assert types[-1] == "serverless_api" and events[-1]["data"]["status"] == "success"
    assert [e["data"]["value"] for e in events if e["type"] == "progress"][-1] == 3


def test_async_run_and_status(server: Server) -> None:
    task_id = "async-" + uuid.uuid4().hex
    r = server.run(image_only(), headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": task_id})
    assert r.status_code == 202 and r.json()["task_id"] == task_id
    events = server.wait_final(task_id)
    assert [e["type"] for e in events][0] == "status"
    assert events[-1]["data"]["status"] == "success" and len(events[-1]["data"]["results"]) == 2
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    later = server.status(task_id, since=len(events) - 1)
    assert [e["type"] for e in later] == ["serverless_api"]
    assert server.status("never-seen") == []


def test_websocket_runs_several_and_survives_bad_messages(server: Server) -> None:
    ws = websocket.create_connection(server.ws_url, timeout=120)
    try:
        for graph in (image_only(color=0x0A0B0C), "{not json", text_to_image(steps=2)):
            ws.send(graph if isinstance(graph, str) else json.dumps(graph))
            events = []
            while True:
                ev = json.loads(ws.recv())
                events.append(ev)
                if ev["type"] == "serverless_api":
                    break
            final = events[-1]["data"]
            if isinstance(graph, str):
                assert final["status"] == "error" and final["error"]["type"] == "invalid_json"
            else:
                assert final["status"] == "success", final
                assert "execution_success" in [e["type"] for e in events]
    finally:
        ws.close()


def test_websocket_resume_from_log(server: Server) -> None:
    task_id = "wsresume-" + uuid.uuid4().hex
    assert server.run(image_only(color=0x445566), headers={"X-Task-Id": task_id}).status_code == 200
    logged = server.status(task_id)
    ws = websocket.create_connection(f"{server.ws_url}?task_id={task_id}&since=3", timeout=60)
    try:
        replay = []
        while not replay or replay[-1]["type"] != "serverless_api":
            replay.append(json.loads(ws.recv()))
        assert replay[-1]["data"] == logged[-1]["data"]
        assert len(replay) <= len(logged) - 3
        ws.send(json.dumps(image_only(color=0x665544)))  # the connection goes on
        while (ev := json.loads(ws.recv()))["type"] != "serverless_api":
            pass
        assert ev["data"]["status"] == "success" and ev["data"]["task_id"] != task_id
    finally:
        ws.close()


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("body, code, err_type, needle", [
    (b"{nope", 400, "invalid_json", "malformed JSON"),
    (b"[1,2,3]", 400, "invalid_prompt", "JSON object"),
    (json.dumps({"1": {"class_type": "Nope", "inputs": {}}}).encode(), 400, "invalid_prompt", "Nope"),
    (json.dumps(text_to_image(steps=0)).encode(), 400, "prompt_outputs_failed_validation", "steps"),
    (b"x" * 1_200_000, 413, "payload_too_large", "limit"),
])
def test_error_answers(server: Server, body: bytes, code: int, err_type: str, needle: str) -> None:
    r = requests.post(f"{server.url}/api/serverless/run", data=body, timeout=60)
    assert r.status_code == code, r.text
    msg = r.json()
    assert msg["type"] == "serverless_api" and msg["data"]["status"] == "error"
    assert msg["data"]["results"] == []
    assert msg["data"]["error"]["type"] == err_type
    assert needle in msg["data"]["error"]["message"]
    if needle == "Nope":  # an unknown node type: node_errors names the node
        assert msg["data"]["error"]["node_errors"]["1"]["class_type"] == "Nope"
    assert_serves(server)


def test_invalid_input_names_node_in_stream(server: Server) -> None:
    g = text_to_image()
    g["3"]["inputs"]["sampler_name"] = "bogus"
    with requests.post(f"{server.url}/api/serverless/run?stream=true", json=g, stream=True,
                       timeout=60) as r:
        assert r.status_code == 400
        (final,) = list(sse_events(r))
    assert final["data"]["error"]["node_errors"]["3"]["class_type"] == "KSampler"
    assert "sampler_name" in final["data"]["error"]["message"]


def test_queue_full_then_recovers(server: Server) -> None:
    ids = [f"qf-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    long = text_to_image(steps=2000, seed=11)
    r = server.run(long, headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": ids[0]})
    assert r.status_code == 202
    for i in (1, 2):
        r = server.run(image_only(color=i), headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": ids[i]})
        assert r.status_code == 202
    r = server.run(image_only(color=3), headers={"X-Task-Id": ids[3]})
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) > 0
    assert r.json()["data"]["error"]["type"] == "queue_full"
    assert requests.post(f"{server.url}/api/serverless/cancel", params={"task_id": ids[0]},
                         timeout=10).status_code == 200
    assert server.wait_final(ids[0])[-1]["data"]["error"]["type"] == "execution_interrupted"
    for i in (1, 2):
        assert server.wait_final(ids[i])[-1]["data"]["status"] == "success"
    # Refused with 429, so not recorded: the same id can run now.
    r = server.run(image_only(color=3), headers={"X-Task-Id": ids[3]})
    assert r.status_code == 200 and r.json()["data"]["status"] == "success"


# ---------------------------------------------------------------- task semantics
def test_resubmitting_a_task_id_does_not_run_twice(server: Server) -> None:
    task_id = "idem-" + uuid.uuid4().hex
    first = server.run(image_only(color=0x111111), headers={"X-Task-Id": task_id}).json()
    second = server.run(image_only(color=0x222222), headers={"X-Task-Id": task_id}).json()
    assert second == first
    assert sum(e["type"] == "execution_start" for e in server.status(task_id)) == 1


def test_client_disconnect_mid_stream_keeps_task(server: Server) -> None:
    task_id = "disc-" + uuid.uuid4().hex
    r = requests.post(f"{server.url}/api/serverless/run?stream=true", json=text_to_image(steps=60, seed=5),
                      headers={"X-Task-Id": task_id}, stream=True, timeout=60)
    for ev in sse_events(r):
        if ev["type"] == "progress":
            break
    r.close()
    events = server.wait_final(task_id)
    assert events[-1]["data"]["status"] == "success"
    assert [e["data"]["value"] for e in events if e["type"] == "progress"][-1] == 60


def test_stream_resume_with_last_event_id(server: Server) -> None:
    task_id = "resume-" + uuid.uuid4().hex
    full = server.run(image_only(color=0x333333), headers={"X-Task-Id": task_id})
    assert full.status_code == 200
    with requests.post(f"{server.url}/api/serverless/run?stream=true", json=image_only(),
                       headers={"X-Task-Id": task_id, "Last-Event-ID": "2"}, stream=True,
                       timeout=60) as r:
        resumed = list(sse_events(r))
    logged = server.status(task_id)
    # A reader that is behind gets progress coalesced; nothing else is dropped.
    def kept(events: list[dict[str, Any]]) -> list[str]:
        return [e["type"] for e in events if not e["type"].startswith("progress")]
    assert kept(resumed) == kept(logged[2:]) and resumed[-1] == {k: v for k, v in logged[-1].items()
                                                                 if k != "id"}


def test_other_instance_reads_and_cancels(server: Server, other: Server) -> None:
    task_id = "cross-" + uuid.uuid4().hex
    r = server.run(text_to_image(steps=3000, seed=3),
                   headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
    assert r.status_code == 202
    deadline = time.monotonic() + 60
    while not any(e["type"] == "progress" for e in other.status(task_id)):
        assert time.monotonic() < deadline, "no progress visible from the other instance"
        time.sleep(0.1)
    c = requests.post(f"{other.url}/api/serverless/cancel", params={"task_id": task_id}, timeout=10)
    assert c.status_code == 202 and c.json()["status"] == "requested"
    events = other.wait_final(task_id, timeout=30)
    assert events[-1]["data"]["error"]["type"] == "execution_interrupted"
    # The other instance can also follow the stream of a task it does not run.
    with requests.post(f"{other.url}/api/serverless/run?stream=true", json={},
                       headers={"X-Task-Id": task_id}, stream=True, timeout=30) as s:
        followed = list(sse_events(s))
        assert followed[-1]["data"] == events[-1]["data"]


def test_killed_instance_leaves_final_event(tmp_path: Path, shared_log: Path, other: Server) -> None:
    victim = Server(tmp_path / "victim", task_log_dir=shared_log, lease_seconds=3).wait_ready()
    task_id = "killed-" + uuid.uuid4().hex
    try:
        r = victim.run(text_to_image(steps=3000, seed=9),
                       headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
        assert r.status_code == 202
        deadline = time.monotonic() + 60
        while not any(e["type"] == "progress" for e in other.status(task_id)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        victim.kill()
        victim.stop()
    events = other.wait_final(task_id, timeout=60)
    final = events[-1]["data"]
    assert final["status"] == "error" and final["error"]["type"] == "task_lost"
    assert sum(e["type"] == "serverless_api" for e in events) == 1


def test_pre_stop_drains(tmp_path: Path) -> None:
    s = Server(tmp_path / "drain").wait_ready()
    try:
        task_id = "drain-" + uuid.uuid4().hex
        r = s.run(text_to_image(steps=30, seed=4),
                  headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
        assert r.status_code == 202
        assert requests.get(f"{s.url}/health", timeout=5).status_code == 200
        d = requests.get(f"{s.url}/pre-stop", timeout=120)
        assert d.status_code == 200
        # Running work finished (its final on disk) before pre-stop answered.
        # Read from the task log, not through the server: it is already stopping.
        events = TaskLog(tmp_path / "drain" / "output" / "serverless_api", "reader").read(task_id)
        assert events[-1][1]["data"]["status"] == "success", events[-3:]
        # Drained for good: the server exits as after SIGTERM's drain (its
        # readiness went 503 at once: tests/api/serverless/test_inprocess.py).
        assert s.proc.wait(60) == 0, s.log()
    finally:
        s.stop()


def test_run_timeout_async_inline_and_initialize(tmp_path: Path) -> None:
    s = Server(tmp_path / "inline", run_timeout=2, async_inline=1, sse_keepalive=0.2)
    try:
        s.wait_ready()
        assert requests.post(f"{s.url}/initialize", timeout=60).status_code == 200
        # The platform queues async calls itself: run inline, answer when done.
        r = s.run(image_only(), headers={"X-Fc-Invocation-Type": "Async"})
        assert r.status_code == 200 and r.json()["data"]["status"] == "success"
        slow: dict[str, requests.Response] = {}
        slow_id = "slow-" + uuid.uuid4().hex
        t = threading.Thread(target=lambda: slow.update(
            r=s.run(text_to_image(steps=5000, seed=2), headers={"X-Task-Id": slow_id})))
        t.start()
        deadline = time.monotonic() + 60
        while not any(e["type"] == "execution_start" for e in s.status(slow_id)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Queued behind the slow task: the stream stays alive with comments.
        with requests.post(f"{s.url}/api/serverless/run?stream=true", json=image_only(),
                           stream=True, timeout=60) as st:
            lines = list(st.iter_lines(decode_unicode=True))
        t.join(60)
        assert slow["r"].status_code == 504, slow["r"].text
        assert slow["r"].json()["data"]["error"]["type"] == "run_timeout"
        assert ": keep-alive" in lines
        assert json.loads(lines[[i for i, x in enumerate(lines) if x.startswith("data: ")][-1]][6:]
                          )["data"]["status"] == "success"
        assert_serves(s)
    finally:
        s.stop()
