"""Fair share between API keys and queued jobs dropped at their deadline
(issue 28), on a real server running real ComfyUI with the test pack.

A long, interruptible job (EmbedTestSilentWait) holds the executor while the
queue fills; cancelling it lets the queue run. Which job ran when is read
from EmbedTestEcho's own view of ComfyUI's queue (``info.remaining``: jobs
queued plus the running one when it ran), not from the clock.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from comfy_embed.api.auth import hash_key
from tests.servers import Server

ROOT = Path(__file__).resolve().parents[3]
PACKS = ROOT / "tests" / "custom_nodes"
FLOOD, TRICKLE, SMALL = "fair-flood-key-0001", "fair-trickle-key-0002", "fair-small-key-0003"
KEY_QUEUE = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("fair"), custom_nodes=1, custom_nodes_dirs=PACKS,
               api_keys=f"{FLOOD},{TRICKLE},{SMALL}", key_queue=KEY_QUEUE,
               # SMALL's own quota: one waiting job (its key id: the start of its hash)
               key_quotas=f"{hash_key(SMALL)[:12]}=1/1",
               # No ETA for a shape never run: a deadline job is admitted, then waits.
               eta_fallback="none")
    try:
        yield s.wait_ready(headers={"X-Api-Key": FLOOD})
    finally:
        s.stop()


def _h(key: str, **more: str) -> dict[str, str]:
    return {"X-Api-Key": key, **more}


def submit(server: Server, key: str, graph: dict[str, Any], **headers: str) -> requests.Response:
    return requests.post(f"{server.url}/api/serverless/run", json=graph, timeout=60,
                         headers=_h(key, **{"X-Fc-Invocation-Type": "Async", **headers}))


def status(server: Server, key: str, task_id: str) -> list[dict[str, Any]]:
    r = requests.get(f"{server.url}/api/serverless/status", params={"task_id": task_id},
                     headers=_h(key), timeout=10)
    r.raise_for_status()
    return r.json()


def until(what: str, test: Any, timeout: float = 120) -> Any:
    """Poll ``test`` until it returns something true (bounded)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = test()
        if got:
            return got
        time.sleep(0.1)
    raise TimeoutError(what)


def final(server: Server, key: str, task_id: str) -> dict[str, Any]:
    def last() -> dict[str, Any] | None:
        events = status(server, key, task_id)
        return events[-1] if events and events[-1]["type"] == "serverless_api" else None
    return until(f"final event of {task_id}", last)


def echo(text: str) -> dict[str, Any]:
    return {"1": {"class_type": "EmbedTestEcho", "inputs": {"text": text}}}


def hold(server: Server, key: str, seconds: float) -> str:
    """Start a long interruptible job and wait until it runs; its task id."""
    r = submit(server, key, {"1": {"class_type": "EmbedTestSilentWait",
                                   "inputs": {"seconds": seconds, "progress": False}}})
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    until("the holding job runs", lambda: any(
        e["type"] == "execution_start" for e in status(server, key, task_id)))
    return task_id


def release(server: Server, key: str, task_id: str) -> None:
    r = requests.post(f"{server.url}/api/serverless/cancel", params={"task_id": task_id},
                      headers=_h(key), timeout=10)
    assert r.status_code in (200, 202), r.text


def test_a_flood_delays_another_keys_job_by_at_most_one(server: Server) -> None:
    held = hold(server, FLOOD, 120.0)
    flood = []
    for i in range(KEY_QUEUE):
        r = submit(server, FLOOD, echo(f"flood-{i}-{time.time_ns()}"))
        assert r.status_code == 202, r.text
        assert r.json()["position"] == i + 1
        flood.append(r.json()["task_id"])
    r = submit(server, TRICKLE, echo(f"trickle-{time.time_ns()}"))
    assert r.status_code == 202, r.text
    assert r.json()["position"] == 1  # next: only the running job is ahead
    trickle = r.json()["task_id"]
    # The flood's first job was told it moved back by one.
    places = [e["data"]["position"] for e in status(server, FLOOD, flood[0])
              if e["type"] == "queue"]
    assert places == [1, 2], places
    release(server, FLOOD, held)
    assert final(server, FLOOD, held)["data"]["error"]["type"] == "execution_interrupted"
    done = final(server, TRICKLE, trickle)
    assert done["data"]["status"] == "success", done
    # When it ran, the whole flood still waited behind it: it ran next-but-one.
    assert done["data"]["outputs"]["1"]["info"][0]["remaining"] == 1 + KEY_QUEUE
    seen = [final(server, FLOOD, t)["data"]["outputs"]["1"]["info"][0]["remaining"] for t in flood]
    assert seen == list(range(KEY_QUEUE, 0, -1))  # the flood in its own order, after it


def test_quotas_are_429_naming_the_limit(server: Server) -> None:
    held = hold(server, FLOOD, 120.0)
    try:
        queued = [submit(server, FLOOD, echo(f"q-{i}-{time.time_ns()}")) for i in range(KEY_QUEUE)]
        assert all(r.status_code == 202 for r in queued)
        over = submit(server, FLOOD, echo(f"over-{time.time_ns()}"))
        assert over.status_code == 429, over.text
        assert int(over.headers["Retry-After"]) >= 1
        error = over.json()["data"]["error"]
        assert error["type"] == "key_queue_full"
        assert error["details"] == {"limit": "key_queue", "value": KEY_QUEUE}
        assert f"key_queue={KEY_QUEUE}" in error["message"]
        # Another key still has room; SMALL's own quota is one waiting job.
        assert submit(server, TRICKLE, echo(f"t-{time.time_ns()}")).status_code == 202
        assert submit(server, SMALL, echo(f"s1-{time.time_ns()}")).status_code == 202
        small = submit(server, SMALL, echo(f"s2-{time.time_ns()}"))
        assert small.status_code == 429 and small.json()["data"]["error"]["details"]["value"] == 1
        # Comfy API v2 answers the same refusal in its envelope.
        v2 = requests.post(f"{server.url}/api/v2/jobs", headers=_h(FLOOD), timeout=30,
                           json={"workflow": echo(f"v2-{time.time_ns()}")})
        assert v2.status_code == 429, v2.text
        assert v2.json()["error"]["code"] == "key_queue_full"
        assert v2.json()["error"]["details"]["limit"] == "key_queue"
        assert int(v2.headers["Retry-After"]) >= 1
        tasks = [r.json()["task_id"] for r in queued]
    finally:
        release(server, FLOOD, held)
    for t in tasks:
        assert final(server, FLOOD, t)["data"]["status"] == "success"


def test_a_queued_job_past_its_deadline_is_dropped_unrun(server: Server) -> None:
    held = hold(server, FLOOD, 120.0)
    try:
        # A shape never run: no ETA, so it is admitted, and waits.
        graph = {"1": {"class_type": "EmbedTestSilentWait",
                       "inputs": {"seconds": 0.123, "progress": False}}}
        r = submit(server, TRICKLE, graph, **{"X-Deadline": "1.5"})
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        # Dropped when the deadline passes, while the holding job still runs.
        done = final(server, TRICKLE, task_id)
        assert not any(e["type"] == "execution_start" for e in status(server, TRICKLE, task_id))
        # A sync run waits for the same end: 504 (a timeout), as the error table says.
        sync = requests.post(f"{server.url}/api/serverless/run", json=graph, timeout=60,
                             headers=_h(TRICKLE, **{"X-Deadline": "1"}))
        assert sync.status_code == 504, sync.text
        assert sync.json()["data"]["error"]["type"] == "deadline_exceeded"
        assert status(server, FLOOD, held)[-1]["type"] != "serverless_api"
    finally:
        release(server, FLOOD, held)
    error = done["data"]["error"]
    assert error["type"] == "deadline_exceeded", error
    assert "deadline passed" in error["message"] and "not run" in error["message"]
