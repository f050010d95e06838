"""N variants through the real HTTP API: real ComfyUI (CPU), the tiny
checkpoint and the test pack. ?variants=N, extra_data.variants (given
seeds), the node cache reused between variants, the bound, a failing
variant, a cancel between variants, the stream and Comfy API v2's job."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import websocket
from PIL import Image

from tests.conftest import text_to_image
from tests.servers import ROOT, Server

PACKS = ROOT / "tests" / "custom_nodes"
AUTH = {"Authorization": "Bearer variants-key"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # 64x64 pictures: about 12 KB each by the output estimate; 3 variants fit, 4 do not.
    s = Server(tmp_path_factory.mktemp("variants"), custom_nodes=1, custom_nodes_dirs=PACKS,
               max_variants=4, max_output_bytes=40_000)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def t2i(text: str, steps: int = 3, seed: int = -1) -> dict[str, Any]:
    g = text_to_image(steps=steps, size=64, seed=seed)
    g["6"]["inputs"]["text"] = text  # its own text: its encoder is not cached from another test
    return g


def pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.tobytes()


def final_of(r: requests.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "serverless_api", body
    return body["data"]


def test_three_variants_distinct_seeds_and_images_with_the_cache_reused(server: Server) -> None:
    task_id = f"v3-{uuid.uuid4().hex[:8]}"
    data = final_of(server.run(t2i(f"three variants {task_id}"), "?variants=3",
                               headers={"X-Task-Id": task_id}))
    assert data["status"] == "success"
    groups = data["variants"]
    assert [g["variant"] for g in groups] == [1, 2, 3]
    seeds = [g["seeds"]["3"] for g in groups]
    assert len(set(seeds)) == 3, seeds
    assert data["seeds"] == groups[0]["seeds"]
    results = data["results"]
    assert [r["variant"] for r in results] == [1, 2, 3]
    assert [g["result_indexes"] for g in groups] == [[0], [1], [2]]
    # One index sequence per node across variants; each variant in its own folder.
    assert [(r["node_id"], r["index"]) for r in results] == [("9", 0), ("9", 1), ("9", 2)]
    comfy = [r["output"]["comfy"] for r in results]
    assert [c["subfolder"] for c in comfy] == [f"{task_id}/v1", f"{task_id}/v2", f"{task_id}/v3"]
    digests = {hashlib.sha256(server.file_of(c).read_bytes()).hexdigest() for c in comfy}
    assert len(digests) == 3  # three different pictures

    events = [e for e in server.status(task_id)]
    starts = [e["data"] for e in events if e["type"] == "variant"]
    assert [(s["variant"], s["variants"], s["seeds"]["3"]) for s in starts] == [
        (1, 3, seeds[0]), (2, 3, seeds[1]), (3, 3, seeds[2])]
    # The loader and the text encoders ran in variant 1 only; variants 2 and
    # 3 took them from ComfyUI's cache and ran the sampler again.
    ran = [(e["data"]["variant"], e["data"]["node"]) for e in events
           if e["type"] == "executing" and e["data"].get("node") is not None]
    assert (1, "6") in ran
    assert not [n for v, n in ran if v > 1 and n in ("4", "6", "7")], ran
    assert {(2, "3"), (3, "3")} <= set(ran)
    cached = {e["data"]["variant"]: set(e["data"]["nodes"]) for e in events
              if e["type"] == "execution_cached"}
    assert {"4", "6", "7"} <= cached[2] and {"4", "6", "7"} <= cached[3]
    assert sum(1 for e in events if e["type"] == "serverless_api") == 1
    # Native's "prompt done" goes out once, after the last variant.
    dones = [e["data"] for e in events if e["type"] == "executing" and e["data"]["node"] is None]
    assert [d["variant"] for d in dones] == [3]


def test_given_seeds_are_used_and_the_stream_shows_each_variant(server: Server) -> None:
    body = {"prompt": t2i("given seeds"), "extra_data": {"variants": [11, {"3": 22}]}}
    r = requests.post(f"{server.url}/api/serverless/run?stream=1", json=body, timeout=120)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    final = events[-1]
    assert final["type"] == "serverless_api" and final["data"]["status"] == "success", final
    assert [g["seeds"] for g in final["data"]["variants"]] == [{"3": 11}, {"3": 22}]
    assert [e["data"]["variant"] for e in events if e["type"] == "variant"] == [1, 2]
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert {p["variant"] for p in progress} == {1, 2} and all(p["variants"] == 2 for p in progress)
    # The same seed as a plain run gives the same picture as that variant
    # (pixels: the PNG's metadata names the prompt, whose folder differs).
    plain = final_of(server.run(t2i("given seeds", seed=22)))
    pictures = [pixels(server.file_of(r["output"]["comfy"]))
                for r in (final["data"]["results"][1], plain["results"][0])]
    assert pictures[0] == pictures[1]


def test_the_websocket_shows_each_variant(server: Server) -> None:
    ws = websocket.create_connection(f"{server.ws_url}?variants=2", timeout=120)
    try:
        ws.send(json.dumps(t2i("websocket variants")))
        events = []
        while not events or events[-1]["type"] != "serverless_api":
            events.append(json.loads(ws.recv()))
    finally:
        ws.close()
    final = events[-1]["data"]
    assert final["status"] == "success" and len(final["variants"]) == 2, final
    assert [e["data"]["variant"] for e in events if e["type"] == "variant"] == [1, 2]
    successes = [e["data"] for e in events if e["type"] == "execution_success"]
    assert [(d["variant"], d["variants"]) for d in successes] == [(1, 2), (2, 2)]


def test_the_same_seed_twice_still_writes_two_files(server: Server) -> None:
    data = final_of(server.run({"prompt": t2i("same seed"), "extra_data": {"variants": [5, 5]}}))
    files = [server.file_of(r["output"]["comfy"]) for r in data["results"]]
    assert len(files) == 2 and files[0] != files[1]
    assert pixels(files[0]) == pixels(files[1])


@pytest.mark.parametrize("params, body_variants, words", [
    ("?variants=5", None, "variants must be between 1 and 4 (COMFY_EMBED_MAX_VARIANTS); got 5"),
    ("?variants=0", None, "variants must be between 1 and"),
    ("", [1, 2, 3, 4, 5], "variants must list between 1 and 4"),
    ("", 9, "variants must be between 1 and 4"),
    ("", [1, "x"], "variants[1] must be an int seed"),
    ("", [{"5": 1}], "variants[0] names node 5, which has no seed input"),
])
def test_variants_over_the_bound_or_malformed_is_400(server: Server, params: str,
                                                      body_variants: Any, words: str) -> None:
    body: dict[str, Any] = {"prompt": t2i("refused")}
    if body_variants is not None:
        body["extra_data"] = {"variants": body_variants}
    r = server.run(body, params)
    assert r.status_code == 400, r.text
    message = r.json()["data"]["error"]["message"]
    assert words in message, message
    assert final_of(server.run(t2i("still serving")))["status"] == "success"


def test_the_output_limit_holds_for_all_variants_together(server: Server) -> None:
    r = server.run(t2i("too much output"), "?variants=4")
    assert r.status_code == 400, r.text
    error = r.json()["data"]["error"]
    assert error["type"] == "output_too_large"
    assert error["message"].startswith("variants: 4 variants would write over the output limit "
                                       "of 40000 bytes in all"), error
    assert "COMFY_EMBED_MAX_OUTPUT_BYTES" in error["message"] and "5" in error["node_errors"]


def test_the_dry_run_checks_variants_as_a_run_would(server: Server) -> None:
    def validate(params: str, body: Any) -> requests.Response:
        return requests.post(f"{server.url}/api/serverless/validate{params}", json=body,
                             timeout=60)
    # A fixed seed: the dry run does not draw -1 seeds (ComfyUI's check refuses -1).
    ok = validate("?variants=3", t2i("dry run", seed=5))
    assert ok.status_code == 200 and ok.json()["valid"] is True, ok.text
    for params, body, words in (
            ("?variants=5", t2i("dry run", seed=5), "variants must be between 1 and 4"),
            ("", {"prompt": t2i("dry run", seed=5), "extra_data": {"variants": [1, -3]}},
             "variants[1]: seed -3 is out of range for node 3 (KSampler) input 'seed'"),
            ("?variants=4", t2i("dry run", seed=5), "variants: 4 variants would write over")):
        r = validate(params, body)
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["valid"] is False and words in report["error"]["message"], report
    bad = validate("?variants=many", t2i("dry run", seed=5))
    assert bad.status_code == 400 and "variants must be a whole number" in bad.text


def test_variants_without_a_seed_input_is_400(server: Server) -> None:
    graph = {"1": {"class_type": "EmbedTestFlexible", "inputs": {"x": 1}}}
    r = server.run(graph, "?variants=2")
    assert r.status_code == 400 and "needs a seed input" in r.json()["data"]["error"]["message"]


def test_a_failing_variant_ends_the_task_naming_it_and_the_node(server: Server) -> None:
    graph = {"1": {"class_type": "EmbedTestFailOnSeed", "inputs": {"seed": 0, "fail_on": 7}}}
    r = server.run({"prompt": graph, "extra_data": {"variants": [1, 7, 3]}})
    body = r.json()
    assert r.status_code == 500, body
    error = body["data"]["error"]
    assert error["message"].startswith("variant 2 of 3: node 1 (EmbedTestFailOnSeed) failed"), error
    assert error["details"]["variant"] == 2 and "1" in error["node_errors"]


def test_cancel_stops_the_remaining_variants(server: Server) -> None:
    task_id = f"vc-{uuid.uuid4().hex[:8]}"
    r = server.run(t2i("cancelled", steps=40), "?variants=3",
                   headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # cancel once variant 2 has started
        if any(e["type"] == "variant" and e["data"]["variant"] == 2
               for e in server.status(task_id)):
            break
        time.sleep(0.05)
    else:
        pytest.fail("variant 2 never started")
    requests.post(f"{server.url}/api/serverless/cancel", params={"task_id": task_id}, timeout=10)
    events = server.wait_final(task_id)
    final = events[-1]["data"]
    assert final["status"] == "error" and final["error"]["type"] == "execution_interrupted", final
    assert "variant 2 of 3" in final["error"]["message"]
    assert [e["data"]["variant"] for e in events if e["type"] == "variant"] == [1, 2]


def test_v2_job_shows_progress_across_variants(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = Server(tmp_path_factory.mktemp("variants-v2"), api_keys="variants-key")
    try:
        s.wait_ready(headers=AUTH)
        r = requests.post(f"{s.url}/api/v2/jobs", headers=AUTH, timeout=60, json={
            "workflow": t2i("v2 variants", steps=30), "extra_data": {"variants": 2}})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = requests.get(f"{s.url}/api/v2/jobs/{job_id}", headers=AUTH, timeout=10).json()
            if job["status"] == "running" and job.get("progress"):
                seen.append(job["progress"])
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.05)
        assert job["status"] == "succeeded", job
        assert len({o["id"] for o in job["outputs"]}) == 2  # one picture each, distinct assets
        second = [p for p in seen if p.get("variant") == 2]
        assert second and all(p["variants"] == 2 and p["value"] >= 0.5 for p in second), seen
        values = [p["value"] for p in seen]
        assert values == sorted(values), values  # overall progress never goes back
    finally:
        s.stop()
