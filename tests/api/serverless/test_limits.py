"""Bounds on what one request may cost (issue 25, round 3: items 2, 3, 4),
reproduced against a real server (real uvicorn, real ComfyUI on CPU, real
HTTP clients, a real loopback web server for URL inputs)."""

from __future__ import annotations

import base64
import json
from typing import Any, Iterator

import pytest
import requests
from PIL import Image

from tests.conftest import image_only
from tests.fakes.web_server import make_png
from tests.servers import Server

API = "/api/serverless"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("limits"))
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def validate(server: Server, graph: Any) -> dict[str, Any]:
    r = requests.post(f"{server.url}{API}/validate", data=json.dumps(graph),
                      headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def assert_serves(server: Server) -> None:
    r = server.run(image_only(batch=1))
    assert r.status_code == 200 and r.json()["data"]["status"] == "success", r.text


# ------------------------------------------------------------------ item 4
def test_4_validate_applies_the_node_limit(server: Server) -> None:
    # 100,000 nodes used to be validated one by one (2.4 s, and two 32 MB
    # graphs at once stalled /health); the node limit now refuses the graph
    # before ComfyUI sees it.
    huge = {str(i): {"class_type": "EmptyImage", "inputs": {}} for i in range(100_000)}
    report = validate(server, huge)
    assert report["valid"] is False
    assert report["error"]["type"] == "too_many_nodes"
    assert "100000 nodes" in report["error"]["message"] and "400" in report["error"]["message"]
    assert report["models"] == [] and report["outputs"] == []
    assert_serves(server)


def test_4_validate_applies_the_denylist(server: Server) -> None:
    # A run leaves its inputs under serverless/<task id>/ while it runs:
    # a folder reader's "not in list" details used to name those folders.
    inline = "data:image/png;base64," + base64.b64encode(make_png((16, 16), "green")).decode()
    r = server.run({"1": {"class_type": "LoadImage", "inputs": {"image": inline}},
                    "2": {"class_type": "SaveImage",
                          "inputs": {"filename_prefix": "x", "images": ["1", 0]}}},
                   headers={"X-Task-Id": "victim-4v"})
    assert r.status_code == 200, r.text
    reader = {"1": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "serverless"}},
              "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x",
                                                          "images": ["1", 0]}}}
    report = validate(server, reader)
    assert report["valid"] is False and report["error"]["type"] == "node_denied"
    assert report["node_errors"]["1"]["class_type"] == "LoadImageSetFromFolderNode"
    assert "victim-4v" not in json.dumps(report)

    vae_save = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
                "2": {"class_type": "VAESave", "inputs": {"vae": ["1", 0], "filename_prefix": "v"}}}
    report = validate(server, vae_save)
    assert report["valid"] is False and report["error"]["type"] == "node_denied"
    assert "VAESave" in report["error"]["message"]
    assert report["node_errors"]["2"]["errors"][0]["extra_info"]["input_name"] == "class_type"


# ------------------------------------------------------------------ item 3
def test_3_unknown_inputs_never_reach_the_outputs(server: Server) -> None:
    # An undeclared 1 MiB input used to be embedded in every output PNG
    # (EmptyImage batch 64 + 4 MiB: 268 MB written in a second).
    g = image_only(batch=3)
    g["1"]["inputs"]["junk"] = "j" * 2**20
    g["2"]["inputs"]["also_junk"] = {"nested": "x" * 1000}
    r = server.run(g)
    assert r.status_code == 200, r.text
    results = r.json()["data"]["results"]
    assert len(results) == 3
    for result in results:
        path = server.file_of(result["output"]["comfy"])
        assert path.stat().st_size < 20_000, path.stat().st_size
        with Image.open(path) as im:
            prompt = json.loads(im.text["prompt"])
        assert "junk" not in prompt["1"]["inputs"] and "also_junk" not in prompt["2"]["inputs"]
        assert prompt["1"]["inputs"]["batch_size"] == 3  # declared inputs are kept


def test_3_output_bytes_are_bounded_at_validation(server: Server) -> None:
    # batch_size goes up to 4096: 4096 x 1024x1024 would be 12 GB of PNG.
    g = image_only(batch=4096, size=1024)
    r = server.run(g)
    assert r.status_code == 400, r.text
    err = r.json()["data"]["error"]
    assert err["type"] == "output_too_large" and "MAX_OUTPUT_BYTES" in err["message"]
    assert err["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == "batch_size"
    report = validate(server, g)
    assert report["valid"] is False and report["error"]["type"] == "output_too_large"
    # The metadata counts per picture: tiny images, but each would embed a
    # 2 MB declared string (an unconnected node is still in the prompt).
    g = image_only(batch=1200, size=8)
    g["9"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "m" * 2_000_000}}
    r = server.run(g)
    assert r.status_code == 400, r.text
    assert r.json()["data"]["error"]["type"] == "output_too_large"
    assert_serves(server)
