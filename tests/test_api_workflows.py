"""The workflows people actually use, through the real HTTP API: a custom-node
pack using the server surface, native's request envelope, partial execution,
non-file outputs, audio and video in and out, and the dry run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from .conftest import image_only, text_to_image
from .servers import ROOT, Server

PACKS = ROOT / "tests" / "custom_nodes"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("wf"), custom_nodes=1, custom_nodes_dirs=PACKS,
               url_allowlist="127.0.0.1", fetch_timeout=5, max_media_seconds=30)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def stream(server: Server, body: Any, params: str = "") -> list[dict[str, Any]]:
    r = requests.post(f"{server.url}/api/serverless/run?stream=1{params}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


# ------------------------------------------------------------- custom-node packs
def test_ready_names_loaded_and_failing_packs(server: Server) -> None:
    body = requests.get(server.url + "/ready", timeout=5).json()
    assert body["status"] == "ready"
    assert "embed_test_pack" in body["custom_nodes"]["loaded"]
    failed = body["custom_nodes"]["failed"]
    assert "not_installed_anywhere" in failed["embed_broken_pack"]
    # The traceback is logged once, under the pack's name, and the summary names it.
    log = server.log_path.read_text()
    assert log.count('embed_broken_pack/__init__.py", line 4') == 1
    assert "FAILED: embed_broken_pack" in log


def test_pack_using_the_server_surface_runs(server: Server) -> None:
    graph = {"1": {"class_type": "EmbedTestEcho", "inputs": {"text": "REWRITE_ME"}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    events = stream(server, {"prompt": graph, "client_id": "my-client",
                             "extra_data": {"embed_test_marker": "m-1"}})
    final = events[-1]
    assert final["type"] == "serverless_api" and final["data"]["status"] == "success", final
    # The on-prompt handler rewrote the request (the failing one was skipped).
    out = final["data"]["outputs"]["1"]
    assert out["text"] == ["rewritten"] and out["length"] == [9]
    info = out["info"][0]
    assert info["prompt_id"] == final["data"]["prompt_id"]
    assert info["running"] == 1 and info["remaining"] >= 1
    assert info["extra_marker"] == "m-1" and info["client_id"] == "my-client"
    assert info["last_node_id"] == "1" and info["number"] >= 1
    assert {"/embed_test/hello", "/embed_test/files", "/embed_test/app"} <= set(info["routes"])
    assert info["supports_web"] and info["prestartup_ran"]
    assert final["data"]["outputs"]["2"] == {"text": ["rewritten"]}
    texts = [e["data"] for e in events if e["type"] == "progress_text"]
    assert {"node": "1", "text": "echo rewritten", "prompt_id": info["prompt_id"]} in texts
    assert any(t["text"] == "binary text" for t in texts)
    assert {"node": "1", "text": "rewritten"} in [e["data"] for e in events
                                                  if e["type"] == "embed_test.echo"]
    assert "on-prompt handler failing_on_prompt failed" in server.log_path.read_text()


# ------------------------------------------------------------ non-file outputs
def test_text_outputs_in_the_non_streamed_result(server: Server) -> None:
    graph = image_only(batch=1, size=16)
    graph["4"] = {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}}
    graph["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}
    r = server.run(graph)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["outputs"]["5"] == {"text": ["16"]}
    assert [x["node_id"] for x in data["results"]] == ["3"]
    assert "3" not in data["outputs"]  # files are results, not outputs


# ------------------------------------------------------ native's request envelope
def test_partial_execution_targets_run_only_those_outputs(server: Server) -> None:
    graph = image_only(batch=1, size=16)
    graph["4"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "other",
                                                        "images": ["1", 0]}}
    graph["5"] = {"class_type": "PreviewAny", "inputs": {"source": "not run"}}
    r = server.run({"prompt": graph, "partial_execution_targets": ["4"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [x["node_id"] for x in data["results"]] == ["4"]
    assert data["outputs"] == {}
    r = server.run({"prompt": graph, "partial_execution_targets": ["4", "77"]})
    assert r.status_code == 400
    assert "77" in r.json()["data"]["error"]["message"]
    r = server.run({"prompt": graph, "partial_execution_targets": "4"})
    assert r.status_code == 400
    assert "partial_execution_targets" in r.json()["data"]["error"]["message"]


def test_envelope_extra_data_reaches_nodes(server: Server) -> None:
    from PIL import Image

    workflow = {"nodes": [], "links": [], "note": "from extra_pnginfo"}
    r = server.run({"prompt": image_only(batch=1, size=16), "client_id": "c",
                    "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    assert r.status_code == 200, r.text
    c = r.json()["data"]["results"][0]["output"]["comfy"]
    with Image.open(Path(c["dir"], c["subfolder"], c["filename"])) as im:
        assert json.loads(im.info["workflow"]) == workflow  # as native SaveImage writes it


# ------------------------------------------------------------------- dry run
def validate(server: Server, body: Any) -> dict[str, Any]:
    r = requests.post(f"{server.url}/api/serverless/validate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_validate_names_missing_nodes_and_suggests_models(server: Server) -> None:
    graph = text_to_image(steps=2)
    graph["4"]["inputs"]["ckpt_name"] = "tiny-sd15.safetensor"
    graph["10"] = {"class_type": "NoSuchNode", "inputs": {}}
    report = validate(server, graph)
    assert report["valid"] is False
    assert report["missing_nodes"] == [{"node_id": "10", "class_type": "NoSuchNode"}]
    assert "node 10 (NoSuchNode) does not exist" in report["error"]["message"]
    assert report["node_errors"]["10"]["class_type"] == "NoSuchNode"
    (missing,) = report["missing_models"]
    assert missing["node_id"] == "4" and missing["input"] == "ckpt_name"
    assert missing["folder"] == "checkpoints"
    assert missing["closest"][0] == "tiny-sd15.safetensors"
    # Without the missing node, ComfyUI's own validation names the input too.
    del graph["10"]
    report = validate(server, graph)
    assert report["valid"] is False and report["missing_nodes"] == []
    assert report["node_errors"]["4"]["errors"][0]["extra_info"]["input_name"] == "ckpt_name"


def test_validate_a_runnable_workflow_runs_nothing(server: Server) -> None:
    graph = text_to_image(steps=2)
    graph["9"]["inputs"]["filename_prefix"] = "dry-run-only"
    queued = server.log_path.read_text().count("queued as prompt")
    report = validate(server, graph)
    assert report["valid"] is True and report["error"] is None, report
    assert report["outputs"] == ["9"]
    (model,) = report["models"]
    assert model["name"] == "tiny-sd15.safetensors" and model["folder"] == "checkpoints"
    assert Path(model["path"]).is_file() and model["bytes"] == Path(model["path"]).stat().st_size
    out = Path(server.log_path).parent / "output"
    assert not list(out.rglob("dry-run-only*"))  # nothing executed
    assert server.log_path.read_text().count("queued as prompt") == queued


def test_validate_reports_bad_json_and_bad_inputs(server: Server) -> None:
    r = requests.post(f"{server.url}/api/serverless/validate", data=b"{not json", timeout=30)
    assert r.status_code == 200 and r.json()["valid"] is False
    assert r.json()["error"]["type"] == "invalid_json"
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "no-such-file.png"}},
             "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    report = validate(server, graph)
    assert report["valid"] is False
    assert report["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == "image"
