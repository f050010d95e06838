"""Two comfy-embed instances sharing their output folder (and so the task log
and the asset store): a job submitted on A is polled, streamed, canceled and
its outputs downloaded on B, with the official Python SDK pointed at each in
turn through COMFY_BASE_URL; an Idempotency-Key retried on B replays A's
answer; a stream dropped on A re-syncs on B from the snapshot."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from comfy_sdk import Comfy
from comfy_sdk.events import StatusChange

from tests.api.v2.conformance import Conformance
from tests.api.v2.sdkflows import (
    LOAD,
    SAVE,
    invert_graph,
    is_inverted,
    long_graph,
    random_color,
    wait_until,
    write_png,
)
from tests.conftest import image_only
from tests.servers import Server

KEY = "v2-fleet-key-" + "f" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fleet-shared")


def _instance(base: Path, shared: Path) -> Server:
    return Server(base, api_keys=KEY, output_dir=shared / "output",
                  task_log_dir=shared / "output" / "log", lease_seconds=3)


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Iterator[Server]:
    s = _instance(tmp_path_factory.mktemp("fleet-a"), shared)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory, shared: Path, a: Server) -> Iterator[Server]:
    s = _instance(tmp_path_factory.mktemp("fleet-b"), shared)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def client_of(server: Server, monkeypatch: pytest.MonkeyPatch) -> Comfy:
    """The SDK reads COMFY_BASE_URL when a client is built."""
    monkeypatch.setenv("COMFY_BASE_URL", server.url)
    return Comfy(api_key=KEY)


def test_submit_on_a_everything_else_on_b(a: Server, b: Server, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    color = random_color()
    with client_of(a, monkeypatch) as on_a, client_of(b, monkeypatch) as on_b:
        wf = on_a.workflows.from_json(invert_graph("fleet"))
        asset = on_a.assets.from_file(write_png(tmp_path / "in.png", color))
        wf.set_input(LOAD, "image", asset)
        submitted = on_a.submit(wf)

        job = on_b.jobs.get(submitted.id)
        events = list(job.events())
        assert isinstance(events[-1], StatusChange) and events[-1].status == "succeeded"
        job.wait(timeout=120)
        (out,) = job.get_outputs(SAVE)
        assert is_inverted(out.to_bytes(), color)
        assert job.get_workflow().graph[SAVE]["class_type"] == "SaveImage"
        assert submitted.id in {s.id for s in on_b.list_jobs(limit=10)}

        # An asset uploaded on A is found by hash on B, and a job on B reads it.
        again = on_b.assets.from_file(tmp_path / "in.png")
        wf_b = on_b.workflows.from_json(invert_graph("fleet-b"))
        wf_b.set_input(LOAD, "image", again)
        ran_on_b = on_b.run(wf_b, timeout=180)
        assert again.created_new is False and again.hash == asset.hash
        assert is_inverted(ran_on_b.get_outputs(SAVE)[0].to_bytes(), color)


def test_cancel_on_b_a_job_running_on_a(a: Server, b: Server,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with client_of(a, monkeypatch) as on_a, client_of(b, monkeypatch) as on_b:
        running = on_a.submit(on_a.workflows.from_json(long_graph(seed=43)))
        job = on_b.jobs.get(running.id)
        wait_until(lambda: job.refresh().status == "running", "the job to run, seen from B")
        job.cancel()
        assert job.status in ("canceling", "canceled")
        job.wait(timeout=120)
        assert job.status == "canceled"
        assert running.wait(timeout=60).status == "canceled"  # A agrees


def test_cancel_on_b_a_job_queued_on_a(a: Server, b: Server,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A job still waiting on A, canceled from B, ends canceled without running."""
    with client_of(a, monkeypatch) as on_a, client_of(b, monkeypatch) as on_b:
        running = on_a.submit(on_a.workflows.from_json(long_graph(seed=59)))
        wait_until(lambda: running.refresh().status == "running", "the first job to run")
        waiting = on_a.submit(on_a.workflows.from_json(image_only(batch=1, color=0x010101)))
        job = on_b.jobs.get(waiting.id)
        assert job.status == "queued"
        assert job.cancel().status in ("canceling", "canceled")
        assert job.wait(timeout=120).status == "canceled"
        assert job.outputs == []
        seen = requests.get(f"{b.url}/api/v2/jobs/{job.id}", headers=AUTH, timeout=60).json()
        assert seen["started_at"] is None and seen["status"] == "canceled"
        running.cancel()
        assert running.wait(timeout=120).status == "canceled"


def test_idempotency_key_retried_on_b_replays_a(a: Server, b: Server) -> None:
    conf = Conformance()
    key = {**AUTH, "Idempotency-Key": str(uuid.uuid4())}
    body = {"workflow": image_only(batch=1, color=0x445566), "metadata": {"run": "fleet"}}
    first = requests.post(f"{a.url}/api/v2/jobs", json=body, headers=key, timeout=60)
    conf.check(first)
    assert first.status_code == 201, first.text
    replay = requests.post(f"{b.url}/api/v2/jobs", json=body, headers=key, timeout=60)
    conf.check(replay)
    assert replay.status_code == 201 and replay.headers.get("Idempotency-Replayed") == "true"
    assert replay.json()["id"] == first.json()["id"]
    changed = {**body, "metadata": {"run": "other"}}
    reuse = requests.post(f"{b.url}/api/v2/jobs", json=changed, headers=key, timeout=60)
    conf.check(reuse)
    assert reuse.status_code == 422 and reuse.json()["error"]["code"] == "idempotency_key_reuse"


def test_concurrent_retries_on_both_instances_make_one_job(a: Server, b: Server) -> None:
    """The same Idempotency-Key sent to A and B at once: one job; every other
    answer is its replay or 409 idempotency_conflict with Retry-After."""
    conf = Conformance()
    tag = uuid.uuid4().hex[:12]
    key = {**AUTH, "Idempotency-Key": str(uuid.uuid4())}
    body = {"workflow": image_only(batch=1, color=0x778899), "metadata": {"race": tag}}

    def post(server: Server) -> requests.Response:
        return requests.post(f"{server.url}/api/v2/jobs", json=body, headers=key, timeout=60)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, [a, b] * 3))
    for r in answers:
        conf.check(r)
    assert {r.status_code for r in answers} <= {201, 409}, [r.text for r in answers]
    created = {r.json()["id"] for r in answers if r.status_code == 201}
    assert len(created) == 1
    for r in answers:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "idempotency_conflict"
            assert int(r.headers["Retry-After"]) >= 1
    listed = requests.get(f"{b.url}/api/v2/jobs", params={"metadata[race]": tag}, headers=AUTH,
                          timeout=60).json()["jobs"]
    assert [j["id"] for j in listed] == list(created)


def _frames(resp: requests.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    name = "message"
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            yield name, json.loads(line.split(":", 1)[1])


def test_stream_dropped_on_a_resyncs_on_b(a: Server, b: Server) -> None:
    job = requests.post(f"{a.url}/api/v2/jobs", json={"workflow": long_graph(seed=47)},
                        headers=AUTH, timeout=60).json()
    seen: dict[str, Any] = {}
    with requests.get(f"{a.url}/api/v2/jobs/{job['id']}/events", headers=AUTH, stream=True,
                      timeout=120) as on_a:
        for name, data in _frames(on_a):
            # value rounds to 4 places: step 1 of many, before ComfyUI's
            # throttled progress_state says a node finished, reads 0.0.
            if name == "progress" and data["step"] and data["value"] > 0:
                seen = data
                break
    assert seen["value"] > 0
    # B reads the shared log, which A writes every task_log_flush_seconds
    # (0.5 s): what A's live stream showed is there a flush later.
    time.sleep(1.0)
    with requests.get(f"{b.url}/api/v2/jobs/{job['id']}/events", headers=AUTH, stream=True,
                      timeout=120) as on_b:
        frames = _frames(on_b)
        snapshot = [next(frames), next(frames)]
        assert snapshot[0] == ("status", {"status": "running", "queue_position": None})
        # A complete snapshot from the shared log: it may trail A's live
        # stream by a throttled step, never by a node.
        assert snapshot[1][0] == "progress", snapshot
        resync = snapshot[1][1]
        assert resync["nodes_done"] >= seen["nodes_done"] and resync["value"] > 0
        assert resync["nodes_total"] == seen["nodes_total"]
        cancel = requests.post(f"{b.url}/api/v2/jobs/{job['id']}/cancel", headers=AUTH, timeout=60)
        assert cancel.status_code == 200
        rest = list(frames)
    assert rest[-1] == ("status", {"status": "canceled", "queue_position": None})
