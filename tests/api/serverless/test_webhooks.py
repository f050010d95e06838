"""Webhooks through real servers: real ComfyUI runs, deliveries to a real
loopback receiver that verifies every signature with the ``standardwebhooks``
library, retries recorded in the shared task log and shown by GET /webhook,
a delivery resumed by a second instance after a kill -9, SSRF refusals."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import websocket

from tests.conftest import image_only, text_to_image
from tests.fakes.webhook_receiver import SECRET, Receiver, serve_receiver
from tests.servers import Server

HOOKS = {"url_allowlist": "127.0.0.1", "webhook_secret": SECRET}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def shared_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tasklog")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shared_log: Path) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("hooks"), task_log_dir=shared_log, lease_seconds=3,
               webhook_backoff=0.2, webhook_progress_interval=3600, **HOOKS)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def delivery(server: Server, task_id: str) -> dict[str, Any]:
    r = requests.get(f"{server.url}/api/serverless/webhook", params={"task_id": task_id}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(server: Server, task_id: str, timeout: float = 60) -> dict[str, Any]:
    """Poll the delivery state until it is delivered, failed or skipped."""
    deadline = time.monotonic() + timeout
    while True:
        state = delivery(server, task_id)
        if state["done"]:
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.1)


def test_success_and_failure_deliveries(server: Server, receiver: Receiver) -> None:
    path, url = receiver.new_hook("ok")
    r = server.run(image_only(batch=1), f"?output_base64=1&webhook={url}")
    assert r.status_code == 200, r.text
    answer = r.json()
    [call] = receiver.wait(path, 1)
    assert call.verified, call.error
    assert call.webhook_id.startswith("msg_")
    payload = call.payload
    assert payload["type"] == "serverless_api" and payload["data"]["status"] == "success"
    assert payload["data"]["task_id"] == r.headers["X-Task-Id"]
    # The same message as the answer, without the megabytes of base64.
    assert "base64" in answer["data"]["results"][0]["output"]
    assert "base64" not in payload["data"]["results"][0]["output"]
    assert payload["data"]["results"][0]["output"]["comfy"] == answer["data"]["results"][0]["output"]["comfy"]
    state = wait_done(server, r.headers["X-Task-Id"])
    assert state["state"] == "delivered" and state["webhook_id"] == call.webhook_id
    assert [a["status"] for a in state["attempts"]] == [200]
    # The status log still ends with serverless_api.
    assert server.status(r.headers["X-Task-Id"])[-1]["type"] == "serverless_api"

    path, url = receiver.new_hook("b64")
    r = server.run(image_only(batch=1), f"?output_base64=1&webhook={url}&webhook_base64=1")
    [call] = receiver.wait(path, 1)
    assert call.payload["data"]["results"][0]["output"]["base64"] == \
        r.json()["data"]["results"][0]["output"]["base64"]

    # Only what webhook_events names is sent.
    path, url = receiver.new_hook("only-failed")
    r = server.run(image_only(batch=1), f"?webhook={url}&webhook_events=failed")
    assert r.status_code == 200, r.text
    state = wait_done(server, r.headers["X-Task-Id"])
    assert state["state"] == "skipped" and state["attempts"] == []
    assert receiver.at(path) == []


def test_refused_requests_send_no_webhook(server: Server, receiver: Receiver) -> None:
    # Issue 25 (8): 300 invalid requests with a webhook answering 500 made
    # 900 POSTs. A refusal is answered in the HTTP response (async calls
    # too: 202 comes only once queued), so it leaves no delivery.
    path, url = receiver.new_hook("refused")
    receiver.script(path, 500, 500, 500)
    bad = text_to_image()
    bad["4"]["inputs"]["ckpt_name"] = "no-such-model.safetensors"
    unknown = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    url_input = {"1": {"class_type": "LoadImage", "inputs": {"image": "http://127.0.0.1:9/x.png"}},
                 "2": {"class_type": "SaveImage",
                       "inputs": {"filename_prefix": "x", "images": ["1", 0]}}}
    refused = []
    for graph, code, headers in ((bad, 400, {}), (unknown, 400, {}), (url_input, 422, {}),
                                 (bad, 400, {"X-Fc-Invocation-Type": "Async"})):
        r = server.run(graph, f"?webhook={url}", headers=headers)
        assert r.status_code == code, r.text
        refused.append(r.headers["X-Task-Id"])
    for task_id in refused:
        r = requests.get(f"{server.url}/api/serverless/webhook", params={"task_id": task_id},
                         timeout=10)
        assert r.status_code == 404 and r.json()["state"] == "none", r.text
        assert server.status(task_id) == []
    # A run accepted afterwards is delivered to the same hook: the only call
    # it ever gets (deliveries go in order of their tasks' ends).
    r = server.run(image_only(batch=1), f"?webhook={url}")
    assert r.status_code == 200, r.text
    [call] = receiver.wait(path, 1)
    assert call.payload["data"]["task_id"] == r.headers["X-Task-Id"]
    assert not any(c.payload and c.payload["data"]["task_id"] in refused
                   for c in receiver.at(path))


def test_500_twice_then_200_retries_with_growing_delays_and_one_id(
        server: Server, receiver: Receiver) -> None:
    path, url = receiver.new_hook("flaky")
    receiver.script(path, 500, 500)
    r = server.run(image_only(batch=1), f"?webhook={url}")
    assert r.status_code == 200, r.text
    calls = receiver.wait(path, 3)
    assert [c.answered for c in calls] == [500, 500, 200]
    assert all(c.verified for c in calls), [c.error for c in calls]
    assert len({c.webhook_id for c in calls}) == 1
    state = wait_done(server, r.headers["X-Task-Id"])
    attempts = state["attempts"]
    assert state["state"] == "delivered" and len(attempts) == 3
    assert [a["outcome"] for a in attempts] == ["retry", "retry", "delivered"]
    assert [a["status"] for a in attempts] == [500, 500, 200]
    assert 0 < attempts[0]["delay"] < attempts[1]["delay"]
    assert attempts[0]["next_try_at"] == pytest.approx(attempts[0]["finished_at"] + attempts[0]["delay"])
    assert len(receiver.at(path)) == 3


def test_retry_after_is_honoured_and_410_stops(server: Server, receiver: Receiver) -> None:
    path, url = receiver.new_hook("busy")
    receiver.script(path, (429, {"Retry-After": "1"}))
    r = server.run(image_only(batch=1), f"?webhook={url}")
    state = wait_done(server, r.headers["X-Task-Id"])
    assert [a["status"] for a in state["attempts"]] == [429, 200]
    assert state["attempts"][0]["delay"] >= 1  # backoff alone would be 0.1-0.2s

    path, url = receiver.new_hook("gone")
    receiver.script(path, 410, 200)
    r = server.run(image_only(batch=1), f"?webhook={url}")
    state = wait_done(server, r.headers["X-Task-Id"])
    assert state["state"] == "failed"
    assert [(a["status"], a["outcome"]) for a in state["attempts"]] == [(410, "failed")]
    assert "410" in state["done"]["reason"]
    assert [c.answered for c in receiver.at(path)] == [410]


def test_progress_webhooks_are_rate_limited(server: Server, receiver: Receiver) -> None:
    path, url = receiver.new_hook("progress")
    r = server.run(text_to_image(steps=4, seed=3), f"?webhook={url}&webhook_events=progress")
    assert r.status_code == 200, r.text
    wait_done(server, r.headers["X-Task-Id"])
    calls = receiver.at(path)
    assert all(c.verified for c in calls), [c.error for c in calls]
    kinds = [c.payload["type"] for c in calls]
    # Four sampler steps, one progress webhook per hour at most: the first.
    assert kinds == ["progress", "serverless_api"]
    assert calls[0].payload["data"]["task_id"] == r.headers["X-Task-Id"]
    assert calls[0].webhook_id != calls[1].webhook_id


@pytest.mark.parametrize("query, needle", [
    ("?webhook=http://169.254.169.254/latest/meta-data", "metadata"),
    ("?webhook=http://10.1.2.3/hook", "private"),
    ("?webhook=http://[::1]:9/hook", "loopback"),
    ("?webhook=ftp://127.0.0.1/hook", "only http and https"),
    ("?webhook=http://127.0.0.1/x&webhook_events=finished", "webhook_events"),
])
def test_refused_webhooks_are_400_before_the_task_exists(server: Server, query: str,
                                                         needle: str) -> None:
    task_id = "refused-" + uuid.uuid4().hex
    r = server.run(image_only(batch=1), query, headers={"X-Task-Id": task_id})
    assert r.status_code == 400, r.text
    error = r.json()["data"]["error"]
    assert error["type"] == "webhook_refused" and needle in error["message"]
    assert server.status(task_id) == []
    assert requests.get(f"{server.url}/api/serverless/webhook", params={"task_id": task_id},
                        timeout=10).status_code == 404
    assert server.run(image_only(batch=1)).status_code == 200  # still serving


def test_async_invocation_with_envelope_webhook(server: Server, receiver: Receiver) -> None:
    path, url = receiver.new_hook("async")
    task_id = "async-hook-" + uuid.uuid4().hex
    envelope = {"prompt": image_only(batch=1), "client_id": "x", "extra_data": {"webhook": url}}
    r = server.run(envelope, headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
    assert r.status_code == 202 and r.json()["task_id"] == task_id
    [call] = receiver.wait(path, 1)
    assert call.verified, call.error
    assert call.payload["data"]["task_id"] == task_id
    assert call.payload["data"]["status"] == "success"
    assert call.payload["data"] == server.wait_final(task_id)[-1]["data"]


def test_killed_instance_delivery_resumed_by_another(tmp_path: Path, shared_log: Path,
                                                    server: Server, receiver: Receiver) -> None:
    """Instance A gets a 500 and schedules a retry (2-4s away), then dies by
    kill -9; B, sharing the log, takes the expired lease and delivers."""
    path, url = receiver.new_hook("resumed")
    receiver.script(path, 500)
    victim = Server(tmp_path / "victim", task_log_dir=shared_log, lease_seconds=3,
                    webhook_backoff=4, **HOOKS).wait_ready()
    task_id = "resume-" + uuid.uuid4().hex
    try:
        r = victim.run(image_only(batch=1), f"?webhook={url}", headers={"X-Task-Id": task_id})
        assert r.status_code == 200, r.text
        receiver.wait(path, 1)
        deadline = time.monotonic() + 30
        while delivery(victim, task_id)["state"] != "retrying":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        victim.kill()
        victim.stop()
    assert len(receiver.at(path)) == 1  # killed before its retry
    state = wait_done(server, task_id)
    calls = receiver.at(path)
    assert [c.answered for c in calls] == [500, 200]
    assert all(c.verified for c in calls) and calls[0].webhook_id == calls[1].webhook_id
    assert state["state"] == "delivered"
    first, second = state["attempts"]
    assert first["instance_id"] != second["instance_id"]
    assert second["at"] >= first["next_try_at"]  # the recorded schedule was kept
    assert state["lease"]["generation"] >= 2




def test_websocket_runs_deliver_webhooks(server: Server, receiver: Receiver) -> None:
    path, url = receiver.new_hook("ws")
    ws = websocket.create_connection(f"{server.ws_url}?webhook={url}", timeout=60)
    try:
        finals = []
        for color in (0x101010, 0x202020):
            ws.send(json.dumps(image_only(batch=1, color=color)))
            while (ev := json.loads(ws.recv()))["type"] != "serverless_api":
                pass
            finals.append(ev)
    finally:
        ws.close()
    calls = receiver.wait(path, 2)
    assert all(c.verified for c in calls), [c.error for c in calls]
    assert sorted(c.payload["data"]["task_id"] for c in calls) == \
        sorted(f["data"]["task_id"] for f in finals)
    assert calls[0].webhook_id != calls[1].webhook_id  # one id per task

    refused = websocket.create_connection(f"{server.ws_url}?webhook=http://10.0.0.1/x", timeout=60)
    try:
        refused.send(json.dumps(image_only(batch=1)))
        ev = json.loads(refused.recv())
        assert ev["type"] == "serverless_api" and ev["data"]["error"]["type"] == "webhook_refused"
    finally:
        refused.close()
