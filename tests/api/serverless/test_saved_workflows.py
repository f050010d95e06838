"""Saved (editor) workflows posted as they are, through the real HTTP API and
WebSocket of a real server: converted with the server's node definitions,
run, validated, and refused with errors that name the editor's node."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from PIL import Image

from tests.servers import Server

SAVED = Path(__file__).resolve().parents[2] / "prepare" / "ui_workflows"


def saved(name: str) -> dict[str, Any]:
    return json.loads((SAVED / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("saved"))
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def test_saved_workflow_with_nested_subgraphs_runs(server: Server) -> None:
    """Outer subgraph (EmptyImage fed by a promoted widget) wrapping an inner
    one (ImageInvert, then a bypassed ImageBlur): green inverted is magenta."""
    r = requests.post(f"{server.url}/api/serverless/run?output_base64=1",
                      json=saved("nested_subgraph_bypass"), timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["status"] == "success", data
    (result,) = data["results"]
    from io import BytesIO
    with Image.open(BytesIO(base64.b64decode(result["output"]["base64"]["data"]))) as im:
        assert im.size == (64, 64)
        assert im.convert("RGB").getpixel((5, 5)) == (255, 0, 255)
    # The saved workflow travels as extra_pnginfo.workflow, as the editor sends it.
    c = result["output"]["comfy"]
    with Image.open(server.file_of(c)) as im:
        if "prompt" in im.info:  # only when the server writes metadata
            assert json.loads(im.info["workflow"])["definitions"]


def test_saved_workflow_over_websocket_and_in_native_envelope(server: Server) -> None:
    ws = websocket.create_connection(server.ws_url, timeout=120)
    try:
        ws.send(json.dumps({"prompt": saved("nested_subgraph_bypass"), "client_id": "c1"}))
        while True:
            ev = json.loads(ws.recv())
            if ev["type"] == "serverless_api":
                break
        assert ev["data"]["status"] == "success", ev
        assert [r["node_id"] for r in ev["data"]["results"]] == ["2"]
    finally:
        ws.close()


def test_validate_saved_workflow_names_editor_nodes(server: Server) -> None:
    wf = saved("nested_subgraph_bypass")
    outer = wf["definitions"]["subgraphs"][0]
    outer["nodes"][0]["widgets_values"][0] = -64  # EmptyImage width, inside the subgraph
    r = requests.post(f"{server.url}/api/serverless/validate", json=wf, timeout=60)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["valid"] is False
    # The node id is the editor's: the subgraph instance 1, its inner node 5.
    err = report["node_errors"]["1:5"]
    assert err["class_type"] == "EmptyImage"
    assert err["errors"][0]["extra_info"]["input_name"] == "width"


def test_muted_node_inputs_go_with_it(server: Server) -> None:
    """Node 6 (ImageBlur) is muted: PreviewImage 7 loses its only input and
    ComfyUI's validation names it; the bypassed invert passes its input on."""
    r = requests.post(f"{server.url}/api/serverless/validate",
                      json=saved("bypass_mute_reroute_primitive"), timeout=60)
    report = r.json()
    assert report["valid"] is False, report
    assert set(report["node_errors"]) == {"7", "10"}, report["node_errors"]
    assert report["node_errors"]["7"]["class_type"] == "PreviewImage"


def test_bad_saved_workflow_is_a_400_naming_the_node(server: Server) -> None:
    wf = saved("bypass_mute_reroute_primitive")
    wf["extra"]["groupNodes"] = {"My group": {"nodes": []}}
    r = requests.post(f"{server.url}/api/serverless/run", json=wf, timeout=60)
    assert r.status_code == 400, r.text
    assert "group nodes (My group)" in r.text
    loop = copy.deepcopy(saved("bypass_mute_reroute_primitive"))
    # A bypassed node fed by its own output: a loop the editor cannot resolve either.
    loop["links"].append([99, 2, 0, 2, 0, "IMAGE"])
    loop["nodes"][1]["inputs"][0]["link"] = 99
    r = requests.post(f"{server.url}/api/serverless/run", json=loop, timeout=60)
    assert r.status_code == 400, r.text
    assert "node 2 (bypassed invert)" in r.text and "loop" in r.text
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
