"""Bounds on what one request may cost (issue 25, round 3: items 2, 3, 4),
reproduced against a real server (real uvicorn, real ComfyUI on CPU, real
HTTP clients, a real loopback web server for URL inputs)."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from PIL import Image

from tests.conftest import image_only
from tests.fakes.web_server import NOISE, Web, make_png, serve_web
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
    # Many nodes, each within the limit, add up (a 1 MB graph of 10,000
    # nodes used to leave 5.7 GB).
    many = {str(i): {"class_type": "EmptyImage",
                     "inputs": {"width": 256, "height": 256, "batch_size": 128, "color": i}}
            for i in range(1, 101)}
    many["999"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "m", "images": ["1", 0]}}
    r = server.run(many)
    assert r.status_code == 400, r.text
    err = r.json()["data"]["error"]
    assert err["type"] == "output_too_large" and len(err["node_errors"]) == 100
    assert_serves(server)


# ------------------------------------------------------------------ item 2
@pytest.fixture(scope="module")
def web() -> Iterator[Web]:
    with serve_web() as w:
        yield w


@pytest.fixture(scope="module")
def fetching(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("fetching"), url_allowlist="127.0.0.1",
               max_url_inputs=4, max_image_bytes=100_000, max_request_input_bytes=150_000,
               fetch_concurrency=2)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def loaders(*urls: str) -> dict[str, Any]:
    """One LoadImage per URL; only the first reaches an output (the others
    need not: they are fetched all the same)."""
    g: dict[str, Any] = {str(i + 1): {"class_type": "LoadImage", "inputs": {"image": url}}
                         for i, url in enumerate(urls)}
    g["99"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}}
    return g


def left_in_inputs(server: Server) -> list[Path]:
    folder = server.output_dir.parent / "input" / "serverless"
    return [p for p in folder.rglob("*") if not p.is_dir()] if folder.exists() else []


def test_2_too_many_url_inputs_are_refused_before_any_fetch(fetching: Server, web: Web) -> None:
    # 400 URL inputs used to be admitted (each buffered up to 50 MB at once).
    urls = [f"{web.base}/noise.png?many={i}" for i in range(5)]
    r = fetching.run(loaders(*urls))
    assert r.status_code == 400, r.text
    err = r.json()["data"]["error"]
    assert err["type"] == "too_many_url_inputs" and "MAX_URL_INPUTS" in err["message"]
    assert "5 URL inputs" in err["message"] and set(err["node_errors"]) == {"1", "2", "3", "4", "5"}
    assert not [path for _, path in web.requests if "many=" in path]
    report = validate(fetching, loaders(*urls))
    assert report["valid"] is False and report["error"]["type"] == "too_many_url_inputs"


def test_2_a_request_s_inputs_share_one_byte_budget(fetching: Server, web: Web) -> None:
    # Each noise PNG is under the 100 KB input cap; three are over the
    # request's 150 KB.
    assert 50_000 < len(NOISE) < 100_000
    r = fetching.run(loaders(*[f"{web.base}/noise.png?budget={i}" for i in range(3)]))
    assert r.status_code == 422, r.text
    err = r.json()["data"]["error"]
    assert "MAX_REQUEST_INPUT_BYTES" in err["message"] and "150000 bytes in all" in err["message"]
    assert left_in_inputs(fetching) == []
    r = fetching.run(loaders(f"{web.base}/noise.png?budget=one"))
    assert r.status_code == 200, r.text


def test_2_bodies_over_the_cap_stop_early(fetching: Server, web: Web) -> None:
    # A declared length over the cap is refused before the body is read.
    r = fetching.run(loaders(f"{web.base}/huge-declared.png"))
    assert r.status_code == 422, r.text
    assert "1000000000 bytes is over the 100000 byte limit" in r.json()["data"]["error"]["message"]
    # An undeclared body stops at the cap, and its partial file is removed.
    r = fetching.run(loaders(f"{web.base}/endless"))
    assert r.status_code == 422, r.text
    assert "over the 100000 byte limit" in r.json()["data"]["error"]["message"]
    assert left_in_inputs(fetching) == []


def test_2_fetches_are_bounded_per_instance(fetching: Server, web: Web) -> None:
    # Two requests of two held URLs each: at most fetch_concurrency (2)
    # are read at once on the instance (it was every input of every request).
    web.most_in_flight = 0
    results: list[int] = []

    def one(tag: str) -> None:
        r = fetching.run(loaders(f"{web.base}/held?{tag}a", f"{web.base}/held?{tag}b"))
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(t,)) for t in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200, 200]
    assert web.most_in_flight == 2
