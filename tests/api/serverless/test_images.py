"""Images in and out through the real HTTP API: URL, oss:// and base64
inputs; base64, re-encoded and OSS outputs; every bad input named."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Iterator

import pytest
import requests
import websocket
from PIL import Image

from tests.fakes import FakeObject, FakeOss
from tests.fakes.web_server import PNG, Web, serve_web

from tests.servers import Server

KEY_ID, SECRET = "test-key-id", "test-key-secret"


def load_graph(image: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "in", "images": ["2", 0]}}}


@pytest.fixture(scope="module")
def oss() -> Iterator[FakeOss]:
    fake = FakeOss(keys={KEY_ID: SECRET})
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def web() -> Iterator[Web]:
    with serve_web() as web:
        yield web


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, oss: FakeOss) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("img"),
               raw_env={"OSS_ACCESS_KEY_ID": KEY_ID, "OSS_ACCESS_KEY_SECRET": SECRET},
               url_allowlist="127.0.0.1", fetch_timeout=3, max_image_bytes=40_000,
               oss_bucket="test-bucket", oss_endpoint=oss.endpoint, oss_region="cn-hangzhou",
               oss_link_expire=600)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def first_pixel(server: Server, result: dict[str, Any]) -> list[int]:
    with Image.open(server.file_of(result["output"]["comfy"])) as im:
        return list(im.convert("RGB").getpixel((0, 0)))


def ok(r: requests.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["status"] == "success"
    return data


# ------------------------------------------------------------------ inputs
def test_url_input(server: Server, web: Web) -> None:
    data = ok(server.run(load_graph(f"{web.base}/ok.png")))
    assert first_pixel(server, data["results"][0]) == [0, 255, 255]  # red inverted


@pytest.mark.parametrize("encode", [
    lambda b: base64.b64encode(b).decode(),
    lambda b: "data:image/png;base64," + base64.b64encode(b).decode(),
])
def test_base64_inputs(server: Server, encode: Any) -> None:
    data = ok(server.run(load_graph(encode(PNG))))
    assert first_pixel(server, data["results"][0]) == [0, 255, 255]


def test_oss_input(server: Server, oss: FakeOss) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(buf, "PNG")
    oss.objects[("test-bucket", "inputs/blue.png")] = FakeObject(buf.getvalue(), "image/png")
    data = ok(server.run(load_graph("oss://test-bucket/inputs/blue.png")))
    assert first_pixel(server, data["results"][0]) == [255, 255, 0]


@pytest.mark.parametrize("value, code, needle", [
    ("{web}/missing.png", 422, "404"),
    ("{web}/text", 422, "image"),
    ("{web}/bomb.png", 422, "pixels"),
    ("{web}/big-declared.png", 422, "limit"),
    ("{web}/slow.png", 422, "timed out"),
    ("{web}/redirect?to=http://169.254.169.254/latest/meta-data", 422, "169.254.169.254"),
    ("iVBORw0KGgo" + "!" * 80, 422, "base64"),
    ("oss://test-bucket/inputs/nope.png", 422, "nope.png"),
    ("../../etc/passwd", 400, "input folder"),
    ("/etc/passwd", 400, "absolute"),
])
def test_bad_image_inputs_are_named(server: Server, web: Web, value: str, code: int,
                                    needle: str) -> None:
    r = server.run(load_graph(value.replace("{web}", web.base)))
    assert r.status_code == code, r.text
    data = r.json()["data"]
    assert data["status"] == "error" and data["results"] == []
    message = data["error"]["message"]
    assert "node 1 (LoadImage) input 'image'" in message
    assert needle.lower() in message.lower(), message
    assert data["error"]["node_errors"]["1"]["class_type"] == "LoadImage"
    ok(server.run(load_graph(base64.b64encode(PNG).decode())))  # still serving


# ------------------------------------------------------------------ outputs
def test_oss_output_and_signed_link(server: Server) -> None:
    graph = load_graph(base64.b64encode(PNG).decode())
    data = ok(server.run(graph, "?output_oss=true&output_base64=true"))
    (res,) = data["results"]
    o = res["output"]["oss"]
    assert o["bucket"] == "test-bucket" and o["region"] == "oss-cn-hangzhou"
    assert o["object"].startswith("serverless-api-output/") and o["object"].endswith(".png")
    assert o["expire"].endswith("Z")
    got = requests.get(o["url"], timeout=10)
    assert got.status_code == 200 and got.headers["Content-Type"] == "image/png"
    assert got.content == base64.b64decode(res["output"]["base64"]["data"])
    sig = o["url"].rsplit("=", 1)[1]
    tampered = o["url"][: -len(sig)] + ("0" if sig[0] != "0" else "1") + sig[1:]
    assert requests.get(tampered, timeout=10).status_code == 403


def test_storage_failure_is_502(server: Server, oss: FakeOss) -> None:
    oss.fail_next = 20  # more 503s than the retries
    try:
        r = server.run(load_graph(base64.b64encode(PNG).decode()), "?output_oss=1")
    finally:
        oss.fail_next = 0
    assert r.status_code == 502, r.text
    err = r.json()["data"]["error"]
    assert err["type"] == "storage_error" and r.json()["data"]["results"] == []
    ok(server.run(load_graph(base64.b64encode(PNG).decode()), "?output_oss=1"))


def test_output_format_jpeg(server: Server) -> None:
    data = ok(server.run(load_graph(base64.b64encode(PNG).decode()),
                         "?output_format=jpeg&quality=80&output_base64=1"))
    (res,) = data["results"]
    assert res["output"]["comfy"]["filename"].endswith(".jpg")
    assert res["output"]["media_type"] == "image/jpeg"
    assert base64.b64decode(res["output"]["base64"]["data"])[:3] == b"\xff\xd8\xff"
    bad = server.run(load_graph(base64.b64encode(PNG).decode()), "?output_format=tiff")
    assert bad.status_code == 400 and "output_format" in bad.json()["data"]["error"]["message"]


def test_stream_and_websocket_with_output_flags(server: Server, web: Web) -> None:
    graph = load_graph(f"{web.base}/ok.png")
    with requests.post(f"{server.url}/api/serverless/run?stream=true&output_base64=true",
                       json=graph, stream=True, timeout=60) as r:
        lines = [json.loads(ln[6:]) for ln in r.iter_lines(decode_unicode=True)
                 if ln and ln.startswith("data: ")]
    assert lines[-1]["data"]["results"][0]["output"]["base64"]["data"]
    ws = websocket.create_connection(server.ws_url + "?output_oss=1", timeout=60)
    try:
        ws.send(json.dumps(graph))
        while True:
            ev = json.loads(ws.recv())
            if ev["type"] == "serverless_api":
                break
    finally:
        ws.close()
    assert ev["data"]["results"][0]["output"]["oss"]["object"].startswith("serverless-api-output/")
