"""Metrics and the per-task report, through a real server running real ComfyUI."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import image_only, text_to_image
from tests.servers import Server
from tests.api.serverless.test_server import sse_events

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("observe"))
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of one /metrics answer."""
    r = requests.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def png_base64(color: tuple[int, int, int]) -> tuple[str, int]:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode(), len(buf.getvalue())


def test_metrics_follow_success_error_and_cached_rerun(server: Server) -> None:
    m0 = scrape(server)
    assert m0[("process_resident_memory_bytes", ())] > 0
    assert ("comfy_embed_tasks_queued", ()) in m0 and ("comfy_embed_tasks_running", ()) in m0

    # 1. A first text-to-image run reads the checkpoint from disk.
    r = server.run(text_to_image(steps=2, seed=11))
    assert r.status_code == 200, r.text
    m1 = scrape(server)
    assert delta(m0, m1, "comfy_embed_tasks_total", status="success", error_type="none") == 1
    assert delta(m0, m1, "comfy_embed_model_loads_total", loader="CheckpointLoaderSimple") == 1
    assert delta(m0, m1, "comfy_embed_model_cache_hits_total", loader="CheckpointLoaderSimple") == 0
    for hist in ("comfy_embed_queue_wait_seconds", "comfy_embed_execution_seconds",
                 "comfy_embed_task_end_to_end_seconds", "comfy_embed_render_seconds",
                 "comfy_embed_model_load_seconds"):
        assert delta(m0, m1, hist + "_count") == 1, hist
    assert delta(m0, m1, "comfy_embed_task_log_write_seconds_count") >= 1
    assert delta(m0, m1, "comfy_embed_executor_busy_seconds_total") > 0
    # No object storage configured here: nothing uploaded.
    assert delta(m0, m1, "comfy_embed_upload_seconds_count") == 0

    # 2. Another seed: the loader output is cached, the model stays resident.
    r = server.run(text_to_image(steps=2, seed=12))
    assert r.status_code == 200, r.text
    m2 = scrape(server)
    assert delta(m1, m2, "comfy_embed_model_loads_total", loader="CheckpointLoaderSimple") == 0
    assert delta(m1, m2, "comfy_embed_model_cache_hits_total", loader="CheckpointLoaderSimple") == 1
    assert delta(m1, m2, "comfy_embed_tasks_total", status="success", error_type="none") == 1

    # 3. An invalid graph (refused before queueing) and a node failing mid-run.
    bad = image_only()
    bad["1"]["inputs"]["width"] = "wide"
    assert server.run(bad).status_code == 400
    broken = Path(server.log_path).parent / "input" / "broken.png"
    broken.write_bytes(b"not a png")
    failing = {"1": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}},
               "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "b", "images": ["1", 0]}}}
    assert server.run(failing).status_code == 500
    m3 = scrape(server)
    assert delta(m2, m3, "comfy_embed_tasks_total", status="error",
                 error_type="prompt_outputs_failed_validation") == 1
    assert delta(m2, m3, "comfy_embed_tasks_total", status="error", error_type="execution_error") == 1
    assert delta(m2, m3, "comfy_embed_tasks_total", status="success", error_type="none") == 0
    # Only the task that was queued waited and executed.
    assert delta(m2, m3, "comfy_embed_queue_wait_seconds_count") == 1

    # 4. An inline image input: its decoded bytes are counted.
    data, size = png_base64((1, 2, 3))
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": data}},
             "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "in", "images": ["1", 0]}}}
    assert server.run(graph).status_code == 200
    m4 = scrape(server)
    assert delta(m3, m4, "comfy_embed_input_bytes_total", source="base64") == size
    assert delta(m3, m4, "comfy_embed_inputs_fetched_total", source="base64") == 1
    assert m4[("comfy_embed_tasks_queued", ())] == 0
    assert m4[("comfy_embed_tasks_running", ())] == 0


def check_report(report: dict[str, Any]) -> None:
    parts = ("prepare", "validation", "queued", "execution", "handoff", "render")
    assert all(report[p] >= 0 for p in parts)
    # The phases are measured separately but share their boundaries: what is
    # left is building the final event (microseconds; the margin is for a GC
    # pause on a shared 2-core machine).
    gap = report["end_to_end"] - sum(report[p] for p in parts)
    assert -1e-5 <= gap < 0.005, (gap, report)  # -: rounding to microseconds
    assert sum(n["seconds"] for n in report["nodes"]) <= report["execution"]
    assert report["upload"] <= report["render"]
    assert report["peak_rss_bytes"] > 0


def test_report_adds_up_and_is_in_the_status_log(server: Server) -> None:
    graph = text_to_image(steps=2, seed=21)
    r = server.run(graph, headers={"X-Task-Id": "report-1"})
    assert r.status_code == 200, r.text
    report = r.json()["data"]["report"]
    check_report(report)
    executed = {n["node"]: n["class_type"] for n in report["nodes"]}
    assert executed["3"] == "KSampler" and executed["9"] == "SaveImage"
    # The checkpoint was loaded by the module's earlier runs or now: either
    # way it is named, with the node that loaded it.
    models = report["models"]
    entries = models["loaded"] + models["resident"]
    assert [(e["node"], e["class_type"]) for e in entries] == [("4", "CheckpointLoaderSimple")]
    assert entries[0]["name"]
    # The same report, from the task log.
    final = server.status("report-1")[-1]
    assert final["type"] == "serverless_api" and final["data"]["report"] == report

    # A rerun under another task id executes only SaveImage (its output
    # folder is per task); everything else, the loader included, is cached.
    again = server.run(graph).json()["data"]["report"]
    check_report(again)
    assert [n["node"] for n in again["nodes"]] == ["9"]
    assert set(again["cached_nodes"]) == set(graph) - {"9"}
    assert again["models"] == {"loaded": [], "evicted": [], "resident": [
        {"node": "4", "class_type": "CheckpointLoaderSimple", "name": entries[0]["name"],
         "kept": False}]}


def test_failed_task_has_a_report(server: Server) -> None:
    broken = Path(server.log_path).parent / "input" / "broken2.png"
    broken.write_bytes(b"not a png either")
    failing = {"1": {"class_type": "LoadImage", "inputs": {"image": "broken2.png"}},
               "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "b", "images": ["1", 0]}}}
    r = server.run(failing)
    assert r.status_code == 500
    report = r.json()["data"]["report"]
    check_report(report)
    assert report["render"] == 0 and report["execution"] > 0


def test_queue_positions_count_down_behind_long_tasks(server: Server) -> None:
    def submit_async(task_id: str, steps: int) -> None:
        r = server.run(text_to_image(steps=steps, seed=31), headers={
            "X-Task-Id": task_id, "X-Fc-Invocation-Type": "Async"})
        assert r.status_code == 202, r.text

    def cancel(task_id: str) -> None:
        r = requests.post(f"{server.url}/api/serverless/cancel", params={"task_id": task_id},
                          timeout=10)
        assert r.status_code == 200, r.text

    # A runs for a very long time; B waits, then runs long; C waits.
    submit_async("q-a", 10_000)
    deadline = time.monotonic() + 60
    while not any(e["type"] == "execution_start" for e in server.status("q-a")):
        assert time.monotonic() < deadline, "task A never started"
        time.sleep(0.05)
    submit_async("q-b", 10_000)
    submit_async("q-c", 2)
    positions: list[int] = []
    with requests.post(f"{server.url}/api/serverless/run?stream=true",
                       json=image_only(color=0x123456), headers={"X-Task-Id": "q-d"},
                       stream=True, timeout=120) as r:
        assert r.status_code == 200
        for ev in sse_events(r):
            if ev["type"] == "queue":
                positions.append(ev["data"]["position"])
                if positions == [3]:  # A running, B and C queued ahead
                    ready = requests.get(server.url + "/ready", timeout=10)
                    assert ready.json()["queue_depth"] == 4
                    assert ready.headers["X-Queue-Depth"] == "4"
                    cancel("q-c")  # a queued task ahead leaves
                elif positions == [3, 2]:
                    cancel("q-a")  # the running one ends, B starts
                elif positions == [3, 2, 1]:
                    cancel("q-b")  # D runs next
            elif ev["type"] == "execution_start":
                assert positions == [3, 2, 1]
            final = ev
    assert final["type"] == "serverless_api" and final["data"]["status"] == "success"
    assert positions == [3, 2, 1]
    # The status log, from any instance, tells the same.
    logged = [e["data"]["position"] for e in server.status("q-d") if e["type"] == "queue"]
    assert logged == [3, 2, 1]
    assert requests.get(server.url + "/health", timeout=10).headers["X-Queue-Depth"] == "0"
