"""Comfy API v2 through the official TypeScript SDK (@comfyorg/sdk 0.1.9),
unchanged: ``sdk_flow.mjs`` runs under node 22 against a real server.

``scripts/node`` installs node 22 and the SDK outside the repository. When
they are missing the test is skipped, unless ``COMFY_EMBED_TEST_NODE=required``
(set by ``.ci/run``), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.v2.conformance import Conformance
from tests.api.v2.recorder import RecordingProxy
from tests.api.v2.sdkflows import (
    invert_graph,
    is_inverted,
    long_graph,
    png_bytes,
    random_color,
)
from tests.servers import Server

KEY = "v2-ts-key-" + "c" * 24
PREFIX = Path(os.environ.get("COMFY_EMBED_NODE_PREFIX",
                             Path.home() / ".cache" / "comfy-embed" / "node-sdk"))
NODE = PREFIX / "node_modules" / ".bin" / "node"
SDK_ENTRY = PREFIX / "node_modules" / "@comfyorg" / "sdk" / "dist" / "index.js"
FLOW = Path(__file__).with_name("sdk_flow.mjs")


def node_22() -> Path:
    reason = ""
    if not NODE.exists() or not SDK_ENTRY.exists():
        reason = f"node 22 and @comfyorg/sdk are not installed in {PREFIX} (run scripts/node)"
    else:
        version = subprocess.run([NODE, "--version"], check=False, capture_output=True, text=True).stdout
        if not version.startswith("v22."):
            reason = f"{NODE} is {version.strip()!r}, not node 22 (run scripts/node)"
    if reason:
        if os.environ.get("COMFY_EMBED_TEST_NODE") == "required":
            pytest.fail(reason + "; COMFY_EMBED_TEST_NODE=required")
        pytest.skip(reason)
    return NODE


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("v2ts"), api_keys=KEY)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def run_flow(node: Path, server: Server, base_url: str, tmp_path: Path,
             color: tuple[int, int, int]) -> dict[str, Any]:
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(color))
    workflow = tmp_path / "workflow_api.json"
    workflow.write_text(json.dumps(invert_graph("v2ts")))
    long = tmp_path / "long.json"
    long.write_text(json.dumps(long_graph(seed=31)))
    env = {**os.environ, "COMFY_BASE_URL": base_url, "COMFY_API_KEY": KEY,
           "COMFY_SDK_ENTRY": str(SDK_ENTRY)}
    done = subprocess.run([node, FLOW, photo, workflow, long, tmp_path], env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"node failed:\n{done.stderr[-4000:]}\n{server.log()}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_typescript_sdk_flow(server: Server, tmp_path: Path) -> None:
    node = node_22()
    color = random_color()
    conf = Conformance()
    with RecordingProxy(server.url) as proxy:  # every answer the SDK got, validated below
        r = run_flow(node, server, proxy.url, tmp_path, color)
        recorded = proxy.v2()
    reached = conf.check_recorded(recorded)
    assert {"POST /api/v2/jobs", "GET /api/v2/jobs/{id}/events", "POST /api/v2/assets",
            "HEAD /api/v2/assets/by-hash/{hash}", "POST /api/v2/assets/from-hash",
            "GET /api/v2/assets/{id}/content", "GET /api/v2/jobs/{id}/workflow",
            "POST /api/v2/jobs/{id}/cancel"} <= reached, reached

    assert r["job"]["status"] == "succeeded" and r["job"]["outputType"] == "image"
    run_png = (tmp_path / "run.png").read_bytes()
    assert len(run_png) == r["job"]["outputSize"] and is_inverted(run_png, color)
    assert bytes(r["head"]) == run_png[:8]

    assert r["firstUpload"]["createdNew"] is True
    assert r["secondUpload"] == {"createdNew": False, "hash": r["firstUpload"]["hash"]}
    assert r["firstUpload"]["hash"].startswith("blake3:")

    assert r["job2"]["status"] == "succeeded"
    assert r["job2"]["events"].count("status:succeeded") == 1
    assert r["job2"]["events"][-1] == "status:succeeded"
    assert is_inverted((tmp_path / "submit.png").read_bytes(), color)

    assert r["workflow"] == {"format": "api", "classes": {
        "1": "LoadImage", "2": "ImageInvert", "3": "SaveImage"}}
    assert r["cancel"]["afterCancel"] in ("canceling", "canceled")
    assert r["cancel"]["final"] == "canceled"
