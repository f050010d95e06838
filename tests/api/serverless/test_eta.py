"""The measured ETA and deadlines through the real HTTP API: real ComfyUI
(CPU) running the test pack's wait node and the tiny checkpoint. The 202's
position and ETA, ``queue`` events, Comfy API v2's job, ``/ready``'s
backlog, 429 for a deadline the ETA says cannot be met, 400 for a malformed
one, and the prior another instance reads from the shared log."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import text_to_image
from tests.servers import ROOT, Server

PACKS = ROOT / "tests" / "custom_nodes"
ASYNC = {"X-Fc-Invocation-Type": "Async"}


def wait_node(seconds: float) -> dict[str, Any]:
    """One node that runs ``seconds``, reporting progress (its shape: the seconds)."""
    return {"1": {"class_type": "EmbedTestSilentWait",
                  "inputs": {"seconds": seconds, "progress": True}}}


@pytest.fixture(scope="module")
def shared_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("etalog")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shared_log: Path) -> Iterator[Server]:
    # cache=none: the same graph runs again instead of being answered from the node cache.
    s = Server(tmp_path_factory.mktemp("eta"), custom_nodes=1, custom_nodes_dirs=PACKS,
               cache="none", task_log_dir=shared_log)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def ready(server: Server) -> dict[str, Any]:
    r = requests.get(f"{server.url}/ready", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def learn(server: Server, seconds: float) -> float:
    """Run the wait node once (synchronously): the server learns its shape.
    Returns the run's measured execution seconds (its report)."""
    r = server.run(wait_node(seconds))
    assert r.status_code == 200, r.text
    return float(r.json()["data"]["report"]["execution"])


def submit_async(server: Server, graph: dict[str, Any]) -> dict[str, Any]:
    r = server.run(graph, headers=ASYNC)
    assert r.status_code == 202, r.text
    return r.json()


def test_202_queue_events_and_ready_backlog(server: Server) -> None:
    learn(server, 1.0)
    assert ready(server)["backlog_seconds"] == 0.0  # idle, and every shape known
    answers = [submit_async(server, wait_node(1.0)) for _ in range(3)]
    positions = [a["position"] for a in answers]
    assert positions == [0, 1, 2] or positions == [0, 0, 1]  # the first may have started
    for a in answers:
        assert a["eta_start"] is not None and a["eta_finish"] is not None
        assert 0 <= a["eta_start"] < a["eta_finish"]
    # Each waits for the one before it: its start is no earlier than that one's finish.
    assert answers[2]["eta_start"] >= answers[1]["eta_finish"] - 0.5
    assert answers[2]["eta_start"] > answers[0]["eta_start"]
    backlog = ready(server)["backlog_seconds"]
    assert backlog is not None and backlog > 0
    last = server.wait_final(answers[2]["task_id"], timeout=60)
    assert last[-1]["data"]["status"] == "success"
    queued = [ev["data"] for ev in last if ev["type"] == "queue"]
    assert queued, last  # it waited behind the others, and was told so
    for data in queued:
        assert data["position"] >= 1
        assert data["eta_start"] is not None and data["eta_finish"] > data["eta_start"]
    assert [d["position"] for d in queued] == sorted((d["position"] for d in queued), reverse=True)
    report = last[-1]["data"]["report"]
    assert report["shape"] and report["estimate"] > 0  # what the next boot learns from
    for a in answers[:2]:
        server.wait_final(a["task_id"], timeout=60)
    assert ready(server)["backlog_seconds"] == 0.0
    # The ETA's error of every task that had an estimate, for operators.
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    counts = [smp.value for fam in text_string_to_metric_families(text)
              for smp in fam.samples if smp.name == "comfy_embed_eta_error_seconds_count"]
    assert counts and counts[0] >= 3


def test_the_v2_job_carries_its_eta(server: Server) -> None:
    learn(server, 1.5)
    blocker = submit_async(server, wait_node(1.5))
    r = requests.post(f"{server.url}/api/v2/jobs", json={"workflow": wait_node(1.5)}, timeout=30)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued", job  # behind the blocker
    assert job["eta_start"] is not None and job["eta_finish"] > job["eta_start"]
    got = requests.get(f"{server.url}/api/v2/jobs/{job['id']}", timeout=10).json()
    assert got["status"] in ("queued", "running"), got
    assert got["eta_finish"] is not None and got["eta_finish"] >= got["eta_start"] >= 0
    server.wait_final(blocker["task_id"], timeout=60)
    for _ in range(600):
        got = requests.get(f"{server.url}/api/v2/jobs/{job['id']}", timeout=10).json()
        if got["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert got["status"] == "succeeded", got
    assert got["eta_start"] is None and got["eta_finish"] is None  # ended: no ETA


def test_an_unmeetable_deadline_is_refused_at_once(server: Server) -> None:
    learn(server, 2.0)
    blocker = submit_async(server, wait_node(2.0))
    r = server.run(wait_node(2.0), headers={"X-Deadline": "0.5"})
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    error = r.json()["data"]["error"]
    assert error["type"] == "deadline_unmeetable"
    details = error["details"]
    assert details["eta_finish"] > details["deadline_in"] and details["estimate"] > 0
    past = (datetime.now(timezone.utc) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = server.run(wait_node(2.0), f"?deadline={past}")
    assert r.status_code == 429 and r.json()["data"]["error"]["type"] == "deadline_unmeetable"
    v2 = requests.post(f"{server.url}/api/v2/jobs", json={"workflow": wait_node(2.0)},
                       headers={"X-Deadline": "0.5"}, timeout=30)
    assert v2.status_code == 429, v2.text
    assert v2.json()["error"]["code"] == "deadline_unmeetable" and v2.headers["Retry-After"]
    # A deadline it can meet runs.
    ok = server.run(wait_node(2.0), "?deadline=600")
    assert ok.status_code == 200 and ok.json()["data"]["status"] == "success"
    server.wait_final(blocker["task_id"], timeout=60)
    assert server.run(text_to_image(steps=2)).status_code == 200  # still serving


def ws_final(ws: websocket.WebSocket, graph: dict[str, Any]) -> dict[str, Any]:
    """Send one workflow on the connection; its final event."""
    ws.send(json.dumps(graph))
    while True:
        ev = json.loads(ws.recv())
        if ev["type"] == "serverless_api":
            return ev


def test_a_websocket_deadline_counts_from_each_message(server: Server) -> None:
    learn(server, 1.0)
    tight = websocket.create_connection(f"{server.ws_url}?deadline=0.2", timeout=60)
    roomy = websocket.create_connection(f"{server.ws_url}?deadline=4", timeout=60)
    try:
        for _ in range(2):  # refused each time; the connection stays open
            final = ws_final(tight, wait_node(1.0))
            assert final["data"]["error"]["type"] == "deadline_unmeetable", final
        first = ws_final(roomy, wait_node(1.0))
        time.sleep(4.5)  # a deadline fixed at connect would have passed by now
        second = ws_final(roomy, wait_node(1.0))
        assert first["data"]["status"] == second["data"]["status"] == "success", second
    finally:
        tight.close()
        roomy.close()


@pytest.mark.parametrize(("where", "value", "named"), [
    ("header", "soon", "X-Deadline"),
    ("header", "2026-01-01T12:00:00", "X-Deadline"),
    ("query", "-1", "deadline"),
    ("query", "inf", "deadline"),
])
def test_a_malformed_deadline_is_400_naming_it(server: Server, where: str, value: str,
                                               named: str) -> None:
    headers = {"X-Deadline": value} if where == "header" else {}
    params = f"?deadline={value}" if where == "query" else ""
    r = server.run(wait_node(0.1), params, headers)
    assert r.status_code == 400, r.text
    assert r.json()["data"]["error"]["message"].startswith(named)
    v2 = requests.post(f"{server.url}/api/v2/jobs{params}", json={"workflow": wait_node(0.1)},
                       headers=headers, timeout=30)
    assert v2.status_code == 400, v2.text
    assert v2.json()["error"]["message"].startswith(named)


def test_another_instance_starts_from_the_logs_reports(
        server: Server, shared_log: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    learn(server, 0.5)  # in the shared log: a report with this shape and its time
    other = Server(tmp_path_factory.mktemp("eta-other"), custom_nodes=1, custom_nodes_dirs=PACKS,
                   cache="none", task_log_dir=shared_log, eta_fallback="none")
    try:
        other.wait_ready()
        # Nothing ran there and no fallback: only the prior can give an ETA.
        for _ in range(300):  # read in a thread as the instance starts
            if "read from the task log's reports" in other.log():
                break
            time.sleep(0.05)
        answer = submit_async(other, wait_node(0.5))
        assert answer["eta_finish"] is not None and answer["eta_finish"] > 0, other.log()
        other.wait_final(answer["task_id"], timeout=60)
        unseen = submit_async(other, wait_node(0.25))  # a shape run nowhere yet
        assert unseen["eta_finish"] is None  # ETA_FALLBACK=none: none, never made up
        other.wait_final(unseen["task_id"], timeout=60)
    finally:
        other.stop()
