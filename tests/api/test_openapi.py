"""The OpenAPI document: valid, complete, true of a live server (schemathesis)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import requests
from openapi_spec_validator import validate
from starlette.routing import Mount, Route, WebSocketRoute

from comfy_embed.api import create_app
from comfy_embed.api.openapi import document
from comfy_embed.config import Settings

from tests.fakes import FakeOss
from tests.servers import Server


def test_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_route_of_the_app_is_described(tmp_path: Path) -> None:
    app = create_app(Settings(base_dir=tmp_path))
    paths = document()["paths"]
    for route in app.routes:
        if isinstance(route, Mount):
            path, methods = route.path + "/{path}", {"get"}
        elif isinstance(route, WebSocketRoute):
            path, methods = route.path, {"get"}
        else:
            assert isinstance(route, Route)
            path, methods = route.path, {m.lower() for m in route.methods or ()} - {"head"}
        assert path in paths, f"{path} is not in the OpenAPI document"
        assert methods <= set(paths[path]), (path, methods, set(paths[path]))


@pytest.fixture(scope="module")
def oss() -> Iterator[FakeOss]:
    fake = FakeOss(keys={"key-id": "secret"})
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, oss: FakeOss) -> Iterator[Server]:
    # Fully configured (object storage too): a request for an upload with no
    # bucket configured is the operator's fault, and rightly a 5xx.
    s = Server(tmp_path_factory.mktemp("openapi"),
               raw_env={"OSS_ACCESS_KEY_ID": "key-id", "OSS_ACCESS_KEY_SECRET": "secret"},
               oss_bucket="test-bucket", oss_endpoint=oss.endpoint, oss_region="cn-hangzhou")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.mark.server
def test_docs_page_is_served_from_local_files(server: Server) -> None:
    page = requests.get(server.url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/docs/docs.js" in assets and "/docs/docs.css" in assets
    assert not [a for a in assets if "//" in a], "the page must load nothing from elsewhere"
    for asset in assets:
        assert requests.get(server.url + asset, timeout=10).status_code == 200, asset
    script = requests.get(server.url + "/docs/docs.js", timeout=10).text
    assert 'fetch("/openapi.json")' in script and "http" not in script
    served = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert served == document()


@pytest.mark.server
def test_schemathesis_finds_no_failures(server: Server, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "st"
    cmd = [str(st), "run", server.url + "/openapi.json",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance",
           "--max-examples", "8", "--seed", "1", "--workers", "1", "--request-timeout", "60",
           # Draining would end the test; a WebSocket is not plain HTTP.
           "--exclude-path", "/pre-stop", "--exclude-path", "/api/serverless/ws",
           "--phases", "examples,coverage,fuzzing"]
    # cwd: schemathesis keeps a cache folder where it runs.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
