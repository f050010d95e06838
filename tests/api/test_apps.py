"""Workflow apps through a real server and every transport: listed with a
JSON Schema each, called by name with named parameters over sync HTTP, SSE,
async + status, ``?app=`` on the FC run, the WebSocket and a webhook; a bad
parameter is a 400 naming it; an app added while the server runs is served
without a restart; parameters declared in the editor by ``@title``."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import websocket
from PIL import Image

from tests.conftest import text_to_image
from tests.fakes.webhook_receiver import SECRET, Receiver, serve_receiver
from tests.servers import Server

SAVED = Path(__file__).resolve().parents[1] / "prepare" / "ui_workflows"


def t2i_app() -> dict[str, Any]:
    return {"description": "Text to image on the tiny checkpoint",
            "workflow": text_to_image(steps=2, size=64),
            "parameters": {
                "prompt": {"node": "6", "input": "text", "description": "what to draw"},
                "seed": {"node": "3", "input": "seed"},
                "steps": {"node": "3", "input": "steps", "maximum": 4},
                "sampler": {"node": "3", "input": "sampler_name", "choices": ["euler", "ddim"]},
                "width": {"node": "5", "input": "width", "maximum": 256},
                "height": {"node": "5", "input": "height", "maximum": 256},
                "batch": {"node": "5", "input": "batch_size", "maximum": 4}},
            "openai": {"prompt": "prompt", "n": "batch", "size": ["width", "height"]}}


def invert_app() -> dict[str, Any]:
    """A saved (editor) workflow whose parameter is declared by a title:
    LoadImage titled ``@image`` feeds ImageInvert feeds SaveImage."""
    return {"last_node_id": 3, "last_link_id": 2, "links": [[1, 1, 0, 2, 0, "IMAGE"],
                                                           [2, 2, 0, 3, 0, "IMAGE"]],
            "nodes": [
                {"id": 1, "type": "LoadImage", "title": "@image", "mode": 0,
                 "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]},
                                           {"name": "MASK", "type": "MASK", "links": []}],
                 "widgets_values": ["example.png", "image"]},
                {"id": 2, "type": "ImageInvert", "mode": 0,
                 "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
                 "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}]},
                {"id": 3, "type": "SaveImage", "mode": 0,
                 "inputs": [{"name": "images", "type": "IMAGE", "link": 2}], "outputs": [],
                 "widgets_values": ["inverted"]}],
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def png(color: tuple[int, int, int], size: int = 32) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def apps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("apps")
    (d / "t2i.json").write_text(json.dumps(t2i_app()))
    (d / "invert.json").write_text(json.dumps(invert_app()))
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, apps_dir: Path) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("apps-srv"), apps_dir=apps_dir,
               url_allowlist="127.0.0.1", webhook_secret=SECRET)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def test_apps_are_listed_with_a_json_schema(server: Server) -> None:
    r = requests.get(f"{server.url}/api/apps", timeout=30)
    assert r.status_code == 200, r.text
    apps = {a["name"]: a for a in r.json()["apps"]}
    assert set(apps) >= {"t2i", "invert"}
    schema = apps["t2i"]["schema"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["prompt"]["type"] == "string" and props["prompt"]["description"] == "what to draw"
    assert props["seed"]["type"] == "integer" and props["seed"]["minimum"] == -1
    assert props["steps"]["maximum"] == 4 and props["steps"]["default"] == 2
    assert props["sampler"]["enum"] == ["euler", "ddim"]
    assert apps["invert"]["schema"]["properties"]["image"]["contentMediaType"] == "image/*"
    one = requests.get(f"{server.url}/api/apps/t2i", timeout=30).json()
    assert one["schema"] == schema
    assert requests.get(f"{server.url}/api/apps/nope", timeout=30).status_code == 404


def test_app_call_sync_and_parameters_reach_the_nodes(server: Server) -> None:
    r = requests.post(f"{server.url}/api/apps/t2i?output_base64=1",
                      json={"prompt": "a red fox", "seed": 5, "batch": 2, "width": 96}, timeout=300)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["status"] == "success", data
    assert data["seeds"] == {"3": 5}
    assert len(data["results"]) == 2
    raw = base64.b64decode(data["results"][0]["output"]["base64"]["data"])
    with Image.open(io.BytesIO(raw)) as im:
        assert im.size == (96, 64)


def test_app_with_image_parameter_declared_by_title(server: Server) -> None:
    r = requests.post(f"{server.url}/api/apps/invert?output_base64=1",
                      json={"image": png((10, 20, 30))}, timeout=120)
    assert r.status_code == 200, r.text
    (result,) = r.json()["data"]["results"]
    with Image.open(io.BytesIO(base64.b64decode(result["output"]["base64"]["data"]))) as im:
        assert im.convert("RGB").getpixel((3, 3)) == (245, 235, 225)


def test_bad_parameters_are_400s_naming_the_parameter(server: Server) -> None:
    cases = [({"steps": 9}, "parameter 'steps'"), ({"seed": "x"}, "parameter 'seed'"),
             ({"sampler": "dpmpp_2m"}, "parameter 'sampler'"),
             ({"colour": 1}, "parameter 'colour' is not a parameter of app 't2i'")]
    for body, expected in cases:
        r = requests.post(f"{server.url}/api/apps/t2i", json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert expected in r.json()["data"]["error"]["message"], r.text
    r = requests.post(f"{server.url}/api/apps/t2i", data=b"{nope", timeout=30)
    assert r.status_code == 400
    r = requests.post(f"{server.url}/api/apps/missing", json={}, timeout=30)
    assert r.status_code == 404 and r.json()["data"]["error"]["type"] == "app_not_found"
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_app_stream_async_fc_query_and_websocket(server: Server) -> None:
    r = requests.post(f"{server.url}/api/apps/t2i?stream=1", json={"seed": 7}, timeout=300)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "serverless_api" and events[-1]["data"]["status"] == "success"
    r = requests.post(f"{server.url}/api/apps/t2i", json={"seed": 8},
                      headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": "app-async-1"},
                      timeout=60)
    assert r.status_code == 202 and r.json()["task_id"] == "app-async-1"
    final = server.wait_final("app-async-1")[-1]
    assert final["data"]["status"] == "success" and final["data"]["seeds"] == {"3": 8}
    r = requests.post(f"{server.url}/api/serverless/run?app=t2i", json={"seed": 9}, timeout=300)
    assert r.status_code == 200 and r.json()["data"]["seeds"] == {"3": 9}, r.text
    r = requests.post(f"{server.url}/api/apps/t2i", json={"seed": -1}, timeout=300)
    assert r.status_code == 200 and r.json()["data"]["seeds"]["3"] >= 0, r.text  # random
    ws = websocket.create_connection(f"{server.ws_url}?app=t2i", timeout=300)
    try:
        for body, status in (({"seed": 10}, "success"), ({"steps": 99}, "error")):
            ws.send(json.dumps(body))
            while True:
                ev = json.loads(ws.recv())
                if ev["type"] == "serverless_api":
                    break
            assert ev["data"]["status"] == status, ev
        assert "parameter 'steps'" in ev["data"]["error"]["message"]
    finally:
        ws.close()


def test_app_webhook(server: Server, receiver: Receiver) -> None:
    path, url = receiver.new_hook("app")
    r = requests.post(f"{server.url}/api/apps/t2i?webhook={url}", json={"seed": 11}, timeout=300)
    assert r.status_code == 200, r.text
    [call] = receiver.wait(path, 1)
    assert call.verified, call.error
    assert call.payload["data"]["seeds"] == {"3": 11}


def test_an_app_added_or_changed_needs_no_restart(server: Server, apps_dir: Path) -> None:
    app = t2i_app()
    app["description"] = "added while running"
    (apps_dir / "late.json").write_text(json.dumps(app))
    names = [a["name"] for a in requests.get(f"{server.url}/api/apps", timeout=30).json()["apps"]]
    assert "late" in names
    app["parameters"]["steps"]["maximum"] = 3
    app["description"] = "changed"
    (apps_dir / "late.json").write_text(json.dumps(app) + " ")
    one = requests.get(f"{server.url}/api/apps/late", timeout=30).json()
    assert one["description"] == "changed" and one["schema"]["properties"]["steps"]["maximum"] == 3


def test_openapi_document_carries_each_apps_schema(server: Server) -> None:
    from openapi_spec_validator import validate

    doc = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    validate(doc)
    listed = {a["name"]: a for a in requests.get(f"{server.url}/api/apps", timeout=30)
              .json()["apps"]}
    for name in ("t2i", "invert"):
        body = doc["paths"][f"/api/apps/{name}"]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == listed[name]["schema"]
    assert "/v1/images/generations" in doc["paths"]
