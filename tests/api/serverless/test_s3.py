"""S3 through the real HTTP API: `s3://` inputs and uploads to an
S3-compatible bucket (a local moto server) with `storage=s3`."""

from __future__ import annotations

import base64
from typing import Iterator

import pytest
import requests

from tests.fakes.moto_s3 import serve_s3
from tests.fakes.web_server import PNG

from tests.servers import Server
from tests.api.serverless.test_images import load_graph

BUCKET = "out-bucket"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with serve_s3(BUCKET, {"inputs/red.png": (PNG, "image/png")}) as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("s3"), raw_env=AWS, storage="s3", s3_bucket=BUCKET,
               s3_endpoint=s3_endpoint, s3_region="us-east-1", s3_link_expire=300)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def test_s3_input_and_output(server: Server) -> None:
    r = server.run(load_graph("s3://out-bucket/inputs/red.png"), "?output_oss=1&output_base64=1")
    assert r.status_code == 200, r.text
    (res,) = r.json()["data"]["results"]
    up = res["output"]["s3"]
    assert up["bucket"] == BUCKET and up["object"].startswith("serverless-api-output/")
    got = requests.get(up["url"], timeout=10)
    assert got.status_code == 200 and got.headers["Content-Type"] == "image/png"
    assert got.content == base64.b64decode(res["output"]["base64"]["data"])


def test_s3_missing_object_is_named(server: Server) -> None:
    r = server.run(load_graph("s3://out-bucket/inputs/absent.png"))
    assert r.status_code == 422, r.text
    assert "node 1 (LoadImage) input 'image'" in r.json()["data"]["error"]["message"]
