"""Bounds on what one request may cost (issue 25, round 3: items 2, 3, 4),
reproduced against a real server (real uvicorn, real ComfyUI on CPU, real
HTTP clients, a real loopback web server for URL inputs)."""

from __future__ import annotations

import base64
import json
from typing import Any, Iterator

import pytest
import requests

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
