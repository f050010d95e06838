"""OpenAI-compatible images against a real server on the tiny checkpoint,
with the official ``openai`` Python package (test-only, unmodified) as the
client: models are the apps, generations and edits (image + mask, multipart)
return images, errors come back as OpenAI's error objects, and API keys go as
``Authorization: Bearer``."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from tests.api.test_apps import t2i_app
from tests.conftest import text_to_image
from tests.servers import Server

openai = pytest.importorskip("openai")

KEY = "sk-test-openai-key"


def edit_app() -> dict[str, Any]:
    """Image to image with a mask: LoadImage -> VAEEncode, LoadImageMask
    (alpha: transparent = edit, as OpenAI's masks) -> SetLatentNoiseMask."""
    g = text_to_image(steps=2)
    g["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "none.png"}}
    g["11"] = {"class_type": "LoadImageMask", "inputs": {"image": "none.png", "channel": "alpha"}}
    g["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0],
                                                              "mask": ["11", 0]}}
    g["3"]["inputs"].update(latent_image=["12", 0], denoise=0.6)
    return {"description": "masked image to image", "workflow": g,
            "parameters": {"prompt": {"node": "6", "input": "text"},
                           "seed": {"node": "3", "input": "seed"},
                           "image": {"node": "10", "input": "image", "required": True},
                           "mask": {"node": "11", "input": "image", "required": True}},
            "openai": {"prompt": "prompt", "image": "image", "mask": "mask"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    apps = tmp_path_factory.mktemp("oai-apps")
    (apps / "tiny-t2i.json").write_text(json.dumps(t2i_app()))
    (apps / "tiny-edit.json").write_text(json.dumps(edit_app()))
    s = Server(tmp_path_factory.mktemp("oai"), apps_dir=apps, api_keys=KEY)
    try:
        yield s.wait_ready(headers={"Authorization": f"Bearer {KEY}"})
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return openai.OpenAI(api_key=KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=300)


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models_are_the_apps(client: Any) -> None:
    ids = [m.id for m in client.models.list().data]
    assert set(ids) == {"tiny-t2i", "tiny-edit"}


def test_generations_b64_and_url(client: Any) -> None:
    r = client.images.generate(model="tiny-t2i", prompt="a lighthouse at dusk", n=2,
                               size="96x64", response_format="b64_json", extra_body={"seed": 3})
    assert len(r.data) == 2
    with _image(r.data[0].b64_json) as im:
        assert im.size == (96, 64)
    again = client.images.generate(model="tiny-t2i", prompt="a lighthouse at dusk", n=2,
                                   size="96x64", extra_body={"seed": 3})
    with _image(again.data[1].b64_json) as a, _image(r.data[1].b64_json) as b:
        assert a.tobytes() == b.tobytes()  # the seed extension is honoured
    other = client.images.generate(model="tiny-t2i", prompt="a lighthouse at dusk", n=2,
                                   size="96x64", extra_body={"seed": 4})
    with _image(other.data[1].b64_json) as a, _image(r.data[1].b64_json) as b:
        assert a.tobytes() != b.tobytes()
    u = client.images.generate(model="tiny-t2i", prompt="x", response_format="url")
    assert u.data[0].url.startswith("data:image/png;base64,")
    with _image(u.data[0].url.split(",", 1)[1]) as im:
        assert im.size == (64, 64)


def test_edits_with_image_and_mask(client: Any) -> None:
    src, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src, "PNG")
    m = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent: edit it
    m.save(mask, "PNG")
    r = client.images.edit(model="tiny-edit", image=("in.png", src.getvalue(), "image/png"),
                           mask=("mask.png", mask.getvalue(), "image/png"),
                           prompt="make it blue", response_format="b64_json")
    (img,) = r.data
    with _image(img.b64_json) as im:
        assert im.size == (64, 64)


def test_errors_are_openai_errors(client: Any, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="no-such-app", prompt="x")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-t2i", prompt="x", size="big")
    assert e.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-t2i", prompt="x", size="4096x4096")
    assert "parameter 'width'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-edit", prompt="x", n=2)
    assert e.value.body["param"] == "n"
    bad = openai.OpenAI(api_key="wrong", base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.models.list()
    assert auth.value.body["code"] == "invalid_api_key"  # OpenAI's shape, from the key check
    r = requests.post(f"{server.url}/v1/images/generations", data=b"[1]", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that uploads outputs to (fake) OSS and signs links for them."""
    from tests.fakes import FakeOss

    oss = FakeOss(keys={"oai-key": "oai-secret"})
    oss.start()
    apps = tmp_path_factory.mktemp("oai-stored-apps")
    (apps / "tiny-t2i.json").write_text(json.dumps(t2i_app()))
    s = Server(tmp_path_factory.mktemp("oai-stored"), apps_dir=apps,
               raw_env={"OSS_ACCESS_KEY_ID": "oai-key", "OSS_ACCESS_KEY_SECRET": "oai-secret"},
               oss_bucket="test-bucket", oss_endpoint=oss.endpoint, oss_region="cn-hangzhou",
               oss_link_expire=600)
    try:
        yield s.wait_ready()
    finally:
        s.stop()
        oss.stop()


def test_url_answers_signed_links_with_object_storage(stored: Server) -> None:
    client = openai.OpenAI(api_key="unused", base_url=f"{stored.url}/v1", max_retries=0,
                           timeout=300)
    r = client.images.generate(model="tiny-t2i", prompt="x", n=2, response_format="url")
    assert len(r.data) == 2
    for item in r.data:
        assert item.url.startswith("http") and item.b64_json is None
        got = requests.get(item.url, timeout=30)
        assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
